"""The training loop: AdamW, WSD/cosine schedules, budget branches, sparse masks, exact checkpoint/resume.

One trajectory runs from step 0 with warmup then constant lr ("main"). Every budget is a *branch* that leaves the
main trajectory at its fork step and runs its own lr tail to the budget:
- WSD: the fork is at B·(1 − decay_fraction); the branch decays to min lr (1-sqrt or linear) over the rest.
- cosine: the fork is step 0 (an independent run per budget); the branch is warmup + cosine to min lr.
Branches run in fork order. At a fork the main state is checkpointed, the branch trains in place, its final model is
saved to out_dir/branches/<B>/, and the main state is reloaded from the checkpoint. The data stream is a function
of the step alone (a seeded permutation per epoch), so a branch sees exactly the tokens an uninterrupted run to B
would see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp

from gridlab import distributed
from gridlab.data import TokenShard
from gridlab.model import save_model

CHECKPOINT_DIR = "checkpoint"
MAIN_STATE = "main"
# Fields that change how a run executes but not what it computes; a checkpoint resumes across them.
_EXECUTION_FIELDS = ("device", "strategy", "activation_checkpointing")


def _branch_state(budget_tokens: int) -> str:
    return f"branch-{budget_tokens}"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, tokens: int, loss: float):
        super().__init__(f"training diverged: loss {loss} at step {step} ({tokens} tokens)")
        self.step, self.tokens, self.loss = step, tokens, loss


@dataclass
class TrainConfig:
    schedule: Literal["wsd", "cosine"] = "wsd"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # min lr = lr · min_lr_ratio
    warmup_tokens: int = 0
    decay_fraction: float = 0.2  # WSD: the decay takes this fraction of each branch's budget
    decay_shape: Literal["1-sqrt", "linear"] = "1-sqrt"
    batch_size: int = 16
    seq_len: int = 256
    grad_clip: float = 1.0  # 0 disables clipping
    weight_decay: float = 0.1  # on matrices only (not norms)
    beta1: float = 0.9
    beta2: float = 0.95
    log_every_steps: int = 10
    checkpoint_every_tokens: int = 1_000_000
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    strategy: Literal["fsdp", "ddp"] = "fsdp"  # how a multi-process job splits the model (one process: unused)
    activation_checkpointing: bool = False

    def __post_init__(self):
        if self.schedule not in ("wsd", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: wsd, cosine")
        if self.strategy not in ("fsdp", "ddp"):
            raise ValueError(f"unknown strategy {self.strategy!r}; valid: fsdp, ddp")
        if self.decay_shape not in ("1-sqrt", "linear"):
            raise ValueError(f"unknown decay_shape {self.decay_shape!r}; valid: 1-sqrt, linear")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must lie in (0, 1], got {self.decay_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        for name in ("batch_size", "seq_len", "log_every_steps", "checkpoint_every_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class Branch:
    budget_tokens: int
    trained_tokens: int
    path: Path
    curve: list[dict] = field(default_factory=list)  # {tokens, loss, lr}: main points up to the fork + the tail


@dataclass
class TrainResult:
    branches: list[Branch]
    curve: list[dict]  # the main trajectory (warmup + constant lr) up to the last fork


@dataclass(frozen=True)
class _BranchPlan:
    budget_tokens: int
    steps: int  # total steps of this branch, from step 0
    fork_step: int


def plan_branches(config: TrainConfig, budgets: list[int]) -> list[_BranchPlan]:
    if not budgets:
        raise ValueError("budgets is empty; give at least one token budget")
    plans = []
    for budget in sorted(set(budgets)):
        if budget < config.tokens_per_step:
            raise ValueError(
                f"budget {budget} tokens is smaller than one batch ({config.batch_size} × {config.seq_len} = "
                f"{config.tokens_per_step} tokens); give budgets of at least {config.tokens_per_step}"
            )
        steps = budget // config.tokens_per_step
        if config.schedule == "wsd":
            fork = steps - max(1, round(steps * config.decay_fraction))
        else:
            fork = 0
        plans.append(_BranchPlan(budget, steps, fork))
    return sorted(plans, key=lambda plan: (plan.fork_step, plan.budget_tokens))


def learning_rate(config: TrainConfig, step: int, plan: _BranchPlan | None) -> float:
    """lr of `step` (0-based) on the main trajectory (plan None) or on a branch."""
    warmup_steps = config.warmup_tokens // config.tokens_per_step
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if plan is None or step < plan.fork_step:
        return config.lr * warmup
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        if step < warmup_steps:
            return config.lr * warmup
        progress = (step - warmup_steps + 1) / max(1, plan.steps - warmup_steps)
        return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    progress = (step - plan.fork_step + 1) / (plan.steps - plan.fork_step)
    remaining = 1 - (math.sqrt(progress) if config.decay_shape == "1-sqrt" else progress)
    return config.lr * warmup * (floor + (1 - floor) * remaining)


class _DataOrder:
    """Sequence indices of any step: epoch e is a permutation seeded by (seed, e), so the order needs no state."""

    def __init__(self, n_sequences: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n_sequences, batch_size, seed
        self._epochs: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            if len(self._epochs) > 1:
                self._epochs.pop(min(self._epochs))
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epochs[epoch] = torch.randperm(self.n, generator=generator)
        return self._epochs[epoch]

    def batch(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        first_epoch, offset = divmod(start, self.n)
        if offset + self.batch_size <= self.n:
            return self._permutation(first_epoch)[offset : offset + self.batch_size]
        positions = torch.arange(start, start + self.batch_size)
        return torch.stack([self._permutation(int(p) // self.n)[int(p) % self.n] for p in positions])


def _quiet_dcp(operation, tensors: dict, folder: Path, topology: distributed.Topology) -> None:
    """torch.distributed.checkpoint save/load; one process needs no process group, and DCP need not warn about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        operation(tensors, checkpoint_id=folder, no_dist=not topology.distributed)


def _atomic_write_json(obj, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(obj))
    os.replace(temporary, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only. Fused kernel (CPU and CUDA) unless parameters are mixed-device."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, fused=True)


class _Run:
    """The state of one call to train(); the hot loop is `_steps`.

    Every process of a job runs it: the global batch of each step is split into equal contiguous slices, one per
    rank, and gradients are averaged across ranks (FSDP2 or DDP), so N processes compute what one process does.
    """

    def __init__(self, model, data, config, budgets, out_dir, mask):
        self.data, self.config, self.out_dir = data, config, Path(out_dir)
        self.plans = plan_branches(config, budgets)
        self.topology = distributed.setup(config.device)
        if config.batch_size % self.topology.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} does not split evenly over {self.topology.world_size} processes; "
                f"give a multiple of {self.topology.world_size}"
            )
        self.device = self.topology.device
        self.model_config = model.config
        self.model = distributed.wrap(model, self.topology, config.strategy, bf16=self.device.type == "cuda",
                                      activation_checkpointing=config.activation_checkpointing)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        self.order = _DataOrder(data.n_sequences, config.batch_size, config.seed)
        self.checkpoint_dir = self.out_dir / CHECKPOINT_DIR
        self.mask = mask
        self.masked_params, self.mask_values = self._mask_tensors(mask)
        self.optimizer = make_optimizer(self.model, config)
        execution = dataclasses.asdict(config)
        for name in _EXECUTION_FIELDS:
            execution.pop(name)
        self.identity = {
            "config": execution,
            "budgets": sorted(set(budgets)),
            "n_sequences": data.n_sequences,
            "seq_len": data.seq_len,
        }

    def _mask_tensors(self, mask):
        if not mask:
            return [], []
        named = dict(distributed.unwrap(self.model).named_parameters())
        unknown = sorted(set(mask) - set(named))
        if unknown:
            raise ValueError(f"mask names parameters the model does not have: {', '.join(unknown[:3])}")
        params, values = [], []
        for name, keep in mask.items():
            if keep.shape != named[name].shape:
                raise ValueError(f"mask for {name} has shape {tuple(keep.shape)}, parameter has {tuple(named[name].shape)}")
            params.append(named[name])
            values.append(distributed.shard_like(keep, named[name]).to(dtype=named[name].dtype))
        return params, values

    def apply_mask(self) -> None:
        if self.masked_params:
            with torch.no_grad():
                torch._foreach_mul_([distributed.local_tensor(p) for p in self.masked_params], self.mask_values)

    def local_batch(self, step: int) -> torch.Tensor:
        indices = self.order.batch(step).view(self.topology.world_size, -1)[self.topology.rank]
        return self.data[indices].to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------------------------ state
    # A checkpoint is a folder written by torch.distributed.checkpoint (each rank writes its own shards, so any
    # world size can read it back) plus <name>.json, written last and atomically by rank 0, naming that folder and
    # holding the loop's position. A folder that no .json names is an unfinished write and is ignored.

    def fresh_state(self) -> dict:
        return {"step": 0, "curve": [], "pending_losses": [], "branches_done": {}}

    def save_state(self, name: str, state: dict) -> None:
        folder_name = f"{name}-{state['step']:09d}"
        folder = self.checkpoint_dir / folder_name
        pointer = self.checkpoint_dir / f"{name}.json"
        previous = json.loads(pointer.read_text())["folder"] if pointer.is_file() else None
        if self.topology.is_main:
            if folder.exists() and folder_name != previous:
                shutil.rmtree(folder)
        distributed.barrier(self.topology)
        has_optimizer_state = bool(self.optimizer.state)  # none before the first step
        if has_optimizer_state:
            tensors = distributed.training_state(self.model, self.optimizer)
        else:
            tensors = {"model": distributed.model_state(self.model)}
        if folder_name != previous:
            _quiet_dcp(dcp.save, tensors, folder, self.topology)
            torch.save(_rng_state(), folder / f"rng-{self.topology.rank}.pt")
        distributed.barrier(self.topology)
        if self.topology.is_main:
            record = {**state, "identity": self.identity, "folder": folder_name,
                      "optimizer": has_optimizer_state, "world_size": self.topology.world_size}
            _atomic_write_json(record, pointer)
            if previous and previous != folder_name:
                shutil.rmtree(self.checkpoint_dir / previous, ignore_errors=True)
        distributed.barrier(self.topology)

    def load_state(self, name: str) -> dict | None:
        pointer = self.checkpoint_dir / f"{name}.json"
        if not pointer.is_file():
            return None
        record = json.loads(pointer.read_text())
        if record.pop("identity") != self.identity:
            raise ValueError(
                f"{self.checkpoint_dir} holds a checkpoint of a different training run (other config, budgets or "
                f"data); use a fresh out_dir or delete that folder"
            )
        folder = self.checkpoint_dir / record.pop("folder")
        if record.pop("optimizer"):
            tensors = distributed.training_state(self.model, self.optimizer)
            _quiet_dcp(dcp.load, tensors, folder, self.topology)
            distributed.load_training_state(self.model, self.optimizer, tensors)
        else:
            tensors = {"model": distributed.model_state(self.model)}
            _quiet_dcp(dcp.load, tensors, folder, self.topology)
            distributed.load_model_state(self.model, tensors["model"])
            self.optimizer = make_optimizer(self.model, self.config)
        # RNG streams are per process; a job resumed at another world size restarts the extra ranks' streams.
        rng_file = folder / f"rng-{self.topology.rank}.pt"
        if record.pop("world_size") == self.topology.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        return record

    def drop_state(self, name: str) -> None:
        pointer = self.checkpoint_dir / f"{name}.json"
        if self.topology.is_main and pointer.is_file():
            folder = self.checkpoint_dir / json.loads(pointer.read_text())["folder"]
            pointer.unlink()
            shutil.rmtree(folder, ignore_errors=True)
        distributed.barrier(self.topology)

    def save_branch_model(self, budget_tokens: int) -> Path:
        """The branch's final weights as a plain HF checkpoint, gathered from the shards and written by rank 0."""
        path = self.out_dir / "branches" / str(budget_tokens)
        if not self.topology.distributed:
            return save_model(self.model, path, self.mask)
        state = distributed.full_model_state(self.model)
        if self.topology.is_main:
            save_model(distributed.plain_model(self.model_config, state), path, self.mask)
        distributed.barrier(self.topology)
        return path

    # ------------------------------------------------------------------------------------------------ loop

    def _steps(self, state: dict, end_step: int, plan: _BranchPlan | None, checkpoint_name: str) -> None:
        """Train from state["step"] to end_step on the main trajectory (plan None) or a branch, in place."""
        config, model, optimizer = self.config, self.model, self.optimizer
        tokens_per_step = config.tokens_per_step
        params = [p for p in model.parameters() if p.requires_grad]
        pending = state["pending_losses"]  # floats restored from a checkpoint
        window: list[torch.Tensor] = []  # this segment's detached losses, read only when logging
        model.train()
        step = state["step"]
        while step < end_step:
            lr = learning_rate(config, step, plan)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = self.local_batch(step)
            with self.autocast:
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.apply_mask()
            window.append(loss.detach())
            step += 1
            logging = step % config.log_every_steps == 0 or step == end_step
            checkpointing = (step * tokens_per_step) // config.checkpoint_every_tokens > (
                (step - 1) * tokens_per_step
            ) // config.checkpoint_every_tokens
            if logging or checkpointing:
                pending.extend(self._check_finite(window, step))
                window = []
                state["step"] = step
                if logging and step % config.log_every_steps == 0 or plan is not None and step == plan.steps:
                    state["curve"].append(
                        {"tokens": step * tokens_per_step, "loss": sum(pending) / len(pending), "lr": lr}
                    )
                    pending.clear()
                if checkpointing and step < end_step:
                    self.save_state(checkpoint_name, state)
        state["step"] = step

    def _check_finite(self, window: list[torch.Tensor], step: int) -> list[float]:
        values = distributed.all_reduce_mean(torch.stack(window).float(), self.topology).cpu().tolist()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                bad_step = step - len(values) + offset
                raise TrainingDiverged(bad_step, (bad_step + 1) * self.config.tokens_per_step, value)
        return values

    def run(self) -> TrainResult:
        self.apply_mask()
        main = self.load_state(MAIN_STATE)
        if main is None:
            main = self.fresh_state()
            self.save_state(MAIN_STATE, main)
        for plan in self.plans:
            if str(plan.budget_tokens) in main["branches_done"]:
                continue
            if main["step"] < plan.fork_step:
                self._steps(main, plan.fork_step, None, MAIN_STATE)
                self.save_state(MAIN_STATE, main)
            # The model and optimizer now hold the main state at the fork, unless a killed branch resumes.
            branch_state = _branch_state(plan.budget_tokens)
            branch = self.load_state(branch_state) or {
                "step": main["step"],
                "curve": [],
                "pending_losses": list(main["pending_losses"]),
            }
            self._steps(branch, plan.steps, plan, branch_state)
            path = self.save_branch_model(plan.budget_tokens)
            main = self.load_state(MAIN_STATE)
            main["branches_done"][str(plan.budget_tokens)] = {
                "trained_tokens": plan.steps * self.config.tokens_per_step,
                "path": str(path),
                "fork_tokens": plan.fork_step * self.config.tokens_per_step,
                "tail": branch["curve"],
            }
            self.save_state(MAIN_STATE, main)
            self.drop_state(branch_state)
        return self._result(main)

    def _result(self, main: dict) -> TrainResult:
        branches = []
        for plan in sorted(self.plans, key=lambda p: p.budget_tokens):
            done = main["branches_done"][str(plan.budget_tokens)]
            head = [point for point in main["curve"] if point["tokens"] <= done["fork_tokens"]]
            branches.append(
                Branch(plan.budget_tokens, done["trained_tokens"], Path(done["path"]), head + done["tail"])
            )
        return TrainResult(branches=branches, curve=list(main["curve"]))


def train(
    model,
    data: TokenShard,
    config: TrainConfig,
    budgets: list[int],
    out_dir: Path,
    mask: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model` on `data` to every budget (tokens); resumable: call again with the same arguments.

    The model object is trained in place and ends holding the weights of the last branch run; each branch's final
    model is a plain HF checkpoint at out_dir/branches/<budget>/ (with sparse_mask.safetensors when masked).
    """
    if data.seq_len != config.seq_len:
        raise ValueError(f"config.seq_len is {config.seq_len} but the token shard holds sequences of {data.seq_len}")
    return _Run(model, data, config, budgets, out_dir, mask).run()
