#!/usr/bin/env python3
"""Collapse of linear versus karcher merges of the tiny zoo's farthest experts, with every diagnostic.

    .venv/bin/python benchmarks/zoo_collapse.py [--pool tiny] [--experts 5] [--per-task 32] [--draws 100]

The ``--experts`` experts with the highest heterogeneity level (the farthest from the base: the most
fine-tuning steps at the highest rate, see karcher_lab/zoo/config.py) are merged with equal weights by
``linear`` and by ``karcher`` (defaults: whole-tensor blocks, converged), and by ``karcher`` with the
Fisher preconditioning of §3.4 (its ``fisher`` option, see :mod:`karcher_lab.methods.karcher`: each
expert's diagonal Fisher, labels sampled from the model, on ``--fisher-examples`` training examples of
its own task). The probe set is
``--per-task`` held-out examples of each merged task, as ``<s> prompt answer`` text. Reported:

- collapse ratios per site and layer, r = m_merged / mean_i m_i for activation variance, effective rank
  and numerical rank, bootstrap mean ± std over ``--draws`` paired draws (below 1 = collapse);
- per task: exact match and answer NLL of each merge, normalized accuracy (merged / expert),
  KL(p_expert ‖ p_merged) and the Fisher–Rao distance on the expert's task;
- weights: the mean norm ratio ‖merged‖ / mean ‖expert‖ and the mean angle between experts.

Everything is seeded; nothing is tuned. ``--json PATH`` writes all tables, ``--html PATH`` the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import karcher_lab  # noqa: E402
from karcher_lab import plots  # noqa: E402
from karcher_lab.diagnostics import capture_activations, collapse_ratios, diagonal_fisher, encode_probes  # noqa: E402
from karcher_lab.diagnostics.function import function_distance, normalized_accuracy, task_quality  # noqa: E402
from karcher_lab.diagnostics.weights import expert_angles, weight_metrics  # noqa: E402
from karcher_lab.io import Checkpoint  # noqa: E402
from karcher_lab.zoo import find_pool, get_task  # noqa: E402
from karcher_lab.zoo.load import load  # noqa: E402

METHODS = ("linear", "karcher")
SITES = ("residual", "attention", "mlp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", default="tiny")
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--per-task", type=int, default=32)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fisher-examples", type=int, default=64,
                        help="also merge with karcher preconditioned by each expert's diagonal Fisher on this many "
                             "training examples of its task (0: skip)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--html", type=Path, help="write the figures (karcher_lab.plots) to this HTML file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()

    pool = find_pool(args.pool)
    chosen = sorted(pool.experts, key=lambda e: -e["level"])[: args.experts]
    tasks = [e["task"] for e in chosen]
    paths = [e["path"] for e in chosen]
    print(f"pool {pool.name}: merging {len(tasks)} far experts {tasks} "
          f"(levels {[round(e['level'], 2) for e in chosen]})")

    experts = {}
    for task, path in zip(tasks, paths):
        experts[task], tokenizer = load(path)
    base, _ = load(str(pool.base_path))
    merged = {}
    for method in METHODS:
        merged[method] = with_state(pool, karcher_lab.merge(paths, method))
    if args.fisher_examples:
        fishers = {t: diagonal_fisher(experts[t], tokenizer, get_task(t).examples("train", args.fisher_examples, seed=0))
                   for t in tasks}
        model_params = [{"fisher": fishers[t]} for t in tasks]
        merged["karcher+fisher"] = with_state(pool, karcher_lab.merge(paths, "karcher", model_params=model_params))

    examples = {t: get_task(t).examples("eval", args.per_task, seed=0) for t in tasks}
    texts = [e.prompt + e.answer for t in tasks for e in examples[t]]
    ids, mask = encode_probes(tokenizer, texts)
    capture = dict(sites=SITES, batch_size=64)
    expert_stats = {t: capture_activations(m, ids, mask, **capture) for t, m in experts.items()}
    ratios = pd.concat([
        collapse_ratios(capture_activations(merged[m], ids, mask, **capture), expert_stats, model=m, draws=args.draws)
        for m in merged
    ])

    quality = pd.concat([task_quality(m, tokenizer, examples, model_name=name) for name, m in merged.items()])
    own = pd.concat([task_quality(experts[t], tokenizer, {t: examples[t]}, model_name=f"expert:{t}") for t in tasks])
    normalized = normalized_accuracy(quality, own)
    distance = pd.concat([
        function_distance(experts[t], merged[m], tokenizer, {t: examples[t]}, reference_name=t, model_name=m)
        for m in merged for t in tasks
    ])
    sources, base_source = [Checkpoint(p) for p in paths], Checkpoint(pool.base_path)
    weights = pd.concat([weight_metrics(merged[m], sources, base=base_source, merged_name=m, names=tasks) for m in merged])
    angles = expert_angles(sources, base=base_source, names=tasks)

    pd.set_option("display.width", 200)
    print(f"\nprobes: {ids.shape[0]} sequences, {int(mask.sum())} tokens; bootstrap {args.draws} draws over "
          f"{expert_stats[tasks[0]].num_groups} groups")
    print("\ncollapse ratios (merged / mean of experts; mean ± std over draws, point = full probe set)")
    table = ratios.assign(value=[f"{m:.3f} ± {s:.3f}" for m, s in zip(ratios["mean"], ratios["std"])])
    print(table.pivot_table(index=["site", "layer", "metric"], columns="model", values="value", aggfunc="first").to_string())
    print("\nper task (accuracy = exact match; normalized = merged / expert accuracy)")
    q = pd.concat([quality, own.assign(model="expert"), normalized])
    print(q.pivot_table(index=["task"], columns=["metric", "model"], values="mean").round(3).to_string())
    print("\nfunction distance to each expert on its own task")
    print(distance.pivot_table(index="task", columns=["metric", "model"], values="mean").round(4).to_string())
    print("\nweights (mean over tensors)")
    print(weights[weights["other"].isna()].pivot_table(index="metric", columns="model", values="mean").round(4).to_string())
    print(angles.groupby("metric")["mean"].agg(["mean", "min", "max"]).round(2).to_string())

    if args.html:
        figures = [plots.layer_curves(ratios, site=None, title="collapse ratios (merged / mean of experts)"),
                   plots.task_bars(q, "nll", title="answer NLL per task"),
                   plots.task_bars(distance, "kl", title="KL(expert || merged)"),
                   plots.angle_heatmaps(angles, "task_vector_angle_deg", title="angles between task vectors")]
        args.html.write_text("\n".join(f.to_html(full_html=False, include_plotlyjs=i == 0) for i, f in enumerate(figures)))
    if args.json:
        args.json.write_text(json.dumps(dict(
            tasks=tasks, ratios=ratios.to_dict(orient="records"), quality=q.to_dict(orient="records"),
            distance=distance.to_dict(orient="records"),
        ), indent=1, default=str))


def with_state(pool, state: dict[str, torch.Tensor]):
    """A copy of the pool's base model carrying ``state``."""
    model, _ = load(str(pool.base_path))
    model.load_state_dict(state)
    return model.eval()


if __name__ == "__main__":
    main()
