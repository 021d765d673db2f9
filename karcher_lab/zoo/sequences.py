"""Token sequences of task examples, and the padded batches the trainer and the evaluator feed models.

A training sequence is ``<s> prompt answer </s>``. Its labels are the ids themselves (the model shifts
them), with ``-100`` (ignored) on padding and, when only the answer is supervised, on ``<s>`` and
the prompt too. Batches for teacher forcing are right-padded (causal attention never looks right, so
no attention mask is needed); generation batches are left-padded with an attention mask and explicit
position ids, so every prompt ends at the last column.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from karcher_lab.zoo.tasks import Example

IGNORE = -100


@dataclass(frozen=True)
class EncodedExample:
    ids: tuple[int, ...]  # <s> prompt answer </s>
    prompt_len: int  # tokens of <s> + prompt


def encode(tokenizer, examples: list[Example]) -> list[EncodedExample]:
    """Tokenize examples as ``<s> prompt answer </s>`` (the tokenizer adds ``<s>``)."""
    prompts = tokenizer([e.prompt for e in examples])["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [EncodedExample(tuple(p) + tuple(a) + (eos,), len(p)) for p, a in zip(prompts, answers)]


def teacher_forcing_batch(items: list[EncodedExample], pad_id: int, answer_only: bool):
    """Right-padded ``(input_ids, labels)``; labels ignore padding and, if ``answer_only``, the prompt."""
    width = max(len(item.ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, item in enumerate(items):
        ids = torch.tensor(item.ids)
        input_ids[row, : len(ids)] = ids
        first = item.prompt_len if answer_only else 0
        labels[row, first : len(ids)] = ids[first:]
    return input_ids, labels


def prompt_batch(items: list[EncodedExample], pad_id: int):
    """Left-padded prompts ``(input_ids, attention_mask)`` for batched greedy generation."""
    width = max(item.prompt_len for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, width - item.prompt_len :] = torch.tensor(item.ids[: item.prompt_len])
        attention_mask[row, width - item.prompt_len :] = 1
    return input_ids, attention_mask
