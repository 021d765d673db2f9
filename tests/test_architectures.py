"""Activation capture and the measurement engine across architectures: tiny random models built from
configs (no hub access) of GPT-2, GPT-J, GPT-NeoX, OPT, Llama, Qwen2, Phi, Gemma, Falcon and BLOOM; the
blocks and sites found for each, the captured statistics against HF's hidden states and forward hooks,
an explicit ``layers_path``, and the engine, sweep rows and explorer where activations cannot be read."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import transformers

from karcher_lab import diagnostics
from karcher_lab.diagnostics.activations import capturable_sites, decoder_layers
from karcher_lab.diagnostics.examples import Example
from karcher_lab.errors import NotSupportedError, ParameterError
from karcher_lab.experiment.measure import expert_rows, measure_merge
from karcher_lab.measurement import MeasurementEngine, MeasurementSettings
from karcher_lab.measurement import engine as engine_module
from karcher_lab.zoo.tokenizer import char_tokenizer

LAYERS, WIDTH, VOCAB = 3, 32, 100  # the char tokenizer has 100 tokens
ALL_SITES = ("residual", "attention", "mlp")

ARCHITECTURES = {  # name: (config class, model class, config arguments, blocks path, attention, mlp)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_layer=LAYERS, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=64), "transformer.h", "attn", "mlp"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_layer=LAYERS, n_embd=WIDTH, n_head=2, rotary_dim=8, vocab_size=VOCAB, n_positions=64),
             "transformer.h", "attn", "mlp"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=2, intermediate_size=64,
                      vocab_size=VOCAB, max_position_embeddings=64), "gpt_neox.layers", "attention", "mlp"),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=2, ffn_dim=64, vocab_size=VOCAB,
                 max_position_embeddings=64, word_embed_proj_dim=WIDTH), "model.decoder.layers", "self_attn", None),
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64), "model.layers", "self_attn", "mlp"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64), "model.layers", "self_attn", "mlp"),
    "phi": ("PhiConfig", "PhiForCausalLM",
            dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=2, intermediate_size=64,
                 vocab_size=VOCAB, max_position_embeddings=64), "model.layers", "self_attn", "mlp"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64), "model.layers", "self_attn", "mlp"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(num_hidden_layers=LAYERS, hidden_size=WIDTH, num_attention_heads=2, vocab_size=VOCAB),
               "transformer.h", "self_attention", "mlp"),
    # BLOOM's attention and MLP modules add the residual stream themselves: only the residual site
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(n_layer=LAYERS, hidden_size=WIDTH, n_head=2, vocab_size=VOCAB), "transformer.h", None, None),
}
KINDS = [kind for kind, (config, model, *_) in ARCHITECTURES.items()
         if hasattr(transformers, config) and hasattr(transformers, model)]


def tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny model of the architecture, in eval mode."""
    config, model, arguments, *_ = ARCHITECTURES[kind]
    torch.manual_seed(seed)
    return getattr(transformers, model)(getattr(transformers, config)(**arguments)).eval()


def probes():
    """Right-padded random probes of different lengths."""
    ids = torch.randint(0, VOCAB, (6, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, length in enumerate([9, 4, 7, 2, 9, 5]):
        mask[row, length:] = 0
    return ids, mask


def reference(values: list[torch.Tensor], mask: torch.Tensor):
    """float64 mean and centered covariance over the non-padding tokens, per layer."""
    rows = [v[mask.bool()].double() for v in values]
    return [r.mean(0) for r in rows], [torch.cov(r.T, correction=0) for r in rows]


def module_outputs(model, modules, ids, mask) -> list[torch.Tensor]:
    """The (first) output of each module, from forward hooks on a plain forward; copied, since a block
    may change it in place afterwards (Falcon adds the attention output to the MLP's)."""
    captured = []
    handles = [m.register_forward_hook(
        lambda _, __, out: captured.append((out[0] if isinstance(out, tuple) else out).clone())) for m in modules]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    return captured


def assert_statistics(stats, site: str, values: list[torch.Tensor], mask: torch.Tensor):
    means, covariances = reference(values, mask)
    for layer, (mean, covariance) in enumerate(zip(means, covariances)):
        torch.testing.assert_close(stats.means(site)[layer], mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(stats.covariances(site, layer).double(), covariance, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_and_sites_are_found(kind):
    model = tiny(kind)
    _, _, _, path, attention, mlp = ARCHITECTURES[kind]
    readable, unreadable = capturable_sites(model, ALL_SITES)
    expected = tuple(s for s, name in zip(ALL_SITES, ("block", attention, mlp)) if name)
    assert readable == expected and set(unreadable) == set(ALL_SITES) - set(expected)
    layers = decoder_layers(model, readable)
    assert layers.path == path and len(layers) == LAYERS and layers.blocks is model.get_submodule(path)
    assert dict(layers.modules) == {s: (name,) * LAYERS for s, name in (("attention", attention), ("mlp", mlp)) if name}


@pytest.mark.parametrize("kind", KINDS)
def test_residual_stream_matches_output_hidden_states(kind):
    model = tiny(kind)
    ids, mask = probes()
    stats = diagnostics.capture_activations(model, ids, mask, batch_size=4, bootstrap_groups=3)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert stats.num_layers == LAYERS and stats.hidden_size == WIDTH and stats.token_counts.sum() == mask.sum()
    # hidden_states[l + 1] is block l's output, but for the last block, which HF passes through the final norm
    before_last = [hidden[layer + 1] for layer in range(LAYERS - 1)]
    assert_statistics(stats, "residual", before_last, mask)


@pytest.mark.parametrize("kind", [kind for kind in KINDS if any(ARCHITECTURES[kind][4:])])
def test_attention_and_mlp_sites_match_their_modules(kind):
    model = tiny(kind)
    _, _, _, path, attention, mlp = ARCHITECTURES[kind]
    sites = {site: name for site, name in (("attention", attention), ("mlp", mlp)) if name}
    ids, mask = probes()
    stats = diagnostics.capture_activations(model, ids, mask, sites=list(sites), batch_size=4)
    for site, name in sites.items():
        outputs = module_outputs(model, [getattr(block, name) for block in model.get_submodule(path)], ids, mask)
        assert_statistics(stats, site, outputs, mask)


def test_a_site_the_blocks_lack_is_refused_clearly():
    with pytest.raises(NotSupportedError, match=r"'mlp' site: its decoder block `model\.decoder\.layers\.0` "
                                                r"\(OPTDecoderLayer\) has no mlp submodule.*fc1, fc2"):
        diagnostics.capture_activations(tiny("opt"), probes()[0], sites=["residual", "mlp"])
    with pytest.raises(NotSupportedError, match=r"`self_attention` \(BloomAttention\) that adds the residual stream"):
        decoder_layers(tiny("bloom"), ["attention"])


class Hidden(torch.nn.Module):
    """A causal LM whose decoder blocks no known path leads to, next to an unused ModuleList ``layers``
    that the search would take for them."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_an_explicit_path_wins_over_the_search():
    gpt2 = tiny("gpt2")
    hidden = Hidden(gpt2)
    with pytest.raises(NotSupportedError, match=r"none of these is one \(its top-level submodules: inner\).*layers_path"):
        decoder_layers(hidden)
    hidden.layers = torch.nn.ModuleList([torch.nn.Identity()])  # a decoy the search finds first
    assert decoder_layers(hidden).path == "layers"
    found = decoder_layers(hidden, ALL_SITES, layers_path="inner.transformer.h")
    assert found.path == "inner.transformer.h" and found.blocks is gpt2.transformer.h
    ids, mask = probes()
    direct = diagnostics.capture_activations(gpt2, ids, mask, sites=ALL_SITES)
    through = diagnostics.capture_activations(hidden, ids, mask, sites=ALL_SITES, layers_path="inner.transformer.h")
    for site in ALL_SITES:
        assert torch.equal(direct.sums[site], through.sums[site])
        for layer in range(LAYERS):
            assert torch.equal(direct.covariances(site, layer), through.covariances(site, layer))


def test_a_wrong_path_names_what_is_there():
    gpt2 = tiny("gpt2")
    with pytest.raises(ParameterError, match=r"'transformer\.blocks'.*GPT2Model has no submodule `blocks` "
                                             r"\(its submodules: wte, wpe, drop, h, ln_f\)"):
        decoder_layers(gpt2, layers_path="transformer.blocks")
    with pytest.raises(ParameterError, match=r"'transformer\.ln_f'.* is a LayerNorm, not a non-empty ModuleList"):
        decoder_layers(gpt2, layers_path="transformer.ln_f")
    for bad in ("", "transformer..h", 3):
        with pytest.raises(ParameterError, match="dotted path"):
            diagnostics.capture_activations(gpt2, probes()[0], layers_path=bad)
    with pytest.raises(ParameterError, match="dotted path"):  # a bad path is the caller's error, not a degradation
        capturable_sites(gpt2, ALL_SITES, layers_path="")


# ----------------------------------------------------------------- measurement engine, sweep rows, explorer

EXAMPLES = {"add": [Example("1+2=", "3"), Example("2+5=", "7"), Example("4+4=", "8")],
            "copy": [Example("copy ab:", "ab"), Example("copy xyz:", "xyz")]}
PROBES = ["hello world", "abc def", "the quick brown fox", "12+30=42"]
IDENTITY = dict(pool="tiny-gpt2", order="", method="linear", m=2, experts="add+copy")


def averaged(experts: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    states = [model.state_dict() for model in experts.values()]
    return {name: sum(state[name] for state in states) / len(states) for name in states[0]}


def engine_of(kind: str, sites=ALL_SITES, wrap=lambda model: model):
    experts = {"add": wrap(tiny(kind, seed=1)), "copy": wrap(tiny(kind, seed=2))}
    engine = MeasurementEngine(experts, char_tokenizer(), EXAMPLES, PROBES, model=lambda: wrap(tiny(kind)),
                               settings=MeasurementSettings(sites=sites, draws=3, seed=4))
    return engine, averaged(experts)


def test_layer_metrics_of_tiny_gpt2_experts():
    engine, state = engine_of("gpt2")
    measured = engine.measure(state, ["add", "copy"])
    layers = measured.layers
    assert layers.note == ""
    stats = diagnostics.capture_activations(engine.model, engine.data.probe_ids, engine.data.probe_mask, sites=ALL_SITES)
    expected = diagnostics.collapse_metrics(stats, model="merged", draws=3, seed=4)
    pd.testing.assert_frame_equal(layers.merged.reset_index(drop=True), expected, rtol=1e-5, atol=1e-9)
    assert set(layers.experts["model"]) == {"add", "copy"} and set(layers.experts["site"]) == set(ALL_SITES)
    assert set(layers.ratios["layer"]) == set(range(LAYERS)) and layers.ratios["mean"].notna().all()
    assert set(measured.function.distance["reference"]) == {"add", "copy"}


def test_a_model_without_an_mlp_module_still_gets_residual_and_attention_curves():
    engine, state = engine_of("opt")
    layers = engine.measure(state, ["add", "copy"]).layers
    assert layers.note.startswith("layer metrics at site(s) mlp unavailable: ") and "fc1, fc2" in layers.note
    for table in (layers.merged, layers.experts, layers.ratios):
        assert set(table["site"]) == {"residual", "attention"} and set(table["layer"]) == set(range(LAYERS))


def test_where_the_blocks_cannot_be_found_the_function_metrics_remain():
    engine, state = engine_of("gpt2", wrap=Hidden)
    measured = engine.measure(state, ["add", "copy"])
    layers = measured.layers
    assert layers.note.startswith("layer metrics unavailable: Hidden (model_type 'gpt2') is not supported")
    assert layers.note.count("is not supported") == 1  # one reason, however many sites
    assert layers.merged.empty and layers.experts.empty and layers.ratios.empty
    assert list(layers.merged.columns) == list(diagnostics.collapse.COLUMNS)
    assert set(measured.function.quality["task"]) == {"add", "copy"}
    assert set(measured.function.distance["metric"]) == {"kl", "fisher_rao"}
    assert measured.function.distance["mean"].notna().all() and not measured.weights.empty
    assert engine.experts.collapse("add").empty
    with pytest.raises(NotSupportedError, match="layers_path"):
        engine.experts.draw_metrics("add")

    # the sweep: task, weight and summary rows, no layer rows, NaN layer summaries
    rows = measure_merge(engine, state, IDENTITY, ["add", "copy"], merge_seconds=0.5)
    assert set(rows["scope"]) == {"task", "weights", "summary"}
    summary = rows[rows["scope"] == "summary"].set_index("metric")["mean"]
    assert math.isnan(summary["avg_variance_ratio"]) and math.isnan(summary["avg_effective_rank_ratio"])
    assert not math.isnan(summary["avg_kl"]) and summary["merge_seconds"] == 0.5
    assert set(expert_rows(engine, "tiny-gpt2", "add")["scope"]) == {"task"}


def test_the_explorer_shows_the_note_and_the_function_metrics(micro_pool, monkeypatch):
    from karcher_lab.widgets import MergeExplorer

    explorer = MergeExplorer(micro_pool, quality_examples=2, activation_examples=1, draws=2, exact_match=False,
                             initial_update=False)
    reason = "no decoder blocks where they were looked for"
    monkeypatch.setattr(engine_module, "capturable_sites", lambda model, sites, **_: ((), {s: reason for s in sites}))
    assert explorer.update() is True and explorer.error == ""
    assert f"layer metrics unavailable: {reason}" in explorer.status.value
    assert reason in explorer.collapse_fig.layout.annotations[0].text and not explorer.collapse_fig.data
    assert len(explorer.nll_fig.data) > 0 and explorer.tables["collapse"].empty
