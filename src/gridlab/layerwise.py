"""The layer-by-layer engine shared by pruning and evaluation: layer-input capture, the sequential flow, and models
whose decoder layers stay on disk.

The sequential flow holds the inputs of one decoder layer at a time (all calibration or evaluation sequences): the
model runs once, up to the first layer, and from then on each layer maps the held activations to the next layer's
inputs. What a layer receives is captured whole: the hidden states and every keyword argument (position
embeddings, attention mask, ...), so a layer run here computes what it computes inside the model.

A parent that does not fit in memory is opened with `open_layerwise`: every decoder layer stays on the meta device
(no storage) and only the embeddings, final norm and LM head are materialized on the compute device. The flow asks
the model's `LayerStore` to materialize a layer just before it needs it and to release it right after: the layer's
(possibly pruned) tensors go to a spill folder, written whole through `gridlab.atomic`, and the layer returns to
meta. Peak memory is one layer plus the activations, whatever the parent's depth. `save_layerwise` then writes a
standard sharded HF checkpoint (one safetensors file per layer and an index) that loads without gridlab.

Only methods that visit the layers in order can prune this way (`gridlab.pruning.Method.layerwise`); the others
need whole-model forward or backward passes. `gridlab.evaluate.heldout_loss` runs a layerwise model layer by layer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save, save_file
from torch import nn
from transformers import AutoConfig

from gridlab import atomic
from gridlab.families import build_model, check_supported
from gridlab.model import set_special_tokens, write_beside_weights

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(checkpoint: Path) -> dict[str, Path]:
    """Parameter name -> safetensors file holding it, for a single-file or sharded HF checkpoint."""
    index = checkpoint / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: checkpoint / file for name, file in weight_map.items()}
    with safe_open(checkpoint / SINGLE_FILE, framework="pt") as f:
        return {name: checkpoint / SINGLE_FILE for name in f.keys()}


def read_tensors(files: dict[str, Path], names: list[str], device) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for path, file_names in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as f:
            tensors.update({name: f.get_tensor(name) for name in file_names})
    return tensors


class LayerStore:
    """Where the decoder layers of a layerwise model live while they are not being worked on."""

    def __init__(self, checkpoint: Path, device: torch.device, spill_dir: Path, layers):
        self.files = checkpoint_files(checkpoint)
        self.device = device
        self.spill_dir = spill_dir
        # Spill files of an earlier, interrupted attempt hold half-done work: every attempt starts from the parent.
        shutil.rmtree(spill_dir, ignore_errors=True)
        spill_dir.mkdir(parents=True)
        # Layers are identified by their index in the parent: depth pruning reorders the ModuleList, not the objects.
        self.origin = {id(layer): index for index, layer in enumerate(layers)}
        self.peak_resident = 0
        self._resident: set[int] = set()

    def _prefix(self, layer) -> str:
        return f"model.layers.{self.origin[id(layer)]}."

    def _spill_path(self, layer) -> Path:
        return self.spill_dir / f"layer-{self.origin[id(layer)]:05d}.safetensors"

    def layer_tensors(self, layer, device="cpu") -> dict[str, torch.Tensor]:
        """The layer's current tensors, keyed by name inside the layer (e.g. ``self_attn.q_proj.weight``)."""
        spilled = self._spill_path(layer)
        if spilled.exists():
            with safe_open(spilled, framework="pt", device=str(device)) as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        prefix = self._prefix(layer)
        names = [name for name in self.files if name.startswith(prefix)]
        return {name[len(prefix):]: tensor for name, tensor in read_tensors(self.files, names, device).items()}

    def materialize(self, layer) -> None:
        layer.to_empty(device=self.device)
        layer.load_state_dict(self.layer_tensors(layer, self.device), strict=True)
        self._resident.add(id(layer))
        self.peak_resident = max(self.peak_resident, len(self._resident))

    def release(self, layer, keep_changes: bool = True) -> None:
        if keep_changes:
            state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in layer.state_dict().items()}
            atomic.write_bytes(self._spill_path(layer), save(state))  # a spill file is whole or absent
        layer.to("meta")
        self._resident.discard(id(layer))


def layer_store(model) -> LayerStore | None:
    return getattr(model, "layer_store", None)


@contextmanager
def resident(model, layer):
    """Make `layer` usable for the duration of the block; a no-op for a model held wholly in memory."""
    store = layer_store(model)
    if store is None:
        yield
        return
    store.materialize(layer)
    try:
        yield
    except BaseException:
        # The block failed, or the consumer of a layer generator left mid-layer (GeneratorExit): whatever was done to
        # this layer is incomplete, so it is dropped rather than taken for a finished layer.
        store.release(layer, keep_changes=False)
        raise
    store.release(layer)


def local_snapshot(hub_name: str) -> Path:
    """The local folder of a hub checkpoint (downloaded once into the HF cache); layers are read from its files."""
    return Path(snapshot_download(hub_name, allow_patterns=["*.json", "*.safetensors"]))


def open_layerwise(checkpoint: str | Path, device: str | torch.device, spill_dir: str | Path):
    """The parent at `checkpoint` (any supported family: its own model class) with its decoder layers left on disk
    (see the module docstring)."""
    device = torch.device(device)
    checkpoint = Path(checkpoint) if Path(checkpoint).is_dir() else local_snapshot(str(checkpoint))
    config = AutoConfig.from_pretrained(checkpoint)
    check_supported(config, str(checkpoint))
    with torch.device("meta"):
        model = build_model(config).float()
    files = checkpoint_files(checkpoint)
    outside_layers = [name for name, _ in model.named_parameters() if not name.startswith("model.layers.")]
    stored = read_tensors(files, [name for name in outside_layers if name in files], device)
    model.load_state_dict({name: t.float() for name, t in stored.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # The rotary inverse frequencies are a non-persistent buffer: computed, never stored (the family's own class).
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    model.layer_store = LayerStore(checkpoint, device, Path(spill_dir), model.model.layers)
    model.eval()
    return model


def save_layerwise(model, out_dir: str | Path, mask: dict[str, torch.Tensor] | None = None, tokenizer=None) -> Path:
    """Write a layerwise model as a sharded HF checkpoint, atomically, like `model.save_model` (tokenizer too)."""
    tokenizer = set_special_tokens(model, tokenizer)
    store = layer_store(model)
    outside = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()
               if not name.startswith("model.layers.")}
    if model.config.tie_word_embeddings:
        outside.pop("lm_head.weight", None)
    with atomic.staged_directory(Path(out_dir)) as staging:
        model.config.save_pretrained(staging)
        weight_map, total = {}, 0

        def write_shard(file: str, tensors: dict[str, torch.Tensor]) -> None:
            nonlocal total
            save_file(tensors, staging / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        write_shard("model-outside-layers.safetensors", outside)
        for index, layer in enumerate(model.model.layers):  # one layer in memory at a time
            tensors = store.layer_tensors(layer)
            write_shard(f"model-layer-{index:05d}.safetensors",
                        {f"model.layers.{index}.{name}": t.contiguous() for name, t in tensors.items()})
        (staging / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=1, sort_keys=True))
        write_beside_weights(staging, model, mask, tokenizer)
    return Path(out_dir)


# ------------------------------------------------------------------------------------------------ the sequential flow

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
    # transformers 5 returns a tensor from every supported family's decoder layer; older versions returned a tuple.
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


def sequential_layers(model, calibration: torch.Tensor,
                      batch_size: int) -> Iterator[tuple[int, nn.Module, LayerInputs]]:
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
