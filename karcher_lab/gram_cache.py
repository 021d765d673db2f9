"""Per-tensor Karcher state kept between merges: re-weighting without touching the Gram pass.

The ``karcher`` merge of one tensor (:func:`karcher_lab.merge.karcher.karcher`) is three steps in
coefficient space (:mod:`karcher_lab.geometry.karcher_mean`):

    G = gram_matrix(x_1 … x_N [− θ_0])              one read of the data, float64 [B, N, N]
    k = karcher_coefficients(G, α, η, max_iter, tol, init) · (Σ α̂_i n_i)     O(N²) per step
    θ* = combine(x, k) [+ (1 − Σ k) θ_0]            one more read of the data

G depends only on the inputs, the block granularity and (in task-vector mode) the base, not on the
weights α or the solver's settings, and the norms n_i are its diagonal. :class:`GramCache` keeps G per
tensor, so a widget that moves a weight slider re-solves the N×N problem and runs only the combine
pass: the inputs are neither re-read for the Gram nor re-normalized. Results are identical to
``merge_tensors("karcher", ...)`` (tests/test_pipeline.py checks every mode against it); the last
solver trace of each tensor is kept in ``traces`` for convergence plots.

The NaN/Inf check rides on the Gram pass instead of a pass of its own: G_ii = Σ x² is finite exactly
when every entry of x_i is (float32/bf16/fp16 inputs cannot overflow a float64 sum of squares), so
the exact per-model check (and its error message) runs only when G is not finite. Model-level merges
use this path for every karcher tensor (without keeping the Grams), which saves one full read of the
inputs per tensor.
"""
from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch

from karcher_lab.errors import InputError, MissingBaseError
from karcher_lab.geometry.karcher_mean import KarcherTrace, check_solver_params, gram_matrix
from karcher_lab.merge.api import check_tensors, check_weights, compute_dtype, resolve_params
from karcher_lab.merge.karcher import karcher_from_gram
from karcher_lab.merge.registry import get_method


class GramCache:
    """Karcher merges of single tensors with their Gram matrices cached under a caller-given key.

    The key must identify the inputs (e.g. the tensor's name and the models' references); the block
    granularity, task-vector mode, compute dtype and device are added to it here. With ``keep=False``
    nothing is stored (a single pass over a model, where only the fused finiteness check matters).
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.grams: dict[Hashable, torch.Tensor] = {}
        self.traces: dict[str, KarcherTrace] = {}
        self.hits = 0
        self.misses = 0

    def merge(
        self,
        key: Hashable,
        tensors: Sequence[torch.Tensor],
        *,
        weights: Sequence[float] | torch.Tensor | None = None,
        base: torch.Tensor | None = None,
        seed: int | None = None,
        out_dtype: torch.dtype | None = None,
        name: str | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """``merge_tensors("karcher", tensors, ...)`` with the Gram of ``key`` reused when cached."""
        method = get_method("karcher")
        n = len(tensors)
        w = check_weights(weights, n, method, name)
        p = resolve_params(method, n, params)
        check_solver_params(eta=p["eta"], max_iter=p["max_iter"], tol=p["tol"], init=p["init"])
        if p["task_vectors"] and base is None:
            raise MissingBaseError(f"tensor {name!r}: karcher with task_vectors: true needs a base model")
        dtype = compute_dtype(list(tensors) + ([base] if base is not None else []))
        full_key = (key, p["block"], p["task_vectors"], dtype, str(tensors[0].device))
        xs = [t.to(dtype) for t in tensors]
        center = base.to(dtype) if p["task_vectors"] else None
        gram = self.grams.get(full_key)
        if gram is None:
            gram = gram_matrix(xs, p["block"], center=center)
            if not bool(torch.isfinite(gram).all()):
                check_tensors(tensors, center, name)  # names the model holding NaN/Inf
                raise InputError(f"tensor {name!r}: the Gram matrix of finite inputs overflows float64 (values near 1e154)")
            if self.keep:
                self.grams[full_key] = gram
            self.misses += 1
        else:
            self.hits += 1
        merged, trace = karcher_from_gram(
            xs, gram, w, center=center, block=p["block"], eta=p["eta"], max_iter=p["max_iter"],
            tol=p["tol"], init=p["init"], norm_average=p["norm_average"], name=name,
        )
        if name is not None:
            self.traces[name] = trace
        return merged.to(out_dtype or tensors[0].dtype)

    def clear(self) -> None:
        self.grams.clear()
        self.traces.clear()
