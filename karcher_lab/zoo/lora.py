"""LoRA experts: low-rank fine-tunes (peft) of a pool's base or of SmolLM2-135M-Instruct, one per task.

Recipe (Hu et al. 2021, LoRA): every targeted linear map W (d_out × d_in) of the base becomes
W + (α/r) B A with A (r × d_in, Kaiming-uniform, seeded) and B (d_out × r, zeros), and only A and B
train. The targets are the attention and MLP projections (q, k, v, o, gate, up, down). Training is the
zoo's loop (train.py: AdamW, warm-up then cosine, gradient clipping) on the task's training split with
the loss on the answer only; the prompt format is the zoo's plain text ``<prompt><answer><eos>`` with
``<prompt> = "tag:input="`` (tasks.py), through the base's own tokenizer: no chat template (SmolLM2's
tokenizer adds no ``<s>``, so its sequences are ``tag:input=answer<|im_end|>``).

For every task the pool directory holds

- ``adapters/<task>/``: the PEFT adapter (adapter_config.json + adapter_model.safetensors), loadable
  by ``peft.PeftModel.from_pretrained(base, dir)``;
- ``experts/<task>/``: the adapter folded into the base (``merge_and_unload``: W + (α/r) B A), saved
  as an ordinary Hugging Face directory (config, safetensors, tokenizer; tied embeddings stay tied);

and ``pool.json`` has the shape of the zoo pools' (pool.py): the base's path (relative to the pool
directory, as the base lives outside it) and its scores on every task, and per expert its scores
(exact match and answer NLL of the folded expert on held-out examples, evaluate.py) next to the
base's, plus ``adapter``, ``rank``, ``alpha`` and ``train_seconds``.

Default recipes (``LORA_DEFAULTS``; every field can be overridden, and ``karcher-lab zoo lora`` exposes
them): on a zoo pool's base (``tiny-lora``), all 13 tasks, r = 8, α = 16, 500 steps of 32 examples at
peak rate 1e-2; on SmolLM2 (``smollm2``), five tasks its BPE tokenizer writes digit by digit or letter by
letter (addition, units, dates, maxdigit, uppercase), r = 16, α = 32, 40 steps of 8 examples
at peak rate 3e-3 (three steps already cut the dates NLL from 2.8 to 0.3 nats). Experts train in
parallel worker processes (one per core), each single-threaded: under a shared, oversubscribed CPU
two-thread runs spend most of their time waiting at thread barriers, and single-threaded workers keep
the result independent of the number of workers. pool.json records wall and CPU seconds (per expert
and in total) and the load average, since wall time on a shared machine says little.

Measured (2026-11-24, a 2-core machine shared with ~7 other jobs, load average 8-15): ``smollm2`` built
in 1659 s wall but 383 CPU-seconds in all (about 3-4 minutes on two idle cores), every expert far
above the base (exact match 73-100% against 0%; answer NLL 0.00-0.42 against 2.8-11.3 nats);
``tiny-lora`` in 1619 s wall, 274 CPU-seconds, 9 of 13 experts at 96-100% exact match (reverse and sort
76%; code and prose, text continuation, 35% and 45% against the base's 14% and 31%).

Pools are cached like the zoo's (cache.py) under ``<cache root>/zoo/<name>-<key>``, where the key hashes
the zoo's building code, this module's code, the config, the base's identity (its pool key, or the
SmolLM2 wheel's SHA-256) and the torch / transformers / peft versions. Runs are seeded and use
deterministic algorithms on a fixed thread count, so the same inputs give the same adapters on CPU.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from karcher_lab.errors import NotSupportedError, OutputError, ParameterError
from karcher_lab.io.output import atomic_directory
from karcher_lab.zoo.build import deterministic
from karcher_lab.zoo.cache import build_key, cache_root, code_fingerprint
from karcher_lab.zoo.catalog import TASKS, get_task
from karcher_lab.zoo.config import SIZES
from karcher_lab.zoo.evaluate import evaluate
from karcher_lab.zoo.sequences import encode
from karcher_lab.zoo.train import train_causal_lm

SMOLLM2 = "smollm2"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS_DIR, EXPERTS_DIR = "adapters", "experts"
LORA_DEFAULTS: dict[str, dict] = {
    # the tiny/small/medium pool's base: every task, rank 8
    "pool": dict(tasks=tuple(TASKS), rank=8, alpha=16.0, steps=500, lr=1e-2, batch_size=32, train_examples=3000,
                 eval_examples=200),
    # SmolLM2-135M-Instruct: tasks a 135M BPE model learns in a few hundred steps, rank 16
    SMOLLM2: dict(tasks=("addition", "units", "dates", "maxdigit", "uppercase"), rank=16, alpha=32.0,
                  steps=40, lr=3e-3, batch_size=8, train_examples=2000, eval_examples=100),
}


@dataclass(frozen=True)
class LoraPoolConfig:
    """Everything that determines a LoRA pool's adapters (and so, with the code, its cache key).

    ``base``: a zoo size (``tiny``, ``small``, ``medium``: that pool's base), ``smollm2``, or the
    directory of a built zoo pool (its base).
    """

    base: str = "tiny"
    tasks: tuple[str, ...] = tuple(TASKS)
    rank: int = 8
    alpha: float = 16.0
    steps: int = 500
    lr: float = 1e-2
    batch_size: int = 32
    train_examples: int = 3000
    eval_examples: int = 200
    seed: int = 0
    threads: int = 1  # torch threads per training process (results depend on it at float rounding)
    target_modules: tuple[str, ...] = TARGET_MODULES

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ParameterError(f"unknown zoo task(s) {unknown}; known tasks: {', '.join(TASKS)}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ParameterError(f"tasks must be a non-empty list without repeats, got {list(self.tasks)}")
        for name in ("rank", "steps", "batch_size", "train_examples", "eval_examples", "threads"):
            if getattr(self, name) < 1:
                raise ParameterError(f"LoRA {name} must be >= 1, got {getattr(self, name)}")
        for name in ("alpha", "lr"):
            if not getattr(self, name) > 0:
                raise ParameterError(f"LoRA {name} must be > 0, got {getattr(self, name)}")
        if not self.target_modules:
            raise ParameterError("target_modules must name at least one module")

    def to_dict(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks), "target_modules": list(self.target_modules)}

    @property
    def scaling(self) -> float:
        """α / r, the factor of B A in the folded weight."""
        return self.alpha / self.rank


def lora_config_for(base: str = "tiny", **overrides) -> LoraPoolConfig:
    """The default LoRA recipe for ``base`` (a zoo size, ``smollm2`` or a pool directory), with overrides."""
    defaults = LORA_DEFAULTS[SMOLLM2 if base == SMOLLM2 else "pool"]
    bad = sorted(set(overrides) - {f.name for f in fields(LoraPoolConfig)} - {"base"})
    if bad:
        raise ParameterError(f"unknown LoRA config field(s) {bad}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "rank" in overrides and "alpha" not in overrides:  # keep the default scaling α / r = 2
        overrides["alpha"] = 2.0 * overrides["rank"]
    for name in ("tasks", "target_modules"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    return replace(LoraPoolConfig(base=base, **defaults), **overrides)


@dataclass(frozen=True)
class LoraBase:
    """The model the adapters are trained on: its directory, the pool name it gives, and its identity."""

    path: Path
    pool_name: str
    identity: str


def resolve_base(base: str, cache_dir=None) -> LoraBase:
    """Where ``base`` lives; a zoo pool must be built already (PoolNotBuiltError, with the command, if not)."""
    if base == SMOLLM2:
        from karcher_lab.zoo.smollm2 import WHEEL_SHA256, smollm2_dir

        return LoraBase(smollm2_dir(cache_dir), SMOLLM2, f"smollm2-wheel:{WHEEL_SHA256}")
    if base not in SIZES and not Path(base).expanduser().is_dir():
        raise ParameterError(f"unknown LoRA base {base!r}: give {', '.join(SIZES)}, {SMOLLM2} or a pool directory")
    from karcher_lab.zoo.pool import find_pool

    pool = find_pool(base, cache_dir)
    return LoraBase(pool.base_path, f"{pool.name}-lora", f"pool:{pool.record['key']}")


def lora_key(config: LoraPoolConfig, base: LoraBase) -> str:
    """Cache key: the zoo's build key over the config, the base identity, this module's code and peft."""
    import peft

    return build_key({**config.to_dict(), "base_identity": base.identity, "peft": peft.__version__,
                      "lora_code": code_fingerprint(Path(__file__).read_text())})


def lora_pool_dir(config: LoraPoolConfig, cache_dir=None) -> Path:
    """The directory of the LoRA pool built from ``config`` (it may not exist yet)."""
    base = resolve_base(config.base, cache_dir)
    return cache_root(cache_dir) / "zoo" / f"{base.pool_name}-{lora_key(config, base)}"


def build_lora_pool(config: LoraPoolConfig | None = None, cache_dir=None, *, workers: int | None = None,
                    progress: bool = True, force: bool = False):
    """Build (or reuse from the cache) the LoRA pool of ``config``; returns its :class:`Pool`.

    Experts train in ``workers`` processes (default: one per core), each on ``config.threads`` threads,
    so the adapters do not depend on the number of workers.
    """
    from karcher_lab.zoo.pool import POOL_FILE, load_pool

    config = config or lora_config_for("tiny")
    base = resolve_base(config.base, cache_dir)
    target = cache_root(cache_dir) / "zoo" / f"{base.pool_name}-{lora_key(config, base)}"
    if (target / POOL_FILE).is_file() and not force:
        return load_pool(target)
    if config.base == SMOLLM2:
        from karcher_lab.zoo.smollm2 import build_smollm2

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

    from karcher_lab.zoo.pool import write_record

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
