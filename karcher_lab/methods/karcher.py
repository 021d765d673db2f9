"""Fisher–Rao Karcher merging with the spherical proxy (the paper's §3; mergekit's ``karcher``).

Per block b (the whole tensor by default, see :mod:`karcher_lab.geometry.blocks`), with experts
x_1 … x_N (or task vectors δ_i = θ_i − θ_0 in task-vector mode) and weights α_i ≥ 0 (the per-model
weights divided by their sum):

1. normalize: n_i = ‖x_i‖, u_i = x_i / n_i (a zero-norm expert has no direction and is dropped);
2. directional barycenter: u* = weighted spherical Karcher mean of the u_i, by the fixed point of
   eq. 5, v = Σ α_i Log_u(u_i), u ← Exp_u(η v), until ‖v‖ < tol (first-order condition, eq. 4);
3. norm preservation (§3.4): θ* = (Σ α̂_i n_i) · u*, the weighted mean norm of the experts,
   with α̂ the weights renormalized over the experts that contribute a direction.

With a base and ``task_vectors: true`` steps 1–3 apply to δ_i and θ_0 is added back:
θ* = θ_0 + (Σ α̂_i ‖δ_i‖) · KarcherMean(δ_i/‖δ_i‖).

All of it runs in coefficient space (:mod:`karcher_lab.geometry.karcher_mean`): one float64 Gram pass
over the data, the iteration on N×N matrices, one combining pass; iterations are therefore free, and
the default runs to convergence. For ``block`` 'tensor' or 'column' without ``fisher`` the Gram of a
tensor is the sum of its row slices' Grams and the combination is row-wise, so a large tensor can be
merged a slice of rows at a time (:class:`~karcher_lab.methods.api.RowSlices`).

Parameters: ``max_iter`` (1000) and ``tol`` (1e-7) end step 2 (at most max_iter steps, or once
‖v‖ < tol; ``tol`` is only this stopping rule), ``eta`` is its step size η ∈ (0, 1] and ``init`` its
start ('chord': the normalized weighted chord mean Σ α_i u_i, or 'first': the first contributing
expert); ``block`` is the unit normalized onto the sphere ('tensor', 'row' or 'column');
``task_vectors`` selects task-vector mode; ``norm_average`` is the set of experts step 3 averages the
norm over ('contributing', or 'all', zero norms included); ``fisher`` and ``fisher_floor``: below.

Fisher preconditioning (the paper's §3.4: diagonal Fisher estimates "as a natural-gradient-style
preconditioning inside the log map"), the option ``fisher`` (one diagonal Fisher per model, e.g. from
:func:`karcher_lab.diagnostics.diagonal_fisher`, as for the ``fisher`` method): per block, with
F̄ = Σ α_i max(F_i, fisher_floor) / Σ α_i, map x ↦ √F̄ ⊙ x, take steps 1–3 there (the sphere of the
Fisher-weighted norm ‖x‖_F̄ = √(Σ F̄ x²), whose norm is preserved), and map back by √F̄⁻¹. The mean
there is a combination Σ_j k_j √F̄ ⊙ x_j, so mapping back gives Σ_j k_j x_j: only the Gram changes,
to G_ij = Σ_e F̄_e x_ie x_je (:func:`fisher_metric`, the ``metric`` of
:func:`~karcher_lab.geometry.karcher_mean.gram_matrix`). A uniform F̄ gives plain karcher exactly.
As F̄ is linear in α, so is that Gram: G(α) = Σ_k ᾱ_k G^(k) with G^(k) the Gram under max(F_k, floor)
(:func:`fisher_grams`, :func:`mix_fisher_grams`), which lets a cache re-weight without the data.
Not in mergekit.

Where and why this differs from mergekit 0.1.5's ``karcher``: docs/methods.md.
"""
from __future__ import annotations

import torch

from karcher_lab.errors import InputError, ParameterError
from karcher_lab.geometry.blocks import BLOCK_GRANULARITIES
from karcher_lab.geometry.karcher_mean import (
    KARCHER_INITS,
    KarcherTrace,
    block_norms,
    combine,
    contributing_weights,
    gram_matrix,
    karcher_coefficients,
)
from karcher_lab.checks import where
from karcher_lab.methods.api import MergeCall, check_finite
from karcher_lab.methods.fisher import check_fishers
from karcher_lab.methods.registry import Param, TwoPhase, register

NORM_AVERAGES: tuple[str, ...] = ("contributing", "all")
"""Output norm: weighted mean over experts with a direction (default) or over all experts (mergekit)."""


def output_norms(gram: torch.Tensor, weights: torch.Tensor, norm_average: str) -> torch.Tensor:
    """Per block, the norm the merged block is given (§3.4): Σ α̂_i n_i over contributing experts
    ('contributing'), or Σ α_i n_i / Σ α_i over all experts, zero norms included ('all', mergekit)."""
    norms = block_norms(gram)
    if norm_average == "all":
        return (norms * weights.to(norms)).sum(-1) / float(weights.sum())
    return (norms * contributing_weights(gram, weights)).sum(-1)


def prepare_gram(call: MergeCall) -> torch.Tensor:
    """The weight-independent phase: G = gram_matrix(x [− θ_0]) ``[B, N, N]``, or with ``fisher`` one
    Gram per Fisher, G^(k) ``[N, B, N, N]`` (:func:`fisher_grams`), which :func:`solve_from_gram` mixes."""
    p, name = call.params, call.context["name"]
    center = call.context["base"] if p["task_vectors"] else None
    if p["fisher"] is None:
        return checked_gram(call.tensors, p["block"], center=center, name=name)
    return fisher_grams(call.tensors, p["fisher"], p["block"], center=center, floor=p["fisher_floor"], name=name)


def solve_from_gram(gram: torch.Tensor, call: MergeCall) -> tuple[torch.Tensor, KarcherTrace]:
    """The weighted phase, from :func:`prepare_gram`'s state: the same result as :func:`karcher`."""
    p, weights, name = call.params, call.context["weights"], call.context["name"]
    if p["fisher"] is not None:
        gram = mix_fisher_grams(gram, weights, name)
    return karcher_from_gram(
        call.tensors, gram, weights, center=call.context["base"] if p["task_vectors"] else None, block=p["block"],
        eta=p["eta"], max_iter=p["max_iter"], tol=p["tol"], init=p["init"], norm_average=p["norm_average"], name=name,
    )


@register(
    "karcher",
    summary="Fisher–Rao Karcher mean with the spherical proxy: Karcher mean of directions × mean norm.",
    params=(
        Param("max_iter", int, 1000, low=0, doc="most fixed-point steps (mergekit's default is 10)"),
        Param("tol", float, 1e-7, low=0.0, doc="stop when ‖Σ α_i Log_u(u_i)‖ < tol (mergekit: 1e-5)"),
        Param("eta", float, 1.0, doc="step size η ∈ (0, 1] of u ← Exp_u(η v) (eq. 5)", slider=(0.05, 1.0, 0.05)),
        Param("block", str, "tensor", choices=BLOCK_GRANULARITIES,
              doc="unit normalized onto the sphere: whole tensor, each row, or each column"),
        Param("init", str, "chord", choices=KARCHER_INITS,
              doc="start: normalized weighted chord mean, or the first contributing expert"),
        Param("task_vectors", bool, False, doc="merge δ_i = θ_i − θ_0 and add the base back (needs a base)"),
        Param("norm_average", str, "contributing", choices=NORM_AVERAGES,
              doc="output norm averaged over experts with a direction, or over all (mergekit)"),
        Param("fisher", object, None, per_model=True,
              doc="per-model diagonal Fisher tensors (the tensor's shape): Fisher-preconditioned karcher (§3.4)"),
        Param("fisher_floor", float, 1e-6, doc="lower bound applied to every Fisher entry (> 0)"),
    ),
    base="optional",
    base_mode="task_vectors",
    weights="nonnegative",
    min_models=1,
    returns_trace=True,
    checks_finite=True,
    reads_narrow=True,
    two_phase=TwoPhase(
        prepare=prepare_gram, solve=solve_from_gram, prepared_by=("block", "task_vectors", "fisher", "fisher_floor"),
        row_separable=lambda p: p["block"] != "row" and p["fisher"] is None,
    ),
    paper="Functionality-Oriented LLM Merging on the Fisher–Rao Manifold (arXiv:2603.04972), §3",
)
def karcher(
    tensors: list[torch.Tensor],
    *,
    weights: torch.Tensor,
    base: torch.Tensor | None,
    name: str | None,
    max_iter: int,
    tol: float,
    eta: float,
    block: str,
    init: str,
    task_vectors: bool,
    norm_average: str,
    fisher: list[torch.Tensor] | None,
    fisher_floor: float,
) -> tuple[torch.Tensor, KarcherTrace]:
    """θ* = (Σ α̂_i n_i) · KarcherMean_α(x_i/n_i) per block (x_i = θ_i, or δ_i = θ_i − θ_0 plus θ_0
    in task-vector mode); with ``fisher``, norms and angles are those of ‖·‖_F̄ (module docstring).
    Returns the merged tensor and the solver's :class:`KarcherTrace`.

    With two experts and η = 1 (chord start) this is SLERP at t = α_2 with the norm interpolated
    linearly; a base is used only when ``task_vectors`` is true. NaN/Inf in the models (or the base in
    task-vector mode) are found through the Gram diagonal (:func:`checked_gram`), not a pass of their own.
    """
    metric = fisher_metric(fisher, weights, tensors[0], fisher_floor, name) if fisher is not None else None
    center = base if task_vectors else None
    gram = checked_gram(tensors, block, center=center, metric=metric, name=name)
    return karcher_from_gram(
        tensors, gram, weights, center=center, block=block, eta=eta, max_iter=max_iter, tol=tol,
        init=init, norm_average=norm_average, name=name,
    )


def karcher_from_gram(
    tensors: list[torch.Tensor],
    gram: torch.Tensor,
    weights: torch.Tensor,
    *,
    center: torch.Tensor | None,
    block: str,
    eta: float,
    max_iter: int,
    tol: float,
    init: str,
    norm_average: str,
    name: str | None,
) -> tuple[torch.Tensor, KarcherTrace]:
    """Steps 2–3 given step 1's Gram (``gram_matrix(tensors, block, center=center)``, possibly cached):
    solve eq. 5 in coefficient space, rescale to the mean norm, and form the result in one pass.

    With ``center`` = θ_0: θ_0 + Σ k_j (θ_j − θ_0) = Σ k_j θ_j + (1 − Σ k_j) θ_0, so no task-vector
    copies are made.
    """
    coeffs, trace = karcher_coefficients(
        gram, weights, eta=eta, max_iter=max_iter, tol=tol, init=init, name=name
    )
    coeffs = coeffs * output_norms(gram, weights, norm_average).unsqueeze(-1)
    if center is None:
        return combine(tensors, coeffs, block), trace
    with_base = torch.cat([coeffs, 1.0 - coeffs.sum(-1, keepdim=True)], dim=-1)
    return combine([*tensors, center], with_base, block), trace


def checked_gram(
    tensors: list[torch.Tensor],
    block: str,
    *,
    center: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """:func:`~karcher_lab.geometry.karcher_mean.gram_matrix` with the NaN/Inf check of the inputs
    folded in: G_ii = Σ_e m_e (x_ie − θ_0e)² is finite exactly when every entry of x_i (and θ_0) is
    (the metric m is checked finite and positive beforehand; float32/bf16/fp16 values cannot overflow
    its float64 sum), so the exact per-model check, which names the culprit, runs only when G is not
    finite. One read of the data instead of two."""
    gram = gram_matrix(tensors, block, center=center, metric=metric)
    if not bool(torch.isfinite(gram).all()):
        check_finite(tensors, center, name)
        raise InputError(f"{where(name)}the Gram matrix of finite inputs overflows float64 (values near 1e154)")
    return gram


def _fisher_weights(weights: torch.Tensor, n: int, name: str | None) -> torch.Tensor:
    """ᾱ = α / Σ α as float64 [n] (per-model weights only: F̄ is one tensor)."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
    if w.numel() != n:
        raise ParameterError(f"{where(name)}karcher: got {n} Fishers for {w.numel()} models")
    return w / w.sum()


def fisher_metric(
    fisher: list[torch.Tensor], weights: torch.Tensor, like: torch.Tensor, floor: float = 1e-6, name: str | None = None
) -> torch.Tensor:
    """F̄ = Σ α_i max(F_i, floor) / Σ α_i, on ``like``'s device in its dtype widened to at least float32:
    the diagonal metric of the Fisher-preconditioned karcher. The Fishers are checked first (count,
    shape, finite, non-negative)."""
    alpha = _fisher_weights(weights, len(fisher), name)
    check_fishers(fisher, like.shape, name, floor=floor, method="karcher")
    mean = torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32))
    for f, a in zip(fisher, alpha.tolist()):
        if a > 0:
            mean.add_(f.to(mean).clamp_min(floor), alpha=a)
    return mean


def fisher_grams(
    tensors: list[torch.Tensor],
    fisher: list[torch.Tensor],
    block: str,
    *,
    center: torch.Tensor | None = None,
    floor: float = 1e-6,
    name: str | None = None,
) -> torch.Tensor:
    """G^(k)[b, i, j] = Σ_e max(F_k, floor)_e x_ie x_je per block, one Gram per Fisher: ``[N, B, N, N]``
    float64 (N data passes). :func:`mix_fisher_grams` turns them into the Gram of F̄ for any weights."""
    check_fishers(fisher, tensors[0].shape, name, floor=floor, method="karcher")
    return torch.stack([
        checked_gram(tensors, block, center=center, name=name,
                     metric=f.to(tensors[0].device, torch.promote_types(tensors[0].dtype, torch.float32)).clamp_min(floor))
        for f in fisher
    ])


def mix_fisher_grams(grams: torch.Tensor, weights: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Σ_k ᾱ_k G^(k) = the Gram under F̄ = Σ_k ᾱ_k max(F_k, floor): the metric is linear in the weights."""
    alpha = _fisher_weights(weights, grams.shape[0], name).to(grams.device)
    return torch.tensordot(alpha, grams, dims=1)
