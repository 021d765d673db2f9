"""Merge methods: pure functions on tensors, all registered in one registry (see registry.py).

Importing this package registers every method; `merge_tensors` runs one by name.
"""
from karcher_lab.methods import (  # noqa: F401  (imported for their @register side effect)
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
from karcher_lab.methods.api import MergeResult, merge_tensors
from karcher_lab.methods.prepared import PreparedStates
from karcher_lab.methods.registry import MergeMethod, Param, TwoPhase, get_method, list_methods

__all__ = ["MergeMethod", "MergeResult", "Param", "PreparedStates", "TwoPhase", "get_method", "list_methods", "merge_tensors"]
