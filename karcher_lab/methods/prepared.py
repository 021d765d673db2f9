"""Prepared states of two-phase methods, kept between merges of the same inputs.

A two-phase method (:class:`~karcher_lab.methods.registry.TwoPhase`) splits a merge into ``prepare``,
the weight-independent pass over the data, and ``solve``, which finishes it for given weights (karcher:
the Gram matrices, then the N×N solve and one combining pass). :class:`PreparedStates` keeps one state
per tensor, so a re-weighted merge (a widget's slider, the sweep's next m) runs ``solve`` only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable

import torch

if TYPE_CHECKING:
    from karcher_lab.methods.api import MergeCall


def tensor_identity(value: Any) -> Any:
    """A value's cache identity: for tensors (or lists of tensors) their storage, layout and version,
    equal only for the same, unmodified values while they are alive (an in-place change bumps the
    version); other values are their own identity."""
    if isinstance(value, torch.Tensor):
        return (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
                value.dtype, str(value.device), value._version)
    if isinstance(value, (list, tuple)):
        return tuple(tensor_identity(v) for v in value)
    return value


class PreparedStates:
    """One prepared state per (method, caller's key, compute dtype, device, preparing parameters).

    The caller's key must identify the inputs (e.g. the tensor's name and the models' references).
    Tensor-valued preparing parameters (karcher's ``fisher``) are compared by identity and kept alive
    with the state, so a state is recomputed when they are other tensors or were modified in place.
    """

    def __init__(self) -> None:
        self.states: dict[Hashable, tuple[Any, Any, Any]] = {}
        self.hits = 0
        self.misses = 0

    def merge(self, key: Hashable, call: MergeCall) -> Any:
        """``solve(prepare(call), call)`` with the prepared state of ``key`` reused when still valid."""
        return call.method.two_phase.solve(self.state(key, call), call)

    def state(self, key: Hashable, call: MergeCall, prepare: Callable[[MergeCall], Any] | None = None) -> Any:
        """The prepared state of ``key`` for ``call``: the cached one while still valid, else
        ``prepare(call)`` (default: the method's ``prepare``), kept for next time."""
        phases = call.method.two_phase
        values = [call.params[p] for p in phases.prepared_by]
        identity = tensor_identity(values)
        plain = tuple(v for v in values if not _holds_tensors(v))
        full_key = (call.method.name, key, call.tensors[0].dtype, str(call.tensors[0].device), plain)
        cached = self.states.get(full_key)
        if cached is not None and cached[0] == identity:
            self.hits += 1
            state = cached[2]
        else:
            self.misses += 1
            state = (prepare or phases.prepare)(call)
            self.states[full_key] = (identity, values, state)
        return state

    def clear(self) -> None:
        self.states.clear()


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v) for v in value)
    return isinstance(value, torch.Tensor)
