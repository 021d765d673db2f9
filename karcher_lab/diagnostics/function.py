"""Function-space metrics: how well a model does a task, and how far its predictions are from an expert's.

All metrics read the answer positions of teacher-forced task sequences ``prompt answer </s>``
(:mod:`karcher_lab.diagnostics.sequences`; the prompt starts with the tokenizer's own BOS, e.g. ``<s>``):
position t predicts answer token a_t (the closing ``</s>`` included) from ``prompt a_<t``. For each
example, per-position values are averaged over its answer positions; tables report the ``mean`` and
``std`` over examples and their number ``n``.
Each task's examples (``examples_by_task``) are :class:`~karcher_lab.diagnostics.examples.Example` s or
dicts with ``prompt`` and ``answer`` keys, checked by :func:`karcher_lab.diagnostics.task_data.as_examples`.
Every metric takes ``scoring={task: TaskScoring}`` (:mod:`karcher_lab.diagnostics.scoring`): a task named
there has its prompts rendered by the chat template if asked, and its exact match decoded, cut at a
newline and normalized (:func:`~karcher_lab.diagnostics.scoring.scored_answers`); a task not named is
scored as without it.

- **nll**: −(1/T) Σ_t log p_θ(a_t | …) in nats per answer token; **perplexity** = exp(mean NLL over the
  task's examples) (a corpus-level value: its ``std`` is NaN).
- **accuracy**: greedy exact match (batched greedy decoding, :func:`karcher_lab.diagnostics.sequences.greedy_answers`);
  per example 0 or 1, so std = √(p(1 − p)) up to the n − 1 correction. ``exact_match="teacher_forced"``
  reads it from the teacher-forced pass instead (:func:`forced_exact_matches`) for the tasks without a
  ``TaskScoring``: greedy decoding reproduces the answer iff argmax_v p(v | prompt a_<t) = a_t at every
  answer position, ``</s>`` included, so with a tokenizer whose answer tokenization is unique (the zoo's
  character tokenizer) both give the same 0/1 per example, up to exact ties of the top two logits. One
  forward pass instead of one per generated token. A task with a ``TaskScoring`` is always decoded: its
  newline stop and normalization have no teacher-forced equivalent.
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
import operator
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd
import torch

from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.scoring import TaskScoring, check_scoring, scored_answers
from karcher_lab.diagnostics.sequences import (
    IGNORE, EncodedExample, encode, greedy_answers, model_device, pad_id, teacher_forcing_batch,
)
from karcher_lab.diagnostics.task_data import TaskExamples, as_examples
from karcher_lab.errors import InputError, ParameterError
from karcher_lab.geometry.simplex import fr_distance

QUALITY_COLUMNS = ["model", "task", "metric", "mean", "std", "n"]
DISTANCE_COLUMNS = ["reference", "model", "task", "metric", "mean", "std", "n"]
EXACT_MATCH_MODES = ("greedy", "teacher_forced")


@dataclass(frozen=True)
class AnswerLogProbs:
    """One model's teacher-forced log-probabilities at the answer positions of ``n`` examples:
    ``log_probs`` [P, V] float64, ``rows`` [P] (the example of each position, 0..n-1) and ``answers``
    [P] (the token each position should predict). Computed once, it stands in for the model in
    :func:`function_distance` and :func:`task_quality` (e.g. an expert's, cached across merges)."""

    log_probs: torch.Tensor
    rows: torch.Tensor
    answers: torch.Tensor
    n: int

    def examples(self, start: int, stop: int) -> "AnswerLogProbs":
        """The positions of examples start..stop-1, renumbered from 0."""
        keep = (self.rows >= start) & (self.rows < stop)
        return AnswerLogProbs(self.log_probs[keep], self.rows[keep] - start, self.answers[keep], stop - start)


PADDING_SLACK = 1.25
"""A batch of length-sorted sequences is closed before its padded size (rows × longest) would exceed
this multiple of its real tokens."""


def length_batches(lengths: Sequence[int], batch_size: int, slack: float = PADDING_SLACK) -> list[list[int]]:
    """Indices of sequences of the given ``lengths`` in batches of at most ``batch_size``, shortest
    first, each batch closed before rows × longest would exceed ``slack`` × its tokens: padding costs a
    forward pass as much as real tokens."""
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {batch_size}")
    batches, current, tokens = [], [], 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        length = lengths[index]
        if current and (len(current) == batch_size or (len(current) + 1) * length > slack * (tokens + length)):
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += length
    return batches + [current] if current else batches


Batches = Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]


def answer_batches(tokenizer, examples: Sequence[Example], batch_size: int) -> Batches:
    """Right-padded ``(indices, input_ids, targets)`` batches of similar-length examples
    (:func:`encoded_batches` of their :func:`~karcher_lab.diagnostics.sequences.encode`)."""
    return encoded_batches(encode(tokenizer, list(examples)), pad_id(tokenizer), batch_size)


def encoded_batches(items: Sequence[EncodedExample], pad: int, batch_size: int) -> Batches:
    """Right-padded ``(indices, input_ids, targets)`` batches of similar-length encoded examples
    (:func:`length_batches`), padded with ``pad``: ``indices`` are the batch's examples' positions in
    ``items``, ``targets[:, t]`` is the token position t predicts, IGNORE outside the answer."""
    for indices in length_batches([len(item.ids) for item in items], batch_size):
        input_ids, labels = teacher_forcing_batch([items[i] for i in indices], pad, True)
        yield indices, input_ids, labels[:, 1:]


def answer_logits(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's logits at the answer positions (where ``targets`` is not IGNORE), [P, V], row-major.
    The output head (``get_output_embeddings()``: a vocabulary-sized matmul per position, a quarter of
    SmolLM2-135M's forward) runs on those P positions only, through a pre-hook that gathers them from
    its input; a model without such a head, or whose head is not called once on the [B, T, d] hidden
    states, gets its full logits, then indexed."""
    device = model_device(model)
    answer = (targets != IGNORE).to(device)
    positions = torch.nn.functional.pad(answer, (0, 1))  # over input positions: the last one predicts nothing
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        handle = head.register_forward_pre_hook(lambda module, args: (args[0][positions][None], *args[1:]))
        try:
            logits = model(input_ids=input_ids.to(device)).logits
        finally:
            handle.remove()
        if logits.shape[:2] == (1, int(answer.sum())):
            return logits[0]
    return model(input_ids=input_ids.to(device)).logits[:, :-1][answer]


def _per_example_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of per-position ``values`` over each example's positions ([n_rows])."""
    total = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    count = torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, torch.ones_like(values))
    return total / count


@torch.no_grad()
def answer_log_probs(
    model, tokenizer, examples_by_task: TaskExamples, batch_size: int = 32, *,
    scoring: Mapping[str, TaskScoring] | None = None,
) -> dict[str, AnswerLogProbs]:
    """Teacher-forced answer log-probabilities of ``model`` per task: all tasks' examples in one stream
    of length-sorted batches of at most ``batch_size`` (:func:`encoded_batches`; right padding with causal
    attention leaves every value as in a batch of one), logits at the answer positions only
    (:func:`answer_logits`), positions returned in example order. Memory: (answer tokens) × V float64.
    ``scoring``: options by task (:func:`~karcher_lab.diagnostics.scoring.check_scoring`); its
    ``chat_template`` renders the task's prompts."""
    examples_by_task = as_examples(examples_by_task)
    scoring = check_scoring(tokenizer, scoring, examples_by_task)
    items = [item for task, task_examples in examples_by_task.items()
             for item in encode(tokenizer, task_examples, task in scoring and scoring[task].chat_template)]
    log_probs, rows, answers = [], [], []
    for indices, input_ids, targets in encoded_batches(items, pad_id(tokenizer), batch_size):
        batch_log_probs = torch.log_softmax(answer_logits(model, input_ids, targets).double(), dim=-1)
        device = batch_log_probs.device
        answer = (targets != IGNORE).to(device)
        log_probs.append(batch_log_probs)
        rows.append(torch.tensor(indices, device=device)[answer.nonzero()[:, 0]])
        answers.append(targets.to(device)[answer])
    rows = torch.cat(rows)
    order = torch.argsort(rows, stable=True)  # example order; an example's positions stay in order
    every = AnswerLogProbs(torch.cat(log_probs)[order], rows[order], torch.cat(answers)[order], len(items))
    out, start = {}, 0
    for task, task_examples in examples_by_task.items():
        out[task] = every.examples(start, start + len(task_examples))
        start += len(task_examples)
    return out


def _nll(scores: AnswerLogProbs) -> torch.Tensor:
    token_nll = -scores.log_probs.gather(1, scores.answers[:, None])[:, 0]
    return _per_example_mean(token_nll, scores.rows, scores.n).cpu()


def answer_nll(model, tokenizer, examples: Sequence[Example], batch_size: int = 32) -> torch.Tensor:
    """Per-example NLL of the answer (nats per answer token, ``</s>`` included): [len(examples)] float64."""
    return torch.cat([_nll(chunk) for chunk in _chunks(model, None, tokenizer, "", examples, batch_size, None)])


def forced_exact_matches(scores: AnswerLogProbs) -> torch.Tensor:
    """Per-example exact match read from a teacher-forced pass: 1.0 where the most likely token is the
    answer's at every answer position (``</s>`` included), else 0.0: [n] float64. Equals greedy
    decoding's exact match when the answer's tokenization is unique (see the module docstring)."""
    wrong = (scores.log_probs.argmax(-1) != scores.answers).double()
    errors = torch.zeros(scores.n, dtype=torch.float64, device=wrong.device).index_add_(0, scores.rows, wrong)
    return (errors == 0).double().cpu()


def exact_matches(model, tokenizer, examples: Sequence[Example], scoring: TaskScoring | None = None) -> torch.Tensor:
    """Per-example greedy exact match, 1.0 or 0.0: [len(examples)] float64. The decoded answer
    (:func:`~karcher_lab.diagnostics.sequences.greedy_answers`) must equal the reference exactly, or with
    ``scoring`` the answer decoded under it (:func:`~karcher_lab.diagnostics.scoring.scored_answers`) must
    equal it once both are normalized (:meth:`~karcher_lab.diagnostics.scoring.TaskScoring.matches`)."""
    if scoring is None:
        answers, same = greedy_answers(model, tokenizer, list(examples)), operator.eq
    else:
        answers, same = scored_answers(model, tokenizer, list(examples), scoring), scoring.matches
    return torch.tensor([float(same(a, e.answer)) for a, e in zip(answers, examples)], dtype=torch.float64)


def _summary(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std()) if values.numel() > 1 else float("nan")


def task_quality(
    model, tokenizer, examples_by_task: TaskExamples, *, model_name: str = "model",
    batch_size: int = 32, accuracy: bool = True, exact_match: str = "greedy",
    log_probs: Mapping[str, AnswerLogProbs] | None = None, scoring: Mapping[str, TaskScoring] | None = None,
) -> pd.DataFrame:
    """Per task: ``accuracy`` (exact match; skipped with ``accuracy=False``), ``nll`` and ``perplexity``
    of the answer tokens. Rows: model × task × metric, with mean, std over examples, n.
    ``exact_match``: ``"greedy"`` (decode) or ``"teacher_forced"`` (:func:`forced_exact_matches`, no
    decoding, for the tasks without ``scoring``; those with are decoded). ``log_probs``: the model's
    :func:`answer_log_probs` on these examples (with the same ``scoring``), when already computed (then
    ``model`` is only used for greedy decoding). ``scoring``: options by task (module docstring)."""
    examples_by_task = as_examples(examples_by_task)
    if exact_match not in EXACT_MATCH_MODES:
        raise ParameterError(f"exact_match must be one of {EXACT_MATCH_MODES}, got {exact_match!r}")
    scoring = check_scoring(tokenizer, scoring, examples_by_task)
    _check_given(log_probs, examples_by_task, "log_probs")
    rows = []
    for task, examples in examples_by_task.items():
        options = scoring.get(task)
        nll, forced = [], []
        for chunk in _chunks(model, log_probs, tokenizer, task, examples, batch_size, options):
            nll.append(_nll(chunk))
            forced.append(forced_exact_matches(chunk))
        nll = torch.cat(nll)
        n = len(examples)
        if accuracy:
            decode = exact_match == "greedy" or options is not None
            matches = exact_matches(model, tokenizer, examples, options) if decode else torch.cat(forced)
            rows.append(dict(model=model_name, task=task, metric="accuracy", n=n,
                             **dict(zip(("mean", "std"), _summary(matches)))))
        mean, std = _summary(nll)
        rows.append(dict(model=model_name, task=task, metric="nll", mean=mean, std=std, n=n))
        rows.append(dict(model=model_name, task=task, metric="perplexity", mean=math.exp(mean), std=float("nan"), n=n))
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


def _check_given(given: Mapping[str, AnswerLogProbs] | None, examples_by_task, label: str) -> None:
    """Precomputed log-probabilities must cover each task's examples."""
    for task, examples in examples_by_task.items() if given is not None else ():
        if task not in given or given[task].n != len(examples):
            have = given[task].n if task in given else "none"
            raise InputError(f"{label}: task {task!r} has {len(examples)} examples but the precomputed "
                             f"log-probabilities cover {have}")


def _chunks(model, given, tokenizer, task: str, examples, batch_size: int,
            options: TaskScoring | None) -> Iterator[AnswerLogProbs]:
    """A task's answer log-probabilities ``batch_size`` examples at a time: sliced from ``given`` or
    computed from ``model`` with the task's ``options`` (so memory holds one batch's positions × V, as
    without a cache)."""
    scoring = {task: options} if options is not None else None
    for start in range(0, len(examples), batch_size):
        stop = min(start + batch_size, len(examples))
        yield (given[task].examples(start, stop) if given is not None
               else answer_log_probs(model, tokenizer, {task: examples[start:stop]}, batch_size, scoring=scoring)[task])


def function_distance(
    reference, model, tokenizer, examples_by_task: TaskExamples, *,
    reference_name: str = "expert", model_name: str = "merged", batch_size: int = 32,
    scoring: Mapping[str, TaskScoring] | None = None,
) -> pd.DataFrame:
    """KL(p_reference ‖ p_model) (eq. 2) and the Fisher–Rao distance between the two models' next-token
    distributions, averaged over each example's answer positions. Rows: reference × model × task ×
    metric (``kl``, ``fisher_rao``), with mean, std over examples, n. The models share the tokenizer.
    Either side may be given as its :func:`answer_log_probs` on these examples (with the same
    ``scoring``) instead of a model (``{task: AnswerLogProbs}``), e.g. experts' cached once while the
    merged model changes. ``scoring``: options by task (its ``chat_template`` renders the prompts)."""
    examples_by_task = as_examples(examples_by_task)
    scoring = check_scoring(tokenizer, scoring, examples_by_task)
    p_given, q_given = _precomputed(reference), _precomputed(model)
    _check_given(p_given, examples_by_task, "reference")
    _check_given(q_given, examples_by_task, "model")
    rows = []
    for task, examples in examples_by_task.items():
        kl, fr = [], []
        options = scoring.get(task)
        for p_chunk, q_chunk in zip(_chunks(reference, p_given, tokenizer, task, examples, batch_size, options),
                                    _chunks(model, q_given, tokenizer, task, examples, batch_size, options)):
            log_p, log_q = p_chunk.log_probs, q_chunk.log_probs.to(p_chunk.log_probs.device)
            if log_q.shape != log_p.shape:
                raise InputError(f"the models' vocabularies or answer positions differ ({tuple(log_p.shape)} vs "
                                 f"{tuple(log_q.shape)} log-probabilities)")
            p = log_p.exp()
            kl.append(_per_example_mean((p * (log_p - log_q)).sum(-1), p_chunk.rows, p_chunk.n).cpu())
            fr.append(_per_example_mean(fr_distance(p, log_q.exp()), p_chunk.rows, p_chunk.n).cpu())
        for metric, values in (("kl", torch.cat(kl)), ("fisher_rao", torch.cat(fr))):
            mean, std = _summary(values)
            rows.append(dict(reference=reference_name, model=model_name, task=task, metric=metric, mean=mean, std=std, n=len(examples)))
    return pd.DataFrame(rows, columns=DISTANCE_COLUMNS)


def _precomputed(side: Any) -> Mapping[str, AnswerLogProbs] | None:
    """``side`` when it is ``{task: AnswerLogProbs}`` (not a model), else None."""
    if isinstance(side, Mapping) and side and all(isinstance(v, AnswerLogProbs) for v in side.values()):
        return side
    return None


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
