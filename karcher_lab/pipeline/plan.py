"""Planning a model merge: the recipe's models mapped onto the method's inputs, every parameter of
every tensor resolved, everything validated before any tensor is read.

How recipe models become method inputs (mergekit 0.1.5 semantics, checked by running it): a method that
uses a base (ties, model_stock, multislerp ...) gets ``base_model`` as its base and the other listed
models as inputs; a method that ignores the base (linear, karcher, fisher) gets ``base_model`` as *one
more input* when it is not listed among the models (mergekit appends it; a warning says so); ``slerp``
interpolates from ``base_model`` (t = 0) to the one other model. With ``tokenizer_source`` the
vocabulary tensors are aligned by token to that tokenizer (:mod:`karcher_lab.io.vocabulary`); without
it, models with different vocabulary sizes are refused.

Parameters are resolved per tensor exactly as mergekit does (:mod:`karcher_lab.recipe.parameters`).
Unknown parameter names are errors (mergekit ignores them silently, hiding typos); a missing per-model
``weight`` is 1.0 (mergekit requires it for some methods). Each distinct parameter set is also run once
on small probe tensors, so that checks a method makes only when called fail here, naming the tensor.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from karcher_lab.errors import MissingBaseError, NotSupportedError, ParameterError, RecipeError
from karcher_lab.io.architecture import Layout, Source, check_architectures, check_layout, vocabulary_rows
from karcher_lab.io.checkpoint import StateDictSource
from karcher_lab.io.vocabulary import VocabularyAlignment, tokenizer_vocabulary
from karcher_lab.methods.api import merge_tensors
from karcher_lab.methods.registry import REQUIRED, MergeMethod, Param, get_method
from karcher_lab.recipe.parameters import NOT_SET, layer_position, num_layers, resolve_setting, tower_depths
from karcher_lab.recipe.schema import DTYPES, ModelEntry, ModelRef, Recipe, spans_whole_models

WEIGHT = Param("weight", float, 1.0, per_model=True, doc="per-model weight")
"""mergekit's per-model ``weight``, handed to methods as ``weights`` (1.0 when not given)."""

PROBE_SHAPE = (2, 3)
"""Shape of the small tensors each distinct parameter set is tried on before any real tensor is read."""


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
    if method.base == "first":
        if base is None:
            raise MissingBaseError(f"{method.name} interpolates from base_model (t = 0) to one other model: give base_model")
        others = [e for e in entries if e.model != base]
        return [ModelEntry(base)] + others, None, warnings
    if not method.uses_base(_base_mode(recipe, method)):
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


def _base_mode(recipe: Recipe, method: MergeMethod) -> dict[str, Any]:
    """The recipe's setting of the method's base mode, if it has one (one global true/false for the
    whole merge), as ``{base_mode: value}`` for :meth:`MergeMethod.uses_base`."""
    name = method.base_mode
    if name is None:
        return {}
    setting = recipe.parameters.get(name, recipe.slice_parameters.get(name, False))
    if not isinstance(setting, (bool, str, int)):
        raise RecipeError(f"parameters.{name} must be one true/false for the whole merge, got {setting!r}")
    return {name: setting}


def check_model_count(method: MergeMethod, n: int) -> None:
    what = "model(s) (besides the base model)" if method.base in ("required", "optional") else "model(s)"
    method.check_count(n, what=what, given="the recipe gives")


def _check_parameter_names(recipe: Recipe, method: MergeMethod, warnings: list[str]) -> None:
    scopes = [("parameters", recipe.parameters), ("slices[0].parameters", recipe.slice_parameters)] + [
        (f"models[{i}].parameters", e.parameters) for i, e in enumerate(recipe.models)
    ]
    check_parameter_names(method, scopes, warnings)


def check_parameter_names(method: MergeMethod, scopes: list[tuple[str, Mapping[str, Any]]], warnings: list[str]) -> None:
    """Unknown names are errors (mergekit ignores them silently, hiding typos); misplaced ones warn.
    ``scopes``: (where, settings); a per-model scope's ``where`` ends in ``].parameters`` after
    ``models[i`` or ``sources[i``."""
    known = {p.name: p for p in method.params}
    for where, scope in scopes:
        per_model_scope = where.startswith("models[") or ".sources[" in where
        for name in scope:
            if name == WEIGHT.name:
                if method.weights == "unused":
                    warnings.append(f"{where}.weight is ignored: {method.name} takes no per-model weights")
            elif name not in known:
                raise ParameterError(
                    f"{where}: {method.name} has no parameter {name!r}; known: "
                    f"{', '.join(['weight'] * (method.weights != 'unused') + sorted(known)) or 'none'}"
                )
            elif per_model_scope and not known[name].per_model:
                warnings.append(f"{where}.{name} is ignored: {name} applies to the whole merge (set it under parameters)")


def _coerce(param: Param, method: MergeMethod) -> Callable[[Any], Any]:
    return lambda value: param.coerce(value, method.name)


def plan_merge(
    recipe: Recipe,
    sources: Mapping[ModelRef, Source],
    *,
    seed: int | None = None,
    open_tensor_source: Callable[..., Source] | None = None,
    allow_crimes: bool = False,
) -> MergePlan:
    """Validate ``recipe`` against the opened ``sources`` and resolve every tensor's task (no data read).

    Models of different architectures (``architectures`` / ``model_type`` in their configs) are
    refused unless ``allow_crimes`` (mergekit's ``--allow-crimes``); the output's config is then the
    base model's, else the first model's. Recipes whose slices do not span whole models (layer ranges,
    stacked slices) are planned by :func:`karcher_lab.pipeline.slices.plan_slices`.

    ``open_tensor_source(value, label)`` opens what tensor-valued parameters give (e.g. ``fisher``: each
    model's Fisher, as a checkpoint with the same tensor names, a ModelRef, or an in-memory state dict),
    returning the same source for the same value (see :meth:`MergeSession.open_tensor_source`).
    """
    method = get_method(recipe.merge_method)
    check_architectures([sources[ref] for ref in recipe.all_models()], allow_crimes)
    depth = {ref: num_layers(sources[ref].config, sources[ref].tensors) for ref in recipe.all_models()}
    if not spans_whole_models(recipe, depth):
        from karcher_lab.pipeline.slices import plan_slices  # it builds on this module

        return plan_slices(recipe, sources, method, seed=seed)
    warnings: list[str] = []
    _check_parameter_names(recipe, method, warnings)
    entries, base_ref, more = _method_inputs(recipe, method)
    warnings += more
    check_model_count(method, len(entries))
    inputs = [(e.model, sources[e.model]) for e in entries]
    base = (base_ref, sources[base_ref]) if base_ref is not None else None
    all_sources = [s for _, s in inputs] + ([base[1]] if base else [])
    all_refs = [r for r, _ in inputs] + ([base[0]] if base else [])
    alignment = _vocabulary_alignment(recipe, all_refs, all_sources) if recipe.tokenizer_source is not None else None
    layout = check_layout(all_sources, aligned_vocabulary=alignment.size if alignment else None)
    donor_ref = recipe.base_model or recipe.models[0].model
    donor = sources[donor_ref]
    depths = tower_depths(donor.config, donor.tensors)
    load_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
    save_dtype = DTYPES[recipe.out_dtype] if recipe.out_dtype else None
    model_scopes = [(e.parameters, recipe.slice_parameters, recipe.parameters) for e in entries]
    shared_scopes = (recipe.slice_parameters, recipe.parameters)
    tensor_refs: dict[str, list[Source]] = {}
    for p in method.params:
        if p.kind is object and p.per_model:
            refs = _tensor_parameter_sources(p, entries, recipe, open_tensor_source)
            if refs is not None:
                tensor_refs[p.name] = refs

    tasks = []
    probed: set[str] = set()
    for name in layout.names:
        first = all_sources[0].tensors[layout.stored_names[0][name]]
        tensor_params = {p: _tensor_parameter(method.param(p), name, layout.shapes[name], refs) for p, refs in tensor_refs.items()}
        task = resolve_task(
            method, name, layout.shapes[name], first.dtype, layer_position(name, depths), model_scopes, shared_scopes,
            [e.model for e in entries], load_dtype=load_dtype, save_dtype=save_dtype, seed=seed, tensor_params=tensor_params,
        )
        if task.floating:
            probe_parameters(method, task, len(entries), base is not None, probed)
        tasks.append(task)
    return MergePlan(recipe, method, inputs, base, layout, tasks, donor, load_dtype, alignment, warnings)


def resolve_task(
    method: MergeMethod,
    name: str,
    shape: tuple[int, ...],
    stored_dtype: torch.dtype,
    t: float,
    model_scopes: list[tuple[Mapping[str, Any], ...]],
    shared_scopes: tuple[Mapping[str, Any], ...],
    models: list[ModelRef],
    *,
    load_dtype: torch.dtype | None,
    save_dtype: torch.dtype | None,
    seed: int | None,
    tensor_params: dict[str, list[tuple[Source, str]]] | None = None,
) -> TensorTask:
    """One tensor's task: every parameter of ``method`` resolved at layer position ``t`` from the
    scopes (per input model, most specific first; shared), mergekit's rules (module docstring)."""
    floating = stored_dtype.is_floating_point
    out_dtype = save_dtype or load_dtype or stored_dtype if floating else stored_dtype
    params: dict[str, Any] = {}
    for p in method.params:
        if p.kind is object and p.per_model:  # tensor-valued: given for every model, or optional and absent
            continue
        coerce = _coerce(p, method)
        if p.per_model:
            values = [resolve_setting(p.name, scopes, name, t, coerce) for scopes in model_scopes]
            if any(v is NOT_SET for v in values):
                if p.default is REQUIRED:
                    missing = models[[v is NOT_SET for v in values].index(True)]
                    raise ParameterError(f"{method.name}: parameter {p.name!r} is required for model {missing} (tensor {name!r})")
                values = [p.default if v is NOT_SET else v for v in values]
            params[p.name] = values
        else:
            value = resolve_setting(p.name, shared_scopes, name, t, coerce)
            if value is not NOT_SET:
                params[p.name] = value
    weights = None
    if method.weights != "unused":
        coerce = _coerce(WEIGHT, method)
        weights = [
            1.0 if (w := resolve_setting(WEIGHT.name, scopes, name, t, coerce)) is NOT_SET else w
            for scopes in model_scopes
        ]
    return TensorTask(name, shape, out_dtype, weights, params, dict(tensor_params or {}), tensor_seed(seed, name), floating)


def reweighted(plan: MergePlan, weights: list[float]) -> MergePlan:
    """``plan`` with every tensor's per-model weights set to ``weights`` (one per input model), nothing
    else re-resolved; each distinct parameter set is probed again with them (see :func:`probe_parameters`)."""
    if plan.method.weights == "unused":
        return plan
    if len(weights) != len(plan.inputs):
        raise ParameterError(f"{plan.method.name}: got {len(weights)} weights for {len(plan.inputs)} input models")
    tasks = [replace(task, weights=list(weights)) if task.weights is not None else task for task in plan.tasks]
    probed: set[str] = set()
    for task in tasks:
        if task.floating:
            probe_parameters(plan.method, task, len(plan.inputs), plan.base is not None, probed)
    return replace(plan, tasks=tasks)


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


def probe_parameters(method: MergeMethod, task: TensorTask, n: int, has_base: bool, probed: set[str]) -> None:
    """Run the method once per distinct parameter set on small, well-conditioned probe tensors.

    Methods check some parameters only when called (e.g. karcher's η ∈ (0, 1]); probing surfaces
    those errors, naming the tensor, before any real tensor is read. Probe points are positive
    vectors with distinct directions (no degenerate or antipodal configurations).
    """
    key = repr((task.weights, sorted(task.params.items())))
    if key in probed:
        return
    probed.add(key)
    shape = PROBE_SHAPE
    ramp = torch.arange(1, 7, dtype=torch.float32).reshape(shape) / 6
    tensors = [1 + 0.25 * (i + 1) * ramp.roll(i) for i in range(n)]
    params = {**task.params, **{k: [torch.ones(shape)] * n for k in task.tensor_params}}
    merge_tensors(
        method.name, tensors, weights=task.weights, base=torch.full(shape, 0.5) if has_base else None,
        seed=0, name=task.name, **params,
    )


def _tensor_parameter_sources(
    param: Param, entries: list[ModelEntry], recipe: Recipe, open_tensor_source: Callable[..., Source] | None
) -> list[Source] | None:
    """Per model, the checkpoint holding a tensor-valued parameter (given as a model reference or an
    in-memory state dict). None when the parameter is optional (e.g. karcher's ``fisher``) and no model
    gives it; a required one, or an optional one given for some models only, must be given for all."""
    values = [e.parameters.get(param.name, recipe.parameters.get(param.name)) for e in entries]
    if param.default is not REQUIRED and all(v is None for v in values):
        return None
    out = []
    for i, (e, value) in enumerate(zip(entries, values)):
        if value is None:
            role = "required" if param.default is REQUIRED else "given for some models, so it is needed"
            raise ParameterError(f"parameter {param.name!r} is {role} for model {e.model}: a checkpoint with one tensor per weight")
        if isinstance(value, Mapping) or hasattr(value, "state_dict"):
            label = f"{param.name} of model {e.model}"
            out.append(open_tensor_source(value, label) if open_tensor_source else StateDictSource(value, label))
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
