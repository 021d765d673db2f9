"""Activation capture through nnsight against plain forwards, padding, sites, unsupported architectures."""
import pytest
import torch

from karcher_lab.diagnostics import capture_activations, encode_probes
from karcher_lab.errors import InputError, NotSupportedError, ParameterError


def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()


def _probes():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (7, 10), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate([10, 4, 7, 1, 10, 9, 3]):  # right padding of different lengths
        mask[row, length:] = 0
    return ids, mask


def _reference(values: list[torch.Tensor], mask: torch.Tensor):
    """float64 mean and centered covariance over the non-padding tokens, per layer."""
    keep = mask.bool()
    rows = [v[keep].double() for v in values]
    return [r.mean(0) for r in rows], [torch.cov(r.T, correction=0) for r in rows]


def _block_outputs(model, ids, mask, attribute=None):
    """Outputs of every decoder block (or of its ``attribute`` submodule) from forward hooks on a plain forward."""
    captured, handles = [], []
    for layer in model.model.layers:
        module = layer if attribute is None else getattr(layer, attribute)
        handles.append(module.register_forward_hook(
            lambda m, args, out: captured.append((out[0] if isinstance(out, tuple) else out).detach())))
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    return captured, hidden


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_residual_stream_matches_output_hidden_states(kind):
    model = _tiny(kind)
    ids, mask = _probes()
    stats = capture_activations(model, ids, mask, batch_size=3, bootstrap_groups=3)
    blocks, hidden = _block_outputs(model, ids, mask)
    # hidden_states[l + 1] is block l's output, except the last, which HF passes through the final norm
    reference = [hidden[l + 1] for l in range(len(blocks) - 1)] + [blocks[-1]]
    assert torch.allclose(hidden[-1], model.model.norm(blocks[-1]), atol=1e-6)
    means, covariances = _reference(reference, mask)
    assert stats.num_layers == 3 and stats.hidden_size == 16 and stats.num_groups == 3
    assert stats.token_counts.sum() == mask.sum()
    assert stats.sequence_counts.tolist() == [3, 2, 2]
    for layer in range(3):
        assert torch.allclose(stats.means("residual")[layer], means[layer], atol=1e-5)
        assert torch.allclose(stats.covariances("residual", layer).double(), covariances[layer], atol=1e-5)


def test_the_model_computes_the_same_after_capture():
    model = _tiny("llama")
    ids, mask = _probes()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    capture_activations(model, ids, mask, sites=("residual", "mlp"))
    capture_activations(model, ids, mask)  # wrapping twice is fine
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_padding_is_masked_out():
    model = _tiny("llama")
    ids, mask = _probes()
    garbage = torch.where(mask.bool(), ids, torch.randint_like(ids, 0, 50))
    a = capture_activations(model, ids, mask, batch_size=4)
    b = capture_activations(model, garbage, mask, batch_size=2)
    for layer in range(3):
        assert torch.allclose(a.covariances("residual", layer), b.covariances("residual", layer), rtol=1e-4, atol=1e-8)
    # counting the padding as tokens would change the statistics
    c = capture_activations(model, garbage, None, batch_size=4)
    assert not torch.allclose(a.covariances("residual", 1), c.covariances("residual", 1), rtol=1e-2, atol=0)


def test_attention_and_mlp_sites_match_their_modules():
    model = _tiny("qwen2")
    ids, mask = _probes()
    stats = capture_activations(model, ids, mask, sites=("residual", "attention", "mlp"), batch_size=5)
    for site, attribute in [("attention", "self_attn"), ("mlp", "mlp")]:
        outputs, _ = _block_outputs(model, ids, mask, attribute)
        means, covariances = _reference(outputs, mask)
        for layer in range(3):
            assert torch.allclose(stats.means(site)[layer], means[layer], atol=1e-5)
            assert torch.allclose(stats.covariances(site, layer).double(), covariances[layer], atol=1e-5)


def test_encode_probes_pads_on_the_right():
    from karcher_lab.zoo.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()  # pads on the left by default
    ids, mask = encode_probes(tokenizer, ["ab", "abcd"])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert ids[0, 3:].tolist() == [tokenizer.pad_token_id] * 2


def test_unsupported_architecture_names_what_is_missing():
    hidden = torch.nn.Module()  # decoder blocks where no known path leads
    hidden.inner = _tiny("llama")
    with pytest.raises(NotSupportedError, match=r"`model\.layers`.*`transformer\.h`.*submodules: inner.*layers_path"):
        capture_activations(hidden, torch.zeros(1, 3, dtype=torch.long))

    model = _tiny("llama")
    for layer in model.model.layers:
        del layer.mlp
    with pytest.raises(NotSupportedError, match=r"'mlp' site: its decoder block `model\.layers\.0`.*no mlp submodule"):
        capture_activations(model, torch.zeros(1, 3, dtype=torch.long), sites=["mlp"])


def test_bad_probes_and_settings():
    model = _tiny("llama")
    ids, mask = _probes()
    with pytest.raises(InputError, match="no non-padding token"):
        capture_activations(model, ids, torch.zeros_like(mask))
    with pytest.raises(InputError, match="shape"):
        capture_activations(model, ids, mask[:, :3])
    with pytest.raises(InputError, match="integer"):
        capture_activations(model, ids.float())
    with pytest.raises(ParameterError, match="sites"):
        capture_activations(model, ids, sites=["embedding"])
    with pytest.raises(ParameterError, match="batch_size"):
        capture_activations(model, ids, batch_size=0)
