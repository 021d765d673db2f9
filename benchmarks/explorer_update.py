#!/usr/bin/env python3
"""How long one MergeExplorer update takes, next to a from-scratch merge and the in-place floor.

    .venv/bin/python benchmarks/explorer_update.py [--pools tiny smollm2] [--experts 5] [--repeats 5]

For each pool, a :class:`karcher_lab.widgets.MergeExplorer` over the pool with its first ``--experts``
experts checked runs three kinds of update, ``--repeats`` times each, through its synchronous
``update()`` (no debounce): a weight change, an η change, and a subset change (one expert unchecked or
checked again). Printed side by side, medians:

- ours, merge: the karcher fast path (re-solve from the cached Grams, one combine pass) plus
  ``load_state_dict`` into the one preallocated model;
- from scratch, merge: ``karcher_lab.merge(paths, "karcher", weights=...)`` (reads the checkpoints,
  Gram pass, solve, combine) plus instantiating a model and loading the state;
- floor: a plain weighted sum Σ α_i θ_i written in place into the preallocated model's parameters
  (one read of the inputs, one write);
- evaluation: what every update then measures (quality, KL, weight metrics, activations), the same for
  both paths; ours, full update = ours merge + evaluation, from scratch + evaluate likewise;
- first figures: when the panel's first figures (convergence, norm ratio) are current: merge, load
  and the weight metrics (the quality and layer figures follow as their numbers arrive);
- best full: the fastest of the repeats (on a shared, loaded machine the median carries other
  processes' bursts; the minimum is the closest to the uncontended cost). Then the median of every
  stage over all updates, and the load average (``os.getloadavg``) before and after.

Targets (issue 7): a full update on the tiny pool ≤ 0.5 s; on the SmolLM2 pool (5 experts) ≤ 10 s on
2 CPU cores; measured figures are in benchmarks/README.md. ``--threads`` sets torch's intra-op threads
(default 2) for the from-scratch path and for models of SmolLM2's size; the explorer updates a small
model such as the tiny pool's (hidden size 128) on one thread (``MergeExplorer(single_threaded=...)``):
it gains nothing from a second thread, and on shared cores two threads wait on each other at every
operation. ``--pools`` takes pool names or pool directories. A pool that is not built is skipped with a message. ``--smollm2-stand-in DIR`` then
measures a stand-in of the same size instead, clearly labelled: SmolLM2-135M-Instruct as the base and
five experts = base + a seeded random task vector of 5% of each tensor's norm (untrained: the timings
are those of the SmolLM2 pool's sizes, the quality numbers mean nothing).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

import karcher_lab  # noqa: E402
from karcher_lab.widgets import MergeExplorer  # noqa: E402
from karcher_lab.zoo import PoolNotBuiltError, find_pool, load  # noqa: E402

TARGETS = {"tiny": 0.5, "smollm2": 10.0}
EVALUATION_STAGES = ("weights", "quality", "activations")


def weighted_sum_in_place(model: torch.nn.Module, states: list[dict], alpha: list[float]) -> None:
    """θ ← Σ α_i θ_i written into ``model``'s own parameters from the experts' tensors held in memory
    (the floor of any merge update); a tied head (absent from checkpoints) follows its embedding."""
    with torch.no_grad():
        for name, target in model.state_dict().items():
            if name not in states[0]:
                continue
            target.zero_()
            for a, state in zip(alpha, states):
                target.add_(state[name], alpha=a)


STAND_IN_TASKS = ("addition", "reverse", "sort", "uppercase", "caesar")
STAND_IN_SCALE = 0.05


def smollm2_stand_in(directory: Path):
    """A pool directory shaped like the SmolLM2 pool (base + 5 experts, pool.json), built once."""
    from karcher_lab.zoo import load_pool, model_path
    from karcher_lab.zoo.pool import POOL_FILE, write_record

    if (directory / POOL_FILE).is_file():
        return load_pool(directory)
    base_dir = model_path("smollm2")
    generator = torch.Generator().manual_seed(0)
    experts = []
    for task in STAND_IN_TASKS:
        model, tokenizer = load(str(base_dir))
        with torch.no_grad():
            for parameter in model.parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * (STAND_IN_SCALE * parameter.norm() / noise.norm()))
        model.save_pretrained(directory / "experts" / task)
        tokenizer.save_pretrained(directory / "experts" / task)
        experts.append(dict(task=task, path=f"experts/{task}", accuracy=float("nan"), base_accuracy=float("nan"),
                            nll=float("nan"), base_nll=float("nan"), level=0.0))
    record = dict(name="smollm2-stand-in", base=dict(path=str(base_dir)), experts=experts)
    directory.mkdir(parents=True, exist_ok=True)
    write_record(directory, record)
    return load_pool(directory)


def changes(explorer: MergeExplorer, members: list[int]):
    """The three kinds of update, each a function that moves one control."""
    state = {"w": 0, "eta": 0, "subset": 0}

    def weight():
        state["w"] += 1
        explorer.sliders[members[0]].value = 0.3 if state["w"] % 2 else 0.8

    def eta():
        state["eta"] += 1
        explorer.param_controls["eta"].value = 0.6 if state["eta"] % 2 else 1.0

    def subset():
        state["subset"] += 1
        explorer.checkboxes[members[-1]].value = not explorer.checkboxes[members[-1]].value

    return {"weight": weight, "eta": eta, "subset": subset}


def median(values):
    return statistics.median(values) if values else float("nan")


def run_pool(name: str, args) -> None:
    try:
        pool = find_pool(name)
    except PoolNotBuiltError as exc:
        print(f"\npool {name}: SKIPPED, not built ({exc})")
        if name != "smollm2" or args.smollm2_stand_in is None:
            return
        pool = smollm2_stand_in(args.smollm2_stand_in)
        print(f"measuring the SmolLM2-sized STAND-IN pool at {pool.path} instead (random task vectors, untrained)")
    members = list(range(min(args.experts, len(pool.experts))))
    selected = [pool.experts[i]["task"] for i in members]
    start = time.perf_counter()
    explorer = MergeExplorer(pool, selected=selected, quality_examples=args.quality_examples,
                             activation_examples=args.activation_examples, draws=args.draws,
                             exact_match=not args.no_exact_match, exact_match_mode=args.exact_match_mode,
                             initial_update=True)
    if explorer.error:
        raise SystemExit(f"the explorer failed on pool {name}: {explorer.error}")
    print(f"\npool {name}: {len(selected)} experts checked of {len(pool.experts)} ({', '.join(selected)}); "
          f"{sum(p.numel() for p in explorer.model.parameters()):,} parameters/model; panel built and first "
          f"update (Gram pass, expert-side caches) in {time.perf_counter() - start:.1f} s")
    exact = "off" if args.no_exact_match else args.exact_match_mode
    print(f"evaluation: {args.quality_examples} examples/task (exact match {exact}), "
          f"activations on {explorer.engine.data.probe_ids.shape[0]} probe sequences, {args.draws} bootstrap draws")

    paths = [e["path"] for e in pool.experts]
    rows, stage_times = [], {}
    for kind, change in changes(explorer, members).items():
        ours_merge, evaluation, totals, scratch, floor, first = [], [], [], [], [], []
        for _ in range(args.repeats):
            change()
            if not explorer.update():
                raise SystemExit(f"update failed: {explorer.error}")
            t = explorer.timings
            for stage, seconds in t.items():
                stage_times.setdefault(stage, []).append(seconds)
            ours_merge.append(t["merge"] + t["load"])
            evaluation.append(sum(t[s] for s in EVALUATION_STAGES))
            totals.append(t["total"])
            first.append(t["merge"] + t["load"] + t["weights"])
            request = explorer.request()
            chosen = [paths[i] for i in request["members"]]
            begin = time.perf_counter()
            state = karcher_lab.merge(chosen, "karcher", weights=request["alpha"], params=request["params"])
            fresh, _ = load(str(pool.base_path))
            fresh.load_state_dict(state, strict=False)
            scratch.append(time.perf_counter() - begin)
            held = [dict(explorer.engine.experts.state(explorer.tasks[i])) for i in request["members"]]  # not timed
            begin = time.perf_counter()
            weighted_sum_in_place(explorer.model, held, request["alpha"])
            floor.append(time.perf_counter() - begin)
            explorer.load_state(explorer.state)  # back to the merged model
        rows.append((kind, median(ours_merge), median(scratch), median(floor), median(evaluation), median(totals),
                     median(scratch) + median(evaluation), median(first), min(totals)))
    print(f"{'update':<8} {'ours merge':>11} {'scratch merge':>14} {'floor (sum)':>12} {'evaluation':>11} "
          f"{'ours full':>10} {'scratch+eval':>13} {'first figures':>14} {'best full':>10}   "
          f"(medians of {args.repeats}, seconds)")
    for kind, ours, scratch, floor, evaluation, total, scratch_total, first_figures, best in rows:
        print(f"{kind:<8} {ours:>11.3f} {scratch:>14.3f} {floor:>12.3f} {evaluation:>11.3f} {total:>10.3f} "
              f"{scratch_total:>13.3f} {first_figures:>14.3f} {best:>10.3f}")
    stages = {k: round(median(v), 3) for k, v in stage_times.items()}
    print(f"median by stage over all {len(stage_times['total'])} updates: {stages}")
    target = TARGETS.get(name)  # the stand-in has the SmolLM2 pool's sizes: same target
    if target is not None:
        worst = max(r[5] for r in rows)
        print(f"target: full update <= {target} s -> worst median {worst:.3f} s: {'met' if worst <= target else 'NOT met'}"
              f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the SmolLM2 target is for 2 cores)")
    parser.add_argument("--quality-examples", type=int, default=16)
    parser.add_argument("--activation-examples", type=int, default=4)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--smollm2-stand-in", type=Path, metavar="DIR",
                        help="when the smollm2 pool is not built, build (once) and measure a same-size stand-in here")
    parser.add_argument("--no-exact-match", action="store_true", help="no exact match (NLL and KL only)")
    parser.add_argument("--exact-match-mode", choices=["teacher_forced", "greedy"], default="teacher_forced",
                        help="exact match from the teacher-forced pass (default) or by greedy decoding")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    for name in args.pools:
        run_pool(name, args)


if __name__ == "__main__":
    main()
