"""Building a (very small) pool: experts beat their base, the build is deterministic and cached.

The pool here has the tiny architecture but three quick tasks and short recipes, so two builds take
well under a minute on two cores; the full tiny pool (`karcher-lab zoo build`) uses the same code.
"""
from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from karcher_lab.cli import main
from karcher_lab.zoo import build_pool, cache_root, config_for, find_pool, get_task, pool_dir
from karcher_lab.zoo.evaluate import evaluate
from karcher_lab.zoo.pool import PoolNotBuiltError

SMALL = dict(tasks=("double", "units", "dates"), pretrain_steps=100, finetune_steps=120, eval_examples=60,
             pretrain_examples_per_task=300, finetune_examples=1000)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """The same small pool built twice: with two worker processes, and with one."""
    config = config_for("tiny", **SMALL)
    two = build_pool(config, tmp_path_factory.mktemp("cache_a"), workers=2, progress=False)
    one = build_pool(config, tmp_path_factory.mktemp("cache_b"), workers=1, progress=False)
    return two, one


def test_every_expert_beats_the_base_on_its_own_task(pools):
    pool = pools[0]
    assert [e["task"] for e in pool.experts] == list(SMALL["tasks"])
    for e in pool.experts:
        assert e["accuracy"] >= e["base_accuracy"] + 0.3, e
        assert e["nll"] < 0.5 * e["base_nll"], e
    assert max(e["accuracy"] for e in pool.experts) >= 0.9


def test_build_is_deterministic_and_does_not_depend_on_the_number_of_workers(pools):
    two, one = pools
    for a, b in [(two.base_path, one.base_path)] + [(e["path"], f["path"]) for e, f in zip(two.experts, one.experts)]:
        ta, tb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [e["accuracy"] for e in two.experts] == [e["accuracy"] for e in one.experts]


def test_models_are_plain_hugging_face_directories_and_the_table_is_right(pools):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pool = pools[0]
    expert = pool.experts[1]
    model = AutoModelForCausalLM.from_pretrained(expert["path"])
    tokenizer = AutoTokenizer.from_pretrained(expert["path"])
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 128
    examples = get_task(expert["task"]).examples("eval", SMALL["eval_examples"], seed=0)
    scores = evaluate(model, tokenizer, examples)
    assert scores["accuracy"] == expert["accuracy"]
    assert scores["nll"] == pytest.approx(expert["nll"], rel=1e-4)
    base = AutoModelForCausalLM.from_pretrained(pool.base_path)
    assert evaluate(base, tokenizer, examples)["accuracy"] == expert["base_accuracy"]
    record = json.loads((pool.path / "pool.json").read_text())
    assert record["experts"][1]["path"] == "experts/units" and record["base"]["path"] == "base"


def test_conflict_record_covers_every_pair(pools):
    conflicts = pools[0].record["conflicts"]
    pairs = conflicts["pairs_by_conflict"]
    assert len(pairs) == 3
    assert all(0 < p["angle_deg"] < 180 and 0 <= p["sign_disagreement"] <= 1 for p in pairs)
    assert [p["angle_deg"] for p in pairs] == sorted((p["angle_deg"] for p in pairs), reverse=True)


def test_a_built_pool_is_reused_from_the_cache(pools):
    pool = pools[0]
    stamp = (pool.path / "pool.json").stat().st_mtime_ns
    start = time.perf_counter()
    again = build_pool(config_for("tiny", **SMALL), pool.path.parent.parent, progress=False)
    assert time.perf_counter() - start < 5
    assert again.path == pool.path and (pool.path / "pool.json").stat().st_mtime_ns == stamp
    assert pool.path.name.startswith("tiny-")


def test_cache_key_follows_config_and_cache_root_follows_env(tmp_path, monkeypatch):
    a = pool_dir(config_for("tiny", **SMALL).to_dict(), tmp_path)
    assert a == pool_dir(config_for("tiny", **SMALL).to_dict(), tmp_path)
    assert a != pool_dir(config_for("tiny", **{**SMALL, "seed": 1}).to_dict(), tmp_path)
    assert a.parent == tmp_path / "zoo"
    monkeypatch.setenv("KARCHER_LAB_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("KARCHER_LAB_CACHE")
    assert cache_root().name == "karcher_lab"


def test_zoo_info_json_gives_paths_and_the_expert_vs_base_table(pools, capsys):
    pool = pools[0]
    assert main(["zoo", "info", str(pool.path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["base"]["path"] == str(pool.base_path)
    for e in record["experts"]:
        assert {"task", "path", "accuracy", "base_accuracy", "nll", "base_nll"} <= set(e)
        assert (pool.path / "experts" / e["task"] / "model.safetensors").is_file()
    assert main(["zoo", "info", str(pool.path)]) == 0
    assert "expert EM" in capsys.readouterr().out


def test_zoo_info_on_a_pool_that_is_not_built_says_how_to_build_it(tmp_path, capsys):
    assert main(["zoo", "info", "small", "--cache-dir", str(tmp_path)]) == 2
    assert "karcher-lab zoo build --size small" in capsys.readouterr().err
    with pytest.raises(PoolNotBuiltError, match="no pool called"):
        find_pool("nowhere", tmp_path)


def test_load_takes_a_directory_and_gives_clear_errors_for_missing_models(pools, tmp_path):
    from karcher_lab.errors import CheckpointError
    from karcher_lab.zoo import load, model_path

    model, tokenizer = load(pools[0].experts[2]["path"])
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.decode(tokenizer("dat:2024-03-05=")["input_ids"], skip_special_tokens=True) == "dat:2024-03-05="
    with pytest.raises(PoolNotBuiltError, match="zoo build --size medium"):
        model_path("medium/sort", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="never downloads"):
        model_path("no-such-org/no-such-model")
