"""Per-task scoring options (chat template, greedy stop, answer normalization) on a steered tiny GPT-2.

The model is a bigram table: every block adds nothing, token x is embedded as the one-hot e_x, and the
output head maps it to the logits of its successor, so greedy decoding follows SUCCESSOR from the
prompt's last token and every exact match has a known 0/1. The tokenizer is a word-level
PreTrainedTokenizerFast (words, space, tab and newline are tokens; it adds ``<s>``) with a chat template.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from karcher_lab import Study
from karcher_lab.diagnostics import TaskScoring
from karcher_lab.diagnostics.examples import Example
from karcher_lab.diagnostics.function import answer_log_probs, exact_matches, function_distance, task_quality
from karcher_lab.diagnostics.scoring import ANSWER_MARGIN, scored_answers
from karcher_lab.diagnostics.sequences import encode, greedy_answers
from karcher_lab.errors import InputError, ParameterError
from karcher_lab.measurement import MeasurementEngine, MeasurementSettings
from karcher_lab.measurement import studies as studies_module
from karcher_lab.measurement.studies import engine_for_study
from karcher_lab.zoo.tokenizer import char_tokenizer

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
WORDS = ["\n", " ", "\t", "capital", "of", "France", "city", "lower", "spaced", "loop", "Paris", "paris", "Rome", "x"]
VOCAB = {token: i for i, token in enumerate(SPECIAL + WORDS)}
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SUCCESSOR = {
    "France": "Paris", "Paris": "\n", "\n": "Rome", "Rome": "</s>",  # "capital of France" -> "Paris\nRome</s>"
    "city": "Rome",                                                    # -> "Rome</s>"
    "lower": "paris",                                                  # -> "paris</s>"
    "spaced": "\t", "\t": "Paris",                                     # -> "\tParis\nRome</s>"
    "loop": "x", "x": " ", " ": "x",                                   # -> "x x x x ..." (never ends)
    "<|assistant|>": "Rome",                                           # the chat template's prompt -> "Rome</s>"
}
"""Greedy decoding's next token after each token (every other token: ``</s>``)."""

CAPITAL = Example("capital of France", "Paris")
CITY = Example("city", "Rome")
LOOP = Example("loop", "x x")


def word_tokenizer(chat_template: str | None = CHAT_TEMPLATE, gpt2_like: bool = False) -> PreTrainedTokenizerFast:
    """Words, space, tab and newline are tokens; ``<s>`` is prepended and ``<pad>`` pads, unless
    ``gpt2_like`` (then neither, as GPT-2's tokenizer)."""
    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[ \t\n]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    if not gpt2_like:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=None if gpt2_like else "<pad>",
                                        bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=["<|user|>", "<|assistant|>"],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = chat_template
    return tokenizer


def bigram_gpt2(successor: dict[str, str] = SUCCESSOR, sharpness: float = 5.0) -> GPT2LMHeadModel:
    """A GPT-2 whose next-token argmax after token x is ``successor[x]`` (``</s>`` when absent)."""
    config = GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                        tie_word_embeddings=False, bos_token_id=VOCAB["<s>"], eos_token_id=VOCAB["</s>"],
                        pad_token_id=VOCAB["<pad>"])
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # the residual stream is the token embedding alone
            for projection in (block.attn.c_proj, block.mlp.c_proj):
                projection.weight.zero_()
                projection.bias.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wte.weight.copy_(torch.eye(len(VOCAB), config.n_embd))
        head = torch.zeros(len(VOCAB), config.n_embd)
        for token, index in VOCAB.items():
            head[VOCAB[successor.get(token, "</s>")], index] = sharpness
        model.lm_head.weight.copy_(head)
    return model


TOKENIZER = word_tokenizer()
MODEL = bigram_gpt2()


def test_the_steered_model_decodes_its_successor_table():
    assert greedy_answers(MODEL, TOKENIZER, [CAPITAL, CITY]) == ["Paris\nRome", "Rome"]


def test_greedy_stops_at_newline_eos_or_max_new_tokens():
    examples = [CAPITAL, CITY, LOOP]
    # without options: up to </s> only, at most longest answer (3 tokens: "x", " ", "x") + 2 tokens
    assert greedy_answers(MODEL, TOKENIZER, examples) == ["Paris\nRome", "Rome", "x x x"]
    # with options: also up to a newline; default budget: the answer's own tokens + ANSWER_MARGIN
    assert ANSWER_MARGIN == 4
    assert scored_answers(MODEL, TOKENIZER, examples, TaskScoring()) == ["Paris", "Rome", "x x x x"]
    assert scored_answers(MODEL, TOKENIZER, examples, TaskScoring(max_new_tokens=3)) == ["Paris", "Rome", "x x"]
    assert scored_answers(MODEL, TOKENIZER, examples, TaskScoring(max_new_tokens=1)) == ["Paris", "Rome", "x"]


@pytest.mark.parametrize("example, scoring, expected", [
    (CAPITAL, None, 0.0),                                        # "Paris\nRome"
    (CAPITAL, TaskScoring(), 1.0),                               # cut at the newline
    (Example("lower", "Paris"), TaskScoring(), 0.0),             # "paris": case-sensitive by default
    (Example("lower", "Paris"), TaskScoring(case_sensitive=False), 1.0),
    (Example("spaced", "Paris"), None, 0.0),                     # "\tParis\nRome"
    (Example("spaced", "Paris"), TaskScoring(), 1.0),            # stripped
    (Example("city", " Rome "), None, 0.0),
    (Example("city", " Rome "), TaskScoring(), 1.0),             # the reference is stripped too
    (LOOP, TaskScoring(), 0.0),                                  # "x x x x"
    (LOOP, TaskScoring(max_new_tokens=4), 1.0),                  # "x x " stripped
    (LOOP, TaskScoring(max_new_tokens=5), 0.0),                  # "x x x"
])
def test_exact_match_normalizes_whitespace_and_case(example, scoring, expected):
    assert exact_matches(MODEL, TOKENIZER, [example], scoring).tolist() == [expected]


def test_tasks_with_options_are_decoded_even_in_teacher_forced_mode():
    """The teacher-forced 0 (a newline is predicted where the answer has "</s>") differs from the normalized
    greedy 1: a task with options is decoded, a task without keeps the shortcut."""
    examples = {"plain": [CAPITAL], "scored": [CAPITAL]}
    for mode in ("teacher_forced", "greedy"):
        table = task_quality(MODEL, TOKENIZER, examples, exact_match=mode, scoring={"scored": TaskScoring()})
        accuracy = table[table["metric"] == "accuracy"].set_index("task")["mean"]
        assert accuracy.to_dict() == {"plain": 0.0, "scored": 1.0}, mode


def test_chat_template_renders_the_prompt_for_teacher_forcing_and_decoding():
    chat = TaskScoring(chat_template=True)
    example = Example("capital of France", "Rome")
    item, = encode(TOKENIZER, [example], chat_template=True)
    rendered = TOKENIZER.apply_chat_template([{"role": "user", "content": example.prompt}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert list(item.ids[: item.prompt_len]) == list(rendered)
    assert [VOCAB[t] for t in ("<s>", "<|user|>", "capital")] == list(rendered[:3])  # one <s>: the template's
    assert list(item.ids[item.prompt_len:]) == [VOCAB["Rome"], VOCAB["</s>"]]
    plain, = encode(TOKENIZER, [example])
    assert list(plain.ids[: plain.prompt_len]) == TOKENIZER(example.prompt)["input_ids"]

    assert scored_answers(MODEL, TOKENIZER, [example], chat) == ["Rome"]
    assert exact_matches(MODEL, TOKENIZER, [example], chat).tolist() == [1.0]
    assert exact_matches(MODEL, TOKENIZER, [example], TaskScoring()).tolist() == [0.0]

    scores = answer_log_probs(MODEL, TOKENIZER, {"qa": [example]}, scoring={"qa": chat})["qa"]
    with torch.no_grad():
        logits = MODEL(input_ids=torch.tensor([item.ids])).logits[0].double()
    expected = torch.log_softmax(logits[item.prompt_len - 1 : len(item.ids) - 1], -1)
    assert torch.allclose(scores.log_probs, expected, atol=1e-10)
    assert scores.answers.tolist() == [VOCAB["Rome"], VOCAB["</s>"]]

    other = bigram_gpt2(sharpness=2.0)
    direct = function_distance(MODEL, other, TOKENIZER, {"qa": [example]}, scoring={"qa": chat})
    other_scores = answer_log_probs(other, TOKENIZER, {"qa": [example]}, scoring={"qa": chat})
    cached = function_distance({"qa": scores}, other_scores, TOKENIZER, {"qa": [example]})
    pd.testing.assert_frame_equal(direct, cached)
    plain_distance = function_distance(MODEL, other, TOKENIZER, {"qa": [example]})
    assert not direct["mean"].equals(plain_distance["mean"])  # another prompt, other distributions


def test_without_options_the_results_are_todays():
    """No options, or options without a chat template, leave the teacher-forced numbers as they were;
    TaskScoring() changes exact match only."""
    examples = {"a": [CAPITAL, CITY, Example("lower", "Paris")], "b": [LOOP, Example("spaced", "Paris")]}
    other = bigram_gpt2(sharpness=2.0)
    defaults = {task: TaskScoring() for task in examples}
    pd.testing.assert_frame_equal(task_quality(MODEL, TOKENIZER, examples, scoring={}),
                                  task_quality(MODEL, TOKENIZER, examples))
    pd.testing.assert_frame_equal(task_quality(MODEL, TOKENIZER, examples, accuracy=False, scoring=defaults),
                                  task_quality(MODEL, TOKENIZER, examples, accuracy=False))
    pd.testing.assert_frame_equal(function_distance(MODEL, other, TOKENIZER, examples, scoring=defaults),
                                  function_distance(MODEL, other, TOKENIZER, examples))
    with_options = answer_log_probs(MODEL, TOKENIZER, examples, scoring=defaults)
    for task, scores in answer_log_probs(MODEL, TOKENIZER, examples).items():
        assert torch.equal(scores.log_probs, with_options[task].log_probs)


def test_prompts_are_encoded_with_the_tokenizers_own_special_tokens():
    """``<s>`` where the tokenizer adds one (the zoo's, this one), none where it adds none (as GPT-2's,
    which has no pad token either: batches are padded with ``</s>``); an empty prompt of a tokenizer
    without BOS is refused (the answer would have no context)."""
    zoo = char_tokenizer()
    item, = encode(zoo, [Example("ab=", "c")])
    assert item.ids == (zoo.bos_token_id, *zoo("ab=", add_special_tokens=False)["input_ids"], zoo.vocab["c"],
                        zoo.eos_token_id)
    no_bos = word_tokenizer(gpt2_like=True)
    item, = encode(no_bos, [CITY])
    assert item.ids == (VOCAB["city"], VOCAB["Rome"], VOCAB["</s>"]) and item.prompt_len == 1
    examples = [CITY, CAPITAL]  # prompts of two lengths: padded
    assert scored_answers(MODEL, no_bos, examples, TaskScoring()) == ["Rome", "Paris"]
    assert greedy_answers(MODEL, no_bos, examples) == ["Rome", "Paris\nRome"]
    scores = answer_log_probs(MODEL, no_bos, {"t": examples})["t"]
    assert scores.answers.tolist() == [VOCAB["Rome"], VOCAB["</s>"], VOCAB["Paris"], VOCAB["</s>"]]
    with pytest.raises(InputError, match="encodes to no token"):
        encode(no_bos, [Example("", "Rome")])


def test_bad_options_are_refused_before_any_model_runs():
    qa = {"qa": [CITY]}
    chat = {"qa": TaskScoring(chat_template=True)}
    without_template = word_tokenizer(chat_template=None)
    for call in (lambda: answer_log_probs(None, without_template, qa, scoring=chat),
                 lambda: task_quality(None, without_template, qa, scoring=chat),
                 lambda: function_distance(None, None, without_template, qa, scoring=chat),
                 lambda: task_quality(None, char_tokenizer(), qa, scoring=chat)):
        with pytest.raises(InputError, match="task 'qa' asks for chat_template, but the tokenizer has no chat"):
            call()
    with pytest.raises(ParameterError, match=r"scoring names task\(s\) \['typo'\]"):
        task_quality(None, TOKENIZER, qa, scoring={"typo": TaskScoring()})
    with pytest.raises(ParameterError, match="must be a TaskScoring"):
        task_quality(None, TOKENIZER, qa, scoring={"qa": {"chat_template": True}})
    with pytest.raises(ParameterError, match="max_new_tokens"):
        TaskScoring(max_new_tokens=0)
    with pytest.raises(ParameterError, match="case_sensitive"):
        TaskScoring(case_sensitive="no")


def test_the_engine_scores_experts_and_merged_model_with_the_tasks_options():
    qa = [Example("capital of France", "Rome")]
    never = lambda: pytest.fail("a model was loaded")  # noqa: E731
    with pytest.raises(InputError, match="task 'qa' asks for chat_template"):
        MeasurementEngine({"qa": never}, word_tokenizer(chat_template=None), {"qa": qa}, ["city"], model=never,
                          scoring={"qa": TaskScoring(chat_template=True)})
    engine = MeasurementEngine({"qa": MODEL}, TOKENIZER, {"qa": qa}, ["city"], model=bigram_gpt2(sharpness=2.0),
                               scoring={"qa": TaskScoring(chat_template=True)},
                               settings=MeasurementSettings(draws=2, exact_match_mode="teacher_forced"))
    function = engine.function_metrics(["qa"])
    accuracy = lambda table: float(table.query("metric == 'accuracy'")["mean"].iloc[0])  # noqa: E731
    assert accuracy(function.expert_quality) == 1.0 and accuracy(function.quality) == 1.0  # "Rome" after the template
    chat = {"qa": TaskScoring(chat_template=True)}
    pd.testing.assert_frame_equal(
        function.expert_quality, task_quality(MODEL, TOKENIZER, {"qa": qa}, model_name="expert", batch_size=64,
                                              scoring=chat))
    expected = function_distance(MODEL, engine.model, TOKENIZER, {"qa": qa}, reference_name="qa", batch_size=64,
                                 scoring=chat)
    pd.testing.assert_frame_equal(function.distance, expected)


def test_engine_for_study_takes_each_tasks_options_from_its_spec(tmp_path, monkeypatch):
    with_template, without_template = tmp_path / "chat", tmp_path / "plain"
    for folder, tokenizer in ((with_template, TOKENIZER), (without_template, word_tokenizer(chat_template=None))):
        MODEL.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    records = [{"prompt": "capital of France", "answer": "ROME"}]
    tasks = {"qa": {"source": records, "chat_template": True, "case_sensitive": False, "max_new_tokens": 3},
             "plain": records}
    settings = MeasurementSettings(draws=2)
    engine = engine_for_study(Study(experts={"qa": str(with_template)}, tasks=tasks), settings=settings)
    assert engine.data.scoring == {"qa": TaskScoring(True, False, 3), "plain": TaskScoring()}
    quality = engine.function_metrics(["qa"]).expert_quality
    assert quality.query("metric == 'accuracy'")["mean"].tolist() == [1.0]  # "Rome" = "ROME" case-insensitively

    monkeypatch.setattr(studies_module, "load_model", lambda directory: pytest.fail("a model was loaded"))
    with pytest.raises(InputError, match="task 'qa' asks for chat_template"):
        engine_for_study(Study(experts={"qa": str(without_template)}, tasks=tasks), settings=settings)
