"""The expert zoo: tasks, a tiny/small/medium pool of trained experts, and loading models.

    from karcher_lab.zoo import build_pool, config_for, load
    pool = build_pool(config_for("tiny"))        # cached under ~/.cache/karcher_lab/zoo/
    pool.base_path, [e["path"] for e in pool.experts]
    model, tokenizer = load("tiny/reverse")           # or a local directory, "smollm2", a cached hub id
"""
from karcher_lab.zoo.build import build_pool
from karcher_lab.zoo.cache import cache_root, pool_dir
from karcher_lab.zoo.catalog import TASKS, get_task
from karcher_lab.zoo.config import SIZES, ZooConfig, config_for
from karcher_lab.zoo.load import load, model_path
from karcher_lab.zoo.lookup import find_pool
from karcher_lab.zoo.pool import Pool, PoolNotBuiltError, format_table, load_pool

__all__ = [
    "SIZES", "TASKS", "Pool", "PoolNotBuiltError", "ZooConfig", "build_pool", "cache_root", "config_for",
    "find_pool", "format_table", "get_task", "load", "load_pool", "model_path", "pool_dir",
]
