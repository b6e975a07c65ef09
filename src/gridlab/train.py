"""The training loop: AdamW, WSD/cosine schedules, budget branches of one trajectory, sparse masks, exact resume.

One trajectory (the trunk, state "main") runs from step 0 with warmup then constant lr. Every budget is a *branch*
that leaves the trunk at its fork step and runs its own lr tail to the budget:
- WSD: the fork is at B·(1 − decay_fraction); the branch decays to min lr (1-sqrt or linear) over the rest.
- cosine: the fork is step 0 (an independent run per budget); the branch is warmup + cosine to min lr.
The data stream is a function of the step alone (a seeded permutation per epoch) and the trunk's lr does not depend
on the budgets, so a branch sees exactly what an uninterrupted run to its budget would see, whichever other budgets
share the trajectory and in whichever call they were added.

``out_dir`` is a trajectory folder, shared by calls whose budget lists differ:

    trajectory.json       the record, written last through gridlab.atomic: identity, every finished branch (status,
                          trained tokens, model path, curve, error), the trunk's curve and where it diverged, if it did
    branches/<B>/         each budget's final model, a plain HF checkpoint (+ sparse_mask.safetensors)
    checkpoint/           resumable states (gridlab.checkpoint): main, branch-<B>, start

A call trains what its budgets need and the folder does not hold yet, in this order:
1. Branches that start from the starting model: every cosine budget, and a new WSD budget whose fork lies before
   the kept trunk position (the trunk is past it, so that branch replays the trunk from step 0 as its own state:
   it costs its fork tokens again, and gives the numbers a fresh run would). With several of them the starting
   weights are kept as the state "start" while they run.
2. The trunk, in fork order: train to the next fork, save "main" there, run the branch (its state
   "branch-<B>"), save its model, reload "main". Budgets above the largest one already done continue the trunk from
   the kept main state at the old last fork.
Branch states are dropped once their model is saved. When the call ends, ``schedule.keep_checkpoints`` decides
what stays: "extendable" keeps only what a later call with more budgets needs (WSD: the main state at the last fork;
cosine: nothing), "all" keeps everything, "none" removes the checkpoint folder (a later WSD budget then replays the
trunk from step 0).

A NaN/inf loss, or non-finite weights found before a save, is a divergence. In a branch it marks that branch
diverged (its error names the budget, step and loss), the main state is reloaded and the other branches go on. On
the trunk it marks every branch forking after the diverged step diverged (finished branches stay), and the record
keeps the step, so no later call extends the trajectory past it. No checkpoint and no branch model is ever written
with non-finite weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gridlab import atomic, distributed
from gridlab.checkpoint import Checkpointer, read_pointer
from gridlab.config import Schedule
from gridlab.data import TokenShard
from gridlab.layout import TrainingPaths
from gridlab.model import save_model

MAIN_STATE = "main"
START_STATE = "start"


def _branch_state(budget_tokens: int) -> str:
    return f"branch-{budget_tokens}"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (or the weights did, found before a save)."""

    def __init__(self, step: int, tokens: int, loss: float, cause: Literal["loss", "weights"] = "loss"):
        if cause == "loss":
            message = f"training diverged: loss {loss} at step {step} ({tokens} tokens)"
        else:
            message = f"training diverged: non-finite weights after step {step} ({tokens} tokens; last loss {loss})"
        super().__init__(message)
        self.step, self.tokens, self.loss, self.cause = step, tokens, loss, cause


@dataclass
class Branch:
    budget_tokens: int
    trained_tokens: int  # diverged: the tokens reached when it diverged
    path: Path | None  # the final model; None when diverged
    curve: list[dict] = field(default_factory=list)  # {tokens, loss, lr}: main points up to the fork + the tail
    status: Literal["done", "diverged"] = "done"
    error: str | None = None  # diverged: "branch <B>: training diverged: loss nan at step S (T tokens)"


@dataclass
class TrainResult:
    branches: list[Branch]  # the budgets of this call, sorted
    curve: list[dict]  # the trunk (warmup + constant lr) as far as it has been trained

    @property
    def diverged(self) -> list[Branch]:
        return [branch for branch in self.branches if branch.status == "diverged"]


@dataclass(frozen=True)
class _BranchPlan:
    budget_tokens: int
    steps: int  # total steps of this branch, from step 0
    fork_step: int


def plan_branches(schedule: Schedule, budgets: list[int], tokens_per_step: int) -> list[_BranchPlan]:
    """Each budget's steps and fork step, in fork order."""
    if not budgets:
        raise ValueError("budgets is empty; give at least one token budget")
    plans = []
    for budget in sorted(set(budgets)):
        if budget < tokens_per_step:
            raise ValueError(
                f"budget {budget} tokens is smaller than one batch ({schedule.batch_size} sequences, "
                f"{tokens_per_step} tokens); give budgets of at least {tokens_per_step}"
            )
        steps = budget // tokens_per_step
        if schedule.kind == "wsd":
            fork = steps - max(1, round(steps * schedule.decay_fraction))
        else:
            fork = 0
        plans.append(_BranchPlan(budget, steps, fork))
    return sorted(plans, key=lambda plan: (plan.fork_step, plan.budget_tokens))


def learning_rate(schedule: Schedule, tokens_per_step: int, step: int, plan: _BranchPlan | None) -> float:
    """lr of `step` (0-based) on the trunk (plan None) or on a branch."""
    warmup_steps = schedule.warmup_tokens // tokens_per_step
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if plan is None or step < plan.fork_step:
        return schedule.lr * warmup
    floor = schedule.min_lr_ratio
    if schedule.kind == "cosine":
        if step < warmup_steps:
            return schedule.lr * warmup
        progress = (step - warmup_steps + 1) / max(1, plan.steps - warmup_steps)
        return schedule.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    progress = (step - plan.fork_step + 1) / (plan.steps - plan.fork_step)
    remaining = 1 - (math.sqrt(progress) if schedule.decay_shape == "1-sqrt" else progress)
    return schedule.lr * warmup * (floor + (1 - floor) * remaining)


def trajectory_identity(schedule: Schedule, seed: int, n_sequences: int, seq_len: int) -> dict:
    """What a trajectory's numbers depend on besides its starting model: never the budgets or execution fields."""
    return {"schedule": schedule.identity(), "seed": seed, "n_sequences": n_sequences, "seq_len": seq_len}


def read_record(out_dir: Path) -> dict | None:
    """A training folder's record (trajectory.json), None when there is none yet."""
    path = TrainingPaths(out_dir).record
    return json.loads(path.read_text()) if path.is_file() else None


def remaining_tokens(schedule: Schedule, budgets: list[int], seq_len: int, out_dir: Path | None) -> int:
    """Tokens a call of `train` with these arguments would train, given what ``out_dir`` holds already.

    Pure: reads only the trajectory record and the checkpoint pointers (JSON), no weights. 0 when every budget is
    finished (or diverged, or lies past a diverged trunk); the whole trajectory for an empty folder or ``out_dir``
    None (what training from nothing costs: WSD branches share their trunk, cosine budgets are runs). Counts what
    `train` would do, step for step: a killed state resumes where it was saved, a WSD budget forking before the
    kept trunk position replays its trunk from step 0.
    """
    tokens_per_step = schedule.batch_size * seq_len
    plans = plan_branches(schedule, budgets, tokens_per_step)
    record = read_record(out_dir) if out_dir is not None else None
    if record is not None and (record["identity"]["schedule"] != schedule.identity()
                               or record["identity"]["seq_len"] != seq_len):
        raise ValueError(f"{out_dir} holds a trajectory of a different schedule or sequence length")
    branches = record["branches"] if record else {}
    diverged = record.get("trunk_diverged") if record else None
    checkpoints = TrainingPaths(out_dir).checkpoints if out_dir is not None else None
    main = read_pointer(checkpoints, MAIN_STATE) if checkpoints else None
    main_step = main["step"] if main else 0
    trunk_end, steps = main_step, 0
    for plan in plans:
        if str(plan.budget_tokens) in branches or (diverged and plan.fork_step > diverged["step"]):
            continue
        saved = read_pointer(checkpoints, _branch_state(plan.budget_tokens)) if checkpoints else None
        if schedule.kind == "cosine" or plan.fork_step < main_step:
            start = saved["step"] if saved else 0
        else:
            trunk_end = max(trunk_end, plan.fork_step)
            start = saved["step"] if saved else plan.fork_step
        steps += plan.steps - start
    return (steps + trunk_end - main_step) * tokens_per_step


def make_optimizer(model: torch.nn.Module, schedule: Schedule) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only. Fused kernel (CPU and CUDA) unless parameters are mixed-device."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": schedule.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=schedule.lr, betas=(schedule.beta1, schedule.beta2), eps=1e-8, fused=True)


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


def _fresh_position(step: int = 0, pending: list[float] | None = None) -> dict:
    return {"step": step, "curve": [], "pending_losses": list(pending or [])}


class _Run:
    """The state of one call to train(); the hot loop is `_steps`.

    Every process of a job runs it: the global batch of each step is split into equal contiguous slices, one per
    rank, and gradients are averaged across ranks (FSDP2 or DDP), so N processes compute what one process does.
    """

    def __init__(self, model, data: TokenShard, schedule: Schedule, budgets, out_dir, seed: int, mask,
                 tokenizer=None, progress: Callable[[dict], None] | None = None):
        self.tokenizer = tokenizer
        # Progress reports (rank 0): tokens this call trains, out of what it has to (a resumed or extended
        # trajectory trains only what is missing).
        self.progress = progress
        try:
            self.to_train = remaining_tokens(schedule, budgets, data.seq_len, out_dir) if progress else 0
        except ValueError:   # another trajectory's folder: the identity check below says so
            self.to_train = 0
        self.trained_steps = 0
        self.clock = time.perf_counter()
        self.reported = (self.clock, 0)
        self.data, self.schedule, self.out_dir = data, schedule, Path(out_dir)
        self.paths = TrainingPaths(out_dir)
        self.tokens_per_step = schedule.batch_size * data.seq_len
        self.plans = plan_branches(schedule, budgets, self.tokens_per_step)
        self.topology = distributed.setup(schedule.device)
        if schedule.batch_size % self.topology.world_size:
            raise ValueError(
                f"batch_size {schedule.batch_size} does not split evenly over {self.topology.world_size} "
                f"processes; give a multiple of {self.topology.world_size}"
            )
        self.device = self.topology.device
        self.model_config = model.config
        self.model = distributed.wrap(model, self.topology, schedule.strategy, bf16=self.device.type == "cuda",
                                      activation_checkpointing=schedule.activation_checkpointing)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        self.order = _DataOrder(data.n_sequences, schedule.batch_size, seed)
        self.mask = mask
        self.masked_params, self.mask_values = self._mask_tensors(mask)
        self.optimizer = make_optimizer(self.model, schedule)
        self.identity = trajectory_identity(schedule, seed, data.n_sequences, data.seq_len)
        self.checkpoints = Checkpointer(self.paths.checkpoints, self.identity, self.topology)
        self.record = read_record(self.out_dir) or {"identity": self.identity, "branches": {}, "curve": [],
                                                     "trunk_diverged": None}
        if self.record["identity"] != self.identity:
            raise ValueError(
                f"{self.out_dir} holds a trajectory of a different training run (other schedule, seed or data); "
                f"use a fresh out_dir or delete that folder"
            )
        self.pristine = True  # the model still holds the starting weights and the optimizer is fresh
        self.saved_step: dict[str, int] = {}  # state name → the step last saved or loaded in this call
        self.last_loss = float("nan")

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
                raise ValueError(f"mask for {name} has shape {tuple(keep.shape)}, parameter has "
                                 f"{tuple(named[name].shape)}")
            params.append(named[name])
            values.append(distributed.shard_like(keep, named[name]).to(dtype=named[name].dtype))
        return params, values

    def mask_gradients(self) -> None:
        """Zero the gradients at masked positions before clipping: the clipped norm counts only the weights that
        train, and AdamW's moments stay zero where the mask holds the weights at zero."""
        grads = [p.grad for p in self.masked_params]
        if self.masked_params and all(grad is not None for grad in grads):
            with torch.no_grad():
                torch._foreach_mul_([distributed.local_part(grad) for grad in grads], self.mask_values)

    def apply_mask(self) -> None:
        if self.masked_params:
            with torch.no_grad():
                torch._foreach_mul_([distributed.local_tensor(p) for p in self.masked_params], self.mask_values)

    def local_batch(self, step: int) -> torch.Tensor:
        indices = self.order.batch(step).view(self.topology.world_size, -1)[self.topology.rank]
        return self.data[indices].to(self.device, non_blocking=True)

    # ------------------------------------------------------------------------------------------------ state

    def weights_finite(self) -> bool:
        """True when every weight of every rank's shard is finite (a collective)."""
        with torch.no_grad():
            flags = torch.stack([torch.isfinite(distributed.local_tensor(p)).all() for p in self.model.parameters()])
            bad = distributed.all_reduce_mean((~flags).sum().float(), self.topology)
        return bool(bad.item() == 0)

    def _require_finite_weights(self, step: int) -> None:
        if not self.weights_finite():
            raise TrainingDiverged(step - 1, step * self.tokens_per_step, self.last_loss, cause="weights")

    def save(self, name: str, position: dict) -> None:
        """Save a state, never one holding non-finite weights (TrainingDiverged instead)."""
        self._require_finite_weights(position["step"])
        self.checkpoints.save(name, position, self.model, self.optimizer)
        self.saved_step[name] = position["step"]

    def load(self, name: str) -> dict | None:
        loaded = self.checkpoints.load(name, self.model, self.optimizer)
        if loaded is None:
            return None
        position, optimizer_restored = loaded
        if not optimizer_restored:
            self.optimizer = make_optimizer(self.model, self.schedule)
        self.pristine = False
        self.saved_step[name] = position["step"]
        return position

    def save_branch_model(self, budget_tokens: int) -> Path:
        """The branch's final weights as a plain HF checkpoint, gathered from the shards and written by rank 0."""
        path = self.paths.branch(budget_tokens)
        if not self.topology.distributed:
            return save_model(self.model, path, self.mask, tokenizer=self.tokenizer)
        state = distributed.full_model_state(self.model)
        if self.topology.is_main:
            save_model(distributed.plain_model(self.model_config, state), path, self.mask, tokenizer=self.tokenizer)
        distributed.barrier(self.topology)
        return path

    def write_record(self) -> None:
        if self.topology.is_main:
            atomic.write_json(self.paths.record, self.record)
        distributed.barrier(self.topology)

    def finish_branch(self, plan: _BranchPlan, trained_tokens: int, path: Path | None, curve: list[dict],
                      error: str | None = None) -> None:
        self.record["branches"][str(plan.budget_tokens)] = {
            "status": "done" if error is None else "diverged", "trained_tokens": trained_tokens,
            "path": str(path) if path is not None else None, "curve": curve, "error": error,
        }
        self.write_record()

    # ------------------------------------------------------------------------------------------------ loop

    def _steps(self, state: dict, end_step: int, plan: _BranchPlan | None, checkpoint_name: str) -> None:
        """Train from state["step"] to end_step on the trunk (plan None) or a branch, in place."""
        schedule, model, optimizer = self.schedule, self.model, self.optimizer
        tokens_per_step = self.tokens_per_step
        params = [p for p in model.parameters() if p.requires_grad]
        pending = state["pending_losses"]  # floats restored from a checkpoint
        window: list[torch.Tensor] = []  # this segment's detached losses, read only when logging
        model.train()
        step = state["step"]
        if step < end_step:
            self.pristine = False
        while step < end_step:
            lr = learning_rate(schedule, tokens_per_step, step, plan)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = self.local_batch(step)
            with self.autocast:
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            self.mask_gradients()
            if schedule.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.apply_mask()
            window.append(loss.detach())
            step += 1
            self.trained_steps += 1
            logging = step % schedule.log_every_steps == 0 or step == end_step
            checkpointing = (step * tokens_per_step) // schedule.checkpoint_every_tokens > (
                (step - 1) * tokens_per_step
            ) // schedule.checkpoint_every_tokens
            if logging or checkpointing:
                pending.extend(self._check_finite(window, step))
                window = []
                state["step"] = step
                if logging and step % schedule.log_every_steps == 0 or plan is not None and step == plan.steps:
                    state["curve"].append(
                        {"tokens": step * tokens_per_step, "loss": sum(pending) / len(pending), "lr": lr}
                    )
                    pending.clear()
                    self.report(plan, step, end_step, state["curve"][-1])
                if checkpointing and step < end_step:
                    self.save(checkpoint_name, state)
        state["step"] = step

    def report(self, plan: _BranchPlan | None, step: int, end_step: int, point: dict | None) -> None:
        """Hand a progress point to ``progress`` (gridlab.progress): where training is, what it has trained in this
        call out of what it has to, the loss and lr of the last curve point, and the speed since the last report."""
        if self.progress is None or not self.topology.is_main:
            return
        now = time.perf_counter()
        trained = self.trained_steps * self.tokens_per_step
        since, before = self.reported
        speed = (trained - before) / (now - since) if now > since and trained > before else None
        self.reported = (now, trained)
        finished = point is None
        self.progress({"phase": "trunk" if plan is None else f"branch {plan.budget_tokens}", "step": step,
                       "steps": end_step, "tokens": step * self.tokens_per_step, "trained": trained,
                       "to_train": self.to_train, "loss": point["loss"] if point else None,
                       "lr": point["lr"] if point else None,
                       "tokens_per_s": trained / (now - self.clock) if finished and now > self.clock else speed,
                       "elapsed_s": now - self.clock, "finished": finished})

    def _check_finite(self, window: list[torch.Tensor], step: int) -> list[float]:
        values = distributed.all_reduce_mean(torch.stack(window).float(), self.topology).cpu().tolist()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                bad_step = step - len(values) + offset
                raise TrainingDiverged(bad_step, (bad_step + 1) * self.tokens_per_step, value)
        self.last_loss = values[-1]
        return values

    def run_branch(self, plan: _BranchPlan, position: dict, head: list[dict]) -> None:
        """Train a branch from `position` (already in the model) to its budget; record it done or diverged."""
        name = _branch_state(plan.budget_tokens)
        try:
            self._steps(position, plan.steps, plan, name)
            self._require_finite_weights(position["step"])
        except TrainingDiverged as error:
            self.finish_branch(plan, error.tokens, None, head + position["curve"],
                               error=f"branch {plan.budget_tokens}: {error}")
        else:
            path = self.save_branch_model(plan.budget_tokens)
            self.finish_branch(plan, plan.steps * self.tokens_per_step, path, head + position["curve"])
        self.checkpoints.drop(name)

    def run(self) -> TrainResult:
        self.apply_mask()
        if not self.weights_finite():
            raise ValueError("the starting model holds non-finite weights")
        diverged = self.record["trunk_diverged"]
        todo = []
        for plan in self.plans:
            if str(plan.budget_tokens) in self.record["branches"]:
                continue
            if diverged is not None and plan.fork_step > diverged["step"]:
                self.finish_branch(plan, diverged["tokens"], None, [], error=f"branch {plan.budget_tokens}: "
                                   f"{diverged['error']} (on the trunk, before this branch's fork)")
                continue
            todo.append(plan)
        main = self.checkpoints.pointer(MAIN_STATE)
        main_step = main["step"] if main else 0
        from_start = [p for p in todo if self.schedule.kind == "cosine" or p.fork_step < main_step]
        if from_start:
            self.run_from_start(from_start)
        on_trunk = [p for p in todo if p not in from_start]
        if on_trunk:
            self.run_trunk(on_trunk)
        self.retain()
        self.report(None, 0, 0, None)
        return self.result()

    def run_from_start(self, plans: list[_BranchPlan]) -> None:
        """Branches that train from step 0: cosine runs, and WSD budgets forking before the kept trunk position."""
        if len(plans) > 1 and self.checkpoints.pointer(START_STATE) is None:
            self.save(START_STATE, _fresh_position())  # nothing has been loaded: the model is the starting one
        for plan in plans:
            position = self.load(_branch_state(plan.budget_tokens))
            if position is None:
                if not self.pristine and self.load(START_STATE) is None:
                    raise RuntimeError("the starting weights are gone (no 'start' state)")
                position = _fresh_position()
            self.run_branch(plan, position, head=[])
        if self.schedule.keep_checkpoints != "all":
            self.checkpoints.drop(START_STATE)

    def run_trunk(self, plans: list[_BranchPlan]) -> None:
        """Branches along the trunk, in fork order: trunk to the fork, save main, branch, reload main."""
        main = self.load(MAIN_STATE)
        if main is None:
            if not self.pristine:
                raise RuntimeError("the trunk has no state and the model no longer holds the starting weights")
            main = _fresh_position()
        for index, plan in enumerate(plans):
            try:
                if main["step"] < plan.fork_step:
                    self._steps(main, plan.fork_step, None, MAIN_STATE)
                if self.saved_step.get(MAIN_STATE) != main["step"]:
                    self.save(MAIN_STATE, main)
            except TrainingDiverged as error:
                self.record["trunk_diverged"] = {"step": error.step, "tokens": error.tokens, "loss": error.loss,
                                                 "error": str(error)}
                self._grow_trunk_curve(main["curve"])
                for later in plans[index:]:  # each forks after the diverged step
                    self.finish_branch(later, error.tokens, None, list(main["curve"]),
                                       error=f"branch {later.budget_tokens}: {error} (on the trunk)")
                return
            self._grow_trunk_curve(main["curve"])
            # The model and optimizer now hold the main state at the fork, unless a killed branch resumes.
            position = self.load(_branch_state(plan.budget_tokens)) or _fresh_position(
                main["step"], main["pending_losses"])
            head = [point for point in main["curve"] if point["tokens"] <= plan.fork_step * self.tokens_per_step]
            self.run_branch(plan, position, head)
            if index + 1 < len(plans):
                main = self.load(MAIN_STATE)

    def _grow_trunk_curve(self, curve: list[dict]) -> None:
        if len(curve) > len(self.record["curve"]):
            self.record["curve"] = list(curve)  # written with the next record

    def retain(self) -> None:
        """What stays of the checkpoint folder now that this call is done (schedule.keep_checkpoints)."""
        keep = self.schedule.keep_checkpoints
        if keep == "all":
            return
        if keep == "none" or self.schedule.kind == "cosine":
            self.checkpoints.remove()
        else:
            self.checkpoints.keep_only({MAIN_STATE})

    def result(self) -> TrainResult:
        branches = []
        for plan in sorted(self.plans, key=lambda p: p.budget_tokens):
            done = self.record["branches"][str(plan.budget_tokens)]
            branches.append(Branch(plan.budget_tokens, done["trained_tokens"],
                                   Path(done["path"]) if done["path"] is not None else None, done["curve"],
                                   done["status"], done["error"]))
        return TrainResult(branches=branches, curve=list(self.record["curve"]))


def train(
    model,
    data: TokenShard,
    schedule: Schedule,
    budgets: list[int],
    out_dir: Path,
    *,
    seed: int,
    mask: dict[str, torch.Tensor] | None = None,
    tokenizer=None,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train `model` on `data` to every budget (tokens) into the trajectory folder `out_dir`.

    Resumable and extendable: call again with the same arguments to resume (or get the finished result at once),
    or with more budgets to train only what they add. `seed` fixes the data order. The model object is trained in
    place and ends holding the weights of the last branch run; each branch's final model is a plain HF checkpoint
    at out_dir/branches/<budget>/ (with sparse_mask.safetensors when masked, and `tokenizer` — a folder or object —
    saved beside it, so the folder works on its own). A diverged branch is returned with status "diverged" and its
    error, not raised. ``progress`` (rank 0) receives a point at every curve point and one (``finished``) at the end:
    phase, step, tokens, tokens trained in this call out of those it has to, loss, lr, tokens/s (gridlab.progress).
    """
    return _Run(model, data, schedule, budgets, out_dir, seed, mask, tokenizer, progress).run()
