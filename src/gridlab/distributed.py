"""One training process or many: process-group set-up, FSDP2/DDP wrapping, masks and state under sharding.

The same code path runs a single local process (no process group, world size 1), a `torchrun` launch, and a
multi-task SLURM job started by submitit (rank, world size and master address come from submitit's
`JobEnvironment`). Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from submitit import JobEnvironment
from submitit.helpers import TorchDistributedEnvironment
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from gridlab.families import build_model

Strategy = Literal["fsdp", "ddp"]


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _submitit_tasks() -> int:
    """Processes in the submitit job this process belongs to (SLURM or submitit's LocalExecutor); 1 outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 1
    return JobEnvironment().num_tasks


def setup(device: str | None = None) -> Topology:
    """Join the job's process group if there is one; otherwise describe the single local process."""
    if dist.is_initialized():
        return _topology(device)
    if _submitit_tasks() > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Topology(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return _topology(device)


def _topology(device: str | None) -> Topology:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return Topology(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
    )


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, topology: Topology, strategy: Strategy, bf16: bool,
         activation_checkpointing: bool = False) -> torch.nn.Module:
    """Shard (FSDP2 `fully_shard` per decoder layer, then the root) or replicate (DDP) the model."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(topology.device)
    if not topology.distributed:
        return model
    if strategy == "ddp":
        device_ids = [topology.local_rank] if topology.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else (
        MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shard_like(mask: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The part of a full-size mask that this rank's shard of `param` covers (identity when not sharded)."""
    if isinstance(param.data, DTensor):
        return distribute_tensor(mask.to(param.device), param.device_mesh, param.placements).to_local()
    return mask.to(param.device)


def local_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    return param.data.to_local() if isinstance(param.data, DTensor) else param.data


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor (a gradient of a sharded parameter is a DTensor too), else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's (possibly sharded) state, keyed by parameter name whatever the wrapping."""
    return get_model_state_dict(unwrap(model))


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(unwrap(model), state)


def plain_model(config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unwrapped CPU model of the config's family holding a consolidated state (what save_pretrained needs)."""
    with torch.device("meta"):  # no memory, no random init: every weight comes from `state`
        model = build_model(config)
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers are not in a state dict
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if missing:
        raise RuntimeError(f"consolidated state lacks {', '.join(missing[:3])}")
    return model


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated (unsharded) model state on CPU; a collective, call it on every rank."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state in the form torch.distributed.checkpoint saves shard by shard."""
    model_state, optimizer_state = get_state_dict(unwrap(model), optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_state_dict(unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def all_reduce_mean(value: torch.Tensor, topology: Topology) -> torch.Tensor:
    if topology.distributed:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if topology.device.type == "cuda" else dist.ReduceOp.SUM)
        if topology.device.type != "cuda":
            value /= topology.world_size
    return value


def barrier(topology: Topology) -> None:
    if topology.distributed:
        dist.barrier()
