"""AdapterSubsetMerger: subsets of PEFT LoRA adapters merged with LoRA methods and folded onto the base,
against merge_lora's folded checkpoint and the closed form of task arithmetic; which studies get LoRA
methods; the merge panel listing them as lora:<name> with their parameter controls."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from karcher_lab.errors import (
    ArchitectureMismatchError,
    EmptyInputError,
    InputError,
    ModelCountError,
    ParameterError,
    UnknownMethodError,
)
from karcher_lab.io import Checkpoint
from karcher_lab.methods.lora import get_lora_method, list_lora_methods
from karcher_lab.pipeline.adapter_subsets import (
    LORA_PREFIX,
    AdapterSubsetMerger,
    lora_method_choices,
    study_lora_methods,
)
from karcher_lab.pipeline.lora import merge_lora
from karcher_lab.study import Study

transformers = pytest.importorskip("transformers")

MODULES = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
ALPHAS = [4.0, 2.0, 8.0]
"""lora_alpha of the three adapters (rank 2 each): scalings 2, 1, 4."""


def _write_adapter(out, base, state, seed, alpha, modules=MODULES, rank=2):
    """A PEFT LoRA adapter folder written by hand: random A [r, d_in], B [d_out, r] for every layer's
    ``modules`` of the base state."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer in range(2):
        for module in modules:
            d_out, d_in = state[f"model.layers.{layer}.{module}.weight"].shape
            key = f"base_model.model.model.layers.{layer}.{module}"
            factors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * 0.3
            factors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.3
    out.mkdir()
    save_file(factors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "base_model_name_or_path": str(base),
         "target_modules": [m.split(".")[-1] for m in modules]}))
    return out


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A 2-layer Llama base (hidden 16) and three rank-2 adapters on q_proj, v_proj and down_proj."""
    root = tmp_path_factory.mktemp("adapter_subsets")
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapters = [_write_adapter(root / f"a{i}", root / "base", state, seed=i, alpha=a) for i, a in enumerate(ALPHAS)]
    return root / "base", adapters


@pytest.fixture(scope="module")
def merger(lora_setup):
    base, adapters = lora_setup
    return AdapterSubsetMerger(adapters, base)


def _folded(adapters, method, weights, base, out, **params):
    merge_lora(adapters, method, weights=weights, out=out, base=base, **params)
    return load_file(out / "model.safetensors")


def _adapted(name):
    return any(f".{m}." in name for m in MODULES)


def test_geomerge_state_is_merge_loras_folded_checkpoint(merger, lora_setup, tmp_path):
    base, adapters = lora_setup
    weights = [0.5, 0.3, 0.2]
    merged = merger.merge("lora:geomerge", [0, 1, 2], weights)
    reference = _folded(adapters, "geomerge", weights, base, tmp_path / "geo")
    base_state = load_file(base / "model.safetensors")
    assert merged.traces == {} and set(merged.state) == set(reference) == set(base_state)
    for name, tensor in merged.state.items():
        assert tensor.dtype == base_state[name].dtype
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0)
        if _adapted(name):
            assert not torch.equal(tensor, base_state[name])
        else:
            assert torch.equal(tensor, base_state[name])  # bit for bit


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "knots_ta"])
def test_a_subset_with_weights_is_merge_lora_of_those_adapters(merger, lora_setup, tmp_path, method):
    base, adapters = lora_setup
    merged = merger.merge(method, [2, 0], [0.7, 0.3], params={"lambda": 0.9}).state
    reference = _folded([adapters[2], adapters[0]], method, [0.7, 0.3], base, tmp_path / method, **{"lambda": 0.9})
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0)


def test_task_arithmetic_is_the_base_plus_the_weighted_updates(merger, lora_setup):
    """W0 + λ Σ w_i s_i B_i A_i, computed in float64 from the adapter files."""
    base, adapters = lora_setup
    members, weights, lam = [1, 2], [0.25, 1.5], 0.8
    merged = merger.merge("lora:task_arithmetic", members, weights, params={"lambda": lam}).state
    base_state = load_file(base / "model.safetensors")
    for name, tensor in merged.items():
        expected = base_state[name].double()
        module = name.removesuffix(".weight")
        for i, w in zip(members, weights):
            factors = load_file(adapters[i] / "adapter_model.safetensors")
            a = factors.get(f"base_model.model.{module}.lora_A.weight")
            if a is not None:
                b = factors[f"base_model.model.{module}.lora_B.weight"]
                expected = expected + lam * w * ALPHAS[i] / 2 * (b.double() @ a.double())
        torch.testing.assert_close(tensor.double(), expected, atol=1e-6, rtol=0)


def test_a_sink_gets_every_tensor_of_the_merge(merger):
    got = {}
    merged = merger.merge("peft_linear", [0, 1], params={}, sink=got.__setitem__)
    assert merged.state is None
    expected = merger.merge("peft_linear", [0, 1]).state
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_bad_input_is_refused(merger, lora_setup, tmp_path):
    base, adapters = lora_setup
    with pytest.raises(EmptyInputError, match="no adapter is selected"):
        merger.merge("geomerge", [])
    with pytest.raises(ParameterError, match=r"member indices \[3\] are not in 0..2"):
        merger.merge("geomerge", [0, 3])
    with pytest.raises(ParameterError, match="name an adapter twice"):
        merger.merge("geomerge", [1, 1])
    with pytest.raises(ParameterError, match="2 weights for 3 members"):
        merger.merge("geomerge", [0, 1, 2], [0.5, 0.5])
    with pytest.raises(UnknownMethodError, match="karcher"):
        merger.merge("karcher", [0, 1])
    with pytest.raises(ParameterError, match="unknown parameter"):
        merger.merge("geomerge", [0, 1], params={"density": 0.5})
    with pytest.raises(EmptyInputError, match="no adapters"):
        AdapterSubsetMerger([], base)
    odd = _write_adapter(tmp_path / "odd", base, {"model.layers.0.mlp.gate_proj.weight": torch.zeros(9, 16),
                                                   "model.layers.1.mlp.gate_proj.weight": torch.zeros(9, 16)},
                         seed=0, alpha=2.0, modules=["mlp.gate_proj"])
    with pytest.raises(ArchitectureMismatchError, match=r"gate_proj.weight: the base weight is \(24, 16\)"):
        AdapterSubsetMerger([odd], Checkpoint(base, label="base"))


def test_which_studies_get_lora_methods(lora_setup):
    base, adapters = lora_setup
    adapter_study = Study(experts={f"a{i}": str(a) for i, a in enumerate(adapters)}, base=str(base),
                          tasks={"a0": "addition"})
    assert study_lora_methods(adapter_study) == list_lora_methods()
    choices = lora_method_choices(adapter_study)
    assert choices["lora:geomerge"] is get_lora_method("geomerge") and all(k.startswith(LORA_PREFIX) for k in choices)
    assert AdapterSubsetMerger.for_study(adapter_study).merge("lora:peft_cat", [0]).state.keys() == \
        load_file(base / "model.safetensors").keys()
    mixed = Study(experts={"a0": str(adapters[0]), "full": str(base)}, base=str(base), tasks={"a0": "addition"})
    assert study_lora_methods(mixed) == [] and lora_method_choices(mixed) == {}
    with pytest.raises(InputError, match=r"expert\(s\) \['full'\] are no adapters"):
        AdapterSubsetMerger.for_study(mixed)


def test_merge_panel_lists_lora_methods_with_their_controls(lora_setup):
    from karcher_lab.widgets.merge_controls import MergeControls

    base, adapters = lora_setup
    study = Study(experts={f"a{i}": str(a) for i, a in enumerate(adapters)}, base=str(base), tasks={"a0": "addition"})
    panel = MergeControls(["a0", "a1", "a2"], selected=["a0", "a2"], method="lora:geomerge", has_base=True,
                          use_base=True, on_change=lambda: None, extra_methods=lora_method_choices(study))
    options = panel.method_dropdown.options
    assert {"lora:geomerge", "lora:ties", "lora:task_arithmetic", "ties", "task_arithmetic", "karcher"} <= set(options)
    assert set(panel.param_controls) == {p.name for p in get_lora_method("geomerge").params}
    assert "low-rank factors" in panel.method_info.value
    panel.sliders[2].value = 0.25
    request = panel.request()
    assert request["method"] == "lora:geomerge" and request["members"] == [0, 2]
    assert request["alpha"] == pytest.approx([0.8, 0.2]) and request["params"]["max_iter"] == 500
    panel.param_controls["tol"].value = -1.0
    with pytest.raises(ParameterError, match="tol"):
        panel.request()
    panel.method_dropdown.value = "lora:ties"
    assert set(panel.param_controls) == {p.name for p in get_lora_method("ties").params}
    panel.method_dropdown.value = "slerp"  # a tensor method keeps its own rules: exactly two models
    panel.checkboxes[1].value = True
    with pytest.raises(ModelCountError, match="slerp merges exactly 2 checked experts"):
        panel.request()
    with pytest.raises(ParameterError, match=r"\['ties'\] are tensor methods' names"):
        MergeControls(["a0"], selected=["a0"], method="karcher", has_base=True, use_base=True,
                      on_change=lambda: None, extra_methods={"ties": get_lora_method("ties")})
