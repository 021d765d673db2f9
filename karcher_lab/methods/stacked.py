"""Per-model tensors stacked along dimension 0, as the base-relative methods (model_stock, ram, sce, the
task-arithmetic family) hold their task vectors δi = θi − θ0."""
from __future__ import annotations

import torch


def stack_task_vectors(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """δ = [θ1 − θ0, …, θN − θ0] as one new [N, …] tensor (subtracted in place after stacking)."""
    return torch.stack(tensors).sub_(base)


def per_model(values: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Per-model values [N] in ``stacked``'s dtype and device, shaped [N, 1, …] to broadcast over it."""
    return values.to(dtype=stacked.dtype, device=stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
