"""What a zoo pool is built from: model size, tasks, and the pretraining / fine-tuning recipes.

Three sizes share the tasks and recipes and differ in the Llama architecture (``SIZES``). The
heterogeneity knob ``h`` spreads the experts between *near* (the plain recipe: a small task vector)
and *far* (longer and at a higher rate: a larger one): expert i gets level ℓᵢ, evenly spaced in
[0, 1] and assigned to tasks by a seeded shuffle, and is fine-tuned for
``round(finetune_steps · 2^(h·ℓᵢ))`` steps at peak rate ``finetune_lr · 2^(h·ℓᵢ)``. ``h = 0`` gives every
expert the same recipe; the default ``h = 0.5`` spans a factor √2 in both steps and rate (the
nearest expert still gets the full plain recipe, so every expert is trained to competence).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace

from karcher_lab.errors import ParameterError
from karcher_lab.zoo.catalog import TASKS

SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=128, num_layers=2, intermediate_size=256, num_heads=4),
    "small": dict(hidden_size=192, num_layers=3, intermediate_size=384, num_heads=6),
    "medium": dict(hidden_size=256, num_layers=4, intermediate_size=512, num_heads=8),
}


@dataclass(frozen=True)
class ExpertRecipe:
    task: str
    level: float  # heterogeneity level in [0, 1]: 0 = nearest to the base, 1 = farthest
    steps: int
    lr: float
    seed: int


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines a pool's weights (and so its cache key, with the code)."""

    size: str = "tiny"
    hidden_size: int = 128
    num_layers: int = 2
    intermediate_size: int = 256
    num_heads: int = 4
    max_positions: int = 64
    tasks: tuple[str, ...] = tuple(TASKS)
    seed: int = 0
    batch_size: int = 32
    pretrain_steps: int = 500
    pretrain_lr: float = 3e-3
    pretrain_examples_per_task: int = 1000  # synthetic tasks; text tasks fill pretrain_text_share
    pretrain_text_share: float = 0.5
    finetune_steps: int = 360
    finetune_lr: float = 2e-3
    finetune_examples: int = 3000
    heterogeneity: float = 0.5
    eval_examples: int = 200
    threads: int = 1  # torch threads per training process (results depend on it at float rounding)

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ParameterError(f"unknown zoo task(s) {unknown}; known tasks: {', '.join(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ParameterError(f"tasks must be a non-empty list without repeats, got {list(self.tasks)}")
        if not 0 <= self.pretrain_text_share < 1:
            raise ParameterError(f"pretrain_text_share must be in [0, 1), got {self.pretrain_text_share}")
        if self.heterogeneity < 0:
            raise ParameterError(f"heterogeneity must be >= 0, got {self.heterogeneity}")
        if self.hidden_size % self.num_heads:
            raise ParameterError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        for f in ("pretrain_steps", "finetune_steps", "batch_size", "eval_examples", "threads"):
            if getattr(self, f) < 1:
                raise ParameterError(f"{f} must be >= 1, got {getattr(self, f)}")

    def to_dict(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks)}

    def expert_recipes(self) -> list[ExpertRecipe]:
        """One recipe per task, in task order, with its heterogeneity level, steps, rate and seed."""
        n = len(self.tasks)
        levels = [i / (n - 1) for i in range(n)] if n > 1 else [0.0]
        random.Random(f"levels/{self.seed}").shuffle(levels)
        recipes = []
        for i, (task, level) in enumerate(zip(self.tasks, levels)):
            factor = 2.0 ** (self.heterogeneity * level)
            recipes.append(ExpertRecipe(task, level, max(1, round(self.finetune_steps * factor)),
                                        self.finetune_lr * factor, self.seed * 1000 + i + 1))
        return recipes


def config_for(size: str = "tiny", **overrides) -> ZooConfig:
    """The default config of ``size`` (tiny, small or medium), with any field overridden."""
    if size not in SIZES:
        raise ParameterError(f"unknown zoo size {size!r}; sizes: {', '.join(SIZES)}")
    names = {f.name for f in fields(ZooConfig)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ParameterError(f"unknown zoo config field(s) {bad}")
    if "tasks" in overrides:
        overrides["tasks"] = tuple(overrides["tasks"])
    return replace(ZooConfig(size=size, **SIZES[size]), **overrides)
