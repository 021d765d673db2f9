#!/usr/bin/env python3
"""LoRA merging on the zoo's LoRA experts: the analog of the GeoMerge paper's Table 1.

    .venv/bin/python benchmarks/lora_table.py [--pool tiny-lora] [--sizes 2 3 5] [--per-task 64] \
        [--density 0.5] [--out results/lora_table.csv]

For each pool (``--pool`` may be repeated: ``tiny-lora``, ``smollm2`` or a pool directory whose
pool.json lists an ``adapter`` per expert) and each merge size m in ``--sizes``, the pool's first m
experts (pool order) are merged, adapter by adapter, with every method of ``--methods``:

- ``geomerge``: the quotient Fréchet mean (rank r), by the batched solver that ``merge_lora`` uses
  (:func:`karcher_lab.methods.lora.geomerge_modules`; ``--workers`` processes share its modules); unless
  ``--no-sequential``, the same modules are merged again by the sequential solver
  (:func:`karcher_lab.methods.lora.geomerge.geomerge_factors`, one module after the other, one process),
  and both wall times, the speed-up and the largest relative ΔW difference are printed and stored
  (summary rows ``merge_seconds_sequential`` and ``sequential_max_rel_diff``);
- ``knots_ta`` and ``knots_ties`` (KnOTS joint-SVD alignment, then TA / TIES on the aligned coefficients);
- ``task_arithmetic`` (the mean of the ΔW_i; identical to knots_ta by construction) and
  ``task_arithmetic_sum`` (λ = 1, weights 1: Σ ΔW_i, Ilharco et al.'s plain sum);
- ``ties`` on the dense ΔW_i; ``peft_svd`` (peft's SVD of the mean ΔW truncated to rank r: the same rank
  as geomerge) and ``peft_linear`` (peft's factor averaging, rank r).

Weights are 1/m (the mean) unless a method's name says otherwise; TIES-type methods use
``--density`` (not tuned). Each merged update is folded into the base model in memory (W + ΔW) and
scored with :func:`karcher_lab.diagnostics.task_quality` (greedy exact match and answer NLL on
``--per-task`` held-out examples of each merged task, the same examples for every model); the
normalized accuracy is merged / expert accuracy on the expert's task (the paper's metric,
:func:`karcher_lab.diagnostics.normalized_accuracy`), the expert being its own adapter folded into the
base. The rank of each merged update is its numerical rank in float64 (σ_k > 1e-6 σ_1,
:func:`karcher_lab.diagnostics.numerical_rank`), averaged over the adapted modules.

The table is printed and written to ``--out`` in the sweep's tidy format
(:data:`karcher_lab.experiment.RESULT_COLUMNS`; order = "first-m"): scope ``task`` rows (accuracy,
nll, normalized_accuracy), scope ``weights`` rows (merged_rank, stored_rank: mean ± std over
modules) and scope ``summary`` rows (avg_normalized_accuracy, avg_accuracy, avg_nll, merge_seconds). A
method that raises on some module (e.g. geomerge's Stiefel log on nearly orthogonal adapter subspaces) gets
a ``merge_failed`` summary row and is listed with its error. Everything is seeded; nothing is tuned.

Resumable: every finished cell (each expert's own scores, then each (m, method)) is stored at once in
the run directory ``<out stem>.run/`` beside ``--out`` by the sweep's
:class:`karcher_lab.experiment.results.ResultStore` (one atomic file per cell, and the measurement
settings, which a resumed run must repeat); a later run with the same ``--out`` skips the cells found
there (``--fresh`` starts over). The final table is written to ``--out`` atomically and the run
directory removed. A long run (the SmolLM2 pool: 210 modules of 576–1536 dimensions per geomerge
merge) thus loses at most the cell it was in when stopped.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from karcher_lab.diagnostics import normalized_accuracy, numerical_rank, task_quality  # noqa: E402
from karcher_lab.errors import InputError, KarcherLabError  # noqa: E402
from karcher_lab.experiment import RESULT_COLUMNS  # noqa: E402
from karcher_lab.experiment.results import ResultStore, cell_key  # noqa: E402
from karcher_lab.io.lora import fold_into_state, read_adapter  # noqa: E402
from karcher_lab.methods.lora.geomerge import geomerge_factors  # noqa: E402
from karcher_lab.pipeline.lora import merge_lora  # noqa: E402
from karcher_lab.zoo import find_pool, get_task, load  # noqa: E402

METHODS = ("geomerge", "knots_ta", "knots_ties", "task_arithmetic", "task_arithmetic_sum", "ties", "peft_svd",
           "peft_linear")
RANK_RTOL = 1e-6
FAILURES: list[str] = []
ORDER = "first-m"


def method_call(label: str, m: int, density: float) -> tuple[str, dict]:
    """(registered LoRA method, keyword arguments) for a table row label."""
    if label == "task_arithmetic_sum":
        return "task_arithmetic", {"weights": [1.0] * m}
    if label in ("ties", "knots_ties"):
        return label, {"density": density}
    return label, {}


def lora_experts(pool) -> list[dict]:
    """The pool's experts, each with an ``adapter`` directory (InputError if the pool has none)."""
    missing = [e["task"] for e in pool.experts if not e.get("adapter")]
    if missing:
        raise InputError(f"pool {pool.name} ({pool.path}) has no LoRA adapter for {missing}: "
                         "give a LoRA pool (tiny-lora, smollm2)")
    return [dict(e, adapter=str(Path(pool.path) / e["adapter"])) for e in pool.experts]


def rank_rows(result) -> list[tuple[str, float, float]]:
    ranks = [numerical_rank(g.double() @ h.double().T, rtol=RANK_RTOL) for g, h in result.factors.values()]
    stored = list(result.ranks.values())
    return [("merged_rank", statistics.mean(ranks), statistics.pstdev(ranks)),
            ("stored_rank", statistics.mean(stored), statistics.pstdev(stored))]


def stored_cell(store: ResultStore, key: str, label: str, compute) -> pd.DataFrame:
    """The rows of one cell: read back if an earlier run finished it, else ``compute()``d and stored."""
    if not store.has(key):
        store.write(key, pd.DataFrame(compute(), columns=RESULT_COLUMNS))
    else:
        print(f"{label:<30} (finished in an earlier run: {store.cells_dir})", flush=True)
    return store.read(key)


def sequential_geomerge(adapters: list, result) -> tuple[float, float]:
    """(seconds, largest relative ΔW difference from ``result``): geomerge of the same modules by the
    sequential solver, one module after the other, in this process."""
    start = time.perf_counter()
    worst = 0.0
    for name, (g, h) in result.factors.items():
        gs, hs = geomerge_factors([a.modules[name].factors() for a in adapters])
        reference = gs.double() @ hs.double().T
        worst = max(worst, float((g.double() @ h.double().T - reference).norm() / reference.norm()))
    return time.perf_counter() - start, worst


def table_for_pool(pool_name: str, sizes: list[int], methods: list[str], per_task: int, density: float,
                   batch_size: int, store: ResultStore, workers: int, sequential: bool = True) -> pd.DataFrame:
    pool = find_pool(pool_name)
    experts = lora_experts(pool)
    model, tokenizer = load(str(pool.base_path))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = {e["task"]: read_adapter(e["adapter"], label=e["task"]) for e in experts}
    examples = {e["task"]: get_task(e["task"]).examples("eval", per_task, seed=0) for e in experts}
    sizes = [m for m in sizes if m <= len(experts)]
    used = [e["task"] for e in experts[: max(sizes)]]

    def score(state, tasks, name):
        model.load_state_dict(state)
        return task_quality(model, tokenizer, {t: examples[t] for t in tasks}, model_name=name, batch_size=batch_size)

    def expert_rows(task: str) -> list[dict]:
        own = score(fold_into_state(base_state, adapters[task].factors()), [task], f"expert:{task}")
        return [dict(pool=pool.name, order="", method="expert", m=1, experts=task, scope="task", task=task, site="",
                     layer=-1, metric=r.metric, mean=r.mean, std=r.std)
                for r in own.itertuples() if r.metric in ("accuracy", "nll")]

    def merged_rows(m: int, label: str, own: pd.DataFrame) -> list[dict]:
        tasks = used[:m]
        method, kwargs = method_call(label, m, density)
        start = time.perf_counter()
        cell = dict(pool=pool.name, order=ORDER, method=label, m=m, experts="+".join(tasks))
        try:
            result = merge_lora([adapters[t] for t in tasks], method, **kwargs,
                                workers=workers if method == "geomerge" else 1)  # the others take < 1 s/module
        except KarcherLabError as error:  # a method that cannot merge these adapters is a result too
            FAILURES.append(f"{pool.name} m={m} {label}: {type(error).__name__}: {error}")
            print(f"{pool.name} m={m} {label:<20} FAILED: {FAILURES[-1]}", flush=True)
            return [dict(cell, scope="summary", task="", site="", layer=-1, metric="merge_failed", mean=1.0,
                         std=float("nan"))]
        seconds = time.perf_counter() - start
        quality = score(fold_into_state(base_state, result.factors, result.like.fan_in_fan_out), tasks, label)
        normalized = normalized_accuracy(quality, own[own.task.isin(tasks)])
        frame = pd.concat([quality[quality.metric.isin(["accuracy", "nll"])], normalized])
        rows = [dict(cell, scope="task", task=r.task, site="", layer=-1, metric=r.metric, mean=r.mean, std=r.std)
                for r in frame.itertuples()]
        rows += [dict(cell, scope="weights", task="", site="", layer=-1, metric=k, mean=v, std=s)
                 for k, v, s in rank_rows(result)]
        summary = {"avg_normalized_accuracy": normalized["mean"].mean(),
                   "avg_accuracy": quality[quality.metric == "accuracy"]["mean"].mean(),
                   "avg_nll": quality[quality.metric == "nll"]["mean"].mean(), "merge_seconds": seconds}
        if method == "geomerge" and sequential:
            sequential_seconds, difference = sequential_geomerge([adapters[t] for t in tasks], result)
            summary.update(merge_seconds_sequential=sequential_seconds, sequential_max_rel_diff=difference)
            print(f"{pool.name} m={m} {label:<20} sequential solver {sequential_seconds:.1f} s, batched {seconds:.1f} s "
                  f"({workers} worker(s)): speed-up {sequential_seconds / seconds:.1f}x; largest relative ΔW "
                  f"difference {difference:.1e}", flush=True)
        rows += [dict(cell, scope="summary", task="", site="", layer=-1, metric=k, mean=v, std=float("nan"))
                 for k, v in summary.items()]
        print(f"{pool.name} m={m} {label:<20} avg normalized accuracy {summary['avg_normalized_accuracy']:.3f}  "
              f"merge {seconds:.1f} s", flush=True)
        return rows

    own = pd.concat([stored_cell(store, f"{pool.name}__{cell_key('', 'expert', 1, t)}", f"{pool.name} expert {t}",
                                 lambda t=t: expert_rows(t)) for t in used], ignore_index=True)
    frames = [own]
    for m in sizes:
        for label in methods:
            key = f"{pool.name}__{cell_key(ORDER, label, m, '+'.join(used[:m]))}"
            frames.append(stored_cell(store, key, f"{pool.name} m={m} {label}", lambda: merged_rows(m, label, own)))
    return pd.concat(frames, ignore_index=True)


def print_table(table: pd.DataFrame) -> None:
    """One block per (pool, m): methods × tasks normalized accuracy, the average, and the mean rank."""
    pd.set_option("display.width", 220)
    experts = table[table.method == "expert"]
    for pool_name in table.pool.unique():
        own = experts[(experts.pool == pool_name) & (experts.metric == "accuracy")].set_index("task")["mean"]
        print(f"\n{pool_name}: expert accuracy on its own task: "
              + ", ".join(f"{t} {100 * a:.1f}%" for t, a in own.items()))
        merged = table[(table.pool == pool_name) & (table.method != "expert")]
        for m in sorted(merged.m.unique()):
            block = merged[merged.m == m]
            norm = block[(block.scope == "task") & (block.metric == "normalized_accuracy")]
            view = norm.pivot_table(index="method", columns="task", values="mean", sort=False) * 100
            view = view[[t for t in block.experts.iloc[0].split("+") if t in view.columns]]
            summary = block[block.scope == "summary"].pivot_table(index="method", columns="metric", values="mean",
                                                                  sort=False)
            ranks = block[block.scope == "weights"].pivot_table(index="method", columns="metric", values="mean",
                                                                sort=False)
            view["avg"] = summary["avg_normalized_accuracy"] * 100
            view["avg NLL"] = summary["avg_nll"]
            view["rank"] = ranks["merged_rank"]
            print(f"\nm = {m} ({block.experts.iloc[0]}): normalized accuracy (%) = merged / expert exact match; "
                  "rank = mean numerical rank of the merged ΔW")
            print(view.round(2).to_string())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", action="append", help="LoRA pool name or directory (repeatable; default tiny-lora)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--per-task", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.5, help="TIES / KnOTS-TIES density (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="processes merging modules in parallel (merge_lora)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "lora_table.csv")
    parser.add_argument("--fresh", action="store_true", help="discard the cells an earlier, stopped run finished")
    parser.add_argument("--no-sequential", action="store_true",
                        help="skip the sequential geomerge solver (its comparison with the batched one)")
    args = parser.parse_args()
    run_dir = args.out.with_name(f"{args.out.stem}.run")
    if args.fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    store = ResultStore(run_dir)
    store.check_config({"per_task": args.per_task, "density": args.density, "threads": args.threads})
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    table = pd.concat([table_for_pool(p, args.sizes, args.methods, args.per_task, args.density, args.batch_size,
                                      store, args.workers, not args.no_sequential)
                       for p in args.pool or ["tiny-lora"]], ignore_index=True)
    print_table(table)
    if FAILURES:
        print("\nmerges that failed (no row above):\n" + "\n".join(FAILURES))
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(args.out)
    shutil.rmtree(run_dir)
    print(f"\nwrote {len(table)} rows to {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
