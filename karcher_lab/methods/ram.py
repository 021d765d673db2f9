"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (arXiv:2601.13572), as mergekit 0.1.5.

With task vectors δi = θi − θ0, an entry of model i is active when |δij| > ε (``epsilon``); the
count cj = Σi aij says how many models touch parameter j. Entries touched by one model are kept as
they are, shared ones are averaged over the models that touch them:

    ram:         θj = θ0j + Σi aij δij · ([cj = 1] + [cj > 1] / cj)
    ramplus_tl:  θj = θ0j + Σi aij δij · ([cj = 1] λi + [cj > 1] / cj),
                 λi = 1 + r · clip(ρi, 0, α),  ρi = (# shared active entries of i) / (# unique ones)

so RAM+ boosts the unique updates of models whose updates are mostly shared. Parameters: ``epsilon``
(1e-5), and for ramplus_tl ``r`` (0.1) and ``alpha`` (0.2); all must be ≥ 0. No user weights.

Deviation from mergekit 0.1.5: mergekit divides by max(unique count, ε); here the divisor is
max(unique count, 1). The two agree whenever 0 < ε ≤ 1 (counts are integers; with no unique entry
λi multiplies nothing). They differ only for ε = 0, where mergekit computes 0/0 = NaN for a model
with no active entry and the NaN spreads to the whole output (0 · NaN), and for ε > 1, where
mergekit would shrink ρi of a model with one unique entry.
"""
from __future__ import annotations

import torch

from karcher_lab.methods.registry import Param, register
from karcher_lab.methods.stacked import per_model, stack_task_vectors

_EPSILON = Param("epsilon", float, 1e-5, low=0.0, doc="activity threshold: an entry counts when |δ| > epsilon")


def activity(task_vectors: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c): the active mask aij = [|δij| > ε] ([N, …]) and the per-entry count cj = Σi aij."""
    active = task_vectors.abs() > epsilon
    return active, active.sum(dim=0)


def ram_merge(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    epsilon: float,
    unique_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """θ0 + Σi aij δij ([cj = 1] si + [cj > 1]/cj) for δ stacked on dimension 0 (si = 1 for RAM).

    ``unique_scale`` is RAM+'s per-model λ (shape [N]); None means 1 for every model.
    """
    active, count = activity(task_vectors, epsilon)
    unique = count == 1
    shared = count > 1
    live = task_vectors * active
    unique_part = live * unique
    if unique_scale is not None:
        unique_part = unique_part * per_model(unique_scale, live)
    return base + (unique_part + live * shared / count.clamp(min=1)).sum(dim=0)


def ramplus_unique_scale(task_vectors: torch.Tensor, epsilon: float, r: float, alpha: float) -> torch.Tensor:
    """λi = 1 + r · clip(ρi, 0, α) with ρi = shared_i / max(unique_i, 1) active-entry counts of model i."""
    active, count = activity(task_vectors, epsilon)
    n_models = task_vectors.shape[0]
    shared_count = (active & (count > 1)).reshape(n_models, -1).sum(dim=1)
    unique_count = (active & (count == 1)).reshape(n_models, -1).sum(dim=1)
    rho = shared_count.to(task_vectors.dtype) / unique_count.clamp(min=1).to(task_vectors.dtype)
    return 1 + r * rho.clamp(min=0, max=alpha)


@register(
    "ram",
    summary="RAM: keep updates unique to one model, average the shared ones",
    params=(_EPSILON,),
    base="required",
    weights="unused",
    min_models=1,
    paper="arXiv:2601.13572",
)
def ram(tensors: list[torch.Tensor], *, base: torch.Tensor, epsilon: float) -> torch.Tensor:
    """RAM merge of one tensor (module docstring)."""
    return ram_merge(base, stack_task_vectors(tensors, base), epsilon)


@register(
    "ramplus_tl",
    summary="RAM+ (tensor-local): RAM with unique updates boosted by 1 + r·clip(shared/unique, 0, α)",
    params=(
        Param("r", float, 0.1, low=0.0, doc="boost rate of unique updates"),
        Param("alpha", float, 0.2, low=0.0, doc="cap on the shared/unique ratio"),
        _EPSILON,
    ),
    base="required",
    weights="unused",
    min_models=1,
    paper="arXiv:2601.13572",
)
def ramplus_tl(
    tensors: list[torch.Tensor], *, base: torch.Tensor, r: float, alpha: float, epsilon: float
) -> torch.Tensor:
    """RAM+ (tensor-local) merge of one tensor (module docstring)."""
    task_vectors = stack_task_vectors(tensors, base)
    return ram_merge(base, task_vectors, epsilon, ramplus_unique_scale(task_vectors, epsilon, r, alpha))
