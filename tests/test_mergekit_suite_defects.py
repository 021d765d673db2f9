"""The defects a hostile user found running mergekit's suite through ``karcher-lab merge`` (issue 16):
one test per defect, on the pico models of tests/test_mergekit_suite.py."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from karcher_lab import errors, merge_models, merge_tensors
from karcher_lab.cli import main
from karcher_lab.io.synthetic import write_pico_model
from karcher_lab.pipeline import run_recipe
from karcher_lab.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pico(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pico")
    kinds = {"llama_a": ("picollama", 1), "llama_b": ("picollama", 2), "llama_c": ("picollama", 3),
             "granite_a": ("picogranite", 4), "gpt2_a": ("picogpt2", 6)}
    dirs = {role: write_pico_model(root / role, kind, seed) for role, (kind, seed) in kinds.items()}
    dirs["vlm4_a"] = write_pico_model(root / "vlm4_a", "picollava", 11, vision_layers=4)
    dirs["vlm4_b"] = write_pico_model(root / "vlm4_b", "picollava", 12, vision_layers=4)
    return dirs


def _run(tmp_path: Path, recipe: dict, out: Path, *extra: str) -> int:
    path = tmp_path / f"recipe-{out.name}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return main(["merge", str(path), str(out), *extra])


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def _weights_digest(directory: Path) -> str:
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(directory.glob("*.safetensors")))).hexdigest()


# 1. passthrough and slices -------------------------------------------------------------------------

def test_stacked_slices_place_each_source_layer_and_set_the_layer_count(pico, tmp_path):
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(pico["gpt2_a"]), "layer_range": [1, 3]}]},
        {"sources": [{"model": str(pico["gpt2_a"]), "layer_range": [0, 4]}], "parameters": {"scale": [{"filter": "c_proj", "value": 0.5}, {"value": 1}]}},
    ]}
    assert _run(tmp_path, recipe, tmp_path / "out") == 0
    out, src = _tensors(tmp_path / "out"), _tensors(pico["gpt2_a"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == 6
    for out_layer, (src_layer, scale) in enumerate([(1, 1), (2, 1), (0, 0.5), (1, 0.5), (2, 0.5), (3, 0.5)]):
        for suffix in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.bias"):
            expected = src[f"transformer.h.{src_layer}.{suffix}"] * (scale if "c_proj" in suffix else 1)
            assert torch.equal(out[f"transformer.h.{out_layer}.{suffix}"], expected), (out_layer, suffix)
    assert torch.equal(out["transformer.wte.weight"], src["transformer.wte.weight"])
    assert "lm_head.weight" not in out  # tied, as in the source (mergekit skips the optional head)
    written = parse_recipe(yaml.safe_load((tmp_path / "out" / "merge_recipe.yml").read_text()))
    assert [[(s.layer_range, s.parameters) for s in sl.sources] for sl in written.slices] == [[((1, 3), {})], [((0, 4), {})]]
    assert written.slices[1].parameters == recipe["slices"][1]["parameters"]


def test_slices_of_a_model_with_two_towers_are_refused(pico, tmp_path):
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(pico["vlm4_a"]), "layer_range": [0, 1]}]}]}
    with pytest.raises(errors.NotSupportedError, match=r"has 2 layer stacks .*vision_tower.encoder.layers"):
        run_recipe(parse_recipe(recipe), tmp_path / "out")


# 2. layer gradients per tower ----------------------------------------------------------------------

def test_a_gradient_is_resolved_on_each_towers_own_depth(pico, tmp_path):
    """Text decoder of 2 layers, vision tower of 4, t: [0, 1]: text layer 1 is at t = 1 (was 1/3)."""
    recipe = {"merge_method": "slerp", "base_model": str(pico["vlm4_a"]), "dtype": "float32", "parameters": {"t": [0, 1]},
              "models": [{"model": str(pico["vlm4_a"])}, {"model": str(pico["vlm4_b"])}]}
    run_recipe(parse_recipe(recipe), tmp_path / "out")
    out, a, b = _tensors(tmp_path / "out"), _tensors(pico["vlm4_a"]), _tensors(pico["vlm4_b"])
    text = "language_model.model.layers.{}.mlp.up_proj.weight"
    vision = "vision_tower.encoder.layers.{}.mlp.fc1.weight"
    torch.testing.assert_close(out[text.format(0)], a[text.format(0)], rtol=0, atol=0)  # t = 0
    torch.testing.assert_close(out[text.format(1)], b[text.format(1)], rtol=1e-6, atol=1e-7)  # t = 1
    torch.testing.assert_close(out[vision.format(3)], b[vision.format(3)], rtol=1e-6, atol=1e-7)  # t = 1
    t = 1 / 3  # vision layer 1 of 4
    expected = merge_tensors("slerp", [a[vision.format(1)], b[vision.format(1)]], t=t)
    torch.testing.assert_close(out[vision.format(1)], expected, rtol=0, atol=0)


# 3. different architectures ------------------------------------------------------------------------

def test_different_architectures_are_refused_unless_crimes_are_allowed(pico, tmp_path, capsys):
    recipe = {"merge_method": "linear", "models": [str(pico["llama_a"]), str(pico["granite_a"])]}
    assert _run(tmp_path, recipe, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM, model_type llama; model 1" in err and "GraniteForCausalLM, model_type granite" in err
    assert "--allow-crimes" in err and not (tmp_path / "out").exists()
    assert _run(tmp_path, recipe, tmp_path / "out", "--allow-crimes") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"  # the first model's, as mergekit
    with pytest.raises(errors.ArchitectureMismatchError, match="allow_crimes=True"):
        merge_models([str(pico["llama_a"]), str(pico["granite_a"])], "linear")
    merged = merge_models([str(pico["llama_a"]), str(pico["granite_a"])], "linear", allow_crimes=True)
    a, g = _tensors(pico["llama_a"]), _tensors(pico["granite_a"])
    torch.testing.assert_close(merged["model.norm.weight"], (a["model.norm.weight"] + g["model.norm.weight"]) / 2)


# 4. nuslerp with weights that cancel ---------------------------------------------------------------

def test_nuslerp_with_weights_that_cancel_is_the_spherical_midpoint():
    g = torch.Generator().manual_seed(0)
    a, b, base = (torch.randn(6, 8, generator=g) for _ in range(3))
    out = merge_tensors("nuslerp", [a, b], weights=[-0.5, 0.5], base=base, nuslerp_flatten=False)
    torch.testing.assert_close(out, merge_tensors("nuslerp", [a, b], weights=[1.0, 1.0], base=base, nuslerp_flatten=False))
    t = 1.5  # weights −1 and 3: t = w2/(w1 + w2), past b along the great circle, as in mergekit
    x, y = a.double().flatten(), b.double().flatten()
    omega = torch.acos(x @ y / (x.norm() * y.norm()))
    expected = (torch.sin((1 - t) * omega) * x + torch.sin(t * omega) * y) / torch.sin(omega)
    torch.testing.assert_close(merge_tensors("nuslerp", [a, b], weights=[-1.0, 3.0]), expected.reshape(a.shape).float())
    with pytest.raises(errors.WeightError, match="all weights are zero"):
        merge_tensors("nuslerp", [a, b], weights=[0.0, 0.0])


# 5. the written recipe reproduces a seeded run -----------------------------------------------------

def test_the_written_recipe_reproduces_a_seeded_run(pico, tmp_path):
    recipe = {"merge_method": "dare_ties", "base_model": str(pico["llama_c"]), "parameters": {"density": 0.5},
              "models": [{"model": str(pico["llama_a"]), "parameters": {"weight": 0.6}}, {"model": str(pico["llama_b"]), "parameters": {"weight": 0.4}}]}
    assert _run(tmp_path, recipe, tmp_path / "seed1", "--seed", "1") == 0
    assert _run(tmp_path, recipe, tmp_path / "seed0") == 0
    assert yaml.safe_load((tmp_path / "seed1" / "merge_recipe.yml").read_text())["seed"] == 1
    assert main(["merge", str(tmp_path / "seed1" / "merge_recipe.yml"), str(tmp_path / "rerun")]) == 0
    assert _weights_digest(tmp_path / "rerun") == _weights_digest(tmp_path / "seed1") != _weights_digest(tmp_path / "seed0")


# 6. SIGTERM ----------------------------------------------------------------------------------------

TERM_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import karcher_lab.pipeline.session as session
    from karcher_lab.cli import main
    real, calls = session.merge_tensors, []
    def terminated(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    session.merge_tensors = terminated
    sys.exit(main(["merge", sys.argv[1], sys.argv[2], "--out-shard-size", "20KB"]))
    """
)


def test_sigterm_is_handled_like_ctrl_c(pico, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(pico["llama_a"]), str(pico["llama_b"])]}))
    proc = subprocess.run([sys.executable, "-c", TERM_SCRIPT, str(recipe), str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 143, proc.stderr
    assert "terminated (SIGTERM); nothing was written" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]  # no partial folder, hidden or not


# 7. overflow ---------------------------------------------------------------------------------------

def test_an_overflowing_merge_is_refused_naming_the_tensor_and_dtype(pico, tmp_path, capsys):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(pico["llama_c"]), "out_dtype": "float16",
              "parameters": {"lambda": 1e6}, "models": [str(pico["llama_a"]), str(pico["llama_b"])]}
    assert _run(tmp_path, recipe, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "tensor 'lm_head.weight': task_arithmetic: the merged tensor holds" in err and "Inf" in err and "in float16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe-out.yml"]


def test_the_weighted_sum_does_not_overflow_when_the_mean_is_representable():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    torch.testing.assert_close(merge_tensors("linear", [a, b], weights=[1e308, 1e308]), (a + b) / 2)
    torch.testing.assert_close(merge_tensors("linear", [a, b], weights=[1e308, 3e307]), (a + 0.3 * b) / 1.3)
    with pytest.raises(errors.WeightError, match="sum to zero"):
        merge_tensors("linear", [a, b], weights=[1e308, -1e308])
    big = torch.full((4,), 2e38)
    torch.testing.assert_close(merge_tensors("linear", [big, big], weights=[2.0, -1.0], normalize=False), big)  # partial sums overflow
    with pytest.raises(errors.NonFiniteError, match=r"holds 35 Inf and 0 NaN values in float32 .*largest finite value is 3.403e\+38"):
        merge_tensors("linear", [a.abs() + 2, b.abs() + 2], weights=[1e38, 1e38], normalize=False)


# 8. messages ---------------------------------------------------------------------------------------

def test_output_into_a_source_says_it_is_a_source(pico, tmp_path, capsys):
    recipe = {"merge_method": "linear", "models": [str(pico["llama_a"]), str(pico["llama_b"])]}
    assert _run(tmp_path, recipe, pico["llama_a"]) == 2
    err = capsys.readouterr().err
    assert f"is (inside) the source model {pico['llama_a']}" in err and "--overwrite" not in err


def test_output_under_a_file_names_the_file(pico, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    recipe = {"merge_method": "linear", "models": [str(pico["llama_a"]), str(pico["llama_b"])]}
    assert _run(tmp_path, recipe, tmp_path / "afile" / "out") == 2
    assert f"cannot be created: {tmp_path / 'afile'} is a file, not a directory" in capsys.readouterr().err


def test_a_folder_name_with_an_at_sign_shows_the_split(pico, tmp_path, capsys):
    at = tmp_path / "llama@v2"
    at.symlink_to(pico["llama_a"], target_is_directory=True)
    recipe = {"merge_method": "linear", "models": [str(at), str(pico["llama_b"])]}
    assert _run(tmp_path, recipe, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"read as path {str(tmp_path / 'llama')!r} at revision 'v2'" in err and f"model: {{path: {at}}}" in err
    recipe["models"][0] = {"model": {"path": str(at)}}
    assert _run(tmp_path, recipe, tmp_path / "out") == 0


def test_a_base_given_to_karcher_in_python_warns(pico):
    with pytest.warns(UserWarning, match="karcher does not use a base model; base_model .* is merged as one more input"):
        merge_models([str(pico["llama_a"]), str(pico["llama_b"])], "karcher", base=str(pico["llama_c"]), params={"max_iter": 3})


# 9. --check-finite ---------------------------------------------------------------------------------

def test_check_finite_finds_a_nan_before_any_tensor_is_merged(pico, tmp_path, monkeypatch, capsys):
    import karcher_lab.pipeline.session as session
    from karcher_lab.io.synthetic import write_checkpoint

    state = _tensors(pico["llama_b"])
    state["model.norm.weight"][3] = float("nan")  # the last tensor merged
    config = json.loads((pico["llama_b"] / "config.json").read_text())
    broken = write_checkpoint(tmp_path / "broken", config, state, tokenizer=False)
    merged = []
    real = session.merge_tensors
    monkeypatch.setattr(session, "merge_tensors", lambda *a, **k: merged.append(k.get("name")) or real(*a, **k))
    recipe = {"merge_method": "linear", "models": [str(pico["llama_a"]), str(broken)]}
    assert _run(tmp_path, recipe, tmp_path / "out", "--check-finite") == 2
    err = capsys.readouterr().err
    assert f"model {broken}: tensor 'model.norm.weight' contains 1 NaN and 0 Inf values (found by the finite check before merging)" in err
    assert merged == [] and not (tmp_path / "out").exists()
    assert _run(tmp_path, recipe, tmp_path / "out") == 2  # without it: found when merged, after the others
    assert "tensor 'model.norm.weight': model 1 contains 1 NaN and 0 Inf values" in capsys.readouterr().err
    assert len(merged) == 21 and not (tmp_path / "out").exists()
