"""Function-space metrics and the diagonal Fisher, on tiny generated models with the zoo's tokenizer."""
import copy
import math

import pandas as pd
import pytest
import torch

import karcher_lab
from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.fisher import diagonal_fisher
from karcher_lab.diagnostics.function import (
    AnswerLogProbs, answer_batches, answer_log_probs, answer_logits, answer_nll, exact_matches, forced_exact_matches,
    function_distance, length_batches, normalized_accuracy, task_quality,
)
from karcher_lab.errors import EmptyInputError, InputError, ParameterError
from karcher_lab.zoo import get_task
from karcher_lab.zoo.evaluate import answer_nll as zoo_answer_nll
from karcher_lab.zoo.tokenizer import char_tokenizer

TOKENIZER = char_tokenizer()


def _tiny(seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def _perturbed(model, scale, seed=1):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


EXAMPLES = {"reverse": get_task("reverse").examples("eval", 7), "addition": get_task("addition").examples("eval", 5)}


def _per_example_log_probs(model, example):
    """Unbatched, unpadded reference: log-probabilities at each answer position of one example."""
    prompt = TOKENIZER([example.prompt])["input_ids"][0]
    answer = TOKENIZER([example.answer], add_special_tokens=False)["input_ids"][0] + [TOKENIZER.eos_token_id]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    positions = range(len(prompt) - 1, len(prompt) + len(answer) - 1)
    return torch.log_softmax(logits[list(positions)], -1), torch.tensor(answer)


def test_answer_nll_matches_unbatched_reference_and_the_zoo():
    model = _tiny()
    examples = EXAMPLES["reverse"]
    nll = answer_nll(model, TOKENIZER, examples, batch_size=3)
    expected = []
    for e in examples:
        log_probs, answer = _per_example_log_probs(model, e)
        expected.append(-log_probs.gather(1, answer[:, None]).mean())
    assert torch.allclose(nll, torch.stack(expected), atol=1e-5)
    assert float(nll.mean()) == pytest.approx(zoo_answer_nll(model, TOKENIZER, examples), abs=1e-5)


def test_kl_and_fisher_rao_against_unbatched_reference():
    expert, merged = _tiny(), _perturbed(_tiny(), 0.05)
    table = function_distance(expert, merged, TOKENIZER, EXAMPLES, batch_size=2)
    assert list(table.columns) == ["reference", "model", "task", "metric", "mean", "std", "n"]
    kl, fr = [], []
    for e in EXAMPLES["reverse"]:
        log_p, _ = _per_example_log_probs(expert, e)
        log_q, _ = _per_example_log_probs(merged, e)
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        fr.append((2 * torch.arccos((log_p.exp() * log_q.exp()).sqrt().sum(-1).clamp(max=1))).mean())
    rows = table[table["task"] == "reverse"].set_index("metric")
    assert rows.loc["kl", "mean"] == pytest.approx(float(torch.stack(kl).mean()), rel=1e-5)
    assert rows.loc["kl", "std"] == pytest.approx(float(torch.stack(kl).std()), rel=1e-4)
    assert rows.loc["fisher_rao", "mean"] == pytest.approx(float(torch.stack(fr).mean()), rel=1e-4)
    assert rows.loc["kl", "n"] == 7
    # eq. 1: locally d_FR^2 ≈ 2 KL (compared position by position through the per-example means)
    assert rows.loc["fisher_rao", "mean"] ** 2 == pytest.approx(2 * rows.loc["kl", "mean"], rel=0.1)


def test_a_model_is_at_distance_zero_from_itself():
    model = _tiny()
    table = function_distance(model, model, TOKENIZER, EXAMPLES)
    assert table["mean"].abs().max() < 1e-6


class UniformOracle(torch.nn.Module):
    """Uniform next-token distribution (NLL = log V per token); greedy "generation" returns the right
    answer except for the prompts in ``wrong``."""

    def __init__(self, answers: dict[str, str], wrong: set[str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers, self.wrong = answers, wrong

    def forward(self, input_ids, attention_mask=None):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, len(TOKENIZER))})()

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **kwargs):
        rows = []
        for row in input_ids.tolist():
            prompt = TOKENIZER.decode(row, skip_special_tokens=True)
            answer = "wrong" if prompt in self.wrong else self.answers[prompt]
            new = TOKENIZER(answer, add_special_tokens=False)["input_ids"] + [eos_token_id]
            rows.append(row + (new + [eos_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_task_quality_known_answers():
    examples = EXAMPLES["reverse"]
    oracle = UniformOracle({e.prompt: e.answer for e in examples}, {examples[0].prompt, examples[3].prompt})
    table = task_quality(oracle, TOKENIZER, {"reverse": examples}, model_name="oracle")
    assert list(table.columns) == ["model", "task", "metric", "mean", "std", "n"]
    rows = table.set_index("metric")
    p = 5 / 7
    assert rows.loc["accuracy", "mean"] == pytest.approx(p)
    assert rows.loc["accuracy", "std"] == pytest.approx(math.sqrt(p * (1 - p) * 7 / 6))
    assert rows.loc["nll", "mean"] == pytest.approx(math.log(len(TOKENIZER)))
    assert rows.loc["nll", "std"] == pytest.approx(0.0, abs=1e-9)
    assert rows.loc["perplexity", "mean"] == pytest.approx(len(TOKENIZER))
    assert (table["model"] == "oracle").all() and (table["n"] == 7).all()
    no_accuracy = task_quality(oracle, TOKENIZER, {"reverse": examples}, accuracy=False)
    assert set(no_accuracy["metric"]) == {"nll", "perplexity"}


def test_normalized_accuracy():
    experts = pd.DataFrame([
        dict(model="e1", task="a", metric="accuracy", mean=0.8, std=0.1, n=10),
        dict(model="e1", task="a", metric="nll", mean=0.3, std=0.1, n=10),
        dict(model="e2", task="b", metric="accuracy", mean=0.0, std=0.0, n=10),
    ])
    merged = pd.DataFrame([
        dict(model="m", task="a", metric="accuracy", mean=0.5, std=0.1, n=10),
        dict(model="m", task="b", metric="accuracy", mean=0.2, std=0.1, n=10),
    ])
    table = normalized_accuracy(merged, experts).set_index("task")
    assert table.loc["a", "mean"] == pytest.approx(0.625)
    assert math.isnan(table.loc["b", "mean"])
    assert (table["metric"] == "normalized_accuracy").all()
    with pytest.raises(InputError, match="no expert accuracy"):
        normalized_accuracy(merged, experts[experts["task"] == "a"])


def test_function_metrics_reject_empty_input():
    with pytest.raises(EmptyInputError):
        task_quality(_tiny(), TOKENIZER, {})
    with pytest.raises(EmptyInputError, match="reverse"):
        function_distance(_tiny(), _tiny(), TOKENIZER, {"reverse": []})


def test_fisher_of_the_head_has_its_closed_form():
    """One answer position with final hidden state h and next-token probabilities p: the head's
    log-likelihood gradient for label y is (1[v = y] − p_v) h, so each sample gives
    F[v, :] = (1[v = y] − p_v)² h², whose sum over v is 1 − 2 p_y + Σ p², between
    1 − 2 max p + Σ p² and 1 − 2 min p + Σ p², with expectation 1 − Σ p²."""
    model = _tiny()
    example = Example("rev:ab=", "")  # the only answer position predicts </s>
    fisher = diagonal_fisher(model, TOKENIZER, [example], samples=8, seed=3)
    ids = torch.tensor(TOKENIZER([example.prompt])["input_ids"])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    h, p = out.hidden_states[-1][0, -1].double(), out.logits[0, -1].double().softmax(-1)
    factor = fisher["lm_head.weight"].double() / h.square()
    assert factor.std(1).max() < 1e-5 * factor.mean(1).max()  # each row is a multiple of h²
    total = factor.mean(1).sum()
    squares = p.square().sum()
    assert 1 - 2 * p.max() + squares - 1e-4 <= total <= 1 - 2 * p.min() + squares + 1e-4
    assert float(total) == pytest.approx(float(1 - squares), abs=2 * float(p.max() - p.min()) + 1e-4)


def test_fisher_names_shapes_seed_and_tied_weights():
    model = _tiny(tie=True)
    examples = EXAMPLES["addition"][:3]
    fisher = diagonal_fisher(model, TOKENIZER, examples, samples=2, seed=0)
    state = model.state_dict()
    assert set(fisher) == set(state)  # the tied head appears under both names
    assert all(fisher[k].shape == state[k].shape and fisher[k].dtype == torch.float32 for k in fisher)
    assert all(bool((f >= 0).all()) for f in fisher.values())
    assert torch.equal(fisher["lm_head.weight"], fisher["model.embed_tokens.weight"])
    again = diagonal_fisher(model, TOKENIZER, examples, samples=2, seed=0)
    other = diagonal_fisher(model, TOKENIZER, examples, samples=2, seed=1)
    assert all(torch.equal(fisher[k], again[k]) for k in fisher)
    assert not torch.equal(fisher["model.norm.weight"], other["model.norm.weight"])
    with pytest.raises(ParameterError):
        diagonal_fisher(model, TOKENIZER, examples, samples=0)


def test_estimated_fishers_feed_the_fisher_merge():
    a, b = _tiny(0), _perturbed(_tiny(0), 0.1)
    examples = EXAMPLES["reverse"][:2]
    fa, fb = (diagonal_fisher(m, TOKENIZER, examples) for m in (a, b))
    merged = karcher_lab.merge([a, b], "fisher", model_params=[{"fisher": fa}, {"fisher": fb}])
    name = "model.layers.1.mlp.up_proj.weight"
    floor = 1e-6
    wa, wb = fa[name].clamp_min(floor), fb[name].clamp_min(floor)
    expected = (wa * a.state_dict()[name] + wb * b.state_dict()[name]) / (wa + wb)
    assert torch.allclose(merged[name], expected, atol=1e-6)


def test_precomputed_log_probs_give_the_same_kl_nll_and_tables():
    expert, merged = _tiny(), _perturbed(_tiny(), 0.05)
    direct = function_distance(expert, merged, TOKENIZER, EXAMPLES, batch_size=2)
    # one stream of batches over both tasks, then split per task
    cached_expert = answer_log_probs(expert, TOKENIZER, EXAMPLES, batch_size=5)
    cached_merged = answer_log_probs(merged, TOKENIZER, EXAMPLES, batch_size=64)
    assert [cached_expert[t].n for t in EXAMPLES] == [7, 5]
    for reference, model in ((cached_expert, merged), (expert, cached_merged), (cached_expert, cached_merged)):
        table = function_distance(reference, model, TOKENIZER, EXAMPLES)
        pd.testing.assert_frame_equal(table[["task", "metric", "n"]], direct[["task", "metric", "n"]])
        assert torch.allclose(torch.tensor(table["mean"].values), torch.tensor(direct["mean"].values), rtol=1e-6, atol=1e-9)
        assert torch.allclose(torch.tensor(table["std"].values), torch.tensor(direct["std"].values), rtol=1e-6, atol=1e-9)
    quality = task_quality(merged, TOKENIZER, EXAMPLES, accuracy=False)
    reused = task_quality(merged, TOKENIZER, EXAMPLES, accuracy=False, log_probs=cached_merged)
    assert torch.allclose(torch.tensor(reused["mean"].values), torch.tensor(quality["mean"].values), rtol=1e-6)
    nll = answer_nll(merged, TOKENIZER, EXAMPLES["reverse"], batch_size=1)
    assert torch.allclose(answer_nll(merged, TOKENIZER, EXAMPLES["reverse"], batch_size=7), nll, atol=1e-6)
    assert quality.set_index(["task", "metric"]).loc[("reverse", "nll"), "mean"] == pytest.approx(float(nll.mean()), rel=1e-6)
    with pytest.raises(InputError, match="covers|cover"):
        function_distance({"reverse": cached_expert["addition"]}, merged, TOKENIZER, {"reverse": EXAMPLES["reverse"]})
    with pytest.raises(ParameterError, match="exact_match"):
        task_quality(merged, TOKENIZER, EXAMPLES, exact_match="beam")


def test_forced_exact_match_known_answers():
    """Two examples: the first's argmax is its answer at both positions, the second's misses one."""
    log_probs = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]],
                                       dtype=torch.float64))
    scores = AnswerLogProbs(log_probs, rows=torch.tensor([0, 0, 1, 1]), answers=torch.tensor([0, 2, 1, 2]), n=2)
    assert forced_exact_matches(scores).tolist() == [1.0, 0.0]
    assert forced_exact_matches(scores.examples(1, 2)).tolist() == [0.0]


def test_forced_exact_match_equals_greedy_decoding(micro_pool):
    """On trained experts and a merge of two (a mix of right and wrong answers), example by example."""
    from karcher_lab.zoo import load

    models = {e["task"]: load(e["path"]) for e in micro_pool.experts}
    tokenizer = next(iter(models.values()))[1]
    merged = karcher_lab.merge([e["path"] for e in micro_pool.experts[:2]], "linear")
    mixed = copy.deepcopy(next(iter(models.values()))[0])
    mixed.load_state_dict(merged, strict=False)
    examples = {t: get_task(t).examples("eval", 12, seed=3) for t in models}
    right, total = 0, 0
    for model in [m for m, _ in models.values()] + [mixed]:
        scores = answer_log_probs(model, tokenizer, examples)
        for task, task_examples in examples.items():
            greedy = exact_matches(model, tokenizer, task_examples)
            assert forced_exact_matches(scores[task]).tolist() == greedy.tolist(), task
            right, total = right + int(greedy.sum()), total + len(task_examples)
    assert 0 < right < total  # both outcomes occur
    table = task_quality(mixed, tokenizer, examples, exact_match="teacher_forced")
    assert table.equals(task_quality(mixed, tokenizer, examples, exact_match="greedy"))


def test_length_batches_sort_by_length_and_bound_padding():
    lengths = [12, 3, 7, 3, 30, 8, 11, 4, 29]
    batches = length_batches(lengths, batch_size=3, slack=1.25)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 3 for b in batches)
    order = [lengths[i] for b in batches for i in b]
    assert order == sorted(lengths)
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 1.25 * sum(lengths[i] for i in b)
    assert batches[0] == [1, 3, 7]  # 3, 3, 4: 12 cells for 10 tokens
    assert length_batches(lengths, batch_size=1) == [[i] for i in sorted(range(9), key=lambda i: lengths[i])]
    with pytest.raises(ParameterError, match="batch_size"):
        length_batches(lengths, batch_size=0)


@pytest.mark.parametrize("tie", [False, True])
def test_answer_logits_run_the_head_on_answer_positions_only(tie):
    model = _tiny(tie=tie)
    examples = EXAMPLES["reverse"] + EXAMPLES["addition"]
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        for _, input_ids, targets in answer_batches(TOKENIZER, examples, batch_size=4):
            logits = answer_logits(model, input_ids, targets)
            head_call = seen[-1]
            with torch.no_grad():
                full = model(input_ids=input_ids).logits[:, :-1][targets != -100]
            assert torch.allclose(logits, full, atol=1e-5)
            assert head_call[:2] == (1, int((targets != -100).sum()))  # the head saw the answer positions alone
    finally:
        handle.remove()


def test_answer_log_probs_follow_example_order_across_length_sorted_batches():
    model = _tiny()
    examples = {"addition": EXAMPLES["addition"], "reverse": EXAMPLES["reverse"]}
    lengths = [len(e.prompt) + len(e.answer) for task in examples.values() for e in task]
    assert len(set(lengths)) > 3  # mixed lengths: sorting reorders them
    scores = answer_log_probs(model, TOKENIZER, examples, batch_size=3)
    for task, task_examples in examples.items():
        for i, example in enumerate(task_examples):
            reference, answer = _per_example_log_probs(model, example)
            mine = scores[task].examples(i, i + 1)
            assert torch.equal(mine.answers, answer)
            assert torch.allclose(mine.log_probs, reference, atol=1e-5)
