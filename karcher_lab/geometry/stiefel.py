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
  in this way); then
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
from karcher_lab.geometry.numerics import result_dtype, single_threaded
from karcher_lab.geometry.sphere import ANTIPODAL_TOL

ORTHONORMALITY_TOL = 1e-5
"""Largest accepted max|UᵀU − I| for a point (float32 orthonormalization leaves ~1e-7 per entry)."""

LOG_TOL = 1e-11
"""Default stopping threshold on ‖C‖_F in :func:`log` (float64; the exp of the result matches Y to ~tol)."""

LOG_MAX_ITER = 200
"""Default iteration cap of :func:`log`."""


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
    if not bool(torch.isfinite(u).all()):
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
    if not bool(torch.isfinite(x).all()):
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
    logm V = 2 atan(C) = C · h(CᵀC), h(τ²) = 2 atan(τ)/τ (→ 2 at τ = 0), with CᵀC = Z diag(τ²) Zᵀ.
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
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    c = skew(torch.linalg.solve_ex(v + eye, v - eye)[0])
    # an eigenvalue −1 makes V + I singular: the solve then returns rounding noise, which fails (V + I)C = V − I
    finite = torch.isfinite(c).all(dim=-1).all(dim=-1)
    c = torch.where(finite[..., None, None], c, 0.0)
    solved = finite & (((v + eye) @ c - (v - eye)).norm(dim=(-2, -1)) < 1e-8 * (1.0 + c.norm(dim=(-2, -1))))
    tau2, z = torch.linalg.eigh(c.mT @ c)
    ok = solved & torch.isfinite(tau2).all(dim=-1) & (tau2.amax(dim=-1) <= 2 / ANTIPODAL_TOL - 1)
    tau2 = torch.where(ok[..., None], tau2, 0.0).clamp_min(0)
    tau = tau2.sqrt()
    h = torch.where(tau > 1e-8, 2.0 * torch.atan(tau) / torch.where(tau > 1e-8, tau, 1.0), 2.0 - tau2 * (2.0 / 3.0))
    gen = skew(c @ ((z * h.unsqueeze(-2)) @ z.mT))
    return torch.where(ok[..., None, None], gen, 0.0), ok


def _start_rotation(m: torch.Tensor, n: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """V₀ ∈ SO(2p) whose first p columns are [M; N].

    Cold (``start`` None): the trailing columns of a full QR of [M; N], rotated so that the trailing
    block is symmetric positive semidefinite. Warm: ``start`` (trailing columns of a previous V for
    nearby M, N) with [M; N] projected out and re-orthonormalized (closest orthonormal frame). In both
    cases a trailing column is flipped where needed so that det V₀ = +1.
    """
    p = m.shape[-1]
    mn = torch.cat([m, n], dim=-2)
    if start is None:
        xy = torch.linalg.qr(mn, mode="complete")[0][..., p:]
        left, _, right_t = torch.linalg.svd(xy[..., p:, :])  # Y₀ = P S Rᵀ; rotate by R Pᵀ → Y = P S Pᵀ
    else:
        w = start - mn @ (mn.mT @ start)
        left_w, _, right_w = torch.linalg.svd(w, full_matrices=False)
        xy = left_w @ right_w  # closest orthonormal frame to w
        left = right_t = torch.eye(p, dtype=m.dtype, device=m.device).expand(*xy.shape[:-2], p, p)
    sign = torch.ones(*mn.shape[:-2], p, dtype=m.dtype, device=m.device)
    v = torch.cat([mn, xy @ right_t.mT @ left.mT], dim=-1)
    flip = torch.linalg.det(v) < 0  # flip the trailing column along the smallest singular direction
    if bool(flip.any()):
        sign[..., -1] = torch.where(flip, -1.0, 1.0)
        v = torch.cat([mn, xy @ (right_t.mT * sign.unsqueeze(-2)) @ left.mT], dim=-1)
    return v


def _trailing_update(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The skew X of the update V ← V diag(I, expm(X)) that cancels the block C of logm(V) to third order.

    By the Baker–Campbell–Hausdorff series, the trailing block of logm(V diag(I, expm(X))) is
    C + X − (1/12)(BBᵀX + XBBᵀ) + O(‖C‖², ‖X‖²‖L‖). Setting it to zero gives the Sylvester equation
    (½I − BBᵀ/12) X + X (½I − BBᵀ/12) = −C (derived here from the BCH series; Zimmermann & Hüper 2022
    propose a Sylvester-corrected update of this kind), solved in the eigenbasis of BBᵀ = W diag(β) Wᵀ:
    X̃_ij = −C̃_ij / (1 − (β_i + β_j)/12). Where a denominator falls below ¼
    (‖B‖₂² > 4.5, very far points) Zimmermann's plain update X = −C is used for that entry.
    """
    beta, w = torch.linalg.eigh(b @ b.mT)
    denom = 1.0 - (beta.unsqueeze(-1) + beta.unsqueeze(-2)) / 12.0
    safe = (denom.amin(dim=(-2, -1)) > 0.25)[..., None, None]
    x = w @ ((w.mT @ -c @ w) / torch.where(safe, denom, 1.0)) @ w.mT
    return skew(torch.where(safe, x, -c))


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
    with single_threaded():
        v = _start_rotation(m, n, start)
        batch = v.shape[:-2]
        v = v.reshape(-1, 2 * p, 2 * p)
        tols = tol.expand(batch).reshape(-1) if isinstance(tol, torch.Tensor) else None
        count = v.shape[0]
        iterations = torch.zeros(count, dtype=torch.int64, device=v.device)
        failed = torch.zeros(count, dtype=torch.bool, device=v.device)
        gen = torch.zeros_like(v)
        residuals = torch.zeros(count, dtype=v.dtype, device=v.device)
        rows = torch.arange(count, device=v.device)  # the entries still iterating: only they are computed
        steps = 0
        while True:
            gen_rows, ok = _logm_orthogonal_masked(v[rows])
            if not bool(ok.all()) and not surrogate:
                logm_orthogonal(v[rows])  # raises the cut-locus error
            failed[rows] = failed[rows] | ~ok
            c = gen_rows[:, p:, p:]
            res = torch.where(failed[rows], torch.inf, c.norm(dim=(-2, -1)))
            gen[rows], residuals[rows] = gen_rows, res
            moving = (res >= (tol if tols is None else tols[rows])) & ~failed[rows]
            if not bool(moving.any()) or steps >= max_iter:
                break
            rows, gen_rows, c = rows[moving], gen_rows[moving], c[moving]
            phi = torch.linalg.matrix_exp(_trailing_update(gen_rows[:, p:, :p], c))
            v[rows] = torch.cat([v[rows][:, :, :p], v[rows][:, :, p:] @ phi], dim=-1)
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
