"""Weighted Karcher (Fréchet) mean on the unit sphere, computed in coefficient space.

Given N points x_1 … x_N (any shape, normalized per block: u_i = x_i/n_i, n_i = ‖x_i‖) and weights
α_i ≥ 0 with Σ α_i = 1, the Karcher mean minimizes ½ Σ α_i d²(u, u_i) (the paper's eq. 3). Its
first-order condition is Σ α_i Log_u(u_i) = 0 (eq. 4), and the fixed-point iteration of eq. 5 is

    v^(t) = Σ_i α_i Log_{u^(t)}(u_i),        u^(t+1) = Exp_{u^(t)}(η v^(t)),    η ∈ (0, 1],

stopped when ‖v^(t)‖ < tol. On the unit sphere, with θ_i = d(u, u_i) and cos θ_i = ⟨u, u_i⟩,

    Log_u(u_i) = (θ_i / sin θ_i) (u_i − cos θ_i u),     Exp_u(v) = cos‖v‖ u + sin‖v‖ v/‖v‖.

**Coefficient space.** The start (the normalized weighted chord mean Σ α_i u_i/‖Σ α_i u_i‖, or u_1)
is a combination of the u_i, and each Exp step stays in span{u, v} ⊂ span{u_1 … u_N}. So every iterate
is u = Σ_j c_j u_j and the whole iteration runs on the normalized Gram matrix Ĝ_ij = ⟨u_i, u_j⟩:

    cos θ_i = (Ĝ c)_i,   w_i = α_i θ_i / sin θ_i,   v = Σ_j t_j u_j with t = w − (w·Ĝc) c,
    ‖v‖² = tᵀ Ĝ t,       c ← cos(η‖v‖) c + sin(η‖v‖) t/‖v‖,  then c ← c/√(cᵀĜc).

This is exact, not an approximation: the data is read once to form the raw Gram G = X Xᵀ
(:func:`gram_matrix`, float64 accumulation, streamed in cache-sized chunks), the iteration costs
O(N²) per step (:func:`karcher_coefficients`), and one more pass forms Σ_j (c_j/n_j) x_j
(:func:`combine`). The three pieces are separate so that a Gram can be cached and re-solved with new
weights, η or init without touching the data. On the CPU both passes spread their chunks over
``torch.get_num_threads()`` worker threads of one torch thread each
(:func:`~karcher_lab.geometry.numerics.run_on_threads`), with results that do not depend on the
thread count.

Numerics: inner products and norms are evaluated through a square-root factor R of Ĝ (RᵀR = Ĝ, from
its eigendecomposition), whose columns y_i = R e_i are an isometric copy of the u_i in R^N. Norms are
then Euclidean norms of N-vectors, which avoids the cancellation in ‖v‖² = tᵀĜt (whose rounding floor
is ‖v‖ ≈ √ε ≈ 1.5e-8, too coarse for tol = 1e-7). Angles are θ_i = atan2(‖u_i − cos θ_i u‖, cos θ_i),
accurate also for θ → 0, where θ/sin θ → 1.

Inputs where the mean is not unique raise AntipodalError: a pair of contributing points with
cos < −1 + ANTIPODAL_TOL, or a weighted chord mean of norm < √(ANTIPODAL_TOL/2) (the points are not
in an open hemisphere; two antipodal points with equal weights trip both tests at the same angle).
Points with zero norm or zero weight contribute nothing (their weight is dropped and the rest is
renormalized); a block where nothing contributes gets the zero vector.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from math import sqrt
from typing import Sequence

import torch

from karcher_lab import checks
from karcher_lab.errors import AntipodalError, EmptyInputError, ParameterError, ShapeMismatchError, WeightError
from karcher_lab.geometry.blocks import BlockLayout, Chunk, block_layout
from karcher_lab.geometry.numerics import run_on_threads
from karcher_lab.geometry.sphere import ANTIPODAL_TOL

KARCHER_INITS: tuple[str, ...] = ("chord", "first")
"""Starting points: 'chord' = normalized weighted Euclidean mean (default), 'first' = first contributing point."""

CHORD_NORM_TOL = sqrt(ANTIPODAL_TOL / 2)
"""A weighted chord mean shorter than this means the points are not in an open hemisphere."""

GRAM_BUFFER_BYTES = 4 << 20
"""Size of one worker thread's staging buffer in :func:`gram_matrix` (all N models' chunks together)."""

GRAM_FLOAT32_BLOCK = 1 << 20
"""A single block of at least this many entries (inputs no wider than float32) takes float32 products
over runs of ``GRAM_FLOAT32_RUN`` entries, accumulated in float64 (see :func:`gram_matrix`)."""

GRAM_FLOAT32_RUN = 1024
"""Length of the runs summed in float32 inside a large block; their sums are accumulated in float64."""

GRAM_MIN_RUN = 64
"""Blocks whose run inside a chunk is shorter than this (columns of a weight, narrow rows) take their
Gram entries from elementwise products instead of many tiny matrix products."""

COMBINE_CHUNK_BYTES = 1 << 20
"""Size of one output chunk of :func:`combine`; it stays in its core's cache while the N inputs are added in."""


@dataclass(frozen=True)
class KarcherTrace:
    """What the fixed-point iteration did.

    ``residuals[k]`` is ‖v^(k)‖ = ‖Σ α_i Log_{u^(k)}(u_i)‖ at iterate k = 0 … iterations, the maximum
    over blocks (a single block: its own residual). Per block: ``block_residuals`` (‖v‖ at the
    returned mean) and ``block_iterations`` (steps taken; a block stops once ‖v‖ < tol).
    """

    residuals: torch.Tensor
    block_residuals: torch.Tensor
    block_iterations: torch.Tensor
    tol: float
    eta: float
    max_iter: int

    @property
    def iterations(self) -> int:
        """Steps taken by the slowest block."""
        return int(self.block_iterations.max()) if self.block_iterations.numel() else 0

    @property
    def block_converged(self) -> torch.Tensor:
        """Per block: ‖v‖ < tol (or exactly 0) at the returned mean."""
        return (self.block_residuals < self.tol) | (self.block_residuals == 0)

    @property
    def converged(self) -> bool:
        """Every block met the tolerance within max_iter steps."""
        return bool(self.block_converged.all())

    @property
    def residual(self) -> float:
        """Final residual, max over blocks."""
        return float(self.residuals[-1])


def _check_same_shape(tensors: Sequence[torch.Tensor], extras: dict[str, torch.Tensor | None] | None = None) -> None:
    if len(tensors) == 0:
        raise EmptyInputError("no tensors given")
    shape = tensors[0].shape
    labelled = [(f"model {i}", t) for i, t in enumerate(tensors)]
    labelled += [(label, t) for label, t in (extras or {}).items() if t is not None]
    for label, t in labelled:
        if t.shape != shape:
            raise ShapeMismatchError(f"{label} has shape {tuple(t.shape)} but model 0 has {tuple(shape)}")


def check_solver_params(*, eta: float, max_iter: int, tol: float, init: str) -> None:
    """The settings of eq. 5: :func:`karcher_lab.checks.check_solver_params`, and ``init`` one of ``KARCHER_INITS``."""
    checks.check_solver_params(eta=eta, max_iter=max_iter, tol=tol)
    checks.check_choice("init", init, KARCHER_INITS)


def gram_matrix(
    tensors: Sequence[torch.Tensor],
    block: str = "tensor",
    *,
    center: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw per-block Gram matrices G[b, i, j] = ⟨x_i, x_j⟩ over block b, float64 ``[B, N, N]``.

    One streaming pass over the data: each chunk of every input is copied into a small staging buffer
    (``GRAM_BUFFER_BYTES`` per worker thread) and multiplied there, so no full-size copy is made. On the
    CPU the chunks are spread over ``torch.get_num_threads()`` worker threads; each chunk's partial Gram
    is formed on one torch thread and the partials are added in chunk order, so G does not depend on
    the thread count. The tensors are not normalized: norms are n_i = √G[b, i, i]. With ``center`` (a
    base θ_0) the Gram of the task vectors x_i − θ_0 is formed, subtracting chunk by chunk. With
    ``metric`` (entries m ≥ 0, the inputs' shape, e.g. a diagonal Fisher) the inner product is
    ⟨x, y⟩_m = Σ_e m_e x_e y_e, applied chunk by chunk.

    Precision: products and sums are float64 (exact products for bf16/fp16/fp32 values), except for a
    single large block (a whole tensor of ≥ ``GRAM_FLOAT32_BLOCK`` entries: block='tensor' on weight
    matrices) of inputs no wider than float32. There each run of ``GRAM_FLOAT32_RUN`` entries is
    multiplied and summed in float32 and the ≥ 1024 run sums are accumulated in float64, which halves
    the bytes staged and runs the products at float32 speed; the runs' independent rounding errors
    average out to a few 1e-9 of n_i n_j in G (tests/test_karcher_mean.py bounds it), below the float32
    rounding of the merged output. Where float32 could underflow or overflow (a G_ii below
    block size · 2⁻⁹⁶, zero blocks included, or a non-finite G) the Gram is recomputed in float64.
    """
    _check_same_shape(tensors, {"base": center, "metric": metric})
    layout = block_layout(tensors[0].shape, block)
    inputs = [*tensors, *(t for t in (center, metric) if t is not None)]
    if layout.blocks == 1 and layout.block_size >= GRAM_FLOAT32_BLOCK and all(t.dtype.itemsize <= 4 for t in inputs):
        gram = _streamed_gram(tensors, layout, center, metric, torch.float32)
        if _float32_gram_is_accurate(gram, layout.block_size):
            return gram
    return _streamed_gram(tensors, layout, center, metric, torch.float64)


def _float32_gram_is_accurate(gram: torch.Tensor, block_size: int) -> bool:
    """Finite and, per block, every G_ii ≥ block_size · 2⁻⁹⁶: then float32 underflow (products below
    2⁻¹²⁶) changes no G_ij by more than 2⁻³⁰ of n_i n_j. Zero blocks (all-zero task vectors) included."""
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    return bool(torch.isfinite(gram).all()) and bool((diagonal >= block_size * 2.0**-96).all())


def _worker_threads(device: torch.device) -> int:
    """Worker threads of the chunked passes: torch's intra-op thread count on the CPU, else 1."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def _streamed_gram(
    tensors: Sequence[torch.Tensor],
    layout: BlockLayout,
    center: torch.Tensor | None,
    metric: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The pass of :func:`gram_matrix` with products in ``dtype`` (float64, or float32 runs of
    ``GRAM_FLOAT32_RUN`` entries inside single blocks), accumulated into a float64 Gram: one partial
    Gram per chunk, formed by a worker thread and added in chunk order."""
    n = len(tensors)
    device = tensors[0].device
    views = [layout.view(t) for t in tensors]
    extras = [layout.view(t) for t in (center, metric) if t is not None]  # staged after the models
    gram = torch.zeros(layout.blocks, n, n, dtype=torch.float64, device=device)
    half = (n + 1) // 2
    staged = n + len(extras)
    unit = GRAM_FLOAT32_RUN if dtype == torch.float32 else 1  # chunks hold whole float32 runs
    per_model = max(unit, GRAM_BUFFER_BYTES // (dtype.itemsize * staged) // unit * unit)
    buffers = threading.local()  # one staging buffer per worker thread

    def chunk_gram(chunk: Chunk) -> tuple[slice, torch.Tensor]:
        """The upper triangle of one chunk's Gram, [blocks of the chunk, n, n] float64."""
        ps, bs, qs = chunk
        if not hasattr(buffers, "staging"):
            buffers.staging = torch.empty(staged * per_model, dtype=dtype, device=device)
        pieces = [v[ps, bs, qs] for v in views + extras]  # [p, blocks, q] each
        p, nb, q = pieces[0].shape
        part = torch.zeros(nb, n, n, dtype=torch.float64, device=device)

        def add_products(rows: torch.Tensor, pieces_of_one_block: bool) -> None:
            """rows [batch, n, run]: one row per block, or the pieces of one block (their products summed).
            Rows [0, h) against all, rows [h, n) against [h, n): the upper triangle with fewer products."""
            top = torch.bmm(rows[:, :half], rows.mT)
            bottom = torch.bmm(rows[:, half:], rows[:, half:].mT)
            if pieces_of_one_block:
                top, bottom = top.sum(0, keepdim=True, dtype=torch.float64), bottom.sum(0, keepdim=True, dtype=torch.float64)
            part[:, :half] += top
            part[:, half:, half:] += bottom

        long_runs = p * q >= GRAM_MIN_RUN
        if long_runs:  # block-major, so each block's run is one row of a batched product
            pieces = [x.transpose(0, 1) for x in pieces]
        staged_chunk = buffers.staging[: len(pieces) * pieces[0].numel()].view(len(pieces), *pieces[0].shape)
        for i, x in enumerate(pieces):
            staged_chunk[i].copy_(x)
        models = staged_chunk[:n]
        if center is not None:
            models.sub_(staged_chunk[n])
        if metric is not None:
            models.mul_(staged_chunk[-1].sqrt_())
        if not long_runs:  # short runs (columns, narrow rows): elementwise products summed per block
            for i in range(n):
                for j in range(i, n):
                    part[:, i, j] += (models[i] * models[j]).sum((0, 2), dtype=torch.float64)
        elif nb == 1 and p == 1:  # one run inside one block: float32 in runs of `run` entries (+ a tail)
            flat = models.reshape(n, q)
            run = GRAM_FLOAT32_RUN if dtype == torch.float32 else q
            whole = q // run * run
            if whole:
                add_products(flat[:, :whole].reshape(n, whole // run, run).transpose(0, 1), True)
            if whole < q:
                add_products(flat[:, whole:].unsqueeze(0), True)
        else:
            add_products(models.reshape(n, nb, -1).transpose(0, 1), False)
        return bs, part

    def accumulate(result: tuple[slice, torch.Tensor]) -> None:
        bs, part = result
        gram[bs] += part

    chunks = list(layout.chunks(per_model))
    most_blocks = max((bs.stop - bs.start for _, bs, _ in chunks), default=1)
    run_on_threads(chunk_gram, chunks, accumulate, threads=_worker_threads(device),
                   lookahead=GRAM_BUFFER_BYTES // (most_blocks * n * n * 8))
    upper = gram.triu()
    return upper + upper.triu(1).mT


def block_norms(gram: torch.Tensor) -> torch.Tensor:
    """n[b, i] = ‖x_i‖ over block b, from the Gram diagonal (clamped at 0 against rounding)."""
    return gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()


def _weights(
    weights: Sequence[float] | torch.Tensor, blocks: int, n: int, device: torch.device, name: str | None
) -> torch.Tensor:
    """α as float64 ``[blocks, n]`` on ``device`` from one row ``[n]`` for all blocks or one per block
    ``[blocks, n]``; WeightError unless finite, ≥ 0 and, in every row, not all zero."""
    w = torch.as_tensor(weights, dtype=torch.float64, device=device)
    if w.shape not in ((n,), (blocks, n)):
        raise WeightError(f"got weights of shape {tuple(w.shape)} for {n} models (expected [{n}] or [{blocks}, {n}])")
    label = f"{checks.where(name)}karcher: "
    if w.ndim == 1:
        checks.check_weights(w, n, label=label)
    else:  # finite and ≥ 0 over all rows at once, then no row all zero
        checks.check_weights(w.flatten(), w.numel(), label=label)
        zero_rows = (w == 0).all(-1)
        if bool(zero_rows.any()):
            raise WeightError(f"{label}all weights of block {int(zero_rows.nonzero()[0, 0])} are zero")
    return w.expand(blocks, n)


def contributing_weights(
    gram: torch.Tensor, weights: Sequence[float] | torch.Tensor, *, name: str | None = None
) -> torch.Tensor:
    """α̂[b, i]: the weights renormalized per block over the points that contribute a direction
    (non-zero weight and non-zero norm); zero elsewhere, and all zero for a block where nothing contributes.
    ``name`` (the tensor's) prefixes the error messages.
    """
    blocks, n = gram.shape[0], gram.shape[-1]
    alpha = _weights(weights, blocks, n, gram.device, name)
    alpha = torch.where(block_norms(gram) > 0, alpha, 0.0)
    total = alpha.sum(-1, keepdim=True)
    return alpha / torch.where(total > 0, total, 1.0)


def _sphere_factor(gram: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """R[b] with R[b]ᵀR[b] = Ĝ[b], the Gram of the unit points; column i is u_i in an orthonormal basis
    of the span (zero for a zero-norm point)."""
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    unit_gram = (gram * inv.unsqueeze(-1) * inv.unsqueeze(-2)).clamp(-1.0, 1.0)
    unit_gram.diagonal(dim1=-2, dim2=-1).copy_((norms > 0).to(unit_gram.dtype))
    evals, evecs = torch.linalg.eigh(unit_gram)
    return evals.clamp_min(0).sqrt().unsqueeze(-1) * evecs.mT


def _check_unique(points: torch.Tensor, alpha: torch.Tensor, name: str | None) -> None:
    """AntipodalError if two contributing points are nearly antipodal or the chord mean nearly vanishes."""
    contributing = alpha > 0
    cos = points.mT @ points
    pair = contributing.unsqueeze(-1) & contributing.unsqueeze(-2) & (cos < -1.0 + ANTIPODAL_TOL)
    if bool(pair.any()):
        b, i, j = pair.nonzero()[0].tolist()
        where = f" in block {b} of {points.shape[0]}" if points.shape[0] > 1 else ""
        raise AntipodalError(
            f"{checks.where(name)}models {i} and {j} are (nearly) antipodal{where} (cos = {float(cos[b, i, j]):.9f}): "
            "their Karcher mean is not unique. Drop or reweight one of them, or use a finer block granularity."
        )
    chord = (points @ alpha.unsqueeze(-1)).squeeze(-1).norm(dim=-1)
    spread = contributing.any(-1) & (chord < CHORD_NORM_TOL)
    if bool(spread.any()):
        b = int(spread.nonzero()[0, 0])
        models = contributing[b].nonzero().flatten().tolist()
        where = f" in block {b} of {points.shape[0]}" if points.shape[0] > 1 else ""
        raise AntipodalError(
            f"{checks.where(name)}the weighted chord mean of models {models} nearly vanishes{where} "
            f"(norm {float(chord[b]):.3g}): the points do not lie in an open hemisphere, so their "
            "Karcher mean is not unique."
        )


def _tangent(
    points: torch.Tensor, alpha: torch.Tensor, coeffs: torch.Tensor, name: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients t of v = Σ α_i Log_u(u_i) for u = Σ c_j u_j, and ‖v‖ (per block)."""
    u = (points @ coeffs.unsqueeze(-1)).squeeze(-1)
    cos = (points.mT @ u.unsqueeze(-1)).squeeze(-1)
    antipodal = (cos < -1.0 + ANTIPODAL_TOL) & (alpha > 0)
    if bool(antipodal.any()):
        b, i = antipodal.nonzero()[0].tolist()
        raise AntipodalError(
            f"{checks.where(name)}a Karcher iterate became antipodal to model {i} (block {b}): the points are "
            "too spread out for a unique mean"
        )
    sin = (points - u.unsqueeze(-1) * cos.unsqueeze(-2)).norm(dim=-2)
    theta = torch.atan2(sin, cos)
    w = alpha * torch.where(sin > 0, theta / torch.where(sin > 0, sin, 1.0), 1.0)
    t = w - (w * cos).sum(-1, keepdim=True) * coeffs
    return t, (points @ t.unsqueeze(-1)).squeeze(-1).norm(dim=-1)


def karcher_coefficients(
    gram: torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    *,
    eta: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-7,
    init: str = "chord",
    name: str | None = None,
) -> tuple[torch.Tensor, KarcherTrace]:
    """Solve eq. 5 on raw Gram matrices: coefficients k[b, j] with mean_b = Σ_j k[b, j] x_j (unit norm).

    ``gram`` is ``[B, N, N]`` (or ``[N, N]``) from :func:`gram_matrix`; ``weights`` α ≥ 0 of shape
    ``[N]`` or ``[B, N]``, renormalized per block over contributing points. Steps
    u ← Exp_u(η Σ α_i Log_u u_i) until ‖v‖ < tol or max_iter steps; each block stops on its own.
    ``init`` 'chord' starts at Σ α_i u_i/‖Σ α_i u_i‖, 'first' at the first contributing u_i. Returns
    float64 coefficients on the *raw* tensors (k = c/n) and a :class:`KarcherTrace`. Pure float64,
    O(N²) per step (plus one N×N eigendecomposition per block).
    """
    check_solver_params(eta=eta, max_iter=max_iter, tol=tol, init=init)
    gram = gram.to(torch.float64)
    if gram.ndim == 2:
        gram = gram.unsqueeze(0)
    if gram.ndim != 3 or gram.shape[-1] != gram.shape[-2]:
        raise ParameterError(f"gram must be [N, N] or [B, N, N], got shape {tuple(gram.shape)}")
    alpha = contributing_weights(gram, weights, name=name)
    norms = block_norms(gram)
    points = _sphere_factor(gram, norms)
    _check_unique(points, alpha, name)

    if init == "chord":
        coeffs = alpha.clone()
    else:
        first = (alpha > 0).to(torch.int8).argmax(-1)
        coeffs = torch.nn.functional.one_hot(first, gram.shape[-1]).to(torch.float64) * (alpha > 0).any(-1, keepdim=True)
    coeffs = _renormalize(points, coeffs)

    t, residual = _tangent(points, alpha, coeffs, name)
    history = [residual.max() if residual.numel() else residual.new_zeros(())]
    steps = torch.zeros_like(residual, dtype=torch.int64)
    for _ in range(max_iter):
        moving = (residual >= tol) & (residual > 0)
        if not bool(moving.any()):
            break
        phi = eta * residual.unsqueeze(-1)
        stepped = torch.cos(phi) * coeffs + eta * torch.sinc(phi / torch.pi) * t
        coeffs = torch.where(moving.unsqueeze(-1), _renormalize(points, stepped), coeffs)
        steps += moving
        t, residual = _tangent(points, alpha, coeffs, name)
        history.append(residual.max())
    inv_norms = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
    trace = KarcherTrace(
        residuals=torch.stack(history).cpu(),
        block_residuals=residual.cpu(),
        block_iterations=steps.cpu(),
        tol=float(tol),
        eta=float(eta),
        max_iter=int(max_iter),
    )
    return coeffs * inv_norms, trace


def _renormalize(points: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """c/‖Σ c_j u_j‖ (blocks with a zero combination are left at zero)."""
    length = (points @ coeffs.unsqueeze(-1)).squeeze(-1).norm(dim=-1, keepdim=True)
    return coeffs / torch.where(length > 0, length, 1.0)


def combine(
    tensors: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    block: str = "tensor",
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Σ_j k[b, j] x_j per block b, in one streaming pass.

    ``coeffs`` is ``[B, N]`` (or ``[N]`` for one block), e.g. from :func:`karcher_coefficients`. The
    output is built chunk by chunk (``COMBINE_CHUNK_BYTES``): each output chunk stays in cache while
    the N inputs are multiplied and added into it; on the CPU the chunks are spread over
    ``torch.get_num_threads()`` worker threads. Computed and returned in ``out_dtype`` (default: the
    inputs' dtype promoted to at least float32). An input whose coefficient is 0 in every block is not
    read (a zero-weight expert: its term is exactly 0).
    """
    _check_same_shape(tensors)
    layout = block_layout(tensors[0].shape, block)
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64).reshape(-1, len(tensors))
    if coeffs.shape[0] != layout.blocks:
        raise ParameterError(f"got coefficients for {coeffs.shape[0]} blocks, the layout has {layout.blocks}")
    dtype = out_dtype or torch.promote_types(tensors[0].dtype, torch.float32)
    out = torch.empty(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    used = (coeffs != 0).any(dim=0).tolist()
    if not any(used):
        return out.zero_()
    tensors = [t for t, keep in zip(tensors, used) if keep]
    coeffs = coeffs[:, torch.tensor(used)]
    out_view = layout.view(out)
    views = [layout.view(t) for t in tensors]
    chunks = list(layout.chunks(max(1, COMBINE_CHUNK_BYTES // out.element_size())))
    if layout.blocks == 1:
        scalars = coeffs[0].tolist()

        def combine_chunk(chunk: Chunk) -> None:
            target = out_view[chunk]
            if views[0].dtype == dtype:
                torch.mul(views[0][chunk], scalars[0], out=target)
            else:  # upcast exactly first: mul(bf16 tensor, float) would round the products to bf16
                target.copy_(views[0][chunk]).mul_(scalars[0])
            for v, k in zip(views[1:], scalars[1:]):
                target.add_(v[chunk], alpha=k)
    else:
        per_block = coeffs.to(dtype=dtype, device=out.device).T.reshape(len(tensors), 1, layout.blocks, 1)

        def combine_chunk(chunk: Chunk) -> None:
            bs = chunk[1]
            target = out_view[chunk]
            torch.mul(views[0][chunk], per_block[0, :, bs], out=target)
            for v, k in zip(views[1:], per_block[1:]):
                target.addcmul_(v[chunk], k[:, bs])
    run_on_threads(combine_chunk, chunks, threads=_worker_threads(out.device))
    return out


def karcher_mean(
    points: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    block: str = "tensor",
    eta: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-7,
    init: str = "chord",
    name: str | None = None,
) -> tuple[torch.Tensor, KarcherTrace]:
    """Weighted spherical Karcher mean of ``points`` per block (each block normalized first; eq. 3–5).

    gram_matrix → karcher_coefficients → combine; ``weights`` default to equal. Returns the unit-norm
    mean per block (float32, or float64 for float64 inputs) and the :class:`KarcherTrace`.
    """
    check_solver_params(eta=eta, max_iter=max_iter, tol=tol, init=init)
    gram = gram_matrix(points, block)
    alpha = torch.ones(len(points), dtype=torch.float64) if weights is None else weights
    coeffs, trace = karcher_coefficients(gram, alpha, eta=eta, max_iter=max_iter, tol=tol, init=init, name=name)
    return combine(points, coeffs, block), trace
