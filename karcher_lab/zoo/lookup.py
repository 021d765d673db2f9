"""Finding a built pool by name: a zoo size, a LoRA pool name, or a pool directory.

Names: ``tiny`` / ``small`` / ``medium`` (the zoo pool of that size, default config,
:mod:`karcher_lab.zoo.build`); ``tiny-lora`` / ``small-lora`` / ``medium-lora`` (the LoRA pool on that
zoo pool's base) and ``smollm2`` (the LoRA pool on SmolLM2-135M-Instruct), each with its default recipe
(:mod:`karcher_lab.zoo.lora_config`); or any directory holding a ``pool.json``. A pool that is not built
raises PoolNotBuiltError naming the command that builds it.
"""
from __future__ import annotations

from pathlib import Path

from karcher_lab.zoo.config import SIZES
from karcher_lab.zoo.lora_config import lora_config_for, lora_pool_dir
from karcher_lab.zoo.pool import POOL_FILE, Pool, PoolNotBuiltError, find_zoo_pool, load_pool
from karcher_lab.zoo.smollm2 import SMOLLM2


def lora_pool_names() -> dict[str, str]:
    """The LoRA pools by name, with their base: ``tiny-lora`` ... (a zoo pool's base) and ``smollm2``."""
    return {**{f"{size}-lora": size for size in SIZES}, SMOLLM2: SMOLLM2}


def _find_lora_pool(name: str, cache_dir) -> Pool:
    base = lora_pool_names()[name]
    command = f"karcher-lab zoo lora --base {base}"
    try:
        directory = lora_pool_dir(lora_config_for(base), cache_dir)
    except PoolNotBuiltError as exc:
        raise PoolNotBuiltError(f"the {name} pool is not built: its base pool is missing ({exc}); then run "
                                f"`{command}`") from None
    if not (directory / POOL_FILE).is_file():
        raise PoolNotBuiltError(f"the {name} pool is not built (looked in {directory}); run `{command}`")
    return load_pool(directory)


def find_pool(name_or_path: str, cache_dir=None) -> Pool:
    """The built pool called ``name_or_path`` (a size, a LoRA pool name or a pool directory; module docstring)."""
    if name_or_path in lora_pool_names():
        return _find_lora_pool(name_or_path, cache_dir)
    if name_or_path in SIZES or Path(name_or_path).expanduser().is_dir():
        return find_zoo_pool(name_or_path, cache_dir)
    raise PoolNotBuiltError(f"no pool called {name_or_path!r}: give a size ({', '.join(SIZES)}), a LoRA pool "
                            f"({', '.join(lora_pool_names())}) or a pool directory")
