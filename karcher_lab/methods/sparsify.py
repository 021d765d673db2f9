"""Sparsification of task vectors δ = θ − θ0, as in mergekit's ``sparsify`` (0.1.5).

Each function takes one delta and returns the trimmed delta, optionally rescaled so that its L1 norm
is unchanged (mergekit's ``rescale: true``; see :func:`masked_delta`). They are the trim steps of the
task-arithmetic family (:mod:`karcher_lab.methods.task_arithmetic`):

* :func:`magnitude_prune` — TIES trim (Yadav et al. 2023, arXiv:2306.01708, §3 "Trim"): keep the
  k = max(1, int(ρ n)) largest |δ| over the whole tensor.
* :func:`dare_drop` — DARE (Yu et al. 2023, arXiv:2311.03099, eq. 2): keep each entry with
  probability ρ. The rescale is mergekit's L1 match, *not* the paper's 1/ρ.
* :func:`della_magprune` — DELLA MagPrune (Deep et al. 2024, arXiv:2406.11617, §3.1): keep
  probabilities linear in the magnitude rank within each row, p ∈ [ρ − ε, ρ + ε].
* :func:`breadcrumbs_prune` — Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795):
  drop the int(γ n) largest and the smallest |δ| so that int(ρ n) entries remain.

Magnitude ranks break ties by the lower flat index (a stable sort); mergekit uses an unstable sort,
whose order among exactly equal magnitudes is unspecified, so the two agree whenever magnitudes are
distinct. Random masks are drawn with ``torch.bernoulli`` on float32 probabilities of the delta's
shape, as mergekit does on CPU, so a ``torch.Generator`` seeded with s reproduces the masks mergekit
draws right after ``torch.manual_seed(s)`` (checked against mergekit 0.1.5 with torch 2.13 CPU).
"""
from __future__ import annotations

import torch

from karcher_lab.errors import ParameterError

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) mergekit skips the rescale."""


def masked_delta(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """δ ⊙ m, times ‖δ‖₁ / ‖δ ⊙ m‖₁ when ``rescale`` (skipped if either norm < 1e-7).

    This is mergekit's ``rescaled_masked_tensor`` with the L1 norm, the only norm its merge methods
    use. The factor keeps the total absolute mass of the task vector, so for DARE its expectation is
    close to, but not exactly, the paper's 1/ρ.
    """
    masked = delta * keep
    if not rescale:
        return masked
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def rank_window_mask(scores: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Boolean mask of the entries whose rank by descending score lies in [start, stop).

    Ranks run over the flattened tensor; equal scores are ranked by the lower flat index first.
    ``rank_window_mask(s, 0, k)`` is the top-k mask.
    """
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[start:stop]] = True
    return keep.reshape(scores.shape)


def magnitude_prune(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """TIES trim: keep the k = max(1, int(ρ n)) entries of largest |δ| over the whole tensor.

    ρ ≥ 1 returns δ unchanged and ρ ≤ 0 (or an empty tensor) returns zeros, as in mergekit; a
    positive density keeps at least one entry.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    return masked_delta(delta, rank_window_mask(delta.abs(), 0, k), rescale)


def breadcrumbs_prune(
    delta: torch.Tensor, density: float, gamma: float, *, rescale: bool = False
) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest and the smallest |δ|, keeping n_keep = int(ρ n) entries.

    By descending magnitude, the first n_skip = min(int(γ n), n − n_keep) entries are dropped (the
    outliers; fewer than int(γ n) when that is needed to keep the target density), then n_keep
    entries are kept and the rest (the smallest) dropped. ρ ≥ 1 returns δ unchanged; unlike
    :func:`magnitude_prune` a small positive ρ may keep nothing (int(ρ n) = 0), as in mergekit.

    This matches mergekit 0.1.5, which keeps positions [n_bot, n_bot + n_keep) of the ascending
    order with n_bot = max(0, n − n_keep − int(γ n)). In particular int(γ n) = 0 drops no outliers
    (it does *not* zero the delta: the suspected ``indices[n_bot:-0]`` bug is absent in 0.1.5).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    n_keep = int(density * n)
    n_skip = min(int(gamma * n), n - n_keep)
    return masked_delta(delta, rank_window_mask(delta.abs(), n_skip, n_skip + n_keep), rescale)


def dare_drop(
    delta: torch.Tensor, density: float, *, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: keep each entry independently with probability ρ (m ~ Bernoulli(ρ)), then
    :func:`masked_delta` (the L1 rescale when ``rescale``).

    ρ ≥ 1 returns δ unchanged without drawing; every other ρ draws one Bernoulli per entry (as
    mergekit, so the random stream stays aligned with it).
    """
    if density >= 1:
        return delta
    probabilities = torch.full(delta.shape, density, dtype=torch.float32, device=delta.device)
    keep = torch.bernoulli(probabilities, generator=generator).to(delta.dtype)
    return masked_delta(delta, keep, rescale)


def check_della_range(density: float, epsilon: float, where: str = "della") -> None:
    """Raise ParameterError unless 0 < ρ − ε and ρ + ε < 1 (only checked for 0 < ρ < 1, as mergekit)."""
    if epsilon < 0:
        raise ParameterError(f"{where}: epsilon must be >= 0, got {epsilon}")
    if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise ParameterError(
            f"{where}: density ± epsilon must lie in (0, 1), got density={density}, epsilon={epsilon}"
        )


def _as_rows(delta: torch.Tensor) -> torch.Tensor:
    """The view DELLA ranks in: tensors of fewer than two dimensions become one row."""
    return delta.reshape(1, -1) if delta.dim() < 2 else delta


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities p = ρ − ε + 2ε r̂ (float32, in the row view of δ).

    r̂ = (r − 1)/(n − 1) with r ∈ {1, …, n} the ascending rank of |δ| along dimension 1 (within each
    row of a matrix; a 1-D tensor is one row), so the smallest entry gets ρ − ε, the largest ρ + ε
    and the mean is ρ. A row of a single entry gets r̂ = 1/2, i.e. p = ρ (mergekit computes 0/0 there
    and torch.bernoulli fails on the NaN probability).
    """
    rows = _as_rows(delta)
    n = rows.shape[1]
    rank = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32)
    relative_rank = rank / (n - 1) if n > 1 else torch.full_like(rank, 0.5)
    return (density - epsilon) + relative_rank * 2 * epsilon


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DELLA: m ~ Bernoulli(:func:`della_keep_probabilities`), then :func:`masked_delta`.

    ρ ≥ 1 returns δ unchanged and ρ ≤ 0 returns zeros, both without drawing; otherwise
    0 < ρ ± ε < 1 is required (ParameterError). The L1 rescale is over the whole tensor.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della_range(density, epsilon)
    keep = torch.bernoulli(della_keep_probabilities(delta, density, epsilon), generator=generator)
    return masked_delta(_as_rows(delta), keep.to(delta.dtype), rescale).reshape(delta.shape)
