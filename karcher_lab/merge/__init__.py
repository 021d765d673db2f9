"""Merge methods: pure functions on tensors, all registered in one registry (see registry.py).

Importing this package registers every method; `merge_tensors` runs one by name.
"""
from karcher_lab.merge import (  # noqa: F401  (imported for their @register side effect)
    arcee_fusion,
    fisher,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
from karcher_lab.merge.api import MergeResult, merge_tensors
from karcher_lab.merge.prepared import PreparedStates
from karcher_lab.merge.registry import MergeMethod, Param, TwoPhase, get_method, list_methods

__all__ = ["MergeMethod", "MergeResult", "Param", "PreparedStates", "TwoPhase", "get_method", "list_methods", "merge_tensors"]
