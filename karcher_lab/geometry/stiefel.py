"""The Stiefel manifold St(n, p) = {U ∈ ℝ^{n×p} : UᵀU = I_p} with the canonical metric (GeoMerge paper §2, eq. 5).

A point is a ``[..., n, p]`` tensor with orthonormal columns (p ≤ n); leading axes are batch axes.
Exp and Log need n ≥ 2p (NotSupportedError otherwise; LoRA ranks are far below that).
Tangent vectors at U are Δ with UᵀΔ + ΔᵀU = 0.

- canonical inner product ⟨Δ, Δ̃⟩_U = tr(Δᵀ (I − ½ U Uᵀ) Δ̃); for Δ = U A + Q B (A skew, QᵀU = 0)
  ‖Δ‖² = ½‖A‖²_F + ‖B‖²_F;
- tangent projection Z ↦ Z − U sym(UᵀZ) (the normal space {U S : S symmetric} is the same for the
  Euclidean and the canonical metric, so this is the orthogonal projection for both);
- Exp (Edelman, Arias & Smith 1998; the paper's eq. 5): A = UᵀΔ, Q R = (I − U Uᵀ) Δ (thin QR),
  [M; N] = expm([[A, −Rᵀ], [R, 0]])[:, :p], Exp_U(Δ) = U M + Q N;
- Log (Zimmermann, SIMAX 2017, as used by Mataigne, Zimmermann & Miolane 2024 for the
  canonical metric): M = UᵀY, Q N = Y − U M (thin QR); complete [M; N] to an orthogonal V₀ ∈ SO(2p);
  iterate L_k = logm(V_k) = [[A, −Bᵀ], [B, C]], stop when ‖C‖_F < tol, else
  V_{k+1} = V_k diag(I, expm(X)) with X = −C (Zimmermann) or, as here, a Sylvester-corrected X that
  cancels C to third order (:func:`_trailing_update`; Zimmermann & Hüper 2022 accelerate the iteration
  in this way), combined with the previous ``ANDERSON_MEMORY`` steps by Anderson acceleration
  (:class:`_Anderson`); then
  Log_U(Y) = U A + Q B. Locally linear convergence; the stopping test does not depend on the update,
  so the result is the same.
  The completion [X₀; Y₀] (trailing columns of a full QR of [M; N]) is rotated so that Y₀ is
  symmetric positive semidefinite (a Procrustes preprocessing step, as in Zimmermann & Hüper 2022),
  which starts V₀ as close to the identity as the completion allows; a column is flipped if needed so
  that det V₀ = +1;
- d(U, Y) = ‖Log_U(Y)‖ (canonical norm);
- surrogate for pairs beyond the log's reach (:func:`surrogate_coordinates`, opt-in per call of
  :func:`log_coordinates`): Proj_{T_U}(Y − U) = U skew(UᵀY) + (I − UUᵀ) Y, the negative gradient of
  ½‖U − Y‖²_F (embedded metric), defined everywhere and equal to Log_U(Y) up to O(d²).

The iteration itself (:func:`log_coordinates`) works on the 2p×p coordinates (M, N) of Y in the frame
[U, Q] from :func:`coordinates`, and can be warm-started from the completion of a previous run at
nearby (M, N); :func:`log` chains the two. The complement basis Q is taken from a QR of
[U, (I − U Uᵀ) Δ] (its trailing p columns), so QᵀU = 0 holds to rounding also when (I − U Uᵀ)Δ is
rank-deficient (a thin QR of a rank-deficient matrix can return columns that are not orthogonal to U). The logarithm of an orthogonal matrix uses the Cayley
transform C = (V + I)⁻¹(V − I) (skew, eigenvalues i tan(θ/2)) and logm V = 2 atan(C) = C · h(CᵀC) with
h(τ²) = 2 atan(τ)/τ, evaluated through a symmetric eigendecomposition: no complex arithmetic, exact on
repeated eigenvalues; it requires no rotation angle at π (the cut locus).

Everything is computed in float64 and returned in the inputs' dtype promoted to at least float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from karcher_lab import checks
from karcher_lab.errors import (
    AntipodalError,
    ConvergenceError,
    ManifoldError,
    NonFiniteError,
    NotSupportedError,
    ParameterError,
    ShapeMismatchError,
)
from karcher_lab.geometry.numerics import all_finite, result_dtype, single_threaded
from karcher_lab.geometry.sphere import ANTIPODAL_TOL

ORTHONORMALITY_TOL = 1e-5
"""Largest accepted max|UᵀU − I| for a point (float32 orthonormalization leaves ~1e-7 per entry)."""

LOG_TOL = 1e-11
"""Default stopping threshold on ‖C‖_F in :func:`log` (float64; the exp of the result matches Y to ~tol)."""

LOG_MAX_ITER = 200
"""Default iteration cap of :func:`log`."""

ATAN_RATIO_POLYNOMIALS = (
    (1.0, 0.0, 1.0, (
        2.0, -0.666666666666614, 0.3999999999929592, -0.28571428533853466, 0.22222221156004165,
        -0.18181799586434683, 0.15384397994916588, -0.13331529821379445, 0.11753656228974545,
        -0.10474846943837633, 0.09337490609697058, -0.08162249500635771, 0.0677425340540135,
        -0.05113724728874348, 0.03343919212701478, -0.01798216108531652, 0.007502276967930282,
        -0.002250508860446929, 0.00042847621477207893, -3.86846951857846e-05,
    )),
    (4.0, 2.0, 2.0, (
        1.3510217177120798, -0.3421775255227066, 0.14552203303094258, -0.07188564480973182,
        0.03820858118126601, -0.021218998783932148, 0.012134791061460709, -0.0070874728512102265,
        0.004205850681209142, -0.0025270655180469693, 0.001533669782633234, -0.0009384468038864684,
        0.000577894763708526, -0.0003581332990432676, 0.0002249881990868149, -0.00014080179433547332,
        7.9630341043178e-05, -4.999413707766634e-05, 6.147792335456015e-05, -3.9475924963536574e-05,
        -5.13197068422493e-05, 3.3743645254168156e-05, 0.0001265935521329077, -8.259052285339347e-05,
        -0.00016494216269958659, 0.00010773455061958077, 0.00017202307164348985, -0.000112315272316112,
        -0.00012544677026320866, 8.190939945180086e-05, 6.349587924899821e-05, -4.145218475998012e-05,
        -1.9632782163084038e-05, 1.281578653478518e-05, 2.9531392032882624e-06, -1.9270599513740733e-06,
    )),
)
"""Polynomials for h(s) = 2 atan(√s)/√s on [0, bound], as (bound, center, scale, coefficients): the
monomial coefficients in y = (s − center)/scale ∈ [−1, 1] of the interpolant at the Chebyshev points of
[0, bound] (degree 19 on [0, 1], 35 on [0, 4]; computed in 60-digit arithmetic). Evaluated in float64
they are within 2.2e-16 and 4.4e-16 of h (h ∈ [0.55, 2]). :func:`_logm_orthogonal_masked` uses the first
whose bound holds ‖CᵀC‖₂ = tan²(θ_max/2) (rotation angles up to π/2 and 2.21)."""

POLAR_TOL = 1e-14
"""Newton–Schulz orthonormalization of a warm start (:func:`_orthonormal_frame`) stops at ‖XᵀX − I‖_F < POLAR_TOL."""

POLAR_MAX_ITER = 8
"""Newton–Schulz steps at most before :func:`_orthonormal_frame` takes the SVD."""


ANDERSON_MEMORY = 2
"""Previous steps the Anderson acceleration of Zimmermann's iteration combines (:class:`_Anderson`; 0: none)."""

SYLVESTER_DOUBLINGS = 3
"""Doubling steps of the Stein sum in :func:`_trailing_update` (2³ = 8 terms; relative error ρ¹⁶, ρ < 0.72)."""

SYLVESTER_MAX_NORM = 5.0
"""The Sylvester-corrected update is used where a bound on ‖BBᵀ‖₂ is below this (:func:`_trailing_update`)."""


@dataclass(frozen=True)
class LogInfo:
    """How :func:`log`'s iteration ended: per batch entry ``iterations`` taken and final ``residuals`` ‖C‖_F."""

    iterations: torch.Tensor
    residuals: torch.Tensor
    tol: float | torch.Tensor
    """The threshold, or one per batch entry."""
    max_iter: int
    fallback: torch.Tensor | None = None
    """With ``surrogate`` (:func:`log_coordinates`): the entries that got the projection surrogate."""

    @property
    def converged(self) -> bool:
        """Every batch entry reached ‖C‖_F < tol or, with ``surrogate``, fell back to the surrogate."""
        done = self.residuals < self.tol
        if self.fallback is not None:
            done = done | self.fallback
        return bool(done.all())

    @property
    def fallbacks(self) -> int:
        """How many entries got the projection surrogate instead of the exact log."""
        return 0 if self.fallback is None else int(self.fallback.sum())

    @property
    def residual(self) -> float:
        """Largest final residual over the batch."""
        return float(self.residuals.max()) if self.residuals.numel() else 0.0


def check_tolerance(
    name: str, tol: float | torch.Tensor, batch_shape: torch.Size, device: torch.device
) -> float | torch.Tensor:
    """``tol`` itself if a positive number; a positive finite tensor broadcastable to ``batch_shape`` (one
    threshold per batch entry) as float64 on ``device``; ParameterError otherwise."""
    if not isinstance(tol, torch.Tensor):
        return checks.check_positive(name, tol)
    fits = tol.ndim <= len(batch_shape) and all(
        t in (1, b) for t, b in zip(reversed(tol.shape), reversed(tuple(batch_shape)))
    )
    if not fits:
        raise ShapeMismatchError(f"{name}: per-entry tolerances of shape {tuple(tol.shape)} do not fit the batch "
                                 f"{tuple(batch_shape)}")
    if not bool((torch.isfinite(tol) & (tol > 0)).all()):
        raise ParameterError(f"{name} must be positive and finite, got {tol}")
    return tol.to(dtype=torch.float64, device=device)


def skew(x: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric part (X − Xᵀ)/2 over the last two axes."""
    return 0.5 * (x - x.mT)


def check_point(u: torch.Tensor, name: str = "U") -> None:
    """Raise unless ``u`` is a finite ``[..., n, p]`` tensor (p ≤ n) with max|UᵀU − I| ≤ ORTHONORMALITY_TOL."""
    if not isinstance(u, torch.Tensor) or not u.is_floating_point():
        raise ManifoldError(f"{name} must be a floating-point tensor, got {type(u).__name__}")
    if u.ndim < 2 or u.shape[-1] == 0 or u.shape[-1] > u.shape[-2]:
        raise ShapeMismatchError(f"{name} must be [..., n, p] with 1 ≤ p ≤ n, got shape {tuple(u.shape)}")
    if not all_finite(u):
        raise NonFiniteError(f"{name} contains NaN or Inf")
    u64 = u.to(torch.float64)
    eye = torch.eye(u.shape[-1], dtype=torch.float64, device=u.device)
    err = float((u64.mT @ u64 - eye).abs().max())
    if err > ORTHONORMALITY_TOL:
        raise ManifoldError(
            f"{name} does not have orthonormal columns: max|UᵀU − I| = {err:.3g} > {ORTHONORMALITY_TOL:g}"
        )


def _check_like(x: torch.Tensor, u: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.shape[-2:] != u.shape[-2:]:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeMismatchError(f"{name} must have the point's shape {tuple(u.shape[-2:])}, got {shape}")
    if not all_finite(x):
        raise NonFiniteError(f"{name} contains NaN or Inf")
    return x.to(torch.float64)


def canonical_inner(u: torch.Tensor, delta: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """tr(ΔᵀΔ̃) − ½ tr((UᵀΔ)ᵀ(UᵀΔ̃)) without input checks (float64 tensors of matching shapes): for inner
    loops over a point already checked, such as the L-BFGS recursion of the Fréchet solver."""
    return (delta * other).sum(dim=(-2, -1)) - 0.5 * ((u.mT @ delta) * (u.mT @ other)).sum(dim=(-2, -1))


def inner(u: torch.Tensor, delta: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Canonical metric ⟨Δ, Δ̃⟩_U = tr(ΔᵀΔ̃) − ½ tr((UᵀΔ)ᵀ(UᵀΔ̃)) (eq. of §2), over the batch axes."""
    check_point(u)
    d, e = _check_like(delta, u, "delta"), _check_like(other, u, "other")
    return canonical_inner(u.to(torch.float64), d, e).to(result_dtype(u, delta, other))


def norm(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖Δ‖_U under the canonical metric."""
    return inner(u, delta, delta).clamp_min(0).sqrt()


def tangent_part(u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Z − U sym(UᵀZ) without input checks (float64 tensors of matching shapes); see :func:`project`."""
    uz = u.mT @ z
    return z - u @ (0.5 * (uz + uz.mT))


def project(u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of an ambient Z onto T_U St: Z − U sym(UᵀZ)."""
    check_point(u)
    return tangent_part(u.to(torch.float64), _check_like(z, u, "z")).to(result_dtype(u, z))


def _check_room(u: torch.Tensor) -> None:
    """Exp and Log work in a frame [U, Q] of 2p orthonormal columns, which needs n ≥ 2p."""
    n, p = u.shape[-2], u.shape[-1]
    if n < 2 * p:
        raise NotSupportedError(
            f"Stiefel exp/log need n ≥ 2p (the frame [U, Q] has 2p orthonormal columns), got n = {n}, p = {p}"
        )


def _complement(u: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (orthonormal, QᵀU = 0) and QᵀW, with (I − U Uᵀ) W = Q (QᵀW): Q from a QR of [U, (I − U Uᵀ) W].

    Q's column signs are fixed so that QᵀW has a non-negative diagonal, which makes Q a continuous
    function of W away from rank deficiency (warm starts of :func:`log_coordinates` rely on it).
    """
    p = u.shape[-1]
    perp = w - u @ (u.mT @ w)
    q = torch.linalg.qr(torch.cat([u, perp], dim=-1))[0][..., p:]
    qw = q.mT @ w
    signs = torch.where(torch.diagonal(qw, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs.unsqueeze(-2), qw * signs.unsqueeze(-1)


def exp(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Exp_U(Δ) = U M + Q N with [M; N] = expm([[A, −Rᵀ], [R, 0]])[:, :p], A = UᵀΔ, Q R = (I − UUᵀ)Δ (eq. 5)."""
    check_point(u)
    _check_room(u)
    u64, d = u.to(torch.float64), _check_like(delta, u, "delta")
    p = u.shape[-1]
    a = skew(u64.mT @ d)
    q, r = _complement(u64, d)  # (I − UUᵀ)Δ = Q R
    block = torch.cat([torch.cat([a, -r.mT], dim=-1), torch.cat([r, torch.zeros_like(r)], dim=-1)], dim=-2)
    mn = torch.linalg.matrix_exp(block)[..., :p]
    return (u64 @ mn[..., :p, :] + q @ mn[..., p:, :]).to(result_dtype(u, delta))


def logm_orthogonal(v: torch.Tensor) -> torch.Tensor:
    """Principal logarithm of a rotation V ∈ SO(k) (no eigenvalue −1): the skew L with expm(L) = V.

    Cayley: C = (V + I)⁻¹(V − I) is skew with eigenvalues i tan(θ/2) for V's eigenvalues e^{iθ}; then
    logm V = 2 atan(C) = C · h(CᵀC), h(τ²) = 2 atan(τ)/τ (→ 2 at τ = 0). h(CᵀC) is one of the
    polynomials :data:`ATAN_RATIO_POLYNOMIALS` of CᵀC (matrix products only) where a bound on ‖CᵀC‖₂
    allows (rotation angles up to about 2.2), and Z diag(h(τ²)) Zᵀ from CᵀC = Z diag(τ²) Zᵀ otherwise.
    Raises AntipodalError where V rotates by (nearly) π, cos θ < −1 + ANTIPODAL_TOL as for the sphere,
    i.e. τ² > 2/ANTIPODAL_TOL − 1: the Stiefel points are (nearly) on each other's cut locus, e.g. a
    column of Y is minus one of U, and the logarithm's direction is dominated by rounding.
    """
    gen, ok = _logm_orthogonal_masked(v)
    if not bool(ok.all()):
        raise AntipodalError(
            "Stiefel log undefined: a rotation by (nearly) π, the points are on each other's cut locus (e.g. a "
            "column of one is minus a column of the other); for LoRA updates, ΔW and −ΔW have no unique mean"
        )
    return gen


def _logm_orthogonal_masked(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logm V, ok) per batch entry, as :func:`logm_orthogonal`, with ok False (and logm 0) where V rotates by
    (nearly) π instead of raising."""
    batch, k = v.shape[:-2], v.shape[-1]
    v = v.reshape(-1, k, k)
    eye = torch.eye(k, dtype=v.dtype, device=v.device)
    c = torch.linalg.solve_ex(v + eye, v - eye)[0]
    s = c.mT @ c
    s2 = s @ s
    s4 = s2 @ s2
    # ‖S‖₂ = τ_max² ≤ (tr S⁸ / 2)^⅛ = (‖S⁴‖²_F / 2)^⅛ (at most 16^⅛ times τ_max² for 2p = 32), the
    # eigenvalues τ_j² of S = CᵀC coming in pairs; NaN (a failed solve) fails every bound
    bound = ((s4 * s4).sum(dim=(-2, -1)) / 2) ** 0.125
    h = torch.empty_like(v)
    ok = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
    left = ok.clone()
    for tier, (limit, center, scale, coefficients) in enumerate(ATAN_RATIO_POLYNOMIALS):
        rows = left & (bound <= limit)
        if not bool(rows.any()):
            continue
        left = left & ~rows
        index = None if bool(rows.all()) else torch.nonzero(rows).flatten()
        pick = (lambda t: t) if index is None else (lambda t: t[index])  # noqa: E731
        if tier == 0:  # the variable is S itself, whose powers are at hand
            powers = [pick(s), pick(s2), pick(s2) @ pick(s), pick(s4)]
        else:
            powers = [(pick(s) - center * eye) / scale]
            for _ in range(5):
                powers.append(powers[-1] @ powers[0])
        value = _matrix_polynomial(powers, coefficients)
        if index is None:
            h = value
        else:
            h[index] = value
    if bool(left.any()):
        far = torch.nonzero(left).flatten()
        h[far], ok[far] = _atan_ratio_eigh(v[far], c[far])
    gen = torch.where(ok[:, None, None], skew(c @ h), 0.0)
    return gen.reshape(*batch, k, k), ok.reshape(batch)


def _matrix_polynomial(powers: list[torch.Tensor], coefficients: tuple[float, ...]) -> torch.Tensor:
    """Σ_j c_j Yʲ for Y [E, k, k], given ``powers`` = [Y, Y², …, Yᵐ], by Paterson–Stockmeyer: blocks
    q_i = Σ_{j<m} c_{mi+j} Yʲ (one product of the coefficient table with the stacked powers), then Horner
    in Yᵐ (one matrix product per block); ``coefficients`` has a multiple of m entries."""
    m = len(powers)
    table = torch.tensor(coefficients, dtype=powers[0].dtype, device=powers[0].device).reshape(-1, m)
    stacked = torch.stack(powers[:-1])
    blocks = (table[:, 1:] @ stacked.reshape(m - 1, -1)).reshape(table.shape[0], *powers[0].shape)
    blocks.diagonal(dim1=-2, dim2=-1).add_(table[:, :1, None])
    value = blocks[-1]
    for i in range(table.shape[0] - 2, -1, -1):
        value = torch.baddbmm(blocks[i], value, powers[-1])
    return value


def _atan_ratio_eigh(v: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h(CᵀC), ok) through CᵀC = Z diag(τ²) Zᵀ for rotations V [E, k, k] with Cayley transforms C (any
    norm); ok False where V rotates by (nearly) π (τ² > 2/ANTIPODAL_TOL − 1, or the solve for C failed)."""
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    # an eigenvalue −1 makes V + I singular: the solve then returns rounding noise, which fails (V + I)C = V − I
    finite = torch.isfinite(c).all(dim=-1).all(dim=-1)
    c = torch.where(finite[..., None, None], c, 0.0)
    solved = finite & (((v + eye) @ c - (v - eye)).norm(dim=(-2, -1)) < 1e-8 * (1.0 + c.norm(dim=(-2, -1))))
    tau2, z = torch.linalg.eigh(c.mT @ c)
    ok = solved & torch.isfinite(tau2).all(dim=-1) & (tau2.amax(dim=-1) <= 2 / ANTIPODAL_TOL - 1)
    tau2 = torch.where(ok[..., None], tau2, 0.0).clamp_min(0)
    tau = tau2.sqrt()
    h = torch.where(tau > 1e-8, 2.0 * torch.atan(tau) / torch.where(tau > 1e-8, tau, 1.0), 2.0 - tau2 * (2.0 / 3.0))
    return (z * h.unsqueeze(-2)) @ z.mT, ok


def _orthonormal_frame(w: torch.Tensor) -> torch.Tensor:
    """The closest orthonormal frame to W [E, n, p] (the polar factor P Rᵀ of W = P S Rᵀ).

    Newton–Schulz, X ← X (3I − XᵀX)/2 (quadratic convergence to the polar factor; matrix products only),
    for the entries with ‖WᵀW − I‖_F < ¼ until ‖XᵀX − I‖_F < POLAR_TOL; the SVD for the others, and for
    any entry not converged after POLAR_MAX_ITER steps.
    """
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    x = w
    err = (x.mT @ x - eye).norm(dim=(-2, -1))
    near = err < 0.25
    for _ in range(POLAR_MAX_ITER):
        if not bool((near & (err >= POLAR_TOL)).any()):
            break
        gram = x.mT @ x
        x = torch.where(near[:, None, None], x @ (1.5 * eye - 0.5 * gram), x)
        err = (x.mT @ x - eye).norm(dim=(-2, -1))
    rest = torch.nonzero(~near | (err >= POLAR_TOL)).flatten()
    if rest.numel():
        left, _, right = torch.linalg.svd(w[rest], full_matrices=False)
        x = x.index_copy(0, rest, left @ right)
    return x


def _start_rotation(m: torch.Tensor, n: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """V₀ ∈ SO(2p) whose first p columns are [M; N] ([E, p, p] each).

    Cold (``start`` None): the trailing columns of a full QR of [M; N], rotated so that the trailing
    block is symmetric positive semidefinite. Warm: ``start`` (trailing columns of a previous V for
    nearby M, N) with [M; N] projected out and re-orthonormalized (closest orthonormal frame,
    :func:`_orthonormal_frame`). In both cases a trailing column is flipped where needed so that det V₀ = +1.
    """
    p = m.shape[-1]
    mn = torch.cat([m, n], dim=-2)
    if start is None:
        xy = torch.linalg.qr(mn, mode="complete")[0][..., p:]
        left, _, right_t = torch.linalg.svd(xy[..., p:, :])  # Y₀ = P S Rᵀ; rotate by R Pᵀ → Y = P S Pᵀ
        v = torch.cat([mn, xy @ right_t.mT @ left.mT], dim=-1)
        flip = torch.linalg.det(v) < 0  # Y = P S' Pᵀ, S' with its smallest singular value negated
        if bool(flip.any()):
            sign = torch.ones(*mn.shape[:-2], p, dtype=m.dtype, device=m.device)
            sign[..., -1] = torch.where(flip, -1.0, 1.0)
            v = torch.cat([mn, xy @ (right_t.mT * sign.unsqueeze(-2)) @ left.mT], dim=-1)
        return v
    v = torch.cat([mn, _orthonormal_frame(start - mn @ (mn.mT @ start))], dim=-1)
    flip = torch.linalg.det(v) < 0  # the last trailing column negated
    if bool(flip.any()):
        v[..., -1] = torch.where(flip[:, None], -v[..., -1], v[..., -1])
    return v


def _trailing_update(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The skew X of the update V ← V diag(I, cay(X)) that cancels the block C of logm(V) to third order.

    By the Baker–Campbell–Hausdorff series, the trailing block of logm(V diag(I, expm(X))) is
    C + X − (1/12)(BBᵀX + XBBᵀ) + O(‖C‖², ‖X‖²‖L‖). Setting it to zero gives the Sylvester equation
    K X + X K = −2C, K = I − S/6, S = BBᵀ (derived here from the BCH series; Zimmermann & Hüper 2022
    propose a Sylvester-corrected update of this kind). With T = S/12 and N = (I − T)⁻¹ it is the Stein
    equation X = U X U − N C N, U = N T (Smith's transformation with shift 1), whose solution
    X = −Σ_j Uʲ N C N Uʲ is summed to 2^SYLVESTER_DOUBLINGS terms by doubling (U X U added, U squared); N is
    the Neumann product (I + T)(I + T²)(I + T⁴)(I + T⁸). Matrix products only. The eigenvalues of U are
    (β/12)/(1 − β/12) for the eigenvalues β of S, below 1 for β < 6; the sum is used where
    ‖S⁸‖_F^⅛ ≥ ‖S‖₂ stays below SYLVESTER_MAX_NORM, Zimmermann's plain update X = −C elsewhere (very far
    points). X only preconditions the iteration (its fixed point is C = 0 whatever X is), so the truncated
    sums change the iteration count, not the logarithm.
    The Cayley transform cay(X) = (I − X/2)⁻¹(I + X/2) = expm(X + X³/12 + …) agrees with expm(X) to third
    order and is orthogonal, so it serves as the rotation of the update (one solve instead of an expm).
    """
    t = (b @ b.mT) / 12.0
    t2 = t @ t
    t4 = t2 @ t2
    t8 = t4 @ t4
    safe = (12.0 * (t8 * t8).sum(dim=(-2, -1)) ** 0.0625 < SYLVESTER_MAX_NORM)[..., None, None]
    eye = torch.eye(t.shape[-1], dtype=t.dtype, device=t.device)
    inverse = (eye + t) @ (eye + t2) @ (eye + t4) @ (eye + t8)  # (I − T)⁻¹ to O(T¹⁶)
    u = inverse @ t
    x = -(inverse @ c @ inverse)
    for _ in range(SYLVESTER_DOUBLINGS):
        x = x + u @ x @ u
        u = u @ u
    return skew(torch.where(safe, x, -c))


class _Anderson:
    """Anderson acceleration (type II, ``memory`` previous steps) of a batched fixed-point iteration
    x ← x + f(x) on skew [E, p, p] steps, in the local coordinates of the accumulated rotation.

    With the last differences Δf_j of the proposed steps f and Δx_j of the steps taken, the step is
    f − Σ_j γ_j (Δx_j + Δf_j), γ = argmin ‖f − Σ_j γ_j Δf_j‖_F (per entry; a linear iteration then
    proceeds as GMRES on the preconditioned system). An entry whose residual grew forgets its pairs.
    Used by :func:`log_coordinates` on Zimmermann's iteration, which converges only linearly for far
    points even with the Sylvester-corrected update; the fixed point, and so the logarithm, is unchanged.
    """

    def __init__(self, memory: int):
        self.memory = memory
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (f, step taken, residual)
        # (Δf, Δx [E, m, p, p], valid [E, m]), newest first
        self.pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the entries ``rows`` (a mask or index over the current batch)."""
        if self.last is not None:
            self.last = tuple(t[rows] for t in self.last)
        if self.pairs is not None:
            self.pairs = tuple(t[rows] for t in self.pairs)

    def step(self, f: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The step to take, given the iteration's proposed steps ``f`` [E, p, p] and residuals [E]."""
        if self.memory == 0:
            return f
        step = f
        if self.last is not None:
            last_f, last_step, last_residual = self.last
            fresh = (residual < last_residual)[:, None]
            df, dx = (f - last_f).unsqueeze(1), last_step.unsqueeze(1)
            if self.pairs is None:
                self.pairs = (df, dx, fresh)
            else:
                old_df, old_dx, old_valid = self.pairs
                self.pairs = (torch.cat([df, old_df[:, : self.memory - 1]], dim=1),
                              torch.cat([dx, old_dx[:, : self.memory - 1]], dim=1),
                              torch.cat([fresh, old_valid[:, : self.memory - 1] & fresh], dim=1))
            df, dx, valid = self.pairs
            d = torch.where(valid[..., None], df.flatten(2), 0.0)
            gram = d @ d.mT
            scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
            eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            # a relative ridge against nearly parallel Δf; invalid slots decoupled (their γ is zeroed below)
            ridge = (1e-12 * scale + torch.finfo(gram.dtype).tiny)[:, None, None] * eye
            gram = gram + ridge + torch.diag_embed((~valid).to(gram.dtype))
            gamma = torch.linalg.solve_ex(gram, d @ f.flatten(1).unsqueeze(-1))[0].squeeze(-1)
            gamma = torch.where(valid & torch.isfinite(gamma), gamma, 0.0)
            step = f - torch.einsum("em,empq->epq", gamma, dx + df)
        self.last = (f, step, residual)
        return step


def _cayley(x: torch.Tensor) -> torch.Tensor:
    """cay(X) = (I − X/2)⁻¹(I + X/2), orthogonal for a skew X."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.solve_ex(eye - 0.5 * x, eye + 0.5 * x)[0]


def coordinates(u: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, Q, N) with M = UᵀY, Q ⟂ U orthonormal and Y = U M + Q N: Y in the 2p-dimensional frame [U, Q].

    Every quantity of :func:`log_coordinates` lives in this frame; for Y·O (O ∈ O(p)) the same Q serves,
    with (M O, N O), since span((I − UUᵀ) Y O) = span((I − UUᵀ) Y).
    """
    check_point(u, "U")
    check_point(y, "Y")
    if y.shape[-2:] != u.shape[-2:]:
        raise ShapeMismatchError(f"U and Y must have the same [n, p], got {tuple(u.shape)} and {tuple(y.shape)}")
    _check_room(u)
    u64, y64 = torch.broadcast_tensors(u.to(torch.float64), y.to(torch.float64))
    q, n = _complement(u64, y64)
    return u64.mT @ y64, q, n


def log_coordinates(
    m: torch.Tensor,
    n: torch.Tensor,
    *,
    start: torch.Tensor | None = None,
    tol: float | torch.Tensor = LOG_TOL,
    max_iter: int = LOG_MAX_ITER,
    surrogate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LogInfo]:
    """Zimmermann's iteration on the frame coordinates: (A, B) with Log_U(Y) = U A + Q B (module doc).

    ``m``, ``n``: [..., p, p] from :func:`coordinates`. ``start``: the trailing columns of a previous
    run's final rotation (returned here as ``completion``) for a warm start at nearby (M, N). ``tol``:
    one threshold, or one per batch entry (a positive tensor of the batch shape ``m.shape[:-2]``).
    Returns (A, B, completion [..., 2p, p], :class:`LogInfo`); convergence is for the caller to judge.

    An iterate rotating by (nearly) π (the cut locus, or an iteration that left the log's domain) raises
    AntipodalError. With ``surrogate``, such entries, and those not converged after ``max_iter``, get
    instead the tangent projection of the ambient difference (:func:`surrogate_coordinates`), and
    ``info.fallback`` marks them; the other entries are unaffected. Each entry iterates on its own: an
    iteration computes only the entries that have not stopped, so an entry's result does not depend on
    the others in the batch.
    """
    tol = check_tolerance("tol", tol, m.shape[:-2], m.device)
    checks.check_count("max_iter", max_iter, 0)
    p = m.shape[-1]
    batch = m.shape[:-2]
    with single_threaded():
        flat = lambda t: t.reshape(-1, *t.shape[len(batch):])  # noqa: E731
        v = _start_rotation(flat(m.expand(*batch, p, p)), flat(n.expand(*batch, p, p)),
                            None if start is None else flat(start.expand(*batch, 2 * p, p)))
        count = v.shape[0]
        tols = tol.expand(batch).reshape(-1) if isinstance(tol, torch.Tensor) else None
        iterations = torch.zeros(count, dtype=torch.int64, device=v.device)
        failed = torch.zeros(count, dtype=torch.bool, device=v.device)
        gen = torch.empty_like(v)
        residuals = torch.empty(count, dtype=v.dtype, device=v.device)
        rows = torch.arange(count, device=v.device)  # the entries still iterating: only they are computed
        current, threshold = v, tols  # their rotations and thresholds
        steps = 0
        accel = _Anderson(ANDERSON_MEMORY)
        while True:
            gen_rows, ok = _logm_orthogonal_masked(current)
            if not bool(ok.all()) and not surrogate:
                logm_orthogonal(current)  # raises the cut-locus error
            c = gen_rows[:, p:, p:]
            res = torch.where(ok, c.norm(dim=(-2, -1)), torch.inf)
            moving = (res >= (tol if threshold is None else threshold)) & ok
            stop = steps >= max_iter or not bool(moving.any())
            done = torch.ones_like(moving) if stop else ~moving
            if stop or bool(done.any()):  # record the entries that stop here
                out = rows[done]
                gen[out], residuals[out], failed[out], v[out] = gen_rows[done], res[done], ~ok[done], current[done]
            if stop:
                break
            if bool(done.any()):
                rows, current, gen_rows, c = rows[moving], current[moving], gen_rows[moving], c[moving]
                res = res[moving]
                threshold = None if threshold is None else threshold[moving]
                accel.keep(moving)
            rotation = _cayley(accel.step(_trailing_update(gen_rows[:, p:, :p], c), res))
            current = torch.cat([current[:, :, :p], current[:, :, p:] @ rotation], dim=-1)
            iterations[rows] += 1
            steps += 1
        v, gen = v.reshape(*batch, 2 * p, 2 * p), gen.reshape(*batch, 2 * p, 2 * p)
        iterations, failed, residuals = iterations.reshape(batch), failed.reshape(batch), residuals.reshape(batch)
    a, b = gen[..., :p, :p], gen[..., p:, :p]
    fallback = None
    if surrogate:
        fallback = failed | (residuals >= tol)
        a_s, b_s = surrogate_coordinates(m, n)
        a = torch.where(fallback[..., None, None], a_s, a)
        b = torch.where(fallback[..., None, None], b_s, b)
        fallback = fallback.cpu()
    info = LogInfo(
        iterations=iterations.cpu(), residuals=residuals.cpu(),
        tol=tol.cpu() if isinstance(tol, torch.Tensor) else float(tol), max_iter=int(max_iter),
        fallback=fallback,
    )
    return a, b, v[..., p:], info


def surrogate_coordinates(m: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (skew(M), N): the frame coordinates of Proj_{T_U}(Y − U) = U skew(M) + Q N, for Y = U M + Q N.

    It is the negative Riemannian gradient, under the embedded metric, of ½‖U − Y‖²_F (the tangent
    projection of the Euclidean gradient U − Y; Proj_{T_U} U = 0), so a descent direction for the chordal
    distance, defined for every pair (U, Y), including pairs beyond the domain of the exact log; since
    Y = U + Log_U(Y) + O(d²), it differs from Log_U(Y) by O(d(U, Y)²).
    """
    return skew(m), n


def not_converged_error(info: LogInfo) -> ConvergenceError:
    """The error raised when a Stiefel log did not converge."""
    return ConvergenceError(
        f"Stiefel log did not converge: ‖C‖ = {info.residual:.3g} ≥ tol {float(torch.as_tensor(info.tol).min()):g} "
        f"after {info.max_iter} "
        "iterations (the points are too far apart for Zimmermann's iteration; raise max_iter or tol, or "
        "move them closer)"
    )


def log(
    u: torch.Tensor,
    y: torch.Tensor,
    *,
    tol: float = LOG_TOL,
    max_iter: int = LOG_MAX_ITER,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LogInfo]:
    """Log_U(Y): the tangent Δ at U with Exp_U(Δ) = Y, by Zimmermann's algorithm (see the module docstring).

    Batched over the leading axes (each entry stops on its own). Stops once ‖C‖_F < ``tol`` or after
    ``max_iter`` iterations. With ``return_info`` returns (Δ, :class:`LogInfo`) and leaves judging
    convergence to the caller; otherwise raises ConvergenceError when an entry did not converge (the
    points are too far apart: beyond the iteration's convergence radius, or near the cut locus).
    """
    m, q, n = coordinates(u, y)
    a, b, _, info = log_coordinates(m, n, tol=tol, max_iter=max_iter)
    delta = (u.to(torch.float64) @ a + q @ b).to(result_dtype(u, y))
    if return_info:
        return delta, info
    if not info.converged:
        raise not_converged_error(info)
    return delta


def dist(u: torch.Tensor, y: torch.Tensor, *, tol: float = LOG_TOL, max_iter: int = LOG_MAX_ITER) -> torch.Tensor:
    """Geodesic distance d(U, Y) = ‖Log_U(Y)‖ under the canonical metric (raises ConvergenceError like :func:`log`)."""
    return norm(u, log(u, y, tol=tol, max_iter=max_iter))
