"""Scoring a causal LM on task examples: exact match of the greedy answer, and answer NLL.

- exact match: greedy decoding from ``<s> prompt`` until ``</s>``
  (:func:`karcher_lab.diagnostics.sequences.greedy_answers`); the decoded text must equal the answer
  exactly.
- chat: for chat models (SmolLM2), the greedy reply to one user message through the chat template.
- NLL: mean over examples of -(1/T) Σ_t log p(a_t | <s> prompt a_<t), in nats per token, over the T
  answer tokens plus the closing ``</s>``.
"""
from __future__ import annotations

import torch

from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.sequences import IGNORE, encode, greedy_answers, teacher_forcing_batch

BATCH = 256
"""Examples scored together by :func:`answer_nll`."""


def exact_match(model, tokenizer, examples: list[Example]) -> float:
    """Fraction of examples whose greedy answer equals the expected answer."""
    answers = greedy_answers(model, tokenizer, examples)
    return sum(a == e.answer for a, e in zip(answers, examples)) / len(examples)


@torch.no_grad()
def answer_nll(model, tokenizer, examples: list[Example]) -> float:
    """Mean per-token NLL (nats) of answer + ``</s>`` given ``<s> prompt``, averaged over examples."""
    items = encode(tokenizer, examples)
    total = 0.0
    for start in range(0, len(items), BATCH):
        input_ids, labels = teacher_forcing_batch(items[start : start + BATCH], tokenizer.pad_token_id, True)
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != IGNORE
        token_nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
        )
        total += ((token_nll * mask).sum(1) / mask.sum(1)).sum().item()
    return total / len(items)


def evaluate(model, tokenizer, examples: list[Example]) -> dict[str, float]:
    """``{"accuracy": exact match, "nll": answer NLL}`` on ``examples``."""
    return {"accuracy": exact_match(model, tokenizer, examples), "nll": answer_nll(model, tokenizer, examples)}


def greedy_chat_answer(model, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    """The model's greedy reply to one user message, through its chat template."""
    batch = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
