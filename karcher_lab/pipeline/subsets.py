"""Merges of any subset of a fixed list of experts: what the explorer and the sweep merge.

Which models a merge gets follows from the method's rules (:class:`~karcher_lab.methods.MergeMethod`),
never from its name:

- the base: given only when the caller asks for it (``use_base``), a base exists and the method uses
  one under the given parameters (:meth:`MergeMethod.uses_base`: required, or optional and switched on,
  e.g. karcher's ``task_vectors``);
- a method whose base is its first input (slerp), or any call with ``first_as_base``, takes the first
  member as ``base_model`` and the others as its models (the sweep runs a pair method on two experts so);
- a two-phase method (:attr:`MergeMethod.reweightable`, karcher) is run in one session over *all*
  experts, the non-members at weight 0 (excluded from the mean), so its prepared state (the Gram
  matrices) is computed once and every subset and weighting only re-solves; other methods get a session
  over the members.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from karcher_lab.errors import EmptyInputError, NotSupportedError, ParameterError
from karcher_lab.methods.registry import get_method
from karcher_lab.checks import check_members, resolve_device
from karcher_lab.pipeline.session import MergeSession
from karcher_lab.recipe.schema import ModelEntry, ModelRef, Recipe, parse_parameters


@dataclass(frozen=True)
class MergeRoles:
    """A subset merge's roles: the ``members`` that are the method's inputs, their ``weights`` (None: 1
    each), the expert serving as base (``base_index``; None: the merger's base or none) and whether a base
    is given at all (``has_base``)."""

    members: list[int]
    weights: list[float] | None
    base_index: int | None
    has_base: bool


@dataclass
class MergedState:
    """A merged model's tensors by name (on the CPU; None when they went to a ``sink``) and the
    per-tensor solver traces (karcher's :class:`~karcher_lab.geometry.karcher_mean.KarcherTrace`; empty
    for closed-form methods)."""

    state: dict[str, torch.Tensor] | None
    traces: dict[str, Any]


class SubsetMerger:
    """Merges of any subset of ``experts`` (paths, :mod:`karcher_lab.io` sources, state dicts or
    transformers models) and an optional ``base``, keeping the prepared states between merges
    (karcher's N×N Gram matrices per tensor).

    Sessions are kept for the full expert list (two-phase methods) and for the latest subset. Inputs
    are read one tensor of each model at a time for every merge (checkpoints are memory-mapped, so
    repeated reads come from the page cache), unless ``keep_inputs`` keeps every loaded input tensor
    (faster re-merges, the memory of every expert).
    """

    def __init__(self, experts: Sequence[Any], *, base: Any = None, device: str | torch.device = "cpu",
                 keep_inputs: bool = False):
        if experts is None or len(experts) == 0:
            raise EmptyInputError("no experts to merge (got an empty list)")
        self.experts = list(experts)
        self.base = base
        self.device = resolve_device(device)
        self.keep_inputs = keep_inputs
        self._sessions: dict[tuple, MergeSession] = {}

    def merge(
        self,
        method: str,
        members: Sequence[int],
        weights: Sequence[float] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        seed: int | None = 0,
        use_base: bool = True,
        first_as_base: bool = False,
        sink: Callable[[str, torch.Tensor], None] | None = None,
    ) -> MergedState:
        """Merge the experts at indices ``members`` with their ``weights`` (one per member; the first
        member's is dropped when it serves as the base) under the rules of the module docstring. With
        ``sink``, each merged tensor is handed to ``sink(name, tensor)`` as soon as it exists (e.g. written
        into a resident model) instead of being collected into ``state``."""
        spec = get_method(method)
        roles = self.roles(method, members, weights, params=params, use_base=use_base, first_as_base=first_as_base)
        weights = roles.weights
        if spec.reweightable:
            inputs = tuple(i for i in range(len(self.experts)) if i != roles.base_index)
            if weights is not None or len(roles.members) < len(inputs):
                given = dict(zip(roles.members, [1.0] * len(roles.members) if weights is None else weights))
                weights = [given.get(i, 0.0) for i in inputs]
        else:
            inputs = tuple(roles.members)
        session = self._session(inputs, roles.base_index, roles.has_base)
        state = session.merge(method, weights=weights, params=params, seed=seed, sink=sink)
        return MergedState(state, dict(session.traces))

    def roles(
        self,
        method: str,
        members: Sequence[int],
        weights: Sequence[float] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        use_base: bool = True,
        first_as_base: bool = False,
    ) -> MergeRoles:
        """Which members are the method's inputs (with which weights) and what serves as its base, by the
        rules of the module docstring; checked before any work."""
        spec = get_method(method)
        members = check_members(members, len(self.experts), weights=weights, label=method)
        weights = None if weights is None else [float(w) for w in weights]
        if first_as_base or spec.base == "first":
            return MergeRoles(members[1:], None if weights is None else weights[1:], members[0], True)
        has_base = use_base and self.base is not None and spec.uses_base(params)
        return MergeRoles(members, weights, None, has_base)

    def recipe(
        self,
        method: str,
        members: Sequence[int],
        weights: Sequence[float] | None = None,
        *,
        paths: Sequence[str | None],
        base_path: str | None = None,
        params: Mapping[str, Any] | None = None,
        use_base: bool = True,
        first_as_base: bool = False,
    ) -> Recipe:
        """The mergekit recipe of :meth:`merge` with the same arguments, over the experts' checkpoint
        ``paths`` (one per expert) and the base's ``base_path``: the members only (a two-phase method's
        zero-weight experts are left out, which gives the same mean), each with its weight.

        Raises NotSupportedError where a model taking part has no checkpoint path (an in-memory model,
        a PEFT adapter folded in memory)."""
        if len(paths) != len(self.experts):
            raise ParameterError(f"got {len(paths)} paths for {len(self.experts)} experts")
        roles = self.roles(method, members, weights, params=params, use_base=use_base, first_as_base=first_as_base)
        base = paths[roles.base_index] if roles.base_index is not None else base_path if roles.has_base else None
        needed = [paths[i] for i in roles.members] + ([base] if roles.has_base else [])
        if any(p is None for p in needed):
            raise NotSupportedError("a model of this merge has no checkpoint folder (an in-memory model or a PEFT "
                                    "adapter folded in memory), so no recipe can name it")
        entries = [ModelEntry(ModelRef(str(paths[i])), {} if roles.weights is None else {"weight": w})
                   for i, w in zip(roles.members, roles.weights or [None] * len(roles.members))]
        if roles.base_index is not None:
            entries.insert(0, ModelEntry(ModelRef(str(base))))
        return Recipe(merge_method=method, models=entries, base_model=ModelRef(str(base)) if base else None,
                      parameters=parse_parameters(dict(params or {}), "params"))

    def _session(self, inputs: tuple[int, ...], base_index: int | None, has_base: bool) -> MergeSession:
        key = (inputs, base_index, has_base)
        if key not in self._sessions:
            full = len(inputs) + (base_index is not None) == len(self.experts)
            if not full:
                for old in [k for k in self._sessions if len(k[0]) + (k[1] is not None) != len(self.experts)]:
                    del self._sessions[old]
            base = self.experts[base_index] if base_index is not None else self.base if has_base else None
            self._sessions[key] = MergeSession([self.experts[i] for i in inputs], base=base, device=self.device,
                                                 keep_inputs=self.keep_inputs)
        return self._sessions[key]
