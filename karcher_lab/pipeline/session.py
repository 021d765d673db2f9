"""Entry points of model-level merging: :func:`merge_models` (``karcher_lab.merge(...)``),
:func:`run_recipe` (the CLI) and :class:`MergeSession` (repeated merges of the same models, keeping
per-tensor state between calls for the widgets)."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

from karcher_lab.checks import resolve_device
from karcher_lab.errors import EmptyInputError, NonFiniteError, ParameterError, WeightError
from karcher_lab.io.architecture import Source
from karcher_lab.io.checkpoint import Checkpoint, StateDictSource
from karcher_lab.io.output import check_output_path
from karcher_lab.io.resolve import local_directory, resolve_model_dir
from karcher_lab.io.writer import parse_size
from karcher_lab.methods.api import merge_tensors
from karcher_lab.methods.prepared import PreparedStates
from karcher_lab.methods.registry import get_method
from karcher_lab.pipeline.execute import MergeStats, TensorCache, execute_plan, peak_rss_bytes
from karcher_lab.pipeline.plan import MergePlan, plan_merge, reweighted
from karcher_lab.pipeline.write import write_output
from karcher_lab.recipe.schema import ModelEntry, ModelRef, Recipe, parse_dtype, parse_model_ref, parse_parameters

DEFAULT_SHARD_SIZE = "5GB"


def _frozen(value: Any) -> Hashable:
    """A hashable stand-in for parameter settings: containers by content, other objects (tensors,
    in-memory state dicts) by identity; the session holds what it was given."""
    if isinstance(value, Mapping):
        return tuple((k, _frozen(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return ("id", id(value))


def open_model(model: Any, label: str, relative_to: Path | None = None) -> Source:
    """A :class:`Source` for a path / hub id / ModelRef, an in-memory state dict or model, or a Source."""
    if isinstance(model, (Checkpoint, StateDictSource)):
        return model
    if isinstance(model, (str, Path, ModelRef)):
        ref = model if isinstance(model, ModelRef) else ModelRef(str(model))
        return Checkpoint(resolve_model_dir(ref.path, ref.revision, relative_to), label=str(ref))
    return StateDictSource(model, label)


class MergeSession:
    """Models opened once for repeated merges, keeping per-tensor state between calls (for widgets).

    ``models`` and ``base`` are paths, hub ids (local cache only), ModelRefs, ``{name: tensor}`` dicts
    or transformers models. With ``keep_inputs=True`` every input tensor is loaded once and kept (on
    ``device``, cast to ``dtype``), so later merges re-read nothing from disk. ``cache_states`` (on by
    default) keeps the prepared state of two-phase methods per tensor
    (:class:`~karcher_lab.methods.prepared.PreparedStates`; karcher's Gram matrices), so a re-weighted
    merge skips the preparing pass (karcher: re-solves the N×N problem and runs only the combine pass).
    Solver traces of the last merge are in ``traces`` (tensor name → trace).
    """

    def __init__(
        self,
        models: Sequence[Any],
        *,
        base: Any = None,
        dtype: str | None = None,
        device: str | torch.device = "cpu",
        keep_inputs: bool = False,
        cache_states: bool = True,
        relative_to: Path | None = None,
    ):
        if models is None or len(models) == 0:
            raise EmptyInputError("no models to merge (got an empty list)")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.relative_to = relative_to
        self.sources: dict[ModelRef, Source] = {}
        self._in_memory: dict[int, ModelRef] = {}
        self._tensor_parameters: dict[int, tuple[Any, Source]] = {}
        self.model_refs = [self._add(m, f"model {i}") for i, m in enumerate(models)]
        self.base_ref = self._add(base, "base") if base is not None else None
        self.cache = TensorCache() if keep_inputs else None
        self.states = PreparedStates() if cache_states else None
        self._plans: dict[tuple, MergePlan] = {}
        self.traces: dict[str, Any] = {}

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

    def open_tensor_source(self, value: ModelRef | Any, label: str = "") -> Source:
        """Open (once per session) what a tensor-valued parameter such as ``fisher`` gives: a checkpoint
        (a ModelRef) or an in-memory ``{name: tensor}`` dict / model. In-memory values are held by the
        session, so the same object always maps to the same source (caches key on it)."""
        if isinstance(value, ModelRef):
            if value not in self.sources:
                self.sources[value] = open_model(value, str(value), self.relative_to)
            return self.sources[value]
        if id(value) not in self._tensor_parameters:
            label = label or f"<in-memory tensor parameter {len(self._tensor_parameters)}>"
            self._tensor_parameters[id(value)] = (value, open_model(value, label))
        return self._tensor_parameters[id(value)][1]

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

    def plan(self, recipe: Recipe, seed: int | None = None, allow_crimes: bool = False) -> MergePlan:
        """Validate ``recipe`` against the session's models (see :func:`plan_merge`)."""
        return plan_merge(recipe, self.sources, seed=seed, open_tensor_source=self.open_tensor_source, allow_crimes=allow_crimes)

    def _merge_one(self, method: str, tensors: list[torch.Tensor], *, key: Hashable, **kwargs: Any) -> torch.Tensor:
        result = merge_tensors(method, tensors, states=self.states, key=key, return_trace=True, **kwargs)
        if result.trace is not None:
            self.traces[kwargs["name"]] = result.trace
        return result.tensor

    def run(
        self,
        recipe: Recipe,
        *,
        out: str | Path | None = None,
        seed: int | None = None,
        overwrite: bool = False,
        out_shard_size: str | int = DEFAULT_SHARD_SIZE,
        progress: bool = False,
        allow_crimes: bool = False,
        check_finite: bool = False,
    ) -> dict[str, torch.Tensor] | MergeStats:
        """Run ``recipe``: the merged state dict when ``out`` is None, else write a checkpoint
        directory (atomically) and return its :class:`MergeStats`. ``seed`` None means the recipe's
        ``seed`` (0 when it has none). ``check_finite``: scan every input for NaN/Inf before merging
        (:func:`scan_finite`)."""
        shard_bytes = parse_size(out_shard_size)
        seed = recipe.seed if seed is None else seed
        if out is not None:
            check_output_path(Path(out), overwrite, [s.directory for s in self.sources.values() if s.directory])
        plan = self.plan(recipe, seed, allow_crimes)
        if check_finite:
            scan_finite(plan)
        return self.execute(plan, out=out, seed=seed, overwrite=overwrite, out_shard_size=shard_bytes, progress=progress)

    def execute(
        self,
        plan: MergePlan,
        *,
        out: str | Path | None = None,
        seed: int | None = None,
        overwrite: bool = False,
        out_shard_size: int = parse_size(DEFAULT_SHARD_SIZE),
        progress: bool = False,
        sink: Callable[[str, torch.Tensor], None] | None = None,
    ) -> dict[str, torch.Tensor] | MergeStats | None:
        """Execute a plan of this session (see :meth:`run`; the output path is checked there). In memory
        (``out`` None) each merged tensor goes to ``sink(name, tensor)`` when given (None is returned; e.g.
        a resident model's tensors written in place), else into the returned state dict."""
        start = time.perf_counter()
        stats = MergeStats()
        shard_bytes = out_shard_size
        stats.warnings = list(plan.warnings)
        self.traces = {}
        result: dict[str, torch.Tensor] | None = None
        if out is None:
            if sink is None:
                result = {}
                sink = result.__setitem__
            execute_plan(plan, sink, device=self.device, stats=stats, cache=self.cache, merge_one=self._merge_one, progress=progress)
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
        allow_crimes: bool = False,
        sink: Callable[[str, torch.Tensor], None] | None = None,
    ) -> dict[str, torch.Tensor] | MergeStats | None:
        """Merge the session's models with ``method`` (arguments as in :func:`merge_models`; ``sink`` as
        for :meth:`execute`, in memory only).

        In memory (``out`` None), the plan of each (method, params, model_params, out_dtype, seed) is
        kept: a merge that changes only ``weights`` re-weights that plan (:func:`reweighted`) instead of
        building and resolving a recipe again. The plan's warnings (e.g. a base model merged as one more
        input) are also issued through :mod:`warnings`."""
        if out is not None:
            recipe = self.recipe(method, weights=weights, params=params, model_params=model_params, out_dtype=out_dtype)
            result = self.run(recipe, out=out, seed=seed, overwrite=overwrite, out_shard_size=out_shard_size,
                              progress=progress, allow_crimes=allow_crimes)
        else:
            key = (method, _frozen(params), _frozen(model_params), out_dtype, seed, allow_crimes)
            if key not in self._plans:
                recipe = self.recipe(method, params=params, model_params=model_params, out_dtype=out_dtype)
                self._plans = {key: self.plan(recipe, seed, allow_crimes)}  # the latest plan only: re-weighting reuses it
            plan = self._plans[key]
            if weights is not None:
                plan = reweighted(plan, self._input_weights(plan, weights))
            result = self.execute(plan, progress=progress, sink=sink)
        for message in self.last_stats.warnings:
            warnings.warn(message, UserWarning, stacklevel=2)
        return result

    def _input_weights(self, plan: MergePlan, weights: Sequence[float]) -> list[float]:
        """The session models' weights in the order of the plan's inputs, as :meth:`recipe` gives them:
        a model that is also the base is not an input; a base merged as one more input (mergekit's rule
        for methods that ignore the base) has weight 1."""
        n = len(self.model_refs)
        if len(weights) != n:
            raise WeightError(f"{plan.method.name}: got {len(weights)} weights for {n} models")
        given = [(ref, float(w)) for ref, w in zip(self.model_refs, weights)]
        if plan.base is not None:
            given = [(ref, w) for ref, w in given if ref != plan.base[0]]
        return [w for _, w in given] + [1.0] * (len(plan.inputs) - len(given))


def scan_finite(plan: MergePlan) -> None:
    """NonFiniteError naming the model and the tensor when any input of ``plan`` (a model's tensor, the
    base's, a tensor-valued parameter's) holds NaN or Inf: one pass that reads every input once, before
    any merging. Without it a NaN is found when its tensor is merged (and nothing is written either),
    possibly after the other tensors were merged; karcher finds it in the pass over the data its Gram
    matrix makes anyway, so for karcher the pre-scan costs a second read of the inputs and saves nothing
    but time to failure."""
    for task in plan.tasks:
        if not task.floating:
            continue
        reads = [(s, plan.stored_name(k, task.name)) for k, s in enumerate(plan.sources)]
        reads += [pair for pairs in task.tensor_params.values() for pair in pairs]
        for source, stored in reads:
            t = source.load(stored)
            if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
                n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise NonFiniteError(f"model {source.label}: tensor {stored!r} contains {n_nan} NaN and {n_inf} Inf values "
                                     "(found by the finite check before merging)")


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
    allow_crimes: bool = False,
) -> dict[str, torch.Tensor] | MergeStats:
    """Merge whole models with a registered method; also callable as ``karcher_lab.merge(...)``.

    ``models``: paths, hub ids (resolved from the local Hugging Face cache only), ``{name: tensor}``
    dicts or transformers models. ``weights``: mergekit's per-model ``weight``. ``base``: the base
    model (mergekit's ``base_model``). ``params``: global parameter settings with mergekit's semantics
    (a list is a gradient over the layers; ``[{filter, value}]`` lists select by tensor name).
    ``model_params``: one dict of per-model settings per model (e.g. ``density``, or ``fisher``).
    ``dtype`` casts the inputs on load; ``out_dtype`` is the saved dtype. Returns the merged state dict
    (CPU tensors) when ``out`` is None; otherwise writes a checkpoint directory atomically and returns
    :class:`MergeStats`. Models of different architectures are refused unless ``allow_crimes``
    (mergekit's ``--allow-crimes``). Warnings (e.g. ``base`` given to a method that does not use a
    base, which then merges it as one more input, as mergekit does) are issued through :mod:`warnings`.
    For repeated merges of the same models, use :class:`MergeSession`.
    """
    session = MergeSession(models, base=base, dtype=dtype, device=device, cache_states=False)
    return session.merge(
        method, weights=weights, params=params, model_params=model_params, out_dtype=out_dtype, seed=seed,
        out=out, overwrite=overwrite, out_shard_size=out_shard_size, progress=progress, allow_crimes=allow_crimes,
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
    allow_crimes: bool = False,
    check_finite: bool = False,
) -> MergeStats:
    """Run a recipe into the checkpoint directory ``out`` (what ``karcher-lab merge`` does).

    Checked before any model is opened: the method exists, the shard size parses, the device exists
    and the output path is free (or ``overwrite``)."""
    get_method(recipe.merge_method)
    parse_size(out_shard_size)
    resolve_device(device)
    local = [local_directory(ref.path, relative_to) for ref in recipe.all_models() if ref.revision is None]
    check_output_path(Path(out), overwrite, [d for d in local if d is not None])
    session = MergeSession(
        [e.model for e in recipe.models], base=recipe.base_model, dtype=recipe.dtype, device=device,
        cache_states=False, relative_to=relative_to,
    )
    return session.run(recipe, out=out, seed=seed, overwrite=overwrite, out_shard_size=out_shard_size, progress=progress,
                       allow_crimes=allow_crimes, check_finite=check_finite)
