"""What `gridlab plan` and `gridlab submit` print about a plan: the matrix, stages, tokens, the time estimate and
where its throughput comes from, job shapes and GPU-hours, disk (the numbers are gridlab.estimates')."""

from __future__ import annotations

from gridlab import estimates
from gridlab.cells import granularity
from gridlab.contracts import Cell
from gridlab.data import describe_corpus
from gridlab.plan import Plan
from gridlab.units import duration, size


def format_plan(plan: Plan, workers: int | None = None, only: set[str] | None = None,
                cells: list[Cell] | None = None) -> str:
    """The plan's lines. ``only`` / ``cells``: a --where selection (its stages with what they need upstream, its
    cells), whose cells, stages, tokens and time are printed too. Describing a corpus checks its files too: a
    UserError names a bad one."""
    spec = plan.spec
    workers = workers or spec.local.workers
    added = f", {plan.added} added by adaptive rounds" if plan.added else ""
    lines = [f"grid {spec.name}: {len(plan.cells)} cells ({plan.excluded} excluded{added}) → {plan.spec.run_dir}"]
    parent = spec.parent
    source = f"pretrain {parent.preset} for {parent.tokens:,} tokens" if parent.pretrains else f"load {parent.path}"
    lines.append(f"  parent: {source} (parent tokens P = {parent.tokens:,})")
    lines.append("  " + describe_corpus(spec.corpus))
    lines.extend("  " + describe_corpus(corpus, f"eval corpus {corpus.label}") for corpus in spec.evaluation.corpora)
    lines.append("  methods: " + ", ".join(
        f"{m.label} [{granularity(m)}] ratios {'/'.join(f'{r:g}' for r in spec.method_ratios(m))}"
        for m in spec.methods))
    lines.append(f"  inits {', '.join(spec.inits)} × budgets {', '.join(f'{b:,}' for b in spec.budgets)}"
                 f" × settings {', '.join(map(str, spec.settings))} × seeds {', '.join(map(str, spec.seeds))}")
    lrs = {arm: spec.schedule.lrs(arm) for arm in spec.inits}
    if len(set(lrs.values())) > 1 or spec.sweeps:
        sweep = "; a sweep: each arm compared at its best lr on val_loss/select" if spec.sweeps else ""
        lines.append("  learning rates: " + ", ".join(f"{arm} {'/'.join(f'{lr:g}' for lr in rates)}"
                                                      for arm, rates in lrs.items()) + sweep)
    lines.append("  stages: " + ", ".join(f"{kind} {count}" for kind, count in plan.counts.items())
                 + f" (total {len(plan.stages)})")
    planned, naive, remaining = plan.train_tokens(), plan.naive_train_tokens(), plan.remaining_train_tokens()
    lines.append(f"  tokens to train: {planned:,} (naive one run per cell: {naive:,}; "
                 f"{naive / max(planned, 1):.1f}× saved)")
    if remaining != planned:
        lines.append(f"  still to train: {remaining:,} tokens ({planned - remaining:,} are trained already in "
                     f"{spec.run_dir})")
    gpus = spec.resources.for_kind("train")["gpus_per_node"]
    speed = None if gpus else estimates.training_throughput(plan, workers)
    if speed is not None and speed.tokens_per_s:
        seconds = estimates.training_seconds(plan, workers, speed.tokens_per_s)
        lines.append(f"  estimated training time: {duration(seconds)} on {workers} local worker(s) ({speed.basis})")
    elif speed is not None:
        lines.append(f"  estimated training time: unknown ({speed.basis})")
    if only is not None:
        lines.extend(_selection_lines(plan, workers, only, cells or [], speed))
    lines.extend(_job_lines(plan))
    lines.extend(_disk_lines(plan))
    return "\n".join(lines)


def _selection_lines(plan: Plan, workers: int, only: set[str], cells: list[Cell], speed) -> list[str]:
    """The --where sub-grid's share: its cells and stages, tokens, time."""
    counts: dict[str, int] = {}
    for stage in plan.stages.values():
        if stage.id in only:
            counts[stage.kind] = counts.get(stage.kind, 0) + 1
    lines = [f"  --where selects {len(cells)} of {len(plan.cells)} cells and {len(only)} of {len(plan.stages)} "
             f"stages with what they need upstream (" + ", ".join(f"{kind} {n}" for kind, n in counts.items()) + ")"]
    selected, left = plan.selected_train_tokens(only, False), plan.selected_train_tokens(only, True)
    line = f"  --where tokens to train: {selected:,}" + (f" (still to train: {left:,})" if left != selected else "")
    if speed is not None and speed.tokens_per_s:
        seconds = estimates.training_seconds(plan, workers, speed.tokens_per_s, only=only)
        line += f"; estimated training time: {duration(seconds)} on {workers} local worker(s)"
    return lines + [line]


def _job_lines(plan: Plan) -> list[str]:
    """Each multi-process or GPU stage kind's job shape, and the training compute in GPU-hours."""
    spec = plan.spec
    lines = []
    for kind in ("parent", "prune", "init", "train", "eval"):
        r = spec.resources.for_kind(kind)
        if r["ranks"] > 1 or r["gpus_per_node"]:
            where = f" partition {r['partition']}" if r["partition"] else ""
            lines.append(f"  {kind} jobs: {r['nodes']} node(s) × {r['tasks_per_node']} rank(s), "
                         f"{r['gpus_per_node']} GPU(s)/node, {r['mem_gb']:g} GB/node, {r['time_min']} min{where}")
    data = spec.resources.for_kind("data")
    if data["tasks"] > 1:
        lines.append(f"  data: 1 tokenizer job, then {data['tasks']} shard tasks (partitions of the corpus: one job "
                     f"array, {data['cpus']} process(es) each), then the data stage assembles the shards")
    train = spec.resources.for_kind("train")
    if train["gpus_per_node"]:
        flops = estimates.training_flops(plan)
        hours = estimates.gpu_hours(flops)
        gpus = train["nodes"] * train["gpus_per_node"] * train["array_parallelism"]
        lines.append(f"  training compute: {flops:.2e} FLOPs (6·params·tokens) ≈ {hours:,.0f} GPU-hours at an "
                     f"assumed {estimates.ASSUMED_MFU:.0%} MFU of {estimates.GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s "
                     f"(H100 bf16); ≈ {duration(hours * 3600 / gpus)} with {train['array_parallelism']} train jobs "
                     f"at once ({gpus} GPUs)")
    return lines


def _disk_lines(plan: Plan) -> list[str]:
    usage = estimates.disk_usage(plan)
    known = {kind: disk for kind, disk in usage.items() if disk is not None}
    parts = [f"{kind} {size(disk.end)}" + (f" (peak {size(disk.peak)})" if disk.peak != disk.end else "")
             for kind, disk in known.items() if disk.peak]
    end, peak = sum(d.end for d in known.values()), sum(d.peak for d in known.values())
    return [f"  disk, at the end (and at peak): {', '.join(parts)}; in all {size(end)} (peak ≤ {size(peak)}), "
            f"plus the token shards (2 bytes a token, 4 above a 65,536-token vocabulary)"]
