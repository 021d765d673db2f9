"""Building a pool: pretrain a base on the union of the tasks' text, fine-tune one expert per task.

1. Base: a fresh ``LlamaForCausalLM`` (architecture from the config's size) trained with the full
   next-token loss on a mixture of every task's training text: ``pretrain_examples_per_task`` examples
   of each synthetic task, and as many text-task snippets as make ``pretrain_text_share`` of the mix.
2. Experts: one per task, each a copy of the base fine-tuned on its own task's training examples with
   the loss on the answer only, for the steps and rate of its heterogeneity level (config.py). Experts
   train in parallel worker processes, each single-threaded, so the result does not depend on the
   number of workers.
3. Scores: the base on every task and each expert on its own task (exact match and answer NLL on
   ``eval_examples`` held-out examples), and the task-vector conflict record (conflicts.py).

Everything is seeded and runs with deterministic algorithms on a fixed thread count, so the same code
and config give the same weights. Models are plain Hugging Face directories (config.json,
model.safetensors, tokenizer files); ``pool.json`` beside them holds the config, the expert-vs-base
table and the conflict record. The pool is written to a hidden temporary sibling and renamed into place
only when complete (karcher_lab/io/output.py), so an interrupted build leaves no half pool.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from karcher_lab.diagnostics.sequences import encode
from karcher_lab.errors import NotSupportedError, OutputError
from karcher_lab.io.output import atomic_directory
from karcher_lab.zoo.cache import build_key, pool_dir
from karcher_lab.zoo.catalog import get_task
from karcher_lab.zoo.config import ExpertRecipe, ZooConfig
from karcher_lab.zoo.conflicts import conflict_record, task_vectors
from karcher_lab.zoo.evaluate import evaluate
from karcher_lab.zoo.pool import POOL_FILE, Pool, load_pool, write_record
from karcher_lab.zoo.tokenizer import char_tokenizer
from karcher_lab.zoo.train import deterministic, train_causal_lm

BASE_DIR, EXPERTS_DIR = "base", "experts"


def new_base_model(config: ZooConfig, tokenizer):
    """A freshly initialised (seeded) Llama causal LM of the config's size, for ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=config.max_positions,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def pretraining_examples(config: ZooConfig):
    """The base's training mix: synthetic examples, plus text snippets making ``pretrain_text_share``."""
    tasks = [get_task(name) for name in config.tasks]
    synthetic = [t for t in tasks if t.domain == "synthetic"]
    text = [t for t in tasks if t.domain == "text"]
    share = config.pretrain_text_share
    per_text = round(share / (1 - share) * config.pretrain_examples_per_task * len(synthetic) / len(text)) \
        if text and synthetic else config.pretrain_examples_per_task
    out = []
    for task in tasks:
        n = config.pretrain_examples_per_task if task.domain == "synthetic" else per_text
        out += task.examples("train", n, seed=config.seed + 1)
    return out


def _train_expert(job: dict) -> dict:
    """Fine-tune one expert from the saved base, score it on its task, save it (runs in a worker)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    recipe = ExpertRecipe(**job["recipe"])
    with deterministic(job["threads"]):
        tokenizer = AutoTokenizer.from_pretrained(job["base_dir"])
        model = LlamaForCausalLM.from_pretrained(job["base_dir"], dtype=torch.float32)
        task = get_task(recipe.task)
        items = encode(tokenizer, task.examples("train", job["n_train"], seed=job["seed"]))
        start = time.perf_counter()
        losses = train_causal_lm(model, items, steps=recipe.steps, lr=recipe.lr, batch_size=job["batch_size"],
                                 seed=recipe.seed, pad_id=tokenizer.pad_token_id, answer_only=True)
        seconds = time.perf_counter() - start
        scores = evaluate(model, tokenizer, task.examples("eval", job["n_eval"], seed=job["seed"]))
        model.save_pretrained(job["out_dir"])
        tokenizer.save_pretrained(job["out_dir"])
    return {"task": recipe.task, **scores, "final_loss": losses[-1], "train_seconds": seconds}


def build_pool(config: ZooConfig | None = None, cache_dir=None, *, workers: int | None = None,
               progress: bool = True, force: bool = False) -> Pool:
    """Build (or reuse from the cache) the pool of ``config`` (default: the tiny pool)."""
    config = config or ZooConfig()
    target = pool_dir(config.to_dict(), cache_dir)
    if (target / POOL_FILE).is_file() and not force:
        return load_pool(target)
    if multiprocessing.parent_process() is not None:
        raise NotSupportedError(
            "build_pool was called inside one of its own worker processes: a script that builds a pool must "
            "call it under `if __name__ == \"__main__\":` (worker processes re-import the main module)"
        )
    workers = workers or max(1, min(len(config.tasks), (os.cpu_count() or 1) // config.threads))
    try:
        with atomic_directory(target, overwrite=force) as work:
            _build_into(work, config, workers, progress)
    except OutputError:  # another process finished the same pool first: use it
        if not (target / POOL_FILE).is_file():
            raise
    return load_pool(target)


def _build_into(work: Path, config: ZooConfig, workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    recipes = config.expert_recipes()
    started = time.perf_counter()
    bar = tqdm(total=config.pretrain_steps + sum(r.steps for r in recipes), unit="step",
               desc=f"zoo {config.size}: base", disable=not progress)
    with deterministic(config.threads):
        tokenizer = char_tokenizer()
        base = new_base_model(config, tokenizer)
        train_causal_lm(base, encode(tokenizer, pretraining_examples(config)), steps=config.pretrain_steps,
                        lr=config.pretrain_lr, batch_size=config.batch_size, seed=config.seed,
                        pad_id=tokenizer.pad_token_id, answer_only=False, weight_decay=0.01,
                        on_step=lambda _: bar.update(1))
        base.save_pretrained(work / BASE_DIR)
        tokenizer.save_pretrained(work / BASE_DIR)
    jobs = [{"recipe": asdict(r), "base_dir": str(work / BASE_DIR), "out_dir": str(work / EXPERTS_DIR / r.task),
             "threads": config.threads, "seed": config.seed, "n_train": config.finetune_examples,
             "n_eval": config.eval_examples, "batch_size": config.batch_size} for r in recipes]
    bar.set_description(f"zoo {config.size}: experts")
    results = {}
    with multiprocessing.get_context("spawn").Pool(workers) as procs:
        pending = procs.imap_unordered(_train_expert, jobs)
        with deterministic(config.threads):
            base_scores = {name: evaluate(base, tokenizer, get_task(name).examples("eval", config.eval_examples,
                                                                                   seed=config.seed))
                           for name in config.tasks}
        for result in pending:
            results[result["task"]] = result
            bar.update(next(r.steps for r in recipes if r.task == result["task"]))
            bar.set_postfix(done=result["task"])
    bar.close()
    write_record(work, _record(config, work, recipes, base, base_scores, results, time.perf_counter() - started))


def _record(config, work: Path, recipes, base, base_scores, results, seconds) -> dict:
    from safetensors.torch import load_file

    base_state = {k: v.detach() for k, v in base.state_dict().items()}
    expert_states = [load_file(work / EXPERTS_DIR / r.task / "model.safetensors") for r in recipes]
    conflicts = conflict_record(list(config.tasks), task_vectors(base_state, expert_states))
    experts = []
    for r in recipes:
        res = results[r.task]
        experts.append({
            "task": r.task, "path": f"{EXPERTS_DIR}/{r.task}",
            "accuracy": res["accuracy"], "base_accuracy": base_scores[r.task]["accuracy"],
            "nll": res["nll"], "base_nll": base_scores[r.task]["nll"],
            "level": r.level, "steps": r.steps, "lr": r.lr,
            "task_vector_norm": conflicts["task_vector_norm"][r.task],
            "final_train_loss": res["final_loss"], "train_seconds": res["train_seconds"],
            "domain": get_task(r.task).domain, "description": get_task(r.task).description,
        })
    return {
        "name": config.size, "key": build_key(config.to_dict()), "config": config.to_dict(),
        "base": {"path": BASE_DIR, "parameters": sum(p.numel() for p in base.parameters()), "tasks": base_scores},
        "experts": experts, "conflicts": conflicts, "build_seconds": seconds,
    }
