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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gridlab.data import TokenShard
from gridlab.model import save_model

CHECKPOINT_DIR = "checkpoint"
MAIN_STATE = "main.pt"


def _branch_state(budget_tokens: int) -> str:
    return f"branch-{budget_tokens}.pt"


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

    def __post_init__(self):
        if self.schedule not in ("wsd", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: wsd, cosine")
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


def _atomic_save(obj, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(obj, temporary)
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
    """The state of one call to train(); the hot loop is `_steps`."""

    def __init__(self, model, data, config, budgets, out_dir, mask):
        self.model, self.data, self.config, self.out_dir = model, data, config, Path(out_dir)
        self.plans = plan_branches(config, budgets)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        self.order = _DataOrder(data.n_sequences, config.batch_size, config.seed)
        self.checkpoint_dir = self.out_dir / CHECKPOINT_DIR
        self.mask = mask
        self.masked_params, self.mask_values = self._mask_tensors(mask)
        self.optimizer = make_optimizer(model, config)
        self.identity = {
            "config": dataclasses.asdict(config),
            "budgets": sorted(set(budgets)),
            "n_sequences": data.n_sequences,
            "seq_len": data.seq_len,
        }

    def _mask_tensors(self, mask):
        if not mask:
            return [], []
        named = dict(self.model.named_parameters())
        unknown = sorted(set(mask) - set(named))
        if unknown:
            raise ValueError(f"mask names parameters the model does not have: {', '.join(unknown[:3])}")
        params, values = [], []
        for name, keep in mask.items():
            if keep.shape != named[name].shape:
                raise ValueError(f"mask for {name} has shape {tuple(keep.shape)}, parameter has {tuple(named[name].shape)}")
            params.append(named[name])
            values.append(keep.to(device=self.device, dtype=named[name].dtype))
        return params, values

    def apply_mask(self) -> None:
        if self.masked_params:
            with torch.no_grad():
                torch._foreach_mul_(self.masked_params, self.mask_values)

    # ------------------------------------------------------------------------------------------------ state

    def fresh_state(self) -> dict:
        return {"step": 0, "curve": [], "pending_losses": [], "branches_done": {}}

    def save_state(self, name: str, state: dict) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            **state,
            "identity": self.identity,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(),
        }
        _atomic_save(payload, self.checkpoint_dir / name)

    def load_state(self, name: str) -> dict | None:
        path = self.checkpoint_dir / name
        if not path.is_file():
            return None
        payload = torch.load(path, map_location="cpu", weights_only=False)  # RNG states must stay on CPU
        if payload["identity"] != self.identity:
            raise ValueError(
                f"{self.checkpoint_dir} holds a checkpoint of a different training run (other config, budgets or "
                f"data); use a fresh out_dir or delete that folder"
            )
        self.model.load_state_dict(payload.pop("model"))
        self.optimizer.load_state_dict(payload.pop("optimizer"))
        _set_rng_state(payload.pop("rng"))
        payload.pop("identity")
        return payload

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
            batch = self.data[self.order.batch(step)].to(self.device, non_blocking=True)
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
        values = torch.stack(window).float().cpu().tolist()
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
            path = save_model(self.model, self.out_dir / "branches" / str(plan.budget_tokens), self.mask)
            main = self.load_state(MAIN_STATE)
            main["branches_done"][str(plan.budget_tokens)] = {
                "trained_tokens": plan.steps * self.config.tokens_per_step,
                "path": str(path),
                "fork_tokens": plan.fork_step * self.config.tokens_per_step,
                "tail": branch["curve"],
            }
            self.save_state(MAIN_STATE, main)
            (self.checkpoint_dir / branch_state).unlink(missing_ok=True)
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
