"""Recipes in mergekit's YAML schema: parsing, validation messages, per-tensor parameter resolution."""
from __future__ import annotations

import pytest

from karcher_lab import errors
from karcher_lab.methods.registry import Param
from karcher_lab.recipe import (
    NOT_SET,
    ModelRef,
    evaluate_setting,
    layer_position,
    load_recipe,
    num_layers,
    parse_recipe,
    resolve_setting,
    spans_whole_models,
    tower_depths,
)

FLOAT = Param("x", float, 0.0).coerce
as_float = lambda v: FLOAT(v, "m")  # noqa: E731
as_bool = lambda v: Param("b", bool, False).coerce(v, "m")  # noqa: E731
as_str = lambda v: Param("s", str, "").coerce(v, "m")  # noqa: E731


def test_models_form_with_every_top_level_key(tmp_path):
    text = """
merge_method: ties
base_model: org/base@v2
models:
  - model: ./a
    parameters: {weight: 0.7, density: [0.2, 0.8]}
  - model: {path: ./b, revision: main}
parameters:
  lambda: 1.5
  normalize: [{filter: mlp, value: false}, {value: true}]
dtype: bfloat16
out_dtype: torch.float16
tokenizer_source: base
"""
    path = tmp_path / "r.yml"
    path.write_text(text)
    r = load_recipe(path)
    assert r.merge_method == "ties"
    assert r.base_model == ModelRef("org/base", "v2")
    assert [e.model for e in r.models] == [ModelRef("./a"), ModelRef("./b", "main")]
    assert r.models[0].parameters == {"weight": 0.7, "density": [0.2, 0.8]}
    assert r.parameters["lambda"] == 1.5
    assert (r.dtype, r.out_dtype, r.tokenizer_source) == ("bfloat16", "float16", "base")
    assert r.all_models() == [ModelRef("org/base", "v2"), ModelRef("./a"), ModelRef("./b", "main")]
    assert r.source == text


def test_whole_model_slices_become_the_models_form():
    r = parse_recipe({
        "merge_method": "linear",
        "slices": [{
            "sources": [
                {"model": "a", "layer_range": [0, 4], "parameters": {"weight": 2.0}},
                {"model": "b", "layer_range": [0, 4]},
            ],
            "parameters": {"weight": 0.5},
        }],
    })
    assert [str(e.model) for e in r.models] == ["a", "b"]
    assert r.models[0].parameters == {"weight": 2.0}
    assert r.slice_parameters == {"weight": 0.5}
    assert spans_whole_models(r, {ModelRef("a"): 4, ModelRef("b"): 4})
    assert not spans_whole_models(r, {ModelRef("a"): 6, ModelRef("b"): 4})
    with pytest.raises(errors.RecipeError, match=r"slices\[0\].sources\[0\].layer_range \[0, 4\] goes past the 3 layers of a"):
        spans_whole_models(r, {ModelRef("a"): 3, ModelRef("b"): 4})


def test_stacked_slices_keep_every_slice_and_list_each_model_once():
    r = parse_recipe({
        "merge_method": "passthrough",
        "seed": 3,
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 3]}]},
            {"sources": [{"model": "b", "layer_range": [1, 4], "parameters": {"scale": 0.5}}], "parameters": {"scale": 2.0}},
            {"sources": [{"model": "a", "layer_range": [2, 4]}]},
        ],
    })
    assert [str(e.model) for e in r.models] == ["a", "b"]
    assert [[(str(s.model), s.layer_range) for s in sl.sources] for sl in r.slices] == [[("a", (0, 3))], [("b", (1, 4))], [("a", (2, 4))]]
    assert r.slices[1].parameters == {"scale": 2.0} and r.slices[1].sources[0].parameters == {"scale": 0.5}
    assert r.seed == 3
    assert not spans_whole_models(r, {ModelRef("a"): 4, ModelRef("b"): 4})


def test_tower_depths_resolve_each_layer_stack_on_its_own_depth():
    names = [f"language_model.model.layers.{i}.mlp.up_proj.weight" for i in range(2)] + [
        f"vision_tower.encoder.layers.{i}.mlp.fc1.weight" for i in range(4)
    ] + ["multi_modal_projector.linear_1.weight"]
    depths = tower_depths({"text_config": {"num_hidden_layers": 2}}, names)
    assert depths == {"language_model.model.layers": 2, "vision_tower.encoder.layers": 4}
    assert layer_position("language_model.model.layers.1.mlp.up_proj.weight", depths) == 1.0
    assert layer_position("vision_tower.encoder.layers.1.mlp.fc1.weight", depths) == pytest.approx(1 / 3)
    assert layer_position("multi_modal_projector.linear_1.weight", depths) == 0.0
    assert tower_depths({"num_hidden_layers": 6}, ["model.layers.0.w"]) == {"model.layers": 6}


@pytest.mark.parametrize(
    "data, error, message",
    [
        ([1, 2], errors.RecipeError, "a recipe is a mapping"),
        ({"models": [{"model": "a"}]}, errors.RecipeError, "missing 'merge_method'"),
        ({"merge_method": "linear", "modles": []}, errors.RecipeError, r"unknown top-level key\(s\) \['modles'\]"),
        ({"merge_method": "linear"}, errors.RecipeError, "exactly one of 'models' or 'slices'"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "slices": [{"sources": []}]}, errors.RecipeError, "exactly one of"),
        ({"merge_method": "linear", "models": [{"mdl": "a"}]}, errors.RecipeError, r"models\[0\]: expected a mapping with a 'model' key"),
        ({"merge_method": "linear", "models": [{"model": "a", "params": {}}]}, errors.RecipeError, r"models\[0\]: unknown key\(s\) \['params'\]"),
        ({"merge_method": "linear", "models": [{"model": "a"}, {"model": "a"}]}, errors.RecipeError, "model a is listed twice"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": None}}]}, errors.RecipeError, r"models\[0\].parameters.weight: expected a scalar"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [1, {"value": 2}]}}]}, errors.RecipeError, "mixes"),
        ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"filter": "x"}}}]}, errors.RecipeError, "'filter' and 'value'"),
        ({"merge_method": "linear", "models": ["a"], "dtype": "float8"}, errors.RecipeError, "dtype: unknown dtype 'float8'"),
        ({"merge_method": "linear", "models": ["a@1@2"]}, errors.RecipeError, "more than one '@'"),
        ({"merge_method": "linear", "models": ["a+lora"]}, errors.NotSupportedError, "LoRA adapter"),
        ({"merge_method": "linear", "models": ["a"], "tokenizer_source": "base"}, errors.RecipeError, "no base_model"),
        ({"merge_method": "linear", "models": ["a"], "chat_template": "chatml"}, errors.NotSupportedError, "chat_template"),
        ({"merge_method": "linear", "models": ["a"], "tokenizer": {"source": "base", "tokens": {"x": {}}}}, errors.NotSupportedError, r"\['tokens'\]"),
        ({"merge_method": "linear", "modules": {"text": {}}, "models": ["a"]}, errors.NotSupportedError, "modules"),
        ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]}]},
         errors.RecipeError, r"every source of a slice must span the same number of layers, got a \[0, 2\], b \[0, 3\]"),
        ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}]}, errors.RecipeError, "0 <= start < end"),
        ({"merge_method": "linear", "models": ["a"], "seed": -1}, errors.RecipeError, "seed: expected a non-negative integer"),
        ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0]}]}]}, errors.RecipeError, "layer_range: expected"),
    ],
)
def test_malformed_recipes_name_the_key(data, error, message):
    with pytest.raises(error, match=message):
        parse_recipe(data)


def test_yaml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(errors.RecipeError, match="not valid YAML"):
        load_recipe("merge_method: [linear\nmodels: a\n")
    with pytest.raises(errors.RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yml")


def test_layer_position_as_mergekit_plans_it():
    assert layer_position("model.layers.0.x", 5) == 0.0
    assert layer_position("model.layers.3.x", 5) == 0.75
    assert layer_position("model.layers.4.x", 5) == 1.0
    assert layer_position("model.layers.0.x", 1) == 1.0  # mergekit: t = 1 when there is a single layer
    for outside in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert layer_position(outside, 5) == 0.0


def test_num_layers_from_config_or_names():
    assert num_layers({"num_hidden_layers": 6}, []) == 6
    assert num_layers({"n_layer": 3}, []) == 3
    assert num_layers({}, ["model.layers.0.w", "model.layers.4.w", "lm_head.weight"]) == 5


def test_gradient_is_interpolated_linearly_between_neighbours():
    # s = t (len - 1): t = 0.75 over [0, 1, 0.5] -> s = 1.5 -> halfway between 1 and 0.5
    assert evaluate_setting([0.0, 1.0, 0.5], "w", 0.75, as_float) == pytest.approx(0.75)
    assert evaluate_setting([0.2, 0.8], "w", 0.0, as_float) == 0.2
    assert evaluate_setting([0.2, 0.8], "w", 1.0, as_float) == 0.8
    assert evaluate_setting([0.2, 0.8], "w", 1 / 3, as_float) == pytest.approx(0.2 + 0.6 / 3)


def test_non_numeric_gradient_steps_without_interpolation():
    assert evaluate_setting([True, False], "w", 0.4, as_bool) is True
    assert evaluate_setting([True, False], "w", 1.0, as_bool) is False
    assert evaluate_setting(["row", "tensor", "column"], "w", 0.99, as_str) == "tensor"


def test_filters_first_match_wins_and_no_match_is_not_set():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "*", "value": 0.9}]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.5, as_float) == 0.1
    assert evaluate_setting(setting, "model.layers.1.mlp.up_proj.weight", 0.5, as_float) == 0.5
    assert evaluate_setting(setting, "model.norm.weight", 0.5, as_float) == 0.9
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0, as_float) is NOT_SET
    assert evaluate_setting([], "w", 0.0, as_float) is NOT_SET
    assert evaluate_setting({"value": 3}, "anything", 0.0, as_float) == 3.0


def test_scopes_most_specific_first_and_fall_through():
    per_model = {"weight": [{"filter": "mlp", "value": 2.0}]}
    slice_scope = {"weight": 3.0}
    global_scope = {"weight": 4.0, "density": 0.5}
    scopes = (per_model, slice_scope, global_scope)
    assert resolve_setting("weight", scopes, "layers.0.mlp.w", 0.0, as_float) == 2.0
    assert resolve_setting("weight", scopes, "layers.0.attn.w", 0.0, as_float) == 3.0  # filter misses: next scope
    assert resolve_setting("density", scopes, "x", 0.0, as_float) == 0.5
    assert resolve_setting("lambda", scopes, "x", 0.0, as_float) is NOT_SET


def test_values_are_coerced_with_the_parameter_type():
    with pytest.raises(errors.ParameterError, match="must be of type float"):
        evaluate_setting("abc", "w", 0.0, as_float)
    assert evaluate_setting("1e-3", "w", 0.0, as_float) == 1e-3
