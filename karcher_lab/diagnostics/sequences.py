"""Token sequences of prompt/answer examples: padded batches for teacher forcing and greedy decoding.

A sequence is ``<s> prompt answer </s>`` (``<s>`` as the tokenizer adds it). Its labels are the ids
themselves (the model shifts them), with ``IGNORE`` on padding and, when only the answer is
supervised, on ``<s>`` and the prompt too. Teacher-forcing batches are right-padded (causal attention
never looks right, so no attention mask is needed); generation batches are left-padded with an
attention mask, so every prompt ends at the last column.

Greedy decoding (:func:`greedy_answers`) continues each ``<s> prompt`` with the most likely token until
``</s>``, for at most (longest answer + 2) new tokens: a longer continuation is wrong anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from karcher_lab.diagnostics.examples import Example

IGNORE = -100
"""Label of positions that are not supervised (transformers' cross-entropy ignore index)."""

GENERATION_BATCH = 256
"""Prompts decoded together by :func:`greedy_answers`."""


@dataclass(frozen=True)
class EncodedExample:
    """An example's token ids ``<s> prompt answer </s>`` and the number of ``<s> prompt`` tokens."""

    ids: tuple[int, ...]
    prompt_len: int


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


@torch.no_grad()
def greedy_answers(model, tokenizer, examples: list[Example]) -> list[str]:
    """The model's greedy continuation of each prompt, up to (not including) ``</s>``."""
    items = encode(tokenizer, examples)
    max_new = max(len(item.ids) - item.prompt_len for item in items) + 1
    answers = []
    for start in range(0, len(items), GENERATION_BATCH):
        input_ids, attention_mask = prompt_batch(items[start : start + GENERATION_BATCH], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, input_ids.shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row))
    return answers
