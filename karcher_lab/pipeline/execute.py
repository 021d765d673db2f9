"""Executing a merge plan: tensor by tensor, load the N inputs (and the base), merge them on the chosen
device, hand each result to a sink (the streaming writer, a dict, or a resident model). Peak memory is
about (N inputs + 1 output) × the largest tensor, independent of the model's total size; a tensor whose
N inputs together exceed :data:`SLICE_INPUT_BYTES` is merged by row slices when its method allows it
(:class:`~karcher_lab.methods.api.RowSlices`: karcher), which bounds that term by
:data:`SLICE_INPUT_BYTES` + 1 output whatever N (a large vocabulary's embedding).
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from karcher_lab.errors import InputError
from karcher_lab.io.architecture import Source
from karcher_lab.io.writer import TensorSpec
from karcher_lab.methods.api import RowSlices, merge_tensors, row_separable
from karcher_lab.pipeline.plan import MergePlan


SLICE_INPUT_BYTES = 128 << 20
"""Above this many bytes of one tensor's inputs together (N models and the base), a row-separable merge
reads them this many bytes of rows at a time."""


@dataclass
class MergeStats:
    """What a run did: tensors merged, bytes read from sources, bytes written, wall time, peak memory."""

    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None
    files: list[str] = field(default_factory=list)
    out: Path | None = None
    warnings: list[str] = field(default_factory=list)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class TensorCache:
    """Loaded, dtype-cast, device-resident inputs kept between merges (opt-in: costs their memory)."""

    def __init__(self) -> None:
        self.tensors: dict[tuple[int, str, Any, Any], torch.Tensor] = {}

    def get(self, key: tuple, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.tensors:
            self.tensors[key] = load()
        return self.tensors[key]


def execute_plan(
    plan: MergePlan,
    sink: Callable[[str, torch.Tensor], None],
    *,
    device: torch.device,
    stats: MergeStats,
    cache: TensorCache | None = None,
    merge_one: Callable[..., torch.Tensor] | None = None,
    progress: bool = False,
) -> None:
    """Merge every task in order and pass each result (on CPU, in its output dtype) to ``sink``.

    ``merge_one(method, tensors, key=..., **merge_tensors_arguments)`` merges one tensor (default:
    :func:`karcher_lab.merge_tensors`); ``key`` identifies the tensor and its inputs for caches.
    """
    from tqdm.auto import tqdm

    merge_one = merge_one or (lambda method, tensors, key, **kwargs: merge_tensors(method, tensors, **kwargs))
    input_refs = tuple(str(ref) for ref, _ in plan.inputs) + ((str(plan.base[0]),) if plan.base else ())
    total = sum(TensorSpec(t.name, t.shape, t.out_dtype).nbytes for t in plan.tasks)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", disable=not progress, dynamic_ncols=True)
    sources = plan.sources
    vocabulary_names = set(plan.layout.vocabulary_names)

    def load(source: Source, stored: str) -> torch.Tensor:
        """One input tensor, cast to the recipe's dtype and moved to the device (cached if asked)."""

        def read() -> torch.Tensor:
            stats.bytes_read += source.tensors[stored].nbytes
            t = source.load(stored)
            if plan.load_dtype is not None and t.is_floating_point():
                t = t.to(plan.load_dtype)
            return t.to(device)

        return read() if cache is None else cache.get((id(source), stored, plan.load_dtype, str(device)), read)

    try:
        for i, task in enumerate(plan.tasks):
            rows = _row_slices(plan, task, cache, device, stats)
            if rows is not None:
                merged = merge_one(plan.method.name, rows, key=(task.name, input_refs), weights=task.weights, seed=task.seed,
                                   out_dtype=task.out_dtype, name=task.name, **task.params)
                sink(task.name, merged.to("cpu"))
                stats.tensors += 1
                bar.update(TensorSpec(task.name, task.shape, task.out_dtype).nbytes)
                continue
            tensors = [load(s, plan.stored_name(k, task.name)) for k, s in enumerate(sources)]
            if plan.alignment is not None and task.name in vocabulary_names:
                tensors = plan.alignment.apply(tensors)
            base = tensors.pop() if plan.base is not None else None
            if not task.floating:
                merged = _passthrough(task.name, tensors + ([base] if base is not None else []))
            else:
                params = dict(task.params)
                for pname, refs in task.tensor_params.items():
                    params[pname] = [load(s, n) for s, n in refs]
                merged = merge_one(
                    plan.method.name, tensors, key=(task.name, input_refs), weights=task.weights, base=base, seed=task.seed,
                    out_dtype=task.out_dtype, name=task.name, **params,
                )
            del tensors, base
            sink(task.name, merged.to("cpu"))
            stats.tensors += 1
            bar.update(TensorSpec(task.name, task.shape, task.out_dtype).nbytes)
            bar.set_postfix_str(f"{i + 1}/{len(plan.tasks)} tensors", refresh=False)
    finally:
        bar.close()


def _row_slices(plan: MergePlan, task: Any, cache: TensorCache | None, device: torch.device,
                stats: MergeStats) -> RowSlices | None:
    """The task's inputs as :class:`RowSlices` of about :data:`SLICE_INPUT_BYTES` in all, or None where the
    whole tensors are read: a small tensor, kept inputs (``cache``), a vocabulary alignment, tensor-valued
    parameters, or a method that cannot merge by rows."""
    spec = TensorSpec(task.name, task.shape, task.out_dtype)
    sources = plan.sources
    stored = [plan.stored_name(k, task.name) for k in range(len(sources))]
    total = sum(s.tensors[n].nbytes for s, n in zip(sources, stored))
    if (total <= SLICE_INPUT_BYTES or cache is not None or not task.floating or task.tensor_params or len(spec.shape) < 2
            or task.name in set(plan.layout.vocabulary_names) and plan.alignment is not None
            or not row_separable(plan.method, len(plan.inputs), dict(task.params))):
        return None
    rows = spec.shape[0]
    step = max(1, rows * SLICE_INPUT_BYTES // total)
    with_base = plan.base is not None

    def read(start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        tensors = []
        for source, name in zip(sources, stored):
            t = source.load_rows(name, start, stop)
            stats.bytes_read += t.numel() * t.element_size()
            if plan.load_dtype is not None and t.is_floating_point():
                t = t.to(plan.load_dtype)
            tensors.append(t.to(device))
        base = tensors.pop() if with_base else None
        return tensors, base

    return RowSlices(read, rows, step)


def _passthrough(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A non-floating tensor (an integer buffer) is copied when every model holds the same values."""
    for i, t in enumerate(tensors[1:], start=1):
        if not torch.equal(t, tensors[0]):
            raise InputError(f"tensor {name!r} is not floating-point ({t.dtype}) and differs between model 0 and model {i}; it cannot be merged")
    return tensors[0]
