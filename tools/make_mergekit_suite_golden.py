#!/usr/bin/env python3
"""Golden fingerprints of mergekit 0.1.5's own test configurations, run by mergekit on pico models.

    python3 tools/make_mergekit_suite_golden.py      # rewrites tests/golden/mergekit_suite.json

Every configuration of mergekit 0.1.5's tests/test_basic_merges.py (and the examples/*.yml whose
models can be made small) is listed in :data:`CASES` with mergekit's YAML names, in float32 (mergekit's
tests use bfloat16, where mergekit computes in bf16). The models are rebuilt by
``karcher_lab.io.synthetic.write_pico_model`` (the configs of mergekit's tests/common.py; GPT-2 is
width 32, 4 layers) from fixed seeds; each recipe is run by ``mergekit-yaml --random-seed 0`` in the
throw-away peer venv of tools/peer_env.py (mergekit is never a dependency).

tests/golden/mergekit_suite.json holds the sha256 of every input model's weights (so a test knows it
rebuilt the same inputs), the output tensor layouts (names and shapes, shared between cases), and per
case: the recipe (model paths as ``MODEL:<role>``), whether the method is deterministic, the output
config's layer counts, its layout, one sha256 over every output tensor (:func:`tensors_sha256`) and per
tensor, in float64, Σx, Σ|x|, Σx² and Σ x_k cos(0.37 k) (:func:`fingerprint`). Or, for a configuration
mergekit refuses, the last line of its error.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "mergekit_suite.json"

MODELS = {
    "llama_a": ("picollama", 1, None), "llama_b": ("picollama", 2, None), "llama_c": ("picollama", 3, None),
    "llama_d": ("picollama", 13, None),
    "granite_a": ("picogranite", 4, None), "granite_b": ("picogranite", 5, None),
    "gpt2_a": ("picogpt2", 6, None), "gpt2_b": ("picogpt2", 7, None),
    "vlm_a": ("picollava", 8, None), "vlm_b": ("picollava", 9, None), "vlm_c": ("picollava", 10, None),
    "vlm4_a": ("picollava", 11, 4), "vlm4_b": ("picollava", 12, 4),
}
"""Input models by role: (kind, seed, vision-tower depth or None)."""


def _m(role: str) -> str:
    return f"MODEL:{role}"


def _two(a: str, b: str, method: str, base: str | None = None, params: dict | None = None, weights=(0.6, 0.4)) -> dict:
    """mergekit's two_model_config: weights 0.6 and 0.4, in float32 here."""
    recipe = {"merge_method": method, "models": [{"model": _m(a), "parameters": {"weight": weights[0]}},
                                                 {"model": _m(b), "parameters": {"weight": weights[1]}}], "dtype": "float32"}
    if base:
        recipe["base_model"] = _m(base)
    if params:
        recipe["parameters"] = params
    return recipe


RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear", "arcee_fusion"}


def _cases() -> dict[str, dict]:
    cases: dict[str, dict] = {
        "granite_copy": {"merge_method": "passthrough", "models": [{"model": _m("granite_a")}], "dtype": "float32"},
        "granite_linear": _two("granite_a", "granite_b", "linear"),
        "granite_slerp": {**_two("granite_a", "granite_b", "slerp", "granite_a", {"t": 0.5}), "models": [{"model": _m("granite_a")}, {"model": _m("granite_b")}]},
        "gpt2_copy": {"merge_method": "passthrough", "models": [{"model": _m("gpt2_a")}], "dtype": "float32"},
        "gpt2_stack": {"merge_method": "passthrough", "dtype": "float32",
                       "slices": [{"sources": [{"model": _m("gpt2_a"), "layer_range": [0, 4]}]}] * 2},
        "passthrough_scale": {"merge_method": "passthrough", "models": [{"model": _m("llama_a"), "parameters": {
            "scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
    }
    for prefix, (a, b, c) in {"": ("llama_a", "llama_b", "llama_c"), "vlm_": ("vlm_a", "vlm_b", "vlm_c")}.items():
        cases[f"{prefix}linear"] = _two(a, b, "linear")
        cases[f"{prefix}slerp"] = _two(a, b, "slerp", a, {"t": 0.35})
        for base in (None, c):
            for row_wise in (False, True):
                for flatten in (False, True):
                    cases[f"{prefix}nuslerp_{'base' if base else 'nobase'}_row{int(row_wise)}_flat{int(flatten)}"] = _two(
                        a, b, "nuslerp", base, {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten})
        cases[f"{prefix}nuslerp_weights_sum_to_zero"] = _two(a, b, "nuslerp", c, {"nuslerp_row_wise": False, "nuslerp_flatten": False}, weights=(-0.5, 0.5))
        cases[f"{prefix}task_arithmetic"] = _two(a, b, "task_arithmetic", c)
        cases[f"{prefix}breadcrumbs"] = _two(a, b, "breadcrumbs", c)
        cases[f"{prefix}ties"] = _two(a, b, "ties", c, {"density": 0.3})
        cases[f"{prefix}dare_ties"] = _two(a, b, "dare_ties", c, {"density": 0.66})
        cases[f"{prefix}model_stock"] = _two(b, c, "model_stock", a)
        cases[f"{prefix}model_stock_filterwise"] = _two(b, c, "model_stock", a, {"filter_wise": True})
    cases.update({
        "sce": _two("llama_a", "llama_b", "sce", "llama_c", {"select_topk": 0.5}),
        "ram": _two("llama_a", "llama_b", "ram", "llama_c"),
        "ramplus_tl": _two("llama_a", "llama_b", "ramplus_tl", "llama_c", {"r": 0.05, "alpha": 1.0}),
        "multislerp": _two("llama_a", "llama_b", "multislerp", "llama_c"),
        "arcee_fusion": _two("llama_a", "llama_b", "arcee_fusion", "llama_a"),
        "nearswap": _two("llama_a", "llama_b", "nearswap", "llama_a", {"t": 0.0001}),
        "della": _two("llama_a", "llama_b", "della", "llama_c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
        "della_invalid_epsilon": _two("llama_a", "llama_b", "della", "llama_c", {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
        "karcher": _two("llama_a", "llama_b", "karcher", "llama_c", {"max_iter": 5, "tol": 1e-5}),
        # examples/*.yml on pico models
        "example_orcamini_platy_stack": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": _m("gpt2_a"), "layer_range": [0, 3]}]},
            {"sources": [{"model": _m("gpt2_b"), "layer_range": [1, 4]}]}]},
        "example_gradient_slerp": {"merge_method": "slerp", "base_model": _m("llama_a"), "dtype": "float32", "slices": [{"sources": [
            {"model": _m("llama_a"), "layer_range": [0, 2]}, {"model": _m("llama_b"), "layer_range": [0, 2]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "example_linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": _m("llama_a"), "parameters": {"weight": 1.0}}, {"model": _m("llama_b"), "parameters": {"weight": 0.3}},
            {"model": _m("llama_c"), "parameters": {"weight": 0.5}}]},
        "example_ties": {"merge_method": "ties", "base_model": _m("llama_d"), "dtype": "float32",
                         "parameters": {"normalize": True, "int8_mask": True}, "models": [
            {"model": _m("llama_a"), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": _m("llama_b"), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {"model": _m("llama_c"), "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}}]},
        # issue 16, defect 3: Llama and Granite share tensor names and shapes; mergekit refuses them
        "crimes_llama_granite": _two("llama_a", "granite_a", "linear"),
        # slices beyond the examples: per-slice methods' parameters, partial ranges, a slice with two sources
        "slices_slerp_per_slice":
        {"merge_method": "slerp", "base_model": _m("gpt2_a"), "dtype": "float32", "parameters": {"t": 0.5}, "slices": [
            {"sources": [{"model": _m("gpt2_a"), "layer_range": [0, 2]}, {"model": _m("gpt2_b"), "layer_range": [0, 2]}], "parameters": {"t": [0.0, 1.0]}},
            {"sources": [{"model": _m("gpt2_a"), "layer_range": [1, 4]}, {"model": _m("gpt2_b"), "layer_range": [1, 4]}]}]},
        "slices_partial_llama": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": _m("llama_a"), "layer_range": [1, 2]}]},
            {"sources": [{"model": _m("llama_b"), "layer_range": [0, 2], "parameters": {"scale": 0.5}}]}]},
        # issue 16, defect 2: a gradient over a LLaVA whose vision tower is deeper than its text decoder
        "vlm_gradient_per_tower": {"merge_method": "slerp", "base_model": _m("vlm4_a"), "dtype": "float32", "parameters": {"t": [0, 1]},
                                   "models": [{"model": _m("vlm4_a")}, {"model": _m("vlm4_b")}]},
    })
    return cases


def fingerprint(t) -> list[float]:
    """Σx, Σ|x|, Σx², Σ x_k cos(0.37 k) of the float32 values, in float64, to 10 significant digits."""
    import torch

    d = t.detach().to(torch.float32).double().flatten()
    probe = torch.cos(0.37 * torch.arange(d.numel(), dtype=torch.float64))
    return [float(f"{v:.10g}") for v in (d.sum(), d.abs().sum(), d.square().sum(), (d * probe).sum())]


def tensors_sha256(tensors: dict) -> str:
    """One digest of every tensor's name, shape and float32 bytes, in sorted name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        x = tensors[name].detach().to(torch.float32).contiguous()
        digest.update(f"{name}:{list(x.shape)}".encode())
        digest.update(x.numpy().tobytes())
    return digest.hexdigest()


def weights_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        digest.update(f.read_bytes())
    return digest.hexdigest()


def substitute(value, paths: dict[str, str]):
    if isinstance(value, str) and value.startswith("MODEL:"):
        return paths[value[len("MODEL:"):]]
    if isinstance(value, list):
        return [substitute(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, paths) for k, v in value.items()}
    return value


def build_models(root: Path) -> dict[str, Path]:
    from karcher_lab.io.synthetic import write_pico_model

    return {role: write_pico_model(root / role, kind, seed, vision) for role, (kind, seed, vision) in MODELS.items()}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))
    import torch
    import yaml
    from safetensors.torch import load_file

    from peer_env import MERGEKIT_VERSION, ensure_peer_python

    peer = ensure_peer_python()
    mergekit_yaml = peer.parent / "mergekit-yaml"
    out: dict = {"mergekit_version": MERGEKIT_VERSION, "torch_version": torch.__version__, "models": {}, "layouts": {}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = build_models(root / "models")
        out["models"] = {role: {"kind": k, "seed": s, "vision_layers": v, "weights_sha256": weights_sha256(dirs[role])}
                         for role, (k, s, v) in MODELS.items()}
        for case, recipe in _cases().items():
            path = root / f"{case}.yml"
            path.write_text(yaml.safe_dump(substitute(recipe, {r: str(d) for r, d in dirs.items()}), sort_keys=False))
            target = root / "out" / case
            run = subprocess.run([str(mergekit_yaml), str(path), str(target), "--random-seed", "0"],
                                 capture_output=True, text=True)
            entry = {"recipe": recipe, "deterministic": recipe["merge_method"] not in RANDOMIZED}
            if run.returncode != 0:
                entry["mergekit_error"] = (run.stderr.strip().splitlines() or ["?"])[-1]
            else:
                tensors = {}
                for f in sorted(target.glob("*.safetensors")):
                    tensors |= load_file(str(f))
                config = json.loads((target / "config.json").read_text())
                entry["config"] = {k: config[k] for k in ("num_hidden_layers", "n_layer", "architectures", "model_type", "tie_word_embeddings") if k in config}
                layout = [[name, list(t.shape)] for name, t in sorted(tensors.items())]
                key = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:12]
                out["layouts"][key] = layout
                entry["layout"] = key
                entry["sha256"] = tensors_sha256(tensors)
                entry["sums"] = [fingerprint(tensors[name]) for name, _ in layout]
            out["cases"][case] = entry
            print(f"{case}: {'error: ' + entry['mergekit_error'] if 'mergekit_error' in entry else str(len(entry['sums'])) + ' tensors'}", flush=True)
    GOLDEN.write_text(json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
