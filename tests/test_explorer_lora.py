"""MergeExplorer on a study whose experts are PEFT LoRA adapters: the LoRA methods (geomerge among them)
are in the dropdown as lora:<name>, an update writes base + the merged ΔW into the model (against
merge_lora's folded checkpoint and the closed form of task arithmetic), and keeping such a merge names the
lora-merge command instead of a mergekit recipe."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_micro_study
from karcher_lab import Study
from karcher_lab.errors import NotSupportedError, ParameterError
from karcher_lab.pipeline.lora import merge_lora
from karcher_lab.widgets import MergeExplorer

FAST = dict(quality_examples=2, activation_examples=2, draws=2, exact_match=False, debounce=0.05, initial_update=False)
RANK, ALPHAS = 2, (4.0, 2.0)
"""Rank and lora_alpha of the two adapters: scalings 2 and 1."""


def _adapter(out, base_state, seed, alpha):
    """A PEFT LoRA adapter on every q_proj and down_proj of the base: random A [r, d_in], B [d_out, r]."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, weight in base_state.items():
        if name.endswith(("self_attn.q_proj.weight", "mlp.down_proj.weight")):
            key = "base_model.model." + name.removesuffix(".weight")
            factors[f"{key}.lora_A.weight"] = torch.randn(RANK, weight.shape[1], generator=g) * 0.2
            factors[f"{key}.lora_B.weight"] = torch.randn(weight.shape[0], RANK, generator=g) * 0.2
    out.mkdir()
    save_file(factors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": alpha,
                                                         "target_modules": ["q_proj", "down_proj"]}))
    return factors


@pytest.fixture(scope="module")
def adapter_study(micro_pool, tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer_lora")
    base = load_file(micro_pool.base_path / "model.safetensors")
    factors = [_adapter(root / name, base, seed, alpha) for seed, (name, alpha) in enumerate(zip(("a", "b"), ALPHAS))]
    study = Study(experts={"double": str(root / "a"), "units": str(root / "b")}, base=str(micro_pool.base_path),
                  tasks={"double": "double", "units": "units"})
    return study, base, factors, root


def _model_state(explorer):
    return {name: t.detach().cpu() for name, t in explorer.model.state_dict().items()}


def test_geomerge_and_task_arithmetic_of_adapters_in_the_explorer(adapter_study, tmp_path):
    study, base, factors, root = adapter_study
    explorer = MergeExplorer(study, selected=["double", "units"], method="lora:geomerge", **FAST)
    options = explorer.method_dropdown.options
    assert {"lora:geomerge", "lora:task_arithmetic", "karcher", "linear"} <= set(options)
    assert explorer.update(), explorer.error

    folded = tmp_path / "folded"
    merge_lora([root / "a", root / "b"], "geomerge", base=study.base, out=folded)
    expected = load_file(folded / "model.safetensors")
    state = _model_state(explorer)
    adapted = [n for n in base if n.endswith(("q_proj.weight", "down_proj.weight"))]
    assert adapted
    for name in expected:
        torch.testing.assert_close(state[name], expected[name].to(state[name].dtype), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(state[n], base[n].to(state[n].dtype)) for n in adapted)

    explorer.method_dropdown.value = "lora:task_arithmetic"
    explorer.sliders[0].value = 0.6  # weights 0.6 : 0.2 → α = 0.75, 0.25
    explorer.sliders[1].value = 0.2
    assert explorer.update(), explorer.error
    state = _model_state(explorer)
    for name in adapted:
        key = "base_model.model." + name.removesuffix(".weight")
        delta = sum(alpha_i * (a_ / RANK) * f[f"{key}.lora_B.weight"] @ f[f"{key}.lora_A.weight"]
                    for alpha_i, a_, f in zip((0.75, 0.25), ALPHAS, factors))
        torch.testing.assert_close(state[name], (base[name].float() + delta).to(state[name].dtype), rtol=1e-5, atol=1e-6)

    with pytest.raises(NotSupportedError, match="karcher-lab lora-merge .* --method task_arithmetic --weights 0.75 0.25"):
        explorer.recipe_yaml()
    explorer.save_button.click()
    assert "NotSupportedError" in explorer.keep_output.value and not (tmp_path / "merged").exists()


def test_a_lora_method_on_a_study_of_full_models_is_refused_before_loading(micro_pool, tmp_path):
    study_file = write_micro_study(micro_pool, tmp_path, 2)
    with pytest.raises(ParameterError, match="lora:geomerge merges PEFT LoRA adapters"):
        MergeExplorer(str(study_file), method="lora:geomerge", **FAST)
    assert "lora:geomerge" not in MergeExplorer(str(study_file), selected=["double"], **FAST).method_dropdown.options
