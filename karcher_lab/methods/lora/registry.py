"""The registry of LoRA merge methods: functions on the low-rank factors of one module's updates.

A LoRA method is a pure function on tensors::

    fn(pairs, *, weights, name, **params) -> (G, H)

``pairs`` is the list [(G_1, H_1), …, (G_N, H_N)] of one module's updates ΔW_i = G_i H_iᵀ (G_i
[d1, r_i], H_i [d2, r_i], one compute dtype), ``weights`` a float64 tensor [N] (1/N each when the user
gave none), ``name`` the module's weight name for messages, and ``params`` every declared parameter
with defaults filled in (the :class:`~karcher_lab.methods.registry.Param` declarations of the tensor
methods, checked by the same code). The result is the merged update as factors, ΔW = G Hᵀ, whatever
its rank: the entry's ``rank`` says what that rank is (e.g. "r" for geomerge, "Σ r_i" for task
arithmetic, "full" for TIES on ΔW).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from karcher_lab.methods.registry import Param, Registry, WeightUse


@dataclass(frozen=True)
class LoraMethod:
    """Registry entry: the function and what it needs, so inputs are checked before any work.

    ``equal_ranks``: every adapter must have the same rank in each module. ``weights``: as for tensor
    methods ("nonnegative" or "any"). ``rank``: the rank of the merged update, in words. ``batch_fn``: a
    batched form of ``fn`` over modules, which :func:`~karcher_lab.methods.lora.merge_factor_sets` uses.
    """

    name: str
    fn: Callable[..., Any]
    summary: str
    rank: str
    params: tuple[Param, ...] = ()
    equal_ranks: bool = False
    weights: WeightUse = "nonnegative"
    min_models: int = 1
    paper: str = ""
    batch_fn: Callable[..., Any] | None = None
    """Optional: the same merge on many modules at once, ``batch_fn(modules, *, weights, names, device, **params)``
    -> [(G, H), …] for ``modules`` = [[(G_1, H_1), …], …] (one entry per module, as ``fn`` returns it;
    ``device``: where to compute, None for the inputs' device); an error about one module starts its message
    with the module's name ("name: …")."""


LORA_METHODS: Registry[LoraMethod] = Registry("LoRA merge method")
"""Every merge method of LoRA factors, by name."""


def register_lora(name: str, **rules: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as LoRA merge method ``name``; ``rules`` are the other fields of
    :class:`LoraMethod` (summary, rank, params, equal_ranks, weights, min_models, paper, batch_fn)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        LORA_METHODS.add(name, LoraMethod(name=name, fn=fn, **rules))
        return fn

    return decorate


def get_lora_method(name: str) -> LoraMethod:
    """The LoRA method called ``name``; UnknownMethodError lists the known ones otherwise."""
    return LORA_METHODS.get(name)


def list_lora_methods() -> list[str]:
    """Names of all registered LoRA methods, sorted."""
    return LORA_METHODS.names()
