"""Calibration plumbing shared by the methods: layer-input capture and the layer-by-layer flow.

The sequential flow holds the inputs of one decoder layer at a time (all calibration sequences): the model runs once,
up to the first layer, and from then on each layer maps the held activations to the next layer's inputs. A model
opened with `offload.open_layerwise` keeps its layers on disk, and the flow materializes each one only while it is
being worked on.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from gridlab.pruning.offload import resident


class _StopForward(Exception):
    """Raised by the capture hook so the model stops right after the first layer's inputs are seen."""


@dataclass
class LayerInputs:
    """Inputs of one decoder layer, one entry per calibration batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]  # every keyword argument the layer received: position_embeddings, attention_mask, ...


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def layer_output(output) -> torch.Tensor:
    # transformers 5 returns a tensor from LlamaDecoderLayer; older versions returned a tuple.
    return output[0] if isinstance(output, (tuple, list)) else output


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def select_samples(calibration: torch.Tensor, nsamples: int | None) -> torch.Tensor:
    return calibration if nsamples is None else calibration[:nsamples]


def batches(calibration: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, calibration.shape[0], batch_size):
        yield calibration[start:start + batch_size]


@torch.no_grad()
def capture_layer_inputs(model, calibration: torch.Tensor, batch_size: int, layer_index: int = 0) -> LayerInputs:
    """Run the model until decoder layer `layer_index` and keep exactly what that layer receives."""
    layer = decoder_layers(model)[layer_index]
    device = model_device(model)
    captured = LayerInputs(hidden=[], kwargs=[])

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden.detach())
        captured.kwargs.append(kwargs)
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches(calibration, batch_size):
            try:
                model.model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    return [layer_output(layer(hidden, **kwargs)) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs)]


def sequential_layers(model, calibration: torch.Tensor, batch_size: int) -> Iterator[tuple[int, nn.Module, LayerInputs]]:
    """Yield (index, layer, inputs) for each decoder layer in order.

    The caller may prune the layer before asking for the next one; the next layer's inputs are then computed by
    the pruned layer, as in Wanda's and SparseGPT's reference flow.
    """
    inputs = capture_layer_inputs(model, calibration, batch_size)
    for index, layer in enumerate(decoder_layers(model)):
        with resident(model, layer):
            yield index, layer, inputs
            inputs = LayerInputs(hidden=run_layer(layer, inputs), kwargs=inputs.kwargs)


def each_layer(model) -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, layer) for each decoder layer, materialized for the duration of its turn."""
    for index, layer in enumerate(decoder_layers(model)):
        with resident(model, layer):
            yield index, layer


def final_hidden_states(model, sequences: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The last decoder layer's outputs (before the final norm), one tensor per batch, computed layer by layer."""
    last = len(decoder_layers(model)) - 1
    for index, layer, inputs in sequential_layers(model, sequences, batch_size):
        if index == last:
            return run_layer(layer, inputs)
    raise ValueError("the model has no decoder layers")


@contextmanager
def input_hooks(modules: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None]):
    """Call on_input(name, input tensor) whenever one of `modules` runs."""

    def make_hook(name):
        def hook(module, args):
            on_input(name, args[0].detach())
        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def mean_loss(model, calibration: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy over all predicted tokens."""
    device = model_device(model)
    total, count = 0.0, 0
    for batch in batches(calibration, batch_size):
        batch = batch.to(device)
        loss = model(batch, labels=batch, use_cache=False).loss
        tokens = batch.numel() - batch.shape[0]
        total += float(loss) * tokens
        count += tokens
    return total / count
