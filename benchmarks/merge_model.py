#!/usr/bin/env python3
"""Whole-model merge benchmark: our karcher, our linear and mergekit-yaml's karcher, one run, one machine.

    python benchmarks/merge_model.py [--n 5] [--layers 12] [--workdir DIR]

Generates a Llama-architecture base (hidden 768, intermediate 2048, vocab 32000, untied head; 12 layers
≈ 134M float32 parameters ≈ 536 MB) and N experts derived from it, each saved as one safetensors file.
Each merge runs in its own process (``karcher-lab merge`` from this repository's environment,
``mergekit-yaml`` from the peer venv of tools/peer_env.py) on the same recipe, after the checkpoints
were read once so that every run finds them in the page cache. Reported per run: wall time and the
process's peak resident set size (``ru_maxrss`` from ``wait4``); with ``--repeat R`` the runs are
interleaved R times and the ratios use the fastest time of each (other load on the machine only ever
slows a run down). Targets (issue 3): our karcher ≤ 1.3×
our linear; ≥ 3× faster than mergekit's karcher; peak RSS no higher than mergekit's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def make_checkpoints(root: Path, n: int, layers: int) -> list[Path]:
    from karcher_lab.io.synthetic import base_state, expert_states, tiny_config, write_checkpoint

    config = tiny_config(
        "llama", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
    )
    paths = [root / f"expert{i}" for i in range(n)]
    if all((p / "model.safetensors").exists() for p in paths):
        return paths
    base = base_state(config, seed=0)
    for path, state in zip(paths, expert_states(base, n, seed=1, strength=0.05, shared=0.3)):
        write_checkpoint(path, config, state, tokenizer=False)
    return paths


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process, measured with wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="number of checkpoints (default 5)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (12 ≈ 536 MB per checkpoint)")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) checkpoints here")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the fastest of each is reported")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate_only:
        make_checkpoints(args.workdir / "checkpoints", args.n, args.layers)
        return 0
    from peer_env import ensure_peer_python

    peer_bin = ensure_peer_python().parent
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # generated in a child process: a child forked from a large parent would inherit its RSS peak
        generate = [sys.executable, __file__, "--generate-only", "--n", str(args.n), "--layers", str(args.layers), "--workdir", str(work)]
        subprocess.run(generate, check=True)
        paths = [work / "checkpoints" / f"expert{i}" for i in range(args.n)]
        size = sum((p / "model.safetensors").stat().st_size for p in paths)
        for p in paths:  # warm the page cache so that every run reads from memory
            with open(p / "model.safetensors", "rb") as f:
                while f.read(1 << 24):
                    pass
        recipes = {}
        for method in ("karcher", "linear"):
            recipes[method] = work / f"{method}.yml"
            recipes[method].write_text(yaml.safe_dump({"merge_method": method, "models": [{"model": str(p)} for p in paths]}))
        ours = [sys.executable, "-m", "karcher_lab.cli", "merge"]
        runs = [
            ("karcher-lab karcher", ours + [str(recipes["karcher"]), str(work / "out-ours-karcher"), "--overwrite"]),
            ("karcher-lab linear", ours + [str(recipes["linear"]), str(work / "out-ours-linear"), "--overwrite"]),
            ("mergekit-yaml karcher", [str(peer_bin / "mergekit-yaml"), str(recipes["karcher"]), str(work / "out-mergekit-karcher"), "--quiet"]),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        print(f"{args.n} checkpoints × {size / args.n / 1e6:.0f} MB (float32, {args.layers} layers), {os.cpu_count()} CPU cores")
        results: dict[str, tuple[float, int]] = {}
        for repetition in range(args.repeat):
            for label, cmd in runs:
                shutil.rmtree(work / "out-mergekit-karcher", ignore_errors=True)
                wall, rss = timed(cmd, env)
                print(f"{label:<24} {wall:8.1f} s   peak RSS {rss / 2**20:8.0f} MiB   (run {repetition + 1})", flush=True)
                best = results.get(label, (float("inf"), 0))
                results[label] = (min(best[0], wall), max(best[1], rss))
        ours_k, ours_l, theirs = results["karcher-lab karcher"], results["karcher-lab linear"], results["mergekit-yaml karcher"]
        print(f"our karcher / our linear time: {ours_k[0] / ours_l[0]:.2f} (target ≤ 1.3)")
        print(f"mergekit karcher / our karcher time: {theirs[0] / ours_k[0]:.1f}× (target ≥ 3)")
        print(f"peak RSS ours / mergekit: {ours_k[1] / theirs[1]:.2f} (target ≤ 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
