"""NearSwap: take the model's value where it is close to the base, keep the base where they differ a lot.

mergekit's ``nearswap`` (alchemonaut, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).
"""
from __future__ import annotations

import torch

from karcher_lab.methods.registry import REQUIRED, Param, register

DIFFERENCE_FLOOR = 1e-6
"""|θ0 − θ1| is floored at this before dividing (mergekit's clamp), so equal entries get weight 1."""


@register(
    "nearswap",
    summary="Per entry w = clamp(t/|θ0 − θ1|, 0, 1); θ* = w θ1 + (1 − w) θ0.",
    params=(
        Param("t", float, REQUIRED, doc="distance scale: entries within t of the base are swapped in fully",
              low=0.0),
    ),
    base="required",
    weights="unused",
    min_models=1,
    max_models=1,
    paper="alchemonaut, NearSwap (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)",
)
def nearswap(tensors: list[torch.Tensor], *, base: torch.Tensor, t: float) -> torch.Tensor:
    """θ* = θ0 + w (θ1 − θ0), w = min(1, t / max(|θ0 − θ1|, 1e-6)), per entry.

    Entries of the model within t of the base are taken whole; farther ones move the base by exactly
    t toward the model (w |θ1 − θ0| = t). mergekit semantics (``t`` required, one model plus the base);
    a negative t, which mergekit clamps to w = 0 (the base), is rejected here as a parameter error.
    """
    delta = tensors[0] - base
    w = (t / delta.abs().clamp_min(DIFFERENCE_FLOOR)).clamp_max(1.0)
    return base + w * delta
