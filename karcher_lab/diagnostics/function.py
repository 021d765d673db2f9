"""Function-space metrics: how well a model does a task, and how far its predictions are from an expert's.

All metrics read the answer positions of teacher-forced task sequences ``<s> prompt answer </s>``
(:mod:`karcher_lab.zoo.sequences`): position t predicts answer token a_t (the closing ``</s>``
included) from ``<s> prompt a_<t``. For each example, per-position values are averaged over its
answer positions; tables report the ``mean`` and ``std`` over examples and their number ``n``.

- **nll**: −(1/T) Σ_t log p_θ(a_t | …) in nats per answer token; **perplexity** = exp(mean NLL over the
  task's examples) (a corpus-level value: its ``std`` is NaN).
- **accuracy**: greedy exact match (batched greedy decoding, :func:`karcher_lab.zoo.evaluate.greedy_answers`);
  per example 0 or 1, so std = √(p(1 − p)) up to the n − 1 correction.
- **kl**: KL(p_ref ‖ p_model) = Σ_v p_ref(v) (log p_ref(v) − log p_model(v)) of the next-token
  distributions, the paper's function distance (eq. 2: the expected NLL under the teacher's labels is
  this KL plus a constant).
- **fisher_rao**: d_FR(p_ref, p_model) = 2 arccos Σ_v √(p_ref p_model), from
  :func:`karcher_lab.geometry.simplex.fr_distance` (locally d_FR² ≈ 2 KL, the paper's eq. 1).
- **normalized_accuracy**: merged accuracy / expert accuracy on the expert's task (the GeoMerge paper's
  metric); NaN where the expert's accuracy is 0.
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import pandas as pd
import torch

from karcher_lab.errors import EmptyInputError, InputError
from karcher_lab.geometry.simplex import fr_distance
from karcher_lab.zoo.evaluate import greedy_answers
from karcher_lab.zoo.sequences import IGNORE, encode, teacher_forcing_batch
from karcher_lab.zoo.tasks import Example

QUALITY_COLUMNS = ["model", "task", "metric", "mean", "std", "n"]
DISTANCE_COLUMNS = ["reference", "model", "task", "metric", "mean", "std", "n"]


def _check_examples(examples_by_task: Mapping[str, Sequence[Example]]) -> None:
    if not examples_by_task:
        raise EmptyInputError("no tasks given")
    for task, examples in examples_by_task.items():
        if len(examples) == 0:
            raise EmptyInputError(f"task {task!r} has no examples")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def answer_batches(tokenizer, examples: Sequence[Example], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, targets)`` batches; ``targets[:, t]`` is the token position t predicts,
    IGNORE outside the answer."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise InputError("the tokenizer has neither a pad nor an end-of-sequence token")
    items = encode(tokenizer, list(examples))
    for start in range(0, len(items), batch_size):
        input_ids, labels = teacher_forcing_batch(items[start : start + batch_size], pad_id, True)
        yield input_ids, labels[:, 1:]


def _answer_log_probs(model, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (float64) at the answer positions, [P, V], and each position's example row, [P]."""
    device = model_device(model)
    logits = model(input_ids=input_ids.to(device)).logits[:, :-1]
    answer = (targets != IGNORE).to(device)
    rows = answer.nonzero()[:, 0]
    return torch.log_softmax(logits[answer].double(), dim=-1), rows


def _per_example_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of per-position ``values`` over each example's positions ([n_rows])."""
    total = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    count = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, torch.ones_like(values))
    return total / count


@torch.no_grad()
def answer_nll(model, tokenizer, examples: Sequence[Example], batch_size: int = 32) -> torch.Tensor:
    """Per-example NLL of the answer (nats per answer token, ``</s>`` included): [len(examples)] float64."""
    out = []
    for input_ids, targets in answer_batches(tokenizer, examples, batch_size):
        log_probs, rows = _answer_log_probs(model, input_ids, targets)
        answer = targets[targets != IGNORE].to(log_probs.device)
        token_nll = -log_probs.gather(1, answer[:, None])[:, 0]
        out.append(_per_example_mean(token_nll, rows, input_ids.shape[0]).cpu())
    return torch.cat(out)


def exact_matches(model, tokenizer, examples: Sequence[Example]) -> torch.Tensor:
    """Per-example greedy exact match, 1.0 or 0.0: [len(examples)] float64."""
    answers = greedy_answers(model, tokenizer, list(examples))
    return torch.tensor([float(a == e.answer) for a, e in zip(answers, examples)], dtype=torch.float64)


def _summary(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std()) if values.numel() > 1 else float("nan")


def task_quality(
    model, tokenizer, examples_by_task: Mapping[str, Sequence[Example]], *, model_name: str = "model",
    batch_size: int = 32, accuracy: bool = True,
) -> pd.DataFrame:
    """Per task: ``accuracy`` (greedy exact match; skipped with ``accuracy=False``), ``nll`` and
    ``perplexity`` of the answer tokens. Rows: model × task × metric, with mean, std over examples, n."""
    _check_examples(examples_by_task)
    rows = []
    for task, examples in examples_by_task.items():
        nll = answer_nll(model, tokenizer, examples, batch_size)
        n = len(examples)
        if accuracy:
            rows.append(dict(model=model_name, task=task, metric="accuracy", n=n,
                             **dict(zip(("mean", "std"), _summary(exact_matches(model, tokenizer, examples))))))
        mean, std = _summary(nll)
        rows.append(dict(model=model_name, task=task, metric="nll", mean=mean, std=std, n=n))
        rows.append(dict(model=model_name, task=task, metric="perplexity", mean=math.exp(mean), std=float("nan"), n=n))
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


@torch.no_grad()
def function_distance(
    reference, model, tokenizer, examples_by_task: Mapping[str, Sequence[Example]], *,
    reference_name: str = "expert", model_name: str = "merged", batch_size: int = 32,
) -> pd.DataFrame:
    """KL(p_reference ‖ p_model) (eq. 2) and the Fisher–Rao distance between the two models' next-token
    distributions, averaged over each example's answer positions. Rows: reference × model × task ×
    metric (``kl``, ``fisher_rao``), with mean, std over examples, n. The models share the tokenizer."""
    _check_examples(examples_by_task)
    rows = []
    for task, examples in examples_by_task.items():
        kl, fr = [], []
        for input_ids, targets in answer_batches(tokenizer, examples, batch_size):
            log_p, positions = _answer_log_probs(reference, input_ids, targets)
            log_q, _ = _answer_log_probs(model, input_ids, targets)
            log_q = log_q.to(log_p.device)
            if log_q.shape != log_p.shape:
                raise InputError(f"the models' vocabularies differ ({log_p.shape[-1]} vs {log_q.shape[-1]} logits)")
            p = log_p.exp()
            kl.append(_per_example_mean((p * (log_p - log_q)).sum(-1), positions, input_ids.shape[0]).cpu())
            fr.append(_per_example_mean(fr_distance(p, log_q.exp()), positions, input_ids.shape[0]).cpu())
        for metric, values in (("kl", torch.cat(kl)), ("fisher_rao", torch.cat(fr))):
            mean, std = _summary(values)
            rows.append(dict(reference=reference_name, model=model_name, task=task, metric=metric, mean=mean, std=std, n=len(examples)))
    return pd.DataFrame(rows, columns=DISTANCE_COLUMNS)


def normalized_accuracy(merged: pd.DataFrame, experts: pd.DataFrame) -> pd.DataFrame:
    """Merged accuracy / expert accuracy per task, from :func:`task_quality` tables: ``merged`` holds the
    merged model(s), ``experts`` each task's expert on its own task. Rows: model × task ×
    ``normalized_accuracy`` (std NaN; NaN where the expert's accuracy is 0)."""
    expert_acc = experts[experts["metric"] == "accuracy"].set_index("task")["mean"]
    if expert_acc.index.has_duplicates:
        raise InputError("the experts' table has more than one accuracy per task: give each task's expert only")
    rows = []
    for _, row in merged[merged["metric"] == "accuracy"].iterrows():
        if row["task"] not in expert_acc.index:
            raise InputError(f"no expert accuracy for task {row['task']!r}")
        reference = float(expert_acc[row["task"]])
        rows.append(dict(model=row["model"], task=row["task"], metric="normalized_accuracy",
                         mean=row["mean"] / reference if reference > 0 else float("nan"), std=float("nan"), n=row["n"]))
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)
