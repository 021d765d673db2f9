"""karcher_lab: geometry-aware merging of fine-tuned LLMs (Fisher-Rao Karcher means, GeoMerge).

The entry points: :func:`merge` (whole models, also :func:`merge_models`), :func:`merge_tensors` (one
tensor), :class:`MergeSession` (repeated merges of the same models), :func:`merge_lora` (PEFT adapters),
the registry of merge methods (:func:`get_method`, :func:`list_methods`; the methods themselves are
in :mod:`karcher_lab.methods`), and :class:`Study` / :func:`load_study` (users' own experts and data).
"""
__version__ = "0.1.0"

from karcher_lab.methods import get_method, list_methods, merge_tensors  # noqa: E402  (after __version__)
from karcher_lab.pipeline import MergeSession, merge_models  # noqa: E402
from karcher_lab.pipeline.lora import merge_lora  # noqa: E402
from karcher_lab.methods.lora import geomerge_modules  # noqa: E402
from karcher_lab.study import Study, load_study  # noqa: E402

merge = merge_models
"""``karcher_lab.merge(models, method, ...)``: :func:`karcher_lab.pipeline.merge_models` under its short name."""

__all__ = ["MergeSession", "Study", "geomerge_modules", "get_method", "list_methods", "merge", "merge_lora", "merge_models", "merge_tensors", "load_study", "__version__"]
