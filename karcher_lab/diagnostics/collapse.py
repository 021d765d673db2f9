"""Collapse metrics per layer: activation variance, effective rank, numerical rank, with a bootstrap.

Definitions (reference: geometry-and-diagnostics.md), for a layer's activations h over the probe
set's non-padding tokens (n tokens, d hidden units), with the centered covariance
C = (1/n) Σ_t (h_t − h̄)(h_t − h̄)ᵀ (centered; normalized by n, not n − 1):

- **activation variance** (REPAIR, Jordan et al. 2023): the mean over hidden units of the variance over
  tokens, tr(C)/d.
- **effective rank** (Roy & Vetterli 2007): with σ_i the singular values of the centered activation
  matrix H − h̄ (σ_i = √(n λ_i), λ_i the eigenvalues of C; the scale cancels), p_i = σ_i / Σ_j σ_j,
  erank = exp(−Σ_i p_i log p_i). 1 ≤ erank ≤ rank.
- **numerical rank**: #{i : σ_i > rtol · σ_max}, default ``rtol = DEFAULT_RTOL`` = 1e-2 (directions
  whose singular value is at least 1% of the largest, i.e. eigenvalues of C above 1e-4 λ_max).
  The per-layer spectra are computed in float32 (eigvalsh of C), accurate to ~1e-7 λ_max, so counts
  at this threshold are reliable; below rtol ≈ 1e-3 they would count rounding noise.

**Bootstrap** (the paper's Table 7 reports mean ± std over bootstrap draws): each draw resamples the
probe set's groups of sequences with replacement (see :mod:`~karcher_lab.diagnostics.activations`:
a multinomial count per group), and every metric is recomputed from the exactly reweighted
covariance. Draws come from a seeded generator, so two models captured on the same probes get the
same draws: **collapse ratios** of a merged model against its experts are paired per draw,
r = m_merged / Σ_i w_i m_i with w normalized to sum 1 (below 1 = collapse), for each metric m.

Every table is a tidy DataFrame: one row per model × site × layer × metric, with ``mean`` and ``std``
over the draws, ``point`` (the metric on the whole probe set) and ``draws``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping, Sequence

import pandas as pd
import torch

from karcher_lab.diagnostics.activations import ActivationStats
from karcher_lab.errors import EmptyInputError, InputError, ParameterError, WeightError

DEFAULT_RTOL = 1e-2
"""Numerical rank counts singular values above rtol × the largest."""

DEFAULT_DRAWS = 100
"""Bootstrap draws (the full probe set is evaluated in addition)."""

METRICS: tuple[str, ...] = ("variance", "effective_rank", "numerical_rank")
"""The per-layer collapse metrics, in the order of :func:`layer_metrics`' last axis."""

COLUMNS = ["model", "site", "layer", "metric", "mean", "std", "point", "draws"]


def _check_matrix(matrix: torch.Tensor) -> torch.Tensor:
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 or matrix.numel() == 0:
        raise InputError(f"expected a non-empty 2-D tensor, got {getattr(matrix, 'shape', type(matrix).__name__)}")
    if not bool(torch.isfinite(matrix).all()):
        raise InputError("the matrix contains NaN or Inf")
    return matrix.to(torch.promote_types(matrix.dtype, torch.float32))


def spectrum_effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """exp(−Σ p_i log p_i), p_i = σ_i / Σ σ_j, over the last axis (0 log 0 = 0). A zero spectrum gives NaN."""
    p = singular_values / singular_values.sum(-1, keepdim=True)
    entropy = -torch.xlogy(p, p).sum(-1)
    return entropy.exp()


def spectrum_numerical_rank(singular_values: torch.Tensor, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """#{σ_i > rtol · max σ} over the last axis (0 for a zero spectrum)."""
    top = singular_values.max(-1, keepdim=True).values
    return ((singular_values > rtol * top) & (top > 0)).sum(-1)


def _check_rtol(rtol: float) -> None:
    if not 0 < rtol < 1:
        raise ParameterError(f"rtol must lie in (0, 1), got {rtol}")


def effective_rank(matrix: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007) of ``matrix`` as given (no centering): exp of the entropy of
    its normalized singular values. identity(k) → k, rank one → 1. InputError for a zero matrix."""
    s = torch.linalg.svdvals(_check_matrix(matrix))
    if not bool(s.max() > 0):
        raise InputError("the zero matrix has no effective rank (its singular values cannot be normalized)")
    return float(spectrum_effective_rank(s))


def numerical_rank(matrix: torch.Tensor, rtol: float = DEFAULT_RTOL) -> int:
    """#{σ_i > rtol · σ_max} for the singular values of ``matrix`` as given (no centering);
    ``rtol`` defaults to :data:`DEFAULT_RTOL`. The zero matrix has numerical rank 0."""
    _check_rtol(rtol)
    return int(spectrum_numerical_rank(torch.linalg.svdvals(_check_matrix(matrix)), rtol))


def bootstrap_counts(num_groups: int, draws: int, seed: int = 0) -> torch.Tensor:
    """[1 + draws, G] group weights: a row of ones (the full probe set), then ``draws`` multinomial
    resamples of the G groups with replacement (each row sums to G), from a generator seeded ``seed``."""
    if draws < 0:
        raise ParameterError(f"draws must be >= 0, got {draws}")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, num_groups, (draws, num_groups), generator=generator)
    counts = torch.zeros(draws, num_groups, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones(draws, num_groups, dtype=torch.float64)
    )
    return torch.cat([torch.ones(1, num_groups, dtype=torch.float64), counts])


def batched_eigvalsh(matrices: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a batch of symmetric matrices [B, d, d]. On the CPU each matrix is solved on one
    thread and the batch is split over torch's threads: LAPACK's own threading synchronizes at every
    column of the tridiagonal reduction, which gains little on a few cores and stalls badly when the
    cores are shared (timings: benchmarks/README.md)."""
    threads = torch.get_num_threads()
    if matrices.device.type != "cpu" or threads == 1 or matrices.shape[0] < 2:
        return torch.linalg.eigvalsh(matrices)
    chunks = matrices.chunk(threads)
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(chunks)) as pool:
            return torch.cat(list(pool.map(torch.linalg.eigvalsh, chunks)))
    finally:
        torch.set_num_threads(threads)


def covariance_spectra(stats: ActivationStats, site: str, layer: int, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [B, k] float32, traces [B] float64) of the layer's activation covariance C_b under
    each group weighting (row b of ``counts``, [B, G]).

    From the d×d covariances (:meth:`ActivationStats.covariances`; k = d), or, for statistics that kept
    their tokens, from the token side: with token weights w_t = counts[b, group(t)], n_b = Σ w_t,
    m_b = Σ w_t x_t / n_b and Y_b = diag(√(w_t / n_b)) (X − 1 m_bᵀ) over the tokens of positive weight,
    C_b = Y_bᵀ Y_b has the nonzero eigenvalues of the Gram Y_b Y_bᵀ, of size k = the most tokens of a
    draw (shorter draws padded with zero rows, which add zero eigenvalues that no metric counts). A
    bootstrap draw keeps ~63% of the groups, so k ≈ 0.6 n: eigvalsh of a 250×250 Gram instead of a
    576×576 covariance for 20 probe sequences of SmolLM2-135M."""
    if stats.tokens is None:
        cov = stats.covariances(site, layer, counts)
        return batched_eigvalsh(cov), cov.diagonal(dim1=-2, dim2=-1).double().sum(-1)
    x = stats.tokens[site][layer]
    weights = counts.to(device=x.device, dtype=torch.float64)[:, stats.token_groups]  # [B, n]
    kept = [w > 0 for w in weights]
    y = torch.zeros(len(kept), max(int(k.sum()) for k in kept), x.shape[1], dtype=torch.float32, device=x.device)
    for b, (w, k) in enumerate(zip(weights, kept)):
        xb, wb = x[k].double(), w[k] / w[k].sum()
        y[b, : len(wb)] = ((xb - wb @ xb) * wb.sqrt()[:, None]).float()
    side = y @ y.transpose(1, 2) if y.shape[1] <= y.shape[2] else y.transpose(1, 2) @ y
    return batched_eigvalsh(side), side.diagonal(dim1=-2, dim2=-1).double().sum(-1)


def layer_metrics(stats: ActivationStats, site: str, counts: torch.Tensor, rtol: float = DEFAULT_RTOL) -> torch.Tensor:
    """Every metric for every layer under every group weighting: [L, rows of ``counts``, 3] float64,
    the last axis in :data:`METRICS` order (variance, effective rank, numerical rank)."""
    _check_rtol(rtol)
    out = torch.empty(stats.num_layers, counts.shape[0], len(METRICS), dtype=torch.float64)
    for layer in range(stats.num_layers):
        eigenvalues, traces = covariance_spectra(stats, site, layer, counts)
        singular_values = eigenvalues.clamp_min(0).sqrt()
        out[layer, :, 0] = (traces / stats.hidden_size).cpu()
        out[layer, :, 1] = spectrum_effective_rank(singular_values.double()).cpu()
        out[layer, :, 2] = spectrum_numerical_rank(singular_values, rtol).double().cpu()
    return out


def _rows(values: torch.Tensor, model: str, site: str, metrics: Sequence[str]) -> list[dict]:
    """Tidy rows from [L, 1 + draws, M] values: point = row 0, mean/std over the draws (NaN without draws)."""
    draws = values.shape[1] - 1
    rows = []
    for layer in range(values.shape[0]):
        for k, metric in enumerate(metrics):
            sample = values[layer, 1:, k]
            rows.append(dict(
                model=model, site=site, layer=layer, metric=metric,
                mean=float(sample.mean()) if draws else float("nan"),
                std=float(sample.std()) if draws > 1 else float("nan"),
                point=float(values[layer, 0, k]), draws=draws,
            ))
    return rows


def _sites(stats: ActivationStats, sites: Sequence[str] | None) -> tuple[str, ...]:
    chosen = tuple(stats.sites if sites is None else sites)
    for site in chosen:
        stats._check_site(site)
    return chosen


def collapse_metrics(
    stats: ActivationStats,
    *,
    model: str = "model",
    sites: Sequence[str] | None = None,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
) -> pd.DataFrame:
    """Variance, effective rank and numerical rank per layer of one model, bootstrap mean ± std over
    ``draws`` resamples of the probe groups, and the full-probe-set value (``point``)."""
    return draw_table(draw_metrics(stats, sites=sites, draws=draws, seed=seed, rtol=rtol), model)


def draw_table(metrics: "DrawMetrics", model: str = "model") -> pd.DataFrame:
    """The :func:`collapse_metrics` table of a model's :class:`DrawMetrics`."""
    rows = []
    for site, values in metrics.metrics.items():
        rows += _rows(values, model, site, METRICS)
    return pd.DataFrame(rows, columns=COLUMNS)


@dataclass(frozen=True)
class DrawMetrics:
    """One model's :func:`layer_metrics` under the bootstrap draws, per site ([L, 1 + draws, 3] float64
    each), with the probe layout they were captured with (groups, layers, hidden size, sequences per
    group): all that :func:`collapse_ratios` needs of an expert, a few kilobytes where its
    :class:`~karcher_lab.diagnostics.activations.ActivationStats` hold L × G × d² floats."""

    metrics: dict[str, torch.Tensor]
    shape: tuple[int, int, int]
    sequence_counts: torch.Tensor
    draws: int
    seed: int
    rtol: float


def draw_metrics(stats: ActivationStats, *, sites: Sequence[str] | None = None, draws: int = DEFAULT_DRAWS,
                 seed: int = 0, rtol: float = DEFAULT_RTOL) -> DrawMetrics:
    """The :class:`DrawMetrics` of ``stats`` (the draws of :func:`bootstrap_counts` with ``seed``)."""
    counts = bootstrap_counts(stats.num_groups, draws, seed)
    return DrawMetrics({site: layer_metrics(stats, site, counts, rtol) for site in _sites(stats, sites)},
                       (stats.num_groups, stats.num_layers, stats.hidden_size), stats.sequence_counts.cpu(),
                       draws, seed, rtol)


def collapse_ratios(
    merged: ActivationStats,
    experts: Mapping[str, ActivationStats | DrawMetrics] | Sequence[ActivationStats | DrawMetrics],
    weights: Sequence[float] | None = None,
    *,
    model: str = "merged",
    sites: Sequence[str] | None = None,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    rtol: float = DEFAULT_RTOL,
) -> pd.DataFrame:
    """Per layer and metric m, r = m_merged / Σ_i w_i m_i (w normalized to sum 1; equal by default),
    paired per bootstrap draw: the merged model and its experts must have been captured on the same
    probes with the same groups. An expert is given by its activation statistics or by its
    :class:`DrawMetrics` (computed with the same ``draws``, ``seed`` and ``rtol``). Metrics are named
    ``variance_ratio``, ``effective_rank_ratio``, ``numerical_rank_ratio``; below 1 means the merge
    collapsed relative to its experts."""
    given = list(experts.values()) if isinstance(experts, Mapping) else list(experts)
    if not given:
        raise EmptyInputError("collapse_ratios: no expert statistics given")
    w = torch.full((len(given),), 1.0 / len(given), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (len(given),) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise WeightError(f"collapse_ratios: need {len(given)} finite non-negative weights with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    chosen = _sites(merged, sites)
    references = [g if isinstance(g, DrawMetrics) else draw_metrics(g, sites=chosen, draws=draws, seed=seed, rtol=rtol)
                  for g in given]
    layout = (merged.num_groups, merged.num_layers, merged.hidden_size)
    for i, r in enumerate(references):
        if r.shape != layout or not torch.equal(r.sequence_counts, merged.sequence_counts.cpu()):
            raise InputError(
                f"collapse_ratios: expert {i} was captured with (groups, layers, hidden size) {r.shape}, but the "
                f"merged model with {layout}: capture every model on the same probes with the same settings")
        if (r.draws, r.seed, r.rtol) != (draws, seed, rtol) or any(site not in r.metrics for site in chosen):
            raise InputError(f"collapse_ratios: expert {i}'s draw metrics were computed with draws {r.draws}, seed "
                             f"{r.seed}, rtol {r.rtol} at sites {sorted(r.metrics)}; the ratios ask for {draws}, {seed}, "
                             f"{rtol} at {list(chosen)}")
    counts = bootstrap_counts(merged.num_groups, draws, seed)
    rows = []
    for site in chosen:
        reference = sum(wi * r.metrics[site] for wi, r in zip(w.tolist(), references))
        ratio = layer_metrics(merged, site, counts, rtol) / reference
        rows += _rows(ratio, model, site, [f"{m}_ratio" for m in METRICS])
    return pd.DataFrame(rows, columns=COLUMNS)
