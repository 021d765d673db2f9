"""Token sequences of prompt/answer examples: padded batches for teacher forcing and greedy decoding.

A sequence is ``prompt answer </s>``, the prompt encoded as the tokenizer encodes a text (with its own
BOS and special tokens: ``<s>`` for the zoo's character tokenizer, none for GPT-2's), or, with
``chat_template``, rendered by the tokenizer's chat template and encoded without adding special tokens
(the template writes its own). The answer is encoded without special tokens and closed by ``</s>``.
Its labels are the ids themselves (the model shifts them), with ``IGNORE`` on padding and, when only the
answer is supervised, on the prompt too. Teacher-forcing batches are right-padded (causal attention never
looks right, so no attention mask is needed); generation batches are left-padded with an attention
mask, so every prompt ends at the last column.

Greedy decoding (:func:`greedy_ids`) continues each prompt with the most likely token until ``</s>``,
for at most a given number of new tokens per example; :func:`greedy_answers` decodes up to (longest
answer + 2) tokens of each (a longer continuation is wrong anyway), the zoo's exact match.
:mod:`karcher_lab.diagnostics.scoring` decodes under a task's options instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from karcher_lab.diagnostics.examples import Example
from karcher_lab.errors import InputError

IGNORE = -100
"""Label of positions that are not supervised (transformers' cross-entropy ignore index)."""

GENERATION_BATCH = 256
"""Prompts decoded together by :func:`greedy_ids`."""

GREEDY_SLACK = 2
""":func:`greedy_answers` generates at most the longest answer's token count + this many tokens (its
``</s>`` and one more)."""


@dataclass(frozen=True)
class EncodedExample:
    """An example's token ids ``prompt answer </s>`` and the number of prompt tokens."""

    ids: tuple[int, ...]
    prompt_len: int

    @property
    def answer_len(self) -> int:
        """The number of answer tokens, ``</s>`` not counted."""
        return len(self.ids) - self.prompt_len - 1


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise InputError("the tokenizer has neither a pad nor an end-of-sequence token")
    return pad


def prompt_texts(tokenizer, examples: list[Example], chat_template: bool) -> list[str]:
    """The examples' prompts, each rendered as one user message by the tokenizer's chat template (with
    the generation prompt) when ``chat_template``, else as given."""
    if not chat_template:
        return [e.prompt for e in examples]
    return [tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}], add_generation_prompt=True,
                                          tokenize=False) for e in examples]


def encode(tokenizer, examples: list[Example], chat_template: bool = False) -> list[EncodedExample]:
    """Tokenize examples as ``prompt answer </s>`` (see the module docstring).

    Parameters
    ----------
    tokenizer
        A transformers tokenizer with an end-of-sequence token.
    examples : list of Example
    chat_template : bool
        Render each prompt with the tokenizer's chat template (:func:`prompt_texts`).

    Returns
    -------
    list of EncodedExample

    Raises
    ------
    InputError
        The tokenizer has no end-of-sequence token, or a prompt encodes to no token (an empty prompt
        with a tokenizer that adds no BOS: the answer would have no context).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no end-of-sequence token, which closes every answer")
    texts = prompt_texts(tokenizer, examples, chat_template)
    prompts = tokenizer(texts, add_special_tokens=not chat_template)["input_ids"]
    empty = next((e.prompt for e, p in zip(examples, prompts) if not p), None)
    if empty is not None:
        raise InputError(f"the prompt {empty!r} encodes to no token (the tokenizer adds no BOS): an answer needs "
                         "a prompt token to be predicted from")
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
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
def greedy_ids(model, tokenizer, items: list[EncodedExample], budgets: list[int]) -> list[list[int]]:
    """Each item's greedy continuation of its prompt: at most its ``budgets`` entry of new tokens, up to
    (not including) ``</s>``.

    Parameters
    ----------
    model
        A transformers causal LM (``generate``).
    tokenizer
    items : list of EncodedExample
    budgets : list of int
        The most new tokens of each item (prompts are decoded :data:`GENERATION_BATCH` at a time, each
        batch for its largest budget, and every row cut to its own: greedy rows do not depend on each
        other).

    Returns
    -------
    list of list of int
    """
    pad, device, eos = pad_id(tokenizer), model_device(model), tokenizer.eos_token_id
    generated = []
    for start in range(0, len(items), GENERATION_BATCH):
        limits = budgets[start : start + GENERATION_BATCH]
        input_ids, attention_mask = prompt_batch(items[start : start + GENERATION_BATCH], pad)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max(limits), do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for row, limit in zip(out[:, input_ids.shape[1] :].tolist(), limits):
            row = row[:limit]
            generated.append(row[: row.index(eos)] if eos in row else row)
    return generated


def greedy_answers(model, tokenizer, examples: list[Example]) -> list[str]:
    """The model's greedy continuation of each prompt, up to (not including) ``</s>``, for at most the
    longest answer's token count + :data:`GREEDY_SLACK` tokens, decoded as it is (:func:`greedy_ids`)."""
    items = encode(tokenizer, examples)
    budget = max(item.answer_len for item in items) + GREEDY_SLACK
    return [tokenizer.decode(ids) for ids in greedy_ids(model, tokenizer, items, [budget] * len(items))]
