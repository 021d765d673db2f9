"""The control panel of a merge: which experts, their weights, the method, its parameters and whether
the base model is given, read back as one checked request.

Per expert a checkbox (merged or not), a weight slider w_i (CSS class ``kl-weight-slider``, shown for
checked experts only) and the normalized weight α_i = w_i / Σ_checked w_j next to it; a method dropdown
with the method's summary and its parameters' controls (:func:`karcher_lab.widgets.controls.method_controls`),
and a checkbox for the base model. The dropdown lists the tensor methods of
:func:`~karcher_lab.methods.registry.list_methods` and, after them, any ``extra_methods`` under the names
they are given (the LoRA methods of an adapter study as ``lora:<name>``,
:func:`karcher_lab.pipeline.adapter_subsets.lora_method_choices`).
"""
from __future__ import annotations

import html
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as widgets

from karcher_lab.checks import check_model_count, check_weights
from karcher_lab.errors import EmptyInputError, ParameterError
from karcher_lab.methods.lora.registry import LoraMethod
from karcher_lab.methods.registry import MergeMethod, get_method, list_methods
from karcher_lab.widgets.controls import STYLE, method_controls

WEIGHT_CLASS = "kl-weight-slider"


class MergeControls(widgets.HBox):
    """Experts and method controls; ``on_change`` (no arguments) is called after any control changes.

    Parameters
    ----------
    experts : sequence of str
        The experts' names, one row each.
    selected : sequence of str
        Those checked at start.
    method : str
        The method selected at start (a registry name or a key of ``extra_methods``).
    has_base : bool
        Whether a base model exists (else its checkbox is off and disabled).
    use_base : bool
        Whether the base checkbox starts on.
    on_change : callable
        Called after every change, once the panel's own display (α labels, parameter controls) is current.
    extra_methods : mapping of str to LoraMethod, optional
        More methods for the dropdown, by the name it shows and :meth:`request` returns (e.g.
        ``{"lora:geomerge": get_lora_method("geomerge")}``); a name that is also a tensor method's is
        refused (ParameterError).
    """

    def __init__(self, experts: Sequence[str], *, selected: Sequence[str], method: str, has_base: bool,
                 use_base: bool, on_change: Callable[[], None], extra_methods: Mapping[str, LoraMethod] | None = None):
        self.extra_methods = dict(extra_methods or {})
        clash = sorted(set(self.extra_methods) & set(list_methods()))
        if clash:
            raise ParameterError(f"extra method name(s) {clash} are tensor methods' names; give them distinct names")
        self.on_change = on_change
        self.checkboxes: list[widgets.Checkbox] = []
        self.sliders: list[widgets.FloatSlider] = []
        self.alpha_labels: list[widgets.HTML] = []
        rows = []
        for name in experts:
            checkbox = widgets.Checkbox(value=name in selected, description=name, indent=False,
                                        layout=widgets.Layout(width="9em"))
            slider = widgets.FloatSlider(value=1.0, min=0.0, max=1.0, step=0.01, readout_format=".2f",
                                         continuous_update=False, layout=widgets.Layout(width="18em"))
            slider.add_class(WEIGHT_CLASS)
            label = widgets.HTML("", layout=widgets.Layout(width="7em"))
            checkbox.observe(self._on_weights, "value")
            slider.observe(self._on_weights, "value")
            self.checkboxes.append(checkbox)
            self.sliders.append(slider)
            self.alpha_labels.append(label)
            rows.append(widgets.HBox([checkbox, slider, label]))
        self.method_dropdown = widgets.Dropdown(options=list_methods() + list(self.extra_methods), value=method,
                                                description="method", style=STYLE)
        self.method_dropdown.observe(self._on_method, "value")
        self.use_base_box = widgets.Checkbox(value=use_base and has_base, indent=False,
                                             description="base model θ₀ for methods that use one",
                                             disabled=not has_base, layout=widgets.Layout(width="auto"))
        self.use_base_box.observe(self._changed, "value")
        self.method_info = widgets.HTML("")
        self.param_box = widgets.VBox([])
        self.param_controls: dict[str, widgets.Widget] = {}
        """The current method's parameter controls by parameter name."""
        self._show_method_controls()
        self._show_weights()
        experts_box = widgets.VBox([widgets.HTML("<b>experts</b> (weight → normalized α)"), *rows])
        method_box = widgets.VBox([widgets.HTML("<b>method</b>"), self.method_dropdown, self.method_info,
                                   self.use_base_box, self.param_box])
        super().__init__([experts_box, method_box])

    def request(self) -> dict[str, Any]:
        """What the controls ask for, checked before any work.

        Returns
        -------
        dict
            ``method`` (the dropdown's name), ``members`` (checked experts' indices), ``alpha`` (their normalized
            weights, summing to 1), ``params`` ({name: value} of the method's controls) and ``use_base``
            (the base checkbox).

        Raises
        ------
        EmptyInputError
            No expert is checked.
        ModelCountError
            The method cannot merge that many experts.
        WeightError
            Every checked expert has weight 0.
        ParameterError
            A parameter value the method refuses.
        """
        name, method = self.method_dropdown.value, self.method
        members = [i for i, checkbox in enumerate(self.checkboxes) if checkbox.value]
        if not members:
            raise EmptyInputError("no expert is checked: check at least one")
        most = None if isinstance(method, LoraMethod) else method.max_models
        check_model_count(len(members), method.min_models, most, label=name, what="checked experts")
        alpha = check_weights([self.sliders[i].value for i in members], len(members), normalize=True,
                              label="expert weights: ", what="checked experts").tolist()
        params = {key: control.value for key, control in self.param_controls.items()}
        declared = {p.name: p for p in method.params}
        for key, value in params.items():
            declared[key].coerce(value, name)
        return dict(method=name, members=members, alpha=alpha, params=params, use_base=self.use_base_box.value)

    @property
    def method(self) -> MergeMethod | LoraMethod:
        """The selected method's registry entry (a tensor method's, or the extra method's)."""
        value = self.method_dropdown.value
        return self.extra_methods[value] if value in self.extra_methods else get_method(value)

    def _show_method_controls(self) -> None:
        method = self.method
        controls, unsettable = method_controls(method)
        for control in controls.values():
            control.observe(self._changed, "value")
        self.param_controls = controls
        self.param_box.children = list(controls.values())
        notes = [html.escape(method.summary)]
        if isinstance(method, LoraMethod):
            notes.append(f"merges the adapters' low-rank factors (merged rank: {html.escape(method.rank)}), "
                         "folded onto their base")
        elif method.base == "required":
            notes.append("needs the base model")
        if method.weights == "unused":
            notes.append("ignores the weights")
        if unsettable:
            notes.append(f"parameter(s) {', '.join(unsettable)} cannot be set in this panel")
        self.method_info.value = f"<small>{' · '.join(notes)}</small>"

    def _show_weights(self) -> None:
        """Show sliders for checked experts only, with their normalized weights α."""
        raw = [s.value if c.value else 0.0 for c, s in zip(self.checkboxes, self.sliders)]
        total = sum(raw)
        for checkbox, slider, label, w in zip(self.checkboxes, self.sliders, self.alpha_labels, raw):
            shown = "flex" if checkbox.value else "none"
            slider.layout.display = label.layout.display = shown
            label.value = f"α = {w / total:.3f}" if checkbox.value and total > 0 else "α = —"

    def _on_weights(self, change) -> None:
        self._show_weights()
        self.on_change()

    def _on_method(self, change) -> None:
        self._show_method_controls()
        self.on_change()

    def _changed(self, change) -> None:
        self.on_change()
