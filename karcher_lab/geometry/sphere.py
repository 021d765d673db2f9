"""The unit sphere: exponential and logarithm maps, geodesic distance and geodesics.

A point is a tensor of any shape whose flattened entries have Euclidean norm 1. With
``batch_dims = k`` the first ``k`` axes index independent points (for example blocks of a weight,
see :mod:`karcher_lab.geometry.blocks`) and the sphere is over the remaining axes, flattened;
``batch_dims = 0`` makes the whole tensor one point. Inputs are assumed to be unit vectors (this is
not checked: normalize first). Half-precision inputs are computed in float32; the result has the
promoted dtype (at least float32).

Formulas (x, y unit, v tangent at x, i.e. ⟨x, v⟩ = 0):

- Exp_x(v) = cos‖v‖ x + sin‖v‖ v/‖v‖, with Exp_x(0) = x.
- Log_x(y) = θ (y − cos θ x)/‖y − cos θ x‖ with θ = d(x, y); Log_x(x) = 0. Undefined at y = −x
  (every direction is a shortest path), so :func:`log` raises AntipodalError there.
- d(x, y) = arccos⟨x, y⟩, evaluated as 2·atan2(‖x − y‖, ‖x + y‖), which keeps full relative
  accuracy for nearby points, where arccos of a cosine near 1 loses half the digits.
- γ(t) = Exp_x(t Log_x(y)), γ(0) = x, γ(1) = y: the shortest great-circle arc (SLERP).
"""
from __future__ import annotations

import torch

from karcher_lab.errors import AntipodalError, ParameterError

ANTIPODAL_TOL = 1e-6
"""Points with ⟨x, y⟩ < −1 + ANTIPODAL_TOL count as antipodal (θ > π − 1.4e-3): the direction of
Log_x(y) is then dominated by rounding and the Karcher mean is not unique."""


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


def _flat(x: torch.Tensor, batch_dims: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as ``[*batch, D]`` in ``dtype``."""
    if not isinstance(batch_dims, int) or not 0 <= batch_dims <= x.ndim:
        raise ParameterError(f"batch_dims must be an int in [0, {x.ndim}], got {batch_dims!r}")
    return x.to(dtype).reshape(*x.shape[:batch_dims], -1)


def _check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.shape != y.shape:
        raise ParameterError(f"{what}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ over the last axis, keeping it (shape ``[*batch, 1]``)."""
    return (a * b).sum(-1, keepdim=True)


def exp(x: torch.Tensor, v: torch.Tensor, *, batch_dims: int = 0) -> torch.Tensor:
    """Exp_x(v) = cos‖v‖ x + sin‖v‖ v/‖v‖ (Exp_x(0) = x exactly, no division by zero).

    ``v`` must be tangent at ``x`` (⟨x, v⟩ = 0); the result is renormalized to absorb rounding.
    """
    _check_pair(x, v, "exp")
    dtype = _work_dtype(x, v)
    xf, vf = _flat(x, batch_dims, dtype), _flat(v, batch_dims, dtype)
    n = vf.norm(dim=-1, keepdim=True)
    # sin‖v‖ / ‖v‖ = sinc(‖v‖/π) with torch.sinc(0) = 1.
    out = torch.cos(n) * xf + torch.sinc(n / torch.pi) * vf
    out = out / out.norm(dim=-1, keepdim=True)
    return out.reshape(x.shape)


def log(x: torch.Tensor, y: torch.Tensor, *, batch_dims: int = 0) -> torch.Tensor:
    """Log_x(y) = θ (y − cos θ x)/‖y − cos θ x‖, the tangent vector at x pointing to y with length d(x, y).

    θ = atan2(‖y − ⟨x, y⟩x‖, ⟨x, y⟩); Log_x(x) = 0. Raises AntipodalError where
    ⟨x, y⟩ < −1 + ANTIPODAL_TOL (the log is undefined at y = −x and numerically meaningless near it).
    """
    _check_pair(x, y, "log")
    dtype = _work_dtype(x, y)
    xf, yf = _flat(x, batch_dims, dtype), _flat(y, batch_dims, dtype)
    cos = _inner(xf, yf).clamp(-1.0, 1.0)
    antipodal = cos.squeeze(-1) < -1.0 + ANTIPODAL_TOL
    if bool(antipodal.any()):
        where = "" if batch_dims == 0 else f" at batch index(es) {antipodal.nonzero().tolist()[:5]}"
        raise AntipodalError(
            f"log map undefined: the points are (nearly) antipodal, cos = {float(cos.min()):.9f} "
            f"< -1 + {ANTIPODAL_TOL:g}{where}"
        )
    w = yf - cos * xf
    s = w.norm(dim=-1, keepdim=True)
    theta = torch.atan2(s, cos)
    scale = torch.where(s > 0, theta / torch.where(s > 0, s, 1.0), 1.0)
    return (scale * w).reshape(x.shape)


def dist(x: torch.Tensor, y: torch.Tensor, *, batch_dims: int = 0) -> torch.Tensor:
    """Geodesic distance d(x, y) = arccos⟨x, y⟩ ∈ [0, π], computed as 2·atan2(‖x − y‖, ‖x + y‖).

    Returns a tensor of the batch shape ``x.shape[:batch_dims]`` (a scalar for ``batch_dims = 0``).
    """
    _check_pair(x, y, "dist")
    dtype = _work_dtype(x, y)
    xf, yf = _flat(x, batch_dims, dtype), _flat(y, batch_dims, dtype)
    return 2.0 * torch.atan2((xf - yf).norm(dim=-1), (xf + yf).norm(dim=-1))


def geodesic(
    x: torch.Tensor, y: torch.Tensor, t: float | torch.Tensor, *, batch_dims: int = 0
) -> torch.Tensor:
    """γ(t) = Exp_x(t · Log_x(y)): the point a fraction ``t`` along the shortest arc from x to y.

    γ(0) = x, γ(1) = y; ``t`` outside [0, 1] extrapolates along the great circle. ``t`` is a number
    or a tensor of the batch shape (one t per point). Equals SLERP:
    γ(t) = [sin((1 − t)θ) x + sin(tθ) y] / sin θ.
    """
    v = log(x, y, batch_dims=batch_dims)
    t = torch.as_tensor(t, dtype=v.dtype, device=v.device)
    if t.ndim:
        batch_shape = x.shape[:batch_dims]
        if t.shape != batch_shape:
            raise ParameterError(
                f"geodesic: t has shape {tuple(t.shape)}; expected a number or the batch shape {tuple(batch_shape)}"
            )
        t = t.reshape(*batch_shape, *([1] * (x.ndim - batch_dims)))
    return exp(x, t * v, batch_dims=batch_dims)
