"""Per-tensor resolution of recipe parameter settings, exactly as mergekit 0.1.5 resolves them.

A setting (the value of one parameter in one scope) is one of

* a scalar: used as is;
* a list of scalars, a *gradient*: with ``t`` the tensor's layer position, ``s = t (len − 1)``,
  ``i0 = ⌊s⌋``, ``i1 = min(len − 1, i0 + 1)``, ``f = s − i0``, the value is ``(1 − f) v[i0] + f v[i1]``
  for numeric values, and ``v[⌊s⌋]`` (a step, no interpolation) when the list holds booleans or strings
  (mergekit ``config.evaluate_setting``);
* ``{filter, value}`` or a list of them: the first entry whose ``filter`` is absent, ``"*"``, or a plain
  substring of the tensor name wins, and its ``value`` is evaluated as above; no match (or an empty
  list) means "not set here".

Scopes are searched from the most to the least specific: a per-model parameter (``weight``, ``density``
...) looks in the model's own ``parameters``, then the whole-model slice's, then the global ones; a
shared parameter looks only in the slice's and the global ones (mergekit never reads a shared
parameter from a model's entry). The first scope where the setting yields a value wins; otherwise the
method's default applies (or the parameter is required).

The layer position (:func:`layer_position`) is ``t = i / (L − 1)`` for a tensor of decoder layer ``i``
(:func:`karcher_lab.io.architecture.layer_index`) in a layer stack of ``L`` layers (``t = 1`` when
``L = 1``, as mergekit's planner does), and ``t = 0`` for every tensor outside the layer stacks:
embeddings, final norm and LM head. A model with several layer stacks (towers; a LLaVA-style model has
a text decoder and a vision encoder) resolves each tower on its own depth, as mergekit resolves each
module (:func:`tower_depths`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from karcher_lab.io.architecture import layer_index, layer_tower

NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

NOT_SET: Any = type("NotSet", (), {"__repr__": lambda self: "NOT_SET"})()
"""Returned when no scope sets a parameter for a tensor (distinct from an explicit value)."""


def num_layers(config: Mapping[str, Any], tensor_names: Iterable[str]) -> int:
    """Depth of a model: its config's layer count, else one more than the largest layer index."""
    for key in NUM_LAYERS_KEYS:
        if isinstance(config.get(key), int):
            return int(config[key])
    indices = [i for i in map(layer_index, tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def tower_depths(config: Mapping[str, Any], tensor_names: Iterable[str]) -> dict[str, int]:
    """Depth of each layer stack (tower, :func:`karcher_lab.io.architecture.layer_tower`) of a model:
    one more than its largest layer index, or the config's layer count when the model has one tower."""
    depths: dict[str, int] = {}
    names = list(tensor_names)
    for name in names:
        index, tower = layer_index(name), layer_tower(name)
        if index is not None:
            depths[tower] = max(depths.get(tower, 0), index + 1)
    if len(depths) == 1:
        depths = {tower: num_layers(config, names) for tower in depths}
    return depths


def layer_position(tensor_name: str, n_layers: int | Mapping[str, int]) -> float:
    """t ∈ [0, 1] at which gradients are evaluated: i/(L−1) in layer i, 1 when L = 1, 0 outside layers.

    ``n_layers``: the depth L, or each tower's depth (:func:`tower_depths`), L then being the depth of
    the tensor's own tower."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0
    depth = n_layers[layer_tower(tensor_name)] if isinstance(n_layers, Mapping) else n_layers
    return index / (depth - 1) if depth > 1 else 1.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_setting(setting: Any, tensor_name: str, t: float, coerce: Callable[[Any], Any]) -> Any:
    """The value of one scope's setting for one tensor, or NOT_SET (see the module docstring).

    ``coerce`` converts a raw value to the parameter's type (raising on bad values); list entries are
    coerced before interpolation and the interpolated value once more, as mergekit validates them.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        return coerce(setting)
    if not setting:
        return NOT_SET
    if all(not isinstance(v, Mapping) for v in setting):
        values = [coerce(v) for v in setting]
        if not all(_is_number(v) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return coerce((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(cond["value"], tensor_name, t, coerce)
    return NOT_SET


def resolve_setting(
    name: str,
    scopes: Iterable[Mapping[str, Any] | None],
    tensor_name: str,
    t: float,
    coerce: Callable[[Any], Any],
) -> Any:
    """The first value the scopes (most specific first) give parameter ``name``, or NOT_SET."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t, coerce)
            if value is not NOT_SET:
                return value
    return NOT_SET
