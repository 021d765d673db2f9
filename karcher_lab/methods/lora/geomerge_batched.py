"""GeoMerge on many modules at once: the quotient Fréchet mean of :mod:`karcher_lab.methods.lora.geomerge`,
batched over the modules of one update shape.

:func:`geomerge_modules` takes a list of modules, each a list [(G_1, H_1), …, (G_N, H_N)] of the N
adapters' factors (ΔW_i = G_i H_iᵀ), and returns each module's merged (G, H): for every module the
result of :func:`~karcher_lab.methods.lora.geomerge.geomerge_factors` on it, with the same parameters.
Each module is put in the coordinates of its inputs' spans (below), and the modules are grouped by the
shape of those coordinates (N r or d1, N r or d2, r; e.g. every module of a LoRA adapter set with one
rank and widths above N r forms one group); the modules of a group are solved together,
``batch_size`` at a time, by one iteration whose every operation runs on all of them at once as batched
small-matrix operations:

- polar factors (thin QRs and r×r SVDs over [K, N]) and the 'mean' start
  (:func:`~karcher_lab.methods.lora.geomerge.truncated_means`);
- the O(r) alignment of eq. 10 on the K·N (module, input) pairs, each pair with its own reference point,
  tolerance and L-BFGS iteration (:func:`karcher_lab.geometry.lowrank.align`), inside it the Stiefel
  logs (Zimmermann's iteration and the projection surrogate) on 2·K·N frame coordinates;
- the Fréchet solver's step and L-BFGS line search (eq. 11) with per-module masks
  (:func:`karcher_lab.geometry.frechet.frechet_mean_batched`): a module leaves the batch when it has
  converged, and only modules whose line search is still pending evaluate the next trial.

Coordinates of the inputs' spans. Every quantity of the iteration lies in span(U_1, …, U_N) on the
left and span(V_1, …, V_N) on the right: the start (the truncated mean Σ w_i G_i H_iᵀ, or the heaviest
input), the logs (U A + Q B, Q spanning (I − UUᵀ) U_i), Exp (U M + Q N, Q spanning the step's part
orthogonal to U), the tangent projections and the vertical vectors U Ω. With orthonormal bases
E_U [d1, N r] and E_V [d2, N r] of those spans (thin QRs of [G_1 … G_N] and [H_1 … H_N]), U ↦ E_U U' is
an isometric embedding St(N r, r) → St(d1, r) that commutes with Exp, Log, the canonical metric, the
projections and the O(r) action, so the solver runs on (E_Uᵀ U, B, E_Vᵀ V), N r rows instead of d, and
maps the mean back (where N ≥ 2 and N r < d).

Every module follows the iteration the sequential solver runs on it alone (its own start, alignment
tolerances, warm starts, L-BFGS pairs and step lengths; for two inputs, the start on the quotient geodesic,
:func:`karcher_lab.methods.lora.geomerge.geodesic_start`, all modules' alignments of the second input to
the first solved together), so it reaches the same mean, up to rounding
(batched kernels, the span coordinates), within the solver tolerance ``tol``. The errors are the
sequential solver's, raised before any work for bad input, and naming the module.

``device``: where the batch runs (``"cuda"``: the whole batch on the GPU; default: the inputs'
device). On CPU the small-matrix work runs on one intra-op thread; merge in worker processes for more
cores (:func:`karcher_lab.pipeline.lora.merge_lora`'s ``workers``).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from karcher_lab.checks import check_count, resolve_device
from karcher_lab.errors import (
    AntipodalError,
    EmptyInputError,
    KarcherLabError,
    ManifoldError,
    ModelCountError,
    ShapeMismatchError,
)
from karcher_lab.geometry import lowrank, spd
from karcher_lab.geometry.frechet import BatchGeometry, check_weights, frechet_mean_batched
from karcher_lab.geometry.lowrank import Polar, PolarTangent
from karcher_lab.geometry.numerics import single_threaded
from karcher_lab.methods.lora.geomerge import (
    ALIGN_RELATIVE_TOL,
    COLD_ALIGN_TOL,
    check_pairs,
    check_params,
    geodesic_align_tol,
    geodesic_start,
    truncated_means,
)

BATCH_SIZE = 256
"""Modules solved together at most (bounds the memory of the L-BFGS pairs, ~2·memory tangents per module)."""

Pairs = Sequence[tuple[torch.Tensor, torch.Tensor]]


def geomerge_modules(
    modules: Sequence[Pairs],
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
    device: str | torch.device | None = None,
    batch_size: int = BATCH_SIZE,
    names: Sequence[str] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GeoMerge every module: the quotient Fréchet mean of its updates ΔW_i = G_i H_iᵀ (eq. 10–11), batched.

    Parameters
    ----------
    modules : sequence of sequences of (G [d1, r], H [d2, r])
        Per module, the N adapters' factors (N the same for every module; d1, d2, r per module).
    weights : sequence of float or tensor [N], optional
        w_i ≥ 0, the same for every module (default equal; renormalized; zero-weight adapters left out).
    eta, max_iter, tol, init, align_tol, align_max_iter, memory, geodesic
        As for :func:`~karcher_lab.methods.lora.geomerge.geomerge_factors`, applied to every module.
    device : str or torch.device, optional
        Where the solver runs (default: the inputs' device); results come back on the inputs' device.
    batch_size : int
        Modules of one shape solved together at most.
    names : sequence of str, optional
        The modules' names for messages (default "module k").

    Returns
    -------
    list of (G [d1, r], H [d2, r])
        Per module, balanced merged factors with ΔW = G Hᵀ of rank r, in the inputs' dtype promoted to
        at least float32. Warns (RuntimeWarning) naming the modules that stopped at ``max_iter``.

    Raises before any work what :func:`geomerge_factors` raises for one module, its message starting
    with the module's name ("name: …", as every error about one module here);
    EmptyInputError (no modules), ModelCountError (modules with different N), DeviceError (unknown
    device, or CUDA unavailable); AntipodalError after the solve for a module without a unique mean.
    """
    check_params(eta=eta, max_iter=max_iter, tol=tol, init=init, align_tol=align_tol, align_max_iter=align_max_iter,
                 memory=memory, geodesic=geodesic)
    check_count("batch_size", batch_size)
    if isinstance(modules, (str, bytes)) or not isinstance(modules, Sequence):
        raise ShapeMismatchError(f"modules must be a sequence of lists of (G, H) pairs, got {type(modules).__name__}")
    if len(modules) == 0:
        raise EmptyInputError("geomerge_modules needs at least one module")
    names = [f"module {k}" for k in range(len(modules))] if names is None else list(names)
    if len(names) != len(modules):
        raise ShapeMismatchError(f"{len(names)} names for {len(modules)} modules")
    stacked = []
    for name, pairs in zip(names, modules):
        try:
            stacked.append(check_pairs(pairs))
        except KarcherLabError as error:
            raise type(error)(f"{name}: {error}") from error
    counts = sorted({g.shape[0] for g, _ in stacked})
    if len(counts) > 1:
        raise ModelCountError(f"the modules have different numbers of adapters {counts}; geomerge_modules merges "
                              "the same N adapters in every module")
    w_all = check_weights(weights, counts[0])
    target = stacked[0][0].device if device is None else resolve_device(device)
    kept = [i for i in range(counts[0]) if float(w_all[i]) > 0]
    w = (w_all[kept] / w_all[kept].sum()).to(target)

    shapes: dict[tuple[int, int, int], list[int]] = {}
    for k, (g, h) in enumerate(stacked):
        shapes.setdefault((g.shape[1], h.shape[1], g.shape[2]), []).append(k)
    merged: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(modules)
    with single_threaded():  # r×r work: see karcher_lab.geometry.numerics
        # every module in the coordinates of its inputs' spans, grouped by the shape of those coordinates
        groups: dict[tuple[int, int, int], list[tuple[int, Polar, Polar, torch.Tensor | None, torch.Tensor | None]]] = {}
        for members in shapes.values():
            for first in range(0, len(members), batch_size):
                chunk = members[first:first + batch_size]
                g = torch.stack([stacked[k][0][kept] for k in chunk]).to(target)
                h = torch.stack([stacked[k][1][kept] for k in chunk]).to(target)
                points, start, basis_u, basis_v = _prepare(g, h, w, [names[k] for k in chunk], kept, init)
                key = (points.U.shape[-2], points.V.shape[-2], points.U.shape[-1])
                for j, k in enumerate(chunk):
                    groups.setdefault(key, []).append((
                        k, Polar(*(t[j] for t in points)), Polar(*(t[j] for t in start)),
                        None if basis_u is None else basis_u[j], None if basis_v is None else basis_v[j],
                    ))
        for entries in groups.values():
            for first in range(0, len(entries), batch_size):
                chunk = entries[first:first + batch_size]
                points = Polar(*(torch.stack(parts) for parts in zip(*(entry[1] for entry in chunk))))
                start = Polar(*(torch.stack(parts) for parts in zip(*(entry[2] for entry in chunk))))
                means = _solve(points, start, w, [names[entry[0]] for entry in chunk], eta=eta, max_iter=max_iter,
                               tol=tol, align_tol=align_tol, align_max_iter=align_max_iter, memory=memory,
                               geodesic=geodesic)
                for j, (k, _, _, basis_u, basis_v) in enumerate(chunk):
                    g_out, h_out = lowrank.factors_from_polar(_expand(Polar(*(t[j] for t in means)), basis_u, basis_v))
                    first_pair = modules[k][0]
                    dtype = torch.promote_types(torch.promote_types(first_pair[0].dtype, first_pair[1].dtype),
                                                torch.float32)
                    merged[k] = (g_out.to(first_pair[0].device, dtype), h_out.to(first_pair[0].device, dtype))
    return merged


def _polar_points(g: torch.Tensor, h: torch.Tensor, names: list[str], kept: list[int]) -> Polar:
    """Polar factors of every (module, input) [K, N]; ManifoldError naming the first rank-deficient one."""
    try:
        return lowrank.polar_from_factors(g, h)
    except ManifoldError:
        for k, name in enumerate(names):
            for i, adapter in enumerate(kept):
                lowrank.polar_from_factors(g[k, i], h[k, i], name=f"{name}: adapter {adapter}")
        raise


def _lift(point: Polar, like: PolarTangent) -> Polar:
    """``point`` [K, ...] with an axis inserted after the module axis when ``like`` has one more ([K, N, ...])."""
    if like.U.ndim == point.U.ndim + 1:
        return Polar(*(t.unsqueeze(1) for t in point))
    return point


def _input_span(f: torch.Tensor) -> torch.Tensor | None:
    """An orthonormal basis E [K, d, N r] of span(F_1, …, F_N) per module, from a QR of [F_1 … F_N] (f: [K, N, d, r]);
    None where it would not be smaller than d or would have fewer than 2r columns (the Stiefel exp/log need 2r)."""
    k, n, d, r = f.shape
    if n * r >= d or n < 2:
        return None
    return torch.linalg.qr(f.transpose(1, 2).reshape(k, d, n * r))[0]


def _reduce(point: Polar, basis_u: torch.Tensor | None, basis_v: torch.Tensor | None) -> Polar:
    """(EᵤᵀU, B, EᵥᵀV): the point in the coordinates of the inputs' column and row spans (module doc);
    ``point`` [K, ...] or [K, N, ...]; a None basis leaves its factor as it is."""

    def coordinates(basis, t):
        if basis is None:
            return t
        return (basis.unsqueeze(1) if t.ndim == basis.ndim + 1 else basis).mT @ t

    return Polar(coordinates(basis_u, point.U), point.B, coordinates(basis_v, point.V))


def _expand(point: Polar, basis_u: torch.Tensor | None, basis_v: torch.Tensor | None) -> Polar:
    """(Eᵤ U, B, Eᵥ V): back from the coordinates of :func:`_reduce`."""
    return Polar(point.U if basis_u is None else basis_u @ point.U, point.B,
                 point.V if basis_v is None else basis_v @ point.V)


def _prepare(g, h, w, names, kept, init):
    """For K modules of one shape (g [K, N, d1, r], h [K, N, d2, r], float64): the inputs' polar factors
    [K, N] and the starts [K], in the coordinates of the inputs' spans, and those spans' bases (or None)."""
    points = _polar_points(g, h, names, kept)
    scale = (w * points.B.diagonal(dim1=-2, dim2=-1).amax(-1)).sum(-1)
    first = Polar(*(t[:, int(torch.argmax(w))] for t in points))
    if init == "mean":
        start, ok = truncated_means(g, h, w, scale)
        start = Polar(*(torch.where(ok.reshape(-1, 1, 1), a, b) for a, b in zip(start, first)))
    else:
        start = first
    basis_u, basis_v = _input_span(g), _input_span(h)
    return _reduce(points, basis_u, basis_v), _reduce(start, basis_u, basis_v), basis_u, basis_v


def _solve(points, start, w, names, *, eta, max_iter, tol, align_tol, align_max_iter, memory, geodesic) -> Polar:
    """The quotient Fréchet means [K] of K modules' inputs ``points`` [K, N] (one shape), from ``start`` [K]."""
    k, n, r = points.U.shape[0], points.U.shape[1], points.U.shape[-1]
    device = points.U.device

    cache = spd.EighCache(size=16)  # the iterates' B eigendecompositions, reused within an iteration
    log_starts = torch.zeros(k, 2, n, 2 * r, r, dtype=torch.float64, device=device)
    align_tols = torch.full((k,), max(float(align_tol), COLD_ALIGN_TOL), dtype=torch.float64, device=device)
    fallbacks = torch.zeros(k, dtype=torch.int64, device=device)

    def align(mu: Polar, xs: Polar, rows: torch.Tensor, *, warm_start: bool = True,
              fresh_logs: bool = False) -> tuple[Polar, PolarTangent]:
        """Eq. 10 for the modules ``rows``: every input of module j aligned to mu[j], with module j's warm
        starts and tolerance (max(align_tol, ALIGN_RELATIVE_TOL × its gradient norm), as the sequential solver);
        ``fresh_logs``: warm from the identity, the Stiefel logs from their own start (a new reference point)."""
        kk = rows.numel()
        point = Polar(*(t.unsqueeze(1).expand(kk, n, *t.shape[1:]).reshape(kk * n, *t.shape[1:]) for t in mu))
        starts = None
        if warm_start and not fresh_logs:
            starts = log_starts[rows].transpose(0, 1).reshape(2 * kk * n, 2 * r, r)
        result = lowrank.align(
            point,
            Polar(*(t.reshape(kk * n, *t.shape[2:]) for t in xs)),
            warm_start=warm_start,
            log_starts=starts,
            tol=align_tols[rows].repeat_interleave(n),
            max_iter=align_max_iter,
            log_surrogate=True,
        )
        aligned = Polar(*(t.reshape(kk, n, *t.shape[1:]) for t in result.aligned))
        logs = PolarTangent(*(t.reshape(kk, n, *t.shape[1:]) for t in result.log))
        grad_norm = lowrank.norm(mu, PolarTangent(*(torch.tensordot(t, w, dims=([1], [0])) for t in logs)), cache=cache)
        log_starts[rows] = result.log_starts.reshape(2, kk, n, 2 * r, r).transpose(0, 1)
        align_tols[rows] = (ALIGN_RELATIVE_TOL * grad_norm).clamp_min(align_tol)
        fallbacks[rows] = result.log_fallback.to(device).reshape(2, kk, n).sum(dim=(0, 2))
        return aligned, logs

    all_rows = torch.arange(k, device=device)
    aligned, _ = align(start, points, all_rows, warm_start=False)  # cold: only O(r)-equivariant candidates
    if geodesic and n == 2:  # the mean lies on the quotient geodesic (geomerge module doc, "Two inputs")
        geodesic_tol = geodesic_align_tol(align_tol, tol)
        mean0, reps, ok, _ = geodesic_start(aligned, w, tol=geodesic_tol, max_iter=align_max_iter)
        if bool(ok.any()):
            rows = torch.nonzero(ok).flatten()
            start = Polar(*(t.index_copy(0, rows, m[rows]) for t, m in zip(start, mean0)))
            align_tols[rows] = geodesic_tol
            part, _ = align(Polar(*(t[rows] for t in mean0)), Polar(*(t[rows] for t in reps)), rows, fresh_logs=True)
            aligned = Polar(*(t.index_copy(0, rows, p) for t, p in zip(aligned, part)))
    geometry = BatchGeometry(
        exp=lambda mu, xi: lowrank.exp(mu, xi, cache=cache),
        inner=lambda mu, a, b: lowrank.inner(_lift(mu, a), a, b, cache=cache),
        align=align,
        horizontal=lambda mu, xi: lowrank.horizontal(mu, xi, cache=cache),
        transport=lambda mu, nu, xi: lowrank.transport(_lift(mu, xi), _lift(nu, xi), xi, cache=cache),
    )
    mean, traces = frechet_mean_batched(geometry, aligned, w, start, eta=eta, max_iter=max_iter, tol=tol, memory=memory,
                                        labels=names)
    bad = torch.nonzero(fallbacks).flatten().tolist()
    if bad:
        raise AntipodalError(
            f"{names[bad[0]]}: at the last iterate {int(fallbacks[bad[0]])} of the {2 * n} Stiefel logs "
            "are undefined (cut locus) or beyond Zimmermann's iteration, so it is no quotient Fréchet mean: the "
            "inputs have no unique mean (e.g. ΔW and −ΔW)"
        )
    stopped = [(name, trace) for name, trace in zip(names, traces) if not trace.converged]
    if stopped:
        warnings.warn(
            f"geomerge stopped after {max_iter} iterations without reaching tol {tol:g} on {len(stopped)} module(s) "
            f"({', '.join(f'{name}: gradient norm {trace.residual:.3g}' for name, trace in stopped[:5])}); the "
            "results are the last iterates (raise max_iter or tol)",
            RuntimeWarning,
            stacklevel=4,
        )
    return mean
