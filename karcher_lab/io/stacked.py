"""Layer stacks assembled from slices of models (mergekit's ``slices``: frankenmerges).

An output slice takes layers [start, end) of a model and places them, renumbered, after the layers of
the slices before it. :class:`RemappedSource` presents such an assembly as one model: each output
tensor name is read from some tensor of some source. :func:`slice_names` gives the renaming of one
slice; the tensors outside the layer stack come from the first slice's model (embeddings,
:func:`~karcher_lab.io.architecture.is_embedding`) or the last slice's model (final norm, LM head), as
mergekit takes its ``pre_weights`` from the first slice and its ``post_weights`` from the last.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from karcher_lab.errors import NotSupportedError
from karcher_lab.io.architecture import Source, is_embedding, layer_index, layer_tower, rename_layer
from karcher_lab.io.checkpoint import TensorInfo


class RemappedSource:
    """A :class:`~karcher_lab.io.architecture.Source` whose tensor ``name`` is tensor ``stored`` of
    source ``src`` for each ``reads[name] = (src, stored)``; ``config`` and ``directory`` are given."""

    def __init__(self, label: str, config: Mapping[str, Any], directory: Path | None, reads: Mapping[str, tuple[Source, str]]):
        self.label = label
        self.config = dict(config)
        self.directory = directory
        self._reads = dict(reads)
        self.tensors: dict[str, TensorInfo] = {name: src.tensors[stored] for name, (src, stored) in self._reads.items()}

    def load(self, name: str) -> torch.Tensor:
        src, stored = self._reads[name]
        return src.load(stored)

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        src, stored = self._reads[name]
        return src.load_rows(stored, start, stop)


def single_tower(source: Source) -> str:
    """The one layer stack of ``source``; slicing a model with several (a vision tower beside the text
    decoder) is refused, as mergekit refuses ``slices`` for such models."""
    towers = {t for t in map(layer_tower, source.tensors) if t is not None}
    if len(towers) != 1:
        what = f"{len(towers)} layer stacks ({', '.join(sorted(towers))})" if towers else "no layer stack"
        raise NotSupportedError(f"slices: model {source.label} has {what}; slices need a model with one stack of layers")
    return towers.pop()


def slice_names(source: Source, layer_range: tuple[int, int], out_start: int) -> dict[str, str]:
    """Output name → stored name for layers [start, end) of ``source`` placed at layers
    out_start, out_start + 1, … of the output."""
    single_tower(source)
    start, end = layer_range
    return {
        rename_layer(name, out_start + index - start): name
        for name in source.tensors
        if (index := layer_index(name)) is not None and start <= index < end
    }


def outer_names(source: Source, embeddings: bool) -> list[str]:
    """The tensors of ``source`` outside the layer stack: its embeddings, or the ones after the layers."""
    return [n for n in source.tensors if layer_index(n) is None and is_embedding(n) == embeddings]
