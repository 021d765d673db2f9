#!/usr/bin/env python3
"""How long one MergeExplorer update takes on a Study of plain model folders and JSONL task files.

    .venv/bin/python benchmarks/study_update.py [--pool tiny] [--experts 4] [--smollm2 DIR] [--repeats 5]

- ``--pool NAME``: a built zoo pool's first ``--experts`` experts, given as their plain folders, with
  their tasks' first ``--examples`` held-out examples written to JSONL (what a user brings);
- ``--smollm2 DIR``: five experts derived from SmolLM2-135M-Instruct (the base plus a seeded task vector
  of 0.2% of each tensor's norm: untrained, the timings are those of real-BPE 135M experts), written
  once to DIR, on the five zoo tasks of the SmolLM2 LoRA pool as JSONL.

For each, the explorer's weight-slider update is timed ``--repeats`` times with exact match by greedy
decoding (what a study's tasks get) and without exact match (NLL and KL from the one teacher-forced
pass), side by side with the merge alone and the in-place weighted sum (the floor of any merge); the
difference of the quality stage is the cost of greedy decoding. Targets: ≤ 0.5 s on the tiny pool's experts,
≤ 10 s on five SmolLM2-sized experts, on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from karcher_lab import Study  # noqa: E402
from karcher_lab.widgets import MergeExplorer  # noqa: E402
from karcher_lab.zoo import find_pool, get_task  # noqa: E402

SMOLLM2_TASKS = ("addition", "units", "dates", "maxdigit", "uppercase")
TARGETS = {"tiny": 0.5, "smollm2": 10.0}


def write_tasks(folder: Path, tasks: list[str], examples: int) -> dict[str, str]:
    """Each task's first held-out examples as ``<task>.jsonl``; returns the study's tasks mapping."""
    out = {}
    for task in tasks:
        lines = [json.dumps({"prompt": e.prompt, "answer": e.answer}) for e in get_task(task).examples("eval", examples, seed=0)]
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
        out[task] = str(folder / f"{task}.jsonl")
    return out


def pool_study(name: str, experts: int, examples: int, folder: Path) -> tuple[Study, str]:
    pool = find_pool(name)
    tasks = [e["task"] for e in pool.experts[:experts]]
    study = Study(experts={t: str(pool.expert_path(t)) for t in tasks}, base=str(pool.base_path),
                  tasks=write_tasks(folder, tasks, examples), name=f"{pool.name}-folders")
    return study, pool.name


def smollm2_study(directory: Path, examples: int, folder: Path) -> tuple[Study, str]:
    from transformers import AutoModelForCausalLM

    from karcher_lab.zoo.smollm2 import build_smollm2

    base = build_smollm2()
    generator = torch.Generator().manual_seed(0)
    for task in SMOLLM2_TASKS:
        target = directory / task
        if (target / "config.json").is_file():
            continue
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                noise = torch.randn(p.shape, generator=generator)
                p.add_(0.002 * p.norm() / noise.norm() * noise)
        model.save_pretrained(target)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(base / f, target / f)
    study = Study(experts={t: str(directory / t) for t in SMOLLM2_TASKS}, base=str(base),
                  tasks=write_tasks(folder, list(SMOLLM2_TASKS), examples), name="smollm2-derived")
    return study, "smollm2"


def time_updates(study: Study, exact_match: bool, args) -> dict[str, float]:
    explorer = MergeExplorer(study, exact_match=exact_match, quality_examples=args.examples,
                             activation_examples=args.probes, draws=args.draws)
    if explorer.error:
        raise SystemExit(f"the explorer failed: {explorer.error}")
    totals, merges, floors, stages = [], [], [], {}
    for i in range(args.repeats):
        explorer.sliders[0].value = 0.3 if i % 2 == 0 else 0.8
        if not explorer.update():
            raise SystemExit(f"update failed: {explorer.error}")
        for stage, seconds in explorer.timings.items():
            stages.setdefault(stage, []).append(seconds)
        totals.append(explorer.timings["total"])
        merges.append(explorer.timings["merge"] + explorer.timings["load"])
        request = explorer.request()
        experts = [dict(explorer.engine.experts.state(explorer.tasks[j])) for j in request["members"]]  # not timed
        begin = time.perf_counter()
        with torch.no_grad():  # the floor: Σ α_i θ_i written in place into the one model
            for name, tensor in explorer.model.state_dict().items():
                if name in experts[0]:  # a tied head follows its embedding
                    tensor.copy_(sum(a * e[name] for a, e in zip(request["alpha"], experts)))
        floors.append(time.perf_counter() - begin)
    return dict(total=statistics.median(totals), best=min(totals), merge=statistics.median(merges),
                floor=statistics.median(floors), **{f"stage {k}": statistics.median(v) for k, v in stages.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", default="tiny", help="a pool name or directory")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--smollm2", type=Path, metavar="DIR", help="measure five SmolLM2-derived experts (written here once)")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        study, kind = (smollm2_study(args.smollm2, args.examples, folder) if args.smollm2
                       else pool_study(args.pool, args.experts, args.examples, folder))
        print(f"study {study.name}: {len(study.experts)} experts from plain folders, {len(study.task_specs)} JSONL "
              f"tasks of {args.examples} examples; torch {torch.__version__}, {args.threads} threads, load "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        results = {"greedy EM": time_updates(study, True, args), "no EM (1 pass)": time_updates(study, False, args)}
    keys = list(results["greedy EM"])
    print(f"{'(medians of ' + str(args.repeats) + ', s)':<24}" + "".join(f"{k:>16}" for k in results))
    for key in keys:
        print(f"{key:<24}" + "".join(f"{results[m].get(key, float('nan')):>16.3f}" for m in results))
    greedy, forced = results["greedy EM"]["stage quality"], results["no EM (1 pass)"]["stage quality"]
    print(f"greedy exact match costs {greedy - forced:.3f} s per update on top of the one teacher-forced pass "
          f"(quality stage {greedy / forced:.1f}x)")
    target = TARGETS.get(kind)
    if target is not None:
        total = results["greedy EM"]["total"]
        print(f"target: update <= {target} s -> with greedy exact match {total:.3f} s: "
              f"{'met' if total <= target else 'NOT met'} (load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
