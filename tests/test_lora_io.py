"""PEFT LoRA adapters on disk: reading against peft's own merge, writing back through peft, folding into
the base, the whole merge_lora pipeline (including the symmetry claim) and the lora-merge CLI."""
from __future__ import annotations

import json

import pytest
import torch

from karcher_lab.cli import main
from karcher_lab.errors import (
    AntipodalError,
    ArchitectureMismatchError,
    CheckpointError,
    DeviceError,
    NotSupportedError,
    OutputError,
    ParameterError,
    ShapeMismatchError,
    UnknownMethodError,
)
from karcher_lab.io.lora import LoraAdapter, LoraModule, fold_into_base, read_adapter, write_adapter
from karcher_lab.methods.lora import gauge_transform, merge_factor_sets, random_gauge
from karcher_lab.pipeline.lora import merge_lora, module_workers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _tiny_llama(path):
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _base_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _make_adapter(base_dir, out, seed, **lora):
    """A peft adapter on ``base_dir`` with random (nonzero) A and B, saved by peft itself."""
    options = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    options.update(lora)
    model = peft.get_peft_model(_base_model(base_dir), peft.LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("lora") / "base")


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [_make_adapter(base_dir, root / f"a{i}", seed=i) for i in range(3)]


def _peft_merged_state(base_dir, adapter_dir):
    model = peft.PeftModel.from_pretrained(_base_model(base_dir), adapter_dir).merge_and_unload()
    return model.state_dict()


@pytest.mark.parametrize("options", [
    {},
    {"use_rslora": True},
    {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
], ids=["alpha_over_r", "rslora", "patterns"])
def test_read_gives_the_update_peft_merges(base_dir, tmp_path, options):
    adapter_dir = _make_adapter(base_dir, tmp_path / "adapter", seed=7, **options)
    adapter = read_adapter(adapter_dir)
    base = _base_model(base_dir).state_dict()
    merged = _peft_merged_state(base_dir, adapter_dir)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == set(adapter.modules) and len(changed) == 3 * 2
    for name, module in adapter.modules.items():
        torch.testing.assert_close(module.delta(), merged[name] - base[name], rtol=1e-5, atol=1e-6)
    if "rank_pattern" in options:
        assert adapter.modules["model.layers.0.self_attn.v_proj.weight"].rank == 2
        assert adapter.modules["model.layers.1.mlp.down_proj.weight"].scaling == pytest.approx(3 / 4)


def test_written_adapter_loads_in_peft_and_applies_the_merged_update(base_dir, adapters, tmp_path):
    like = read_adapter(adapters[0])
    generator = torch.Generator().manual_seed(3)
    factors = {}
    for i, (name, m) in enumerate(like.modules.items()):
        rank = 2 + i % 3  # mixed ranks need rank_pattern / alpha_pattern entries
        d_out, d_in = m.weight_shape
        factors[name] = (torch.randn(d_out, rank, generator=generator), torch.randn(d_in, rank, generator=generator))
    out = write_adapter(tmp_path / "merged", factors, like, record={"method": "test", "adapters": ["x"]})
    base = _base_model(base_dir).state_dict()
    merged = _peft_merged_state(base_dir, out)
    for name, (g, h) in factors.items():
        torch.testing.assert_close(merged[name] - base[name], g @ h.T, rtol=1e-5, atol=1e-5)
    reread = read_adapter(out)
    assert {n: m.rank for n, m in reread.modules.items()} == {n: g.shape[1] for n, (g, _) in factors.items()}
    assert (out / "lora_merge.yml").is_file() and (out / "README.md").is_file()
    with pytest.raises(OutputError):
        write_adapter(tmp_path / "merged", factors, like)


def test_fold_into_base_equals_peft_merge_and_unload(base_dir, adapters, tmp_path):
    adapter = read_adapter(adapters[1])
    out = fold_into_base(base_dir, adapter.factors(), tmp_path / "folded")
    folded = _base_model(out).state_dict()
    reference = _peft_merged_state(base_dir, adapters[1])
    assert folded.keys() == reference.keys()
    for name in folded:
        torch.testing.assert_close(folded[name], reference[name], rtol=1e-5, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_merge_lora_writes_adapter_and_folded_model(base_dir, adapters, tmp_path):
    weights = [0.5, 0.3, -0.2]
    result = merge_lora(adapters, "task_arithmetic", weights=weights, out=tmp_path / "ta")
    read = [read_adapter(a) for a in adapters]
    for name in read[0].modules:
        expected = sum(w * a.modules[name].delta() for w, a in zip(weights, read))
        torch.testing.assert_close(result.delta(name), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(read_adapter(tmp_path / "ta").modules[name].delta(), expected, rtol=1e-5, atol=1e-6)
    assert set(result.ranks.values()) == {12}
    merge_lora(adapters, "task_arithmetic", weights=weights, out=tmp_path / "folded", base=base_dir)
    folded = _base_model(tmp_path / "folded").state_dict()
    base = _base_model(base_dir).state_dict()
    for name in read[0].modules:
        torch.testing.assert_close(folded[name] - base[name], result.delta(name), rtol=1e-5, atol=1e-5)


def _reparametrized(adapter: LoraAdapter, seed: int) -> LoraAdapter:
    """The same updates with factors (G A⁻¹, H Aᵀ) for a random well-conditioned A ∈ GL(r) per module."""
    modules = {}
    for i, (name, m) in enumerate(adapter.modules.items()):
        g, h = gauge_transform(*m.factors(), random_gauge(m.rank, condition=4.0, seed=seed + i))
        modules[name] = LoraModule(name, h.T.contiguous(), g, 1.0, m.fan_in_fan_out)
    return LoraAdapter(None, adapter.config, modules, adapter.label + " (reparametrized)")


def test_symmetry_of_the_whole_pipeline(adapters):
    read = [read_adapter(a) for a in adapters[:2]]
    moved = [read[0], _reparametrized(read[1], seed=11)]
    for name, m in read[1].modules.items():  # the reparametrization keeps every update
        torch.testing.assert_close(moved[1].modules[name].delta(), m.delta(), rtol=1e-4, atol=1e-5)
    for method, invariant in (("geomerge", True), ("knots_ta", True), ("task_arithmetic", True),
                              ("peft_linear", False)):
        before, after = merge_lora(read, method), merge_lora(moved, method)
        gaps = [float((after.delta(n) - before.delta(n)).norm() / before.delta(n).norm()) for n in before.factors]
        if invariant:
            assert max(gaps) < 1e-4, (method, max(gaps))
        else:
            assert min(gaps) > 1e-2, (method, min(gaps))


def test_bad_input_is_refused_before_anything_is_written(base_dir, adapters, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnknownMethodError, match="available"):
        merge_lora(adapters, "nope", out=out)
    with pytest.raises(CheckpointError, match="not an adapter|adapter_config"):
        merge_lora([adapters[0], base_dir], "task_arithmetic", out=out)
    other_rank = _make_adapter(base_dir, tmp_path / "r2", seed=5, r=2, lora_alpha=4)
    with pytest.raises(ShapeMismatchError, match="one rank"):
        merge_lora([adapters[0], other_rank], "geomerge", out=out)
    fewer = _make_adapter(base_dir, tmp_path / "fewer", seed=5, target_modules=["q_proj"])
    with pytest.raises(ArchitectureMismatchError, match="other modules"):
        merge_lora([adapters[0], fewer], "task_arithmetic", out=out)
    other_base = tmp_path / "other_base"
    other_base.mkdir()
    for f in adapters[1].iterdir():
        (other_base / f.name).write_bytes(f.read_bytes())
    config = json.loads((other_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/else"
    (other_base / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ArchitectureMismatchError, match="different base models"):
        merge_lora([adapters[0], other_base], "task_arithmetic", out=out)
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in adapters[1].iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(NotSupportedError, match="use_dora"):
        merge_lora([adapters[0], dora], "task_arithmetic", out=out)
    with pytest.raises(ParameterError, match="out="):
        merge_lora(adapters, "task_arithmetic", base=base_dir)
    small_base = _tiny_llama(tmp_path / "small_base")
    config = json.loads((small_base / "config.json").read_text())
    (small_base / "config.json").write_text(json.dumps({**config, "intermediate_size": 20}))
    small = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "intermediate_size": 20}))
    small.save_pretrained(small_base)
    with pytest.raises(ArchitectureMismatchError, match="does not fit the base"):
        merge_lora(adapters, "task_arithmetic", out=out, base=small_base)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_device_choice(adapters, tmp_path):
    """device="cpu" gives the default merge; "cuda" without CUDA is a DeviceError before anything is written;
    a method without a batched form refuses a GPU device."""
    default = merge_lora(adapters[:2], "geomerge")
    on_cpu = merge_lora(adapters[:2], "geomerge", device="cpu")
    for name in default.factors:
        torch.testing.assert_close(on_cpu.delta(name), default.delta(name), rtol=0, atol=0)
    if not torch.cuda.is_available():
        out = tmp_path / "gpu"
        with pytest.raises(DeviceError, match="CUDA is not available"):
            merge_lora(adapters[:2], "geomerge", device="cuda", out=out)
        assert main(["lora-merge", *map(str, adapters[:2]), "--device", "cuda", "--out", str(out)]) == 2
        assert not out.exists()
    with pytest.raises(DeviceError, match="unknown device"):
        merge_lora(adapters[:2], "geomerge", device="tpu0")
    with pytest.raises(ParameterError, match="batched form"):
        merge_factor_sets({"w": _random_pairs(2)}, "task_arithmetic", device="cuda:0" if torch.cuda.is_available()
                          else "meta")


def test_cli_round_trip(base_dir, adapters, tmp_path, capsys):
    code = main(["lora-merge", *map(str, adapters[:2]), "--method", "knots_ties", "--param", "density=0.5",
                 "--weights", "2", "1", "--workers", "2", "--out", str(tmp_path / "cli")])
    assert code == 0
    assert "knots_ties" in capsys.readouterr().out
    expected = merge_lora(adapters[:2], "knots_ties", weights=[2, 1], density=0.5)
    written = read_adapter(tmp_path / "cli")
    for name in written.modules:
        torch.testing.assert_close(written.modules[name].delta(), expected.delta(name), rtol=1e-5, atol=1e-6)
    assert main(["lora-merge", *map(str, adapters[:2]), "--method", "task_arithmetic",
                 "--fold-into", str(base_dir), "--out", str(tmp_path / "cli_model")]) == 0
    assert (tmp_path / "cli_model" / "model.safetensors").is_file()
    assert main(["lora-merge", str(adapters[0]), "--method", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown LoRA merge method" in capsys.readouterr().err
    assert main(["lora-merge", "--list"]) == 0 and "geomerge" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()


def _random_pairs(n, d1=12, d2=9, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(d1, r, generator=g, dtype=torch.float64), torch.randn(d2, r, generator=g, dtype=torch.float64))
            for _ in range(n)]


def test_modules_merged_in_worker_processes_equal_the_sequential_merge(adapters):
    modules = {f"layers.{i}.weight": _random_pairs(3, seed=20 + i) for i in range(4)}
    sequential = merge_factor_sets(modules, "geomerge", weights=[2, 1, 1])
    with module_workers(2, len(modules)) as executor:
        parallel = merge_factor_sets(modules, "geomerge", weights=[2, 1, 1], executor=executor)
    assert list(parallel) == list(sequential)
    for name in modules:  # one torch thread in both: the same operations, the same bits
        assert torch.equal(parallel[name][0], sequential[name][0]) and torch.equal(parallel[name][1], sequential[name][1])
    (g, h), = _random_pairs(1, r=1, seed=10)
    with pytest.raises(AntipodalError, match="geomerge failed on layer.7.weight"):  # a worker's error: same type, module named
        with module_workers(2, 2) as executor:
            merge_factor_sets({"layer.7.weight": [(g, h), (-g, h)], "other.weight": _random_pairs(2, r=1, seed=11)},
                              "geomerge", executor=executor)
    with module_workers(4, 1) as executor:  # one module: merged in this process
        assert executor is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ParameterError, match="workers"):
            with module_workers(bad, 4):
                pass
        with pytest.raises(ParameterError, match="workers"):
            merge_lora(adapters, "geomerge", workers=bad)
