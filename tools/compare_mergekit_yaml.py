#!/usr/bin/env python3
"""Run the same YAML recipes through mergekit-yaml (the peer, in its throw-away venv) and karcher-lab,
and report the largest difference per tensor set.

    python tools/compare_mergekit_yaml.py                 # generated checkpoints, every shared deterministic method
    python tools/compare_mergekit_yaml.py A.yml B.yml     # your own recipes (models must be local or cached)

With no arguments, small Llama checkpoints (a base and three experts, float32) are generated and one
recipe per deterministic method that both tools implement is written, exercising per-model weights,
gradients over the layers and ``[{filter, value}]`` lists; two more recipes merge in a fourth expert
whose tokenizer has other token ids and extra tokens, aligned by ``tokenizer_source``. Each recipe is merged by
``mergekit-yaml --random-seed 0`` (from tools/peer_env.py's venv; mergekit is never a dependency) and
by ``karcher_lab.pipeline.run_recipe``, and the outputs are compared tensor by tensor in float64:
max |Δ| and max |Δ| / max |reference| over the model. The karcher recipe sets mergekit's
``max_iter: 10, tol: 1e-5`` (our defaults run to convergence; docs/methods.md).
Randomized methods (dare_*, della*, arcee_fusion) are left out: their masks come from different RNGs.
The experts share a common direction (as fine-tunes of one base do); where task vectors disagree
(mean cosine < 0) our model_stock clamps the ratio and differs from mergekit by design, and
breadcrumbs may differ where two entries of equal magnitude straddle a cut (docs/methods.md).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

LAYER_FILTERS = [{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.5}]


def generated_recipes(models: list[str], base: str, reordered: str) -> dict[str, dict]:
    """One recipe per deterministic method shared with mergekit, with mergekit's parameter names, and
    two that align a model with another tokenizer (``reordered``) by token."""
    e0, e1, e2 = models
    weighted = [{"model": e0, "parameters": {"weight": 1.0}}, {"model": e1, "parameters": {"weight": [0.3, 0.8]}}, {"model": e2, "parameters": {"weight": 0.5}}]
    ta = {"base_model": base, "models": [
        {"model": e0, "parameters": {"weight": 1.0, "density": 0.6}},
        {"model": e1, "parameters": {"weight": [0.3, 0.8], "density": LAYER_FILTERS}},
        {"model": e2, "parameters": {"weight": 0.5, "density": 0.9}},
    ]}
    return {
        "linear": {"models": weighted, "parameters": {"normalize": True}},
        "slerp": {"base_model": base, "models": [{"model": base}, {"model": e0}], "parameters": {"t": [0.1, 0.6, 0.3]}},
        "nuslerp": {"models": weighted[:2], "parameters": {"nuslerp_row_wise": False}},
        "multislerp": {"base_model": base, "models": weighted},
        "karcher": {"models": [{"model": m} for m in models], "parameters": {"max_iter": 10, "tol": 1e-5}},
        "task_arithmetic": {**ta, "parameters": {"lambda": [1.0, 0.5]}},
        "ties": {**ta, "parameters": {"lambda": 1.0, "normalize": True}},
        "breadcrumbs": {**ta, "parameters": {"gamma": 0.05}},
        "breadcrumbs_ties": {**ta, "parameters": {"gamma": 0.05}},
        "sce": {"base_model": base, "models": [{"model": m} for m in models], "parameters": {"select_topk": 0.5}},
        "model_stock": {"base_model": base, "models": [{"model": m} for m in models]},
        "nearswap": {"base_model": base, "models": [{"model": e0}], "parameters": {"t": 0.02}},
        "ram": {"base_model": base, "models": [{"model": m} for m in models], "parameters": {"epsilon": 0.01}},
        "ramplus_tl": {"base_model": base, "models": [{"model": m} for m in models], "parameters": {"epsilon": 0.01}},
        "linear-vocab-base": {"base_model": base, "models": [{"model": e0}, {"model": reordered, "parameters": {"weight": 2.0}}], "tokenizer_source": "base", "parameters": {"weight": 1.0}},
        "ties-vocab-model": {**ta, "models": ta["models"][:2] + [{"model": reordered, "parameters": {"weight": 0.5}}], "tokenizer_source": reordered},
    }


def make_checkpoints(root: Path) -> tuple[list[str], str, str]:
    """(three experts, the base, a fourth expert under a reordered and extended tokenizer)."""
    from karcher_lab.io.synthetic import (
        base_state,
        expert_states,
        tiny_config,
        write_checkpoint,
        write_reordered_vocabulary_checkpoint,
    )

    config = tiny_config("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    base = base_state(config, seed=0)
    write_checkpoint(root / "base", config, base)
    experts = expert_states(base, 4, seed=1, strength=0.1, shared=0.3)
    models = [str(write_checkpoint(root / f"expert{i}", config, e)) for i, e in enumerate(experts[:3])]
    reordered, _ = write_reordered_vocabulary_checkpoint(root / "expert-reordered", config, experts[3])
    return models, str(root / "base"), str(reordered)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def compare(recipe_path: Path, work: Path, peer_python: Path) -> tuple[float, float, int, str]:
    """(max |Δ|, max |Δ|/max|ref|, tensors compared, note) for one recipe."""
    from karcher_lab.pipeline import run_recipe
    from karcher_lab.recipe import load_recipe

    ours, theirs = work / f"{recipe_path.stem}-karcher-lab", work / f"{recipe_path.stem}-mergekit"
    mergekit_yaml = peer_python.parent / "mergekit-yaml"
    proc = subprocess.run(
        [str(mergekit_yaml), str(recipe_path), str(theirs), "--random-seed", "0", "--quiet"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        return float("nan"), float("nan"), 0, "mergekit failed: " + proc.stderr.strip().splitlines()[-1]
    run_recipe(load_recipe(recipe_path), ours, seed=0, relative_to=recipe_path.parent)
    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        return float("nan"), float("nan"), 0, f"tensor names differ: {sorted(set(a) ^ set(b))[:4]}"
    max_abs = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    max_rel = max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)) for k in a)
    return max_abs, max_rel, len(a), ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="YAML recipes (default: generated ones)")
    parser.add_argument("--keep", type=Path, help="keep checkpoints and outputs in this directory")
    args = parser.parse_args(argv)
    from peer_env import ensure_peer_python

    peer_python = ensure_peer_python()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        recipes = list(args.recipes)
        if not recipes:
            models, base, reordered = make_checkpoints(work / "checkpoints")
            for label, body in generated_recipes(models, base, reordered).items():
                path = work / f"{label}.yml"
                path.write_text(yaml.safe_dump({"merge_method": label.split("-")[0], **body}, sort_keys=False))
                recipes.append(path)
        print(f"{'recipe':<18} {'tensors':>7} {'max |Δ|':>10} {'max rel':>10}  note")
        for path in recipes:
            max_abs, max_rel, n, note = compare(path, work, peer_python)
            print(f"{path.stem:<18} {n:>7} {max_abs:>10.3g} {max_rel:>10.3g}  {note}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
