"""Adaptive studies: spend seeds and budgets only where the answer is still open (`gridlab submit GRID --adaptive`).

Once every cell of the grid is done, the study goes in rounds. Each round *looks* at the results with the report's
own statistics — the gap table of gridlab.report.stats with the sequential verdicts of gridlab.report.sequential
(replayed over the rounds so far) and the crossovers of gridlab.report.scaling — and adds:

- for every cell (method × ratio × setting × budget) whose verdict is inconclusive, its next seed, up to
  `[adaptive] max_seeds` (the seeds follow the grid's list, then count on from its largest: a seed added here is
  the same stages as that seed in a fixed grid);
- for every group (method × ratio × setting) whose crossover is bracketed by two budgets with no budget between
  them, or is extrapolated beyond the largest, the budget that halves the bracket in log tokens (the geometric
  midpoint, rounded to whole batches; beyond the largest: the midpoint of the largest and the extrapolation's far
  end, at most 4× the largest), within `max_budget`, until a bracket is narrower than `min_bracket`. A new budget
  is one more branch of each seed's kept trajectory (gridlab.train): beyond the largest budget it continues the
  kept trunk; inside the grid it replays the trunk to its fork (the trunk state is kept only at the last fork).

It stops when every verdict is decided (and no crossover can be narrowed), when the next round would pass a cap
(`max_tokens`, `max_gpu_hours`), or when no addition can change a verdict (the open cells have max_seeds seeds) —
and says which. The additions are written to runs/<grid>/adaptive.json (gridlab.rounds) before their stages run,
and the planner makes them ordinary cells; a second `submit --adaptive` goes on from the record.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import polars as pl

from gridlab.errors import UserError
from gridlab.report import sequential
from gridlab.report.scaling import HORIZON, Crossover, trend
from gridlab.report.stats import VERDICTS
from gridlab.rounds import (
    BudgetAddition,
    DesignRecord,
    Record,
    Round,
    SeedAddition,
    Stop,
    additions,
    extra_cells,
    read_record,
    write_record,
)

PAIR = ("method", "ratio", "setting", "budget_tokens")


def design_of(spec) -> sequential.Design:
    """The sequential design a grid declares: looks from its own seeds (at least 2) to `[adaptive] max_seeds`."""
    adaptive = spec.adaptive
    return sequential.Design(first=max(2, len(spec.seeds)), last=max(2, adaptive.max_seeds),
                             spending=adaptive.spending)


def margin_of(spec) -> float:
    """The equivalence margin of the adaptive metric: the report's, read the way the report reads it."""
    from gridlab.report.analyse import margin_for

    return margin_for(spec.model_dump(mode="json"), spec.adaptive.metric)


def design_record(spec) -> DesignRecord:
    design = design_of(spec)
    return DesignRecord(first=design.first, last=design.last, spending=design.spending, alpha=design.alpha,
                        margin=margin_of(spec), metric=spec.adaptive.metric)


def check_study(spec, record: Record) -> None:
    """One line (UserError) when the grid cannot run adaptively: no [adaptive] table, or a sequential design that
    differs from the one its rounds were decided with (margin, max_seeds, spending, metric or the grid's seeds are
    declared before looking)."""
    if spec.adaptive is None:
        raise UserError("--adaptive needs an [adaptive] table in the grid (e.g. `[adaptive]` with `max_seeds = 8`; "
                        "docs/grid-toml.md)")
    if record.design is None:
        return
    now = design_record(spec)
    changed = [f"{key} {getattr(record.design, key)!r} → {getattr(now, key)!r}"
               for key in ("margin", "last", "spending", "metric", "first", "alpha")
               if getattr(record.design, key) != getattr(now, key)]
    if changed:
        names = {"last": "max_seeds", "first": "the grid's seeds (first look)"}
        shown = ", ".join(names.get(c.split(" ")[0], c.split(" ")[0]) + " " + c.split(" ", 1)[1] for c in changed)
        raise UserError(f"[adaptive]: this study's rounds were decided with another sequential design ({shown}); "
                        f"a design is declared before looking: restore it, or start a new study (another grid "
                        f"name)")


def check_caps(spec, grid_plan) -> None:
    """max_gpu_hours needs a GPU-hour estimate (gridlab.estimates.estimated_gpu_hours): one line where there is
    none."""
    from gridlab.estimates import estimated_gpu_hours

    if spec.adaptive.max_gpu_hours is not None and estimated_gpu_hours(grid_plan) is None:
        raise UserError("adaptive.max_gpu_hours: this grid has no GPU-hour estimate (its [resources.train] asks for "
                        "no GPUs, or the parent declares no preset); cap the rounds with max_tokens instead")


def seed_order(spec, count: int) -> list[int]:
    """The seeds cells get, in order: the grid's, then counting on from its largest."""
    seeds = list(spec.seeds)
    while len(seeds) < count:
        seeds.append(max(seeds) + 1)
    return seeds[:count]


def planned_pairs(cells) -> dict[tuple, set[int]]:
    """(method, ratio, setting, budget) → the seeds planned for both arms there (budgets > 0)."""
    arms: dict[tuple, dict[str, set[int]]] = {}
    for cell in cells:
        if cell.budget_tokens > 0:
            key = (cell.method, float(cell.ratio), cell.setting, cell.budget_tokens)
            arms.setdefault(key, {}).setdefault(cell.init, set()).add(cell.seed)
    return {key: by_init.get("pruned", set()) & by_init.get("random", set()) for key, by_init in arms.items()}


# ---------------------------------------------------------------------------------------------------------------
# A look: the verdicts, and what to add


@dataclass
class Look:
    gaps: pl.DataFrame  # the sequential gap table
    crossovers: list[Crossover]
    verdicts: dict[str, int]
    open: int  # inconclusive cells
    seeds: list[SeedAddition] = field(default_factory=list)
    budgets: list[BudgetAddition] = field(default_factory=list)
    full: int = 0  # inconclusive cells that have max_seeds seeds already
    futile: int = 0  # inconclusive cells that even max_seeds would hardly decide (futility)


def _key(row: dict) -> tuple:
    return (row["method"], float(row["ratio"]), int(row["setting"]), int(row["budget_tokens"]))


def next_seeds(gaps: pl.DataFrame, planned: dict[tuple, set[int]], spec, design: sequential.Design
               ) -> tuple[list[SeedAddition], int, int]:
    """The next seed of every inconclusive cell below max_seeds that is not futile (sequential.conditional_power
    below `[adaptive] futility`); and how many inconclusive cells are at max_seeds, and how many futile."""
    order = seed_order(spec, design.last)
    open_ = gaps.with_columns(_power=sequential.series(sequential.conditional_power(gaps, design, margin_of(spec))))
    found, full, futile = [], 0, 0
    for row in open_.filter(pl.col("verdict") == "inconclusive").sort(list(PAIR)).iter_rows(named=True):
        have = planned.get(_key(row), set())
        if len(have) >= design.last:
            full += 1
            continue
        if row["_power"] is not None and row["_power"] < spec.adaptive.futility:
            futile += 1
            continue
        seed = next(s for s in order if s not in have)
        shown = (f"gap {row['gap']:+.4g} ± {row['half']:.3g} (95 % repeated CI)" if row["half"] is not None
                 else f"gap {row['gap']:+.4g}, no interval yet")
        found.append(SeedAddition(method=row["method"], ratio=float(row["ratio"]), setting=int(row["setting"]),
                                  budget=int(row["budget_tokens"]), seed=seed,
                                  why=f"inconclusive with {len(have)} seed(s): {shown}"))
    return found, full, futile


def _batches(spec, tokens: float) -> int:
    """`tokens` rounded to whole optimizer steps (batch_size × seq_len)."""
    batch = spec.schedule.batch_size * spec.seq_len
    return max(batch, int(round(tokens / batch)) * batch)


def next_budgets(crossovers: list[Crossover], planned: dict[tuple, set[int]], spec) -> list[BudgetAddition]:
    """For every group whose crossover is bracketed by two budgets with none between them (interpolated, or a sign
    change between two significant verdicts of the same side), the geometric midpoint of the bracket; for one
    extrapolated beyond the largest budget, the midpoint of the largest and the extrapolation's far end (its band's,
    or 4× the largest). Rounded to whole batches, within max_budget, and only where the bracket is wider than
    min_bracket."""
    adaptive = spec.adaptive
    budgets_of: dict[tuple, set[int]] = {}
    for method, ratio, setting, budget in planned:
        budgets_of.setdefault((method, ratio, setting), set()).add(budget)
    limit = adaptive.max_budget if adaptive.max_budget is not None else HORIZON * max(spec.budgets)
    seeds = seed_order(spec, max(2, len(spec.seeds)))
    found = []
    for c in crossovers:
        group = (c.method, float(c.ratio), int(c.setting))
        have = sorted(budgets_of.get(group, set()))
        if not have:
            continue
        if c.kind == "interpolated" or (c.kind == "unresolved" and c.high is not None):
            low, high = float(c.low), float(c.high)
            if any(low < b < high for b in have):
                continue  # a budget inside the bracket: its seeds narrow it
            what = f"crossover between {low:,.0f} and {high:,.0f} tokens, where {c.direction}: the geometric midpoint"
        elif c.kind == "extrapolated":
            low = float(max(have))
            far = HORIZON * low if c.open_high or c.high is None else float(c.high)
            high = min(far, float(limit))
            what = (f"crossover extrapolated to ≈ {c.budget:,.0f} tokens, beyond the largest budget {low:,.0f}, where "
                    f"{c.direction}: halfway to {high:,.0f} in log tokens")
        else:
            continue
        if high / low <= adaptive.min_bracket:
            continue
        budget = _batches(spec, math.sqrt(low * high))
        if not low < budget < high or budget > limit or budget in have:
            continue
        found.append(BudgetAddition(method=c.method, ratio=float(c.ratio), setting=int(c.setting), budget=budget,
                                    seeds=seeds, why=what))
    return found


def look_at(spec, cells, values: pl.DataFrame, higher_is_better: bool, record: Record,
            documents: pl.DataFrame | None = None) -> Look:
    """What the study's results say now (pure: the plan's cells, the seed-level headline values of budgets > 0,
    the record of the rounds so far, the metric's per-document losses for the held-out sample's error): the
    sequential verdicts — those the report prints — the crossovers, and what the next round adds."""
    design = design_of(spec)
    margin = margin_of(spec)
    added = pl.DataFrame(additions(record)) if record.rounds else None
    gaps = sequential.sequential_gap_table(values, higher_is_better, "model", margin, design, added, documents)
    planned = planned_pairs(cells)
    crossovers = trend(values, gaps, sorted({key[3] for key in planned})).crossovers if gaps.height else []
    counts = {verdict: 0 for verdict in VERDICTS}
    for verdict, count in gaps.group_by("verdict").len().iter_rows():
        counts[verdict] = count
    seeds, full, futile = next_seeds(gaps, planned, spec, design)
    return Look(gaps, crossovers, counts, counts["inconclusive"], seeds, next_budgets(crossovers, planned, spec),
                full, futile)


# ---------------------------------------------------------------------------------------------------------------
# One step of the loop: look, then record a round or the reason to stop


@dataclass
class Step:
    status: str  # "added" (a round was recorded) | "stopped" | "waiting" (stages of the plan are not done)
    line: str
    round: Round | None = None
    stop: Stop | None = None
    look: Look | None = None


def _verdict_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS)


def _fixed_tokens(spec, cells) -> int:
    """A fixed grid that reaches the same verdicts: every cell with the most seeds any cell got, every budget any
    group got (its tokens to train, as `gridlab plan` counts them)."""
    from gridlab.plan import build_plan

    planned = planned_pairs(cells)
    seeds = max((len(s) for s in planned.values()), default=len(spec.seeds))
    budgets = sorted({key[3] for key in planned} | set(spec.budgets))
    fixed = spec.model_copy(update={"seeds": seed_order(spec, max(seeds, len(spec.seeds))), "budgets": budgets})
    return build_plan(fixed).train_tokens()


def advance(spec) -> Step:
    """Look at a study whose every stage is done and record what follows: a round (its additions, what it trains)
    or the reason to stop (then the database is ingested again, so its adaptive tables say it). The caller holds
    the run lock. Every other step of the loop is api.submit's."""
    from gridlab import db
    from gridlab.state import stage_states

    step = _advance(spec)
    if step.status == "stopped":
        current = build_plan_of(spec)
        db.ingest(spec.run_dir, stage_states(spec.run_dir, list(current.stages.values()), verify=True))
    return step


def build_plan_of(spec):
    """The study's plan now: the grid's cells and every recorded round's."""
    from gridlab.plan import build_plan

    return build_plan(spec, extra_cells(read_record(spec.run_dir), spec))


def _advance(spec) -> Step:
    from gridlab import db
    from gridlab.estimates import estimated_gpu_hours
    from gridlab.layout import RunPaths
    from gridlab.plan import build_plan
    from gridlab.report.read import headline_values, metric_direction, read_results
    from gridlab.state import stage_states

    run_dir = spec.run_dir
    record = read_record(run_dir)
    check_study(spec, record)
    current = build_plan(spec, extra_cells(record, spec))
    states = stage_states(run_dir, list(current.stages.values()), verify=True)
    waiting = [s for s in states.values() if s.status != "done"]
    if waiting:
        return Step("waiting", f"{len(waiting)} stage(s) of the study are not done yet")
    db.ingest(run_dir, states)
    results = read_results(RunPaths(run_dir).database)
    metric = spec.adaptive.metric
    higher = metric_direction(results.metrics, metric)
    values = headline_values(results.cells, results.metrics, metric).filter(pl.col("budget_tokens") > 0)
    look = look_at(spec, current.cells, values, higher, record,
                   results.documents.filter(pl.col("metric") == metric))
    number = len(record.rounds) + 1
    record.design = record.design or design_record(spec)
    grid_tokens = build_plan(spec).train_tokens()  # the grid's own cells (the default max_tokens)
    if not look.seeds and not look.budgets:
        if look.open == 0:
            reason, line = "decided", (f"every verdict is decided ({_verdict_line(look.verdicts)}) and no crossover "
                                       f"can be narrowed within max_budget and min_bracket")
        else:
            why = [f"{look.full} have max_seeds = {spec.adaptive.max_seeds} seeds" if look.full else "",
                   f"{look.futile} would be decided with less than a {spec.adaptive.futility:.0%} chance even with "
                   f"max_seeds (futility)" if look.futile else ""]
            reason, line = "exhausted", (f"no addition can change a verdict: of the {look.open} inconclusive "
                                         f"cell(s), " + " and ".join(w for w in why if w) + "; no crossover can be "
                                         f"narrowed ({_verdict_line(look.verdicts)})")
        return _stop(run_dir, record, look, reason, line, grid_tokens, _fixed_tokens(spec, current.cells))
    entry = Round(round=number, looked_at=time.time(), seeds=look.seeds, budgets=look.budgets, tokens=0,
                  gpu_hours=None, verdicts=look.verdicts, open=look.open)
    extended = build_plan(spec, extra_cells(record, spec) + extra_cells(Record(rounds=[entry]), spec))
    tokens = extended.remaining_train_tokens()  # every other stage is done: what this round adds
    gpu_hours = estimated_gpu_hours(extended, remaining=True)
    cap = spec.adaptive.max_tokens if spec.adaptive.max_tokens is not None else grid_tokens
    what = f"round {number} ({len(look.seeds)} seed(s), {len(look.budgets)} budget(s))"
    if record.tokens + tokens > cap:
        line = (f"cap reached: {what} would train {tokens:,} tokens; the rounds have trained {record.tokens:,} of "
                f"max_tokens {cap:,} ({_verdict_line(look.verdicts)})")
        return _stop(run_dir, record, look, "cap", line, grid_tokens, _fixed_tokens(spec, current.cells))
    hours_cap = spec.adaptive.max_gpu_hours
    if hours_cap is not None and gpu_hours is not None and (record.gpu_hours or 0.0) + gpu_hours > hours_cap:
        line = (f"cap reached: {what} would take ≈ {gpu_hours:,.1f} GPU-hours; the rounds have taken "
                f"{record.gpu_hours or 0.0:,.1f} of max_gpu_hours {hours_cap:,.1f} ({_verdict_line(look.verdicts)})")
        return _stop(run_dir, record, look, "cap", line, grid_tokens, _fixed_tokens(spec, current.cells))
    entry = entry.model_copy(update={"tokens": tokens, "gpu_hours": gpu_hours})
    record.rounds.append(entry)
    record.stopped = None
    write_record(run_dir, record)
    from gridlab.execute import prepare

    prepare(extended, run_dir)  # plan.json and index.json with the round's cells: status shows them pending
    hours = f" (≈ {gpu_hours:,.1f} GPU-hours)" if gpu_hours is not None else ""
    return Step("added", f"round {number}: {entry.summary}; {tokens:,} tokens to train{hours}; the look before it: "
                         f"{_verdict_line(look.verdicts)}", round=entry, look=look)


def _stop(run_dir, record: Record, look: Look, reason: str, line: str, grid_tokens: int,
          fixed_tokens: int) -> Step:
    """Record the reason to stop (the design too, so the report knows the verdicts are sequential)."""
    stop = Stop(look=len(record.rounds), reason=reason, line=line, at=time.time(), verdicts=look.verdicts,
                tokens=record.tokens, grid_tokens=grid_tokens, fixed_tokens=fixed_tokens)
    record.stopped = stop
    write_record(run_dir, record)
    return Step("stopped", f"stopped after {len(record.rounds)} round(s): {line}", stop=stop, look=look)
