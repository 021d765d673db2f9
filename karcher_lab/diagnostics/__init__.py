"""Diagnostics: activation statistics through nnsight, collapse metrics, function- and weight-space metrics.

Modules: :mod:`~karcher_lab.diagnostics.activations` (capturing running statistics per decoder block),
:mod:`~karcher_lab.diagnostics.collapse` (variance, effective rank, numerical rank, bootstrap, collapse ratios).
Every metric returns a tidy pandas DataFrame with ``mean`` and ``std`` columns.
"""
from karcher_lab.diagnostics.activations import ActivationStats, capture_activations, encode_probes
from karcher_lab.diagnostics.collapse import collapse_metrics, collapse_ratios, effective_rank, numerical_rank

__all__ = [
    "ActivationStats", "capture_activations", "collapse_metrics", "collapse_ratios", "effective_rank",
    "encode_probes", "numerical_rank",
]
