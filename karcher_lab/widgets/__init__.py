"""Interactive panels for notebooks: compose pipeline, diagnostics and plots; hold no math of their own.

- :class:`MergeExplorer` — pick experts, weights, a method and its parameters; watch quality and
  collapse figures update in place.
- :class:`CollapseViewer` — layer curves with ± std bands from sweep results.
- :class:`GeometryPlayground`, :class:`ScalingToyPlayground` — teaching panels (notebook 02).

Every panel is an ``ipywidgets`` box: evaluate it in a notebook cell to show it.
"""
from karcher_lab.widgets.collapse_viewer import CollapseViewer
from karcher_lab.widgets.explorer import MergeExplorer
from karcher_lab.widgets.playground import GeometryPlayground, ScalingToyPlayground

__all__ = ["CollapseViewer", "GeometryPlayground", "MergeExplorer", "ScalingToyPlayground"]
