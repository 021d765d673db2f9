"""A built pool on disk: its ``pool.json`` record, with paths resolved, and the expert-vs-base table.

``pool.json`` stores paths relative to the pool directory; :func:`load_pool` returns them absolute, so
the record printed by ``karcher-lab zoo info NAME --json`` can be handed straight to transformers or
mergekit. :func:`find_zoo_pool` finds a zoo pool by size; :func:`karcher_lab.zoo.lookup.find_pool`
also finds LoRA pools by name.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from karcher_lab.errors import KarcherLabError
from karcher_lab.zoo.cache import pool_dir
from karcher_lab.zoo.config import SIZES, config_for

POOL_FILE = "pool.json"


class PoolNotBuiltError(KarcherLabError, LookupError):
    """The requested pool has not been built (or its directory has no pool.json)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Pool:
    """A built pool: ``record`` is pool.json with absolute paths."""

    path: Path
    record: dict

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def base_path(self) -> Path:
        return Path(self.record["base"]["path"])

    @property
    def experts(self) -> list[dict]:
        return self.record["experts"]

    def expert_path(self, task: str) -> Path:
        for expert in self.experts:
            if expert["task"] == task:
                return Path(expert["path"])
        raise PoolNotBuiltError(f"pool {self.name} has no expert for task {task!r}; it has "
                                f"{', '.join(e['task'] for e in self.experts)}")


def write_record(directory: Path, record: dict) -> None:
    (directory / POOL_FILE).write_text(json.dumps(record, indent=1) + "\n")


def load_pool(directory: str | os.PathLike) -> Pool:
    """Read the pool in ``directory`` and make its paths absolute."""
    directory = Path(directory).expanduser().resolve()
    file = directory / POOL_FILE
    if not file.is_file():
        raise PoolNotBuiltError(f"{directory} holds no built pool (no {POOL_FILE})")
    record = json.loads(file.read_text())
    record["path"] = str(directory)
    record["base"]["path"] = os.path.normpath(directory / record["base"]["path"])  # LoRA pools: "../<base>"
    for expert in record["experts"]:
        expert["path"] = str(directory / expert["path"])
        if "adapter" in expert:  # LoRA pools (lora.py): the PEFT adapter directory
            expert["adapter"] = str(directory / expert["adapter"])
    return Pool(directory, record)


def find_zoo_pool(size_or_path: str, cache_dir=None) -> Pool:
    """The built pool of a zoo size (its default config) or in a pool directory; PoolNotBuiltError, with
    the command that builds it, when it is not built."""
    if size_or_path in SIZES:
        directory = pool_dir(config_for(size_or_path).to_dict(), cache_dir)
        if not (directory / POOL_FILE).is_file():
            raise PoolNotBuiltError(f"the {size_or_path} pool is not built (looked in {directory}); "
                                    f"run `karcher-lab zoo build --size {size_or_path}`")
        return load_pool(directory)
    return load_pool(size_or_path)


def format_table(record: dict) -> str:
    """The expert-vs-base table as aligned text (exact match in %, NLL in nats per token)."""
    if record.get("kind") == "lora":
        return format_lora_table(record)
    lines = [f"pool {record['name']} ({record['base']['parameters']:,} parameters/model, "
             f"built in {record['build_seconds']:.0f} s)",
             f"{'task':<11} {'expert EM':>9} {'base EM':>8} {'expert NLL':>10} {'base NLL':>9} "
             f"{'level':>6} {'steps':>5} {'lr':>8} {'|tau|':>7}"]
    for e in record["experts"]:
        lines.append(f"{e['task']:<11} {100 * e['accuracy']:>8.1f}% {100 * e['base_accuracy']:>7.1f}% "
                     f"{e['nll']:>10.3f} {e['base_nll']:>9.3f} {e['level']:>6.2f} {e['steps']:>5} "
                     f"{e['lr']:>8.2e} {e['task_vector_norm']:>7.2f}")
    widest = record["conflicts"]["pairs_by_conflict"][:3]
    if widest:
        lines.append("most conflicting task pairs (angle between task vectors): " + ", ".join(
            f"{p['tasks'][0]}/{p['tasks'][1]} {p['angle_deg']:.0f}°" for p in widest))
    return "\n".join(lines)


def format_lora_table(record: dict) -> str:
    """The expert-vs-base table of a LoRA pool (lora.py): scores, then rank, α, steps, rate, training time."""
    config = record["config"]
    lines = [f"pool {record['name']} (LoRA rank {config['rank']}, alpha {config['alpha']:g} on a "
             f"{record['base']['parameters']:,}-parameter base; built in {record['build_seconds']:.0f} s wall, "
             f"{record['build_cpu_seconds']:.0f} CPU-s, {record['workers']} worker(s) x {record['threads']} "
             f"thread(s), load average {record['load_average'][0]:.1f} at the end)",
             f"{'task':<11} {'expert EM':>9} {'base EM':>8} {'expert NLL':>10} {'base NLL':>9} "
             f"{'steps':>5} {'lr':>8} {'train s':>8} {'CPU-s':>6}"]
    for e in record["experts"]:
        lines.append(f"{e['task']:<11} {100 * e['accuracy']:>8.1f}% {100 * e['base_accuracy']:>7.1f}% "
                     f"{e['nll']:>10.3f} {e['base_nll']:>9.3f} {e['steps']:>5} {e['lr']:>8.2e} "
                     f"{e['train_seconds']:>8.1f} {e['train_cpu_seconds']:>6.1f}")
    return "\n".join(lines)
