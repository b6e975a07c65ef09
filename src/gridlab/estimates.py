"""What a plan costs before it runs: training time on local workers, disk, and training compute in GPU-hours.

Every estimate is a pure function of the plan (gridlab.plan.Plan: its stages, cells and the parent's config,
computed once per plan) and, for time, a measured throughput (gridlab.throughput: this run's finished training
stages, a measurement on this host, or a labelled assumption). gridlab.plantext prints them; ``disk_per_stage`` is
what a stage that finds the disk full says it needs (gridlab.execute.prepare writes it into the run folder).
"""

from __future__ import annotations

from dataclasses import dataclass

from gridlab import throughput
from gridlab.checkpoint import checkpoint_bytes
from gridlab.contracts import ParamCounts, PretrainParent
from gridlab.plan import Plan

MODEL_BYTES_PER_PARAMETER = 4     # models are saved as fp32 safetensors (sparse masks: 1 byte per decoder weight)
# The GPU-hour estimate assumes this share of an H100/H200's dense bf16 peak (PyTorch-native FSDP trainers reach it).
ASSUMED_MFU = 0.4
GPU_PEAK_FLOPS = 989e12


# ------------------------------------------------------------------------------------------------ time

def relative_step_cost(parent_counts: ParamCounts, granularity: str, ratio: float) -> float:
    """A pruned model's training cost per token relative to its parent's. Depth and width models compute their
    embeddings and what is left of the decoder; sparse models keep dense shapes and cost what the parent does.
    (Measured on pico: 6 of its 12 layers train 1.7× faster; this gives 1.6×.)"""
    if granularity == "sparse":
        return 1.0
    dense = parent_counts.embedding + parent_counts.decoder
    return (parent_counts.embedding + (1 - ratio) * parent_counts.decoder) / dense


def step_costs(plan: Plan) -> dict[str, float]:
    """Each training stage's step cost relative to the parent's (relative_step_cost): the parent 1."""
    counts = plan.parent_counts
    costs = {plan.parent_stage.id: 1.0}
    for cell in plan.cells:
        if cell.train_stage:
            costs[cell.train_stage] = relative_step_cost(counts, cell.granularity, cell.ratio)
    return costs


def training_throughput(plan: Plan, workers: int) -> throughput.Throughput:
    """How fast one local worker trains the parent's shape: this run's finished training stages, else a measurement
    of this host (cached), else a labelled assumption."""
    found = throughput.from_run(plan.spec.run_dir, step_costs(plan))
    if found is not None:
        return found
    spec = plan.spec
    schedule = spec.parent.schedule if spec.parent.pretrains else spec.schedule
    return throughput.measure(plan.parent_config, spec.seq_len, schedule.batch_size, workers,
                              assumed=throughput.ASSUMED_TOKENS_PER_S.get(spec.parent.preset or ""))


def training_seconds(plan: Plan, workers: int, tokens_per_s: float, remaining: bool = True,
                     only: set[str] | None = None) -> float:
    """Training time of the plan (or of the stages ``only``) on ``workers`` local workers, each training the
    parent's shape at ``tokens_per_s`` (a pruned model's step costs relative_step_cost of the parent's)."""
    costs = step_costs(plan)
    seconds = 0.0
    if only is None or plan.parent_stage.id in only:
        seconds += plan.parent_tokens(remaining) / tokens_per_s
    for stage in plan.train_stages():
        if only is None or stage.id in only:
            seconds += plan.stage_tokens(stage, remaining) * costs.get(stage.id, 1.0) / tokens_per_s
    return seconds / max(1, workers)


# ------------------------------------------------------------------------------------------------ disk

@dataclass(frozen=True)
class Disk:
    """Bytes a stage kind leaves on disk when all its stages are done, and the most it holds at once before."""

    end: int
    peak: int


def disk_usage(plan: Plan) -> dict[str, Disk | None]:
    """Disk per stage kind (None where it cannot be known before running: the token shards of a corpus not yet
    read). Models are fp32; a saved training state is gridlab.checkpoint.checkpoint_bytes; a train stage holds its
    trajectory's kept state plus, while a branch decays, that branch's state; at most ``parallel`` stages of a kind
    (local workers, or the SLURM array's parallelism) hold their transient files at once."""
    spec = plan.spec
    parent = plan.parent_counts
    dense = parent.total

    def params(granularity: str, ratio: float) -> int:
        return dense if granularity == "sparse" else round(dense - ratio * parent.decoder)

    def model_bytes(granularity: str, ratio: float) -> int:
        mask = parent.decoder if granularity == "sparse" else 0
        return MODEL_BYTES_PER_PARAMETER * params(granularity, ratio) + mask

    def parallel(kind: str) -> int:
        resources = spec.resources.for_kind(kind)
        return resources["array_parallelism"] if resources["gpus_per_node"] else spec.local.workers

    def kept(schedule) -> int:
        return 0 if schedule.keep_checkpoints == "none" or (
            schedule.kind == "cosine" and schedule.keep_checkpoints == "extendable") else 1

    usage: dict[str, Disk | None] = {"data": None}
    parent_stage = plan.parent_stage
    if isinstance(parent_stage.config, PretrainParent):
        schedule = parent_stage.config.schedule
        end = MODEL_BYTES_PER_PARAMETER * dense + kept(schedule) * checkpoint_bytes(dense)
        usage["parent"] = Disk(end, MODEL_BYTES_PER_PARAMETER * dense + 2 * checkpoint_bytes(dense))
    else:
        usage["parent"] = Disk(0, 0)
    shape_of: dict[str, tuple[str, float]] = {}
    for cell in plan.cells:
        shape_of.setdefault(cell.model_stage, (cell.granularity, cell.ratio))
        if cell.train_stage:
            shape_of.setdefault(cell.train_stage, (cell.granularity, cell.ratio))
    for kind in ("prune", "init"):
        stages = [s for s in plan.stages.values() if s.kind == kind]
        end = sum(model_bytes(*shape_of[s.id]) for s in stages)
        spill = MODEL_BYTES_PER_PARAMETER * parent.decoder if kind == "prune" and spec.calibration.layerwise else 0
        usage[kind] = Disk(end, end + min(len(stages), parallel(kind)) * spill)
    ends, transients = [], []
    for stage in plan.train_stages():
        granularity, ratio = shape_of[stage.id]
        state = checkpoint_bytes(params(granularity, ratio))
        keep = kept(stage.config.schedule)
        ends.append(len(stage.config.budgets) * model_bytes(granularity, ratio) + keep * state)
        transients.append((2 - keep) * state)
    transients.sort(reverse=True)
    usage["train"] = Disk(sum(ends), sum(ends) + sum(transients[:parallel("train")]))
    usage["eval"] = Disk(0, 0)
    return usage


def disk_per_stage(plan: Plan) -> dict[str, int | None]:
    """The most one stage of each kind holds on disk (its kind's peak over its stages; None: unknown before the
    corpus is read), what a stage that finds the disk full says it needs."""
    counts: dict[str, int] = {}
    for stage in plan.stages.values():
        counts[stage.kind] = counts.get(stage.kind, 0) + 1
    return {kind: None if disk is None else -(-disk.peak // max(1, counts.get(kind, 1)))
            for kind, disk in disk_usage(plan).items()}


# ------------------------------------------------------------------------------------------------ compute

def training_flops(plan: Plan, remaining: bool = False) -> float:
    """6·N·tokens over the parent's pretraining and the train stages, N = the parent's parameters × the kept
    fraction of each cell; ``remaining``: only what the run folder does not hold yet."""
    parent_params = plan.parent_counts.total
    kept_fraction = {c.train_stage: 1 - c.ratio for c in plan.cells}
    flops = 6 * parent_params * plan.parent_tokens(remaining=remaining)
    for stage in plan.train_stages():
        flops += 6 * parent_params * kept_fraction.get(stage.id, 1.0) * plan.stage_tokens(stage, remaining=remaining)
    return flops


def estimated_gpu_hours(plan: Plan, remaining: bool = False) -> float | None:
    """The plan's training in GPU-hours at the assumed MFU (what `gridlab plan` prints); None where the grid's
    training runs without GPUs (there is no estimate then)."""
    if not plan.spec.resources.for_kind("train")["gpus_per_node"]:
        return None
    return gpu_hours(training_flops(plan, remaining))


def gpu_hours(flops: float) -> float:
    """GPU-hours of ``flops`` at ASSUMED_MFU of an H100's dense bf16 peak."""
    return flops / (ASSUMED_MFU * GPU_PEAK_FLOPS) / 3600
