"""`karcher-lab merge`: every method end to end on generated checkpoints, output files, atomicity,
determinism, untouched sources, and the message of each bad input."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from karcher_lab import get_method, list_methods, merge_tensors
from karcher_lab.cli import main
from karcher_lab.io.synthetic import (
    base_state,
    expert_states,
    tiny_config,
    write_checkpoint,
    write_reordered_vocabulary_checkpoint,
)
from karcher_lab.pipeline import tensor_seed

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_PARAMS = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.05}}
WEIGHTS = [1.0, 0.5, 0.25]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Tiny Llama checkpoints (a base, 3 experts, the experts' 'Fishers') and a tied Qwen2 family."""
    root = tmp_path_factory.mktemp("zoo")
    config = tiny_config("llama")
    base = base_state(config, seed=0)
    experts = expert_states(base, 3, seed=1, strength=0.2)
    write_checkpoint(root / "base", config, base)
    for i, e in enumerate(experts):
        write_checkpoint(root / f"expert{i}", config, e, shard_bytes=40_000 if i == 1 else None)
        fisher = {k: (v - base[k]).square() + 1e-3 for k, v in e.items()}
        write_checkpoint(root / f"fisher{i}", config, fisher, tokenizer=False)
    qwen = tiny_config("qwen2", tie_word_embeddings=True)
    qbase = base_state(qwen, seed=2)
    write_checkpoint(root / "qwen_base", qwen, qbase)
    for i, e in enumerate(expert_states(qbase, 2, seed=3, strength=0.2)):
        write_checkpoint(root / f"qwen{i}", qwen, e)
    return root


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _method_setup(method: str, zoo: Path) -> tuple[dict, list[str], str | None]:
    """(recipe, input model dirs in the method's order, base dir or None) for one method."""
    m = get_method(method)
    n = 1 if m.max_models == 1 else 2 if m.max_models == 2 else 3
    models = [str(zoo / f"expert{i}") for i in range(n)]
    base = str(zoo / "base") if (m.base != "unused" and method != "karcher") else None
    entries = [{"model": p} for p in models]
    if m.weights != "unused":
        for entry, w in zip(entries, WEIGHTS):
            entry["parameters"] = {"weight": w}
    if method == "fisher":
        for i, entry in enumerate(entries):
            entry.setdefault("parameters", {})["fisher"] = str(zoo / f"fisher{i}")
    if method == "slerp":  # mergekit's slerp: from base_model (t = 0) to the other model
        models, base = [str(zoo / "base"), models[0]], str(zoo / "base")
        entries = [{"model": p} for p in models]
    recipe = {"merge_method": method, "models": entries, "parameters": dict(REQUIRED_PARAMS.get(method, {}))}
    if base is not None:
        recipe["base_model"] = base
    if method == "slerp":
        base = None  # its two tensors are [base, other]
    return recipe, models, base


def _run(tmp_path: Path, recipe: dict | str, out: Path, *extra: str) -> int:
    path = tmp_path / f"recipe-{out.name}.yml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return main(["merge", str(path), str(out), *extra])


@pytest.mark.parametrize("method", list_methods())
def test_every_method_through_the_cli_loads_and_generates(zoo, tmp_path, method, capsys):
    from transformers import AutoModelForCausalLM

    recipe, models, base = _method_setup(method, zoo)
    before = _checksums(zoo)
    out = tmp_path / "merged"
    assert _run(tmp_path, recipe, out, "--seed", "7") == 0
    summary = capsys.readouterr().out
    assert f"with {method} into {out}" in summary and "peak memory" in summary
    assert _checksums(zoo) == before, "sources must never be modified"

    merged = _tensors(out)
    inputs = [_tensors(Path(p)) for p in models]
    base_tensors = _tensors(Path(base)) if base else None
    params = dict(recipe["parameters"])
    m = get_method(method)
    for name, t in merged.items():
        if method == "fisher":
            params["fisher"] = [_tensors(zoo / f"fisher{i}")[name] for i in range(len(models))]
        expected = merge_tensors(
            method, [x[name] for x in inputs], weights=WEIGHTS[: len(models)] if m.weights != "unused" else None,
            base=base_tensors[name] if base_tensors else None, seed=tensor_seed(7, name), name=name, **params,
        )
        assert torch.equal(t, expected), name

    model = AutoModelForCausalLM.from_pretrained(out)
    tokens = model.generate(torch.tensor([[1, 5, 9, 4]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 8)
    assert torch.isfinite(model(tokens).logits).all()


def test_output_files(zoo, tmp_path):
    recipe = {
        "merge_method": "ties", "base_model": str(zoo / "base"),
        "models": [{"model": str(zoo / "expert0"), "parameters": {"weight": 1.0, "density": [0.3, 0.9]}}, {"model": str(zoo / "expert1")}],
        "parameters": {"lambda": 0.9}, "out_dtype": "bfloat16", "tokenizer_source": str(zoo / "expert1"),
    }
    out = tmp_path / "out"
    assert _run(tmp_path, recipe, out, "--out-shard-size", "30KB") == 0
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(f.startswith("model-0000") for f in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    for s in shards:  # the limit applies to tensor bytes (headers excluded), as in transformers
        tensors = load_file(str(out / s))
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 30_000 or len(tensors) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_hidden_layers"] == 2
    assert all(t.dtype == torch.bfloat16 for t in _tensors(out).values())
    for f in ("generation_config.json",):
        assert (out / f).read_bytes() == (zoo / "base" / f).read_bytes()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (zoo / "expert1" / f).read_bytes()
    card = (out / "README.md").read_text()
    assert "ties" in card and str(zoo / "expert0") in card and "base model" in card
    used = yaml.safe_load((out / "merge_recipe.yml").read_text())
    assert used["parameters"] == {"lambda": 0.9, "int8_mask": False, "normalize": True, "rescale": False, "density": 1.0}
    assert used["models"][0]["parameters"]["density"] == [0.3, 0.9]
    rerun = tmp_path / "rerun"
    assert main(["merge", str(out / "merge_recipe.yml"), str(rerun), "--out-shard-size", "30KB"]) == 0
    assert _tensors(rerun).keys() == _tensors(out).keys()
    assert all(torch.equal(a, b) for a, b in zip(_tensors(rerun).values(), _tensors(out).values()))

    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("t5 t7").input_ids == [5, 7]


def test_reruns_are_byte_identical(zoo, tmp_path):
    recipe = {"merge_method": "dare_ties", "base_model": str(zoo / "base"), "models": [{"model": str(zoo / f"expert{i}")} for i in range(3)], "parameters": {"density": 0.5}}
    for out in ("a", "b"):
        assert _run(tmp_path, recipe, tmp_path / out, "--seed", "11", "--out-shard-size", "50KB") == 0
    assert _checksums(tmp_path / "a") == _checksums(tmp_path / "b")
    assert _run(tmp_path, recipe, tmp_path / "c", "--seed", "12", "--out-shard-size", "50KB") == 0
    assert _checksums(tmp_path / "a") != _checksums(tmp_path / "c")


def test_tied_qwen2_family_stays_tied_and_loads(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {"merge_method": "karcher", "models": [{"model": str(zoo / f"qwen{i}")} for i in range(2)]}
    out = tmp_path / "q"
    assert _run(tmp_path, recipe, out) == 0
    merged = _tensors(out)
    assert "lm_head.weight" not in merged and "model.layers.0.self_attn.q_proj.bias" in merged
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight.detach(), merged["model.embed_tokens.weight"])
    assert model.generate(torch.tensor([[1, 4]]), max_new_tokens=3, do_sample=False).shape == (1, 5)


# -------------------------------------------------------------------------------------- atomicity

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import karcher_lab.pipeline.session as session
    from karcher_lab.cli import main
    real, calls = session.merge_tensors, []
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    session.merge_tensors = dying
    main(["merge", sys.argv[1], sys.argv[2], "--out-shard-size", "20KB"])
    """
)


def test_sigkill_mid_merge_leaves_nothing_that_looks_complete(zoo, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(zoo / "expert0"), str(zoo / "expert1")]}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(recipe), str(out)], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.incomplete-")]
    assert len(leftovers) == 1 and any(leftovers[0].glob("*.safetensors"))  # partial shards, hidden aside
    assert main(["merge", str(recipe), str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]  # the dead run's leftovers are gone


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_merge_writes_nothing(zoo, tmp_path, monkeypatch, capsys, interrupt):
    import karcher_lab.pipeline.session as session

    real, calls = session.merge_tensors, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise interrupt("stop")
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "merge_tensors", failing)
    recipe = {"merge_method": "linear", "models": [str(zoo / "expert0"), str(zoo / "expert1")]}
    if interrupt is KeyboardInterrupt:
        assert _run(tmp_path, recipe, tmp_path / "out") == 130
        assert "interrupted; nothing was written" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="stop"):
            _run(tmp_path, recipe, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["recipe-out.yml"]


def test_existing_output_refused_then_overwritten(zoo, tmp_path, capsys):
    recipe = {"merge_method": "linear", "models": [str(zoo / "expert0"), str(zoo / "expert1")]}
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    assert _run(tmp_path, recipe, out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert _run(tmp_path, recipe, out, "--overwrite") == 0
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()


# -------------------------------------------------------------------------------------- bad input


def _bad_cases(zoo: Path) -> list[tuple[str, object, str]]:
    e0, e1, base = str(zoo / "expert0"), str(zoo / "expert1"), str(zoo / "base")
    return [
        ("yaml", "merge_method: [linear\n", "the recipe is not valid YAML"),
        ("key", {"merge_method": "linear", "models": [e0], "parametres": {}}, r"unknown top-level key\(s\) \['parametres'\]"),
        ("method", {"merge_method": "karcher_v2", "models": [e0, e1]}, "unknown merge method 'karcher_v2'; available: arcee_fusion"),
        ("missing", {"merge_method": "linear", "models": [e0, str(zoo / "nope")]}, "model '.*nope': no such directory"),
        ("hub", {"merge_method": "linear", "models": [e0, "nobody/nothing"]}, "'nobody/nothing' is not a local directory.*never downloads"),
        ("arch", {"merge_method": "linear", "models": [e0, str(zoo / "qwen0")]}, r"different architectures \(model 0 .*LlamaForCausalLM, model_type llama; model 1 .*Qwen2ForCausalLM.*--allow-crimes"),
        ("param", {"merge_method": "ties", "base_model": base, "models": [e0, e1], "parameters": {"densty": 0.5}}, "ties has no parameter 'densty'"),
        ("required", {"merge_method": "nearswap", "base_model": base, "models": [e0]}, "parameter 't' is required"),
        ("base", {"merge_method": "model_stock", "models": [e0, e1]}, "model_stock needs base_model"),
        ("count", {"merge_method": "arcee_fusion", "base_model": base, "models": [e0, e1]}, r"exactly 1 model\(s\)"),
        ("weight", {"merge_method": "karcher", "models": [{"model": e0, "parameters": {"weight": -1}}, e1]}, "non-negative"),
        ("eta", {"merge_method": "karcher", "models": [e0, e1], "parameters": {"eta": 2}}, "step size eta must lie in"),
        ("slices", {"merge_method": "linear", "slices": [{"sources": [{"model": e0, "layer_range": [0, 3]}, {"model": e1, "layer_range": [0, 3]}]}]}, r"slices\[0\].sources\[0\].layer_range \[0, 3\] goes past the 2 layers of"),
        ("lora", {"merge_method": "linear", "models": [e0 + "+adapter", e1]}, "LoRA adapter"),
        ("source", {"merge_method": "linear", "models": [e0, e1]}, "is \\(inside\\) the source model"),
    ]


def test_each_bad_input_exits_nonzero_with_its_message(zoo, tmp_path, capsys):
    for label, recipe, message in _bad_cases(zoo):
        out = zoo / "expert0" / "merged" if label == "source" else tmp_path / f"out-{label}"
        code = _run(tmp_path, recipe, out)
        err = capsys.readouterr().err
        assert code == 2, (label, err)
        assert err.startswith("karcher-lab merge: error: "), (label, err)
        assert re.search(message, err), (label, err)
        assert "Traceback" not in err
        assert not out.exists(), label


def test_vocabulary_mismatch_and_nan_checkpoints(zoo, tmp_path, capsys):
    config = tiny_config("llama")
    state = base_state(config, seed=0)
    bigger = base_state(tiny_config("llama", vocab_size=100), seed=0)
    write_checkpoint(tmp_path / "big", tiny_config("llama", vocab_size=100), bigger, tokenizer=False)
    assert _run(tmp_path, {"merge_method": "linear", "models": [str(zoo / "expert0"), str(tmp_path / "big")]}, tmp_path / "o1") == 2
    assert "different vocabulary sizes (embedding rows: model 0" in capsys.readouterr().err
    state["model.layers.1.mlp.down_proj.weight"][3, 3] = float("inf")
    write_checkpoint(tmp_path / "inf", config, state, tokenizer=False)
    assert _run(tmp_path, {"merge_method": "linear", "models": [str(zoo / "expert0"), str(tmp_path / "inf")]}, tmp_path / "o2") == 2
    assert "'model.layers.1.mlp.down_proj.weight': model 1 contains 0 NaN and 1 Inf" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not any(p.name.startswith(".o2") for p in tmp_path.iterdir())


def test_cli_argument_errors(zoo, tmp_path, capsys, monkeypatch):
    recipe = {"merge_method": "linear", "models": [str(zoo / "expert0"), str(zoo / "expert1")]}
    assert _run(tmp_path, recipe, tmp_path / "o", "--out-shard-size", "lots") == 2
    assert "shard size 'lots' is not a size" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _run(tmp_path, recipe, tmp_path / "o", "--device", "cuda") == 2
    assert "CUDA is not available on this machine; use --device cpu" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "absent.yml"), str(tmp_path / "o")]) == 2
    assert "recipe file" in capsys.readouterr().err


def test_debug_shows_the_traceback(zoo, tmp_path):
    from karcher_lab.errors import UnknownMethodError

    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({"merge_method": "nope", "models": [str(zoo / "expert0")]}))
    with pytest.raises(UnknownMethodError):
        main(["merge", str(path), str(tmp_path / "o"), "--debug"])
    with pytest.raises(UnknownMethodError):
        main(["--debug", "merge", str(path), str(tmp_path / "o")])


def test_installed_entry_point_runs_as_a_subprocess(zoo, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "karcher", "models": [str(zoo / "expert0"), "nobody/nothing"]}))
    proc = subprocess.run([sys.executable, "-m", "karcher_lab.cli", "merge", str(recipe), str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_vocabularies_aligned_by_token_with_tokenizer_source(zoo, tmp_path):
    """Model b has other token ids and 4 tokens model a lacks; tokenizer_source: b aligns a to b's ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = _tensors(zoo / "expert0")
    b_dir, row_of = write_reordered_vocabulary_checkpoint(tmp_path / "b", tiny_config("llama"), _tensors(zoo / "expert1"))
    b = _tensors(b_dir)
    recipe = {
        "merge_method": "linear", "tokenizer_source": str(b_dir),
        "models": [{"model": str(zoo / "expert0"), "parameters": {"weight": 1.0}}, {"model": str(b_dir), "parameters": {"weight": 3.0}}],
    }
    out = tmp_path / "out"
    assert _run(tmp_path, recipe, out) == 0
    merged = load_file(str(out / "model.safetensors"))
    emb = merged["model.embed_tokens.weight"]
    assert emb.shape == (100, 32) and json.loads((out / "config.json").read_text())["vocab_size"] == 100
    r5 = row_of["t5"]
    torch.testing.assert_close(emb[r5], (a["model.embed_tokens.weight"][5] + 3 * b["model.embed_tokens.weight"][r5]) / 4)
    torch.testing.assert_close(emb[row_of["x2"]], b["model.embed_tokens.weight"][row_of["x2"]])  # only b has x2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("t5 x2").input_ids == [r5, row_of["x2"]]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([tok("t5 x2").input_ids]), max_new_tokens=2, do_sample=False).shape == (1, 4)


def test_passthrough_copies_one_model_and_scales_filtered_tensors(zoo, tmp_path):
    """mergekit's passthrough_scale test recipe: o_proj and down_proj times 0, every other tensor copied."""
    recipe = {
        "merge_method": "passthrough",
        "models": [{"model": str(zoo / "expert0"), "parameters": {"scale": [
            {"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]}}],
    }
    out = tmp_path / "passthrough"
    assert _run(tmp_path, recipe, out) == 0
    merged, source = _tensors(out), _tensors(zoo / "expert0")
    assert set(merged) == set(source)
    zeroed = [n for n in source if "o_proj" in n or "down_proj" in n]
    assert zeroed
    for name, t in merged.items():
        expected = torch.zeros_like(source[name]) if name in zeroed else source[name]
        assert torch.equal(t, expected), name


def test_passthrough_refuses_two_models(zoo, tmp_path, capsys):
    recipe = {"merge_method": "passthrough", "models": [{"model": str(zoo / "expert0")}, {"model": str(zoo / "expert1")}]}
    assert _run(tmp_path, recipe, tmp_path / "two") != 0
    assert "passthrough merges exactly 1 model(s), the recipe gives 2" in capsys.readouterr().err
