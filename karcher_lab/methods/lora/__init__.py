"""Merging LoRA updates: a registry of methods on low-rank factors, and ``merge_factor_sets`` to run one
on every module (PEFT adapters on disk: :func:`karcher_lab.pipeline.lora.merge_lora`);
``geomerge_modules`` runs geomerge on many modules at once (batched over modules of one shape).

Methods (``list_lora_methods()``): ``geomerge`` (quotient Fréchet mean, rank r), ``task_arithmetic``
and ``ties`` on ΔW, ``knots_ta`` / ``knots_ties`` (KnOTS joint-SVD alignment), and peft's own
``add_weighted_adapter`` combinations ``peft_cat``, ``peft_linear``, ``peft_svd``, ``peft_ties``,
``peft_ties_svd`` for comparison.
"""
from karcher_lab.methods.lora import (  # noqa: F401  (imported for their @register_lora side effect)
    geomerge_method,
    knots,
    peft_combination,
    task_arithmetic,
    ties,
)
from karcher_lab.methods.lora.api import merge_factor_sets
from karcher_lab.methods.lora.geomerge import geomerge_factors
from karcher_lab.methods.lora.geomerge_batched import geomerge_modules
from karcher_lab.methods.lora.registry import LoraMethod, get_lora_method, list_lora_methods
from karcher_lab.methods.lora.symmetry import gauge_transform, random_gauge, symmetry_gap

__all__ = [
    "LoraMethod", "gauge_transform", "geomerge_factors", "geomerge_modules", "get_lora_method", "list_lora_methods",
    "merge_factor_sets", "random_gauge", "symmetry_gap",
]
