"""The one resident model of a session: tensors are written into its parameters and buffers in place,
by name, so that no second copy of a model's weights (a merged state dict, an expert's loaded model)
is ever held next to it.

A model's tensors by name are its ``state_dict()`` entries, which share storage with the parameters;
an output head tied to the input embeddings (``tie_word_embeddings``) is the embedding's tensor, so a
checkpoint may leave it out.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from karcher_lab.errors import CheckpointError
from karcher_lab.io.architecture import Source


def resident_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by name, sharing storage with it (writing into one writes the model)."""
    return model.state_dict()


def tied_names(model: torch.nn.Module) -> set[str]:
    """Tensors that are another tensor of the model: the output head when the embeddings are tied."""
    return {"lm_head.weight"} if getattr(getattr(model, "config", None), "tie_word_embeddings", False) else set()


def check_names(model: torch.nn.Module, names: Iterable[str], what: str) -> None:
    """CheckpointError unless ``names`` are exactly the model's tensors (a tied output head may be absent)."""
    names = set(names)
    expected = set(model.state_dict())
    missing = expected - names - tied_names(model)
    unexpected = names - expected
    if missing or unexpected:
        raise CheckpointError(f"{what} does not fit the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")


def fits_exactly(model: torch.nn.Module, source: Source) -> bool:
    """Whether ``source`` holds every tensor of the model (a tied head aside) with its shape and dtype, so
    that writing it in (:func:`write_source`) gives the model loaded from ``source`` itself."""
    tensors = resident_tensors(model)
    names = set(source.tensors)
    if not names <= set(tensors) or set(tensors) - names - tied_names(model):
        return False
    return all(tuple(info.shape) == tuple(tensors[name].shape) and info.dtype == tensors[name].dtype
               for name, info in source.tensors.items())


@torch.no_grad()
def write_tensor(tensors: Mapping[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Copy ``value`` into the model tensor ``name`` of ``tensors`` (:func:`resident_tensors`), cast to its
    dtype and device; CheckpointError for a name the model lacks or another shape."""
    target = tensors.get(name)
    if target is None:
        raise CheckpointError(f"tensor {name!r} is not a tensor of the model")
    if target.shape != value.shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(value.shape)}, the model's {tuple(target.shape)}")
    if value.data_ptr() != target.data_ptr() or value.device != target.device:  # not the model's own tensor
        target.copy_(value)


class ResidentWriter:
    """A merge's sink that writes each tensor into ``model`` in place (:func:`write_tensor`); ``written``
    maps every name written to the model's own tensor (they change when the model is written again)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.tensors = resident_tensors(model)
        self.written: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, value: torch.Tensor) -> None:
        write_tensor(self.tensors, name, value)
        self.written[name] = self.tensors[name]

    def check_complete(self) -> None:
        """CheckpointError unless every tensor of the model was written (a tied output head aside)."""
        check_names(self.model, self.written, "the merged model")


def write_source(model: torch.nn.Module, source: Source) -> None:
    """Every tensor of ``source`` written into ``model`` in place, one at a time (:func:`check_names` first)."""
    check_names(model, source.tensors, f"model {source.label}")
    tensors = resident_tensors(model)
    for name in source.tensors:
        write_tensor(tensors, name, source.load(name))
