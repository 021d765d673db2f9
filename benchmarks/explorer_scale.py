#!/usr/bin/env python3
"""Peak memory and update time of a MergeExplorer session over N generated experts, ours against
today's code (a git commit, run from an exported copy) in one run, with the floors.

    .venv/bin/python benchmarks/explorer_scale.py [--config qwen2-0.5b|tiny] [--n 3 5 8] [--baseline REV]
                                                  [--dtype bfloat16] [--folder DIR] [--device cpu]

For each N a study is written once (:func:`karcher_lab.study.synthetic.write_synthetic_study`: a base
and N experts of the config, each owning a task of 16 JSONL examples, 8 probe lines) and each code
version opens ``MergeExplorer(study)`` in a fresh process with two experts checked (an update measures
2 tasks; karcher's session spans all N), moves one weight slider and updates again.
The child reports its peak RSS (``ru_maxrss``) and the second update's stages. Printed side by side:
peak RSS of ours and of the baseline, the target 2 × one expert + 1 GiB, the merge stage against one
read pass over the experts' bytes (the floor; target ≤ 2×), and the stages of our update.

``--child STUDY`` is the measuring process itself (used by the parent and by tests/test_bounded_memory.py).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def child(study: str, device: str) -> None:
    """Open the explorer on ``study``, update after a weight change, print a JSON line of figures."""
    sys.path.insert(0, os.environ.get("KARCHER_LAB_CODE", str(ROOT)))
    import torch

    from karcher_lab.widgets import MergeExplorer

    torch.set_num_threads(int(os.environ.get("KARCHER_LAB_THREADS", "2")))
    kwargs = dict(quality_examples=16, activation_examples=4, draws=4, debounce=0.05, selected=["e0", "e1"])
    if device != "cpu":
        kwargs["device"] = device
    start = time.perf_counter()
    explorer = MergeExplorer(study, **kwargs)
    opened = time.perf_counter() - start
    assert explorer.error == "", explorer.error
    explorer.sliders[0].value = 0.5
    assert explorer.update(), explorer.error
    print(json.dumps(dict(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, opened=opened,
                          timings=explorer.timings, code=str(sys.modules["karcher_lab"].__file__))))


def run_child(study: Path, code: Path, device: str, cache: Path) -> dict:
    env = dict(os.environ, KARCHER_LAB_CODE=str(code), KARCHER_LAB_CACHE=str(cache), PYTHONPATH=str(code))
    out = subprocess.run([sys.executable, __file__, "--child", str(study), "--device", device], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({code}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_pass(study: Path) -> tuple[float, int]:
    """Seconds and bytes of one read of every expert tensor, every byte touched (a float32 sum of each;
    the floor of any merge: mapping a safetensors file without touching its pages reads nothing)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from karcher_lab import load_study
    from karcher_lab.study.resolve import merge_sources

    sources, _ = merge_sources(load_study(study))
    start, total = time.perf_counter(), 0
    for source in sources.values():
        for name in source.tensors:
            tensor = source.load(name)
            tensor.sum(dtype=torch.float32)
            total += tensor.numel() * tensor.element_size()
    return time.perf_counter() - start, total


def export(rev: str, into: Path) -> Path:
    """The package as of git revision ``rev``, exported into ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "karcher_lab"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child")
    parser.add_argument("--config", default="qwen2-0.5b", choices=["qwen2-0.5b", "tiny"])
    parser.add_argument("--n", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--baseline", default="01c0834", help="git revision of today's code ('' to skip)")
    parser.add_argument("--baseline-max-n", type=int, default=5, help="largest N the baseline is run at (its memory grows with N)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--folder", help="where studies are written (default: a temporary folder)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device)
        return
    sys.path.insert(0, str(ROOT))
    import torch

    from karcher_lab.io.synthetic import tiny_config
    from karcher_lab.study.synthetic import QWEN2_05B, write_synthetic_study

    config = QWEN2_05B if args.config == "qwen2-0.5b" else tiny_config(hidden_size=256, intermediate_size=1024,
                                                                        num_hidden_layers=8, vocab_size=4096)
    work = Path(args.folder or tempfile.mkdtemp(prefix="explorer_scale_"))
    baseline = export(args.baseline, Path(tempfile.mkdtemp(prefix="baseline_"))) if args.baseline else None
    print(f"config {args.config}, {args.dtype}, device {args.device}, load {os.getloadavg()[0]:.1f}; baseline {args.baseline or '-'}")
    print(f"{'N':>3} {'expert':>8} {'ours peak':>10} {'baseline':>10} {'target':>8} {'merge':>7} {'read pass':>9} "
          f"{'ratio':>6} | ours: load weights quality activations total (s)")
    for n in args.n:
        study = work / f"n{n}" / "study.yml"
        if not study.is_file():
            write_synthetic_study(study.parent, n, config=config, dtype=getattr(torch, args.dtype), tasks=n)
        expert = sum(f.stat().st_size for f in (study.parent / "experts" / "e0").glob("*.safetensors"))
        ours = run_child(study, ROOT, args.device, Path(tempfile.mkdtemp(prefix="cache_")))
        base = (run_child(study, baseline, args.device, Path(tempfile.mkdtemp(prefix="cache_")))
                if baseline is not None and n <= args.baseline_max_n else None)
        read_seconds, _ = read_pass(study)
        t = ours["timings"]
        print(f"{n:>3} {expert / GIB:>7.2f}G {ours['peak_rss'] / GIB:>9.2f}G "
              f"{(base['peak_rss'] / GIB if base else float('nan')):>9.2f}G {(2 * expert + GIB) / GIB:>7.2f}G "
              f"{t['merge']:>6.2f}s {read_seconds:>8.2f}s {t['merge'] / read_seconds:>5.2f}× | "
              f"{t['load']:.2f} {t['weights']:.2f} {t['quality']:.2f} {t['activations']:.2f} {t['total']:.2f}"
              + (f"  (baseline update {base['timings']['total']:.2f} s)" if base else ""), flush=True)


if __name__ == "__main__":
    main()
