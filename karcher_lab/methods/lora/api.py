"""Merging LoRA updates module by module: every module's factors through one registered LoRA method.

:func:`merge_factor_sets` takes ``{module: [(G_1, H_1), …, (G_N, H_N)]}``, the updates
ΔW_i = G_i H_iᵀ of N adapters per module, and returns ``{module: (G, H)}``, the merged updates
ΔW = G Hᵀ. Every check runs before any merge: the method exists, its parameters and weights are valid,
every module has N factor pairs that form G Hᵀ, one update shape per module, one rank per module where
the method needs it, and no factor holds NaN or Inf. Reading and writing PEFT adapters, and merging in
worker processes, is :mod:`karcher_lab.pipeline.lora`'s.
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Mapping, Sequence

import torch

from karcher_lab.checks import check_count, check_weights, resolve_device
from karcher_lab.errors import (
    ArchitectureMismatchError,
    EmptyInputError,
    KarcherLabError,
    ModelCountError,
    NonFiniteError,
    ParameterError,
    ShapeMismatchError,
)
from karcher_lab.methods.api import compute_dtype, resolve_params
from karcher_lab.methods.lora.registry import LoraMethod, get_lora_method


def _check_module(name: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], method: LoraMethod) -> None:
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


def _merge_module(method: str, name: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor,
                  params: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's merged factors, in the first input's dtype (computed in :func:`compute_dtype`)."""
    dtype = compute_dtype([t for pair in pairs for t in pair])
    try:
        g, h = get_lora_method(method).fn([(g.to(dtype), h.to(dtype)) for g, h in pairs], weights=weights,
                                          name=name, **params)
    except KarcherLabError as error:  # say which module; keep the type (e.g. AntipodalError)
        raise type(error)(f"{method} failed on {name}: {error}") from error
    return g.to(pairs[0][0].dtype), h.to(pairs[0][0].dtype)


def _merge_modules(method: str, names: list[str], modules: list[Sequence[tuple[torch.Tensor, torch.Tensor]]],
                   weights: torch.Tensor, params: Mapping[str, Any],
                   device: torch.device | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Many modules' merged factors by the method's ``batch_fn``, each as :func:`_merge_module` returns it."""
    cast = []
    for pairs in modules:
        dtype = compute_dtype([t for pair in pairs for t in pair])
        cast.append([(g.to(dtype), h.to(dtype)) for g, h in pairs])
    try:
        merged = get_lora_method(method).batch_fn(cast, weights=weights, names=names, device=device, **params)
    except KarcherLabError as error:  # the message starts with the module's name; keep the type
        raise type(error)(f"{method} failed on {error}") from error
    return [(g.to(pairs[0][0].dtype), h.to(pairs[0][0].dtype)) for (g, h), pairs in zip(merged, modules)]


def merge_factor_sets(
    modules: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]],
    method: str = "geomerge",
    *,
    weights: Sequence[float] | torch.Tensor | None = None,
    executor: Executor | None = None,
    chunks: int = 1,
    device: str | torch.device | None = None,
    **params: Any,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Merge every module's factor list [(G_1, H_1), …, (G_N, H_N)] with LoRA method ``method``.

    Parameters
    ----------
    modules : mapping of str to sequence of (G [d1, r_i], H [d2, r_i])
        Per module (e.g. the base weight it updates), the N inputs' factors, ΔW_i = G_i H_iᵀ.
    method : str
        A registered LoRA method (:func:`karcher_lab.methods.lora.list_lora_methods`).
    weights : sequence of float or tensor [N], optional
        Per-input weights, 1/N each by default; non-negative for methods that say so.
    executor : concurrent.futures.Executor, optional
        Merge the modules through ``executor.map`` (e.g. worker processes,
        :func:`karcher_lab.pipeline.lora.module_workers`); the modules are independent, so the result
        is the same as without.
    chunks : int
        For a method with a batched form (``batch_fn``, e.g. geomerge: all modules solved together),
        the modules go to ``executor`` in this many interleaved chunks, one batched call each (give the
        number of workers); without an executor, one call merges every module.
    device : str or torch.device, optional
        Where a method with a batched form computes (geomerge: ``"cuda"`` solves the whole batch on the
        GPU); the results come back on the inputs' device. Default: the inputs' device. Methods without
        a batched form compute on the inputs' device and accept only the CPU here.
    **params
        The method's parameters (defaults filled in, checked).

    Returns
    -------
    dict of str to (G [d1, k], H [d2, k])
        The merged update ΔW = G Hᵀ per module, in the order of ``modules``; k is the method's merged
        rank. Computed in float32 (float64 if any factor is), returned in the first input's dtype.

    Raises from :mod:`karcher_lab.errors` before any work (DeviceError for an unknown device or CUDA
    unavailable; ParameterError for a device other than the CPU with a method without a batched form); an
    error the method itself raises on a module (e.g. geomerge's AntipodalError) has the same type and
    names the module.
    """
    m = get_lora_method(method)
    target = None if device is None else resolve_device(device)
    if target is not None and target.type != "cpu" and m.batch_fn is None:
        raise ParameterError(f"{method} runs on the inputs' device only; device={str(device)!r} applies to methods "
                             "with a batched form (geomerge)")
    if not modules:
        raise EmptyInputError("no modules to merge")
    counts = {len(pairs) for pairs in modules.values()}
    if len(counts) > 1:
        raise ArchitectureMismatchError(f"modules have different numbers of adapters {sorted(counts)}")
    n = counts.pop()
    if n < max(1, m.min_models):
        raise ModelCountError(f"{method} merges at least {max(1, m.min_models)} adapters, got {n}")
    w = check_weights(torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else weights, n,
                      label=f"{method}: ", nonnegative=m.weights == "nonnegative", what="adapters")
    resolved = resolve_params(m, n, params)
    for name, pairs in modules.items():
        _check_module(name, pairs, m)
    names = list(modules)
    if m.batch_fn is not None:
        check_count("chunks", chunks)
        parts = [names[i::chunks] for i in range(min(chunks, len(names)))] if executor is not None else [names]
        calls = [(method, part, [modules[name] for name in part], w, resolved, target) for part in parts]
        merged = executor.map(_merge_modules, *zip(*calls)) if executor is not None else [_merge_modules(*calls[0])]
        out = {name: pair for part, results in zip(parts, merged) for name, pair in zip(part, results)}
        return {name: out[name] for name in names}
    if executor is None:
        return {name: _merge_module(method, name, modules[name], w, resolved) for name in names}
    merged = executor.map(_merge_module, [method] * len(names), names, [modules[name] for name in names],
                          [w] * len(names), [resolved] * len(names))
    return dict(zip(names, merged))
