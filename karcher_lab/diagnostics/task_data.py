"""Users' evaluation data: prompt/answer examples and probe texts read from files, lists or datasets.

:func:`load_examples` turns a source into :class:`~karcher_lab.diagnostics.examples.Example` s,
:func:`load_probes` into probe texts, and :func:`as_examples` checks and converts the ``{task: examples}``
mappings that the function-space metrics (:mod:`karcher_lab.diagnostics.function`) take.

Sources
-------
- a path (``str`` or :class:`~pathlib.Path`) to a UTF-8 file, by suffix: ``.jsonl`` (one JSON object per
  line; blank lines are skipped), ``.json`` (a list of objects, or an object with exactly one list-valued
  key, such as ``{"data": [...]}``, whose list is read; other keys are ignored), ``.csv`` (a header row, then
  one record per row) or ``.parquet`` (read with pyarrow, which must be installed). Probe texts may also
  come from a plain text file of any other suffix: one probe per line, blank lines skipped.
- a list (or tuple) of dicts, of :class:`Example` s, or, for probes, of strings;
- a ``datasets.Dataset`` (any object with ``column_names`` that iterates over dicts), one split of it.

Values are kept verbatim: nothing is stripped (scoring normalizes later). Text values must be strings;
integers (e.g. ``"answer": 42`` in JSON) are written with ``str()``, exactly; any other value (a float,
a bool, null, a list) is refused, since its text form is ambiguous (``4.0`` or ``4``?). An empty answer is
refused; an empty prompt is allowed. :class:`Example` s given as such are used as they are.

Every problem raises a :class:`~karcher_lab.errors.DataError` that names the source (the file, or the
given ``label``), where in it (``line N`` in JSONL, CSV and text files, counted from 1; ``index i`` in a
JSON list, a Parquet file, a list or a dataset, counted from 0) and the column; a source without a single
example or probe raises :class:`~karcher_lab.errors.EmptyInputError`. All are raised while reading, before
any model work.
"""
from __future__ import annotations

import csv
import io
import json
import numbers
import os
import reprlib
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from karcher_lab.checks import check_count
from karcher_lab.diagnostics.examples import Example
from karcher_lab.errors import DataError, EmptyInputError, NotSupportedError

RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""File suffixes read as records (rows with named columns)."""

Rows = Iterator[tuple[str, Any]]
"""``(where, record)`` pairs: the record's location for messages (``"tasks.csv: line 3"``) and the record."""

TaskExamples = Mapping[str, Sequence[Example | Mapping[str, Any]]]
"""Evaluation examples per task, as the function-space metrics take them: :class:`Example` s or dicts with
``prompt`` and ``answer`` keys (:func:`as_examples`)."""


def load_examples(
    source: Any, *, prompt_field: str = "prompt", answer_field: str = "answer", limit: int | None = None,
    label: str | None = None,
) -> list[Example]:
    """Prompt/answer examples from a file, a list or a dataset (see the module docstring for the formats).

    Parameters
    ----------
    source : str, Path, list of dict or Example, or datasets.Dataset
        A ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file; records (dicts) or :class:`Example` s; or a
        dataset (an object with ``column_names`` iterating over dicts).
    prompt_field, answer_field : str
        The columns holding the prompt and the answer.
    limit : int or None
        Keep only the first ``limit`` examples (an int ≥ 1); None keeps every example.
    label : str or None
        What error messages call the source (e.g. a task's name): they start with ``"label (path)"`` for
        a file, ``label`` for in-memory data. None: the file's path, or ``"examples"``.

    Returns
    -------
    examples : list of Example
        In the source's order, prompts and answers verbatim.

    Raises
    ------
    ParameterError
        ``limit`` is not an int ≥ 1.
    DataError
        The file is missing, of an unknown suffix, not UTF-8 or malformed; a column is missing (the message
        lists those found); a prompt or answer is not text; an answer is empty; a record is not a dict.
    EmptyInputError
        The source holds no example.
    NotSupportedError
        A Parquet file and pyarrow is not installed.
    """
    if limit is not None:
        check_count("limit", limit)
    name, columns, rows = _records(source, label, "examples")
    for field in (prompt_field, answer_field):
        _check_column(name, columns, field)
    examples = [_example(where, record, prompt_field, answer_field) for where, record in islice(rows, limit)]
    if not examples:
        raise EmptyInputError(f"{name} has no examples")
    return examples


def load_probes(source: Any, *, field: str | None = None, limit: int | None = None) -> list[str]:
    """Probe texts (the inputs of the activation metrics) from a text file, a list or a column of records.

    Parameters
    ----------
    source : str, Path, list of str or dict, or datasets.Dataset
        Without ``field``: a text file (one probe per line, blank lines skipped, each line kept verbatim
        without its line break) or a list of strings. With ``field``: a ``.jsonl``, ``.json``, ``.csv`` or
        ``.parquet`` file, a list of dicts or a dataset, whose column ``field`` holds the probes.
    field : str or None
        The column holding the probe texts; None for a text file or a list of strings.
    limit : int or None
        Keep only the first ``limit`` probes (an int ≥ 1); None keeps every probe.

    Returns
    -------
    probes : list of str
        Non-empty texts, in the source's order.

    Raises
    ------
    ParameterError
        ``limit`` is not an int ≥ 1.
    DataError
        The file is missing, not UTF-8 or malformed; a records file without ``field`` or a text file with
        one; the column is missing (the message lists those found); a probe is not text, or is empty.
    EmptyInputError
        The source holds no probe.
    NotSupportedError
        A Parquet file and pyarrow is not installed.
    """
    if limit is not None:
        check_count("limit", limit)
    if field is None:
        name, texts = _texts(source)
        what = "the probe"
    else:
        name, columns, rows = _records(source, None, "probes")
        _check_column(name, columns, field)
        texts = ((where, _value(where, record, field)) for where, record in rows)
        what = f"column {field!r}"
    probes = [_probe(where, value, what) for where, value in islice(texts, limit)]
    if not probes:
        raise EmptyInputError(f"{name} has no probes")
    return probes


def as_examples(examples_by_task: TaskExamples) -> dict[str, list[Example]]:
    """Each task's examples as :class:`Example` s: the ``examples_by_task`` argument of the function-space
    metrics, checked.

    Parameters
    ----------
    examples_by_task : mapping of str to list of Example or dict
        Per task, :class:`Example` s (used as they are) or dicts with ``prompt`` and ``answer`` keys
        (checked and converted as by :func:`load_examples`), in any mix.

    Returns
    -------
    examples : dict of str to list of Example
        The same tasks in the same order.

    Raises
    ------
    EmptyInputError
        No task, or a task without examples.
    DataError
        ``examples_by_task`` is not a mapping, a task's examples are not a list, or an item is neither an
        Example nor a valid dict (the message names the task and the item's index).
    """
    if not isinstance(examples_by_task, Mapping):
        raise DataError("examples must be a dict of task name to examples, "
                        f"got {type(examples_by_task).__name__}")
    if not examples_by_task:
        raise EmptyInputError("no tasks given")
    out = {}
    for task, examples in examples_by_task.items():
        if not _is_list(examples):
            raise DataError(f"task {task!r}: expected a list of Examples or of dicts with 'prompt' and 'answer', got "
                            f"{type(examples).__name__}; read a file or a dataset with load_examples")
        out[task] = load_examples(examples, label=f"task {task!r}")
    return out


def _is_list(source: Any) -> bool:
    return isinstance(source, Sequence) and not isinstance(source, (str, bytes))


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _records(source: Any, label: str | None, what: str) -> tuple[str, list[str] | None, Rows]:
    """``(name, columns, rows)`` of a file, list or dataset: the source's name in messages, its columns when
    the format declares them (a CSV header, a Parquet schema, a dataset's ``column_names``; else None) and
    its records."""
    if _is_path(source):
        path = Path(source)
        name = str(path) if label is None else f"{label} ({path})"
        suffix = _check_file(path, name, RECORD_SUFFIXES)
        if suffix == ".parquet":
            return (name, *_parquet_rows(path, name))
        text = _read_text(path, name)
        if suffix == ".csv":
            return (name, *_csv_rows(text, name))
        return name, None, (_jsonl_rows if suffix == ".jsonl" else _json_rows)(text, name)
    if hasattr(source, "column_names") and isinstance(source, Iterable):
        name = label or "dataset"
        return (name, *_dataset_rows(source, name))
    if _is_list(source):
        name = label or what
        return name, None, ((f"{name}: index {i}", record) for i, record in enumerate(source))
    raise DataError(f"cannot read {what} from a {type(source).__name__}: give the path of a "
                    f"{', '.join(RECORD_SUFFIXES)} file, a list of dicts or a datasets.Dataset")


def _texts(source: Any) -> tuple[str, Rows]:
    """``(name, (where, text) pairs)`` of a text file's non-blank lines or of a list's items."""
    if _is_path(source):
        path = Path(source)
        name = str(path)
        suffix = _check_file(path, name, None)
        if suffix in RECORD_SUFFIXES:
            raise DataError(f"{name}: a {suffix} file holds records: name the column of the probe texts with field=")
        lines = enumerate(_read_text(path, name).split("\n"), 1)
        return name, ((f"{name}: line {n}", line.removesuffix("\r")) for n, line in lines if line.strip())
    if _is_list(source):
        return "probes", ((f"probes: index {i}", text) for i, text in enumerate(source))
    raise DataError(f"cannot read probes from a {type(source).__name__}: give a text file or a list of strings, "
                    "or name the column of a records file, list of dicts or dataset with field=")


def _check_file(path: Path, name: str, suffixes: Sequence[str] | None) -> str:
    """The file's lower-case suffix; DataError if it is not a file, or (given ``suffixes``) not one of them."""
    if not path.is_file():
        raise DataError(f"{name}: {'is a directory, not a file' if path.is_dir() else 'no such file'}")
    suffix = path.suffix.lower()
    if suffixes is not None and suffix not in suffixes:
        raise DataError(f"{name}: cannot read a {suffix or 'suffix-less'} file; use one of {', '.join(suffixes)}")
    return suffix


def _read_text(path: Path, name: str) -> str:
    """The file's text (a UTF-8 byte-order mark dropped); DataError naming the line and byte offset of the
    first byte that is not UTF-8, EmptyInputError if the file holds only white space."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{name}: line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at byte offset "
                        f"{error.start}); save the file as UTF-8") from None
    if not text.strip():
        raise EmptyInputError(f"{name} is empty")
    return text


def _bad_json(name: str, line: int, error: json.JSONDecodeError) -> DataError:
    return DataError(f"{name}: line {line}: not valid JSON ({error.msg} at column {error.colno})")


def _jsonl_rows(text: str, name: str) -> Rows:
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise _bad_json(name, number, error) from None
            yield f"{name}: line {number}", record


def _json_rows(text: str, name: str) -> Rows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _bad_json(name, error.lineno, error) from None
    where = name
    if isinstance(data, dict):
        keys = [key for key, value in data.items() if isinstance(value, list)]
        if len(keys) != 1:
            raise DataError(f"{name}: expected a list of objects, or an object with exactly one list-valued key "
                            f"(such as {{\"data\": [...]}}); its list-valued keys are {keys}")
        where, data = f"{name}: {keys[0]!r}", data[keys[0]]
    elif not isinstance(data, list):
        raise DataError(f"{name}: expected a list of objects, or an object with one list-valued key, "
                        f"got a JSON {type(data).__name__}")
    return ((f"{where} index {i}", record) for i, record in enumerate(data))


def _csv_rows(text: str, name: str) -> tuple[list[str], Rows]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = list(reader.fieldnames or ())
    return columns, ((f"{name}: line {reader.line_num}", record) for record in reader)


def _parquet_rows(path: Path, name: str) -> tuple[list[str], Rows]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise NotSupportedError(f"{name}: reading Parquet files needs the pyarrow package, which is not "
                                "installed (pip install pyarrow)") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.ArrowException as error:
        raise DataError(f"{name}: not a readable Parquet file ({error})") from None
    rows = (row for batch in table.to_batches() for row in batch.to_pylist())
    return table.column_names, ((f"{name}: index {i}", row) for i, row in enumerate(rows))


def _dataset_rows(dataset: Any, name: str) -> tuple[list[str], Rows]:
    columns = dataset.column_names
    if isinstance(columns, Mapping):
        raise DataError(f"{name}: a dataset with splits {list(columns)}: give one split, e.g. "
                        f"dataset[{next(iter(columns), 'test')!r}]")
    return list(columns), ((f"{name}: index {i}", row) for i, row in enumerate(dataset))


def _check_column(name: str, columns: list[str] | None, field: str) -> None:
    """DataError if the source declares its columns and ``field`` is not one of them."""
    if columns is not None and field not in columns:
        raise DataError(f"{name}: no column {field!r}; columns found: {columns}")


def _value(where: str, record: Any, field: str) -> Any:
    """``record[field]``; DataError if the record is not a dict or has no such column."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a record (a dict of columns) with the column {field!r}, "
                        f"got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: no column {field!r}; columns found: {list(record)}")
    return record[field]


def _text(where: str, value: Any, what: str) -> str:
    """``value`` as text: a string as it is, an integer through ``str()``; DataError for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise DataError(f"{where}: {what} has no value")
    raise DataError(f"{where}: {what} must be text, got {type(value).__name__} {reprlib.repr(value)} (integers "
                    "are converted; write other values as strings)")


def _example(where: str, record: Any, prompt_field: str, answer_field: str) -> Example:
    """An :class:`Example` as it is, or the record's prompt and answer as one."""
    if isinstance(record, Example):
        return record
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an Example or a dict with {prompt_field!r} and {answer_field!r}, "
                        f"got {type(record).__name__}")
    prompt = _text(where, _value(where, record, prompt_field), f"column {prompt_field!r}")
    answer = _text(where, _value(where, record, answer_field), f"column {answer_field!r}")
    if answer == "":
        raise DataError(f"{where}: the answer (column {answer_field!r}) is empty")
    return Example(prompt, answer)


def _probe(where: str, value: Any, what: str) -> str:
    """A probe's text; DataError if it is not text or is empty."""
    text = _text(where, value, what)
    if text == "":
        raise DataError(f"{where}: the probe is empty")
    return text
