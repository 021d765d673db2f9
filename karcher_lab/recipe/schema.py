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

Supported: every top-level key above, ``tokenizer: {source: ...}``, and ``slices``: a list of output
slices, each with ``sources`` (a model and its ``layer_range: [start, end)``, optionally per-source
``parameters``), an optional ``base_model`` and ``parameters``. The output stacks the slices' layers in
order (frankenmerges: the same model may appear in several slices); every source of one slice spans
the same number of layers. One slice whose sources each span a model's full ``layer_range`` is also
normalized to the ``models`` form, with the slice's parameters as an extra scope between per-model and
global (as mergekit does). ``modules``, ``residual_weight``, LoRA references (``model+lora``),
``tokenizer.tokens``/``pad_to_multiple_of`` and ``chat_template`` raise NotSupportedError. Unlike
mergekit, unknown top-level keys are an error (mergekit ignores them silently, hiding typos); the one
key of our own is ``seed``, the seed of randomized methods, which mergekit ignores (its
``--random-seed`` is a command-line option).

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
    "tokenizer_source", "tokenizer", "chat_template", "modules", "name", "seed",
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
class SliceSource:
    """One source of an output slice: layers ``layer_range`` = [start, end) of ``model``."""

    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputSlice:
    """One output slice: its sources (equally deep), its own base model and parameters (optional)."""

    sources: list[SliceSource]
    base_model: ModelRef | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A validated recipe in the ``models`` form.

    ``parameters`` are the global settings; ``slice_parameters`` the settings of a one-slice recipe
    (empty for the ``models`` form), which rank between per-model and global ones. ``slices`` holds the
    slices form as given; ``layer_ranges`` each source's ``layer_range`` of a one-slice recipe, whose
    ``models`` are that slice's sources. A recipe of several slices lists every model once under
    ``models`` (without parameters). Whether the slices span whole models is known once the models'
    configs are read (:func:`spans_whole_models`). ``seed`` seeds randomized methods (None: not
    given). ``source`` is the YAML text as given.
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
    slices: list[OutputSlice] = field(default_factory=list)
    seed: int | None = None
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


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value)):
        raise RecipeError(f"{where}: expected [start, end] integers, got {value!r}")
    if not 0 <= value[0] < value[1]:
        raise RecipeError(f"{where}: expected 0 <= start < end, got {value!r}")
    return value[0], value[1]


def _slices_form(raw: Any) -> list[OutputSlice]:
    """The output slices, in order (see the module docstring)."""
    if not isinstance(raw, list) or not raw:
        raise RecipeError("slices: expected a non-empty list of output slices")
    out = []
    for k, out_slice in enumerate(raw):
        here = f"slices[{k}]"
        if not isinstance(out_slice, Mapping) or "sources" not in out_slice:
            raise RecipeError(f"{here}: expected a mapping with 'sources'")
        unknown = sorted(set(out_slice) - {"sources", "base_model", "parameters", "residual_weight"})
        if unknown:
            raise RecipeError(f"{here}: unknown key(s) {unknown}")
        if out_slice.get("residual_weight") is not None:
            raise NotSupportedError(f"{here}.residual_weight is not supported yet")
        sources = out_slice["sources"]
        if not isinstance(sources, list) or not sources:
            raise RecipeError(f"{here}.sources: expected a non-empty list")
        parsed = []
        for i, src in enumerate(sources):
            where = f"{here}.sources[{i}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                raise RecipeError(f"{where}: expected a mapping with 'model' and 'layer_range'")
            unknown = sorted(set(src) - {"model", "layer_range", "parameters"})
            if unknown:
                raise RecipeError(f"{where}: unknown key(s) {unknown}")
            ref = parse_model_ref(src["model"], f"{where}.model")
            if any(p.model == ref for p in parsed):
                raise RecipeError(f"{where}: model {ref} is listed twice in {here}")
            parsed.append(SliceSource(ref, _layer_range(src["layer_range"], f"{where}.layer_range"),
                                      parse_parameters(src.get("parameters"), f"{where}.parameters")))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in parsed}
        if len(lengths) > 1:
            raise RecipeError(f"{here}: every source of a slice must span the same number of layers, got "
                              + ", ".join(f"{s.model} {list(s.layer_range)}" for s in parsed))
        base = parse_model_ref(out_slice["base_model"], f"{here}.base_model") if out_slice.get("base_model") else None
        out.append(OutputSlice(parsed, base, parse_parameters(out_slice.get("parameters"), f"{here}.parameters")))
    return out


def spans_whole_models(recipe: Recipe, num_layers: Mapping[ModelRef, int]) -> bool:
    """True for the ``models`` form and for one slice whose sources each span their model's whole
    depth [0, num_layers]; a layer_range past a model's depth is an error."""
    for k, out_slice in enumerate(recipe.slices):
        for i, src in enumerate(out_slice.sources):
            if src.layer_range[1] > num_layers[src.model]:
                raise RecipeError(
                    f"slices[{k}].sources[{i}].layer_range {list(src.layer_range)} goes past the "
                    f"{num_layers[src.model]} layers of {src.model}"
                )
    return len(recipe.slices) <= 1 and all(r == (0, num_layers[ref]) for ref, r in recipe.layer_ranges.items())


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
    slices: list[OutputSlice] = []
    if has_models:
        entries = _models_form(data["models"])
        seen: set[ModelRef] = set()
        for i, e in enumerate(entries):
            if e.model in seen:
                raise RecipeError(f"model {e.model} is listed twice (entry {i})")
            seen.add(e.model)
    else:
        slices = _slices_form(data["slices"])
        if len(slices) == 1:
            only = slices[0]
            entries = [ModelEntry(s.model, s.parameters) for s in only.sources]
            slice_params = only.parameters
            ranges = {s.model: s.layer_range for s in only.sources}
            if only.base_model is not None and base is not None and only.base_model != base:
                raise RecipeError(f"slices[0].base_model {only.base_model} differs from base_model {base}")
            base = base or only.base_model
        else:
            refs = list(dict.fromkeys(s.model for out_slice in slices for s in out_slice.sources))
            entries = [ModelEntry(ref) for ref in refs]
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise RecipeError(f"seed: expected a non-negative integer, got {seed!r}")
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
        slices=slices,
        seed=seed,
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
