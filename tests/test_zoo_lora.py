"""LoRA experts (zoo/lora.py) on the micro pool's base: they learn their task, the PEFT adapter and the
folded checkpoint are the same model, pool.json has the zoo's shape, the build is cached, and bad input
fails early with a clear error."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from karcher_lab.cli import main
from karcher_lab.errors import ParameterError
from karcher_lab.zoo import find_pool, get_task, load_pool
from karcher_lab.zoo.evaluate import evaluate
from karcher_lab.zoo.lora import build_lora_pool, train_lora_expert
from karcher_lab.zoo.lora_config import TARGET_MODULES, lora_config_for, lora_pool_dir
from karcher_lab.zoo.pool import PoolNotBuiltError

QUICK = dict(tasks=("uppercase", "double"), steps=200, lr=1e-2, train_examples=1000, eval_examples=40)


@pytest.fixture(scope="module")
def lora_pool(micro_pool, tmp_path_factory):
    """Two LoRA experts (rank 8) on the micro pool's base, in a fresh cache directory."""
    cache = tmp_path_factory.mktemp("lora_cache")
    return build_lora_pool(lora_config_for(str(micro_pool.path), **QUICK), cache, progress=False), cache


def test_lora_experts_beat_the_base_on_their_task(lora_pool):
    pool, _ = lora_pool
    assert [e["task"] for e in pool.experts] == list(QUICK["tasks"])
    for e in pool.experts:
        assert e["accuracy"] >= e["base_accuracy"] + 0.1, e
        assert e["nll"] < 0.7 * e["base_nll"], e


def test_recorded_scores_are_those_of_the_folded_checkpoint(lora_pool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pool, _ = lora_pool
    expert = pool.experts[0]
    model = AutoModelForCausalLM.from_pretrained(expert["path"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(expert["path"])
    scores = evaluate(model, tokenizer, get_task(expert["task"]).examples("eval", QUICK["eval_examples"]))
    assert scores["accuracy"] == expert["accuracy"]
    assert scores["nll"] == pytest.approx(expert["nll"], rel=1e-5)


def test_adapter_loads_with_peft_and_matches_the_folded_checkpoint(lora_pool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pool, _ = lora_pool
    expert = pool.experts[1]
    base = AutoModelForCausalLM.from_pretrained(pool.base_path, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, expert["adapter"]).eval()
    folded = AutoModelForCausalLM.from_pretrained(expert["path"], dtype=torch.float32).eval()
    ids = torch.randint(4, 99, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = with_adapter(input_ids=ids).logits, folded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(pool.base_path, dtype=torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - plain).abs().max() > 0.1  # the adapter does change the model

    adapter = load_file(f"{expert['adapter']}/adapter_model.safetensors")
    config = json.loads(open(f"{expert['adapter']}/adapter_config.json").read())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and set(config["target_modules"]) == set(TARGET_MODULES)
    a_q = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    assert a_q.shape == (8, 128)
    # folded weight = W + (α / r) B A (LoRA's update), checked on one projection
    b_q = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    w_base = load_file(f"{pool.base_path}/model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    w_folded = load_file(f"{expert['path']}/model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(w_folded, w_base + 2.0 * b_q @ a_q, atol=1e-6, rtol=1e-5)


def test_pool_record_has_the_zoo_shape_plus_adapters(lora_pool, micro_pool):
    pool, cache = lora_pool
    record = json.loads((pool.path / "pool.json").read_text())
    assert record["kind"] == "lora" and record["name"] == "tiny-lora"
    assert pool.base_path == micro_pool.base_path  # stored relative, resolved by load_pool
    assert not record["base"]["path"].startswith("/")
    assert set(record["base"]["tasks"]) == set(QUICK["tasks"])
    for e in pool.experts:
        for field in ("task", "path", "adapter", "accuracy", "base_accuracy", "nll", "base_nll", "rank",
                      "train_seconds"):
            assert field in e
        assert e["rank"] == 8
        assert e["base_accuracy"] == record["base"]["tasks"][e["task"]]["accuracy"]
        assert (pool.path / "adapters" / e["task"] / "adapter_config.json").is_file()
        assert (pool.path / "experts" / e["task"] / "model.safetensors").is_file()
        assert (pool.path / "experts" / e["task"] / "tokenizer.json").is_file()
    assert lora_pool_dir(lora_config_for(str(micro_pool.path), **QUICK), cache) == pool.path


def test_cached_pool_is_reused_and_a_new_config_gets_a_new_directory(lora_pool, micro_pool):
    pool, cache = lora_pool
    before = (pool.path / "pool.json").stat().st_mtime_ns
    again = build_lora_pool(lora_config_for(str(micro_pool.path), **QUICK), cache, progress=False)
    assert again.path == pool.path and (pool.path / "pool.json").stat().st_mtime_ns == before
    other = lora_pool_dir(lora_config_for(str(micro_pool.path), **{**QUICK, "rank": 4}), cache)
    assert other != pool.path and not other.exists()


def test_training_is_deterministic(micro_pool, tmp_path):
    config = lora_config_for(str(micro_pool.path), tasks=("units",), steps=15, eval_examples=10, train_examples=200)
    for run in ("a", "b"):
        train_lora_expert(config, micro_pool.base_path, "units", 7, tmp_path / run / "adapter", tmp_path / run / "expert")
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # B left zero would mean no training


def test_cli_prints_the_table_and_info_shows_adapters(lora_pool, micro_pool, capsys):
    pool, cache = lora_pool
    assert main(["zoo", "lora", "--base", str(micro_pool.path), "--tasks", *QUICK["tasks"], "--steps", "200",
                 "--lr", "1e-2", "--train-examples", "1000", "--eval-examples", "40", "--cache-dir", str(cache),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "uppercase" in out and "LoRA rank 8" in out and str(pool.path) in out
    assert main(["zoo", "info", str(pool.path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["experts"][0]["adapter"] == str(pool.path / "adapters" / "uppercase")


def test_bad_input_fails_before_any_work(micro_pool, tmp_path):
    with pytest.raises(ParameterError, match="unknown zoo task"):
        lora_config_for("tiny", tasks=("nonsense",))
    with pytest.raises(ParameterError, match="rank must be >= 1"):
        lora_config_for("tiny", rank=0)
    with pytest.raises(ParameterError, match="lr must be > 0"):
        lora_config_for("smollm2", lr=-1.0)
    with pytest.raises(ParameterError, match="unknown LoRA base"):
        build_lora_pool(lora_config_for("gpt5"), tmp_path)
    with pytest.raises(PoolNotBuiltError, match="zoo build --size tiny"):
        build_lora_pool(lora_config_for("tiny"), tmp_path)  # the tiny pool is not in this cache
    with pytest.raises(PoolNotBuiltError, match="zoo build --size tiny"):
        find_pool("tiny-lora", tmp_path)
    with pytest.raises(PoolNotBuiltError, match="zoo lora --base smollm2"):
        find_pool("smollm2", tmp_path)
    assert not (tmp_path / "zoo").exists() or not any((tmp_path / "zoo").iterdir())
    with pytest.raises(PoolNotBuiltError):
        load_pool(tmp_path)
