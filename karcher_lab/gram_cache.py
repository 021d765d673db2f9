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

With the Fisher option (``fisher=[F_1 … F_N]``, §3.4) the Gram is taken under the metric
F̄ = Σ_k ᾱ_k max(F_k, floor), which depends on the weights; as it is linear in them, the cache keeps one
Gram per Fisher, G^(k) (N data passes, once), and re-weighting mixes them, G = Σ_k ᾱ_k G^(k)
(:func:`karcher_lab.merge.karcher.mix_fisher_grams`): still no data pass. Such an entry is valid only
for the same Fisher tensors: it keeps references to them and is recomputed when the Fishers given are
other tensors or were modified in place (their storage, layout or version differ). Without ``keep``
the Gram under F̄ is formed directly (one pass).

The NaN/Inf check rides on the Gram pass instead of a pass of its own
(:func:`karcher_lab.merge.karcher.checked_gram`): G_ii = Σ x² is finite exactly when every entry of
x_i is, so the exact per-model check (and its error message) runs only when G is not finite.
Model-level merges use this path for every karcher tensor (without keeping the Grams), as does
``merge_tensors("karcher", ...)``.
"""
from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch

from karcher_lab.errors import MissingBaseError
from karcher_lab.geometry.karcher_mean import KarcherTrace, check_solver_params
from karcher_lab.merge.api import check_tensors, check_weights, compute_dtype, resolve_params
from karcher_lab.merge.karcher import checked_gram, fisher_grams, fisher_metric, karcher_from_gram, mix_fisher_grams
from karcher_lab.merge.registry import get_method


def _identity(tensors: Sequence[torch.Tensor]) -> tuple:
    """Storage, layout and version of each tensor: equal only for the same, unmodified values while the
    tensors are kept alive (an in-place change bumps the version)."""
    return tuple(
        (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, str(t.device), t._version)
        for t in tensors
    )


class GramCache:
    """Karcher merges of single tensors with their Gram matrices cached under a caller-given key.

    The key must identify the inputs (e.g. the tensor's name and the models' references); the block
    granularity, task-vector mode, compute dtype, device and Fisher floor are added to it here, and
    the Fisher tensors are compared by identity (module docstring). With ``keep=False`` nothing is
    stored (a single pass over a model, where only the fused finiteness check matters).
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.grams: dict[Hashable, torch.Tensor] = {}
        self.traces: dict[str, KarcherTrace] = {}
        self.hits = 0
        self.misses = 0
        self._fishers: dict[Hashable, tuple[tuple, list[torch.Tensor]]] = {}

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
        check_tensors(tensors, base, name, finite=False)
        n = len(tensors)
        w = check_weights(weights, n, method, name)
        p = resolve_params(method, n, params)
        check_solver_params(eta=p["eta"], max_iter=p["max_iter"], tol=p["tol"], init=p["init"])
        if p["task_vectors"] and base is None:
            raise MissingBaseError(f"tensor {name!r}: karcher with task_vectors: true needs a base model")
        dtype = compute_dtype(list(tensors) + ([base] if base is not None else []))
        fisher = p["fisher"]
        floor = p["fisher_floor"] if fisher is not None else None
        full_key = (key, p["block"], p["task_vectors"], dtype, str(tensors[0].device), floor)
        xs = [t.to(dtype) for t in tensors]
        center = base.to(dtype) if p["task_vectors"] else None
        gram = self.grams.get(full_key)
        if gram is not None and fisher is not None and self._fishers[full_key][0] != _identity(fisher):
            gram = None
        if gram is None:
            if fisher is None:
                gram = checked_gram(xs, p["block"], center=center, name=name)
            elif self.keep:
                gram = fisher_grams(xs, fisher, p["block"], center=center, floor=floor, name=name)
                self._fishers[full_key] = (_identity(fisher), list(fisher))
            else:
                metric = fisher_metric(fisher, w, xs[0], floor, name)
                gram = checked_gram(xs, p["block"], center=center, metric=metric, name=name)
            if self.keep:
                self.grams[full_key] = gram
            self.misses += 1
        else:
            self.hits += 1
        if fisher is not None and self.keep:
            gram = mix_fisher_grams(gram, w, name)
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
        self._fishers.clear()
