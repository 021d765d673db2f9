"""Which tasks conflict: geometry of the experts' task vectors τᵢ = θᵢ − θ_base.

For every pair of experts, over all parameters flattened into one vector (float64):

- cosine cos(τᵢ, τⱼ) = ⟨τᵢ, τⱼ⟩ / (‖τᵢ‖ ‖τⱼ‖) and the angle arccos of it in degrees: 90° means
  unrelated directions, above 90° the two fine-tunes pull the base in opposing directions;
- sign disagreement: among coordinates where both τᵢ and τⱼ are non-zero, the fraction with opposite
  signs (the interference TIES resolves by sign election); 0.5 is what independent signs give.

Pairs are ranked from the widest angle down: the top ones are the pool's most conflicting tasks.
"""
from __future__ import annotations

import math

import torch


def task_vectors(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """``[N, P]`` float64 matrix whose row i is expert i's flattened task vector (keys in sorted order)."""
    keys = sorted(base)
    return torch.stack([
        torch.cat([(expert[k].double() - base[k].double()).flatten() for k in keys]) for expert in experts
    ])


def conflict_record(names: list[str], tau: torch.Tensor) -> dict:
    """Norms, pairwise cosines / angles / sign disagreement, and pairs ranked by angle (widest first)."""
    norms = tau.norm(dim=1)
    cosine = (tau @ tau.T) / torch.outer(norms, norms)
    signs = torch.sign(tau)
    pairs = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            both = (signs[i] != 0) & (signs[j] != 0)
            disagree = ((signs[i] != signs[j]) & both).sum().item() / max(1, both.sum().item())
            c = cosine[i, j].clamp(-1, 1).item()
            pairs.append({"tasks": [names[i], names[j]], "cosine": c, "angle_deg": math.degrees(math.acos(c)),
                          "sign_disagreement": disagree})
    pairs.sort(key=lambda p: -p["angle_deg"])
    return {
        "tasks": names,
        "task_vector_norm": dict(zip(names, norms.tolist())),
        "cosine": cosine.tolist(),
        "pairs_by_conflict": pairs,
    }
