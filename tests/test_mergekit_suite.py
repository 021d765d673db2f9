"""mergekit 0.1.5's own test configurations (tests/test_basic_merges.py, and examples/*.yml on small
models) run through ``karcher-lab merge`` and compared with mergekit's float32 outputs.

The golden file tests/golden/mergekit_suite.json is written by tools/make_mergekit_suite_golden.py,
which ran each recipe through ``mergekit-yaml`` in the throw-away peer venv; here the same pico models
are rebuilt (their weights' sha256 is checked first), each recipe is merged by us, and the output must
hold mergekit's tensors (names and shapes), set the same layer count in config.json, load in
transformers, and, for deterministic methods, match mergekit's per-tensor float64 fingerprints within
float32 rounding (passthrough: the very same bytes). Configurations mergekit refuses must be refused.

mergekit 0.1.5 (with transformers 5) writes a LLaVA's vision tower and projector under transformers'
new names and leaves out its whole text decoder (its output does not load); ours keeps every tensor
under its stored name and loads, and is compared with mergekit's on the tensors mergekit writes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from karcher_lab import errors
from karcher_lab.pipeline import run_recipe
from karcher_lab.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import make_mergekit_suite_golden as suite  # noqa: E402  (model roles, fingerprints: shared with the generator)

GOLDEN = json.loads(suite.GOLDEN.read_text())
CASES = GOLDEN["cases"]
RTOL = 2e-6
"""Fingerprint tolerance, relative to Σ|x| (Σx² to itself): float32 rounding of a merged tensor."""
REFUSED = {
    "della_invalid_epsilon": (errors.ParameterError, "epsilon"),
    "crimes_llama_granite": (errors.ArchitectureMismatchError, "different architectures.*--allow-crimes"),
}
"""Cases mergekit refuses: the error we raise instead, and a pattern of its message."""


@pytest.fixture(scope="module")
def pico(tmp_path_factory) -> dict[str, Path]:
    dirs = suite.build_models(tmp_path_factory.mktemp("pico"))
    for role, directory in dirs.items():
        assert suite.weights_sha256(directory) == GOLDEN["models"][role]["weights_sha256"], (
            f"rebuilt pico model {role} differs from the one mergekit merged (torch or transformers changed?)"
        )
    return dirs


def _outputs(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def _our_name(name: str, tensors: dict[str, torch.Tensor]) -> str:
    """mergekit writes a LLaVA's tensors under transformers' new names (``model.vision_tower...``); we
    keep the names the checkpoint stores (``vision_tower...``, which transformers maps on load)."""
    return name if name in tensors or not name.startswith("model.") else name.removeprefix("model.")


def _loads_in_transformers(directory: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(directory)
    model_class = LlavaForConditionalGeneration if config.model_type == "llava" else AutoModelForCausalLM
    _, info = model_class.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_the_suite_covers_every_configuration_of_test_basic_merges():
    basic = {"gpt2_copy", "gpt2_stack", "passthrough_scale", "linear", "slerp", "nuslerp_weights_sum_to_zero", "task_arithmetic",
             "breadcrumbs", "ties", "sce", "ram", "ramplus_tl", "multislerp", "dare_ties", "model_stock", "model_stock_filterwise",
             "arcee_fusion", "nearswap", "della", "della_invalid_epsilon", "karcher", "granite_copy", "granite_linear", "granite_slerp"}
    basic |= {f"nuslerp_{b}_row{r}_flat{f}" for b in ("base", "nobase") for r in (0, 1) for f in (0, 1)}
    vlm = {"linear", "slerp", "task_arithmetic", "breadcrumbs", "ties", "dare_ties", "model_stock", "model_stock_filterwise",
           "nuslerp_weights_sum_to_zero"} | {f"nuslerp_{b}_row{r}_flat{f}" for b in ("base", "nobase") for r in (0, 1) for f in (0, 1)}
    assert basic | {f"vlm_{c}" for c in vlm} <= set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mergekit_configuration(case, pico, tmp_path):
    entry = CASES[case]
    data = suite.substitute(entry["recipe"], {r: str(d) for r, d in pico.items()})
    if data["merge_method"] == "karcher":  # mergekit's karcher drops the weights: α = 1/N (docs/methods.md)
        data["models"] = [{"model": m["model"]} for m in data["models"]]
    recipe = parse_recipe(data)
    out = tmp_path / "out"
    if "mergekit_error" in entry:
        error, pattern = REFUSED[case]
        with pytest.raises(error, match=pattern):
            run_recipe(recipe, out)
        assert not out.exists() and not list(tmp_path.iterdir())
        return
    run_recipe(recipe, out)
    tensors = _outputs(out)
    layout = [(_our_name(name, tensors), shape) for name, shape in GOLDEN["layouts"][entry["layout"]]]
    assert [list(tensors[name].shape) for name, _ in layout] == [shape for _, shape in layout]
    extra = set(tensors) - {name for name, _ in layout}
    if entry["config"]["model_type"] == "llava":
        assert extra == {n for n in tensors if n.startswith("language_model.")}  # mergekit drops the text decoder
    else:
        assert not extra
    config = json.loads((out / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer", "tie_word_embeddings", "model_type", "architectures"):
        if key in entry["config"]:
            assert config[key] == entry["config"][key], key
    _loads_in_transformers(out)
    if recipe.merge_method == "passthrough":
        assert suite.tensors_sha256(tensors) == entry["sha256"]  # the very same bytes, under the same names
    if not entry["deterministic"]:
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
        return
    compared = 0
    for (name, _), expected in zip(layout, entry["sums"]):
        if recipe.merge_method == "model_stock" and _disagreeing_task_vectors(recipe, name, bool(recipe.parameters.get("filter_wise"))):
            continue  # mergekit extrapolates (t < 0) where the mean cosine is negative; we clamp (docs/methods.md)
        compared += 1
        got = suite.fingerprint(tensors[name])
        scale = max(expected[1], 1e-30)
        assert abs(got[0] - expected[0]) <= RTOL * scale, (name, "sum", got, expected)
        assert abs(got[1] - expected[1]) <= RTOL * scale, (name, "abs sum", got, expected)
        assert abs(got[2] - expected[2]) <= 2 * RTOL * max(expected[2], 1e-30), (name, "square sum", got, expected)
        assert abs(got[3] - expected[3]) <= RTOL * scale, (name, "probe", got, expected)
    assert compared >= len(layout) // 2


def _disagreeing_task_vectors(recipe, name: str, filter_wise: bool) -> bool:
    """Whether model_stock's mean pairwise cosine of the task vectors is negative for tensor ``name``
    (with ``filter_wise``: for some vector along the last axis)."""
    base = _outputs(Path(recipe.base_model.path))[name].double()
    deltas = [_outputs(Path(e.model.path))[name].double() - base for e in recipe.models if e.model != recipe.base_model]
    a, b = (d.reshape(-1, d.shape[-1]) if filter_wise and d.dim() > 1 else d.reshape(1, -1) for d in deltas)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
    return bool((cos < 0).any())
