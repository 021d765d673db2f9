"""Users' evaluation data: examples and probes from JSONL, JSON, CSV, Parquet, lists and datasets, and the
error each bad input gets (its type, and a message naming the file, line or index, and column)."""
import csv
import dataclasses
import json
import sys

import pandas as pd
import pytest
import torch

from karcher_lab.diagnostics import as_examples, load_examples, load_probes
from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.function import answer_log_probs, function_distance, task_quality
from karcher_lab.errors import DataError, EmptyInputError, InputError, NotSupportedError, ParameterError
from karcher_lab.zoo import get_task
from karcher_lab.zoo.tokenizer import char_tokenizer

EXAMPLES = [Example("12+30=", "42"), Example("rev: ab =", " ba "), Example("", "two\nlines")]
"""Kept verbatim: spaces around the answer, an empty prompt, a line break inside the answer."""
RECORDS = [dataclasses.asdict(e) for e in EXAMPLES]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path, records):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_wrapped_json(path, records):
    """An object with one list-valued key (and another key, ignored)."""
    path.write_text(json.dumps({"version": 2, "data": records}), encoding="utf-8")
    return path


WRITERS = {"tasks.jsonl": write_jsonl, "tasks.json": write_json, "wrapped.json": write_wrapped_json,
           "tasks.csv": write_csv}


class FakeDataset:
    """What load_examples needs of a datasets.Dataset: ``column_names`` and iteration over row dicts."""

    def __init__(self, records):
        self.records = records
        self.column_names = list(records[0])

    def __iter__(self):
        return iter(self.records)


@pytest.mark.parametrize("filename", sorted(WRITERS))
def test_files_give_the_examples_verbatim(tmp_path, filename):
    path = WRITERS[filename](tmp_path / filename, RECORDS)
    assert load_examples(path) == EXAMPLES
    assert load_examples(str(path), limit=2) == EXAMPLES[:2]


@pytest.mark.parametrize("source", [RECORDS, EXAMPLES, tuple(RECORDS), FakeDataset(RECORDS),
                                    [EXAMPLES[0], *RECORDS[1:]]], ids=["dicts", "examples", "tuple", "dataset", "mix"])
def test_in_memory_sources(source):
    assert load_examples(source) == EXAMPLES
    assert load_examples(source, limit=1) == EXAMPLES[:1]


def test_examples_pass_through_unchanged():
    empty_answer = Example("rev:ab=", "")  # an Example is used as given, even with an empty answer
    assert load_examples([empty_answer])[0] is empty_answer


def test_named_fields_and_integers(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"id": 7, "question": "6*7=", "solution": 42}])
    assert load_examples(path, prompt_field="question", answer_field="solution") == [Example("6*7=", "42")]


def test_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "tasks.parquet"
    pd.DataFrame(RECORDS).to_parquet(path)
    assert load_examples(path) == EXAMPLES
    assert load_examples(path, limit=2) == EXAMPLES[:2]
    assert load_probes(path, field="prompt", limit=2) == ["12+30=", "rev: ab ="]
    with pytest.raises(DataError, match=r"tasks\.parquet: no column 'solution'; columns found: \['prompt', 'answer'\]"):
        load_examples(path, answer_field="solution")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "tasks.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(NotSupportedError, match=r"tasks\.parquet: .*needs the pyarrow package"):
        load_examples(path)


# bad inputs: every one an InputError, named where it is


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.jsonl: no such file"):
        load_examples(tmp_path / "nothere.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir\.jsonl: is a directory"):
        load_examples(tmp_path / "dir.jsonl")
    with pytest.raises(DataError, match=r"math \(.*nothere\.csv\): no such file"):
        load_examples(tmp_path / "nothere.csv", label="math")


def test_unknown_suffix(tmp_path):
    path = tmp_path / "tasks.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"tasks\.txt: cannot read a \.txt file; use one of \.jsonl, \.json, \.csv"):
        load_examples(path)


@pytest.mark.parametrize("filename, text, message", [
    ("empty.jsonl", "", "empty.jsonl is empty"),
    ("blank.jsonl", "\n \n", "blank.jsonl is empty"),
    ("header.csv", "prompt,answer\n", "header.csv has no examples"),
    ("list.json", "[]", "list.json has no examples"),
])
def test_empty_files(tmp_path, filename, text, message):
    (tmp_path / filename).write_text(text)
    with pytest.raises(EmptyInputError, match=message):
        load_examples(tmp_path / filename)


def test_empty_lists():
    with pytest.raises(EmptyInputError, match="examples has no examples"):
        load_examples([])
    dataset = FakeDataset(RECORDS)
    dataset.records = []
    with pytest.raises(EmptyInputError, match="dataset has no examples"):
        load_examples(dataset)


def test_missing_column_lists_the_columns_found(tmp_path):
    path = write_csv(tmp_path / "qa.csv", [{"question": "1+1=", "solution": "2"}])
    with pytest.raises(DataError, match=r"qa\.csv: no column 'prompt'; columns found: \['question', 'solution'\]"):
        load_examples(path)
    path = write_jsonl(tmp_path / "qa.jsonl", [RECORDS[0], {"prompt": "3+4=", "ans": "7"}])
    with pytest.raises(DataError, match=r"qa\.jsonl: line 2: no column 'answer'; columns found: \['prompt', 'ans'\]"):
        load_examples(path)
    with pytest.raises(DataError, match=r"dataset: no column 'text'; columns found: \['prompt', 'answer'\]"):
        load_examples(FakeDataset(RECORDS), answer_field="text")
    with pytest.raises(DataError, match=r"examples: index 1: no column 'answer'; columns found: \['prompt'\]"):
        load_examples([RECORDS[0], {"prompt": "p"}])


def test_non_utf8_bytes_name_the_line_and_offset(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,answer\ncafé=,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: line 2: not UTF-8 text \(byte 0xe9 at byte offset 17\)"):
        load_examples(path)


def test_utf8_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,answer\nx=,y\n")
    assert load_examples(path) == [Example("x=", "y")]


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"prompt": "a", "answer": }\n')
    with pytest.raises(DataError, match=r"tasks\.jsonl: line 3: not valid JSON \(Expecting value at column 27\)"):
        load_examples(path)
    assert load_examples(path, limit=1) == EXAMPLES[:1]  # only the lines needed are parsed


def test_malformed_json_file(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text('[\n{"prompt": "a", "answer": "b"},\n{"prompt": "a" "answer": "b"}\n]')
    with pytest.raises(DataError, match=r"tasks\.json: line 3: not valid JSON \(Expecting ',' delimiter"):
        load_examples(path)


@pytest.mark.parametrize("data", [{"train": [], "test": []}, {"version": 1}, "text"])
def test_json_needs_a_list_or_one_list_valued_key(tmp_path, data):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"tasks\.json: expected a list of objects, or an object with"):
        load_examples(path)


def test_empty_answer_names_the_line_or_index(tmp_path):
    records = [RECORDS[0], {"prompt": "p", "answer": ""}]
    with pytest.raises(DataError, match=r"tasks\.jsonl: line 2: the answer \(column 'answer'\) is empty"):
        load_examples(write_jsonl(tmp_path / "tasks.jsonl", records))
    with pytest.raises(DataError, match=r"tasks\.csv: line 3: the answer \(column 'answer'\) is empty"):
        load_examples(write_csv(tmp_path / "tasks.csv", records))
    with pytest.raises(DataError, match=r"w\.json: 'data' index 1: the answer"):
        load_examples(write_wrapped_json(tmp_path / "w.json", records))
    with pytest.raises(DataError, match=r"examples: index 1: the answer"):
        load_examples(records)


@pytest.mark.parametrize("value, message", [
    (4.5, r"column 'answer' must be text, got float 4\.5"),
    (True, r"column 'answer' must be text, got bool True"),
    (["4"], r"column 'answer' must be text, got list"),
    (None, r"column 'answer' has no value"),
])
def test_answer_that_is_not_text(tmp_path, value, message):
    path = write_jsonl(tmp_path / "tasks.jsonl", [RECORDS[0], {"prompt": "p", "answer": value}])
    with pytest.raises(DataError, match=r"tasks\.jsonl: line 2: " + message):
        load_examples(path)


def test_short_csv_row(tmp_path):
    path = tmp_path / "tasks.csv"
    path.write_text("prompt,answer\na,b\nc\n")
    with pytest.raises(DataError, match=r"tasks\.csv: line 3: column 'answer' has no value"):
        load_examples(path)


def test_record_that_is_not_a_dict(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text('["a", "b"]\n')
    with pytest.raises(DataError, match=r"tasks\.jsonl: line 1: expected an Example or a dict with 'prompt' and "
                                        r"'answer', got list"):
        load_examples(path)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "2"])
def test_limit_must_be_a_positive_int(limit):
    with pytest.raises(ParameterError, match="limit must be an integer >= 1"):
        load_examples(RECORDS, limit=limit)
    with pytest.raises(ParameterError, match="limit must be an integer >= 1"):
        load_probes(["a"], limit=limit)


def test_unsupported_source_and_dataset_with_splits():
    with pytest.raises(DataError, match="cannot read examples from a dict"):
        load_examples({"prompt": "a", "answer": "b"})
    splits = FakeDataset(RECORDS)
    splits.column_names = {"train": ["prompt", "answer"], "test": ["prompt", "answer"]}
    with pytest.raises(DataError, match=r"dataset: a dataset with splits \['train', 'test'\]: give one split"):
        load_examples(splits)


def test_bad_data_errors_are_input_errors():
    assert issubclass(DataError, InputError) and issubclass(DataError, ValueError)


# probes


def test_probes_from_a_text_file(tmp_path):
    path = tmp_path / "probes.txt"
    path.write_text("The cat sat.\n\n   \n  indented stays\r\nlast line without newline")
    assert load_probes(path) == ["The cat sat.", "  indented stays", "last line without newline"]
    assert load_probes(str(path), limit=1) == ["The cat sat."]


def test_probes_from_lists_columns_and_datasets(tmp_path):
    assert load_probes(["a b", " c "]) == ["a b", " c "]
    expected = [e.answer for e in EXAMPLES]
    assert load_probes(RECORDS, field="answer") == expected
    assert load_probes(FakeDataset(RECORDS), field="answer", limit=2) == expected[:2]
    for filename, writer in WRITERS.items():
        assert load_probes(writer(tmp_path / filename, RECORDS), field="answer") == expected


def test_bad_probes(tmp_path):
    empty = tmp_path / "probes.txt"
    empty.write_text("\n\n")
    with pytest.raises(EmptyInputError, match=r"probes\.txt is empty"):
        load_probes(empty)
    with pytest.raises(EmptyInputError, match="probes has no probes"):
        load_probes([])
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        load_probes(tmp_path / "missing.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\nna\xefve\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: line 2: not UTF-8 text \(byte 0xef at byte offset 5\)"):
        load_probes(latin)
    jsonl = write_jsonl(tmp_path / "probes.jsonl", [{"text": "a"}, {"text": ""}])
    with pytest.raises(DataError, match=r"probes\.jsonl: a \.jsonl file holds records: name the column .* with field="):
        load_probes(jsonl)
    with pytest.raises(DataError, match=r"probes\.jsonl: line 2: the probe is empty"):
        load_probes(jsonl, field="text")
    with pytest.raises(DataError, match=r"probes\.jsonl: line 1: no column 'prompt'; columns found: \['text'\]"):
        load_probes(jsonl, field="prompt")
    with pytest.raises(DataError, match=r"probes: index 1: the probe must be text, got float"):
        load_probes(["a", 1.5])
    with pytest.raises(DataError, match=r"probes: index 1: the probe is empty"):
        load_probes(["a", ""])


# the metrics' examples_by_task


def test_as_examples_converts_dicts_and_keeps_examples():
    out = as_examples({"a": RECORDS, "b": EXAMPLES, "c": (EXAMPLES[0], RECORDS[1])})
    assert out == {"a": EXAMPLES, "b": EXAMPLES, "c": EXAMPLES[:2]}
    assert all(type(examples) is list for examples in out.values())


def test_as_examples_rejects_other_shapes():
    with pytest.raises(EmptyInputError, match="no tasks given"):
        as_examples({})
    with pytest.raises(DataError, match="examples must be a dict of task name to examples, got list"):
        as_examples(RECORDS)
    with pytest.raises(EmptyInputError, match="task 'math' has no examples"):
        as_examples({"math": []})
    with pytest.raises(DataError, match=r"task 'math': index 1: expected an Example or a dict with 'prompt' and "
                                        r"'answer', got str"):
        as_examples({"math": [RECORDS[0], "2+2=4"]})
    with pytest.raises(DataError, match=r"task 'math': index 0: no column 'answer'; columns found: \['prompt', 'a'\]"):
        as_examples({"math": [{"prompt": "2+2=", "a": "4"}]})
    with pytest.raises(DataError, match=r"task 'math': expected a list of Examples or of dicts .* got str; read a "
                                        r"file or a dataset with load_examples"):
        as_examples({"math": "math.jsonl"})


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


TOKENIZER = char_tokenizer()


def test_metrics_take_dicts_and_give_the_same_numbers():
    model, other = _tiny_model(), _tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    examples = {"reverse": get_task("reverse").examples("eval", 4),
                "addition": get_task("addition").examples("eval", 3)}
    dicts = {task: [dataclasses.asdict(e) for e in task_examples] for task, task_examples in examples.items()}
    pd.testing.assert_frame_equal(task_quality(model, TOKENIZER, dicts, batch_size=2),
                                  task_quality(model, TOKENIZER, examples, batch_size=2))
    pd.testing.assert_frame_equal(function_distance(model, other, TOKENIZER, dicts),
                                  function_distance(model, other, TOKENIZER, examples))
    from_dicts, from_examples = answer_log_probs(model, TOKENIZER, dicts), answer_log_probs(model, TOKENIZER, examples)
    assert all(torch.equal(from_dicts[t].log_probs, from_examples[t].log_probs) for t in examples)
