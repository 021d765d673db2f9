"""`merge_tensors`: validate a merge of one tensor once (:func:`validate`), then run its method, in one
phase or, with a :class:`~karcher_lab.methods.prepared.PreparedStates`, from a cached prepared state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

from karcher_lab.errors import (
    EmptyInputError,
    InputError,
    MissingBaseError,
    NonFiniteError,
    NotSupportedError,
    ParameterError,
    ShapeMismatchError,
)
from karcher_lab import checks
from karcher_lab.checks import where
from karcher_lab.methods.prepared import PreparedStates
from karcher_lab.methods.registry import REQUIRED, MergeMethod, get_method


@dataclass(frozen=True)
class RowSlices:
    """Inputs of one tensor's merge given as row slices instead of whole tensors: ``read(start, stop)``
    returns (the N inputs' rows ``start:stop`` along axis 0, the base's rows or None); ``rows`` is the
    tensor's length along axis 0 and ``step`` the rows read at a time (≥ 1)."""

    read: Callable[[int, int], tuple[list[torch.Tensor], torch.Tensor | None]]
    rows: int
    step: int


def row_separable(method: str | MergeMethod, n: int, params: dict[str, Any]) -> bool:
    """Whether ``method`` with ``params`` (for ``n`` inputs) can merge :class:`RowSlices`
    (:attr:`TwoPhase.row_separable <karcher_lab.methods.registry.TwoPhase>`); False for bad parameters,
    which the merge itself then reports."""
    m = method if isinstance(method, MergeMethod) else get_method(method)
    if m.two_phase is None or m.two_phase.row_separable is None:
        return False
    try:
        return bool(m.two_phase.row_separable(resolve_params(m, n, dict(params))))
    except ParameterError:
        return False


@dataclass
class MergeResult:
    """A merged tensor and, for iterative methods such as karcher, the solver's trace."""

    tensor: torch.Tensor
    trace: Any = None


def compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast exactly)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_tensors(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, name: str | None = None, *, finite: bool = True
) -> None:
    """Raise a specific InputError for an empty list, non-tensors, shape mismatches or (unless
    ``finite`` is false: the method finds them in its own pass, see :func:`check_finite`) NaN/Inf."""
    label = where(name)
    if tensors is None or len(tensors) == 0:
        raise EmptyInputError(f"{label}no tensors to merge (got an empty list)")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{label}model {i} is a {type(t).__name__}, not a torch.Tensor")
        if not (t.is_floating_point()):
            raise InputError(f"{label}model {i} has dtype {t.dtype}; merging needs floating-point tensors")
    shape = tensors[0].shape
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != shape:
            raise ShapeMismatchError(
                f"{label}model {i} has shape {tuple(t.shape)} but model 0 has {tuple(shape)}"
            )
    if base is not None:
        if not isinstance(base, torch.Tensor) or not base.is_floating_point():
            raise InputError(f"{label}base must be a floating-point torch.Tensor")
        if base.shape != shape:
            raise ShapeMismatchError(f"{label}base has shape {tuple(base.shape)} but the models have {tuple(shape)}")
    if finite:
        check_finite(tensors, base, name)


def check_finite(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, name: str | None = None) -> None:
    """NonFiniteError naming the first model (or the base) that holds NaN or Inf values."""
    labelled = [(f"model {i}", t) for i, t in enumerate(tensors)]
    if base is not None:
        labelled.append(("base", base))
    for label, t in labelled:
        # A finite sum proves every entry finite at a fraction of isfinite's cost (one reduction, no
        # boolean temporary); an overflowing sum of finite values falls through to the exact check.
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise NonFiniteError(f"{where(name)}{label} contains {n_nan} NaN and {n_inf} Inf values")


def method_weights(
    weights: Sequence[float] | torch.Tensor | None, n: int, method: MergeMethod, name: str | None = None
) -> torch.Tensor:
    """Per-model weights as float64 [n] (1.0 each when None), checked under the method's sign rule."""
    label = f"{where(name)}{method.name}: "
    return checks.check_weights(weights, n, label=label, nonnegative=method.weights == "nonnegative",
                                nonzero=method.weights != "unused")


def resolve_params(method: MergeMethod, n: int, params: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults, coerce types, check bounds; per-model values become lists of length n."""
    known = {p.name for p in method.params}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ParameterError(
            f"{method.name}: unknown parameter(s) {unknown}; known: {sorted(known) or 'none'}"
        )
    out: dict[str, Any] = {}
    for p in method.params:
        value = params.get(p.name, p.default)
        if value is REQUIRED:
            raise ParameterError(f"{method.name}: parameter {p.name!r} is required ({p.doc})")
        if value is None:
            out[p.name] = None
        elif p.per_model:
            values = list(value) if isinstance(value, (list, tuple, torch.Tensor)) else [value] * n
            if len(values) != n:
                raise ParameterError(f"{method.name}: per-model parameter {p.name!r} has {len(values)} values for {n} models")
            out[p.name] = [p.coerce(v, method.name) for v in values]
        else:
            out[p.name] = p.coerce(value, method.name)
    return out


@dataclass
class MergeCall:
    """One validated merge of one tensor: the method, inputs in the compute dtype, context, parameters."""

    method: MergeMethod
    tensors: list[torch.Tensor]
    context: dict[str, Any]
    params: dict[str, Any]
    out_dtype: torch.dtype


def validate(
    method: str | MergeMethod,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    seed: int | None = None,
    out_dtype: torch.dtype | None = None,
    name: str | None = None,
    params: dict[str, Any],
) -> MergeCall:
    """Every check of one tensor's merge, before any work (see :func:`merge_tensors`)."""
    m = method if isinstance(method, MergeMethod) else get_method(method)
    check_tensors(tensors, base, name, finite=not m.checks_finite)
    n = len(tensors)
    m.check_count(n, label=where(name))
    if m.base == "required" and base is None:
        raise MissingBaseError(f"{where(name)}{m.name} needs a base model (base=...)")
    if m.base_mode is not None and base is None and m.uses_base(params):
        raise MissingBaseError(f"{where(name)}{m.name} with {m.base_mode}: true needs a base model")
    w = method_weights(weights, n, m, name)
    resolved = resolve_params(m, n, params)
    dtype = compute_dtype(list(tensors) + ([base] if base is not None else []))
    widen = (lambda t: t) if m.reads_narrow else (lambda t: t.to(dtype))
    xs = [widen(t) for t in tensors]
    b = widen(base) if (base is not None and m.base != "unused") else None
    if b is not None and not m.uses_base(resolved) and m.checks_finite:
        check_finite([], b, name)  # given but unused: still refused when broken, as for other methods
    generator = None
    if m.randomized:
        generator = torch.Generator(device=xs[0].device)
        generator.manual_seed(0 if seed is None else int(seed))
    context = dict(weights=w, base=b, generator=generator, name=name)
    return MergeCall(m, xs, context, resolved, out_dtype or tensors[0].dtype)


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    seed: int | None = None,
    out_dtype: torch.dtype | None = None,
    name: str | None = None,
    return_trace: bool = False,
    states: PreparedStates | None = None,
    key: Hashable = None,
    **params: Any,
) -> torch.Tensor | MergeResult:
    """Merge one tensor from N models with a registered method.

    Parameters
    ----------
    method : str
        A registered method's name (:func:`~karcher_lab.methods.list_methods`).
    tensors : list of N tensors, all of one shape, or RowSlices
        Floating-point inputs; computation runs in float32 (float64 if any input is float64). A
        :class:`RowSlices` reader (the base comes from it, not from ``base``) merges a
        :func:`row_separable` method slice by slice, never holding whole inputs: the same result up to
        the order in which the Gram's float64 partial sums are added.
    weights : N floats, optional
        The per-model ``weight`` of mergekit's YAML (1.0 each by default).
    base : tensor, optional
        The base model's tensor, for methods that use one.
    seed : int, optional
        Seed of randomized methods (the same seed gives bit-identical output).
    out_dtype : torch.dtype, optional
        Dtype of the result (default: the first input's).
    name : str, optional
        The tensor's name, quoted by every error.
    return_trace : bool
        Return a :class:`MergeResult` whose ``trace`` is the solver trace of iterative methods.
    states, key : PreparedStates and a hashable, optional
        For a two-phase method (:class:`~karcher_lab.methods.registry.TwoPhase`), the prepared state
        cached under ``key`` (which must identify the inputs) is reused: a re-weighted merge skips the
        pass over the data that preparing makes.
    **params
        The method's parameters (:attr:`MergeMethod.params`).

    Returns
    -------
    torch.Tensor of the inputs' shape, or MergeResult

    Every input is validated before any work (errors from :mod:`karcher_lab.errors` name ``name``); a
    method registered with ``checks_finite`` finds NaN/Inf in its own first pass over the data, before
    writing any output. A result that is not finite in ``out_dtype`` (an overflow) raises
    NonFiniteError (:func:`check_finite_result`; one reduction over the output).
    """
    if isinstance(tensors, RowSlices):
        tensor, trace = _merge_rows(method, tensors, states, key, weights=weights, seed=seed, out_dtype=out_dtype,
                                    name=name, params=params)
        return MergeResult(tensor, trace) if return_trace else tensor
    call = validate(method, tensors, weights=weights, base=base, seed=seed, out_dtype=out_dtype, name=name,
                    params=params)
    if states is not None and call.method.two_phase is not None:
        out = states.merge(key, call)
    else:
        out = call.method.call(call.tensors, call.context, call.params)
    tensor, trace = out if isinstance(out, tuple) else (out, None)
    tensor = tensor.to(call.out_dtype)
    check_finite_result(tensor, call.method.name, name)
    return MergeResult(tensor, trace) if return_trace else tensor


def _merge_rows(method: str, inputs: RowSlices, states: PreparedStates | None, key: Hashable, *,
                params: dict[str, Any], **arguments: Any) -> tuple[torch.Tensor, Any]:
    """:func:`merge_tensors` of a row-separable two-phase method on :class:`RowSlices`: the state is the
    sum of the slices' prepared states (one pass over the slices, skipped when ``states`` holds it),
    then each slice is solved into its rows of the output (a second pass); at most ``step`` rows of
    each input are held at a time. Every slice is validated as a whole tensor would be."""
    def call_of(start: int) -> MergeCall:
        tensors, base = inputs.read(start, min(inputs.rows, start + inputs.step))
        return validate(method, tensors, base=base, params=params, **arguments)

    starts = range(0, inputs.rows, inputs.step)
    first = call_of(0)
    phases = first.method.two_phase
    if phases is None or phases.row_separable is None or not phases.row_separable(first.params):
        raise NotSupportedError(f"{where(arguments.get('name'))}{first.method.name} with these parameters cannot "
                                "merge a tensor by row slices")

    def prepare(call: MergeCall) -> Any:
        total = phases.prepare(call)
        for start in starts[1:]:
            total = total + phases.prepare(call_of(start))
        return total

    state = prepare(first) if states is None else states.state(key, first, prepare)
    out, trace = None, None
    for start in starts:
        call = first if start == 0 else call_of(start)
        result = phases.solve(state, call)
        part, trace = result if isinstance(result, tuple) else (result, None)
        part = part.to(call.out_dtype)
        check_finite_result(part, call.method.name, arguments.get("name"))
        if out is None:
            out = torch.empty((inputs.rows, *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[start:start + part.shape[0]] = part
    return out, trace


def check_finite_result(tensor: torch.Tensor, method: str, name: str | None = None) -> None:
    """NonFiniteError when a merge of finite inputs gives NaN or Inf in the output dtype (an overflow:
    the merged values exceed the dtype's range), naming the tensor, the count and the dtype."""
    if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
        return
    n_nan, n_inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    largest = torch.finfo(tensor.dtype).max
    raise NonFiniteError(
        f"{where(name)}{method}: the merged tensor holds {n_inf} Inf and {n_nan} NaN values in {str(tensor.dtype).removeprefix('torch.')} "
        f"(of {tensor.numel()}; the largest finite value is {largest:.4g}) although the inputs are finite: the merge "
        "overflowed; lower the weights (or lambda), or save in a wider dtype (out_dtype: float32)"
    )
