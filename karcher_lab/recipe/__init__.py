"""Merge recipes: mergekit's YAML schema (schema.py) and per-tensor parameter resolution (parameters.py)."""
from karcher_lab.recipe.parameters import NOT_SET, evaluate_setting, layer_position, num_layers, resolve_setting, tower_depths
from karcher_lab.recipe.schema import DTYPES, ModelEntry, ModelRef, OutputSlice, Recipe, SliceSource, load_recipe, parse_dtype, parse_model_ref, parse_parameters, parse_recipe, spans_whole_models

__all__ = [
    "DTYPES", "NOT_SET", "ModelEntry", "ModelRef", "OutputSlice", "Recipe", "SliceSource", "evaluate_setting",
    "layer_position", "load_recipe", "num_layers", "parse_dtype", "parse_model_ref",
    "parse_parameters", "parse_recipe", "resolve_setting", "spans_whole_models", "tower_depths",
]
