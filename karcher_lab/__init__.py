"""karcher_lab: geometry-aware merging of fine-tuned LLMs (Fisher-Rao Karcher means, GeoMerge)."""
from karcher_lab.merge import get_method, list_methods, merge_tensors

__version__ = "0.1.0"
__all__ = ["get_method", "list_methods", "merge_tensors", "__version__"]
