#!/usr/bin/env python3
"""Whole-model merge benchmark: our karcher, our linear, today's karcher and mergekit-yaml's karcher, one run, one machine.

    python benchmarks/merge_model.py [--n 5] [--layers 12] [--workdir DIR] [--repeat R] [--busy] [--no-mergekit]

Generates a Llama-architecture base (hidden 768, intermediate 2048, vocab 32000, untied head; 12 layers
≈ 134M float32 parameters ≈ 536 MB) and N experts derived from it, each saved as one safetensors file.
Each merge runs in its own process (``karcher-lab merge`` from this repository's environment,
``mergekit-yaml`` from the peer venv of tools/peer_env.py) on the same recipe, after the checkpoints
were read once so that every run finds them in the page cache. "today's karcher" is ``karcher-lab
merge`` from the package as committed at git HEAD (``git archive`` into a temporary directory; left out
when git cannot provide it). Reported per run: wall time, the process's peak resident set size
(``ru_maxrss`` from ``wait4``) and the 1-minute load average after it; with ``--repeat R`` the runs are
interleaved R times and the ratios use the median time of each (the machine may be shared). ``--busy``
runs a competing torch process (large matmuls on 2 threads, benchmarks/competitor.py) on the same
cores during all runs; ``--no-mergekit`` leaves the peer's (slow) runs out. Targets: our karcher ≤ 1.3×
our linear, on a quiet machine and with ``--busy`` (issues 3 and 15); ≥ 3× faster than mergekit's
karcher; peak RSS no higher than mergekit's (issue 3).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchmarks.competitor import busy_if, load_average  # noqa: E402

TODAY = "today's karcher (HEAD)"


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


def committed_package(root: Path) -> Path | None:
    """The karcher_lab package as committed at git HEAD, extracted under ``root`` (None without git)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "karcher_lab"], capture_output=True)
    if archive.returncode != 0:
        return None
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process, measured with wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
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
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the median of each is reported")
    parser.add_argument("--busy", action="store_true", help="a competing torch process runs during the merges")
    parser.add_argument("--no-mergekit", action="store_true", help="leave out mergekit-yaml's runs")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.generate_only:
        make_checkpoints(args.workdir / "checkpoints", args.n, args.layers)
        return 0
    if not args.no_mergekit:
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
        today = committed_package(Path(tmp) / "head")
        runs = [  # (label, command, working directory: `python -m` imports karcher_lab from there)
            ("karcher-lab karcher", ours + [str(recipes["karcher"]), str(work / "out-ours-karcher"), "--overwrite"], ROOT),
            ("karcher-lab linear", ours + [str(recipes["linear"]), str(work / "out-ours-linear"), "--overwrite"], ROOT),
        ]
        if today is not None:
            runs.append((TODAY, ours + [str(recipes["karcher"]), str(work / "out-today-karcher"), "--overwrite"], today))
        if not args.no_mergekit:
            runs.append(("mergekit-yaml karcher", [str(peer_bin / "mergekit-yaml"), str(recipes["karcher"]), str(work / "out-mergekit-karcher"), "--quiet"], ROOT))
        condition = "BUSY: a competing torch process (matmuls, 2 threads) on the same cores" if args.busy else "no competing process"
        print(f"{args.n} checkpoints × {size / args.n / 1e6:.0f} MB (float32, {args.layers} layers), {os.cpu_count()} CPU cores; {condition}")
        results: dict[str, list[tuple[float, int, float]]] = {}
        with busy_if(args.busy):
            for repetition in range(args.repeat):
                for label, cmd, cwd in runs:
                    shutil.rmtree(work / "out-mergekit-karcher", ignore_errors=True)
                    env = {**os.environ, "PYTHONPATH": str(cwd)}
                    wall, rss = timed(cmd, env, cwd)
                    load = load_average()
                    print(f"{label:<24} {wall:8.1f} s   peak RSS {rss / 2**20:8.0f} MiB   load {load:5.1f}   (run {repetition + 1})", flush=True)
                    results.setdefault(label, []).append((wall, rss, load))
        median = {label: statistics.median(wall for wall, _, _ in rs) for label, rs in results.items()}
        peak = {label: max(rss for _, rss, _ in rs) for label, rs in results.items()}
        for label, rs in results.items():
            print(f"{label:<24} median {median[label]:8.1f} s   peak RSS {peak[label] / 2**20:8.0f} MiB   "
                  f"median load {statistics.median(load for _, _, load in rs):5.1f}")
        print(f"our karcher / our linear time: {median['karcher-lab karcher'] / median['karcher-lab linear']:.2f} (target ≤ 1.3)")
        if today is not None:
            print(f"today's karcher / our linear time: {median[TODAY] / median['karcher-lab linear']:.2f}")
        if not args.no_mergekit:
            theirs = "mergekit-yaml karcher"
            print(f"mergekit karcher / our karcher time: {median[theirs] / median['karcher-lab karcher']:.1f}× (target ≥ 3)")
            print(f"peak RSS ours / mergekit: {peak['karcher-lab karcher'] / peak[theirs]:.2f} (target ≤ 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
