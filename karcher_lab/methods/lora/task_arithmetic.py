"""Task arithmetic on LoRA updates, exactly, in factor form.

Task arithmetic (Ilharco et al. 2022, arXiv:2212.04089) on the updates ΔW_i = G_i H_iᵀ is

    ΔW = λ Σ_i w_i ΔW_i = [λ w_1 G_1 | … | λ w_N G_N] [H_1 | … | H_N]ᵀ,

so the merged update is written exactly, without forming any d1×d2 matrix, as factors of rank Σ r_i
(the same update peft's ``cat`` combination builds). With the default weights 1/N it is the mean of
the updates.
"""
from __future__ import annotations

import torch

from karcher_lab.methods.lora.registry import register_lora
from karcher_lab.methods.registry import Param

LAMBDA = Param("lambda", float, 1.0, doc="scale of the merged update")


def concatenated_factors(pairs: list[tuple[torch.Tensor, torch.Tensor]], coefficients: list[float]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """([c_1 G_1 | … | c_N G_N], [H_1 | … | H_N]): factors of Σ c_i G_i H_iᵀ."""
    return (torch.cat([c * g for c, (g, _) in zip(coefficients, pairs)], dim=1),
            torch.cat([h for _, h in pairs], dim=1))


@register_lora("task_arithmetic", summary="λ Σ wi ΔWi, exact (factors concatenated)", rank="Σ r_i",
               params=(LAMBDA,), weights="any", paper="Ilharco et al. 2022, arXiv:2212.04089")
def lora_task_arithmetic(pairs, *, weights: torch.Tensor, name: str | None = None, **params):
    """λ Σ_i w_i G_i H_iᵀ as concatenated factors (module docstring)."""
    return concatenated_factors(pairs, [params["lambda"] * float(w) for w in weights])
