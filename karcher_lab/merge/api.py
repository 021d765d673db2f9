"""`merge_tensors`: validate inputs once, then run a registered method on one tensor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from karcher_lab.errors import (
    EmptyInputError,
    InputError,
    MissingBaseError,
    ModelCountError,
    NonFiniteError,
    ParameterError,
    ShapeMismatchError,
    WeightError,
)
from karcher_lab.merge.registry import REQUIRED, MergeMethod, get_method


@dataclass
class MergeResult:
    """A merged tensor and, for iterative methods such as karcher, the solver's trace."""

    tensor: torch.Tensor
    trace: Any = None


def _where(name: str | None) -> str:
    return f"tensor {name!r}: " if name else ""


def compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are upcast exactly)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_tensors(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, name: str | None = None, *, finite: bool = True
) -> None:
    """Raise a specific InputError for an empty list, non-tensors, shape mismatches or (unless
    ``finite`` is false: the method finds them in its own pass, see :func:`check_finite`) NaN/Inf."""
    where = _where(name)
    if tensors is None or len(tensors) == 0:
        raise EmptyInputError(f"{where}no tensors to merge (got an empty list)")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{where}model {i} is a {type(t).__name__}, not a torch.Tensor")
        if not (t.is_floating_point()):
            raise InputError(f"{where}model {i} has dtype {t.dtype}; merging needs floating-point tensors")
    shape = tensors[0].shape
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != shape:
            raise ShapeMismatchError(
                f"{where}model {i} has shape {tuple(t.shape)} but model 0 has {tuple(shape)}"
            )
    if base is not None:
        if not isinstance(base, torch.Tensor) or not base.is_floating_point():
            raise InputError(f"{where}base must be a floating-point torch.Tensor")
        if base.shape != shape:
            raise ShapeMismatchError(f"{where}base has shape {tuple(base.shape)} but the models have {tuple(shape)}")
    if finite:
        check_finite(tensors, base, name)


def check_finite(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, name: str | None = None) -> None:
    """NonFiniteError naming the first model (or the base) that holds NaN or Inf values."""
    where = _where(name)
    labelled = [(f"model {i}", t) for i, t in enumerate(tensors)]
    if base is not None:
        labelled.append(("base", base))
    for label, t in labelled:
        # A finite sum proves every entry finite at a fraction of isfinite's cost (one reduction, no
        # boolean temporary); an overflowing sum of finite values falls through to the exact check.
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise NonFiniteError(f"{where}{label} contains {n_nan} NaN and {n_inf} Inf values")


def check_weights(
    weights: Sequence[float] | torch.Tensor | None, n: int, method: MergeMethod, name: str | None = None
) -> torch.Tensor:
    """Per-model weights as float64 [n] (1.0 each when None), checked for length, sign and sum."""
    where = _where(name)
    if weights is None:
        return torch.ones(n, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
    if w.numel() != n:
        raise WeightError(f"{where}{method.name}: got {w.numel()} weights for {n} models")
    if not bool(torch.isfinite(w).all()):
        raise WeightError(f"{where}{method.name}: weights must be finite, got {w.tolist()}")
    if method.weights == "nonnegative" and bool((w < 0).any()):
        raise WeightError(
            f"{where}{method.name} needs non-negative weights, got {w.tolist()} "
            "(negative weights are allowed in task_arithmetic-style methods)"
        )
    if method.weights != "unused" and bool((w == 0).all()):
        raise WeightError(f"{where}{method.name}: all weights are zero")
    return w


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
    **params: Any,
) -> torch.Tensor | MergeResult:
    """Merge one tensor from N models with a registered method.

    Inputs are validated before any work (errors from :mod:`karcher_lab.errors` name ``name``, the
    tensor's name, when given; a method registered with ``checks_finite`` finds NaN/Inf in its own
    first pass over the data, before writing any output). Computation runs in float32 (float64 if any
    input is float64); the result has the first input's dtype unless ``out_dtype`` is given.
    ``weights`` are the per-model ``weight`` of mergekit's YAML (1.0 each by default). Randomized
    methods use ``seed`` (the same seed gives bit-identical output). With ``return_trace=True`` a
    :class:`MergeResult` is returned, whose ``trace`` is the solver trace for iterative methods (None
    for closed-form ones).
    """
    m = get_method(method)
    check_tensors(tensors, base, name, finite=not m.checks_finite)
    n = len(tensors)
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        expected = (
            f"exactly {m.min_models}" if m.min_models == m.max_models
            else f"at least {m.min_models}" + (f" and at most {m.max_models}" if m.max_models else "")
        )
        raise ModelCountError(f"{_where(name)}{method} merges {expected} models, got {n}")
    if m.base == "required" and base is None:
        raise MissingBaseError(f"{_where(name)}{method} needs a base model (base=...)")
    w = check_weights(weights, n, m, name)
    resolved = resolve_params(m, n, params)
    dtype = compute_dtype(list(tensors) + ([base] if base is not None else []))
    xs = [t.to(dtype) for t in tensors]
    b = base.to(dtype) if (base is not None and m.base != "unused") else None
    generator = None
    if m.randomized:
        generator = torch.Generator(device=xs[0].device)
        generator.manual_seed(0 if seed is None else int(seed))
    out = m.fn(xs, weights=w, base=b, generator=generator, name=name, **resolved)
    tensor, trace = out if isinstance(out, tuple) else (out, None)
    tensor = tensor.to(out_dtype or tensors[0].dtype)
    return MergeResult(tensor, trace) if return_trace else tensor
