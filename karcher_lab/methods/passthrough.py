"""Passthrough: one model's tensor copied to the output, optionally scaled (mergekit's ``passthrough``).

θ* = s · θ_1, with s the per-model ``scale`` (1 by default, which copies exactly). mergekit uses it for
single-model copies and, with ``[{filter, value}]`` lists, to scale chosen tensors (e.g. ``scale: 0``
on ``o_proj`` and ``down_proj``); stacking slices of several models is a recipe-level feature.
"""
from __future__ import annotations

import torch

from karcher_lab.methods.registry import Param, register


@register(
    "passthrough",
    summary="Copy the one model's tensor, times the per-model scale (1 by default).",
    params=(Param("scale", float, 1.0, per_model=True, doc="factor applied to the tensor (mergekit: none = 1)"),),
    base="unused",
    weights="unused",
    min_models=1,
    max_models=1,
    paper="mergekit passthrough",
)
def passthrough(tensors: list[torch.Tensor], *, scale: list[float]) -> torch.Tensor:
    """θ* = s θ_1 for the single input θ_1 and its scale s; s = 1 returns θ_1 unchanged."""
    return tensors[0] if scale[0] == 1.0 else tensors[0] * scale[0]
