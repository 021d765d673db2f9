"""Fixed-rank matrices as a quotient manifold: the polar factorization ΔW = U B Vᵀ (GeoMerge paper §2.2–§3.6).

A rank-r update ΔW ∈ ℝ^{d1×d2}, stored as LoRA factors ΔW = G Hᵀ (G: d1×r, H: d2×r; GL(r) symmetry
(G A⁻¹, H Aᵀ)), is written in polar form (eq. 3)

    ΔW = U B Vᵀ,   U ∈ St(d1, r),  B ∈ S++(r),  V ∈ St(d2, r),

a point of the total space M̄ = St(d1, r) × S++(r) × St(d2, r) with the product of the canonical
Stiefel metric (:mod:`~karcher_lab.geometry.stiefel`) and the affine-invariant SPD metric
(:mod:`~karcher_lab.geometry.spd`). The polar factors are unique up to the O(r) action
(U, B, V)·O = (U O, Oᵀ B O, V O), which is isometric, so ΔW is a point of the quotient M̄/O(r).

- **Polar factors without d1×d2 matrices** (:func:`polar_from_factors`): G = Q_G R_G, H = Q_H R_H
  (thin QR), core R_G R_Hᵀ = P Σ Zᵀ (r×r SVD), then U = Q_G P, B = Σ, V = Q_H Z, so that
  U B Vᵀ = Q_G (R_G R_Hᵀ) Q_Hᵀ = G Hᵀ. Cost O((d1 + d2) r² + r³). A core with σ_r ≤ rank_rtol·σ_1
  means ΔW has rank < r: ManifoldError.
- **Vertical space** at (U, B, V): the orbit directions vert(Ω) = (U Ω, B Ω − Ω B, V Ω), Ω skew.
- **Horizontal projection** (§2): ξ_h = ξ − vert(Ω) with the skew Ω solving
      B⁻¹ Ω B + B Ω B⁻¹ − Ω = ½(Uᵀ ξ_U + Vᵀ ξ_V) − (B⁻¹ ξ_B − ξ_B B⁻¹),
  obtained from ⟨ξ − vert(Ω), vert(Ω')⟩ = 0 for every skew Ω' (canonical metric: ⟨ξ_U, U Ω'⟩ =
  ½⟨Uᵀξ_U, Ω'⟩_F; affine-invariant: ⟨ξ_B, BΩ' − Ω'B⟩_B = ⟨ξ_B B⁻¹ − B⁻¹ξ_B, Ω'⟩_F). In the eigenbasis
  B = P diag(λ) Pᵀ the operator is diagonal: (λ_i/λ_j + λ_j/λ_i − 1) Ω̃_ij = R̃_ij, and the coefficient
  is ≥ 1, so Ω̃ = R̃ / (λ_i/λ_j + λ_j/λ_i − 1) exactly, in closed form (no iterative solver).
  ‖vert(Ω)‖² = Σ_ij (λ_i/λ_j + λ_j/λ_i − 1) Ω̃_ij².
- **Alignment** (eq. 2, eq. 10): O* = argmin_{O ∈ O(r)} d(μ, θ·O)², where d is the total-space
  geodesic distance. There is no closed form (the Stiefel parts need the iterative log), so
  :func:`align` minimizes it numerically, in r×r coordinates only: with Y = U_θ O the frame
  [U_μ, Q] of :func:`stiefel.coordinates` is the same for every O, the Stiefel logs run on
  (M O, N O), and U_μᵀ ξ_U = A, ‖ξ_U‖² = ½‖A‖² + ‖B‖² need no d-dimensional product. The gradient
  along O ← O expm(Ω) is ⟨R, Ω⟩_F with R the right-hand side of the Ω equation above (first variation
  formula + isometric action), and the minimizer is where Log_μ(θ·O*) is horizontal (§2.1).
  Start: the better (by the true d) of two closed-form candidates, each equivariant under
  θ ↦ θ·O' (so the result is too): (a) orthogonal Procrustes on the chordal cross term,
  O = polar(U_θᵀU_μ + V_θᵀV_μ) (exact for the embedded Stiefel distance); (b) eigenvector matching of
  the SPD parts, O = P_θ D P_μᵀ with both eigenbases in the same order and the signs D chosen by the
  same cross term (exact for the SPD term, minimized when OᵀB_θO and B_μ share eigenvectors with
  ordered eigenvalues). Or, warm (inputs already aligned to a nearby point), the identity, with the
  Stiefel logs warm-started. Then L-BFGS on O(r) whose initial inverse Hessian is the inverse vertical
  metric c⁻¹ (so its first step is the Gauss–Newton step that removes the vertical part of the log in
  a flat space), with Armijo backtracking, until ‖vert part of Log_μ(θ·O)‖ < tol. L-BFGS rather than
  plain Gauss–Newton steps, because those stall where the Stiefel parts are far apart: there d barely
  depends on O, while the model curvature c stays ≥ 1.
- **Quotient distance** (eq. 1, 7): d([μ], [θ]) = min_O d(μ, θ·O) = d(μ, θ·O*).

Points and tangents are :class:`Polar` / :class:`PolarTangent` named tuples of float64 tensors with
optional leading batch axes. Everything is float64. The functions that need the eigendecomposition of a
point's B take ``cache``, an :class:`~karcher_lab.geometry.spd.EighCache` through which a solver reuses
it across calls (one cache per solve).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from karcher_lab import checks
from karcher_lab.errors import ConvergenceError, ManifoldError, NonFiniteError, ShapeMismatchError
from karcher_lab.geometry import spd, stiefel
from karcher_lab.geometry.numerics import all_finite, single_threaded

RANK_RTOL = 1e-10
"""A core with σ_r ≤ RANK_RTOL · σ_1 counts as rank-deficient (ΔW has rank < r)."""

ALIGN_TOL = 1e-10
"""Default stopping threshold of :func:`align` on ‖vert part of Log_μ(θ·O)‖_μ."""

ALIGN_MAX_ITER = 100
"""Default iteration cap of :func:`align`."""

F64 = torch.float64


class Polar(NamedTuple):
    """A point (U, B, V) of St(d1, r) × S++(r) × St(d2, r), representing ΔW = U B Vᵀ."""

    U: torch.Tensor
    B: torch.Tensor
    V: torch.Tensor


class PolarTangent(NamedTuple):
    """A tangent vector (ξ_U, ξ_B, ξ_V) at a :class:`Polar` point (ξ_B symmetric)."""

    U: torch.Tensor
    B: torch.Tensor
    V: torch.Tensor


def check_factors(g: torch.Tensor, h: torch.Tensor, name: str = "factors") -> None:
    """Raise unless G [..., d1, r] and H [..., d2, r] are finite float tensors with one r ≤ min(d1, d2)."""
    for label, x in (("G", g), ("H", h)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ShapeMismatchError(f"{name}: {label} must be a floating-point tensor, got {type(x).__name__}")
        if x.ndim < 2 or x.shape[-1] == 0:
            raise ShapeMismatchError(f"{name}: {label} must be [..., d, r] with r ≥ 1, got shape {tuple(x.shape)}")
    if g.shape[-1] != h.shape[-1]:
        raise ShapeMismatchError(f"{name}: G has rank {g.shape[-1]} columns but H has {h.shape[-1]} (ΔW = G Hᵀ)")
    if g.shape[:-2] != h.shape[:-2]:
        raise ShapeMismatchError(f"{name}: batch shapes differ, {tuple(g.shape[:-2])} vs {tuple(h.shape[:-2])}")
    r, d1, d2 = g.shape[-1], g.shape[-2], h.shape[-2]
    if r > min(d1, d2):
        raise ShapeMismatchError(f"{name}: rank r = {r} exceeds min(d1, d2) = {min(d1, d2)} (G {d1}×{r}, H {d2}×{r})")
    for label, x in (("G", g), ("H", h)):
        if not all_finite(x):
            raise NonFiniteError(f"{name}: {label} contains NaN or Inf")


def polar_from_factors(
    g: torch.Tensor, h: torch.Tensor, *, rank_rtol: float = RANK_RTOL, name: str = "factors"
) -> Polar:
    """Polar factors (U, B, V) of ΔW = G Hᵀ (eq. 3), computed from thin QRs and an r×r SVD (see module doc).

    B is returned diagonal (the singular values of ΔW, descending): one representative of the O(r) orbit.
    Raises ManifoldError when ΔW has rank < r (σ_r ≤ rank_rtol·σ_1, or ΔW = 0).
    """
    check_factors(g, h, name)
    qg, rg = torch.linalg.qr(g.to(F64))
    qh, rh = torch.linalg.qr(h.to(F64))
    p, sigma, zt = torch.linalg.svd(rg @ rh.mT)
    low = sigma[..., -1] <= rank_rtol * sigma[..., 0]
    if bool(low.any()) or bool((sigma[..., 0] == 0).any()):
        ratio = float((sigma[..., -1] / sigma[..., 0].clamp_min(torch.finfo(F64).tiny)).min())
        raise ManifoldError(
            f"{name}: ΔW = G Hᵀ has rank below r = {g.shape[-1]} (σ_r/σ_1 = {ratio:.3g} ≤ {rank_rtol:g}); "
            "the fixed-rank geometry needs full-rank factors (drop the dead LoRA directions or lower r)"
        )
    return Polar(qg @ p, torch.diag_embed(sigma), qh @ zt.mT)


def factors_from_polar(point: Polar) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced LoRA factors of U B Vᵀ: with B = P diag(λ) Pᵀ (λ descending), G = U P √Λ, H = V P √Λ.

    G Hᵀ = U B Vᵀ, and (U P) diag(λ) (V P)ᵀ is the SVD of ΔW, so the columns come in the order of ΔW's
    singular values and ‖G e_k‖ = ‖H e_k‖ = √σ_k.
    """
    lam, p = spd.eigh_spd(point.B, "B")
    lam, p = lam.flip(-1), p.flip(-1)
    root = lam.sqrt().unsqueeze(-2)
    return point.U.to(F64) @ p * root, point.V.to(F64) @ p * root


def dense(point: Polar) -> torch.Tensor:
    """U B Vᵀ as a d1×d2 matrix (for small sizes and tests)."""
    return point.U @ point.B @ point.V.mT


def act(point: Polar, o: torch.Tensor) -> Polar:
    """The O(r) action (U, B, V)·O = (U O, Oᵀ B O, V O)."""
    return Polar(point.U @ o, spd.sym(o.mT @ point.B @ o), point.V @ o)


def vertical(point: Polar, omega: torch.Tensor) -> PolarTangent:
    """The vertical vector vert(Ω) = (U Ω, B Ω − Ω B, V Ω) for a skew Ω: d/dt (point·expm(tΩ)) at t = 0."""
    return PolarTangent(point.U @ omega, point.B @ omega - omega @ point.B, point.V @ omega)


def inner(point: Polar, xi: PolarTangent, zeta: PolarTangent, *, cache: spd.EighCache | None = None) -> torch.Tensor:
    """Product metric ⟨ξ, ζ⟩ = ⟨ξ_U, ζ_U⟩_U^can + ⟨ξ_B, ζ_B⟩_B^AI + ⟨ξ_V, ζ_V⟩_V^can.

    Points and tangents here are float64 and produced by this module, so the Stiefel parts skip the
    per-call checks (this runs inside the solver's inner loops); B is checked by its eigendecomposition.
    """
    return (
        stiefel.canonical_inner(point.U, xi.U, zeta.U)
        + spd.inner(point.B, xi.B, zeta.B, cache=cache).to(F64)
        + stiefel.canonical_inner(point.V, xi.V, zeta.V)
    )


def norm(point: Polar, xi: PolarTangent, *, cache: spd.EighCache | None = None) -> torch.Tensor:
    """‖ξ‖ in the product metric."""
    return inner(point, xi, xi, cache=cache).clamp_min(0).sqrt()


def _vertical_metric(lam: torch.Tensor) -> torch.Tensor:
    """c_ij = λ_i/λ_j + λ_j/λ_i − 1 ≥ 1: ‖vert(Ω)‖² = Σ_ij c_ij Ω̃_ij² in the eigenbasis of B (module doc)."""
    return lam.unsqueeze(-1) / lam.unsqueeze(-2) + lam.unsqueeze(-2) / lam.unsqueeze(-1) - 1.0


def _omega_rhs(lam: torch.Tensor, p: torch.Tensor, ut_xi: torch.Tensor, vt_xi: torch.Tensor, xi_b: torch.Tensor):
    """R = skew(½(Uᵀξ_U + Vᵀξ_V)) + ξ_B B⁻¹ − B⁻¹ξ_B, the right-hand side of the §2 Ω equation, from
    Uᵀξ_U, Vᵀξ_V, ξ_B and B = P diag(λ) Pᵀ ((ξ_B B⁻¹ − B⁻¹ξ_B)~_ij = ξ̃_ij (1/λ_j − 1/λ_i)). It is also the
    Frobenius gradient of O ↦ ½ d(μ, θ·O)² when ξ = Log_μ(θ·O) (see :class:`_OrbitObjective`)."""
    bt = p.mT @ spd.sym(xi_b) @ p
    inv = 1.0 / lam
    return stiefel.skew(0.5 * (ut_xi + vt_xi) + p @ (bt * (inv.unsqueeze(-2) - inv.unsqueeze(-1))) @ p.mT)


def vertical_generator(point: Polar, xi: PolarTangent, *, cache: spd.EighCache | None = None) -> torch.Tensor:
    """The skew Ω with ξ − vert(Ω) horizontal: the solution of the §2 equation (closed form, module doc)."""
    lam, p = spd.eigh_spd(point.B, "B", cache=cache)
    rhs = _omega_rhs(lam, p, point.U.mT @ xi.U, point.V.mT @ xi.V, xi.B)
    return stiefel.skew(p @ ((p.mT @ rhs @ p) / _vertical_metric(lam)) @ p.mT)


def horizontal(point: Polar, xi: PolarTangent, *, cache: spd.EighCache | None = None) -> PolarTangent:
    """Orthogonal projection of ξ onto the horizontal space: ξ − vert(Ω), Ω from :func:`vertical_generator`."""
    v = vertical(point, vertical_generator(point, xi, cache=cache))
    return PolarTangent(xi.U - v.U, xi.B - v.B, xi.V - v.V)


def transport(point: Polar, target: Polar, xi: PolarTangent, *, cache: spd.EighCache | None = None) -> PolarTangent:
    """Vector transport from T_point to the horizontal space at ``target`` by orthogonal projection:
    the Stiefel parts onto T St at target.U / target.V, the (symmetric) SPD part unchanged, then
    :func:`horizontal` at ``target``. Used by the L-BFGS variant of the Fréchet solver."""
    moved = PolarTangent(stiefel.tangent_part(target.U, xi.U), spd.sym(xi.B), stiefel.tangent_part(target.V, xi.V))
    return horizontal(target, moved, cache=cache)


def exp(point: Polar, xi: PolarTangent, *, cache: spd.EighCache | None = None) -> Polar:
    """Product exponential (Stiefel Exp of eq. 5 on U and V, SPD Exp of eq. 4a on B)."""
    return Polar(
        stiefel.exp(point.U, xi.U).to(F64),
        spd.exp(point.B, xi.B, cache=cache).to(F64),
        stiefel.exp(point.V, xi.V).to(F64),
    )


def log(
    point: Polar,
    other: Polar,
    *,
    tol: float = stiefel.LOG_TOL,
    max_iter: int = stiefel.LOG_MAX_ITER,
    cache: spd.EighCache | None = None,
) -> PolarTangent:
    """Total-space logarithm (Stiefel Log on U and V, SPD Log of eq. 4b on B); horizontal only if aligned.

    ``tol`` and ``max_iter`` are the Stiefel log's; raises ConvergenceError if it does not converge.
    """
    return PolarTangent(
        stiefel.log(point.U, other.U, tol=tol, max_iter=max_iter).to(F64),
        spd.log(point.B, other.B, cache=cache).to(F64),
        stiefel.log(point.V, other.V, tol=tol, max_iter=max_iter).to(F64),
    )


def dist(point: Polar, other: Polar, *, cache: spd.EighCache | None = None, **log_params) -> torch.Tensor:
    """Total-space geodesic distance ‖Log_point(other)‖ (depends on the representatives)."""
    return norm(point, log(point, other, cache=cache, **log_params), cache=cache)


@dataclass(frozen=True)
class Alignment:
    """Result of :func:`align`, per batch entry: the rotation ``O``, the aligned representative
    ``aligned`` = other·O, its total-space log from the reference point (``log``, horizontal to
    ``residuals`` = ‖vert part of the log‖), the alignment steps taken (``iterations``, max over the
    batch), ``log_starts``: the Stiefel logs' final completions (U's then V's), a warm start for the
    next alignment of ``aligned`` to a nearby point, ``log_fallback`` [2N] (U's then V's): the
    Stiefel logs of ``log`` that are the projection surrogate (only with ``log_surrogate``), and
    ``surrogates``: how many surrogate Stiefel logs the alignment computed in all (closed-form candidates
    and rejected line-search trials included)."""

    O: torch.Tensor
    aligned: Polar
    log: PolarTangent
    iterations: int
    residuals: torch.Tensor
    tol: float | torch.Tensor
    log_starts: torch.Tensor
    log_fallback: torch.Tensor
    surrogates: int

    @property
    def converged(self) -> bool:
        """Every entry reached ‖vert part of the log‖ < tol."""
        return bool((self.residuals < self.tol).all())


LBFGS_MEMORY = 8
"""Pairs kept by the alignment's L-BFGS."""

LOG_TOL_FRACTION = 1e-2
"""The Stiefel logs inside :func:`align` stop at max(log_tol, LOG_TOL_FRACTION × the alignment tol): their
error enters the gradient linearly, so they need be only this much finer than the alignment."""

LOG_TOL_RESIDUAL = 1e-3
"""Far from the orbit minimum the Stiefel logs of an alignment step stop at LOG_TOL_RESIDUAL × residual²
where that is above their threshold: their error then moves ½d² by ~1e-3 of the decrease the Armijo test
looks for, and the gradient by less, while the logs of the far iterates take a few Zimmermann steps fewer."""

LINE_SEARCH_HALVINGS = 30
"""Backtracking halvings tried per alignment step before giving up on that step."""


def _polar_of(k: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Zᵀ of K = P S Zᵀ: argmax_O tr(Oᵀ K)."""
    p, _, zt = torch.linalg.svd(k)
    return p @ zt


def _closed_form_candidates(point: Polar, other: Polar, cache: spd.EighCache) -> list[torch.Tensor]:
    """Procrustes on U_θᵀU_μ + V_θᵀV_μ, and SPD eigenvector matching with signs from that cross term."""
    cross = other.U.mT @ point.U + other.V.mT @ point.V
    _, p_mu = spd.eigh_spd(point.B, "B", cache=cache)
    _, p_th = spd.eigh_spd(other.B, "B")
    diag = torch.diagonal(p_th.mT @ cross @ p_mu, dim1=-2, dim2=-1)
    signs = torch.where(diag < 0, -1.0, 1.0).to(F64)
    return [_polar_of(cross), (p_th * signs.unsqueeze(-2)) @ p_mu.mT]


def _select(mask: torch.Tensor, a, b):
    """Entrywise (over the leading batch axis) choice between tensors or tuples of tensors."""
    if isinstance(a, tuple):
        parts = [_select(mask, x, y) for x, y in zip(a, b)]
        return type(a)(*parts) if hasattr(a, "_fields") else tuple(parts)
    if not isinstance(a, torch.Tensor):
        return a
    mask = mask.repeat(a.shape[0] // mask.shape[0])  # the [2N] batches of U and V logs: U's then V's
    return torch.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, b)


def _put_rows(t: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its entries ``rows`` (leading axis) replaced by ``values``."""
    out = t.clone()
    out[rows] = values
    return out


def _lbfgs_direction(grad, history, precondition, dot) -> torch.Tensor:
    """−H grad by the L-BFGS two-loop recursion (batched; pairs with sᵀy ≤ 0 are skipped per entry),
    initial H = γ c⁻¹ with γ = sᵀy / yᵀc⁻¹y from the newest pair (c⁻¹ alone, i.e. Gauss–Newton, without)."""
    q = grad
    alphas = []
    for s_k, y_k, sy in reversed(history):
        rho = torch.where(sy > 0, 1.0 / torch.where(sy > 0, sy, 1.0), 0.0)
        a = rho * dot(s_k, q)
        alphas.append(a)
        q = q - a[:, None, None] * y_k
    r = precondition(q)
    if history:
        s_k, y_k, sy = history[-1]
        yhy = dot(y_k, precondition(y_k))
        gamma = torch.where((sy > 0) & (yhy > 0), sy / torch.where(yhy > 0, yhy, 1.0), 1.0)
        r = gamma[:, None, None] * r
    for (s_k, y_k, sy), a in zip(history, reversed(alphas)):
        rho = torch.where(sy > 0, 1.0 / torch.where(sy > 0, sy, 1.0), 0.0)
        b = rho * dot(y_k, r)
        r = r + (a - b)[:, None, None] * s_k
    return -stiefel.skew(r)


class _OrbitObjective:
    """O ↦ ½ d(μ, θ·O)² and its gradient, in r×r coordinates only.

    With (M, Q, N) = stiefel.coordinates(U_μ, U_θ), the frame Q also serves U_θ O, with (M O, N O), so
    Log_{U_μ}(U_θ O) = U_μ A + Q B comes from :func:`stiefel.log_coordinates` on r×r blocks; then
    U_μᵀ ξ_U = A and ‖ξ_U‖² = ½‖A‖² + ‖B‖². The Frobenius gradient along O ← O expm(Ω) is, by the first
    variation formula and the isometric action, ⟨ξ, vert(Ω)⟩ = ⟨R, Ω⟩_F with
    R = skew(½(A_U + A_V)) + ξ_B B⁻¹ − B⁻¹ ξ_B: the right-hand side of the §2 Ω equation.
    """

    def __init__(
        self, point: Polar, other: Polar, log_tol: float, log_max_iter: int, log_surrogate: bool, cache: spd.EighCache
    ):
        self.point, self.other, self.cache = point, other, cache
        (m_u, self.q_u, n_u), (m_v, self.q_v, n_v) = (
            stiefel.coordinates(point.U, other.U),
            stiefel.coordinates(point.V, other.V),
        )
        self.m, self.n = torch.cat([m_u, m_v]), torch.cat([n_u, n_v])  # U and V logs as one batch [2N, r, r]
        self.lam, self.p = spd.eigh_spd(point.B, "B", cache=cache)
        self.log_params = dict(tol=log_tol, max_iter=log_max_iter, surrogate=log_surrogate)
        self.surrogates = 0  # surrogate Stiefel logs over every evaluation (candidates and rejected trials too)

    def __call__(self, o: torch.Tensor, start: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                 log_floor: torch.Tensor | None = None):
        """(½ d², gradient R, state) at O; state = (A_U, B_U, A_V, B_V, ξ_B, fallback [2N] (the Stiefel logs, U's
        then V's, that got the projection surrogate), completions [2N, 2r, r]). With ``rows`` (int64 [K]), only
        those entries: ``o`` [K, r, r], ``start`` [2K, 2r, r] (U's then V's), everything returned for them.
        ``log_floor`` [K]: per entry a looser Stiefel log threshold than the objective's, where larger."""
        m, n, lam, p, b_point, b_other, log_params = (
            self.m, self.n, self.lam, self.p, self.point.B, self.other.B, self.log_params
        )
        if rows is not None:
            both = torch.cat([rows, rows + self.m.shape[0] // 2])
            m, n, b_other = m[both], n[both], b_other[rows]
            if lam.ndim > 1:  # one reference point per entry
                lam, p, b_point = lam[rows], p[rows], b_point[rows]
            if isinstance(log_params["tol"], torch.Tensor):
                log_params = dict(log_params, tol=log_params["tol"][both])
        if log_floor is not None:
            log_params = dict(log_params, tol=torch.cat([log_floor, log_floor]).clamp_min(log_params["tol"]))
        o2 = torch.cat([o, o])
        a, b, completion, info = stiefel.log_coordinates(m @ o2, n @ o2, start=start, **log_params)
        if not info.converged:
            raise stiefel.not_converged_error(info)
        (a_u, a_v), (b_u, b_v) = a.chunk(2), b.chunk(2)
        xi_b = spd.log(b_point, spd.sym(o.mT @ b_other @ o), cache=self.cache).to(F64)
        bt = p.mT @ xi_b @ p
        inv = 1.0 / lam
        sq = lambda x: (x * x).sum(dim=(-2, -1))  # noqa: E731
        spd_sq = (bt * bt * inv.unsqueeze(-1) * inv.unsqueeze(-2)).sum(dim=(-2, -1))  # ‖ξ_B‖²_B
        half_d2 = 0.5 * (0.5 * sq(a_u) + sq(b_u) + 0.5 * sq(a_v) + sq(b_v) + spd_sq)
        grad = _omega_rhs(lam, p, a_u, a_v, xi_b)
        fallback = torch.zeros(o2.shape[0], dtype=torch.bool) if info.fallback is None else info.fallback
        self.surrogates += info.fallbacks
        return half_d2, grad, (a_u, b_u, a_v, b_v, xi_b, fallback.to(o.device), completion)

    def tangent(self, state) -> PolarTangent:
        """Log_μ(θ·O) = (U_μ A_U + Q_U B_U, ξ_B, V_μ A_V + Q_V B_V)."""
        a_u, b_u, a_v, b_v, xi_b, _, _ = state
        u, v = self.point.U.to(F64), self.point.V.to(F64)
        return PolarTangent(u @ a_u + self.q_u @ b_u, xi_b, v @ a_v + self.q_v @ b_v)


@single_threaded()  # r×r work: see karcher_lab.geometry.numerics
def align(
    point: Polar,
    other: Polar,
    *,
    warm_start: bool = False,
    log_starts: torch.Tensor | None = None,
    tol: float | torch.Tensor = ALIGN_TOL,
    max_iter: int = ALIGN_MAX_ITER,
    log_tol: float = stiefel.LOG_TOL,
    log_max_iter: int = stiefel.LOG_MAX_ITER,
    log_surrogate: bool = False,
    cache: spd.EighCache | None = None,
) -> Alignment:
    """Orbit minimization O* = argmin_O d(point, other·O)² (eq. 2 / eq. 10), batched over ``other``'s leading axis.

    ``point`` is one (unbatched) Polar, or a batch with ``other``'s leading axis (entry i aligns
    other[i] to point[i]: many reference points solved together); ``other`` a batch ``[N, ...]``; ``tol``
    one threshold or one per entry (a positive tensor [N]). Every entry runs its own iteration (its own
    L-BFGS pairs, line search and stopping test; a line-search trial evaluates only the entries still
    searching), so its result does not depend on the other entries.
    Cold (default): the start is
    the better (by the true d) of the two closed-form candidates of the module doc, both equivariant
    under other ↦ other·O'. ``warm_start``: ``other`` is already aligned to a nearby point (e.g. the
    previous Fréchet iterate) and the start is the identity, with the Stiefel logs warm-started from
    ``log_starts`` (the previous :attr:`Alignment.log_starts`). Then L-BFGS on O(r) (steps
    O ← O expm(Ω), Ω skew; initial inverse Hessian the inverse vertical metric c⁻¹, which makes the
    first step the Gauss–Newton step that removes the vertical part of the log in a flat space;
    Armijo backtracking), until ‖vert part of Log_point(other·O)‖ < ``tol`` for every entry or
    ``max_iter`` steps. Raises ConvergenceError if a Stiefel log does not converge, AntipodalError if
    it meets the cut locus; with ``log_surrogate`` such logs are the projection surrogate of
    :func:`stiefel.log_coordinates` instead (counted in :attr:`Alignment.log_fallback`), and an entry
    whose current log uses the surrogate takes no further steps (R is the gradient of ½d² only for
    exact logs; its rotation stays the start's or the last accepted one). ``cache``: the solver's
    :class:`~karcher_lab.geometry.spd.EighCache` (without one, a cache local to this call still computes
    the eigendecomposition of ``point.B`` once).
    """
    n, r = other.U.shape[0], other.U.shape[-1]
    tol = stiefel.check_tolerance("alignment tol", tol, torch.Size([n]), other.U.device)
    checks.check_count("alignment max_iter", max_iter, 0)
    if cache is None:
        cache = spd.EighCache()
    if isinstance(tol, torch.Tensor):  # the U and V logs of entry i both get entry i's threshold
        log_tol_entries = (LOG_TOL_FRACTION * tol).clamp_min(log_tol).expand(n)
        log_tol_entries = torch.cat([log_tol_entries, log_tol_entries])
    else:
        log_tol_entries = max(log_tol, LOG_TOL_FRACTION * tol)
    objective = _OrbitObjective(point, other, log_tol_entries, log_max_iter, log_surrogate, cache)
    if warm_start:
        o = torch.eye(r, dtype=F64, device=other.U.device).expand(n, r, r)
        f, grad, state = objective(o, log_starts)
    else:
        first, second = _closed_form_candidates(point, other, cache)
        o, (f, grad, state) = first, objective(first)
        cf, cg, cs = objective(second)
        better = cf < f
        o, f = _select(better, second, o), _select(better, cf, f)
        grad, state = _select(better, cg, grad), _select(better, cs, state)

    coef = _vertical_metric(objective.lam)
    p_mu = objective.p

    def precondition(x: torch.Tensor) -> torch.Tensor:  # the inverse vertical metric c⁻¹ (module doc)
        return p_mu @ ((p_mu.mT @ x @ p_mu) / coef) @ p_mu.mT

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(dim=(-2, -1))

    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    iterations = 0
    while True:
        residual = dot(grad, precondition(grad)).clamp_min(0).sqrt()  # = ‖vert part of the log‖
        # R is the gradient of ½d² only where both Stiefel logs are exact: an entry with a surrogate log stays
        surrogate = state[-2].reshape(2, n).any(dim=0)
        active = (residual >= tol) & ~surrogate
        if not bool(active.any()) or iterations >= max_iter:
            break
        iterations += 1
        direction = _lbfgs_direction(grad, history, precondition, dot) * active[:, None, None]
        slope = dot(grad, direction)
        step = torch.ones(n, dtype=F64, device=o.device)
        pending = active.clone()
        # this iteration's pair of every entry (zero where it takes no step): one history slot per iteration
        s_k, y_k = torch.zeros_like(direction), torch.zeros_like(direction)
        for _ in range(LINE_SEARCH_HALVINGS):
            rows = torch.nonzero(pending).flatten()  # only the entries still searching are evaluated
            both = torch.cat([rows, rows + n])
            trial_o = o[rows] @ torch.linalg.matrix_exp(step[rows, None, None] * direction[rows])
            trial_f, trial_grad, trial_state = objective(trial_o, state[-1][both], rows,
                                                         LOG_TOL_RESIDUAL * residual[rows].square())
            # Armijo on ½d², with slack for the rounding of f once the decrease is below its last digits
            accept = trial_f <= f[rows] + 1e-4 * step[rows] * slope[rows] + 1e-13 * (1.0 + f[rows])
            if bool(accept.any()):
                took = rows[accept]
                s_k = _put_rows(s_k, took, step[took, None, None] * direction[took])
                y_k = _put_rows(y_k, took, trial_grad[accept] - grad[took])
                o, f = _put_rows(o, took, trial_o[accept]), _put_rows(f, took, trial_f[accept])
                grad = _put_rows(grad, took, trial_grad[accept])
                took_both, accept_both = torch.cat([took, took + n]), torch.cat([accept, accept])
                state = tuple(
                    _put_rows(t, took_both, x[accept_both]) if t.shape[0] == 2 * n else _put_rows(t, took, x[accept])
                    for t, x in zip(state, trial_state)
                )
                pending = _put_rows(pending, took, torch.zeros_like(took, dtype=torch.bool))
            if not bool(pending.any()):
                break
            step = torch.where(pending, 0.5 * step, step)
        history.append((s_k, y_k, dot(s_k, y_k)))
        del history[:-LBFGS_MEMORY]
    return Alignment(
        O=o,
        aligned=act(other, o),
        log=objective.tangent(state),
        iterations=iterations,
        residuals=residual,
        tol=tol,
        log_starts=state[-1],
        log_fallback=state[-2],
        surrogates=objective.surrogates,
    )


def quotient_dist(point: Polar, other: Polar, *, cache: spd.EighCache | None = None, **align_params) -> torch.Tensor:
    """Quotient distance d([point], [other]) = min_O d(point, other·O) (eq. 1), per entry of ``other``'s batch.

    Raises ConvergenceError if the alignment did not reach its tolerance.
    """
    if cache is None:
        cache = spd.EighCache()
    al = align(point, other, cache=cache, **align_params)
    if not al.converged:
        raise ConvergenceError(
            f"alignment did not converge: vertical residual {float(al.residuals.max()):.3g} ≥ tol "
            f"{float(torch.as_tensor(al.tol).min()):g} "
            f"after {al.iterations} iterations (raise max_iter or tol)"
        )
    return norm(point, al.log, cache=cache)
