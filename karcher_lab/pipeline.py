"""Model-level merging: a recipe becomes one task per tensor, executed as a stream.

Three steps, each checkable on its own:

1. **Open** the models (:func:`open_model`): local directories, hub ids from the local cache, or
   in-memory state dicts / transformers models. Only headers and config.json are read.
2. **Plan** (:func:`plan_merge`): check the architecture, map the recipe's models and base onto the
   method's inputs exactly as mergekit does, and resolve every parameter for every tensor (scalars,
   gradients over the layer index, ``[{filter, value}]`` lists; see :mod:`karcher_lab.recipe.parameters`).
   All validation (recipe, architecture, parameters, weights, output path) happens here, before any
   tensor is read: every distinct parameter set is also run once on small probe tensors, so that
   checks a method makes only when called fail here, naming the tensor.
3. **Execute** (:func:`execute_plan`): tensor by tensor, load the N inputs (and the base), merge them
   with :func:`karcher_lab.merge_tensors` on the chosen device, and hand the result to a sink: the
   streaming sharded writer (:func:`run_recipe`, the CLI) or a dict (the Python API). Peak memory is
   about (N inputs + 1 output) × the largest tensor, independent of the model's total size.

How recipe models become method inputs (mergekit 0.1.5 semantics, checked by running it): a method that
uses a base (ties, model_stock, multislerp ...) gets ``base_model`` as its base and the other listed
models as inputs; a method that ignores the base (linear, karcher, fisher) gets ``base_model`` as *one
more input* when it is not listed among the models (mergekit appends it; a warning says so); ``slerp``
interpolates from ``base_model`` (t = 0) to the one other model. With ``tokenizer_source`` the
vocabulary tensors are first aligned by token to that tokenizer (:mod:`karcher_lab.io.vocabulary`);
without it, models with different vocabulary sizes are refused.

For repeated merges of the same models (widgets), :class:`MergeSession` keeps the models open and keeps
per-tensor state between calls: optionally the loaded inputs, and for ``karcher`` the per-tensor Gram
matrices, so that re-weighting (or changing η, max_iter, tol, init) re-solves in coefficient space and
only runs the combine pass: no input is re-read or re-normalized.
"""
from __future__ import annotations

import hashlib
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

from karcher_lab.errors import (
    CheckpointError,
    DeviceError,
    EmptyInputError,
    InputError,
    MissingBaseError,
    ModelCountError,
    NotSupportedError,
    ParameterError,
    RecipeError,
    WeightError,
)
from karcher_lab.gram_cache import GramCache
from karcher_lab.io.architecture import Layout, Source, check_layout, vocabulary_rows
from karcher_lab.io.checkpoint import Checkpoint, StateDictSource
from karcher_lab.io.output import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    atomic_directory,
    check_output_path,
    copy_files,
    model_card,
    output_config,
    write_json,
)
from karcher_lab.io.resolve import resolve_model_dir
from karcher_lab.io.vocabulary import VocabularyAlignment, tokenizer_vocabulary
from karcher_lab.io.writer import ShardedSafetensorsWriter, TensorSpec, parse_size
from karcher_lab.merge.api import merge_tensors
from karcher_lab.merge.registry import REQUIRED, MergeMethod, Param, get_method
from karcher_lab.recipe.parameters import NOT_SET, layer_position, num_layers, resolve_setting
from karcher_lab.recipe.schema import (
    DTYPES,
    ModelEntry,
    ModelRef,
    Recipe,
    check_layer_ranges,
    parse_dtype,
    parse_model_ref,
    parse_parameters,
)

WEIGHT = Param("weight", float, 1.0, per_model=True, doc="per-model weight")
"""mergekit's per-model ``weight``, handed to methods as ``weights`` (1.0 when not given)."""

BASE_FIRST_METHODS = ("slerp",)
"""Methods whose two inputs are [base_model, the other model] (mergekit's slerp: t = 0 is the base)."""

BASE_MODE_PARAMETERS = {"karcher": "task_vectors"}
"""Methods that use a base only in an opt-in mode: without it, the base is an input as in mergekit."""

DEFAULT_SHARD_SIZE = "5GB"


# ----------------------------------------------------------------------------------------- opening


def open_model(model: Any, label: str, relative_to: Path | None = None) -> Source:
    """A :class:`Source` for a path / hub id / ModelRef, an in-memory state dict or model, or a Source."""
    if isinstance(model, (Checkpoint, StateDictSource)):
        return model
    if isinstance(model, (str, Path, ModelRef)):
        ref = model if isinstance(model, ModelRef) else ModelRef(str(model))
        return Checkpoint(resolve_model_dir(ref.path, ref.revision, relative_to), label=str(ref))
    return StateDictSource(model, label)


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device; DeviceError when CUDA is requested but not available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was requested but CUDA is not available on this machine; use --device cpu")
    return dev


# ---------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: where its inputs come from and everything resolved for it."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    weights: list[float] | None
    params: dict[str, Any]
    tensor_params: dict[str, list[tuple[Source, str]]]
    seed: int
    floating: bool


@dataclass
class MergePlan:
    """A fully validated merge: the method, its inputs (and base), one :class:`TensorTask` per tensor."""

    recipe: Recipe
    method: MergeMethod
    inputs: list[tuple[ModelRef, Source]]
    base: tuple[ModelRef, Source] | None
    layout: Layout
    tasks: list[TensorTask]
    donor: Source
    load_dtype: torch.dtype | None
    alignment: VocabularyAlignment | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def sources(self) -> list[Source]:
        return [s for _, s in self.inputs] + ([self.base[1]] if self.base else [])

    def stored_name(self, source_index: int, name: str) -> str:
        return self.layout.stored_names[source_index][name]


def tensor_seed(seed: int | None, name: str) -> int:
    """A per-tensor seed derived from the run's seed and the tensor's name (independent of order)."""
    digest = hashlib.sha256(f"{0 if seed is None else int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _method_inputs(recipe: Recipe, method: MergeMethod) -> tuple[list[ModelEntry], ModelRef | None, list[str]]:
    """(input entries in order, base ref or None, warnings), following mergekit (module docstring)."""
    base = recipe.base_model
    entries = list(recipe.models)
    warnings = []
    if method.name in BASE_FIRST_METHODS:
        if base is None:
            raise MissingBaseError(f"{method.name} interpolates from base_model (t = 0) to one other model: give base_model")
        others = [e for e in entries if e.model != base]
        return [ModelEntry(base)] + others, None, warnings
    if method.base == "unused" or (method.name in BASE_MODE_PARAMETERS and not _base_mode(recipe, method)):
        if base is not None and all(e.model != base for e in entries):
            warnings.append(
                f"{method.name} does not use a base model; base_model {base} is merged as one more input "
                "(as mergekit does); list it under models or drop base_model to avoid this"
            )
            entries.append(ModelEntry(base))
        return entries, None, warnings
    if method.base == "required" and base is None:
        raise MissingBaseError(f"{method.name} needs base_model")
    return [e for e in entries if e.model != base], base, warnings


def _base_mode(recipe: Recipe, method: MergeMethod) -> bool:
    """Whether the recipe turns on the method's base mode (one global true/false for the whole merge)."""
    name = BASE_MODE_PARAMETERS[method.name]
    setting = recipe.parameters.get(name, recipe.slice_parameters.get(name, False))
    if not isinstance(setting, (bool, str, int)):
        raise RecipeError(f"parameters.{name} must be one true/false for the whole merge, got {setting!r}")
    return bool(method.param(name).coerce(setting, method.name))


def _check_count(method: MergeMethod, n: int) -> None:
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        expected = (
            f"exactly {method.min_models}" if method.min_models == method.max_models
            else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else "")
        )
        base = " (besides the base model)" if method.base != "unused" else ""
        raise ModelCountError(f"{method.name} merges {expected} model(s){base}, the recipe gives {n}")


def _check_parameter_names(recipe: Recipe, method: MergeMethod, warnings: list[str]) -> None:
    """Unknown names are errors (mergekit ignores them silently, hiding typos); misplaced ones warn."""
    known = {p.name: p for p in method.params}
    scopes = [("parameters", recipe.parameters), ("slices[0].parameters", recipe.slice_parameters)] + [
        (f"models[{i}].parameters", e.parameters) for i, e in enumerate(recipe.models)
    ]
    for where, scope in scopes:
        for name in scope:
            if name == WEIGHT.name:
                if method.weights == "unused":
                    warnings.append(f"{where}.weight is ignored: {method.name} takes no per-model weights")
            elif name not in known:
                raise ParameterError(
                    f"{where}: {method.name} has no parameter {name!r}; known: "
                    f"{', '.join(['weight'] * (method.weights != 'unused') + sorted(known)) or 'none'}"
                )
            elif where.startswith("models[") and not known[name].per_model:
                warnings.append(f"{where}.{name} is ignored: {name} applies to the whole merge (set it under parameters)")


def _coerce(param: Param, method: MergeMethod) -> Callable[[Any], Any]:
    return lambda value: param.coerce(value, method.name)


def plan_merge(
    recipe: Recipe,
    sources: Mapping[ModelRef, Source],
    *,
    seed: int | None = None,
    open_tensor_source: Callable[[ModelRef], Source] | None = None,
) -> MergePlan:
    """Validate ``recipe`` against the opened ``sources`` and resolve every tensor's task (no data read).

    ``open_tensor_source`` opens checkpoints named by tensor-valued parameters (e.g. ``fisher``: each
    model's Fisher given as a checkpoint with the same tensor names).
    """
    method = get_method(recipe.merge_method)
    warnings: list[str] = []
    _check_parameter_names(recipe, method, warnings)
    entries, base_ref, more = _method_inputs(recipe, method)
    warnings += more
    _check_count(method, len(entries))
    inputs = [(e.model, sources[e.model]) for e in entries]
    base = (base_ref, sources[base_ref]) if base_ref is not None else None
    all_sources = [s for _, s in inputs] + ([base[1]] if base else [])
    all_refs = [r for r, _ in inputs] + ([base[0]] if base else [])
    alignment = _vocabulary_alignment(recipe, all_refs, all_sources) if recipe.tokenizer_source is not None else None
    layout = check_layout(all_sources, aligned_vocabulary=alignment.size if alignment else None)
    depth = {ref: num_layers(src.config, src.tensors) for ref, src in sources.items()}
    check_layer_ranges(recipe, depth)
    donor_ref = recipe.base_model or recipe.models[0].model
    donor = sources[donor_ref]
    n_layers = depth[donor_ref]
    load_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
    save_dtype = DTYPES[recipe.out_dtype] if recipe.out_dtype else None
    model_scopes = [(e.parameters, recipe.slice_parameters, recipe.parameters) for e in entries]
    shared_scopes = (recipe.slice_parameters, recipe.parameters)
    tensor_refs: dict[str, list[Source]] = {}
    for p in method.params:
        if p.kind is object and p.per_model:
            tensor_refs[p.name] = _tensor_parameter_sources(p, entries, recipe, open_tensor_source)

    tasks = []
    probed: set[str] = set()
    for name in layout.names:
        t = layer_position(name, n_layers)
        first = all_sources[0].tensors[layout.stored_names[0][name]]
        floating = first.dtype.is_floating_point
        out_dtype = save_dtype or load_dtype or first.dtype if floating else first.dtype
        params: dict[str, Any] = {}
        weights = None
        tensor_params: dict[str, list[tuple[Source, str]]] = {}
        for p in method.params:
            if p.name in tensor_refs:
                tensor_params[p.name] = _tensor_parameter(p, name, layout.shapes[name], tensor_refs[p.name])
                continue
            coerce = _coerce(p, method)
            if p.per_model:
                values = [resolve_setting(p.name, scopes, name, t, coerce) for scopes in model_scopes]
                if any(v is NOT_SET for v in values):
                    if p.default is REQUIRED:
                        missing = entries[[v is NOT_SET for v in values].index(True)].model
                        raise ParameterError(f"{method.name}: parameter {p.name!r} is required for model {missing} (tensor {name!r})")
                    values = [p.default if v is NOT_SET else v for v in values]
                params[p.name] = values
            else:
                value = resolve_setting(p.name, shared_scopes, name, t, coerce)
                if value is not NOT_SET:
                    params[p.name] = value
        if method.weights != "unused":
            coerce = _coerce(WEIGHT, method)
            weights = [
                1.0 if (w := resolve_setting(WEIGHT.name, scopes, name, t, coerce)) is NOT_SET else w
                for scopes in model_scopes
            ]
        task = TensorTask(name, layout.shapes[name], out_dtype, weights, params, tensor_params, tensor_seed(seed, name), floating)
        if floating:
            _probe(method, task, len(entries), base is not None, probed)
        tasks.append(task)
    return MergePlan(recipe, method, inputs, base, layout, tasks, donor, load_dtype, alignment, warnings)


def _vocabulary_alignment(recipe: Recipe, refs: list[ModelRef], sources: list[Source]) -> VocabularyAlignment:
    """The alignment to the tokenizer_source's vocabulary (see :mod:`karcher_lab.io.vocabulary`)."""
    choice = recipe.tokenizer_source
    target_ref = recipe.base_model if choice == "base" else choice
    if isinstance(target_ref, ModelRef) and target_ref not in refs:
        raise RecipeError(f"tokenizer_source {target_ref} is not one of the models merged")
    vocabularies = [tokenizer_vocabulary(s) for s in sources]
    rows = [vocabulary_rows(s) or 0 for s in sources]
    if choice == "union":
        if any(v != vocabularies[0] for v in vocabularies[1:]):
            raise NotSupportedError("tokenizer_source: union of different tokenizers is not supported yet; choose base or one model")
        target_ref = refs[0]
    k = refs.index(target_ref)
    target = {token: i for token, i in vocabularies[k].items() if i < rows[k]}
    base_index = refs.index(recipe.base_model) if recipe.base_model in refs else None
    return VocabularyAlignment.build(target, vocabularies, rows, base_index)


def _probe(method: MergeMethod, task: TensorTask, n: int, has_base: bool, probed: set[str]) -> None:
    """Run the method once per distinct parameter set on small, well-conditioned probe tensors.

    Methods check some parameters only when called (e.g. karcher's η ∈ (0, 1]); probing surfaces
    those errors, naming the tensor, before any real tensor is read. Probe points are positive
    vectors with distinct directions (no degenerate or antipodal configurations).
    """
    key = repr((task.weights, sorted(task.params.items())))
    if key in probed:
        return
    probed.add(key)
    shape = (2, 3)
    ramp = torch.arange(1, 7, dtype=torch.float32).reshape(shape) / 6
    tensors = [1 + 0.25 * (i + 1) * ramp.roll(i) for i in range(n)]
    params = {**task.params, **{k: [torch.ones(shape)] * n for k in task.tensor_params}}
    merge_tensors(
        method.name, tensors, weights=task.weights, base=torch.full(shape, 0.5) if has_base else None,
        seed=0, name=task.name, **params,
    )


def _tensor_parameter_sources(
    param: Param, entries: list[ModelEntry], recipe: Recipe, open_tensor_source: Callable[[ModelRef], Source] | None
) -> list[Source]:
    """Per model, the checkpoint holding a tensor-valued parameter (given as a model reference)."""
    out = []
    for i, e in enumerate(entries):
        value = e.parameters.get(param.name, recipe.parameters.get(param.name))
        if value is None:
            raise ParameterError(f"parameter {param.name!r} is required for model {e.model}: a checkpoint with one tensor per weight")
        if isinstance(value, Mapping) or hasattr(value, "state_dict"):
            out.append(StateDictSource(value, f"{param.name} of model {e.model}"))
            continue
        if not isinstance(value, str) or open_tensor_source is None:
            raise ParameterError(f"models[{i}].parameters.{param.name}: expected the path of a checkpoint of per-tensor values, got {value!r}")
        out.append(open_tensor_source(ModelRef(value)))
    return out


def _tensor_parameter(param: Param, name: str, shape: tuple[int, ...], sources: list[Source]) -> list[tuple[Source, str]]:
    for s in sources:
        info = s.tensors.get(name)
        if info is None or info.shape != shape:
            found = "missing" if info is None else f"shape {list(info.shape)}"
            raise ParameterError(f"{param.name} checkpoint {s.label}: tensor {name!r} is {found}, expected shape {list(shape)}")
    return [(s, name) for s in sources]


# --------------------------------------------------------------------------------------- executing


@dataclass
class MergeStats:
    """What a run did: tensors merged, bytes read from sources, bytes written, wall time, peak memory."""

    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    files: list[str] = field(default_factory=list)
    out: Path | None = None
    warnings: list[str] = field(default_factory=list)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class TensorCache:
    """Loaded, dtype-cast, device-resident inputs kept between merges (opt-in: costs their memory)."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[int, str, Any, Any], torch.Tensor] = {}

    def get(self, key: tuple, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.tensors:
            self.tensors[key] = load()
        return self.tensors[key]


def execute_plan(
    plan: MergePlan,
    sink: Callable[[str, torch.Tensor], None],
    *,
    device: torch.device,
    stats: MergeStats,
    cache: TensorCache | None = None,
    merge_one: Callable[..., torch.Tensor] | None = None,
    progress: bool = False,
) -> None:
    """Merge every task in order and pass each result (on CPU, in its output dtype) to ``sink``.

    ``merge_one(method, tensors, key=..., **merge_tensors_arguments)`` merges one tensor (default:
    :func:`karcher_lab.merge_tensors`); ``key`` identifies the tensor and its inputs for caches.
    """
    from tqdm.auto import tqdm

    merge_one = merge_one or (lambda method, tensors, key, **kwargs: merge_tensors(method, tensors, **kwargs))
    input_refs = tuple(str(ref) for ref, _ in plan.inputs) + ((str(plan.base[0]),) if plan.base else ())
    total = sum(TensorSpec(t.name, t.shape, t.out_dtype).nbytes for t in plan.tasks)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", disable=not progress, dynamic_ncols=True)
    sources = plan.sources
    vocabulary_names = set(plan.layout.vocabulary_names)

    def load(source: Source, stored: str) -> torch.Tensor:
        """One input tensor, cast to the recipe's dtype and moved to the device (cached if asked)."""

        def read() -> torch.Tensor:
            stats.bytes_read += source.tensors[stored].nbytes
            t = source.load(stored)
            if plan.load_dtype is not None and t.is_floating_point():
                t = t.to(plan.load_dtype)
            return t.to(device)

        return read() if cache is None else cache.get((id(source), stored, plan.load_dtype, str(device)), read)

    try:
        for i, task in enumerate(plan.tasks):
            tensors = [load(s, plan.stored_name(k, task.name)) for k, s in enumerate(sources)]
            if plan.alignment is not None and task.name in vocabulary_names:
                tensors = plan.alignment.apply(tensors)
            base = tensors.pop() if plan.base is not None else None
            if not task.floating:
                merged = _passthrough(task.name, tensors + ([base] if base is not None else []))
            else:
                params = dict(task.params)
                for pname, refs in task.tensor_params.items():
                    params[pname] = [load(s, n) for s, n in refs]
                merged = merge_one(
                    plan.method.name, tensors, key=(task.name, input_refs), weights=task.weights, base=base, seed=task.seed,
                    out_dtype=task.out_dtype, name=task.name, **params,
                )
            del tensors, base
            sink(task.name, merged.to("cpu"))
            stats.tensors += 1
            bar.update(TensorSpec(task.name, task.shape, task.out_dtype).nbytes)
            bar.set_postfix_str(f"{i + 1}/{len(plan.tasks)} tensors", refresh=False)
    finally:
        bar.close()


def _passthrough(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A non-floating tensor (an integer buffer) is copied when every model holds the same values."""
    for i, t in enumerate(tensors[1:], start=1):
        if not torch.equal(t, tensors[0]):
            raise InputError(f"tensor {name!r} is not floating-point ({t.dtype}) and differs between model 0 and model {i}; it cannot be merged")
    return tensors[0]


# ------------------------------------------------------------------------------------------ output


def _yaml_value(value: Any) -> Any:
    """Settings as YAML; in-memory tensor-valued parameters (e.g. a Fisher dict) are named, not dumped."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, list):
        return [_yaml_value(v) for v in value]
    if isinstance(value, Mapping) and set(value) <= {"filter", "value"}:
        return {k: _yaml_value(v) for k, v in value.items()}
    return f"<in-memory {type(value).__name__}>"


def _entry_parameters(entry: ModelEntry) -> dict[str, Any]:
    return {"parameters": {k: _yaml_value(v) for k, v in entry.parameters.items()}} if entry.parameters else {}


def resolved_recipe_yaml(plan: MergePlan, seed: int | None) -> str:
    """The recipe as run, with the method's defaults filled in (still a valid mergekit recipe)."""
    import yaml

    from karcher_lab import __version__

    r = plan.recipe
    params = {k: _yaml_value(v) for k, v in r.parameters.items()}
    for p in plan.method.params:
        if p.name not in params and p.default is not REQUIRED and p.default is not None and p.kind is not object:
            params[p.name] = p.default
    data: dict[str, Any] = {"merge_method": r.merge_method}
    if r.base_model is not None:
        data["base_model"] = str(r.base_model)
    if r.layer_ranges:
        src = [{"model": str(e.model), "layer_range": list(r.layer_ranges[e.model]), **_entry_parameters(e)} for e in r.models]
        data["slices"] = [{"sources": src, **({"parameters": r.slice_parameters} if r.slice_parameters else {})}]
    else:
        data["models"] = [{"model": str(e.model), **_entry_parameters(e)} for e in r.models]
    data["parameters"] = params
    for key in ("dtype", "out_dtype"):
        if getattr(r, key):
            data[key] = getattr(r, key)
    if r.tokenizer_source is not None:
        data["tokenizer_source"] = str(r.tokenizer_source)
    header = f"# karcher-lab {__version__}: the recipe as run, method defaults filled in; seed: {0 if seed is None else seed}\n"
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def _tokenizer_dir(plan: MergePlan, sources: Mapping[ModelRef, Source]) -> Path | None:
    """Directory to copy tokenizer files from: the tokenizer_source model, else the base, else the first
    model (``union`` is accepted only for identical tokenizers, see :func:`_vocabulary_alignment`)."""
    r = plan.recipe
    ref = r.tokenizer_source if isinstance(r.tokenizer_source, ModelRef) else None
    return sources[ref or r.base_model or r.models[0].model].directory


def write_output(
    plan: MergePlan,
    sources: Mapping[ModelRef, Source],
    out: Path,
    *,
    device: torch.device,
    stats: MergeStats,
    seed: int | None,
    out_shard_size: int,
    overwrite: bool,
    cache: TensorCache | None = None,
    merge_one: Callable[..., torch.Tensor] | None = None,
    progress: bool = False,
) -> None:
    """Merge into a complete checkpoint directory at ``out``, atomically (see karcher_lab.io.output)."""
    from karcher_lab import __version__

    specs = [TensorSpec(t.name, t.shape, t.out_dtype) for t in plan.tasks]
    tokenizer_dir = _tokenizer_dir(plan, sources)
    donor_dir = plan.donor.directory
    if not plan.donor.config:
        raise CheckpointError(f"model {plan.donor.label} has no config; writing a checkpoint needs the donor's config.json")
    recipe_yaml = resolved_recipe_yaml(plan, seed)
    dtype_name = plan.recipe.out_dtype or plan.recipe.dtype or plan.donor.config.get("torch_dtype") or plan.donor.config.get("dtype") or "float32"
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, out_shard_size)
        try:
            execute_plan(plan, writer.write, device=device, stats=stats, cache=cache, merge_one=merge_one, progress=progress)
            files = writer.finish()
        finally:
            writer.close()
        config = output_config(plan.donor.config, dtype_name, plan.layout.untied_head)
        if plan.alignment is not None:
            config["vocab_size"] = plan.alignment.size
        write_json(tmp / "config.json", config)
        files += ["config.json"] + copy_files(donor_dir, tmp, (GENERATION_CONFIG,))
        files += copy_files(tokenizer_dir, tmp, tuple(f for f in TOKENIZER_FILES if f not in files))
        (tmp / "merge_recipe.yml").write_text(recipe_yaml, encoding="utf-8")
        base = str(plan.recipe.base_model) if plan.recipe.base_model else None
        card = model_card(plan.method.name, [str(e.model) for e in plan.recipe.models], base, recipe_yaml, __version__)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        files += ["merge_recipe.yml", "README.md"]
        stats.bytes_written = sum((tmp / f).stat().st_size for f in files)
        stats.files = sorted(files)
    stats.out = out


# ------------------------------------------------------------------------------------- entry points


class MergeSession:
    """Models opened once for repeated merges, keeping per-tensor state between calls (for widgets).

    ``models`` and ``base`` are paths, hub ids (local cache only), ModelRefs, ``{name: tensor}`` dicts
    or transformers models. With ``keep_inputs=True`` every input tensor is loaded once and kept (on
    ``device``, cast to ``dtype``), so later merges re-read nothing from disk. ``cache_grams`` (on by
    default) keeps karcher's per-tensor Gram matrices (:class:`karcher_lab.gram_cache.GramCache`), so
    a re-weighted karcher merge re-solves the N×N problem and runs only the combine pass. karcher
    tensors always go through that class (which folds the NaN/Inf check into the Gram pass); without
    ``cache_grams`` it keeps nothing.
    """

    def __init__(
        self,
        models: Sequence[Any],
        *,
        base: Any = None,
        dtype: str | None = None,
        device: str | torch.device = "cpu",
        keep_inputs: bool = False,
        cache_grams: bool = True,
        relative_to: Path | None = None,
    ):
        if models is None or len(models) == 0:
            raise EmptyInputError("no models to merge (got an empty list)")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.relative_to = relative_to
        self.sources: dict[ModelRef, Source] = {}
        self._in_memory: dict[int, ModelRef] = {}
        self.model_refs = [self._add(m, f"model {i}") for i, m in enumerate(models)]
        self.base_ref = self._add(base, "base") if base is not None else None
        self.cache = TensorCache() if keep_inputs else None
        self.grams = GramCache(keep=cache_grams)

    def _add(self, model: Any, role: str) -> ModelRef:
        if isinstance(model, ModelRef):
            ref = model
        elif isinstance(model, (str, Path)):
            ref = parse_model_ref(str(model), role)
        elif id(model) in self._in_memory:  # the same object given as a model and as the base
            return self._in_memory[id(model)]
        else:
            ref = self._in_memory[id(model)] = ModelRef(f"<in-memory {role}>")
        if ref not in self.sources:
            self.sources[ref] = open_model(ref if isinstance(model, (str, Path)) else model, str(ref), self.relative_to)
        return ref

    def open_tensor_source(self, ref: ModelRef) -> Source:
        """Open (once) a checkpoint named by a tensor-valued parameter such as ``fisher``."""
        if ref not in self.sources:
            self.sources[ref] = open_model(ref, str(ref), self.relative_to)
        return self.sources[ref]

    def recipe(
        self,
        method: str,
        *,
        weights: Sequence[float] | None = None,
        params: Mapping[str, Any] | None = None,
        model_params: Sequence[Mapping[str, Any]] | None = None,
        out_dtype: str | None = None,
    ) -> Recipe:
        """The recipe these Python arguments mean (``params`` are global settings, mergekit semantics)."""
        n = len(self.model_refs)
        if weights is not None and len(weights) != n:
            raise WeightError(f"{method}: got {len(weights)} weights for {n} models")
        if model_params is not None and len(model_params) != n:
            raise ParameterError(f"model_params has {len(model_params)} entries for {n} models")
        entries = []
        for i, ref in enumerate(self.model_refs):
            p = dict(model_params[i]) if model_params is not None else {}
            if weights is not None:
                p["weight"] = float(weights[i])
            entries.append(ModelEntry(ref, p))
        return Recipe(
            merge_method=method, models=entries, base_model=self.base_ref, parameters=parse_parameters(params, "params"),
            dtype=parse_dtype(self.dtype, "dtype"), out_dtype=parse_dtype(out_dtype, "out_dtype"),
        )

    def plan(self, recipe: Recipe, seed: int | None = None) -> MergePlan:
        """Validate ``recipe`` against the session's models (see :func:`plan_merge`)."""
        return plan_merge(recipe, self.sources, seed=seed, open_tensor_source=self.open_tensor_source)

    def _merge_one(self, method: str, tensors: list[torch.Tensor], *, key: Hashable, **kwargs: Any) -> torch.Tensor:
        if method == "karcher":
            return self.grams.merge(key, tensors, **kwargs)
        return merge_tensors(method, tensors, **kwargs)

    def run(
        self,
        recipe: Recipe,
        *,
        out: str | Path | None = None,
        seed: int | None = None,
        overwrite: bool = False,
        out_shard_size: str | int = DEFAULT_SHARD_SIZE,
        progress: bool = False,
    ) -> dict[str, torch.Tensor] | MergeStats:
        """Run ``recipe``: the merged state dict when ``out`` is None, else write a checkpoint
        directory (atomically) and return its :class:`MergeStats`."""
        start = time.perf_counter()
        stats = MergeStats()
        shard_bytes = parse_size(out_shard_size)
        if out is not None:
            check_output_path(Path(out), overwrite, [s.directory for s in self.sources.values() if s.directory])
        plan = self.plan(recipe, seed)
        stats.warnings = list(plan.warnings)
        if out is None:
            result: dict[str, torch.Tensor] = {}
            execute_plan(plan, result.__setitem__, device=self.device, stats=stats, cache=self.cache, merge_one=self._merge_one, progress=progress)
        else:
            write_output(
                plan, self.sources, Path(out), device=self.device, stats=stats, seed=seed, out_shard_size=shard_bytes,
                overwrite=overwrite, cache=self.cache, merge_one=self._merge_one, progress=progress,
            )
        stats.seconds = time.perf_counter() - start
        stats.peak_rss_bytes = peak_rss_bytes()
        if self.device.type == "cuda":
            stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.device)
        self.last_stats = stats
        return result if out is None else stats

    def merge(
        self,
        method: str,
        *,
        weights: Sequence[float] | None = None,
        params: Mapping[str, Any] | None = None,
        model_params: Sequence[Mapping[str, Any]] | None = None,
        out_dtype: str | None = None,
        seed: int | None = None,
        out: str | Path | None = None,
        overwrite: bool = False,
        out_shard_size: str | int = DEFAULT_SHARD_SIZE,
        progress: bool = False,
    ) -> dict[str, torch.Tensor] | MergeStats:
        """Merge the session's models with ``method`` (arguments as in :func:`merge_models`)."""
        recipe = self.recipe(method, weights=weights, params=params, model_params=model_params, out_dtype=out_dtype)
        return self.run(recipe, out=out, seed=seed, overwrite=overwrite, out_shard_size=out_shard_size, progress=progress)


def merge_models(
    models: Sequence[Any],
    method: str,
    *,
    weights: Sequence[float] | None = None,
    base: Any = None,
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    out: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    dtype: str | None = None,
    out_dtype: str | None = None,
    overwrite: bool = False,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    progress: bool = False,
) -> dict[str, torch.Tensor] | MergeStats:
    """Merge whole models with a registered method; also callable as ``karcher_lab.merge(...)``.

    ``models``: paths, hub ids (resolved from the local Hugging Face cache only), ``{name: tensor}``
    dicts or transformers models. ``weights``: mergekit's per-model ``weight``. ``base``: the base
    model (mergekit's ``base_model``). ``params``: global parameter settings with mergekit's semantics
    (a list is a gradient over the layers; ``[{filter, value}]`` lists select by tensor name).
    ``model_params``: one dict of per-model settings per model (e.g. ``density``, or ``fisher``).
    ``dtype`` casts the inputs on load; ``out_dtype`` is the saved dtype. Returns the merged state dict
    (CPU tensors) when ``out`` is None; otherwise writes a checkpoint directory atomically and returns
    :class:`MergeStats`. For repeated merges of the same models, use :class:`MergeSession`.
    """
    session = MergeSession(models, base=base, dtype=dtype, device=device, cache_grams=False)
    return session.merge(
        method, weights=weights, params=params, model_params=model_params, out_dtype=out_dtype, seed=seed,
        out=out, overwrite=overwrite, out_shard_size=out_shard_size, progress=progress,
    )


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    overwrite: bool = False,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    progress: bool = False,
    relative_to: Path | None = None,
) -> MergeStats:
    """Run a recipe into the checkpoint directory ``out`` (what ``karcher-lab merge`` does).

    Checked before any model is opened: the method exists, the shard size parses, the device exists
    and the output path is free (or ``overwrite``)."""
    get_method(recipe.merge_method)
    parse_size(out_shard_size)
    resolve_device(device)
    check_output_path(Path(out), overwrite, [])
    session = MergeSession(
        [e.model for e in recipe.models], base=recipe.base_model, dtype=recipe.dtype, device=device,
        cache_grams=False, relative_to=relative_to,
    )
    return session.run(recipe, out=out, seed=seed, overwrite=overwrite, out_shard_size=out_shard_size, progress=progress)
