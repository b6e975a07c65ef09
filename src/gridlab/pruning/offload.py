"""Pruning a parent that does not fit in memory: its decoder layers stay on disk and come in one at a time.

`open_layerwise` builds the parent with every decoder layer on the meta device (no storage) and only the
embeddings, final norm and LM head materialized on the compute device. The sequential calibration flow
(`calibration.sequential_layers`) asks the model's `LayerStore` to materialize a layer just before it needs it and
to release it right after: the layer's (possibly pruned) tensors go to a spill folder and the layer returns to
meta. Peak memory is one layer plus the calibration activations, whatever the parent's depth. `save_layerwise`
then writes a standard sharded HF checkpoint (one safetensors file per layer and an index) that loads without
gridlab.

Only methods that visit the layers in order can run this way (`Method.layerwise`); the others need whole-model
forward or backward passes.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from gridlab.atomic import staged_directory
from gridlab.model import MASK_FILE

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
            partial = self._spill_path(layer).with_suffix(".partial")
            save_file(state, partial)
            partial.replace(self._spill_path(layer))  # a spill file is whole or absent
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
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hub_name, allow_patterns=["*.json", "*.safetensors"]))


def open_layerwise(checkpoint: str | Path, device: str | torch.device, spill_dir: str | Path):
    """The parent at `checkpoint` with its decoder layers left on disk (see the module docstring)."""
    device = torch.device(device)
    checkpoint = Path(checkpoint) if Path(checkpoint).is_dir() else local_snapshot(str(checkpoint))
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    files = checkpoint_files(checkpoint)
    outside_layers = [name for name, _ in model.named_parameters() if not name.startswith("model.layers.")]
    stored = read_tensors(files, [name for name in outside_layers if name in files], device)
    model.load_state_dict({name: t.float() for name, t in stored.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # The rotary inverse frequencies are a non-persistent buffer: computed, never stored.
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    model.layer_store = LayerStore(checkpoint, device, Path(spill_dir), model.model.layers)
    model.eval()
    return model


def save_layerwise(model, out_dir: str | Path, mask: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a layerwise model as a sharded HF checkpoint, atomically, like `model.save_model`."""
    store = layer_store(model)
    outside = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()
               if not name.startswith("model.layers.")}
    if model.config.tie_word_embeddings:
        outside.pop("lm_head.weight", None)
    with staged_directory(Path(out_dir)) as staging:
        model.config.save_pretrained(staging)
        weight_map, total = {}, 0

        def write_shard(file: str, tensors: dict[str, torch.Tensor]) -> None:
            nonlocal total
            save_file(tensors, staging / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        write_shard("model-outside-layers.safetensors", outside)
        for index, layer in enumerate(model.model.layers):  # one layer in memory at a time
            write_shard(f"model-layer-{index:05d}.safetensors",
                        {f"model.layers.{index}.{name}": t.contiguous() for name, t in store.layer_tensors(layer).items()})
        (staging / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=1, sort_keys=True))
        if mask:
            save_file({name: m.to(torch.bool).contiguous() for name, m in mask.items()}, staging / MASK_FILE)
    return Path(out_dir)
