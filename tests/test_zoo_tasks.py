"""Zoo tasks, tokenizer, recipes and the conflict record: fast checks against known answers."""
from __future__ import annotations

import math
import re

import pytest
import torch

from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.sequences import IGNORE, encode, prompt_batch, teacher_forcing_batch
from karcher_lab.errors import ParameterError
from karcher_lab.zoo import TASKS, config_for, get_task
from karcher_lab.zoo.conflicts import conflict_record, task_vectors
from karcher_lab.zoo.corpus import DATA_DIR
from karcher_lab.zoo.tasks import split_of
from karcher_lab.zoo.tokenizer import char_tokenizer

SYNTHETIC = [t for t in TASKS.values() if t.domain == "synthetic"]
TEXT = [t for t in TASKS.values() if t.domain == "text"]


def test_at_least_eleven_distinct_tasks_with_distinct_tags():
    assert len(TASKS) >= 11
    assert len({t.tag for t in TASKS.values()}) == len(TASKS)
    assert {t.name for t in TEXT} == {"code", "prose"}


@pytest.mark.parametrize("task", SYNTHETIC, ids=lambda t: t.name)
def test_synthetic_task_solves_the_example_in_its_description(task):
    prompt_input, expected = re.search(r"\w+:(\S+)= -> (\S+)$", task.description).groups()
    assert task.solve(prompt_input) == expected


@pytest.mark.parametrize("text,answer", [
    ("99+9", "108"), ("0+0", "0"),
])
def test_addition_carries(text, answer):
    assert get_task("addition").solve(text) == answer


@pytest.mark.parametrize("text,answer", [("()", "yes"), (")(", "no"), ("(()())", "yes"), ("(()", "no"), ("())(()", "no")])
def test_brackets(text, answer):
    assert get_task("brackets").solve(text) == answer


def test_caesar_wraps_and_units_and_dates():
    assert get_task("caesar").solve("wxyz") == "zabc"
    assert get_task("units").solve("0.05") == "50"
    assert get_task("dates").solve("1999-12-31") == "31/12/1999"


@pytest.mark.parametrize("task", list(TASKS.values()), ids=lambda t: t.name)
def test_examples_are_seeded_and_splits_are_disjoint(task):
    train = task.examples("train", 400, seed=3)
    evals = task.examples("eval", 100, seed=3)
    assert train == task.examples("train", 400, seed=3)
    assert train != task.examples("train", 400, seed=4)
    assert len(evals) == 100 and len({e.prompt for e in evals}) == 100
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    assert all(split_of(e.prompt) == "train" for e in train)
    assert all(e.prompt.startswith(task.tag + ":") and e.answer for e in train + evals)
    if task.domain == "synthetic":
        assert all(task.solve(e.prompt[len(task.tag) + 1 : -1]) == e.answer for e in evals)


@pytest.mark.parametrize("task", TEXT, ids=lambda t: t.name)
def test_text_examples_finish_a_word_of_an_eval_line_of_the_shipped_text(task):
    lines = (DATA_DIR / task.filename).read_text().splitlines()
    eval_lines = [ln for ln in lines if split_of(ln) == "eval"]
    for e in task.examples("eval", 30):
        context = e.prompt[len(task.tag) + 1 :]
        assert any(context + e.answer in ln for ln in eval_lines)
        assert re.fullmatch(r"[A-Za-z0-9_]+", e.answer)


def test_small_input_space_gives_fewer_distinct_eval_examples_instead_of_looping():
    evals = get_task("units").examples("eval", 5000)
    assert 150 < len(evals) < 260  # 1000 possible inputs, a fifth of them in eval


def test_unknown_task_and_split_are_clear_errors():
    with pytest.raises(ParameterError, match="unknown zoo task 'nope'"):
        get_task("nope")
    with pytest.raises(ParameterError, match="split"):
        get_task("sort").examples("test", 3)
    with pytest.raises(ParameterError, match="unknown zoo task"):
        config_for("tiny", tasks=["sort", "nope"])
    with pytest.raises(ParameterError, match="unknown zoo size"):
        config_for("huge")
    with pytest.raises(ParameterError, match="unknown zoo config field"):
        config_for("tiny", hidden=3)


def test_char_tokenizer_round_trips_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    char_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "add:47+8=  x\n  def f(x): ~"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("é")["input_ids"][1] == tok.unk_token_id
    assert len(tok) == 100 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_batches_supervise_the_answer_only_and_left_pad_prompts():
    tok = char_tokenizer()
    items = encode(tok, [Example("ab=", "cd"), Example("a=", "x")])
    assert items[0].ids == (1, *tok("ab=cd", add_special_tokens=False)["input_ids"], 2)
    assert (items[0].prompt_len, items[1].prompt_len) == (4, 3)
    input_ids, labels = teacher_forcing_batch(items, 0, answer_only=True)
    assert input_ids[1].tolist() == list(items[1].ids) + [0] * 2
    assert labels[0].tolist() == [IGNORE] * 4 + list(items[0].ids[4:])
    assert labels[1].tolist() == [IGNORE] * 3 + list(items[1].ids[3:]) + [IGNORE] * 2
    _, full = teacher_forcing_batch(items, 0, answer_only=False)
    assert full[1].tolist() == list(items[1].ids) + [IGNORE] * 2
    prompts, mask = prompt_batch(items, 0)
    assert prompts[1].tolist() == [0] + list(items[1].ids[:3]) and mask[1].tolist() == [0, 1, 1, 1]


def test_heterogeneity_spreads_steps_and_rate_by_powers_of_two():
    flat = config_for("tiny", heterogeneity=0.0).expert_recipes()
    assert {(r.steps, r.lr) for r in flat} == {(360, 2e-3)}
    recipes = config_for("tiny", heterogeneity=1.0).expert_recipes()
    assert sorted(r.level for r in recipes) == pytest.approx([i / 12 for i in range(13)])
    for r in recipes:
        assert r.steps == round(360 * 2 ** r.level) and r.lr == pytest.approx(2e-3 * 2 ** r.level)
    assert len({r.seed for r in recipes}) == len(recipes)


def test_conflict_record_angles_and_sign_disagreement():
    base = {"w": torch.zeros(2, 2)}
    experts = [{"w": torch.tensor([[1.0, 0], [0, 0]])}, {"w": torch.tensor([[-2.0, 0], [0, 0]])},
               {"w": torch.tensor([[0.0, 3], [0, 0]])}, {"w": torch.tensor([[1.0, 1], [0, 0]])}]
    record = conflict_record(["a", "b", "c", "d"], task_vectors(base, experts))
    pairs = {tuple(p["tasks"]): p for p in record["pairs_by_conflict"]}
    assert pairs[("a", "b")]["angle_deg"] == pytest.approx(180) and pairs[("a", "b")]["sign_disagreement"] == 1
    assert pairs[("a", "c")]["angle_deg"] == pytest.approx(90) and pairs[("a", "c")]["sign_disagreement"] == 0
    assert pairs[("a", "d")]["cosine"] == pytest.approx(1 / math.sqrt(2))
    assert record["pairs_by_conflict"][0]["tasks"] == ["a", "b"]
    assert record["task_vector_norm"] == pytest.approx({"a": 1, "b": 2, "c": 3, "d": math.sqrt(2)})


def test_cache_fingerprint_ignores_docstrings_and_comments_but_not_code():
    from karcher_lab.zoo.cache import code_fingerprint

    code = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    assert code_fingerprint(code) == code_fingerprint('def f(x):\n    """Other doc."""\n    return x + 1\n')
    assert code_fingerprint(code) == code_fingerprint("def f(x):\n    return x + 1\n")
    assert code_fingerprint(code) != code_fingerprint('def f(x):\n    """Doc."""\n    return x + 2\n')
    assert code_fingerprint('"""Module."""\nX = 1\n') == code_fingerprint("X = 1\n")
