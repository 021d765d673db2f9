"""GeoMerge for LoRA: the quotient Fréchet mean of rank-r updates (GeoMerge paper §2.2, §3.6, eq. 10–11).

Each adapter's update ΔW_i = G_i H_iᵀ (G_i: d1×r, H_i: d2×r) is a point of the fixed-rank quotient
manifold, represented by its polar factors θ_i = (U_i, B_i, V_i) ∈ St(d1, r) × S++(r) × St(d2, r)
modulo O(r) (:mod:`karcher_lab.geometry.lowrank`). The merge is the weighted Fréchet mean on the
quotient,

    [μ*] = argmin_[μ] ½ Σ_i w_i d([μ], [θ_i])²,     d([μ], [θ]) = min_{O ∈ O(r)} d(μ, θ·O),

computed as in the paper's algorithm by alternating (1) alignment of every input to the current
iterate, θ_i* = θ_i·O_i* (eq. 10, :func:`karcher_lab.geometry.lowrank.align`), and (2) a horizontal
Riemannian gradient step μ ← Exp_μ(η · hor(Σ_i w_i Log_μ θ_i*)) on the product manifold (eq. 11),
until ‖hor(Σ_i w_i Log_μ θ_i*)‖ < tol (:func:`karcher_lab.geometry.frechet.frechet_mean`).

Invariance. Only polar factors enter, and both the metric and the alignment are O(r)-invariant, so the
merged ΔW does not depend on how each ΔW_i is factored: (G_i A⁻¹, H_i Aᵀ) for any A ∈ GL(r) gives the
same merge (the paper's core claim), up to the solver's tolerance (the mean is fixed to about
tol / curvature). The merged update has rank r.

Solver. The outer iteration is the paper's (align, then step along the horizontal gradient) with two
additions that leave its fixed point and stopping rule unchanged:

- the step direction is a Riemannian L-BFGS direction (``memory`` pairs, vector transport by
  projection, Armijo backtracking on the Fréchet objective; ``memory=0`` gives the plain step
  μ ← Exp_μ(η v) of eq. 11). The objective is nearly flat along directions where the inputs' column
  spaces are far apart (the Hessian of ½d² is ≈ θ cot θ → 0 at principal angles θ → π/2), where
  plain gradient steps converge linearly at rates close to 1;
- each alignment stops at max(``align_tol``, ``ALIGN_RELATIVE_TOL`` × the current gradient norm), since
  an inexact alignment perturbs the gradient by about its residual; alignments are warm-started from
  the previous iterate's (the rotations' Stiefel logs; each alignment's L-BFGS starts afresh). The cold
  alignment to the start runs to max(``align_tol``, ``COLD_ALIGN_TOL``). These choices select the local
  minimum: the quotient Fréchet objective of far-apart adapters has several, and which one the solver
  reaches is decided by where each input's alignment settles (a cold alignment stopped at its
  closed-form candidate or at residual 1e-2, or L-BFGS pairs carried from one alignment to the next,
  reach other local minima on real adapters' modules; benchmarks/README.md).

Start (``init``). ``"mean"`` (default): the rank-r truncated SVD of the weighted Euclidean mean
Σ w_i ΔW_i, computed from the stacked factors (thin QRs and an (N r)×(N r) SVD, no d1×d2 matrix); it
depends only on the ΔW_i, so it keeps the invariance. If that mean has (numerically) rank < r
(updates that cancel; ``START_RTOL``), the start falls back to ``"first"``: the input with the largest
weight (first among ties). The trace records which start was used.

Two inputs. For N = 2 the quotient Fréchet mean lies on a quotient geodesic: for any [μ],
d([μ], [θ_1]) + d([μ], [θ_2]) ≥ d([θ_1], [θ_2]) = D, and w_1 a² + w_2 b² with a + b = D is smallest at
a = w_2 D, so the minimizer is the point at t = w_2 of a minimizing geodesic from [θ_1] to [θ_2], whose
horizontal lift is the geodesic from θ_1 to θ_2·O* with O* = argmin_O d(θ_1, θ_2·O) (the SLERP of the
quotient). The solver uses this (:func:`geodesic_start`): after the cold alignment of both inputs to the
start (which selects the basin, as for N > 2), θ_2 is aligned to θ_1 (warm, from the identity, to
max(``align_tol``, ``GEODESIC_ALIGN_FRACTION`` × ``tol``)), and the outer iteration starts at
μ_0 = Exp_{θ_1}(w_2 Log_{θ_1}(θ_2·O*)), where its gradient is a fraction of that alignment's residual; the
iteration's own test (‖v‖ < ``tol``) then ends it at once or it continues from there (``geodesic=False``
leaves this out: the outer iteration from the start, as for N > 2). One alignment on
O(r) replaces the outer iterations, whose count on far-apart adapters is set by the curvature that the
quotient's realignment removes (benchmarks/README.md). Where that alignment meets a log beyond its reach
(the surrogate), the start stays the one above.

Logs beyond their domain. Inputs with nearly orthogonal column spaces (common for real LoRA adapters)
put the start, a cold alignment candidate or a line-search trial as far from an input as the Stiefel cut
locus, where Zimmermann's log iteration meets a rotation by π (AntipodalError) or does not converge
(ConvergenceError), while the mean itself is within reach. There, and only for the affected U or V
log, the solver uses the projection surrogate Proj_{T_U}(Y − U)
(:func:`karcher_lab.geometry.stiefel.surrogate_coordinates`: the negative Riemannian gradient of
½‖U − Y‖²_F, a descent direction defined everywhere that agrees with Log_U(Y) up to O(d²)); such an
alignment entry keeps its start rotation, and the objective counts ½‖surrogate‖² for it. The surrogate
is O(r)-equivariant (skew(M O) … for Y·O), so the invariance holds. The trace counts these logs per
evaluation (``log_fallbacks``; ``surrogates_computed`` also counts discarded candidates and trials).
The returned mean must have exact logs only: if its last iterate still needs the surrogate, the inputs
have no unique mean (ΔW and −ΔW of rank 1: antipodal Stiefel columns) or none within the log's reach,
and AntipodalError is raised.

Many modules. :func:`karcher_lab.methods.lora.geomerge_batched.geomerge_modules` runs this solver on
many modules at once (batched small-matrix operations, per-module convergence), with the same result
per module.

Numerics. All geometry is float64; the output factors have the inputs' dtype promoted to at least
float32 and are balanced, G = U_s √Σ and H = V_s √Σ with U_s Σ V_sᵀ the SVD of the merged ΔW (columns
by decreasing singular value).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch

from karcher_lab.errors import AntipodalError, EmptyInputError, NotSupportedError, ParameterError, ShapeMismatchError
from karcher_lab.geometry import lowrank, spd
from karcher_lab.geometry.frechet import FrechetTrace, Geometry, check_solver_params, check_weights, frechet_mean
from karcher_lab.geometry.lowrank import Polar
from karcher_lab.geometry.numerics import single_threaded

ALIGN_RELATIVE_TOL = 1e-1
"""Each alignment stops at max(align_tol, ALIGN_RELATIVE_TOL × the previous gradient norm): an inexact
alignment perturbs the gradient by about its residual, so early iterates need no finer one."""

COLD_ALIGN_TOL = 1e-4
"""The cold alignment of the inputs to the start stops at max(align_tol, COLD_ALIGN_TOL): its residual
perturbs the first gradient (norm ~1 for far-apart adapters) by ~1e-4, where every later alignment may
perturb it by ALIGN_RELATIVE_TOL; from its closed-form candidates the cold alignment converges only
linearly, so its last decades to align_tol are costly (benchmarks/README.md)."""

GEODESIC_ALIGN_FRACTION = 1e-1
"""For two inputs, the alignment of the second to the first (the quotient geodesic, module doc) stops at
max(align_tol, GEODESIC_ALIGN_FRACTION × tol): the gradient at the geodesic point is then a fraction of its
residual, below the solver's ``tol``."""

START_RTOL = 1e-8
"""The 'mean' start falls back to 'first' when the mean update's σ_r is below this fraction of the inputs'
weighted mean σ_1 (its rank-r part would be rounding noise)."""

GEOMERGE_INITS: tuple[str, ...] = ("mean", "first")
"""Starting points: 'mean' = rank-r truncation of the weighted mean ΔW (default), 'first' = the heaviest input."""


@dataclass(frozen=True)
class GeoMergeTrace:
    """What geomerge did: the outer Fréchet iteration (``frechet``: gradient norms and objective per
    iterate), per outer iterate the alignment steps taken (``align_iterations``, the first entry is the
    cold alignment to the start) and the largest alignment residual (``align_residuals``), the start
    used (``init``), the inputs kept (``kept``: indices with non-zero weight) and, per alignment, how
    many of the 2N Stiefel logs (U's and V's) that enter F and the gradient were the projection
    surrogate (``log_fallbacks``; module doc) and how many surrogate logs it computed in all
    (``surrogates_computed``: closed-form candidates and rejected alignment trials included). Entries are
    per evaluation of the objective, rejected Fréchet line-search trials included; the last is the
    returned mean's. ``geodesic_iterations``: for two inputs, the steps of the alignment of the second to
    the first whose geodesic gave the solver its start (module doc, "Two inputs"); None where that start
    was not used."""

    frechet: FrechetTrace
    align_iterations: list[int]
    align_residuals: list[float]
    init: str
    kept: list[int]
    log_fallbacks: list[int]
    surrogates_computed: list[int]
    geodesic_iterations: int | None = None

    @property
    def converged(self) -> bool:
        return self.frechet.converged

    @property
    def iterations(self) -> int:
        return self.frechet.iterations

    @property
    def residual(self) -> float:
        return self.frechet.residual

    @property
    def final_fallbacks(self) -> int:
        """Stiefel logs at the returned mean that are the surrogate (0: the exact quotient Fréchet mean)."""
        return self.log_fallbacks[-1]


def check_pairs(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's [(G_1, H_1), …] checked (see :func:`geomerge_factors`), stacked in float64: G [N, d1, r], H [N, d2, r]."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise ShapeMismatchError(f"pairs must be a sequence of (G, H) tuples, got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise EmptyInputError("geomerge needs at least one (G, H) pair")
    gs, hs = [], []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ShapeMismatchError(f"adapter {i}: expected a (G, H) pair, got {type(pair).__name__}")
        g, h = pair
        for label, x in (("G", g), ("H", h)):
            if not isinstance(x, torch.Tensor) or x.ndim != 2:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ShapeMismatchError(f"adapter {i}: {label} must be a 2-D tensor [d, r], got {shape}")
        lowrank.check_factors(g, h, f"adapter {i}")
        if 2 * g.shape[-1] > min(g.shape[0], h.shape[0]):
            raise NotSupportedError(
                f"adapter {i}: rank r = {g.shape[-1]} > min(d1, d2)/2 = {min(g.shape[0], h.shape[0]) / 2:g}; the "
                "Stiefel exp/log need d ≥ 2r"
            )
        if (g.shape, h.shape) != (pairs[0][0].shape, pairs[0][1].shape):
            raise ShapeMismatchError(
                f"adapter {i} has G {tuple(g.shape)}, H {tuple(h.shape)} but adapter 0 has "
                f"G {tuple(pairs[0][0].shape)}, H {tuple(pairs[0][1].shape)} (same d1, d2 and rank r needed)"
            )
        if g.device != pairs[0][0].device or h.device != pairs[0][0].device:
            raise ShapeMismatchError(f"adapter {i} is on {g.device}/{h.device}, adapter 0 on {pairs[0][0].device}")
        gs.append(g)
        hs.append(h)
    return torch.stack([g.to(torch.float64) for g in gs]), torch.stack([h.to(torch.float64) for h in hs])


def check_params(*, eta, max_iter, tol, init, align_tol, align_max_iter, memory, geodesic) -> None:
    """ParameterError / StepSizeError for bad solver parameters of :func:`geomerge_factors`."""
    check_solver_params(eta=eta, max_iter=max_iter, tol=tol)
    if init not in GEOMERGE_INITS:
        raise ParameterError(f"unknown init {init!r}; choose one of {list(GEOMERGE_INITS)}")
    if isinstance(align_tol, bool) or not (isinstance(align_tol, (int, float)) and align_tol > 0):
        raise ParameterError(f"align_tol must be a positive number, got {align_tol!r}")
    if isinstance(align_max_iter, bool) or not isinstance(align_max_iter, int) or align_max_iter < 0:
        raise ParameterError(f"align_max_iter must be a non-negative int, got {align_max_iter!r}")
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise ParameterError(f"memory must be a non-negative int, got {memory!r}")
    if not isinstance(geodesic, bool):
        raise ParameterError(f"geodesic must be True or False, got {geodesic!r}")


def truncated_means(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> tuple[Polar, torch.Tensor]:
    """Polar factors of the rank-r truncated SVD of Σ_i w_i G_i H_iᵀ, and whether its σ_r > START_RTOL · scale
    (``scale``: the inputs' weighted mean largest singular value; False where the updates (nearly) cancel).

    ``g`` [..., N, d1, r], ``h`` [..., N, d2, r], ``w`` [N], ``scale`` [...] (leading axes: modules).
    Σ_i w_i G_i H_iᵀ = [w_1 G_1 … w_N G_N] [H_1 … H_N]ᵀ: thin QRs of the stacked d×(N r) factors and an
    SVD of the (N r)×(N r) core.
    """
    n, d1, r = g.shape[-3:]
    stacked_g = (g * w[:, None, None]).transpose(-3, -2).reshape(*g.shape[:-3], d1, n * r)
    stacked_h = h.transpose(-3, -2).reshape(*h.shape[:-3], h.shape[-2], n * r)
    qg, rg = torch.linalg.qr(stacked_g)
    qh, rh = torch.linalg.qr(stacked_h)
    p, sigma, zt = torch.linalg.svd(rg @ rh.mT)
    ok = sigma[..., r - 1] > START_RTOL * scale
    return Polar(qg @ p[..., :r], torch.diag_embed(sigma[..., :r]), qh @ zt[..., :r, :].mT), ok


def geodesic_align_tol(align_tol: float, tol: float) -> float:
    """The threshold of the alignment behind :func:`geodesic_start`: max(align_tol, GEODESIC_ALIGN_FRACTION × tol)."""
    return max(float(align_tol), GEODESIC_ALIGN_FRACTION * tol)


def geodesic_start(
    aligned: Polar, w: torch.Tensor, *, tol: float, max_iter: int
) -> tuple[Polar, Polar, torch.Tensor, int]:
    """For two inputs: the point at t = w_2 of the quotient geodesic from [θ_1] to [θ_2] (module doc, "Two inputs").

    ``aligned``: the two inputs of K modules [K, 2, ...], aligned to a common start; ``w`` [2] (Σ w = 1).
    θ_2 is aligned to θ_1 (warm, from the identity: O* a local minimum of d(θ_1, θ_2·O), L-BFGS to
    ``tol``), then μ_0 = Exp_{θ_1}(w_2 Log_{θ_1}(θ_2·O*)).

    Returns μ_0 [K, ...], the representatives (θ_1, θ_2·O*) [K, 2, ...], ok [K]: False where a Stiefel log
    of the alignment is the projection surrogate (cut locus or beyond Zimmermann's iteration: no geodesic
    to follow; μ_0 and the representatives of those modules are placeholders), and the alignment steps
    taken (max over the modules).
    """
    first = Polar(*(t[:, 0] for t in aligned))
    second = Polar(*(t[:, 1] for t in aligned))
    result = lowrank.align(first, second, warm_start=True, tol=tol, max_iter=max_iter, log_surrogate=True)
    ok = ~result.log_fallback.to(first.U.device).reshape(2, -1).any(dim=0)
    mean = lowrank.exp(first, lowrank.PolarTangent(*(w[1] * t for t in result.log)))
    return mean, Polar(*(torch.stack([a, b], dim=1) for a, b in zip(first, result.aligned))), ok, result.iterations


def geomerge_factors(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    eta: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-6,
    init: str = "mean",
    align_tol: float = 1e-9,
    align_max_iter: int = lowrank.ALIGN_MAX_ITER,
    memory: int = 8,
    geodesic: bool = True,
    return_trace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, GeoMergeTrace]:
    """Merge LoRA updates ΔW_i = G_i H_iᵀ into one rank-r update ΔW = G Hᵀ by the quotient Fréchet mean.

    ``pairs``: [(G_1, H_1), …] with G_i [d1, r], H_i [d2, r] (for a PEFT adapter, G = lora_B · scaling
    and H = lora_Aᵀ); ``weights``: w_i ≥ 0 (default equal; renormalized; zero-weight adapters are left
    out). ``eta`` ∈ (0, 1] is the step size of eq. 9/11, ``max_iter`` and ``tol`` the outer iteration's
    cap and its stopping threshold on the horizontal gradient norm; ``align_tol`` (the floor of every
    alignment's threshold, module doc) / ``align_max_iter`` are the orbit alignment's
    (:func:`karcher_lab.geometry.lowrank.align`); ``init`` the start and
    ``memory`` the L-BFGS memory of the outer iteration (0: the paper's plain gradient step; module doc);
    ``geodesic``: for two adapters, start the outer iteration on the quotient geodesic, where their mean
    lies (module doc, "Two inputs"; False: from ``init`` as for more adapters, the paper's iteration as such).
    Returns balanced (G, H) with ΔW = G Hᵀ of rank r, plus a :class:`GeoMergeTrace` with
    ``return_trace``. Warns (RuntimeWarning) if the iteration stops at ``max_iter`` without converging.

    Raises before any work: EmptyInputError (no pairs), ShapeMismatchError (not 2-D, mismatched d1, d2
    or r, r > min(d1, d2)), NotSupportedError (2r > min(d1, d2)), NonFiniteError, WeightError (wrong
    length, negative, non-finite, all zero), StepSizeError / ParameterError (bad solver parameters); ManifoldError if some ΔW_i has rank < r.
    """
    check_params(eta=eta, max_iter=max_iter, tol=tol, init=init, align_tol=align_tol, align_max_iter=align_max_iter,
                 memory=memory, geodesic=geodesic)
    g, h = check_pairs(pairs)
    w_all = check_weights(weights, g.shape[0]).to(g.device)
    with single_threaded():  # r×r work: see karcher_lab.geometry.numerics
        return _geomerge(pairs, g, h, w_all, eta, max_iter, tol, init, align_tol, align_max_iter, memory, geodesic,
                         return_trace)


def _geomerge(pairs, g, h, w_all, eta, max_iter, tol, init, align_tol, align_max_iter, memory, geodesic, return_trace):
    """The work of :func:`geomerge_factors` after its checks."""
    kept = [i for i in range(g.shape[0]) if float(w_all[i]) > 0]
    points = [lowrank.polar_from_factors(g[i], h[i], name=f"adapter {i}") for i in kept]
    points = Polar(*(torch.stack(parts) for parts in zip(*points)))
    w = w_all[kept] / w_all[kept].sum()
    out_dtype = torch.promote_types(torch.promote_types(pairs[0][0].dtype, pairs[0][1].dtype), torch.float32)

    scale = (w * points.B.diagonal(dim1=-2, dim2=-1).amax(-1)).sum()
    start, ok = truncated_means(g[kept], h[kept], w, scale) if init == "mean" else (None, False)
    used_init = "mean" if bool(ok) else "first"
    if not bool(ok):
        heaviest = int(torch.argmax(w))
        start = Polar(points.U[heaviest], points.B[heaviest], points.V[heaviest])

    align_iterations: list[int] = []
    align_residuals: list[float] = []
    log_fallbacks: list[int] = []
    surrogates_computed: list[int] = []

    state = {"log_starts": None, "tol": max(align_tol, COLD_ALIGN_TOL)}
    cache = spd.EighCache()  # the eigendecompositions of the iterates' B, reused across the solver's calls

    def align(mu: Polar, xs: Polar, *, warm_start: bool = True) -> tuple[Polar, lowrank.PolarTangent]:
        result = lowrank.align(
            mu,
            xs,
            warm_start=warm_start,
            log_starts=state["log_starts"],
            tol=state["tol"],
            max_iter=align_max_iter,
            log_surrogate=True,
            cache=cache,
        )
        # far from the mean the alignment need not be finer than a fraction of the gradient it feeds
        grad_norm = float(
            lowrank.norm(mu, lowrank.PolarTangent(*(torch.tensordot(w, t, dims=1) for t in result.log)), cache=cache)
        )
        state["log_starts"], state["tol"] = result.log_starts, max(align_tol, ALIGN_RELATIVE_TOL * grad_norm)
        align_iterations.append(result.iterations)
        align_residuals.append(float(result.residuals.max()))
        log_fallbacks.append(int(result.log_fallback.sum()))
        surrogates_computed.append(result.surrogates)
        return result.aligned, result.log

    aligned, _ = align(start, points, warm_start=False)  # cold: only O(r)-equivariant candidates
    geodesic_iterations = None
    if geodesic and len(kept) == 2:  # the mean lies on the quotient geodesic (module doc, "Two inputs")
        geodesic_tol = geodesic_align_tol(align_tol, tol)
        mean0, reps, ok, steps = geodesic_start(Polar(*(t[None] for t in aligned)), w, tol=geodesic_tol,
                                                max_iter=align_max_iter)
        if bool(ok[0]):
            start, geodesic_iterations = Polar(*(t[0] for t in mean0)), steps
            state["log_starts"], state["tol"] = None, geodesic_tol  # the logs from the new start: fresh
            aligned, _ = align(start, Polar(*(t[0] for t in reps)))
    geometry = Geometry(
        exp=partial(lowrank.exp, cache=cache),
        log=partial(lowrank.log, cache=cache),
        inner=partial(lowrank.inner, cache=cache),
        align=align,
        horizontal=partial(lowrank.horizontal, cache=cache),
        transport=partial(lowrank.transport, cache=cache),
    )
    mean, ftrace = frechet_mean(geometry, aligned, w, start, eta=eta, max_iter=max_iter, tol=tol, memory=memory)
    if log_fallbacks[-1]:
        raise AntipodalError(
            f"geomerge: at the last iterate {log_fallbacks[-1]} of the {2 * len(kept)} Stiefel logs are undefined "
            "(cut locus) or beyond Zimmermann's iteration, so it is no quotient Fréchet mean: the inputs have no "
            "unique mean (e.g. ΔW and −ΔW)"
        )
    if not ftrace.converged:
        warnings.warn(
            f"geomerge stopped after {ftrace.iterations} iterations with gradient norm {ftrace.residual:.3g} "
            f"≥ tol {tol:g}; the result is the last iterate (raise max_iter or tol)",
            RuntimeWarning,
            stacklevel=4,
        )
    g_out, h_out = lowrank.factors_from_polar(mean)
    g_out, h_out = g_out.to(out_dtype), h_out.to(out_dtype)
    if not return_trace:
        return g_out, h_out
    trace = GeoMergeTrace(
        frechet=ftrace,
        align_iterations=align_iterations,
        align_residuals=align_residuals,
        init=used_init,
        kept=kept,
        log_fallbacks=log_fallbacks,
        surrogates_computed=surrogates_computed,
        geodesic_iterations=geodesic_iterations,
    )
    return g_out, h_out, trace
