"""Checking, before any work, that the models to merge share one architecture.

Every model must hold the same tensor names with the same shapes (dtypes may differ: merging computes
in float32). Differences are reported as a table, one row per differing tensor, one column per model.

Tied embeddings: a model whose config says ``tie_word_embeddings`` (transformers' default when the key
is absent) may store no ``lm_head.weight``. When no model stores one, the output has none either (and
stays tied); when some do, the tied models contribute their input embedding as their head, and the
output stores a head of its own (its config then says ``tie_word_embeddings: false``).

A different number of rows in the embedding (or head) is a vocabulary mismatch, reported as such:
merging rows of different tokens is meaningless without aligning the vocabularies first.

Tensor names also tell which decoder layer a tensor belongs to (:func:`layer_index`): the number after
``layers``, ``layer``, ``h`` or ``blocks`` (``model.layers.7.mlp.up_proj.weight``: Llama, Qwen2, Mistral,
Gemma, GPT-NeoX; ``transformer.h.7.attn.c_attn.weight``: GPT-2, Falcon; ``transformer.blocks.7...``: MPT).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from karcher_lab.errors import ArchitectureMismatchError, VocabularyMismatchError
from karcher_lab.io.checkpoint import TensorInfo

HEAD = "lm_head.weight"
EMBEDDINGS = (
    "model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight", "model.decoder.embed_tokens.weight",
)
MAX_TABLE_ROWS = 20
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
"""The decoder-layer index in a tensor name (module docstring)."""


class Source(Protocol):
    """What the merge reads from a model (see :class:`karcher_lab.io.checkpoint.Checkpoint`)."""

    label: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    directory: Path | None

    def load(self, name: str) -> torch.Tensor: ...

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along axis 0) of tensor ``name``, reading no more of it than they need."""
        ...


@dataclass
class Layout:
    """The shared architecture: output tensor ``names`` in natural order with their ``shapes``, and per
    source the stored name to read for each output name (``lm_head.weight`` → the embedding for a tied
    model). ``untied_head`` is True when the output stores a head although some model was tied."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    stored_names: list[dict[str, str]]
    untied_head: bool

    @property
    def vocabulary_names(self) -> list[str]:
        """The tensors with the vocabulary along axis 0 (input embedding, LM head)."""
        return [n for n in self.names if n == HEAD or n in EMBEDDINGS]


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def layer_tower(name: str) -> str | None:
    """The layer stack (tower) tensor ``name`` belongs to: the part of its name before the layer index
    (``vision_tower.encoder.layers.3.mlp.fc1.weight`` → ``vision_tower.encoder.layers``), None outside
    any layer stack. A LLaVA-style model has two towers, a text decoder and a vision encoder."""
    match = LAYER_INDEX.search(name)
    return name[: match.start(1) - 1] if match else None


def rename_layer(name: str, index: int) -> str:
    """``name`` with its layer index replaced by ``index`` (``model.layers.7.x`` → ``model.layers.2.x``)."""
    match = LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"tensor {name!r} belongs to no layer")
    return f"{name[: match.start(1)]}{index}{name[match.end(1):]}"


def is_embedding(name: str) -> bool:
    """A tensor before the layer stack (token or position embeddings), as opposed to the ones after it
    (final norm, LM head): mergekit's ``pre_weights`` and ``post_weights``."""
    return name in EMBEDDINGS or any(part in name for part in ("embed", "wte.", "wpe."))


def layer_index(name: str) -> int | None:
    """The decoder-layer index of tensor ``name`` (``model.layers.7.mlp.up_proj.weight`` → 7,
    ``transformer.h.3.attn.c_attn.weight`` → 3), None for tensors outside the layer stack (embeddings,
    final norm, LM head)."""
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _embedding_name(source: Source) -> str | None:
    return next((n for n in EMBEDDINGS if n in source.tensors), None)


def _is_tied(source: Source) -> bool:
    return bool(source.config.get("tie_word_embeddings", True))


def _table(rows: list[tuple[str, list[str]]], labels: list[str]) -> str:
    header = ["tensor"] + [f"model {i} ({label})" for i, label in enumerate(labels)]
    body = [[name] + cells for name, cells in rows[:MAX_TABLE_ROWS]]
    widths = [max(len(r[c]) for r in [header] + body) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header] + body]
    if len(rows) > MAX_TABLE_ROWS:
        lines.append(f"... and {len(rows) - MAX_TABLE_ROWS} more differing tensors")
    return "\n".join(lines)


def vocabulary_rows(source: Source) -> int | None:
    """Rows of a model's input embedding (its vocabulary size as stored), None if it has none."""
    name = _embedding_name(source) or (HEAD if HEAD in source.tensors else None)
    return None if name is None else source.tensors[name].shape[0]


def check_architectures(sources: Sequence[Source], allow_crimes: bool = False) -> None:
    """Refuse models whose configs name different ``architectures`` or ``model_type`` (models without a
    config, in-memory state dicts, are not compared), unless ``allow_crimes``: mergekit's rule, as two
    architectures may share tensor names and shapes (Llama, Granite) yet compute differently."""
    if allow_crimes:
        return
    described = [
        (i, s, (tuple(s.config.get("architectures") or ()), s.config.get("model_type")))
        for i, s in enumerate(sources) if s.config
    ]
    if len({kind for _, _, kind in described}) > 1:
        listing = "; ".join(
            f"model {i} ({s.label}): {'/'.join(kind[0]) or 'no architectures'}, model_type {kind[1]}" for i, s, kind in described
        )
        raise ArchitectureMismatchError(
            f"the models are of different architectures ({listing}); merging them would produce a model whose "
            "config names only one of them. Pass --allow-crimes (allow_crimes=True) to merge them anyway, as "
            "mergekit's --allow-crimes does"
        )


def check_layout(sources: Sequence[Source], aligned_vocabulary: int | None = None) -> Layout:
    """The layout the models share, or ArchitectureMismatchError / VocabularyMismatchError with a table.

    With ``aligned_vocabulary`` (the size of the vocabulary the embeddings are aligned to, see
    :mod:`karcher_lab.io.vocabulary`) the vocabulary tensors may differ in rows; their output shape
    has that many rows."""
    stored: list[dict[str, str]] = [{n: n for n in s.tensors} for s in sources]
    has_head = [HEAD in s.tensors for s in sources]
    untied_head = False
    if any(has_head) and not all(has_head):
        for s, names, head in zip(sources, stored, has_head):
            embedding = _embedding_name(s)
            if not head and _is_tied(s) and embedding is not None:
                names[HEAD] = embedding
                untied_head = True
    all_names = sorted(set().union(*stored), key=natural_key)

    def shape(i: int, name: str) -> tuple[int, ...] | None:
        stored_name = stored[i].get(name)
        return None if stored_name is None else sources[i].tensors[stored_name].shape

    rows = []
    vocab_rows = False
    for name in all_names:
        shapes = [shape(i, name) for i in range(len(sources))]
        if all(s == shapes[0] for s in shapes):
            continue
        present = [s for s in shapes if s is not None]
        if (name == HEAD or name in EMBEDDINGS) and len(present) == len(shapes) and all(
            s[1:] == present[0][1:] for s in present
        ):
            if aligned_vocabulary is not None:
                continue
            vocab_rows = True
        rows.append((name, ["missing" if s is None else str(list(s)) for s in shapes]))
    labels = [s.label for s in sources]
    if vocab_rows:
        sizes = ", ".join(f"model {i} ({s.label}) {vocabulary_rows(s)}" for i, s in enumerate(sources))
        raise VocabularyMismatchError(
            f"the models have different vocabulary sizes (embedding rows: {sizes}); rows of different "
            "tokens cannot be merged as they are: set tokenizer_source (base, or one of the models) to "
            f"align the vocabularies by token, as mergekit does.\n{_table(rows, labels)}"
        )
    if rows:
        raise ArchitectureMismatchError(
            f"the models do not share one architecture: {len(rows)} tensor(s) differ in name or shape "
            f"(dtypes may differ, shapes may not).\n{_table(rows, labels)}"
        )
    shapes = {n: shape(0, n) for n in all_names}
    if aligned_vocabulary is not None:
        for n in all_names:
            if n == HEAD or n in EMBEDDINGS:
                shapes[n] = (aligned_vocabulary, *shapes[n][1:])
    return Layout(
        names=all_names,
        shapes=shapes,
        stored_names=stored,
        untied_head=untied_head,
    )
