"""karcher_lab.Study and load_study: every input form of experts, tasks and probes, resolution into
examples, probes and models, and each bad input refused with the file, line or key named."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

import karcher_lab
from karcher_lab import Study, load_study
from karcher_lab.diagnostics.examples import Example
from karcher_lab.errors import DataError, EmptyInputError, InputError, ParameterError, VocabularyMismatchError
from karcher_lab.io.synthetic import base_state, expert_states, tiny_config, write_checkpoint
from karcher_lab.study.resolve import check_vocabularies, expert_loader, probe_texts, study_examples


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Plain HF folders (a base and two experts, one tokenizer) and an expert under another vocabulary."""
    root = tmp_path_factory.mktemp("study")
    config = tiny_config("llama")
    base = base_state(config, seed=0)
    write_checkpoint(root / "base", config, base)
    for i, e in enumerate(expert_states(base, 2, seed=1, strength=0.2)):
        write_checkpoint(root / f"expert{i}", config, e)
    write_checkpoint(root / "other_vocab", config, base, tokens=[f"y{i}" for i in range(3, config["vocab_size"])])
    (root / "math.jsonl").write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)})
                                               for a in range(5)) + "\n")
    (root / "qa.csv").write_text("question,reply\nsky?,blue\ngrass?,green\n")
    (root / "probes.txt").write_text("first probe\n\nsecond probe\n")
    return root


def test_a_study_from_python_resolves_every_task_form(folders):
    study = Study(
        experts={"math": str(folders / "expert0"), "qa": str(folders / "expert1")},
        base=str(folders / "base"),
        tasks={"math": str(folders / "math.jsonl"),
               "qa": {"source": str(folders / "qa.csv"), "prompt_field": "question", "answer_field": "reply"},
               "listed": [{"prompt": "a", "answer": "b"}],
               "addition": {"source": "addition", "limit": 3}},
    )
    examples = study_examples(study)
    assert examples["math"] == [Example(f"{a}+{a}=", str(2 * a)) for a in range(5)]
    assert examples["qa"] == [Example("sky?", "blue"), Example("grass?", "green")]
    assert examples["listed"] == [Example("a", "b")]
    assert len(examples["addition"]) == 3 and all(isinstance(e, Example) for e in examples["addition"])
    assert [len(v) for v in study_examples(study, per_task=2).values()] == [2, 2, 1, 2]
    assert study.own_task("math") == "math" and study.own_task("nope") is None
    assert probe_texts(study, examples, per_task=1) == ["0+0=", "sky?", "a", examples["addition"][0].prompt]
    check_vocabularies(study)
    model = expert_loader(study, "math")()
    expected = karcher_lab.merge([str(folders / "expert0")], "linear")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_a_study_yaml_resolves_relative_paths_against_its_folder(folders):
    (folders / "study.yml").write_text(textwrap.dedent("""\
        name: mine
        base: base
        experts: {math: expert0, qa: expert1}
        tasks:
          math: math.jsonl
          qa: {source: qa.csv, prompt_field: question, answer_field: reply, limit: 1}
        probes: probes.txt
    """))
    study = load_study(folders / "study.yml")
    assert study.name == "mine" and study.relative_to == folders.resolve()
    examples = study_examples(study)
    assert examples["qa"] == [Example("sky?", "blue")] and len(examples["math"]) == 5
    assert probe_texts(study, examples) == ["first probe", "second probe"]
    check_vocabularies(study)


@pytest.mark.parametrize("text, error, message", [
    ("experts: {a: expert0}\ntasks: {a: math.jsonl}\nmodels: []\n", ParameterError, r"unknown key\(s\) \['models'\]"),
    ("experts:\n  a: expert0\n  a: expert1\ntasks: {a: math.jsonl}\n", DataError, r"'a' is given twice \(lines 2 and 3\)"),
    ("experts: {a: expert0}\ntasks:\n  t: math.jsonl\n  t: qa.csv\n", DataError, r"'t' is given twice \(lines 3 and 4\)"),
    ("experts: {a: expert0}\ntasks: {a: {source: math.jsonl, promptfield: x}}\n", ParameterError, r"unknown option\(s\) \['promptfield'\]"),
    ("experts: {a: expert0}\ntasks: {a: {prompt_field: x}}\n", ParameterError, "a mapping needs 'source'"),
    ("experts: {a: expert0}\ntasks: {a: {source: math.jsonl, limit: 0}}\n", ParameterError, "limit must be an integer >= 1"),
    ("experts: {}\ntasks: {a: math.jsonl}\n", EmptyInputError, "a study needs experts"),
    ("experts: {a: expert0}\n", EmptyInputError, "at least one evaluation task"),
    ("experts: {a: expert0}\ntasks: {a: math.jsonl}\nprobes: []\n", EmptyInputError, "probes: an empty list"),
    ("- just a list\n", DataError, "must hold a mapping"),
])
def test_bad_study_files_are_refused_with_the_key_or_line(folders, tmp_path, text, error, message):
    path = tmp_path / "study.yml"
    path.write_text(text)
    with pytest.raises(error, match=message):
        load_study(path)


def test_bad_sources_are_refused_before_any_model_loads(folders, tmp_path):
    with pytest.raises(DataError, match="study file .*nope.yml does not exist"):
        load_study(tmp_path / "nope.yml")
    (tmp_path / "latin1.yml").write_bytes("experts: {a: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8"):
        load_study(tmp_path / "latin1.yml")
    study = Study(experts={"a": str(folders / "expert0")}, tasks={"a": "missing.jsonl"}, relative_to=folders)
    with pytest.raises(DataError, match=r"task 'a': no file missing.jsonl .*no built-in task of that name"):
        study_examples(study)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(EmptyInputError):
        probe_texts(Study(experts={"a": "x"}, tasks={"a": [{"prompt": "p", "answer": "a"}]}, probes=str(empty)), {})


def test_experts_of_another_vocabulary_are_refused(folders):
    study = Study(experts={"a": str(folders / "expert0"), "b": str(folders / "other_vocab")}, tasks={"a": "addition"})
    with pytest.raises(VocabularyMismatchError, match="expert 'b' has another vocabulary than 'a'"):
        check_vocabularies(study)


def test_an_adapter_expert_needs_the_base(folders, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="is a PEFT adapter .* needs the study's base"):
        expert_loader(Study(experts={"a": str(adapter)}, tasks={"a": "addition"}), "a")
