"""A generic weighted Fréchet (Karcher) mean solver on a Riemannian manifold or a quotient (GeoMerge §3.1, §3.5, §3.6).

Given points x_1 … x_N and weights w_i ≥ 0 (renormalized to Σ w_i = 1), the Fréchet mean minimizes
F(μ) = ½ Σ w_i d(μ, x_i)² (eq. 6). Where the logarithm is defined, grad F(μ) = −Σ w_i Log_μ(x_i)
(eq. 8), and Riemannian gradient descent with step η is

    v_k = Σ_i w_i Log_{μ_k}(x_i),     μ_{k+1} = Exp_{μ_k}(η v_k)      (eq. 9),

stopped when ‖v_k‖_{μ_k} < tol (the first-order condition). On a quotient M̄/G (§3.6) each iteration
first aligns the points to the current iterate, x_i ← x_i·G_i* with G_i* = argmin_G d(μ_k, x_i·G)
(eq. 10), then steps along the horizontal part of v_k (eq. 11). The aligned representatives of one
iteration are the warm start of the next.

The manifold is described by a :class:`Geometry` of pure functions. Points and tangent vectors are
tensors or named tuples of tensors (a product manifold); a *batch* of points carries a leading axis of
length N in every tensor. :data:`SPHERE` is the unit sphere (the Fisher–Rao Karcher merge of the first
paper runs this iteration in coefficient space, :mod:`karcher_lab.geometry.karcher_mean`; this solver
reproduces it directly in the ambient space); the LoRA quotient geometry is built in
:mod:`karcher_lab.methods.lora.geomerge`. :func:`frechet_mean_batched` runs the same iteration on K
independent problems at once (a :class:`BatchGeometry`: every map batched over a leading module axis),
each problem with its own step, L-BFGS pairs, line search and stopping test.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from karcher_lab import checks
from karcher_lab.errors import AntipodalError, ConvergenceError, ManifoldError, ParameterError
from karcher_lab.geometry import sphere

Point = Any
"""A tensor or a named tuple of tensors."""


@dataclass(frozen=True)
class Geometry:
    """What the solver needs from a manifold.

    - ``exp(μ, v)``: Exp_μ(v) for one point and one tangent vector;
    - ``log(μ, xs)``: Log_μ(x_i) for a batch of points (leading axis N), returning a batch of tangents;
    - ``inner(μ, u, v)``: ⟨u, v⟩_μ, broadcasting over a leading batch axis of u and v;
    - ``align(μ, xs)`` (quotients only): ``(aligned xs, Log_μ of them)``, the orbit minimization of eq. 10
      (it computes the logs anyway, so they are returned rather than recomputed);
    - ``horizontal(μ, v)`` (quotients only): the projection of v onto the horizontal space at μ;
    - ``transport(μ, ν, v)`` (only for ``memory`` > 0): a vector transport of v from T_μ to T_ν (e.g. the
      orthogonal projection onto T_ν, then onto the horizontal space at ν).
    """

    exp: Callable[[Point, Point], Point]
    log: Callable[[Point, Point], Point]
    inner: Callable[[Point, Point, Point], torch.Tensor]
    align: Callable[[Point, Point], tuple[Point, Point]] | None = None
    horizontal: Callable[[Point, Point], Point] | None = None
    transport: Callable[[Point, Point, Point], Point] | None = None


@dataclass(frozen=True)
class FrechetTrace:
    """What the iteration did: ``residuals[k]`` = ‖v_k‖ and ``objectives[k]`` = ½ Σ w_i ‖Log_{μ_k} x_i‖²
    at iterate k = 0 … iterations (float64, CPU)."""

    residuals: torch.Tensor
    objectives: torch.Tensor
    iterations: int
    tol: float
    eta: float
    max_iter: int

    @property
    def converged(self) -> bool:
        """‖v‖ < tol (or exactly 0) at the returned mean."""
        last = float(self.residuals[-1])
        return last < self.tol or last == 0.0

    @property
    def residual(self) -> float:
        return float(self.residuals[-1])


def tree_map(fn: Callable[..., torch.Tensor], *trees: Point) -> Point:
    """Apply ``fn`` leafwise to tensors or to (named) tuples of tensors of the same structure."""
    first = trees[0]
    if isinstance(first, tuple):
        leaves = [tree_map(fn, *parts) for parts in zip(*trees)]
        return type(first)(*leaves) if hasattr(first, "_fields") else tuple(leaves)
    return fn(*trees)


def weighted_sum(weights: torch.Tensor, batch: Point) -> Point:
    """Σ_i w_i t_i over the leading axis of every tensor in ``batch``."""
    return tree_map(lambda t: torch.tensordot(weights.to(t.dtype), t, dims=1), batch)


def check_weights(weights: Sequence[float] | torch.Tensor | None, n: int) -> torch.Tensor:
    """The solver's weights α = w / Σ w, float64 [n] (None: equal), by :func:`karcher_lab.checks.check_weights`."""
    return checks.check_weights(weights, n, normalize=True, what="points")


def check_solver_params(*, eta: float, max_iter: int, tol: float) -> None:
    """:func:`karcher_lab.checks.check_solver_params`, citing eq. 9 of the GeoMerge paper for the step size."""
    checks.check_solver_params(eta=eta, max_iter=max_iter, tol=tol, equation="eq. 9 of the GeoMerge paper")


def _dot(geometry: Geometry, mu: Point, u: Point, v: Point) -> float:
    return float(geometry.inner(mu, u, v))


def _axpy(a: float, x: Point, y: Point) -> Point:
    """a x + y, leafwise."""
    return tree_map(lambda xi, yi: a * xi + yi, x, y)


def frechet_mean(
    geometry: Geometry,
    points: Point,
    weights: Sequence[float] | torch.Tensor | None,
    init: Point,
    *,
    eta: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-10,
    memory: int = 0,
) -> tuple[Point, FrechetTrace]:
    """Weighted Fréchet mean by Riemannian gradient descent (eq. 9), with alignment on quotients (eq. 10–11).

    ``points`` is a batch (leading axis N), ``init`` the starting point μ_0. With ``memory`` = 0 (the
    paper's iteration) every step is μ ← Exp_μ(η v), v = hor(Σ w_i Log_μ x_i) = −grad F. With
    ``memory`` = m > 0 the step direction is the Riemannian L-BFGS direction built from the last m
    (step, gradient change) pairs, carried along by ``geometry.transport``, with Armijo backtracking
    on F (the first step, and any step whose direction is not a descent direction, is η v; a trial point
    whose logs fail, ConvergenceError, AntipodalError or ManifoldError, counts as a rejected step; the
    step is capped at the distance to the farthest point). Same fixed
    point, same stopping rule ‖v‖ < tol; L-BFGS needs far fewer iterations where F is flat in some
    directions (far-apart points on a positively curved manifold). Returns the mean (the last iterate)
    and a :class:`FrechetTrace`; whether it converged is ``trace.converged`` (the caller decides
    whether non-convergence is an error).
    """
    check_solver_params(eta=eta, max_iter=max_iter, tol=tol)
    checks.check_count("memory", memory, 0)
    if memory > 0 and geometry.transport is None:
        raise ParameterError("memory > 0 (L-BFGS) needs a geometry with a vector transport")
    n = tree_leaves(points)[0].shape[0]
    w = check_weights(weights, n).to(tree_leaves(points)[0].device)

    def evaluate(mu: Point, xs: Point) -> tuple[Point, Point, float, float]:
        """Aligned points, v = hor(Σ w_i Log_μ x_i), F(μ) = ½ Σ w_i ‖Log_μ x_i‖² and max_i ‖Log_μ x_i‖."""
        if geometry.align is not None:
            xs, logs = geometry.align(mu, xs)
        else:
            logs = geometry.log(mu, xs)
        v = weighted_sum(w, logs)
        if geometry.horizontal is not None:
            v = geometry.horizontal(mu, v)
        sq = geometry.inner(mu, logs, logs).to(w.dtype)
        return xs, v, 0.5 * float((w * sq).sum()), float(sq[w > 0].max().clamp_min(0).sqrt())

    mu = init
    points, v, value, radius = evaluate(mu, points)
    residuals, objectives = [float(geometry.inner(mu, v, v).clamp_min(0).sqrt())], [value]
    history: list[tuple[Point, Point, float]] = []  # (s, y, ⟨s, y⟩) at the current μ
    iterations = 0
    while residuals[-1] >= tol and residuals[-1] != 0.0 and iterations < max_iter:
        iterations += 1
        if memory == 0:
            mu = geometry.exp(mu, tree_map(lambda t: eta * t, v))
            points, v, value, radius = evaluate(mu, points)
        else:
            mu, points, v, value, radius, history = _lbfgs_step(
                geometry, evaluate, mu, points, v, value, radius, history, eta, memory
            )
        residuals.append(float(geometry.inner(mu, v, v).clamp_min(0).sqrt()))
        objectives.append(value)
    trace = FrechetTrace(
        residuals=torch.tensor(residuals, dtype=torch.float64),
        objectives=torch.tensor(objectives, dtype=torch.float64),
        iterations=iterations,
        tol=float(tol),
        eta=float(eta),
        max_iter=int(max_iter),
    )
    return mu, trace


ARMIJO = 1e-4
"""Sufficient-decrease constant of the L-BFGS line search."""

MAX_HALVINGS = 30
"""Backtracking halvings of one L-BFGS step before it falls back to the plain step η v."""


def _lbfgs_step(geometry, evaluate, mu, points, v, value, radius, history, eta, memory):
    """One Riemannian L-BFGS step on F (gradient −v) with Armijo backtracking; returns the new state.

    The step is capped at ``radius`` = max_i d(μ, x_i) (a mean is never farther than the farthest point;
    a poorly conditioned quasi-Newton direction can otherwise leave the region where Exp and Log are
    usable)."""
    g = tree_map(lambda t: -t, v)
    q, alphas = g, []
    for s, y, sy in reversed(history):
        a = _dot(geometry, mu, s, q) / sy
        alphas.append(a)
        q = _axpy(-a, y, q)
    if history:
        s, y, sy = history[-1]
        q = tree_map(lambda t: (sy / _dot(geometry, mu, y, y)) * t, q)
    else:
        q = tree_map(lambda t: eta * t, q)
    for (s, y, sy), a in zip(history, reversed(alphas)):
        q = _axpy(a - _dot(geometry, mu, y, q) / sy, s, q)
    direction = tree_map(lambda t: -t, q)
    if geometry.horizontal is not None:
        direction = geometry.horizontal(mu, direction)
    slope = _dot(geometry, mu, g, direction)
    if not slope < 0:  # not a descent direction: restart from the plain step
        history, direction = [], tree_map(lambda t: eta * t, v)
        slope = _dot(geometry, mu, g, direction)
    length = _dot(geometry, mu, direction, direction) ** 0.5
    if length > radius > 0:
        direction, slope = tree_map(lambda t: (radius / length) * t, direction), slope * radius / length
    step = 1.0
    for _ in range(MAX_HALVINGS):
        trial = geometry.exp(mu, tree_map(lambda t: step * t, direction))
        try:
            trial_points, trial_v, trial_value, trial_radius = evaluate(trial, points)
        except (ConvergenceError, AntipodalError, ManifoldError):  # the trial went too far: shorter step
            step *= 0.5
            continue
        if trial_value <= value + ARMIJO * step * slope + 1e-14 * (1.0 + abs(value)):
            break
        step *= 0.5
    else:  # no decrease found along the L-BFGS direction: take the plain step and forget the history
        trial = geometry.exp(mu, tree_map(lambda t: eta * t, v))
        trial_points, trial_v, trial_value, trial_radius = evaluate(trial, points)
        return trial, trial_points, trial_v, trial_value, trial_radius, []
    move = lambda t: geometry.transport(mu, trial, t)  # noqa: E731
    s_new = move(tree_map(lambda t: step * t, direction))
    y_new = _axpy(1.0, move(v), tree_map(lambda t: -t, trial_v))  # g_new − T(g) = −v_new + T(v)
    history = [(move(s), move(y), sy) for s, y, sy in history]
    history = [(s, y, _dot(geometry, trial, s, y)) for s, y, _ in history]
    sy_new = _dot(geometry, trial, s_new, y_new)
    if sy_new > 0:
        history.append((s_new, y_new, sy_new))
    history = [entry for entry in history if entry[2] > 0][-memory:]
    return trial, trial_points, trial_v, trial_value, trial_radius, history


def tree_leaves(tree: Point) -> list[torch.Tensor]:
    """The tensors of a tensor or (named) tuple of tensors, in order."""
    if isinstance(tree, tuple):
        return [leaf for part in tree for leaf in tree_leaves(part)]
    return [tree]


def _sphere_log(mu: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    return sphere.log(mu.expand_as(xs), xs, batch_dims=1)


def _sphere_inner(mu: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).flatten(start_dim=u.ndim - mu.ndim).sum(-1)


SPHERE = Geometry(exp=sphere.exp, log=_sphere_log, inner=_sphere_inner)
"""The unit sphere (any shape, the whole tensor one point): Exp/Log of :mod:`karcher_lab.geometry.sphere`,
the Euclidean inner product of the embedding. ``frechet_mean(SPHERE, xs, w, init)`` is the Karcher
mean of eq. 5 of the Fisher–Rao paper."""


@dataclass(frozen=True)
class BatchGeometry:
    """What :func:`frechet_mean_batched` needs from a manifold: the maps of :class:`Geometry`, batched over a
    leading module axis K (one problem per module, solved together).

    Points μ carry the module axis ``[K, ...]``; the inputs ``[K, N, ...]``. Tangent vectors at μ are
    ``[K, ...]`` or carry one more axis after the module axis (``[K, N, ...]``: the logs of the N inputs;
    ``[K, m, ...]``: stored L-BFGS pairs), broadcast against μ.

    - ``exp(μ, v)``, ``inner(μ, u, v)`` (→ [K] or [K, N]), ``horizontal(μ, v)`` (quotients only) and
      ``transport(μ, ν, v)`` (only for ``memory`` > 0), as in :class:`Geometry`, entry by entry;
    - ``align(μ, xs, modules)``: ``(aligned xs, Log_μ of them)`` (``[K, N, ...]`` each), where
      ``modules`` (int64 [K]) says which of the original modules the rows are, so an implementation can
      keep per-module state (warm starts) across calls.
    """

    exp: Callable[[Point, Point], Point]
    inner: Callable[[Point, Point, Point], torch.Tensor]
    align: Callable[[Point, Point, torch.Tensor], tuple[Point, Point]]
    horizontal: Callable[[Point, Point], Point] | None = None
    transport: Callable[[Point, Point, Point], Point] | None = None


SOLVER_ERRORS = (ConvergenceError, AntipodalError, ManifoldError)
"""The errors of an evaluation at a trial point that count as a rejected step (see :func:`frechet_mean`)."""


def _rows(tree: Point, index: torch.Tensor) -> Point:
    return tree_map(lambda t: t[index], tree)


def _put(tree: Point, index: torch.Tensor, values: Point) -> Point:
    """``tree`` with rows ``index`` replaced by ``values`` (a new tree; ``tree`` is not modified)."""

    def put(t, v):
        out = t.clone()
        out[index] = v
        return out

    return tree_map(put, tree, values)


def _where(mask: torch.Tensor, a: Point, b: Point) -> Point:
    """Row-wise choice over the leading axis."""
    return tree_map(lambda x, y: torch.where(mask.reshape(-1, *([1] * (x.ndim - 1))), x, y), a, b)


def _scale(factor: torch.Tensor, tree: Point) -> Point:
    """Row-wise product with ``factor`` [K]."""
    return tree_map(lambda t: factor.reshape(-1, *([1] * (t.ndim - 1))).to(t.dtype) * t, tree)


def frechet_mean_batched(
    geometry: BatchGeometry,
    points: Point,
    weights: Sequence[float] | torch.Tensor | None,
    init: Point,
    *,
    eta: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-10,
    memory: int = 0,
    labels: Sequence[str] | None = None,
) -> tuple[Point, list[FrechetTrace]]:
    """:func:`frechet_mean` on K problems at once, each module's iteration exactly the one
    :func:`frechet_mean` runs on it alone (same start, steps, L-BFGS pairs, line search and stopping rule).

    ``points``: the inputs ``[K, N, ...]`` (the same N weights ``weights`` for every module), ``init``:
    the starts ``[K, ...]``. Every map is called on the rows that still need it: a module leaves the
    batch once ‖v‖ < tol (or v = 0, or ``max_iter`` iterations), and a line-search trial is evaluated
    only for the modules whose step is still pending. A trial evaluation that raises one of
    :data:`SOLVER_ERRORS` is split into halves until the failing modules are found; for those the trial
    is a rejected step, as in :func:`frechet_mean`. Any other evaluation that raises re-raises that
    error, its message prefixed by the module's label (``labels``; default "module k"), as the sequential
    solver would raise it.

    Returns the means ``[K, ...]`` and one :class:`FrechetTrace` per module.
    """
    check_solver_params(eta=eta, max_iter=max_iter, tol=tol)
    checks.check_count("memory", memory, 0)
    if memory > 0 and geometry.transport is None:
        raise ParameterError("memory > 0 (L-BFGS) needs a geometry with a vector transport")
    first = tree_leaves(points)[0]
    k, n = first.shape[0], first.shape[1]
    device = first.device
    w = check_weights(weights, n).to(device)

    def evaluate(mu, xs, modules):
        xs, logs = geometry.align(mu, xs, modules)
        v = tree_map(lambda t: torch.tensordot(t, w.to(t.dtype), dims=([1], [0])), logs)
        if geometry.horizontal is not None:
            v = geometry.horizontal(mu, v)
        sq = geometry.inner(mu, logs, logs).to(w.dtype)
        radius = sq[:, w > 0].amax(dim=1).clamp_min(0).sqrt()
        return xs, v, 0.5 * (sq * w).sum(dim=1), radius

    def strict(mu, xs, modules):
        results, failed, error = _evaluate_split(evaluate, mu, xs, modules)
        if error is not None:
            index = int(modules[failed][0])
            raise type(error)(f"{labels[index] if labels is not None else f'module {index}'}: {error}") from error
        return results

    def norm(mu, v):
        return geometry.inner(mu, v, v).to(w.dtype).clamp_min(0).sqrt()

    modules = torch.arange(k, device=device)
    mu = init
    xs, v, value, radius = strict(mu, points, modules)
    residual = norm(mu, v)
    traces_res = [[x] for x in residual.tolist()]
    traces_obj = [[x] for x in value.tolist()]
    iterations = torch.zeros(k, dtype=torch.int64, device=device)
    history = _empty_history(v, memory) if memory > 0 else None
    means: list[Point | None] = [None] * k
    while True:
        active = (residual >= tol) & (residual != 0) & (iterations < max_iter)
        if not bool(active.all()):
            for row, module in zip(torch.nonzero(~active).flatten().tolist(), modules[~active].tolist()):
                means[module] = tree_map(lambda t, row=row: t[row], mu)
            mu, xs, v, value, radius, residual, iterations, modules = _rows(
                (mu, xs, v, value, radius, residual, iterations, modules), active
            )
            if history is not None:
                history = _rows(history, active)
        if modules.numel() == 0:
            break
        iterations = iterations + 1
        if memory == 0:
            mu = geometry.exp(mu, tree_map(lambda t: eta * t, v))
            xs, v, value, radius = strict(mu, xs, modules)
        else:
            mu, xs, v, value, radius, history = _lbfgs_step_batched(
                geometry, evaluate, strict, mu, xs, v, value, radius, history, modules, eta, memory
            )
        residual = norm(mu, v)
        for module, r, f in zip(modules.tolist(), residual.tolist(), value.tolist()):
            traces_res[module].append(r)
            traces_obj[module].append(f)
    traces = [
        FrechetTrace(
            residuals=torch.tensor(traces_res[i], dtype=torch.float64),
            objectives=torch.tensor(traces_obj[i], dtype=torch.float64),
            iterations=len(traces_res[i]) - 1,
            tol=float(tol),
            eta=float(eta),
            max_iter=int(max_iter),
        )
        for i in range(k)
    ]
    return tree_map(lambda *rows: torch.stack(rows), *means), traces


def _evaluate_split(evaluate, mu, xs, modules):
    """``evaluate(mu, xs, modules)``, split in halves around rows whose evaluation raises one of
    :data:`SOLVER_ERRORS`: returns (results, failed [K] bool, the first such error or None); the results of
    failed rows are placeholders (xs, v = 0, F = inf, radius 0)."""
    try:
        return evaluate(mu, xs, modules), torch.zeros_like(modules, dtype=torch.bool), None
    except SOLVER_ERRORS as error:
        if modules.numel() == 1:
            zero = tree_map(torch.zeros_like, mu)
            inf = torch.full((1,), torch.inf, dtype=torch.float64, device=modules.device)
            return (xs, zero, inf, torch.zeros_like(inf)), torch.ones_like(modules, dtype=torch.bool), error
    half = modules.numel() // 2
    parts = [
        _evaluate_split(evaluate, _rows(mu, index), _rows(xs, index), modules[index])
        for index in (slice(None, half), slice(half, None))
    ]
    results = tree_map(lambda a, b: torch.cat([a, b]), parts[0][0], parts[1][0])
    error = parts[0][2] if parts[0][2] is not None else parts[1][2]
    return results, torch.cat([parts[0][1], parts[1][1]]), error


def _empty_history(v: Point, memory: int) -> tuple[Point, Point, torch.Tensor]:
    """L-BFGS pairs per module: (S, Y) tangents [K, memory, ...] and ⟨s, y⟩ [K, memory]; a slot with
    ⟨s, y⟩ = 0 is empty. Each module's pairs are kept oldest to newest at the end of its slots."""
    pairs = tree_map(lambda t: torch.zeros(t.shape[0], memory, *t.shape[1:], dtype=t.dtype, device=t.device), v)
    sy = torch.zeros(tree_leaves(v)[0].shape[0], memory, dtype=torch.float64, device=tree_leaves(v)[0].device)
    return pairs, pairs, sy


def _slot(tree: Point, j: int) -> Point:
    return tree_map(lambda t: t[:, j], tree)


def _lbfgs_step_batched(geometry, evaluate, strict, mu, xs, v, value, radius, history, modules, eta, memory):
    """:func:`_lbfgs_step` for every row at once (empty history slots are no-ops of the two-loop recursion)."""
    s_hist, y_hist, sy_hist = history
    inner = lambda x, a, b: geometry.inner(x, a, b).to(torch.float64)  # noqa: E731
    g = tree_map(lambda t: -t, v)
    q, alphas = g, []
    safe = lambda sy: torch.where(sy > 0, sy, 1.0)  # noqa: E731
    for j in reversed(range(memory)):
        sy = sy_hist[:, j]
        a = torch.where(sy > 0, inner(mu, _slot(s_hist, j), q) / safe(sy), 0.0)
        alphas.append(a)
        q = _axpy_rows(-a, _slot(y_hist, j), q)
    has = sy_hist[:, -1] > 0
    yy = inner(mu, _slot(y_hist, -1), _slot(y_hist, -1))
    q = _scale(torch.where(has, sy_hist[:, -1] / torch.where(has, yy, 1.0), eta), q)
    for j, a in zip(range(memory), reversed(alphas)):
        sy = sy_hist[:, j]
        b = torch.where(sy > 0, inner(mu, _slot(y_hist, j), q) / safe(sy), 0.0)
        q = _axpy_rows(a - b, _slot(s_hist, j), q)
    direction = tree_map(lambda t: -t, q)
    if geometry.horizontal is not None:
        direction = geometry.horizontal(mu, direction)
    slope = inner(mu, g, direction)
    restart = ~(slope < 0)  # not a descent direction: restart from the plain step
    if bool(restart.any()):
        sy_hist = torch.where(restart[:, None], 0.0, sy_hist)
        direction = _where(restart, tree_map(lambda t: eta * t, v), direction)
        slope = torch.where(restart, inner(mu, g, direction), slope)
    length = inner(mu, direction, direction).clamp_min(0).sqrt()
    cap = (length > radius) & (radius > 0)
    ratio = torch.where(cap, radius / torch.where(cap, length, 1.0), 1.0)
    direction, slope = _scale(ratio, direction), slope * ratio

    rows = torch.arange(value.shape[0], device=value.device)
    step = torch.ones_like(value)
    pending = torch.ones_like(value, dtype=torch.bool)
    new_mu, new_xs, new_v, new_value, new_radius = mu, xs, v, value, radius
    for _ in range(MAX_HALVINGS):
        idx = rows[pending]
        trial = geometry.exp(_rows(mu, idx), _scale(step[idx], _rows(direction, idx)))
        (t_xs, t_v, t_value, t_radius), failed, _ = _evaluate_split(evaluate, trial, _rows(xs, idx), modules[idx])
        bound = value[idx] + ARMIJO * step[idx] * slope[idx] + 1e-14 * (1.0 + value[idx].abs())
        accept = ~failed & (t_value <= bound)
        if bool(accept.any()):
            took = idx[accept]
            new_mu, new_xs, new_v = (_put(a, took, _rows(b, accept)) for a, b in
                                     ((new_mu, trial), (new_xs, t_xs), (new_v, t_v)))
            new_value, new_radius = _put(new_value, took, t_value[accept]), _put(new_radius, took, t_radius[accept])
            pending = pending.clone()
            pending[took] = False
        if not bool(pending.any()):
            break
        step = torch.where(pending, 0.5 * step, step)
    plain = pending  # no decrease found along the L-BFGS direction: the plain step, history forgotten
    if bool(plain.any()):
        idx = rows[plain]
        trial = geometry.exp(_rows(mu, idx), tree_map(lambda t: eta * t, _rows(v, idx)))
        t_xs, t_v, t_value, t_radius = strict(trial, _rows(xs, idx), modules[idx])
        new_mu, new_xs, new_v = (_put(a, idx, b) for a, b in ((new_mu, trial), (new_xs, t_xs), (new_v, t_v)))
        new_value, new_radius = _put(new_value, idx, t_value), _put(new_radius, idx, t_radius)

    move = lambda t: geometry.transport(mu, new_mu, t)  # noqa: E731
    s_new = move(_scale(step, direction))
    y_new = _axpy_rows(torch.ones_like(step), move(v), tree_map(lambda t: -t, new_v))  # g_new − T(g)
    s_hist, y_hist = move(s_hist), move(y_hist)
    sy_hist = torch.where(sy_hist > 0, inner(new_mu, s_hist, y_hist), 0.0)
    sy_new = inner(new_mu, s_new, y_new)
    s_all = tree_map(lambda h, t: torch.cat([h, t.unsqueeze(1)], dim=1), s_hist, s_new)
    y_all = tree_map(lambda h, t: torch.cat([h, t.unsqueeze(1)], dim=1), y_hist, y_new)
    sy_all = torch.cat([sy_hist, sy_new.unsqueeze(1)], dim=1)
    sy_all = torch.where((sy_all > 0) & ~plain[:, None], sy_all, 0.0)
    # each module's kept pairs (⟨s, y⟩ > 0), oldest to newest, at the end of its slots; the newest memory kept
    order = torch.argsort((sy_all > 0).to(torch.int8), dim=1, stable=True)[:, -memory:]
    gather = lambda t: t[rows[:, None], order]  # noqa: E731
    history = (tree_map(gather, s_all), tree_map(gather, y_all), gather(sy_all))
    return new_mu, new_xs, new_v, new_value, new_radius, history


def _axpy_rows(a: torch.Tensor, x: Point, y: Point) -> Point:
    """a x + y with a per-row factor a [K]."""
    return tree_map(lambda xi, yi: a.reshape(-1, *([1] * (xi.ndim - 1))).to(xi.dtype) * xi + yi, x, y)
