"""Merging LoRA adapters: every module's factors through one registered LoRA method.

:func:`merge_factor_sets` is the tensor-level entry (modules → lists of factors → merged factors);
:func:`merge_lora` composes it with :mod:`karcher_lab.io.lora` (read PEFT adapters → merge → write a
PEFT adapter or a folded checkpoint). Every check runs before any merge: the method exists, its
parameters and weights are valid, the adapters share a base model, modules and shapes, ranks agree
where the method needs it, and no factor holds NaN or Inf.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from karcher_lab.errors import (
    ArchitectureMismatchError,
    EmptyInputError,
    KarcherLabError,
    ModelCountError,
    NonFiniteError,
    ParameterError,
    ShapeMismatchError,
)
from karcher_lab.io.lora import Factors, LoraAdapter, check_compatible, fold_into_base, layout_delta, read_adapter
from karcher_lab.io.lora import write_adapter
from karcher_lab.merge.api import check_weights, compute_dtype, resolve_params
from karcher_lab.merge.lora.registry import LoraMethod, get_lora_method


def _check_module(name: str, pairs: Sequence[Factors], method: LoraMethod) -> None:
    shapes = set()
    for i, (g, h) in enumerate(pairs):
        if g.dim() != 2 or h.dim() != 2 or g.shape[1] != h.shape[1]:
            raise ShapeMismatchError(f"{name}: adapter {i}'s factors {tuple(g.shape)}, {tuple(h.shape)} do not form G Hᵀ")
        shapes.add((g.shape[0], h.shape[0]))
        for label, t in (("G", g), ("H", h)):
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{name}: adapter {i}'s factor {label} contains "
                                     f"{int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} Inf values")
    if len(shapes) > 1:
        raise ShapeMismatchError(f"{name}: the adapters update matrices of different shapes {sorted(shapes)}")
    ranks = [g.shape[1] for g, _ in pairs]
    if method.equal_ranks and len(set(ranks)) > 1:
        raise ShapeMismatchError(f"{name}: {method.name} needs adapters of one rank, got ranks {ranks}")


def _merge_module(method: str, name: str, pairs: Sequence[Factors], weights: torch.Tensor,
                  params: Mapping[str, Any]) -> Factors:
    """One module's merged factors, in the first input's dtype (computed in :func:`compute_dtype`)."""
    dtype = compute_dtype([t for pair in pairs for t in pair])
    try:
        g, h = get_lora_method(method).fn([(g.to(dtype), h.to(dtype)) for g, h in pairs], weights=weights,
                                          name=name, **params)
    except KarcherLabError as error:  # say which module; keep the type (e.g. AntipodalError)
        raise type(error)(f"{method} failed on {name}: {error}") from error
    return g.to(pairs[0][0].dtype), h.to(pairs[0][0].dtype)


def _worker_start() -> None:
    torch.set_num_threads(1)  # the workers share the cores; one module is small matrices anyway


def merge_factor_sets(
    modules: Mapping[str, Sequence[Factors]],
    method: str = "geomerge",
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    workers: int = 1,
    **params: Any,
) -> dict[str, Factors]:
    """Merge every module's factor list [(G_1, H_1), …, (G_N, H_N)] with LoRA method ``method``.

    ``weights`` default to 1/N each. Computation is in float32 (float64 if any factor is); the merged
    factors have the first input's dtype. ``workers`` > 1 merges the modules in that many processes
    (spawned, one torch thread each; the modules are independent, so the result is the same): for
    geomerge, whose iterations are many small r×r and 2r×2r operations that intra-op threads do not
    speed up, it divides the wall time by up to ``workers`` (a SmolLM2-135M adapter has 210 modules at
    ~4 s each on one core), less the ~2 s each worker takes to start. Raises from
    :mod:`karcher_lab.errors` before any work; an error the method itself raises on a module (e.g.
    geomerge's AntipodalError) names that module.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ParameterError(f"workers must be a positive integer, got {workers!r}")
    m = get_lora_method(method)
    if not modules:
        raise EmptyInputError("no modules to merge")
    counts = {len(pairs) for pairs in modules.values()}
    if len(counts) > 1:
        raise ArchitectureMismatchError(f"modules have different numbers of adapters {sorted(counts)}")
    n = counts.pop()
    if n < max(1, m.min_models):
        raise ModelCountError(f"{method} merges at least {max(1, m.min_models)} adapters, got {n}")
    w = check_weights(torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else weights, n, m)
    resolved = resolve_params(m, n, params)
    for name, pairs in modules.items():
        _check_module(name, pairs, m)
    names = list(modules)
    if workers == 1 or len(names) == 1:
        return {name: _merge_module(method, name, modules[name], w, resolved) for name in names}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(names)), mp_context=context, initializer=_worker_start) as pool:
        merged = pool.map(_merge_module, repeat(method), names, [modules[n] for n in names], repeat(w),
                          repeat(resolved))
        return dict(zip(names, merged))


@dataclass
class LoraMergeResult:
    """A merged adapter: ``factors`` ({base weight name: (G, H)}, ΔW = G Hᵀ), the method and settings
    used, and the first input adapter (``like``: base model, target modules, layout) for writing."""

    method: str
    factors: dict[str, Factors]
    like: LoraAdapter
    adapters: list[str]
    weights: list[float] | None
    params: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None

    @property
    def ranks(self) -> dict[str, int]:
        """The stored rank (factor width) of every merged module."""
        return {name: g.shape[1] for name, (g, _) in self.factors.items()}

    def delta(self, name: str) -> torch.Tensor:
        """ΔW of module weight ``name`` in the base weight's layout."""
        g, h = self.factors[name]
        return layout_delta(g, h, self.like.fan_in_fan_out)

    def record(self) -> dict[str, Any]:
        return {"method": self.method, "adapters": self.adapters, "weights": self.weights,
                "parameters": {k: v for k, v in self.params.items()}, "ranks": sorted(set(self.ranks.values()))}

    def save_adapter(self, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the merged update as a PEFT LoRA adapter directory (see karcher_lab.io.lora)."""
        self.out = write_adapter(out, self.factors, self.like, record=self.record(), overwrite=overwrite)
        return self.out

    def fold_into(self, base: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``base`` with W ← W + ΔW for every merged module as a full checkpoint directory."""
        self.out = fold_into_base(base, self.factors, out, fan_in_fan_out=self.like.fan_in_fan_out,
                                  record={**self.record(), "base": str(base)}, overwrite=overwrite)
        return self.out


def merge_lora(
    adapters: Sequence[str | os.PathLike | LoraAdapter],
    method: str = "geomerge",
    *,
    weights: Sequence[float] | None = None,
    out: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    workers: int = 1,
    **params: Any,
) -> LoraMergeResult:
    """Merge PEFT LoRA adapters (directories or :class:`~karcher_lab.io.lora.LoraAdapter`) module by module.

    ``method`` is a registered LoRA method (``karcher_lab.merge.lora.list_lora_methods()``: geomerge,
    task_arithmetic, ties, knots_ta, knots_ties, peft_cat, peft_linear, peft_svd, peft_ties,
    peft_ties_svd); ``params`` are its parameters and ``weights`` the per-adapter weights (1/N each by
    default); ``workers`` processes merge the modules in parallel (:func:`merge_factor_sets`).
    With ``out`` alone the merged adapter is written there as a PEFT adapter; with ``out``
    and ``base`` it is folded into the base checkpoint and written as a full model directory. The
    result holds the merged factors either way. Everything is checked before any work and nothing is
    written on failure.
    """
    if not adapters:
        raise EmptyInputError("no adapters to merge")
    if base is not None and out is None:
        raise ParameterError("base= names the checkpoint to fold the merged adapter into; give out= as well")
    get_lora_method(method)
    read = [a if isinstance(a, LoraAdapter) else read_adapter(a) for a in adapters]
    check_compatible(read)
    modules = {name: [a.modules[name].factors() for a in read] for name in read[0].modules}
    factors = merge_factor_sets(modules, method, weights=weights, workers=workers, **params)
    result = LoraMergeResult(method, factors, read[0], [a.label for a in read],
                             None if weights is None else [float(w) for w in weights], dict(params))
    if out is not None:
        if base is not None:
            result.fold_into(base, out, overwrite=overwrite)
        else:
            result.save_adapter(out, overwrite=overwrite)
    return result
