"""Capturing activation statistics of a causal LM on a probe set, through nnsight.

The model (an already-loaded transformers model, on CPU or CUDA) is wrapped in ``nnsight.NNsight`` and
traced locally, batch by batch. Its decoder blocks are found by :func:`decoder_layers`: the first
non-empty ``ModuleList`` among :data:`DECODER_PATHS` (``model.layers`` of Llama, Qwen2, Mistral, Gemma,
Phi; ``transformer.h`` of GPT-2 and GPT-J; ``gpt_neox.layers`` of GPT-NeoX/Pythia;
``model.decoder.layers`` of OPT, …), or the dotted ``layers_path`` a caller names. For every block l we
read its output (the residual stream after block l: HF's ``hidden_states[l + 1]``, except that HF
applies the final norm to the last one and we do not), and optionally the attention output and the
MLP output (the outputs of the block's submodules :data:`SITE_MODULES` names, before they are added to
the residual; the first element when a module returns a tuple, as attention modules do), each copied
as its module returns it (a block may change it in place afterwards). The trace stops after the last
block, so the LM head (the largest matmul of a small model) never runs.

Nothing is kept but running sums (:class:`ActivationStats`). The probe sequences are dealt into G
*bootstrap groups* (sequence i goes to group ⌊i·G/N⌋); per site, layer and group we keep the number of
non-padding tokens, Σ x and Σ x xᵀ, where x is a token's activation minus a per-layer reference point
(the mean of the first batch; shifting keeps the second moments from cancelling against a large mean).
Any weighting of the groups (all ones: the full probe set; a multinomial count vector: one bootstrap
draw over groups of sequences) then gives an exact covariance, see :meth:`ActivationStats.covariances`.
Memory: layers × G × d² floats per site (30 × 16 × 576² × 4 B = 0.64 GB for SmolLM2-135M), whatever
the number of tokens.

A small probe set (fewer non-padding tokens n than hidden units d: an interactive panel's few probe
sequences) keeps its shifted tokens x instead of Σ x xᵀ (``keep_tokens``; layers × n × d floats, less
than one group's d²): every covariance is still exact, and the collapse metrics read each one's
spectrum from the n×n token Gram rather than the d×d covariance
(:func:`karcher_lab.diagnostics.collapse.covariance_spectra`).

nnsight instruments the model in place: each module's ``forward`` becomes nnsight's pass-through
controller, which outside a trace runs the original forward unchanged (outputs are bit-identical;
tests/test_diagnostics_activations.py checks it), so the model stays usable as before.

An architecture whose blocks have no single submodule for a site (OPT's blocks hold ``fc1`` and ``fc2``
but no MLP module) cannot be read there; :func:`capturable_sites` tells which requested sites a model
can be read at and why not the others, so that callers can measure what is available.

Padding is excluded everywhere through the attention mask. Probes should be right-padded
(:func:`encode_probes`): a left-padded row's positions would be shifted, which changes activations.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from karcher_lab.errors import InputError, NotSupportedError, ParameterError

SITES: tuple[str, ...] = ("residual", "attention", "mlp")
"""Where activations are read in each decoder block: its output, its attention output, its MLP output."""

SITE_MODULES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "attention": ("self_attn", "attn", "attention", "self_attention"),
    "mlp": ("mlp", "feed_forward"),
})
"""Per non-residual site, the names its submodule may have in a decoder block, in the order tried."""

DECODER_PATHS: tuple[str, ...] = ("model.layers", "layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
"""Where :func:`decoder_layers` looks for the decoder blocks, in this order (dotted paths from the model):
Llama, Qwen2, Mistral, Gemma, Phi; a bare decoder; GPT-2, GPT-J, Falcon; GPT-NeoX, Pythia; OPT."""

DEFAULT_BOOTSTRAP_GROUPS = 16
"""Groups of probe sequences the bootstrap resamples (fewer if there are fewer sequences)."""


@dataclass
class ActivationStats:
    """Running sums of one model's activations on a probe set, per site, layer and bootstrap group.

    For site s, layer l, group g, over the group's non-padding tokens, with x = h − ``shift[s][l]``:
    ``token_counts[g]`` = #tokens, ``sums[s][l, g]`` = Σ x (float64, [L, G, d]) and
    ``outer[s][l, g]`` = Σ x xᵀ (float32, [L, G, d, d]). ``sequence_counts[g]`` is the number of
    probe sequences in group g. With kept tokens, ``outer`` is None and ``tokens[s]`` holds every
    token's x (float32, [L, n, d]), ``token_groups`` [n] the group of each.
    """

    sites: tuple[str, ...]
    token_counts: torch.Tensor
    sequence_counts: torch.Tensor
    shift: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor]
    outer: dict[str, torch.Tensor] | None
    tokens: dict[str, torch.Tensor] | None = None
    token_groups: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.sums[self.sites[0]].shape[0]

    @property
    def num_groups(self) -> int:
        return self.token_counts.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.sums[self.sites[0]].shape[-1]

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise ParameterError(f"site {site!r} was not captured; these statistics hold {list(self.sites)}")

    def means(self, site: str, group_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean activation per layer, [L, d] (float64), or [L, B, d] for ``group_weights`` [B, G]."""
        self._check_site(site)
        w = self._weights(group_weights)
        tokens = w @ self.token_counts  # [B]
        mean = torch.einsum("bg,lgd->lbd", w, self.sums[site]) / tokens[:, None]
        mean = mean + self.shift[site][:, None, :]
        return mean if group_weights is not None else mean[:, 0]

    def covariances(self, site: str, layer: int, group_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Covariance of the layer's activations over tokens (centered, normalized by the token count):
        C = Σ_g w_g Σx xᵀ / n − m mᵀ with n = Σ_g w_g n_g and m = Σ_g w_g Σx / n (shifted
        coordinates; the shift cancels). [d, d], or [B, d, d] for ``group_weights`` [B, G]; float32.
        """
        self._check_site(site)
        if not 0 <= layer < self.num_layers:
            raise ParameterError(f"layer {layer} is out of range: these statistics have {self.num_layers} layers")
        w = self._weights(group_weights)
        tokens = w @ self.token_counts  # [B]
        d = self.hidden_size
        if self.tokens is not None:
            x = self.tokens[site][layer]
            second = torch.einsum("bn,nd,ne->bde", w.float()[:, self.token_groups], x, x)
        else:
            second = (w.float() @ self.outer[site][layer].reshape(self.num_groups, d * d)).reshape(-1, d, d)
        second /= tokens.float()[:, None, None]
        mean = (w @ self.sums[site][layer]) / tokens[:, None]  # [B, d] float64
        cov = second - (mean[:, :, None] * mean[:, None, :]).float()
        return cov if group_weights is not None else cov[0]

    def _weights(self, group_weights: torch.Tensor | None) -> torch.Tensor:
        device = self.token_counts.device
        if group_weights is None:
            return torch.ones(1, self.num_groups, dtype=torch.float64, device=device)
        if group_weights.ndim != 2 or group_weights.shape[1] != self.num_groups:
            raise ParameterError(
                f"group weights must have shape [draws, {self.num_groups}], got {tuple(group_weights.shape)}"
            )
        return group_weights.to(device=device, dtype=torch.float64)


@dataclass(frozen=True)
class DecoderLayers:
    """Where activations are read in a model: its decoder blocks and the submodule each site reads.

    Attributes
    ----------
    path : str
        The dotted path from the model to its decoder blocks (``"model.layers"``, ``"transformer.h"``, …).
    blocks : torch.nn.ModuleList
        The decoder blocks, in forward order.
    modules : Mapping[str, tuple[str, ...]]
        Per requested non-residual site, the name of the submodule it reads in each block.
    """

    path: str
    blocks: torch.nn.ModuleList
    modules: Mapping[str, tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.blocks)


def decoder_layers(model: torch.nn.Module, sites: Sequence[str] = ("residual",), *,
                   layers_path: str | None = None) -> DecoderLayers:
    """The decoder blocks of a causal LM and, in each, the submodule every requested site reads.

    Parameters
    ----------
    model : torch.nn.Module
        The causal LM.
    sites : sequence of str
        Sites from :data:`SITES`; ``attention`` and ``mlp`` need a submodule named as in
        :data:`SITE_MODULES` in every block.
    layers_path : str, optional
        The dotted path from ``model`` to its decoder blocks (``"transformer.h"``); default: the first of
        :data:`DECODER_PATHS` that holds a non-empty ModuleList.

    Returns
    -------
    DecoderLayers

    Raises
    ------
    ParameterError
        Bad sites, or a ``layers_path`` that does not lead to a non-empty ModuleList (the message names
        what is there).
    NotSupportedError
        No decoder blocks at any of :data:`DECODER_PATHS`, or a block without a submodule for a site
        (the message names the block's submodules).
    """
    sites = check_sites(sites)
    path, blocks = _find_blocks(model, layers_path)
    modules = {site: _site_modules(model, path, blocks, site) for site in sites if site in SITE_MODULES}
    return DecoderLayers(path, blocks, MappingProxyType(modules))


def capturable_sites(model: torch.nn.Module, sites: Sequence[str], *,
                     layers_path: str | None = None) -> tuple[tuple[str, ...], dict[str, str]]:
    """Which of ``sites`` :func:`capture_activations` can read in ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The causal LM.
    sites : sequence of str
        Sites from :data:`SITES`.
    layers_path : str, optional
        As in :func:`decoder_layers`.

    Returns
    -------
    readable : tuple of str
        The sites it can read, in the order given.
    unreadable : dict of str to str
        Every other site and why not (the message of the NotSupportedError :func:`decoder_layers`
        raises for it); every site when the decoder blocks are not found.

    Raises
    ------
    ParameterError
        Bad sites or a bad ``layers_path``, as in :func:`decoder_layers`.
    """
    readable, unreadable = [], {}
    for site in check_sites(sites):
        try:
            decoder_layers(model, (site,), layers_path=layers_path)
        except NotSupportedError as error:
            unreadable[site] = str(error)
        else:
            readable.append(site)
    return tuple(readable), unreadable


def _describe(model: torch.nn.Module) -> str:
    return f"{type(model).__name__} (model_type {getattr(getattr(model, 'config', None), 'model_type', '?')!r})"


def _children(module: torch.nn.Module) -> str:
    return ", ".join(name for name, _ in module.named_children()) or "none"


def _is_blocks(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.ModuleList) and len(module) > 0


def _submodule(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str | None]:
    """The module at the dotted ``path`` from ``model`` and None; or, where the path breaks off, the
    deepest module reached and the name it lacks."""
    module = model
    for part in path.split("."):
        child = getattr(module, part, None)
        if not isinstance(child, torch.nn.Module):
            return module, part
        module = child
    return module, None


def _find_blocks(model: torch.nn.Module, layers_path: str | None) -> tuple[str, torch.nn.ModuleList]:
    """The path and decoder blocks of ``model``: at ``layers_path``, else at the first of :data:`DECODER_PATHS`."""
    if layers_path is None:
        for path in DECODER_PATHS:
            module, missing = _submodule(model, path)
            if missing is None and _is_blocks(module):
                return path, module
        raise NotSupportedError(
            f"{_describe(model)} is not supported for activation capture: it needs its decoder blocks as a "
            f"non-empty ModuleList at one of {', '.join(f'`{p}`' for p in DECODER_PATHS)}, and none of these "
            f"is one (its top-level submodules: {_children(model)}); name their dotted path with `layers_path`"
        )
    if not isinstance(layers_path, str) or not all(layers_path.split(".")):
        raise ParameterError(f"layers_path must be a dotted path of submodule names such as 'transformer.h', "
                             f"got {layers_path!r}")
    module, missing = _submodule(model, layers_path)
    if missing is not None:
        raise ParameterError(
            f"layers_path {layers_path!r} does not lead to a module of {_describe(model)}: "
            f"{type(module).__name__} has no submodule `{missing}` (its submodules: {_children(module)})"
        )
    if not _is_blocks(module):
        found = "an empty ModuleList" if isinstance(module, torch.nn.ModuleList) else f"a {type(module).__name__}"
        raise ParameterError(f"layers_path {layers_path!r} of {_describe(model)} is {found}, not a non-empty "
                             f"ModuleList of decoder blocks (its submodules: {_children(module)})")
    return layers_path, module


def _site_modules(model: torch.nn.Module, path: str, blocks: torch.nn.ModuleList, site: str) -> tuple[str, ...]:
    """The name of the submodule ``site`` reads in each block. NotSupportedError for a block without one,
    or whose one adds the residual stream itself (its ``forward`` takes a ``residual``, as BLOOM's do):
    its output is not the site's."""
    names = []
    for index, block in enumerate(blocks):
        where = f"{_describe(model)} is not supported for the {site!r} site: its decoder block `{path}.{index}`"
        name = next((n for n in SITE_MODULES[site] if isinstance(getattr(block, n, None), torch.nn.Module)), None)
        if name is None:
            raise NotSupportedError(
                f"{where} ({type(block).__name__}) has no {site} submodule (none of "
                f"{', '.join(f'`{n}`' for n in SITE_MODULES[site])}; its submodules: {_children(block)})"
            )
        module = getattr(block, name)
        if "residual" in inspect.signature(type(module).forward).parameters:
            raise NotSupportedError(f"{where} has a `{name}` ({type(module).__name__}) that adds the residual "
                                    f"stream itself, so its output is not the {site} output")
        names.append(name)
    return tuple(names)


def check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    """The requested sites as a tuple; ParameterError for an empty list, repeats or unknown names."""
    sites = tuple(sites)
    unknown = [s for s in sites if s not in SITES]
    if not sites or unknown or len(set(sites)) != len(sites):
        raise ParameterError(f"sites must be a non-empty list of distinct names from {list(SITES)}, got {list(sites)}")
    return sites


def encode_probes(tokenizer, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of ``texts`` (truncated to ``max_length`` tokens)."""
    if len(texts) == 0:
        raise InputError("no probe texts given")
    encoded = tokenizer(
        list(texts), padding=True, padding_side="right", truncation=max_length is not None,
        max_length=max_length, return_tensors="pt",
    )
    return encoded["input_ids"], encoded["attention_mask"]


def _check_probes(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise InputError("input_ids must be an integer tensor of shape [sequences, tokens]")
    if input_ids.numel() == 0:
        raise InputError(f"no probe tokens: input_ids has shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}")
    empty = (attention_mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"probe sequence(s) {empty[:10]} have no non-padding token")
    return attention_mask


def _hidden(output) -> torch.Tensor:
    """The hidden-state tensor of a module's output: the first element of a tuple (decoder blocks return one
    in transformers 4; attention modules return (output, attention weights))."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _trace_batch(wrapped, layers: DecoderLayers, sites: tuple[str, ...], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> dict[str, list]:
    """Run one batch through the nnsight wrapper; the saved outputs of every block, per site."""
    order = [s for s in ("attention", "mlp", "residual") if s in sites]  # forward order within a block
    saved: list = []
    with wrapped.trace(input_ids=input_ids, attention_mask=attention_mask) as tracer:
        for index, block in enumerate(wrapped.get(layers.path)):
            for site in order:
                module = block if site == "residual" else getattr(block, layers.modules[site][index])
                # a copy, taken as the module returns: its block may change the output in place afterwards
                # (Falcon adds the attention output to the MLP's)
                saved.append(_hidden(module.output).clone().save())
        tracer.stop()
    return {site: saved[k :: len(order)] for k, site in enumerate(order)}


@torch.inference_mode()
def capture_activations(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    sites: Sequence[str] = ("residual",),
    batch_size: int = 8,
    bootstrap_groups: int = DEFAULT_BOOTSTRAP_GROUPS,
    keep_tokens: bool | None = None,
    layers_path: str | None = None,
) -> ActivationStats:
    """Running activation statistics of ``model`` on the probe set ``input_ids`` [N, T] (padding
    marked 0 in ``attention_mask``), read through nnsight at every decoder block.

    ``sites``: any of ``residual`` (block outputs), ``attention``, ``mlp``. Batches of ``batch_size``
    sequences run on the model's device; statistics stay there. ``bootstrap_groups``: how many groups
    of sequences the bootstrap resamples (capped at N). ``keep_tokens``: keep every token's activation
    instead of Σ x xᵀ per group (see the module docstring); None: when the probe set has fewer
    non-padding tokens than the model's hidden size. ``layers_path``: the dotted path from ``model``
    to its decoder blocks (default: found, see :func:`decoder_layers`). Raises NotSupportedError where
    the decoder blocks, or a site's submodule, are not found (:func:`capturable_sites` tells which
    sites can be read).
    """
    from nnsight import NNsight

    sites = check_sites(sites)
    layers = decoder_layers(model, sites, layers_path=layers_path)
    mask = _check_probes(input_ids, attention_mask)
    if batch_size < 1 or bootstrap_groups < 1:
        raise ParameterError(f"batch_size and bootstrap_groups must be >= 1, got {batch_size} and {bootstrap_groups}")
    device = next(model.parameters()).device
    n_seq, n_groups = input_ids.shape[0], min(bootstrap_groups, input_ids.shape[0])
    group_of = torch.arange(n_seq) * n_groups // n_seq
    wrapped = NNsight(model)
    token_counts = torch.zeros(n_groups, dtype=torch.float64, device=device)
    shift: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    outer: dict[str, torch.Tensor] = {}
    kept: dict[str, list[list[torch.Tensor]]] = {}  # site → layer → the batches' tokens
    kept_groups: list[torch.Tensor] = []
    for start in range(0, n_seq, batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        keep = mask[start : start + batch_size].to(device).bool()
        outputs = _trace_batch(wrapped, layers, sites, ids, mask[start : start + batch_size].to(device))
        groups = group_of[start : start + batch_size].to(device)
        token_groups = groups[:, None].expand_as(keep)[keep]  # the group of each non-padding token
        members = [(g, keep & (groups == g)[:, None]) for g in groups.unique().tolist()]
        for g, tokens in members:
            token_counts[g] += tokens.sum()
        for site in sites:
            if site not in shift:  # first batch: the reference point is its mean, per layer
                shift[site] = torch.stack([h[keep].double().mean(0) for h in outputs[site]])
                L, d = shift[site].shape
                if keep_tokens is None:
                    keep_tokens = int(mask.sum()) < d
                sums[site] = torch.zeros(L, n_groups, d, dtype=torch.float64, device=device)
                if keep_tokens:
                    kept[site] = [[] for _ in range(L)]
                else:
                    outer[site] = torch.zeros(L, n_groups, d, d, dtype=torch.float32, device=device)
            for layer, h in enumerate(outputs[site]):
                if keep_tokens:
                    x = h[keep].float() - shift[site][layer].float()
                    sums[site][layer].index_add_(0, token_groups, x.double())
                    kept[site][layer].append(x)
                    continue
                for g, tokens in members:
                    x = h[tokens].float() - shift[site][layer].float()
                    sums[site][layer, g] += x.double().sum(0)
                    outer[site][layer, g].addmm_(x.T, x)
        if keep_tokens:
            kept_groups.append(token_groups)
    sequence_counts = torch.bincount(group_of, minlength=n_groups)
    if keep_tokens:
        tokens = {site: torch.stack([torch.cat(batches) for batches in kept[site]]) for site in sites}
        return ActivationStats(sites, token_counts, sequence_counts, shift, sums, None, tokens, torch.cat(kept_groups))
    return ActivationStats(sites, token_counts, sequence_counts, shift, sums, outer)
