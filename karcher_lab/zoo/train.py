"""Fine-tuning loop shared by the base pretraining and the experts: AdamW on teacher-forced sequences.

Each step draws ``batch_size`` sequences uniformly with replacement from the training set (a seeded
generator, so a run is a pure function of its inputs on a fixed thread count), minimises the mean
next-token cross-entropy over the supervised tokens, clips the gradient norm to 1 and follows a
linear warm-up over the first 10% of the steps, then a cosine decay to 10% of the peak rate.

Training runs under :func:`deterministic` (deterministic algorithms on a fixed thread count), so the
same inputs give the same weights.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch

from karcher_lab.diagnostics.sequences import EncodedExample, teacher_forcing_batch

WARMUP_FRACTION = 0.1
FINAL_LR_FRACTION = 0.1


@contextmanager
def deterministic(threads: int):
    """Run torch deterministically on ``threads`` threads, without transformers' progress bars; restore after."""
    from transformers.utils import logging

    previous = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])
        if previous[2]:
            logging.enable_progress_bar()


def lr_factor(step: int, steps: int) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine from 1 down to FINAL_LR_FRACTION."""
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def train_causal_lm(
    model: torch.nn.Module,
    items: list[EncodedExample],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    answer_only: bool,
    weight_decay: float = 0.0,
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place for ``steps`` steps; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps))
    losses = []
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(items), (batch_size,), generator=generator).tolist()
        input_ids, labels = teacher_forcing_batch([items[r] for r in rows], pad_id, answer_only)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(losses[-1])
    model.eval()
    return losses
