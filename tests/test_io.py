"""Reading checkpoints, checking architectures, the streaming sharded writer and the atomic output."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from karcher_lab import errors
from karcher_lab.io import (
    Checkpoint, StateDictSource, atomic_directory, check_layout, check_output_path, layer_index, parse_size, resolve_model_dir,
)
from karcher_lab.io.writer import ShardedSafetensorsWriter, TensorSpec, plan_shards


def _state(seed=0, vocab=16, hidden=8, layers=2, head=True):
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden, generator=g)
    state["model.norm.weight"] = torch.randn(hidden, generator=g)
    if head:
        state["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return state


def _checkpoint_dir(path, state, config=None, **save):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama", "tie_word_embeddings": False}))
    if save.get("bin"):
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, str(path / "model.safetensors"))
    return path


# ------------------------------------------------------------------------------------------ reading


def test_single_file_checkpoint_is_read_lazily_with_its_shapes_and_dtypes(tmp_path):
    state = _state()
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)
    ckpt = Checkpoint(_checkpoint_dir(tmp_path / "m", state))
    assert list(ckpt.tensors) == sorted(state)  # safetensors stores names sorted
    assert ckpt.tensors["model.norm.weight"].dtype == torch.bfloat16
    assert ckpt.tensors["lm_head.weight"].shape == (16, 8)
    assert ckpt.tensors["lm_head.weight"].nbytes == 16 * 8 * 4
    for name, t in state.items():
        assert torch.equal(ckpt.load(name), t)


def test_sharded_checkpoint_with_index(tmp_path):
    state = _state()
    d = tmp_path / "m"
    d.mkdir()
    names = sorted(state)
    weight_map = {}
    for i, chunk in enumerate([names[:3], names[3:]]):
        f = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in chunk}, str(d / f))
        weight_map |= {k: f for k in chunk}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text("{}")
    ckpt = Checkpoint(d)
    assert sorted(ckpt.tensors) == names
    assert {ckpt.tensors[k].file.name for k in names} == set(weight_map.values())
    assert torch.equal(ckpt.load(names[-1]), state[names[-1]])


def test_missing_shard_named(tmp_path):
    d = _checkpoint_dir(tmp_path / "m", _state())
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00009-of-00009.safetensors"}}))
    with pytest.raises(errors.CheckpointError, match=r"shard\(s\) \['model-00009-of-00009.safetensors'\].*missing"):
        Checkpoint(d)


def test_bin_checkpoint_via_weights_only_load(tmp_path):
    state = _state()
    ckpt = Checkpoint(_checkpoint_dir(tmp_path / "m", state, bin=True))
    assert sorted(ckpt.tensors) == sorted(state)
    assert torch.equal(ckpt.load("model.norm.weight"), state["model.norm.weight"])


class Payload:
    """Not a tensor: a pickle of it must never be loaded."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    torch.save({"w": torch.ones(2), "evil": Payload()}, d / "pytorch_model.bin")
    with pytest.raises(errors.CheckpointError, match="weights_only=True"):
        Checkpoint(d)


def test_missing_config_no_weights_bad_file_and_adapter(tmp_path):
    d = tmp_path / "noconfig"
    d.mkdir()
    with pytest.raises(errors.CheckpointError, match="no config.json"):
        Checkpoint(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(errors.CheckpointError, match="no weights"):
        Checkpoint(d)
    (d / "model.safetensors").write_bytes(b"garbage!garbage!")
    with pytest.raises(errors.CheckpointError, match="not a valid safetensors file"):
        Checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(errors.CheckpointError, match="config.json is not valid JSON"):
        Checkpoint(d)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    with pytest.raises(errors.CheckpointError, match="LoRA adapter"):
        Checkpoint(lora)


def test_hub_id_resolved_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    _checkpoint_dir(snapshot, _state())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("org/tiny") == snapshot
    assert Checkpoint(resolve_model_dir("org/tiny")).tensors
    with pytest.raises(errors.CheckpointError, match=r"'org/absent' is not a local directory and is not in the Hugging Face cache.*never downloads"):
        resolve_model_dir("org/absent")
    with pytest.raises(errors.CheckpointError, match=r"'org/tiny@v9' is not a local directory"):
        resolve_model_dir("org/tiny", "v9")
    with pytest.raises(errors.CheckpointError, match="no such directory"):
        resolve_model_dir("./missing/dir/x")


def test_relative_paths_fall_back_to_the_recipe_directory(tmp_path, monkeypatch):
    _checkpoint_dir(tmp_path / "recipes" / "m", _state())
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("m", relative_to=tmp_path / "recipes") == (tmp_path / "recipes" / "m").resolve()


# ------------------------------------------------------------------------------------- architecture


def test_matching_layout_in_natural_order():
    sources = [StateDictSource(_state(i, layers=12), f"m{i}") for i in range(3)]
    layout = check_layout(sources)
    layer_names = [n for n in layout.names if ".layers." in n]
    assert [int(n.split(".")[2]) for n in layer_names][::2] == list(range(12))
    assert not layout.untied_head
    assert layout.shapes["lm_head.weight"] == (16, 8)


def test_mismatch_table_names_tensors_models_and_shapes():
    a, b, c = _state(0), _state(1), _state(2)
    b["model.layers.1.mlp.up_proj.weight"] = torch.zeros(4, 8)
    del c["model.layers.0.input_layernorm.weight"]
    sources = [StateDictSource(s, label) for s, label in zip((a, b, c), ("alpha", "beta", "gamma"))]
    with pytest.raises(errors.ArchitectureMismatchError) as info:
        check_layout(sources)
    text = str(info.value)
    assert "2 tensor(s) differ" in text
    lines = text.splitlines()
    assert lines[1].split() == ["tensor", "model", "0", "(alpha)", "model", "1", "(beta)", "model", "2", "(gamma)"]
    assert lines[2].split() == ["model.layers.0.input_layernorm.weight", "[8]", "[8]", "missing"]
    assert lines[3].split() == ["model.layers.1.mlp.up_proj.weight", "[16,", "8]", "[4,", "8]", "[16,", "8]"]


def test_long_tables_are_cut():
    a, b = _state(0, layers=30), _state(1, layers=30)
    b = {k: v[:-1] if ".up_proj" in k else v for k, v in b.items()}
    with pytest.raises(errors.ArchitectureMismatchError, match="and 10 more differing tensors"):
        check_layout([StateDictSource(a, "a"), StateDictSource(b, "b")])


def test_vocabulary_mismatch_is_its_own_error():
    a, b = _state(0, vocab=16), _state(1, vocab=18)
    with pytest.raises(errors.VocabularyMismatchError, match=r"different vocabulary sizes \(embedding rows: model 0 \(a\) 16, model 1 \(b\) 18\)"):
        check_layout([StateDictSource(a, "a"), StateDictSource(b, "b")])


def test_tied_models_use_their_embedding_as_head():
    tied = StateDictSource(_state(0, head=False), "tied", config={"tie_word_embeddings": True})
    untied = StateDictSource(_state(1), "untied", config={"tie_word_embeddings": False})
    layout = check_layout([tied, untied])
    assert layout.untied_head
    assert layout.stored_names[0]["lm_head.weight"] == "model.embed_tokens.weight"
    assert layout.stored_names[1]["lm_head.weight"] == "lm_head.weight"
    all_tied = check_layout([tied, StateDictSource(_state(2, head=False), "t2", config={})])
    assert "lm_head.weight" not in all_tied.names and not all_tied.untied_head


def test_untied_model_without_head_is_a_mismatch():
    missing = StateDictSource(_state(0, head=False), "nohead", config={"tie_word_embeddings": False})
    with pytest.raises(errors.ArchitectureMismatchError, match="lm_head.weight  missing"):
        check_layout([missing, StateDictSource(_state(1), "full")])


@pytest.mark.parametrize(
    "name, index",
    [("model.layers.7.mlp.up_proj.weight", 7), ("transformer.h.11.attn.c_attn.weight", 11),
     ("transformer.blocks.2.ffn.up_proj.weight", 2), ("model.embed_tokens.weight", None), ("lm_head.weight", None),
     ("model.norm.weight", None)],
)
def test_layer_index(name, index):
    assert layer_index(name) == index


# ------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize(
    "text, expected",
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5G", 15 * 10**8), ("123", 123), (4096, 4096), ("10 KiB", 10240)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["five", "0", "-1GB", "5XB", ""])
def test_parse_size_rejects(bad):
    with pytest.raises(errors.ParameterError, match="shard size"):
        parse_size(bad)


def test_shard_plan_is_greedy_and_oversized_tensors_stand_alone():
    specs = [TensorSpec(n, (s,), torch.uint8) for n, s in zip("abcde", (40, 50, 200, 10, 10))]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 100)] == [["a", "b"], ["c"], ["d", "e"]]


def _specs(state):
    return [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]


def test_writer_round_trip_sharded_with_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "a.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(33, generator=g),
        "c.scalar": torch.tensor(3.5, dtype=torch.float64),
        "d.empty": torch.zeros(0, 4),
        "e.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "f.f16": torch.randn(64, 3, generator=g).to(torch.float16),
    }
    writer = ShardedSafetensorsWriter(tmp_path, _specs(state), 200)
    for k, v in state.items():
        writer.write(k, v)
    files = writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert files[-1] == "model.safetensors.index.json"
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    assert set(index["weight_map"]) == set(state)
    loaded = {}
    for f in files[:-1]:
        with safe_open(tmp_path / f, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        raw = (tmp_path / f).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        loaded |= load_file(str(tmp_path / f))
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
        assert index["weight_map"][k] in files


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    state = _state()
    writer = ShardedSafetensorsWriter(tmp_path, _specs(state), 10**9)
    for k, v in state.items():
        writer.write(k, v)
    assert writer.finish() == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_writer_output_is_byte_identical(tmp_path):
    state = _state()
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        writer = ShardedSafetensorsWriter(tmp_path / d, _specs(state), 300)
        for k, v in state.items():
            writer.write(k, v.clone())
        writer.finish()
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)


def test_writer_rejects_unplanned_tensors(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSpec("a", (2,), torch.float32)], 100)
    with pytest.raises(AssertionError, match="expected"):
        writer.write("a", torch.zeros(3))


# ------------------------------------------------------------------------------------------- atomic


def test_atomic_directory_appears_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "a").read_text() == "1"


def test_existing_output_refused_unless_overwrite_and_replaced_at_the_end(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(errors.OutputError, match="already exists; pass --overwrite"):
        check_output_path(out, False, [])
    check_output_path(out, True, [])
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in out.iterdir()] == ["old"]  # an interrupted overwrite keeps the old output
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_inside_a_source_or_a_file_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(errors.OutputError, match="source model"):
        check_output_path(src / "merged", False, [src])
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.OutputError, match="not a directory"):
        check_output_path(tmp_path / "file", True, [])


def test_leftovers_of_killed_merges_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.incomplete-{dead_pid}-abcd"
    stale.mkdir()
    alive = tmp_path / f".out.incomplete-{os.getpid()}-beef"
    alive.mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and alive.exists()


def test_disk_full_removes_the_partial_output(tmp_path, monkeypatch):
    import errno

    with pytest.raises(errors.OutputError, match="no space left on device"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------- vocabulary


def test_vocabulary_alignment_follows_mergekit_defaults():
    from karcher_lab.io.vocabulary import VocabularyAlignment

    target = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    vocabularies = [
        {"a": 0, "b": 1, "c": 2, "e": 7},      # 'e' has an id beyond this model's 3 rows: absent
        {"b": 0, "a": 1, "d": 2, "c": 3},      # other ids, and the only one with 'd'
        {"a": 0, "b": 1},                      # the base: lacks 'c' and 'd'
    ]
    tensors = [torch.arange(3.0)[:, None] + 10, torch.arange(4.0)[:, None] + 20, torch.arange(2.0)[:, None] + 30]
    alignment = VocabularyAlignment.build(target, vocabularies, [3, 4, 2], base_index=2)
    a0, a1, a2 = (t.flatten().tolist() for t in alignment.apply(tensors))
    assert alignment.size == 5
    # a, b: own rows; c: base lacks it -> mean of the holders (12 + 23)/2; d: only model 1 has it;
    # e: nobody has it -> zero
    assert a0 == [10, 11, 12, 22, 0]
    assert a1 == [21, 20, 23, 22, 0]
    assert a2 == [30, 31, 17.5, 22, 0]
    base_holds = VocabularyAlignment.build({"a": 0, "b": 1}, [{"a": 0}, {"a": 0}, {"a": 1, "b": 0}], [1, 1, 2], base_index=2)
    assert base_holds.apply([torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[5.0], [6.0]])])[0].flatten().tolist() == [1.0, 5.0]
