"""karcher_lab: geometry-aware merging of fine-tuned LLMs (Fisher-Rao Karcher means, GeoMerge).

``karcher_lab.merge`` is both the package of merge methods (``karcher_lab.merge.karcher`` ...) and the
model-level merge function: calling the module, ``karcher_lab.merge(models, method, ...)``, runs
:func:`karcher_lab.pipeline.merge_models`. (The module's class is a ``types.ModuleType`` subclass
with a ``__call__``, so both uses coexist.)
"""
import types

__version__ = "0.1.0"

from karcher_lab import merge  # noqa: E402  (after __version__, which the pipeline reads)
from karcher_lab.merge import get_method, list_methods, merge_tensors  # noqa: E402
from karcher_lab.pipeline.lora import merge_lora  # noqa: E402
from karcher_lab.pipeline import MergeSession, merge_models  # noqa: E402


class _CallableMergeModule(types.ModuleType):
    """The ``karcher_lab.merge`` package, callable as :func:`karcher_lab.pipeline.merge_models`."""

    def __call__(self, *args, **kwargs):
        return merge_models(*args, **kwargs)

    __call__.__doc__ = merge_models.__doc__


merge.__class__ = _CallableMergeModule

__all__ = ["MergeSession", "get_method", "list_methods", "merge", "merge_lora", "merge_models", "merge_tensors", "__version__"]
