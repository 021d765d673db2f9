"""What a LoRA pool is built from, and where it lives: its recipe, its base, its cache key and directory.

A LoRA pool (:mod:`karcher_lab.zoo.lora`) is one PEFT LoRA adapter per task, trained on a base model:
a zoo pool's base (``tiny``, ``small``, ``medium`` or a pool directory; that pool must be built) or
SmolLM2-135M-Instruct (``smollm2``, :mod:`karcher_lab.zoo.smollm2`). :class:`LoraPoolConfig` holds
everything that determines the adapters; ``LORA_DEFAULTS`` the default recipe per kind of base:

==========  ==============================================  ====  ====  =====  ==  ====  =====  ====
base        tasks                                           r     α     steps  B   lr    train  eval
==========  ==============================================  ====  ====  =====  ==  ====  =====  ====
zoo pool    all 13                                          8     16    500    32  1e-2  3000   200
smollm2     addition, units, dates, maxdigit, uppercase     16    32    40     8   3e-3  2000   100
==========  ==============================================  ====  ====  =====  ==  ====  =====  ====

(B: examples per step; train / eval: examples drawn per task.) SmolLM2's tasks are those its BPE
tokenizer writes digit by digit or letter by letter.

A pool lives in ``<cache root>/zoo/<name>-<key>`` (:mod:`karcher_lab.zoo.cache`), ``name`` being
``<size>-lora`` or ``smollm2``. The key is the zoo's build key (:func:`karcher_lab.zoo.cache.build_key`:
the zoo's building code, task data, torch / transformers versions) over the config, the base's identity
(its pool key, or the SmolLM2 wheel's SHA-256), the peft version and the code of ``LORA_MODULES``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from karcher_lab.errors import ParameterError
from karcher_lab.zoo.cache import build_key, cache_root, code_fingerprint
from karcher_lab.zoo.catalog import TASKS
from karcher_lab.zoo.config import SIZES
from karcher_lab.zoo.pool import find_zoo_pool
from karcher_lab.zoo.smollm2 import SMOLLM2, WHEEL_SHA256, smollm2_dir

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_DEFAULTS: dict[str, dict] = {
    "pool": dict(tasks=tuple(TASKS), rank=8, alpha=16.0, steps=500, lr=1e-2, batch_size=32, train_examples=3000,
                 eval_examples=200),
    SMOLLM2: dict(tasks=("addition", "units", "dates", "maxdigit", "uppercase"), rank=16, alpha=32.0,
                  steps=40, lr=3e-3, batch_size=8, train_examples=2000, eval_examples=100),
}
"""The default recipe on a zoo pool's base (``"pool"``) and on SmolLM2 (module docstring)."""

LORA_MODULES = ("lora_config.py", "lora.py")
"""The zoo modules, besides the zoo's ``BUILD_MODULES``, whose code a LoRA pool's adapters depend on."""


@dataclass(frozen=True)
class LoraPoolConfig:
    """Everything that determines a LoRA pool's adapters (and so, with the code, its cache key).

    Parameters
    ----------
    base : str
        A zoo size (``tiny``, ``small``, ``medium``: that pool's base), ``smollm2``, or the directory
        of a built zoo pool (its base).
    tasks : tuple of str
        The zoo tasks, one adapter each.
    rank, alpha : int, float
        LoRA rank r and α: the folded weight is W + (α/r) B A.
    steps, lr, batch_size : int, float, int
        Training steps per adapter, peak learning rate, examples per step.
    train_examples, eval_examples : int
        Examples drawn per task for training and for the held-out scores.
    seed : int
        Seed of the examples; adapter i's initialisation and batches use ``seed * 1000 + i + 1``.
    threads : int
        Torch threads per training process (results depend on it at float rounding).
    target_modules : tuple of str
        The linear layers that get an adapter.
    """

    base: str = "tiny"
    tasks: tuple[str, ...] = tuple(TASKS)
    rank: int = 8
    alpha: float = 16.0
    steps: int = 500
    lr: float = 1e-2
    batch_size: int = 32
    train_examples: int = 3000
    eval_examples: int = 200
    seed: int = 0
    threads: int = 1
    target_modules: tuple[str, ...] = TARGET_MODULES

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ParameterError(f"unknown zoo task(s) {unknown}; known tasks: {', '.join(TASKS)}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ParameterError(f"tasks must be a non-empty list without repeats, got {list(self.tasks)}")
        for name in ("rank", "steps", "batch_size", "train_examples", "eval_examples", "threads"):
            if getattr(self, name) < 1:
                raise ParameterError(f"LoRA {name} must be >= 1, got {getattr(self, name)}")
        for name in ("alpha", "lr"):
            if not getattr(self, name) > 0:
                raise ParameterError(f"LoRA {name} must be > 0, got {getattr(self, name)}")
        if not self.target_modules:
            raise ParameterError("target_modules must name at least one module")

    def to_dict(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks), "target_modules": list(self.target_modules)}

    @property
    def scaling(self) -> float:
        """α / r, the factor of B A in the folded weight."""
        return self.alpha / self.rank


def lora_config_for(base: str = "tiny", **overrides) -> LoraPoolConfig:
    """The default LoRA recipe for ``base`` (a zoo size, ``smollm2`` or a pool directory), with overrides.

    Overrides that are None are ignored; a ``rank`` without an ``alpha`` keeps the default scaling α / r = 2.
    """
    defaults = LORA_DEFAULTS[SMOLLM2 if base == SMOLLM2 else "pool"]
    bad = sorted(set(overrides) - {f.name for f in fields(LoraPoolConfig)} - {"base"})
    if bad:
        raise ParameterError(f"unknown LoRA config field(s) {bad}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "rank" in overrides and "alpha" not in overrides:
        overrides["alpha"] = 2.0 * overrides["rank"]
    for name in ("tasks", "target_modules"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    return replace(LoraPoolConfig(base=base, **defaults), **overrides)


@dataclass(frozen=True)
class LoraBase:
    """The model the adapters are trained on: its directory, the pool name it gives, and its identity."""

    path: Path
    pool_name: str
    identity: str


def resolve_base(base: str, cache_dir=None) -> LoraBase:
    """Where ``base`` lives; a zoo pool must be built already (PoolNotBuiltError, with the command, if not)."""
    if base == SMOLLM2:
        return LoraBase(smollm2_dir(cache_dir), SMOLLM2, f"smollm2-wheel:{WHEEL_SHA256}")
    if base not in SIZES and not Path(base).expanduser().is_dir():
        raise ParameterError(f"unknown LoRA base {base!r}: give {', '.join(SIZES)}, {SMOLLM2} or a pool directory")
    pool = find_zoo_pool(base, cache_dir)
    return LoraBase(pool.base_path, f"{pool.name}-lora", f"pool:{pool.record['key']}")


def lora_key(config: LoraPoolConfig, base: LoraBase) -> str:
    """Cache key: the zoo's build key over the config, the base identity, the LoRA modules' code and peft."""
    import peft

    code = {name: code_fingerprint(Path(__file__).with_name(name).read_text()) for name in LORA_MODULES}
    return build_key({**config.to_dict(), "base_identity": base.identity, "peft": peft.__version__, "lora_code": code})


def lora_pool_dir(config: LoraPoolConfig, cache_dir=None, *, base: LoraBase | None = None) -> Path:
    """The directory of the LoRA pool built from ``config`` (it may not exist yet); ``base``: the
    config's base, when already resolved (:func:`resolve_base`)."""
    base = base or resolve_base(config.base, cache_dir)
    return cache_root(cache_dir) / "zoo" / f"{base.pool_name}-{lora_key(config, base)}"
