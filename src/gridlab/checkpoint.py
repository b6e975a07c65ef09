"""Named training states on disk: the checkpoint protocol of `gridlab.train`.

A state ``<name>`` (``main``, ``branch-<B>`` …) is two things in the checkpoint folder:
- ``<name>-<step>/``: a `torch.distributed.checkpoint` folder holding the model and, once it has stepped, the
  optimizer. Each rank writes its own shards (so any world size can read it back) and its RNG state
  (``rng-<rank>.pt``); DCP fsyncs every file.
- ``<name>.json``: the pointer, written last by rank 0 through `gridlab.atomic`: which folder is current, the
  loop's position (a dict the caller owns: step, curve …), whether an optimizer state is in the folder, the world
  size that wrote it, and the run's identity.

A folder that no pointer names is an unfinished write: it is ignored, and removed when that name is saved next. A
pointer of another identity is refused (`load` raises), so a folder is never resumed by a run that would compute
something else.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from gridlab import atomic, distributed

# fp32 weights (4 bytes) and AdamW's two fp32 moments, exp_avg and exp_avg_sq (4 + 4 bytes), per parameter.
BYTES_PER_PARAMETER = 12


def checkpoint_bytes(n_params: int) -> int:
    """Disk one saved training state takes for a model of ``n_params`` parameters: 12 bytes per parameter.

    The state holds the fp32 master weights (4 bytes) and AdamW's exp_avg and exp_avg_sq, fp32 too (4 + 4 bytes);
    gradients are not saved, and bf16 compute copies (FSDP mixed precision) exist only in memory. What else is in
    the folder is a few kB per tensor (serialisation, AdamW's step counter, DCP's metadata) and a few kB of RNG
    state per rank: about 1 MB for an 8B Llama's ~290 tensors, against its 96 GB. (The "about 16 bytes per
    parameter" often quoted counts the gradients too.) A state saved before the first optimizer step holds the
    weights alone: 4 bytes per parameter.
    """
    return BYTES_PER_PARAMETER * n_params


def pointer_file(folder: Path, name: str) -> Path:
    """Where the pointer of state ``name`` lives in checkpoint folder ``folder``."""
    return Path(folder) / f"{name}.json"


def read_pointer(folder: Path, name: str) -> dict | None:
    """The pointer of state ``name`` in checkpoint folder ``folder`` (None when there is none); reads JSON only."""
    path = pointer_file(folder, name)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def state_entries(folder: Path, name: str) -> set[str]:
    """The names of the entries of checkpoint folder ``folder`` that make state ``name``: its pointer and the
    folder the pointer names (nothing when it has no pointer)."""
    pointer = read_pointer(folder, name)
    if not isinstance(pointer, dict) or not pointer.get("folder"):
        return set()
    return {pointer_file(folder, name).name, pointer["folder"]}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Save, load and drop named states of one run in ``folder``. Every rank of a job calls every method."""

    def __init__(self, folder: Path, identity: dict, topology: distributed.Topology):
        self.folder = Path(folder)
        self.identity = identity
        self.topology = topology

    def pointer(self, name: str) -> dict | None:
        """State ``name``'s pointer, after checking that it belongs to this run."""
        record = read_pointer(self.folder, name)
        if record is not None and record["identity"] != self.identity:
            raise ValueError(
                f"{self.folder} holds a checkpoint of a different training run (other schedule, seed or data); use "
                f"a fresh folder or delete that one"
            )
        return record

    def _dcp(self, operation, tensors: dict, folder: Path) -> None:
        # One process needs no process group, and DCP need not warn about it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            operation(tensors, checkpoint_id=folder, no_dist=not self.topology.distributed)

    def save(self, name: str, position: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make ``position`` (with the current model and optimizer) the state ``name``; the old one is removed."""
        topology = self.topology
        folder_name = f"{name}-{position['step']:09d}"
        folder = self.folder / folder_name
        previous = self.pointer(name)
        previous_folder = previous["folder"] if previous else None
        if topology.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            if folder.exists() and folder_name != previous_folder:
                shutil.rmtree(folder)  # an unfinished write
        distributed.barrier(topology)
        has_optimizer_state = bool(optimizer.state)  # none before the first step
        if folder_name != previous_folder:  # same name and step: the same state is already on disk
            if has_optimizer_state:
                tensors = distributed.training_state(model, optimizer)
            else:
                tensors = {"model": distributed.model_state(model)}
            self._dcp(dcp.save, tensors, folder)
            buffer = io.BytesIO()
            torch.save(_rng_state(), buffer)
            atomic.write_bytes(folder / f"rng-{topology.rank}.pt", buffer.getvalue())
        distributed.barrier(topology)
        if topology.is_main:
            atomic.fsync_directory(folder)
            record = {**position, "identity": self.identity, "folder": folder_name,
                      "optimizer": has_optimizer_state, "world_size": topology.world_size}
            atomic.write_json(pointer_file(self.folder, name), record)
            if previous_folder and previous_folder != folder_name:
                shutil.rmtree(self.folder / previous_folder, ignore_errors=True)
        distributed.barrier(topology)

    def load(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, bool] | None:
        """Load state ``name`` into ``model`` (and ``optimizer``): ``(position, optimizer_restored)``, or None when
        there is no such state. When the state holds no optimizer (saved before the first step) the caller needs a
        fresh optimizer."""
        record = self.pointer(name)
        if record is None:
            return None
        folder = self.folder / record["folder"]
        if record["optimizer"]:
            tensors = distributed.training_state(model, optimizer)
            self._dcp(dcp.load, tensors, folder)
            distributed.load_training_state(model, optimizer, tensors)
        else:
            tensors = {"model": distributed.model_state(model)}
            self._dcp(dcp.load, tensors, folder)
            distributed.load_model_state(model, tensors["model"])
        # RNG streams are per process; a job resumed at another world size restarts the extra ranks' streams.
        rng_file = folder / f"rng-{self.topology.rank}.pt"
        if record["world_size"] == self.topology.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        position = {key: value for key, value in record.items()
                    if key not in ("identity", "folder", "optimizer", "world_size")}
        return position, bool(record["optimizer"])

    def drop(self, name: str) -> None:
        """Remove state ``name`` (pointer first, so a crash midway leaves an unnamed folder, never a dangling name)."""
        record = self.pointer(name)
        if self.topology.is_main and record is not None:
            pointer_file(self.folder, name).unlink()
            atomic.fsync_directory(self.folder)
            shutil.rmtree(self.folder / record["folder"], ignore_errors=True)
        distributed.barrier(self.topology)

    def names(self) -> list[str]:
        """The states saved here."""
        if not self.folder.is_dir():
            return []
        return sorted(path.stem for path in self.folder.glob("*.json"))

    def keep_only(self, names: set[str]) -> None:
        """Drop every state but ``names``, and every folder that no kept pointer names."""
        dropped = [name for name in self.names() if name not in names]
        distributed.barrier(self.topology)  # every rank has listed the states before any is removed
        for name in dropped:
            self.drop(name)
        if self.topology.is_main and self.folder.is_dir():
            kept = {entry for name in self.names() for entry in state_entries(self.folder, name)}
            for path in self.folder.iterdir():
                if path.is_dir() and path.name not in kept:
                    shutil.rmtree(path, ignore_errors=True)
            if not any(self.folder.iterdir()):
                self.folder.rmdir()
        distributed.barrier(self.topology)

    def remove(self) -> None:
        """Delete the whole checkpoint folder."""
        if self.topology.is_main:
            shutil.rmtree(self.folder, ignore_errors=True)
        distributed.barrier(self.topology)
