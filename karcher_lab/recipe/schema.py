"""Merge recipes in mergekit's YAML schema: parsing and validation.

A recipe is what ``mergekit-yaml`` reads, so users' existing configs run unchanged::

    merge_method: ties
    base_model: path/or/hub-id
    models:
      - model: org/expert-a
        parameters: {weight: 0.7, density: [0.2, 0.8]}
      - model: ./expert-b@main
    parameters: {lambda: 1.0}
    dtype: float32          # compute/load dtype (inputs are cast to it on load)
    out_dtype: bfloat16     # saved dtype (sets torch_dtype in config.json)
    tokenizer_source: base  # base | union | a model

Supported: every top-level key above, ``tokenizer: {source: ...}``, and ``slices`` in its whole-model
form (one output slice whose sources each span a model's full ``layer_range``), which is normalized to
the ``models`` form with the slice's parameters as an extra scope between per-model and global (as
mergekit does). Partial layer ranges, several slices, ``modules``, LoRA references (``model+lora``),
``tokenizer.tokens``/``pad_to_multiple_of`` and ``chat_template`` raise NotSupportedError. Unlike
mergekit, unknown top-level keys are an error (mergekit ignores them silently, hiding typos).

Parameter *values* are kept unevaluated here (scalars, gradients, ``[{filter, value}]`` lists); see
:mod:`karcher_lab.recipe.parameters` for how they are resolved per tensor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from karcher_lab.errors import NotSupportedError, RecipeError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
"""dtype names a recipe may use (mergekit's, with an optional ``torch.`` prefix)."""

TOP_LEVEL_KEYS = (
    "merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "modules", "name",
)


@dataclass(frozen=True)
class ModelRef:
    """A model: a local directory or a Hugging Face hub id, with an optional revision (``id@rev``)."""

    path: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


@dataclass
class ModelEntry:
    """One input model and its own (unevaluated) parameter settings."""

    model: ModelRef
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A validated recipe in the ``models`` form.

    ``parameters`` are the global settings; ``slice_parameters`` the settings of a whole-model slice
    (empty for the ``models`` form), which rank between per-model and global ones. ``layer_ranges``
    holds each source's ``layer_range`` from the slices form, checked against the models' depth once
    their configs are read (see :func:`check_layer_ranges`). ``source`` is the YAML text as given.
    """

    merge_method: str
    models: list[ModelEntry]
    base_model: ModelRef | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    slice_parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | ModelRef | None = None
    layer_ranges: dict[ModelRef, tuple[int, int]] = field(default_factory=dict)
    source: str | None = None

    def all_models(self) -> list[ModelRef]:
        """Every referenced model, base first when it is not among the models, without repeats."""
        refs = [e.model for e in self.models]
        if self.base_model is not None and self.base_model not in refs:
            refs = [self.base_model] + refs
        return refs


def parse_model_ref(value: Any, where: str) -> ModelRef:
    """``"path"``, ``"path@revision"`` or ``{path, revision}`` (mergekit's ModelPath forms)."""
    if isinstance(value, Mapping):
        if "lora" in value and value["lora"]:
            raise NotSupportedError(f"{where}: LoRA references are not supported yet (merge the adapter first)")
        if "model" in value:
            return parse_model_ref(value["model"], where)
        unknown = sorted(set(value) - {"path", "revision"})
        if unknown or "path" not in value:
            raise RecipeError(f"{where}: a model reference needs 'path' (and optionally 'revision'), got keys {sorted(value)}")
        return ModelRef(_string(value["path"], f"{where}.path"), _optional_string(value.get("revision"), f"{where}.revision"))
    text = _string(value, where)
    if "+" in text:
        raise NotSupportedError(
            f"{where}: {text!r} names a LoRA adapter ('model+lora'), which is not supported yet; "
            "merge the adapter into its base model first"
        )
    if text.count("@") > 1:
        raise RecipeError(f"{where}: invalid model reference {text!r} (more than one '@')")
    path, _, revision = text.partition("@")
    if not path:
        raise RecipeError(f"{where}: empty model path in {text!r}")
    return ModelRef(path, revision or None)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()


def _optional_string(value: Any, where: str) -> str | None:
    return None if value is None else _string(value, where)


def _check_setting(value: Any, where: str) -> None:
    """A setting is a scalar, a list of scalars (a gradient), a {filter, value} map or a list of them."""
    scalar = (bool, int, float, str)
    if isinstance(value, scalar):
        return
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"filter", "value"})
        if unknown or "value" not in value:
            raise RecipeError(f"{where}: a conditional setting has keys 'filter' and 'value', got {sorted(value)}")
        if value.get("filter") is not None and not isinstance(value["filter"], str):
            raise RecipeError(f"{where}.filter: expected a string, got {value['filter']!r}")
        _check_setting(value["value"], f"{where}.value")
        if isinstance(value["value"], Mapping) or (
            isinstance(value["value"], list) and any(isinstance(v, Mapping) for v in value["value"])
        ):
            raise RecipeError(f"{where}.value: a conditional value must be a scalar or a gradient list")
        return
    if isinstance(value, list):
        kinds = {isinstance(v, Mapping) for v in value}
        if len(kinds) > 1:
            raise RecipeError(f"{where}: a list mixes {{filter, value}} entries and plain values")
        for i, v in enumerate(value):
            if not isinstance(v, (Mapping,) + scalar):
                raise RecipeError(f"{where}[{i}]: expected a number, bool, string or {{filter, value}}, got {v!r}")
            _check_setting(v, f"{where}[{i}]")
        return
    raise RecipeError(f"{where}: expected a scalar, a list or {{filter, value}}, got {value!r}")


def parse_parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected a mapping of parameter names to values, got {value!r}")
    out = {}
    for name, setting in value.items():
        if not isinstance(name, str):
            raise RecipeError(f"{where}: parameter names must be strings, got {name!r}")
        _check_setting(setting, f"{where}.{name}")
        out[name] = setting
    return out


def parse_dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    name = _string(value, where).removeprefix("torch.")
    if name not in DTYPES:
        raise RecipeError(f"{where}: unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
    return name


def _models_form(raw: Any) -> list[ModelEntry]:
    if not isinstance(raw, list) or not raw:
        raise RecipeError("models: expected a non-empty list of {model: ..., parameters: ...}")
    entries = []
    for i, item in enumerate(raw):
        where = f"models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping) or "model" not in item:
            raise RecipeError(f"{where}: expected a mapping with a 'model' key, got {item!r}")
        unknown = sorted(set(item) - {"model", "parameters"})
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {unknown}; an entry has 'model' and 'parameters'")
        entries.append(ModelEntry(parse_model_ref(item["model"], f"{where}.model"), parse_parameters(item.get("parameters"), f"{where}.parameters")))
    return entries


def _slices_form(raw: Any) -> tuple[list[ModelEntry], dict[str, Any], ModelRef | None, dict[ModelRef, tuple[int, int]]]:
    """The whole-model slices form: one output slice, each source spanning a full layer range."""
    if not isinstance(raw, list) or not raw:
        raise RecipeError("slices: expected a non-empty list of output slices")
    if len(raw) > 1:
        raise NotSupportedError(
            f"slices: {len(raw)} output slices (layer stacking / frankenmerges) are not supported yet; "
            "only one slice covering every model's full layer_range is"
        )
    out_slice = raw[0]
    if not isinstance(out_slice, Mapping) or "sources" not in out_slice:
        raise RecipeError("slices[0]: expected a mapping with 'sources'")
    unknown = sorted(set(out_slice) - {"sources", "base_model", "parameters", "residual_weight"})
    if unknown:
        raise RecipeError(f"slices[0]: unknown key(s) {unknown}")
    if out_slice.get("residual_weight") is not None:
        raise NotSupportedError("slices[0].residual_weight is not supported yet")
    sources = out_slice["sources"]
    if not isinstance(sources, list) or not sources:
        raise RecipeError("slices[0].sources: expected a non-empty list")
    entries, ranges = [], {}
    for i, src in enumerate(sources):
        where = f"slices[0].sources[{i}]"
        if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
            raise RecipeError(f"{where}: expected a mapping with 'model' and 'layer_range'")
        unknown = sorted(set(src) - {"model", "layer_range", "parameters"})
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {unknown}")
        lr = src["layer_range"]
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)):
            raise RecipeError(f"{where}.layer_range: expected [start, end] integers, got {lr!r}")
        ref = parse_model_ref(src["model"], f"{where}.model")
        entries.append(ModelEntry(ref, parse_parameters(src.get("parameters"), f"{where}.parameters")))
        ranges[ref] = (lr[0], lr[1])
    base = parse_model_ref(out_slice["base_model"], "slices[0].base_model") if out_slice.get("base_model") else None
    return entries, parse_parameters(out_slice.get("parameters"), "slices[0].parameters"), base, ranges


def check_layer_ranges(recipe: Recipe, num_layers: Mapping[ModelRef, int]) -> None:
    """Slices form: every source must span its model's whole depth, [0, num_layers]."""
    for ref, (start, end) in recipe.layer_ranges.items():
        depth = num_layers[ref]
        if (start, end) != (0, depth):
            raise NotSupportedError(
                f"slices: layer_range [{start}, {end}] of {ref} is not the whole model ([0, {depth}]); "
                "partial layer ranges are not supported yet"
            )


def parse_recipe(data: Any, source: str | None = None) -> Recipe:
    """Validate a recipe given as a mapping (already loaded YAML); raise RecipeError naming the key."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"a recipe is a mapping with at least 'merge_method' and 'models', got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise RecipeError(f"unknown top-level key(s) {unknown}; known: {', '.join(TOP_LEVEL_KEYS)}")
    if "merge_method" not in data:
        raise RecipeError("missing 'merge_method' (e.g. merge_method: karcher)")
    method = _string(data["merge_method"], "merge_method")
    if data.get("modules"):
        raise NotSupportedError("modules: multi-module recipes are not supported yet; use 'models'")
    has_models, has_slices = bool(data.get("models")), bool(data.get("slices"))
    if has_models == has_slices:
        raise RecipeError("exactly one of 'models' or 'slices' must be given (and non-empty)")
    base = parse_model_ref(data["base_model"], "base_model") if data.get("base_model") else None
    slice_params: dict[str, Any] = {}
    ranges: dict[ModelRef, tuple[int, int]] = {}
    if has_models:
        entries = _models_form(data["models"])
    else:
        entries, slice_params, slice_base, ranges = _slices_form(data["slices"])
        if slice_base is not None and base is not None and slice_base != base:
            raise RecipeError(f"slices[0].base_model {slice_base} differs from base_model {base}")
        base = base or slice_base
    seen: set[ModelRef] = set()
    for i, e in enumerate(entries):
        if e.model in seen:
            raise RecipeError(f"model {e.model} is listed twice (entry {i})")
        seen.add(e.model)
    if data.get("chat_template"):
        raise NotSupportedError("chat_template is not supported yet (the tokenizer files are copied as they are)")
    tokenizer_source = data.get("tokenizer_source")
    if data.get("tokenizer") is not None:
        tok = data["tokenizer"]
        if tokenizer_source is not None:
            raise RecipeError("give either 'tokenizer_source' or 'tokenizer', not both")
        if not isinstance(tok, Mapping):
            raise RecipeError(f"tokenizer: expected a mapping, got {tok!r}")
        unsupported = sorted(k for k in tok if k != "source" and tok[k] is not None)
        if unsupported:
            raise NotSupportedError(f"tokenizer: {unsupported} not supported yet (only tokenizer.source is)")
        tokenizer_source = tok.get("source", "union")
    if tokenizer_source is not None and tokenizer_source not in ("base", "union"):
        tokenizer_source = parse_model_ref(tokenizer_source, "tokenizer_source")
    if tokenizer_source == "base" and base is None:
        raise RecipeError("tokenizer_source: base, but the recipe has no base_model")
    return Recipe(
        merge_method=method,
        models=entries,
        base_model=base,
        parameters=parse_parameters(data.get("parameters"), "parameters"),
        slice_parameters=slice_params,
        dtype=parse_dtype(data.get("dtype"), "dtype"),
        out_dtype=parse_dtype(data.get("out_dtype"), "out_dtype"),
        tokenizer_source=tokenizer_source,
        layer_ranges=ranges,
        source=source,
    )


def load_recipe(path_or_text: str | os.PathLike) -> Recipe:
    """Read a recipe from a YAML file path (or YAML text containing a newline) and validate it."""
    text = str(path_or_text)
    if isinstance(path_or_text, os.PathLike) or "\n" not in text:
        path = Path(text)
        if not path.is_file():
            raise RecipeError(f"recipe file {text!r} does not exist")
        text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"the recipe is not valid YAML: {exc}") from None
    return parse_recipe(data, source=text)
