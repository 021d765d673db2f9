"""ipywidgets controls generated from the merge registry's parameter declarations.

Every :class:`karcher_lab.methods.registry.Param` becomes a control of its kind: a checkbox (bool), a
dropdown (``choices``), an integer or float box (bounded where the parameter is), a text box (free
strings). A parameter that declares a ``slider`` (karcher's step size η: [0.05, 1], within the paper's
eq. 5 range (0, 1]) gets that slider, carrying the CSS class ``kl-<name>-slider``. Parameters of kind ``object`` (per-model tensors such as ``fisher``) cannot be
entered in a panel and are listed as such. Values are read back unchecked: the registry's own
``Param.coerce`` (called by the merge) reports a bad value as a ParameterError.
"""
from __future__ import annotations

import math
from typing import Any

import ipywidgets as widgets

from karcher_lab.methods.lora.registry import LoraMethod
from karcher_lab.methods.registry import REQUIRED, MergeMethod, Param

STYLE = {"description_width": "initial"}


def slider_class(name: str) -> str:
    """The CSS class of a parameter's declared slider (``kl-eta-slider`` for karcher's η)."""
    return f"kl-{name}-slider"


def _initial(param: Param) -> Any:
    if param.default is not REQUIRED:
        return param.default
    if param.kind is bool:
        return False
    if param.choices:
        return param.choices[0]
    if param.kind in (int, float):
        return param.kind(param.low if param.low is not None else 0)
    return ""


def param_control(method: MergeMethod | LoraMethod, param: Param) -> widgets.Widget | None:
    """The control for one parameter (None for ``object`` parameters), with the doc as its tooltip."""
    value = _initial(param)
    common = dict(description=param.name, tooltip=param.doc, style=STYLE)
    if param.slider is not None:
        low, high, step = param.slider
        control = widgets.FloatSlider(value=value, min=low, max=high, step=step, readout_format=".2f",
                                      continuous_update=False, **common)
        control.add_class(slider_class(param.name))
        return control
    if param.kind is object:
        return None
    if param.kind is bool:
        return widgets.Checkbox(value=bool(value), indent=False, **common)
    if param.choices is not None:
        return widgets.Dropdown(options=list(param.choices), value=value, **common)
    if param.kind is int:
        return widgets.BoundedIntText(value=value, min=int(param.low) if param.low is not None else -10**9,
                                      max=int(param.high) if param.high is not None else 10**9, **common)
    if param.kind is float:
        if param.low is not None and param.high is not None and math.isfinite(param.high - param.low):
            return widgets.FloatSlider(value=value, min=param.low, max=param.high, step=(param.high - param.low) / 100,
                                       continuous_update=False, readout_format=".3g", **common)
        return widgets.FloatText(value=value, **common)
    return widgets.Text(value=str(value), **common)


def method_controls(method: MergeMethod | LoraMethod) -> tuple[dict[str, widgets.Widget], list[str]]:
    """``({name: control}, [names of parameters that cannot be set in a panel])`` for ``method``, a tensor
    or a LoRA method (both declare their ``params`` as :class:`~karcher_lab.methods.registry.Param`)."""
    controls, unsettable = {}, []
    for param in method.params:
        control = param_control(method, param)
        if control is None:
            unsettable.append(param.name)
        else:
            controls[param.name] = control
    return controls, unsettable
