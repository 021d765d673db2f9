"""LoRA experts: low-rank fine-tunes (peft) of a pool's base or of SmolLM2-135M-Instruct, one per task.

Recipe (Hu et al. 2021, LoRA, eq. 3): every targeted linear map W (d_out × d_in) of the base becomes

    W + (α/r) B A,   A ∈ ℝ^{r × d_in} (Kaiming-uniform, seeded),   B ∈ ℝ^{d_out × r} (zeros),

and only A and B train. The targets are the attention and MLP projections (q, k, v, o, gate, up, down).
Training is the zoo's loop (:func:`karcher_lab.zoo.train.train_causal_lm`: AdamW, warm-up then cosine,
gradient clipping) on the task's training split with the loss on the answer only. Sequences are the
zoo's plain text ``<prompt><answer><eos>`` with ``<prompt> = "tag:input="``
(:mod:`karcher_lab.zoo.tasks`), through the base's own tokenizer and without a chat template (SmolLM2's
tokenizer adds no ``<s>``, so its sequences are ``tag:input=answer<|im_end|>``). The recipe, its
defaults and the pool's cache directory are :mod:`karcher_lab.zoo.lora_config`'s.

For every task the pool directory holds

- ``adapters/<task>/``: the PEFT adapter (adapter_config.json + adapter_model.safetensors), loadable
  by ``peft.PeftModel.from_pretrained(base, dir)``;
- ``experts/<task>/``: the adapter folded into the base (``merge_and_unload``: W + (α/r) B A), saved
  as an ordinary Hugging Face directory (config, safetensors, tokenizer; tied embeddings stay tied);

and ``pool.json`` has the shape of the zoo pools' (:mod:`karcher_lab.zoo.pool`): the base's path
(relative to the pool directory, as the base lives outside it) and its scores on every task, and per
expert its scores (exact match and answer NLL of the folded expert on held-out examples,
:func:`karcher_lab.zoo.evaluate.evaluate`) next to the base's, plus ``adapter``, ``rank``, ``alpha``
and the training time. The record also holds wall and CPU seconds (per expert and in total), the
number of workers and threads, and the load average at the end.

Experts train in parallel worker processes, each on ``config.threads`` threads (default one), under
:func:`karcher_lab.zoo.train.deterministic`: the adapters do not depend on the number of workers, and
the same inputs give the same adapters on CPU.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import torch

from karcher_lab.diagnostics.sequences import encode
from karcher_lab.errors import NotSupportedError, OutputError
from karcher_lab.io.output import atomic_directory
from karcher_lab.zoo.catalog import get_task
from karcher_lab.zoo.evaluate import evaluate
from karcher_lab.zoo.lora_config import LoraBase, LoraPoolConfig, lora_config_for, lora_pool_dir, resolve_base
from karcher_lab.zoo.pool import POOL_FILE, Pool, load_pool, write_record
from karcher_lab.zoo.smollm2 import SMOLLM2, build_smollm2
from karcher_lab.zoo.train import deterministic, train_causal_lm

ADAPTERS_DIR, EXPERTS_DIR = "adapters", "experts"


def build_lora_pool(config: LoraPoolConfig | None = None, cache_dir=None, *, workers: int | None = None,
                    progress: bool = True, force: bool = False) -> Pool:
    """Build (or reuse from the cache) the LoRA pool of ``config`` (default: the tiny pool's base).

    Parameters
    ----------
    config : LoraPoolConfig, optional
        The recipe (:func:`karcher_lab.zoo.lora_config.lora_config_for`).
    cache_dir : path, optional
        The cache root (:func:`karcher_lab.zoo.cache.cache_root`).
    workers : int, optional
        Processes training experts in parallel (default: one per ``config.threads`` cores, at most one
        per task).
    progress : bool
        Show a progress bar.
    force : bool
        Rebuild even if the pool is cached.

    Returns
    -------
    Pool
        The built pool (:mod:`karcher_lab.zoo.pool`). Raises PoolNotBuiltError when the base is a zoo
        pool that is not built, ParameterError for an unknown base, NotSupportedError inside a worker.
    """
    config = config or lora_config_for("tiny")
    base = resolve_base(config.base, cache_dir)
    target = lora_pool_dir(config, cache_dir, base=base)
    if (target / POOL_FILE).is_file() and not force:
        return load_pool(target)
    if config.base == SMOLLM2:
        build_smollm2(cache_dir)
    if multiprocessing.parent_process() is not None:
        raise NotSupportedError("build_lora_pool was called inside a worker process: a script that builds a pool "
                                "must call it under `if __name__ == \"__main__\":`")
    workers = workers or max(1, min(len(config.tasks), (os.cpu_count() or 1) // config.threads))
    try:
        with atomic_directory(target, overwrite=force) as work:
            _build_into(work, target, config, base, workers, progress)
    except OutputError:  # another process finished the same pool first: use it
        if not (target / POOL_FILE).is_file():
            raise
    return load_pool(target)


def _load_base(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def peft_lora_config(config: LoraPoolConfig):
    """The peft ``LoraConfig`` of the recipe: rank r, α, the targets, no dropout, no bias."""
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def train_lora_expert(config: LoraPoolConfig, base_path: Path, task_name: str, seed: int, adapter_dir: Path,
                      expert_dir: Path, on_step=None) -> dict:
    """Fine-tune a LoRA adapter on one task, save it and its folded checkpoint, score the folded expert."""
    from peft import get_peft_model

    model, tokenizer = _load_base(base_path)
    task = get_task(task_name)
    torch.manual_seed(seed)  # the initialisation of A
    lora_model = get_peft_model(model, peft_lora_config(config))
    items = encode(tokenizer, task.examples("train", config.train_examples, seed=config.seed))
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = train_causal_lm(lora_model, items, steps=config.steps, lr=config.lr, batch_size=config.batch_size,
                             seed=seed, pad_id=tokenizer.pad_token_id, answer_only=True, on_step=on_step)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    lora_model.save_pretrained(adapter_dir)
    folded = lora_model.merge_and_unload()
    folded.save_pretrained(expert_dir)
    tokenizer.save_pretrained(expert_dir)
    scores = evaluate(folded, tokenizer, task.examples("eval", config.eval_examples, seed=config.seed))
    return {**scores, "final_train_loss": losses[-1], "train_seconds": seconds, "train_cpu_seconds": cpu_seconds}


def _train_job(job: dict) -> dict:
    """One expert in a worker process: :func:`train_lora_expert` under the deterministic settings."""
    config = LoraPoolConfig(**{**job["config"], "tasks": tuple(job["config"]["tasks"]),
                               "target_modules": tuple(job["config"]["target_modules"])})
    cpu_start = time.process_time()
    with deterministic(config.threads):
        result = train_lora_expert(config, Path(job["base"]), job["task"], job["seed"], Path(job["adapter"]),
                                   Path(job["expert"]))
    return {"task": job["task"], **result, "job_cpu_seconds": time.process_time() - cpu_start}


def _build_into(work: Path, target: Path, config: LoraPoolConfig, base: LoraBase, workers: int,
                progress: bool) -> None:
    from tqdm.auto import tqdm

    started, cpu_started = time.perf_counter(), time.process_time()
    seeds = {name: config.seed * 1000 + i + 1 for i, name in enumerate(config.tasks)}
    jobs = [{"config": config.to_dict(), "base": str(base.path), "task": name, "seed": seeds[name],
             "adapter": str(work / ADAPTERS_DIR / name), "expert": str(work / EXPERTS_DIR / name)}
            for name in config.tasks]
    bar = tqdm(total=len(jobs), unit="expert", desc=f"{base.pool_name}: LoRA experts", disable=not progress)
    results = {}
    with multiprocessing.get_context("spawn").Pool(workers) as procs:
        pending = procs.imap_unordered(_train_job, jobs)
        with deterministic(config.threads):
            model, tokenizer = _load_base(base.path)
            base_scores = {name: evaluate(model, tokenizer, get_task(name).examples("eval", config.eval_examples,
                                                                                    seed=config.seed))
                           for name in config.tasks}
            parameters = sum(p.numel() for p in model.parameters())
            del model
        for result in pending:
            results[result["task"]] = result
            bar.update(1)
            bar.set_postfix(done=result["task"])
    bar.close()
    experts = []
    for name in config.tasks:
        result, seed = results[name], seeds[name]
        experts.append({
            "task": name, "path": f"{EXPERTS_DIR}/{name}", "adapter": f"{ADAPTERS_DIR}/{name}",
            "accuracy": result["accuracy"], "base_accuracy": base_scores[name]["accuracy"],
            "nll": result["nll"], "base_nll": base_scores[name]["nll"],
            "rank": config.rank, "alpha": config.alpha, "steps": config.steps, "lr": config.lr, "seed": seed,
            "level": 0.0, "final_train_loss": result["final_train_loss"],
            "train_seconds": result["train_seconds"], "train_cpu_seconds": result["train_cpu_seconds"],
            "domain": get_task(name).domain, "description": get_task(name).description,
        })
    write_record(work, {
        "name": base.pool_name, "kind": "lora", "key": target.name.rsplit("-", 1)[1], "config": config.to_dict(),
        "base": {"path": os.path.relpath(base.path.resolve(), target.resolve()), "parameters": parameters,
                 "identity": base.identity, "tasks": base_scores},
        "experts": experts, "build_seconds": time.perf_counter() - started,
        "build_cpu_seconds": time.process_time() - cpu_started + sum(r["job_cpu_seconds"] for r in results.values()),
        "workers": workers,
        "threads": config.threads, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
    })
