"""Merges of any subset of a fixed list of PEFT LoRA adapters on one base, with a LoRA method: what the
explorer merges on a study whose experts are all adapters.

:class:`AdapterSubsetMerger` reads every adapter's factors once (they are small) and keeps them. A merge
runs the members' factors of every module through a LoRA method
(:func:`karcher_lab.methods.lora.merge_factor_sets`, which uses the method's batched form where it has
one, e.g. geomerge's solver over all modules of one shape), and returns the full model as
:class:`~karcher_lab.pipeline.subsets.MergedState`: each adapted weight W0 + G Hᵀ in the base's dtype
(:func:`karcher_lab.io.lora.fold_into_tensor`, as :func:`karcher_lab.pipeline.lora.merge_lora` folds
it), every other tensor the base's own, read from the base's checkpoint one tensor at a time.

In a panel the LoRA methods are listed as ``lora:<name>`` (:data:`LORA_PREFIX`), apart from tensor
methods of the same name (``ties``, ``task_arithmetic``); :func:`lora_method_choices` gives them for a
study.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from karcher_lab.checks import check_members
from karcher_lab.errors import ArchitectureMismatchError, EmptyInputError, InputError, ParameterError
from karcher_lab.io import Checkpoint, Source
from karcher_lab.io.lora import LoraAdapter, check_compatible, fold_into_tensor, read_adapter
from karcher_lab.methods.lora import get_lora_method, list_lora_methods, merge_factor_sets
from karcher_lab.methods.lora.registry import LoraMethod
from karcher_lab.pipeline.subsets import MergedState
from karcher_lab.study.resolve import is_adapter, model_folder
from karcher_lab.study.spec import Study

LORA_PREFIX = "lora:"
"""How a panel names LoRA method ``name``: ``lora:name``."""


def study_adapters(study: Study) -> tuple[list[Path], Path] | None:
    """The experts' adapter folders (in the study's order) and the base's folder when every expert is a
    PEFT adapter and the base is a model folder or cached hub id; None otherwise (no files are read but
    the folders' ``adapter_config.json`` presence)."""
    if study.base is None or not study.experts:
        return None
    base = model_folder(study, study.base)
    folders = [model_folder(study, source) for source in study.experts.values()]
    if base is None or any(folder is None or not is_adapter(folder) for folder in folders):
        return None
    return folders, base


def study_lora_methods(study: Study) -> list[str]:
    """The LoRA methods that can merge ``study``'s experts: every one (:func:`list_lora_methods`) when all
    experts are PEFT adapters on the study's base (:func:`study_adapters`), none otherwise."""
    return list_lora_methods() if study_adapters(study) is not None else []


def lora_method_choices(study: Study) -> dict[str, LoraMethod]:
    """``{"lora:<name>": method}`` for :func:`study_lora_methods`: a panel's extra methods."""
    return {LORA_PREFIX + name: get_lora_method(name) for name in study_lora_methods(study)}


class AdapterSubsetMerger:
    """Merges of any subset of ``adapters`` (PEFT LoRA adapter folders or read
    :class:`~karcher_lab.io.lora.LoraAdapter`) with a LoRA method, folded onto ``base`` (a model folder or
    a :mod:`karcher_lab.io` source such as a :class:`~karcher_lab.io.Checkpoint`).

    Raises, before any merge
    ------------------------
    EmptyInputError
        No adapters.
    ArchitectureMismatchError
        The adapters do not fit together (:func:`karcher_lab.io.lora.check_compatible`), or the base lacks
        a weight they update or has it in another shape.
    """

    def __init__(self, adapters: Sequence[str | Path | LoraAdapter], base: str | Path | Source,
                 labels: Sequence[str] | None = None):
        if adapters is None or len(adapters) == 0:
            raise EmptyInputError("no adapters to merge (got an empty list)")
        if labels is not None and len(labels) != len(adapters):
            raise ParameterError(f"got {len(labels)} labels for {len(adapters)} adapters")
        self.adapters = [a if isinstance(a, LoraAdapter) else read_adapter(a, None if labels is None else labels[i])
                         for i, a in enumerate(adapters)]
        check_compatible(self.adapters)
        self.base: Source = Checkpoint(base, label="base") if isinstance(base, (str, Path)) else base
        self.fan_in_fan_out = self.adapters[0].fan_in_fan_out
        self.factors = [a.factors() for a in self.adapters]
        """Per adapter, {base weight name: (G, H)} (ΔW = G Hᵀ), read once."""
        problems = []
        for name, module in self.adapters[0].modules.items():
            info = self.base.tensors.get(name)
            if info is None:
                problems.append(f"{name}: not in the base")
            elif tuple(info.shape) != module.weight_shape:
                problems.append(f"{name}: the base weight is {tuple(info.shape)}, the adapters update {module.weight_shape}")
        if problems:
            raise ArchitectureMismatchError(f"the adapters do not fit the base {self.base.label}: "
                                            + "; ".join(problems[:6]))

    @classmethod
    def for_study(cls, study: Study) -> AdapterSubsetMerger:
        """The merger over ``study``'s experts, in its order, on its base; InputError naming the experts
        that are no PEFT adapters, or when the base is no model folder or cached hub id."""
        found = study_adapters(study)
        if found is None:
            others = [name for name, source in study.experts.items()
                      if (folder := model_folder(study, source)) is None or not is_adapter(folder)]
            if others:
                raise InputError(f"LoRA methods merge PEFT adapters on the study's base: expert(s) {others} are no "
                                 "adapters")
            raise InputError("LoRA methods need the study's base as a model folder or cached hub id to fold the "
                             "adapters onto")
        folders, base = found
        return cls(folders, base, labels=list(study.experts))

    def merge(
        self,
        method: str,
        members: Sequence[int],
        weights: Sequence[float] | None = None,
        *,
        params: Mapping[str, Any] | None = None,
        sink: Callable[[str, torch.Tensor], None] | None = None,
        device: str | torch.device | None = None,
    ) -> MergedState:
        """Merge the adapters at indices ``members`` with LoRA method ``method`` (its registry name, bare
        or as a panel lists it, ``lora:<name>``) and their ``weights`` (one per member, passed as given;
        None: the method's default, 1/N each), folded onto the base.

        Every LoRA method merges updates of the base, so the merged model is always the base plus the
        merged update (no seed, no base switch). With ``sink``, each tensor goes to ``sink(name, tensor)`` (``state`` is None).
        ``device``: where a method with a batched form (geomerge) solves (``"cuda"``: the whole batch on
        the GPU); the others, and the folding, run on the CPU.

        Returns
        -------
        MergedState
            Every tensor of the base (adapted weights W0 + G Hᵀ in the base's dtype); ``traces`` empty.

        Raises
        ------
        UnknownMethodError
            ``method`` is no LoRA method.
        EmptyInputError, ParameterError
            No member, an index out of range or given twice, a weight count unlike the members'.
        and what :func:`~karcher_lab.methods.lora.merge_factor_sets` raises (weights, parameters, ranks),
        all before any work.
        """
        name = method.removeprefix(LORA_PREFIX)
        lora = get_lora_method(name)
        members = check_members(members, len(self.adapters), "adapter", weights=weights, label=method)
        modules = {weight: [self.factors[i][weight] for i in members] for weight in self.factors[0]}
        factors = merge_factor_sets(modules, name, weights=None if weights is None else [float(w) for w in weights],
                                    device=device if lora.batch_fn is not None else None, **dict(params or {}))
        state: dict[str, torch.Tensor] | None = None
        if sink is None:
            state = {}
            sink = state.__setitem__
        for tensor in self.base.tensors:
            value = self.base.load(tensor)
            sink(tensor, fold_into_tensor(value, factors[tensor], self.fan_in_fan_out) if tensor in factors else value)
        return MergedState(state, {})
