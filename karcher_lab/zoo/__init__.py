"""The expert zoo: tasks, a tiny/small/medium pool of trained experts, and loading models.

    from karcher_lab.zoo import build_pool, config_for
    pool = build_pool(config_for("tiny"))        # cached under ~/.cache/karcher_lab/zoo/
    pool.base_path, [e["path"] for e in pool.experts]
"""
from karcher_lab.zoo.build import build_pool
from karcher_lab.zoo.cache import cache_root, pool_dir
from karcher_lab.zoo.catalog import TASKS, get_task
from karcher_lab.zoo.config import SIZES, ZooConfig, config_for
from karcher_lab.zoo.pool import Pool, PoolNotBuiltError, find_pool, format_table, load_pool

__all__ = [
    "SIZES", "TASKS", "Pool", "PoolNotBuiltError", "ZooConfig", "build_pool", "cache_root", "config_for",
    "find_pool", "format_table", "get_task", "load_pool", "pool_dir",
]
