"""Per-task scoring options: how a task's prompts are encoded and its greedy answers judged.

A task scored *without* a :class:`TaskScoring` (the zoo's tasks) keeps the lab's plain rules: the
prompt is encoded as the tokenizer encodes a text (its own BOS and special tokens), greedy decoding
runs up to ``</s>`` for at most (longest answer + 2) tokens, and the decoded text must equal the answer
exactly. A task scored *with* one (every task of a :class:`~karcher_lab.study.Study`) follows it:

- ``chat_template``: the prompt is rendered as one user message by the tokenizer's chat template, with
  the generation prompt, and that text is encoded without adding special tokens (the template writes
  its own), i.e. as ``tokenizer.apply_chat_template(..., tokenize=True)`` encodes it. This prompt is used
  by the teacher-forced pass (answer NLL, KL, Fisher–Rao) and by greedy decoding alike.
- greedy decoding (:func:`scored_answers`) stops at ``</s>``, at the first newline (the text from it on
  is dropped) or after ``max_new_tokens`` tokens, by default the reference answer's token count +
  :data:`ANSWER_MARGIN`; special tokens are not part of the decoded text.
- the decoded answer and the reference are compared stripped of surrounding whitespace, and
  case-folded unless ``case_sensitive``.

Teacher-forced exact match (argmax = answer token at every answer position, ``</s>`` included) gives
greedy decoding's 0/1 under the plain rules only: a stop at a newline, a different segmentation of the
same text, surrounding whitespace or another case can make the normalized greedy answer right where
it is not. A task with a :class:`TaskScoring` is therefore always decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from karcher_lab.checks import check_count
from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.sequences import encode, greedy_ids
from karcher_lab.errors import InputError, ParameterError

ANSWER_MARGIN = 4
"""Tokens of greedy decoding beyond the reference answer's own count when ``max_new_tokens`` is not
given: room for whitespace around the answer and for the model segmenting the same text into more
tokens (a newline or ``</s>`` ends decoding anyway, and need not fit)."""


@dataclass(frozen=True)
class TaskScoring:
    """How one task is scored (see the module docstring).

    Parameters
    ----------
    chat_template : bool
        Render each prompt with the tokenizer's chat template (one user message, generation prompt).
    case_sensitive : bool
        Compare answers case-sensitively; else both are case-folded.
    max_new_tokens : int, optional
        Greedy decoding stops after this many tokens (≥ 1); default: the reference answer's token count
        + :data:`ANSWER_MARGIN`.

    Raises
    ------
    ParameterError
        A flag that is not a bool, or ``max_new_tokens`` that is not an integer ≥ 1.
    """

    chat_template: bool = False
    case_sensitive: bool = True
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        for key in ("chat_template", "case_sensitive"):
            if not isinstance(getattr(self, key), bool):
                raise ParameterError(f"{key} must be True or False, got {getattr(self, key)!r}")
        if self.max_new_tokens is not None:
            check_count("max_new_tokens", self.max_new_tokens)

    def budget(self, answer_tokens: int) -> int:
        """The most tokens greedy decoding may generate for a reference answer of ``answer_tokens`` tokens."""
        return self.max_new_tokens if self.max_new_tokens is not None else answer_tokens + ANSWER_MARGIN

    def normalized(self, text: str) -> str:
        """``text`` as answers are compared: stripped, and case-folded unless ``case_sensitive``."""
        text = text.strip()
        return text if self.case_sensitive else text.casefold()

    def matches(self, generated: str, reference: str) -> bool:
        """Whether a decoded answer equals the reference once both are :meth:`normalized`."""
        return self.normalized(generated) == self.normalized(reference)


def check_scoring(tokenizer: Any, scoring: Mapping[str, TaskScoring] | None,
                  tasks: Iterable[str]) -> dict[str, TaskScoring]:
    """The per-task scoring options, checked against the tasks and the tokenizer.

    Parameters
    ----------
    tokenizer
        The tokenizer the tasks are encoded with.
    scoring : mapping of str to TaskScoring, optional
        Options by task; a task not named is scored by the plain rules (None: every task).
    tasks : iterable of str
        The tasks being scored.

    Returns
    -------
    dict of str to TaskScoring

    Raises
    ------
    ParameterError
        ``scoring`` is not a mapping, names a task that is not scored, or holds something other than a
        :class:`TaskScoring`.
    InputError
        A task asks for ``chat_template`` and the tokenizer has no chat template.
    """
    if scoring is None:
        return {}
    if not isinstance(scoring, Mapping):
        raise ParameterError(f"scoring must be a mapping of task name → TaskScoring, got {type(scoring).__name__}")
    tasks = list(tasks)
    unknown = [task for task in scoring if task not in tasks]
    if unknown:
        raise ParameterError(f"scoring names task(s) {unknown} that are not scored here (tasks: {tasks})")
    for task, options in scoring.items():
        if not isinstance(options, TaskScoring):
            raise ParameterError(f"scoring of task {task!r} must be a TaskScoring, got {type(options).__name__}")
        if options.chat_template and not getattr(tokenizer, "chat_template", None):
            raise InputError(f"task {task!r} asks for chat_template, but the tokenizer has no chat template; "
                             "set chat_template: false for it, or use a tokenizer that has one")
    return dict(scoring)


def scored_answers(model, tokenizer, examples: list[Example], scoring: TaskScoring) -> list[str]:
    """The model's greedy answers under a task's options, not yet normalized.

    Parameters
    ----------
    model
        A transformers causal LM (``generate``).
    tokenizer
    examples : list of Example
    scoring : TaskScoring
        Chat template, and the token budget of each example (:meth:`TaskScoring.budget`).

    Returns
    -------
    list of str
        Each example's greedy continuation up to ``</s>`` or the budget
        (:func:`~karcher_lab.diagnostics.sequences.greedy_ids`), decoded without special tokens and cut
        before its first newline.
    """
    items = encode(tokenizer, examples, scoring.chat_template)
    generated = greedy_ids(model, tokenizer, items, [scoring.budget(item.answer_len) for item in items])
    return [tokenizer.decode(ids, skip_special_tokens=True).split("\n", 1)[0] for ids in generated]
