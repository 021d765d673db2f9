"""Merging PEFT LoRA adapters: adapters in, a merged adapter or a full checkpoint out.

:func:`merge_lora` reads the adapters (:func:`karcher_lab.io.lora.read_adapter`), checks that they fit
together (:func:`karcher_lab.io.lora.check_compatible`: one base model, one layout, the same adapted
weights of the same shapes), merges every module's factors with one LoRA method
(:func:`karcher_lab.methods.lora.merge_factor_sets`), optionally in worker processes
(:func:`module_workers`), and writes the merged update as a PEFT adapter
(:func:`karcher_lab.io.lora.write_adapter`) or folded into a base checkpoint as a full model
(:func:`karcher_lab.io.lora.fold_into_base`). Every check runs before any work, and nothing is written
on failure (output directories appear atomically).

Worker processes pay off for methods whose per-module work is many small operations that intra-op
threads do not speed up (geomerge: r×r and 2r×2r matrices): the modules are independent, so
``workers`` processes of one torch thread each divide the wall time by up to ``workers``, less each
process's start-up time; the result is the same. A method with a batched form (geomerge:
:func:`karcher_lab.methods.lora.geomerge_batched.geomerge_modules`) merges all modules in one batched
call, or with workers one call per worker on an interleaved share of the modules.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from karcher_lab.checks import check_count, resolve_device
from karcher_lab.errors import EmptyInputError, ParameterError
from karcher_lab.io.lora import Factors, LoraAdapter, check_compatible, fold_into_base, layout_delta, read_adapter
from karcher_lab.io.lora import write_adapter
from karcher_lab.methods.lora import get_lora_method, merge_factor_sets


def _worker_start() -> None:
    torch.set_num_threads(1)  # the workers share the cores; one module is small matrices anyway


@contextmanager
def module_workers(workers: int, modules: int) -> Iterator[Executor | None]:
    """``min(workers, modules)`` spawned processes of one torch thread each to merge modules in, for
    :func:`karcher_lab.methods.lora.merge_factor_sets`' ``executor``; None (merge in this process) for one
    worker or one module. ParameterError unless ``workers`` is an integer ≥ 1."""
    check_count("workers", workers)
    if workers == 1 or modules <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, modules), mp_context=context, initializer=_worker_start) as pool:
        yield pool


@dataclass
class LoraMergeResult:
    """A merged adapter: ``factors`` ({base weight name: (G, H)}, ΔW = G Hᵀ), the method and settings
    used, and the first input adapter (``like``: base model, target modules, layout) for writing."""

    method: str
    factors: dict[str, Factors]
    like: LoraAdapter
    adapters: list[str]
    weights: list[float] | None
    params: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None

    @property
    def ranks(self) -> dict[str, int]:
        """The stored rank (factor width) of every merged module."""
        return {name: g.shape[1] for name, (g, _) in self.factors.items()}

    def delta(self, name: str) -> torch.Tensor:
        """ΔW of module weight ``name`` in the base weight's layout."""
        g, h = self.factors[name]
        return layout_delta(g, h, self.like.fan_in_fan_out)

    def record(self) -> dict[str, Any]:
        return {"method": self.method, "adapters": self.adapters, "weights": self.weights,
                "parameters": {k: v for k, v in self.params.items()}, "ranks": sorted(set(self.ranks.values()))}

    def save_adapter(self, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the merged update as a PEFT LoRA adapter directory (see karcher_lab.io.lora)."""
        self.out = write_adapter(out, self.factors, self.like, record=self.record(), overwrite=overwrite)
        return self.out

    def fold_into(self, base: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``base`` with W ← W + ΔW for every merged module as a full checkpoint directory."""
        self.out = fold_into_base(base, self.factors, out, fan_in_fan_out=self.like.fan_in_fan_out,
                                  record={**self.record(), "base": str(base)}, overwrite=overwrite)
        return self.out


def merge_lora(
    adapters: Sequence[str | os.PathLike | LoraAdapter],
    method: str = "geomerge",
    *,
    weights: Sequence[float] | None = None,
    out: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    workers: int = 1,
    device: str | torch.device | None = None,
    **params: Any,
) -> LoraMergeResult:
    """Merge PEFT LoRA adapters (directories or :class:`~karcher_lab.io.lora.LoraAdapter`) module by module.

    Parameters
    ----------
    adapters : sequence of path or LoraAdapter
        The N adapters; they must share a base model, layout and adapted weights.
    method : str
        A registered LoRA method (:func:`karcher_lab.methods.lora.list_lora_methods`: geomerge,
        task_arithmetic, ties, knots_ta, knots_ties, peft_cat, peft_linear, peft_svd, peft_ties,
        peft_ties_svd).
    weights : sequence of float, optional
        Per-adapter weights, 1/N each by default.
    out : path, optional
        Write the merged adapter there as a PEFT adapter, or, with ``base``, the folded full model.
    base : path, optional
        The base checkpoint to fold the merged update into (W ← W + ΔW); needs ``out``.
    overwrite : bool
        Replace an existing ``out`` (only once the merge succeeded).
    workers : int
        Processes merging the modules in parallel (:func:`module_workers`).
    device : str or torch.device, optional
        Where geomerge's batched solver runs (``"cuda"``: every module's solve on the GPU; default the CPU);
        DeviceError before any work when CUDA is requested but not available. The result is the same.
        Methods without a batched form accept only the CPU.
    **params
        The method's parameters.

    Returns
    -------
    LoraMergeResult
        The merged factors per module, whether or not anything was written.
    """
    check_count("workers", workers)
    if device is not None:
        resolve_device(device)  # DeviceError before any reading
    if not adapters:
        raise EmptyInputError("no adapters to merge")
    if base is not None and out is None:
        raise ParameterError("base= names the checkpoint to fold the merged adapter into; give out= as well")
    get_lora_method(method)
    read = [a if isinstance(a, LoraAdapter) else read_adapter(a) for a in adapters]
    check_compatible(read)
    modules = {name: [a.modules[name].factors() for a in read] for name in read[0].modules}
    with module_workers(workers, len(modules)) as executor:
        factors = merge_factor_sets(modules, method, weights=weights, executor=executor, chunks=workers,
                                    device=device, **params)
    result = LoraMergeResult(method, factors, read[0], [a.label for a in read],
                             None if weights is None else [float(w) for w in weights], dict(params))
    if out is not None:
        if base is not None:
            result.fold_into(base, out, overwrite=overwrite)
        else:
            result.save_adapter(out, overwrite=overwrite)
    return result
