"""Depth pruning: whole decoder layers leave (ShortGPT, Minitron-Depth).

Per family (gridlab.families): a removed layer takes all its tensors with it — Qwen2's q/k/v biases, Qwen3's
q_norm / k_norm — and the survivors keep theirs untouched. The config loses the removed layers' entries of
``layer_types`` (Qwen2/Qwen3 list one per layer; gridlab's parents have one kind, so the first L' entries are the
survivors'); Mistral's ``sliding_window`` and every other field stay the parent's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gridlab.layerwise import decoder_layers, mean_loss, run_layer, select_samples, sequential_layers
from gridlab.model import param_counts
from gridlab.pruning.registry import Method, PruneResult, check_nsamples, register


def layers_to_remove(num_layers: int, ratio: float) -> int:
    # Layers are equal in size, so removing round(r·L) of them is the closest a depth method can get to r.
    return min(max(round(ratio * num_layers), 0), num_layers - 1)


def depth_config(parent_config, ratio: float, options: dict):
    config = copy.deepcopy(parent_config)
    layers = parent_config.num_hidden_layers
    config.num_hidden_layers = layers - layers_to_remove(layers, ratio)
    if getattr(config, "layer_types", None) is not None:  # one per layer; all alike (families.check_supported)
        config.layer_types = list(config.layer_types[:config.num_hidden_layers])
    return config


def remove_layers(model, removed: list[int], config):
    """Drop decoder layers in place and give the model `config` (depth_config's); renumber the survivors so the KV
    cache indexes them correctly."""
    parent_decoder = param_counts(model).decoder
    removed_set = set(removed)
    kept = [layer for i, layer in enumerate(decoder_layers(model)) if i not in removed_set]
    if config.num_hidden_layers != len(kept):
        raise RuntimeError(f"depth pruning kept {len(kept)} layers but its config has {config.num_hidden_layers}")
    model.model.layers = nn.ModuleList(kept)
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index
    # A fresh config object: the caller's config (often shared with the model) keeps describing the parent.
    parent_config = model.config
    for module in model.modules():
        if getattr(module, "config", None) is parent_config:
            module.config = config
    return 1.0 - param_counts(model).decoder / parent_decoder


@torch.no_grad()
def block_influence(model, calibration: torch.Tensor, batch_size: int) -> list[float]:
    """ShortGPT's BI_i = 1 - mean over tokens of cos(layer input, layer output).

    Computed in the sequential flow: layer i's output is layer i+1's input, so only the last layer runs twice.
    """
    last = len(decoder_layers(model)) - 1
    tokens = calibration.numel()

    def influence(hidden_in: list[torch.Tensor], hidden_out: list[torch.Tensor]) -> float:
        cos = sum(float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).sum())
                  for a, b in zip(hidden_in, hidden_out, strict=True))
        return 1.0 - cos / tokens

    scores, previous = [], None
    for index, layer, inputs in sequential_layers(model, calibration, batch_size):
        if previous is not None:
            scores.append(influence(previous, inputs.hidden))
        previous = inputs.hidden
        if index == last:
            scores.append(influence(inputs.hidden, run_layer(layer, inputs)))
    return scores


def _prune_shortgpt(model, ratio, calibration, options):
    config = depth_config(model.config, ratio, options)
    k = model.config.num_hidden_layers - config.num_hidden_layers
    scores = block_influence(model, select_samples(calibration, options["nsamples"]), options["batch_size"])
    removed = sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k])
    achieved = remove_layers(model, removed, config)
    return PruneResult(model=model, achieved_ratio=achieved, removed=removed, mask=None, method="shortgpt",
                       granularity="depth", options=options)


@torch.no_grad()
def block_removal_losses(model, calibration: torch.Tensor, k: int, batch_size: int) -> list[float]:
    """Held-out loss with layers [i, i+k) skipped, for every start i."""
    layers = list(decoder_layers(model))
    num_layers = model.config.num_hidden_layers
    losses = []
    try:
        for start in range(len(layers) - k + 1):
            model.model.layers = nn.ModuleList(layers[:start] + layers[start + k:])
            model.config.num_hidden_layers = len(layers) - k
            losses.append(mean_loss(model, calibration, batch_size))
    finally:
        model.model.layers = nn.ModuleList(layers)
        model.config.num_hidden_layers = num_layers
    return losses


def _prune_minitron_depth(model, ratio, calibration, options):
    config = depth_config(model.config, ratio, options)
    k = model.config.num_hidden_layers - config.num_hidden_layers
    losses = block_removal_losses(model, select_samples(calibration, options["nsamples"]), k, options["batch_size"])
    start = min(range(len(losses)), key=lambda i: (losses[i], i))
    removed = list(range(start, start + k))
    achieved = remove_layers(model, removed, config)
    return PruneResult(model=model, achieved_ratio=achieved, removed=removed, mask=None, method="minitron-depth",
                       granularity="depth", options=options)


register(Method(name="shortgpt", granularity="depth", run=_prune_shortgpt, config=depth_config,
                defaults=dict(nsamples=None, batch_size=8), check_options=check_nsamples, layerwise=True))
register(Method(name="minitron-depth", granularity="depth", run=_prune_minitron_depth, config=depth_config,
                defaults=dict(nsamples=None, batch_size=8), check_options=check_nsamples))
