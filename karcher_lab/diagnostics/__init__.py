"""Diagnostics: the measuring instruments every notebook, widget and experiment uses.

Modules: :mod:`~karcher_lab.diagnostics.examples` (the prompt/answer examples models are scored on),
:mod:`~karcher_lab.diagnostics.task_data` (users' examples and probe texts, read from files, lists or
datasets), :mod:`~karcher_lab.diagnostics.scoring` (per-task scoring options: chat template, answer
normalization, greedy decoding budget), :mod:`~karcher_lab.diagnostics.sequences` (their token sequences,
teacher-forcing batches and greedy decoding), :mod:`~karcher_lab.diagnostics.activations` (running
activation statistics per decoder block, captured through nnsight),
:mod:`~karcher_lab.diagnostics.collapse` (activation variance, effective rank, numerical rank, bootstrap,
collapse ratios), :mod:`~karcher_lab.diagnostics.function` (answer NLL, perplexity, exact match, KL and
Fisher–Rao distance to an expert, normalized accuracy),
:mod:`~karcher_lab.diagnostics.fisher` (diagonal Fisher with labels sampled from the model),
:mod:`~karcher_lab.diagnostics.weights` (norm shrinkage, angles, chord-versus-geodesic gap, distance to
each expert, on opened models or state dicts). Every metric returns a tidy pandas DataFrame with
``mean`` and ``std`` columns; :mod:`karcher_lab.plots` draws them.
"""
from karcher_lab.diagnostics.activations import SITES, ActivationStats, capture_activations, encode_probes
from karcher_lab.diagnostics.collapse import collapse_metrics, collapse_ratios, effective_rank, numerical_rank
from karcher_lab.diagnostics.fisher import diagonal_fisher
from karcher_lab.diagnostics.function import function_distance, normalized_accuracy, task_quality
from karcher_lab.diagnostics.scoring import TaskScoring
from karcher_lab.diagnostics.task_data import as_examples, load_examples, load_probes
from karcher_lab.diagnostics.weights import expert_angles, layer_summary, norm_ratios, tensor_norms, weight_metrics

__all__ = [
    "SITES", "ActivationStats", "TaskScoring", "as_examples", "capture_activations", "collapse_metrics",
    "collapse_ratios", "diagonal_fisher", "effective_rank", "encode_probes", "expert_angles", "function_distance",
    "layer_summary", "load_examples", "load_probes", "norm_ratios", "normalized_accuracy", "numerical_rank",
    "task_quality", "tensor_norms", "weight_metrics",
]
