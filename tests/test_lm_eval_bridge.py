"""lm-evaluation-harness as a quality source: a micro-pool expert in memory scored through the bridge on a
zoo task exported to lm-eval (tests/data/lm_eval_tasks: the units task as generate_until and as multiple
choice) gives our own scorer's numbers on the same examples: greedy exact match, and each choice's
log-likelihood (its BOS-prefixed context, as the tokenizer encodes a text) with the accuracy of ranking
them; a study's lm-eval task lands in the sweep's results table; missing data give lm-eval's own error."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from karcher_lab import Study, load_study
from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.function import answer_log_probs, exact_matches
from karcher_lab.diagnostics.scoring import TaskScoring
from karcher_lab.errors import DataError, ParameterError
from karcher_lab.experiment import run_sweep
from karcher_lab.study.resolve import load_model
from karcher_lab.zoo import get_task

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'karcher-lab[lm-eval]')")

from karcher_lab.diagnostics.lm_eval_bridge import check_tasks, evaluate, lm_eval_scores, scores_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
DOCS = [json.loads(line) for line in (TASKS / "units.jsonl").read_text().splitlines()]
GEN_BUDGET = 8
"""zoo_units_gen.yaml's max_gen_toks."""


@pytest.fixture(scope="module")
def expert(micro_pool):
    """The micro pool's units expert, in memory, and its tokenizer."""
    path = micro_pool.expert_path("units")
    return load_model(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def base(micro_pool):
    """The micro pool's base, in memory, and its tokenizer (it ranks some choices of the units task wrong)."""
    return load_model(micro_pool.base_path), AutoTokenizer.from_pretrained(micro_pool.base_path)


def _samples(result: dict, task: str) -> list[dict]:
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


def test_the_exported_task_is_the_zoo_task():
    assert [(d["prompt"], d["answer"]) for d in DOCS] == [(e.prompt, e.answer) for e in get_task("units").examples("eval", 24, seed=0)]
    assert all(d["choices"][d["gold"]] == d["answer"] and len(set(d["choices"])) == 4 for d in DOCS)


def test_generate_until_exact_match_equals_our_greedy_scorer(expert):
    model, tokenizer = expert
    result = evaluate(model, tokenizer, ["zoo_units_gen"], include=[TASKS], log_samples=True)
    ours = exact_matches(model, tokenizer, [Example(d["prompt"], d["answer"]) for d in DOCS],
                         TaskScoring(max_new_tokens=GEN_BUDGET))
    theirs = torch.tensor([s["exact_match"] for s in _samples(result, "zoo_units_gen")], dtype=torch.float64)
    assert torch.equal(theirs, ours)
    assert 0 < ours.mean() < 1  # the expert gets some answers right and some wrong: the comparison has teeth
    table = scores_table(result).set_index("metric")
    assert table.loc["exact_match", "mean"] == pytest.approx(float(ours.mean()), abs=1e-12)
    assert table.loc["exact_match", "std"] == pytest.approx(float(ours.std()) / math.sqrt(len(DOCS)), rel=1e-9)
    assert table.loc["exact_match", "n"] == len(DOCS)


def _our_choice_log_likelihoods(model, tokenizer) -> torch.Tensor:
    """log p(choice | prompt) summed over the choice's tokens (our teacher-forced pass, whose closing
    </s> position is left out): [documents, 4] float64."""
    examples = [Example(d["prompt"], c) for d in DOCS for c in d["choices"]]
    scores = answer_log_probs(model, tokenizer, {"mc": examples})["mc"]
    token = scores.log_probs.gather(1, scores.answers[:, None])[:, 0]
    not_eos = scores.answers != tokenizer.eos_token_id
    sums = torch.zeros(scores.n, dtype=torch.float64).index_add_(0, scores.rows[not_eos], token[not_eos])
    return sums.reshape(len(DOCS), 4)


@pytest.mark.parametrize("which", ["expert", "base"])
def test_multiple_choice_accuracy_equals_our_log_likelihood_ranking(request, which):
    model, tokenizer = request.getfixturevalue(which)
    assert tokenizer("km:1=")["input_ids"][0] == tokenizer.bos_token_id  # the zoo's tokenizer adds its BOS
    result = evaluate(model, tokenizer, ["zoo_units_mc"], include=[TASKS], log_samples=True)
    ours = _our_choice_log_likelihoods(model, tokenizer)
    theirs = torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in _samples(result, "zoo_units_mc")],
                          dtype=torch.float64)
    # equal log-likelihoods: lm-eval scored every context with the BOS the tokenizer adds (none would shift them all)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    correct = (ours.argmax(1) == torch.tensor([d["gold"] for d in DOCS])).double()
    assert (0 < correct.mean() < 1) if which == "base" else correct.mean() == 1  # the units expert ranks all right
    table = lm_eval_scores(model, tokenizer, {"units_mc": "zoo_units_mc"}, include=[TASKS]).set_index("metric")
    assert table.loc["acc", "task"] == "units_mc"
    assert table.loc["acc", "mean"] == pytest.approx(float(correct.mean()), abs=1e-12)
    assert table.loc["acc", "std"] == pytest.approx(float(correct.std()) / math.sqrt(len(DOCS)), rel=1e-9)


def test_missing_data_give_lm_evals_own_error(tmp_path):
    (tmp_path / "absent.yaml").write_text(
        "task: zoo_units_absent\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'nowhere.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: exact_match\n")
    with pytest.raises(DataError, match=r"zoo_units_absent.*nowhere\.jsonl") as caught:
        check_tasks(["zoo_units_absent"], include=[tmp_path])
    assert caught.value.__cause__ is not None  # lm-eval's (datasets') own exception, kept as the cause
    with pytest.raises(DataError, match="include folder"):
        check_tasks(["zoo_units_mc"], include=[tmp_path / "missing"])


def test_a_studys_lm_eval_task_lands_in_the_sweep_results(micro_pool, expert, tmp_path):
    for task in ("double", "units"):
        lines = [json.dumps({"prompt": e.prompt, "answer": e.answer}) for e in get_task(task).examples("eval", 6, seed=0)]
        (tmp_path / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "study.yml").write_text(
        f"base: {micro_pool.base_path}\n"
        f"experts:\n  double: {micro_pool.expert_path('double')}\n  units: {micro_pool.expert_path('units')}\n"
        "tasks:\n  double: double.jsonl\n  units: units.jsonl\n"
        "  units_mc: {source: 'lm_eval:zoo_units_mc', limit: 12}\n"
        f"lm_eval_include: [{TASKS}]\n")
    study = load_study(tmp_path / "study.yml")
    assert list(study.task_specs) == ["double", "units"] and study.lm_eval_tasks["units_mc"].limit == 12
    results = run_sweep(study, methods=["linear"], m_values=[2], orders=["pool"], out=tmp_path / "run",
                        probes_per_task=2, draws=4, sites=["residual"], progress=False, report=False, log=None)
    rows = results[results["task"] == "units_mc"].set_index(["method", "experts"])
    assert set(rows.index) == {("expert", "double"), ("expert", "units"), ("linear", "double+units")}
    assert set(rows["metric"]) == {"acc"} and set(rows["scope"]) == {"task"}
    model, tokenizer = expert
    direct = lm_eval_scores(model, tokenizer, {"units_mc": "zoo_units_mc"}, include=[TASKS], limit=12).iloc[0]
    assert rows.loc[("expert", "units"), "mean"] == direct["mean"] and rows.loc[("expert", "units"), "std"] == direct["std"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["lm_eval"] == {"tasks": {"units_mc": ["zoo_units_mc", 12]}, "include": [str(TASKS.resolve())]}


def test_bad_lm_eval_tasks_in_a_study_are_refused():
    with pytest.raises(ParameterError, match="only \\['source', 'limit'\\]"):
        Study(experts={"a": "x"}, tasks={"h": {"source": "lm_eval:hellaswag", "prompt_field": "q"}})
    with pytest.raises(DataError, match="lm_eval_include: no folder"):
        Study(experts={"a": "x"}, tasks={"h": "lm_eval:hellaswag"}, lm_eval_include=["no/such/folder"])
    study = Study(experts={"a": "x"}, tasks={"h": "lm_eval:hellaswag"}, lm_eval_include=str(TASKS))
    assert study.task_specs == {} and study.lm_eval_tasks["h"].task == "hellaswag"
    assert study.lm_eval_include == [TASKS.resolve()]
