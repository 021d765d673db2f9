"""Aligning vocabularies by token when the recipe names a ``tokenizer_source`` (mergekit semantics).

Models whose tokenizers differ (extra added tokens, other ids) have embedding and LM-head rows that do
not correspond. With ``tokenizer_source: base`` or ``tokenizer_source: <one of the models>`` the output
uses that tokenizer's vocabulary V (token → id), and every model's vocabulary tensors (embedding,
head; vocabulary along axis 0) are first rewritten into V's order, row ``V[token]`` taken from the row
the model's own tokenizer gives that token. A token some models lack gets, in those models, a default
row, exactly as mergekit 0.1.5 (``tokenizer/embed.py``) chooses it:

* present in exactly one model: that model's row;
* present in the base model: the base's row;
* otherwise: the mean of the rows of the models that have it (zero if none has it).

Then the method merges the aligned rows as usual, and the output's ``vocab_size`` is |V| (rows a model
keeps beyond its tokenizer's vocabulary, e.g. padding, are dropped, as mergekit drops them). With
identical tokenizers this is the identity (apart from that truncation). ``tokenizer_source: union``
is supported only when all tokenizers are identical.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from karcher_lab.errors import CheckpointError, NotSupportedError


def tokenizer_vocabulary(source) -> dict[str, int]:
    """token → id of a model's tokenizer (loaded with transformers, never trusting remote code)."""
    if source.directory is None:
        raise CheckpointError(f"model {source.label}: aligning vocabularies needs its tokenizer, but it is in memory")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.directory), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"model {source.label}: cannot load its tokenizer to align vocabularies ({exc})") from None
    return dict(tokenizer.get_vocab())


@dataclass
class VocabularyAlignment:
    """Row maps from the target vocabulary to each source: ``rows[k][v]`` is the row of source k
    holding target token v, or −1 where source k lacks it; ``base_index`` is the base's source index."""

    size: int
    rows: list[torch.Tensor]
    base_index: int | None

    @classmethod
    def build(
        cls, target: dict[str, int], vocabularies: Sequence[dict[str, int]], n_rows: Sequence[int], base_index: int | None
    ) -> "VocabularyAlignment":
        """``target``: the output vocabulary; per source its tokenizer's vocabulary and embedding rows
        (a token whose id is not below the rows, e.g. an added token without an embedding, is absent)."""
        size = max(target.values()) + 1 if target else 0
        if sorted(target.values()) != list(range(size)):
            raise NotSupportedError("the tokenizer_source vocabulary has gaps in its token ids; aligning it is not supported")
        tokens = sorted(target, key=target.get)
        rows = []
        for vocab, n in zip(vocabularies, n_rows):
            ids = torch.tensor([vocab.get(t, -1) for t in tokens], dtype=torch.int64)
            rows.append(torch.where(ids < n, ids, -1))
        return cls(size, rows, base_index)

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each source's vocabulary tensor (rows along axis 0) rewritten into the target order."""
        device = tensors[0].device
        rows = [r.to(device) for r in self.rows]
        present = torch.stack([r >= 0 for r in rows])  # [sources, V]
        count = present.sum(0)
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        fill = torch.zeros((self.size, *tensors[0].shape[1:]), dtype=dtype, device=device)
        missing_somewhere = (count < len(tensors)).nonzero().flatten()
        for v in missing_somewhere.tolist():
            holders = present[:, v].nonzero().flatten().tolist()
            if len(holders) == 1:
                fill[v] = tensors[holders[0]][rows[holders[0]][v]]
            elif self.base_index is not None and present[self.base_index, v]:
                fill[v] = tensors[self.base_index][rows[self.base_index][v]]
            elif holders:
                fill[v] = sum(tensors[k][rows[k][v]].to(dtype) for k in holders) / len(holders)
        out = []
        for r, t in zip(rows, tensors):
            aligned = fill.to(t.dtype).clone()
            have = r >= 0
            aligned[have] = t[r[have]]
            out.append(aligned)
        return out
