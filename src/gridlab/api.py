"""gridlab as a library: every `gridlab` command, callable from a notebook or a sweep script.

    import gridlab.api as gl
    outcome = gl.submit("grid.toml", where=["method=wanda"])   # run (local) or submit (slurm) what is not done
    outcome.exit_code                                         # 0 on its way, 1 failed/blocked, 3 unknown
    gl.status("grid.toml")["cells"]                           # {"pending": …, "running": …, "done": …, …}
    gl.cancel("grid.toml", where=["kind=train"])              # scancel / stop workers, mark cancelled
    gl.reset("grid.toml", where=["method=wanda"], dry_run=True)   # wanda's own stages; shared work stays
    gl.reset("grid.toml", where=["method=wanda"], yes=True)       # removing finished work needs yes (or confirm=)
    gl.clean("grid.toml", yes=True)                           # orphans and unneeded checkpoints; bytes freed
    print(gl.plan_text("grid.toml", where=["budget=80k"]))    # the plan, its time estimate, the sub-grid's share
    gl.export("grid.toml", "cells.parquet", fmt="parquet")
    gl.logs("grid.toml", where=["state=failed"])              # [(stage id, log path, text)]
    gl.report("grid.toml", out="report")                      # {"html": …, "pdf": …}

``where`` takes the CLI's --where expressions (gridlab.select). Mistakes a user can make raise
gridlab.errors.UserError with one line; the CLI only parses arguments, calls these and prints what they return.
Commands that change a run folder (submit, cancel, reset, clean) hold its lock (gridlab.lock); readers (status,
report, export, logs) never take it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridlab import backends, execute, lock
from gridlab.backends.records import OWN_KEYS, read_submission, record_submission
from gridlab.contracts import DATA_TASK_KINDS, STAGE_KINDS, in_kind_order
from gridlab.errors import UserError, in_grid_file
from gridlab.gridfile import read_grid_file
from gridlab.gridfile import run_dir as grid_run_dir
from gridlab.layout import RunPaths
from gridlab.lock import held_by
from gridlab.planfile import current_inputs, read_index, read_plan_record, stale_inputs
from gridlab.progress import read_progress
from gridlab.results import tail
from gridlab.select import (
    cell_needs,
    cells_of,
    destructive_scope,
    parse_where,
    select_cells,
    select_stages,
)
from gridlab.state import STATES, effective_states, stage_states

# Imported where they are used, not here: the planner (gridlab.plan, spec, plantext: torch and transformers), tidy
# (training's checkpoint layout: torch), db and export (DuckDB, polars) and the report. `gridlab status` imports
# this module and none of those (tests/test_cli.py checks that it loads no torch).

# `gridlab submit` exit codes (also `SubmitOutcome.exit_code`); 2 is a user error, raised before anything runs.
EXIT_OK = 0           # every selected stage is done, or queued/running with nothing failed, blocked or unknown
EXIT_FAILED = 1       # some selected stage failed, was cancelled, or is blocked by one (rerun with --retry-failed)
EXIT_USER_ERROR = 2   # a mistake in the grid or the command line, or the run is held by another submitter
EXIT_UNKNOWN = 3      # nothing failed, but the state of some stages is unknown (the scheduler did not answer)


def run_dir_of(grid: str | Path) -> Path:
    """The run folder of a grid file (read without full validation, so status needs no torch) or a run folder."""

    path = Path(grid)
    if path.is_dir():
        return path
    return grid_run_dir(read_grid_file(path), path)


def plan(grid: str | Path):
    """The validated grid's plan (gridlab.plan.Plan): cells, stages, token counts, with the cells an adaptive study
    added (runs/<grid>/adaptive.json, gridlab.rounds). Submits nothing. Every problem with the grid is one UserError
    line naming the file (gridlab.errors.in_grid_file)."""
    from gridlab.plan import build_plan  # torch: see the note under the imports
    from gridlab.rounds import run_extra_cells
    from gridlab.spec import load_grid

    with in_grid_file(grid):
        spec = load_grid(grid)
        return build_plan(spec, extra_cells=run_extra_cells(spec))  # an adaptive study's added cells


def plan_text(grid: str | Path, workers: int | None = None, where: Iterable[str] = ()) -> str:
    """What `gridlab plan` prints (gridlab.plan.format_plan): the matrix, stages, tokens, the time estimate and where
    its throughput comes from, disk; with ``where``, also the selected sub-grid's cells, stages, tokens and time."""
    from gridlab.plantext import format_plan  # torch: see the note under the imports

    check_workers(workers)
    the_plan = plan(grid)
    check_run_dir(grid, the_plan.spec.run_dir)
    only, cells = _planned_selection(the_plan, where)
    with in_grid_file(grid):
        return format_plan(the_plan, workers, only=only, cells=cells)


def _planned_selection(the_plan, where: Iterable[str], status: dict[str, str] | None = None):
    """(stage ids with what they need upstream, cells) a --where selects from a plan; (None, None) without one."""

    where = list(where or ())
    if not where:
        return None, None
    stages = list(the_plan.stages.values())
    parsed = _where(where, stages, the_plan.cells)
    if status is None and "state" in parsed.conditions:

        status = {sid: s.status for sid, s in stage_states(the_plan.spec.run_dir, stages).items()}
    only = select_stages(parsed, stages, the_plan.cells, status, upstream=True)
    cells = [c for c in cells_of(parsed, the_plan.cells) if c.eval_stage in only]
    return only, cells


def _never_submitted(grid: str | Path, run_dir: Path) -> UserError:
    if Path(grid).is_dir():
        return UserError(f"{run_dir}: no submitted run here (no plan.json); run `gridlab submit GRID` first")
    return UserError(f"{grid}: never submitted (nothing in {run_dir}); run `gridlab submit {grid}` first")


def _record(grid: str | Path):
    """What the run folder holds: the submitted plan (stages, cells); a UserError when nothing was submitted."""

    run_dir = run_dir_of(grid)
    if not RunPaths(run_dir).plan.exists():
        raise _never_submitted(grid, run_dir)
    return read_plan_record(run_dir)


def _where(where: Iterable[str], stages, cells):

    return parse_where(list(where or ()), stages, cells)


# ------------------------------------------------------------------------------------------------------ submit

@dataclass
class SubmitOutcome:
    """What one `submit` did, and whether the grid is on its way to complete (``exit_code``)."""

    run_dir: Path
    plan: Any
    done: list[str] = field(default_factory=list)        # skipped: already done
    active: list[str] = field(default_factory=list)      # left alone: queued or running elsewhere
    failed: list[Any] = field(default_factory=list)      # StageState of failed/cancelled stages (not rerun)
    unknown: list[Any] = field(default_factory=list)     # StageState of stages whose state nobody can tell
    ran: dict[str, str] = field(default_factory=dict)    # stage id → what happened this call
    submitted: bool = False                              # slurm: jobs were submitted and are still running
    selected: int = 0                                    # stages --where selected (all, without --where)
    adaptive: Any = None                                 # --adaptive: the last look (gridlab.adaptive.Step)

    @property
    def blocked(self) -> list[str]:
        return [stage_id for stage_id, status in self.ran.items() if status == "blocked"]

    @property
    def exit_code(self) -> int:
        if self.failed or self.blocked or any(s in ("failed", "cancelled") for s in self.ran.values()):
            return EXIT_FAILED
        if self.unknown:
            return EXIT_UNKNOWN
        return EXIT_OK

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK


def submit(grid: str | Path, executor: str = "local", workers: int | None = None, retry_failed: bool = False,
           dry_run: bool = False, wait: bool = False, where: Iterable[str] = (), wait_lock: bool = False,
           report: Callable[[str], None] = print, watch: Callable[..., Any] | None = None,
           adaptive: bool = False) -> SubmitOutcome:
    """Run (local, debug) or submit (slurm) every stage of the grid (or of ``where``'s sub-grid, with what it needs
    upstream) that is not done; idempotent.

    ``report`` receives the progress lines. With ``dry_run`` nothing is written and no lock is taken. ``wait``
    (slurm) blocks until every submitted stage has finished. ``wait_lock``: wait for another submitter holding the
    run instead of raising. ``watch(run_dir, stages, to_train)``: a context manager that is open while the stages
    run (the CLI's live view reads ``progress_snapshot`` in it); ``stages`` are those to run, ``to_train`` the tokens
    they train. The database is rebuilt whenever stages have finished. ``adaptive``: an adaptive study
    (submit_adaptive).
    """
    if adaptive:
        return submit_adaptive(grid, executor=executor, workers=workers, retry_failed=retry_failed,
                               dry_run=dry_run, wait=wait, where=where, wait_lock=wait_lock, report=report,
                               watch=watch)
    from gridlab import db  # DuckDB, polars; and the planner, torch: see the note under the imports
    from gridlab.plantext import format_plan

    backend_class = backends.backend_class(executor)   # a UserError names the installed ones
    check_workers(workers)
    the_plan = plan(grid)
    run_dir = the_plan.spec.run_dir
    stages = list(the_plan.stages.values())
    parsed = _where(where, stages, the_plan.cells)
    check_run_dir(grid, run_dir)
    backend = backend_class(workers=workers or the_plan.spec.local.workers, report=report)
    for line in backend.preflight(the_plan.spec, submitting=not dry_run, source=str(grid)):
        report(f"  warning: {line}")
    run_lock = None if dry_run else lock.acquire(run_dir, "submit", wait=wait_lock, report=report,
                                                 backend=backend.name)
    try:
        states = stage_states(run_dir, stages, verify=True)
        only = None
        if parsed:
            only = select_stages(parsed, stages, the_plan.cells, {s: st.status for s, st in states.items()},
                                 upstream=True)
        triage = execute.triage(the_plan, states, retry_failed, only)
        outcome = SubmitOutcome(run_dir=run_dir, plan=the_plan, done=triage.done, active=triage.active,
                                failed=triage.failed + triage.lingering, unknown=triage.unknown,
                                selected=len(stages) if only is None else len(only))
        cells = None
        if only is not None:
            _, cells = _planned_selection(the_plan, where, {s: st.status for s, st in states.items()})
        with in_grid_file(grid):
            report(format_plan(the_plan, workers, only=only, cells=cells))
        for line in _stale_since_last_submit(run_dir, the_plan):
            report(f"  warning: {line}")
        report(_triage_line(triage, only))
        for state in triage.failed:
            report(f"  {state.status} {state.kind} {state.stage_id}: {state.error or ''}  "
                   f"(resubmit with --retry-failed)")
        for state in triage.lingering:
            report(f"  {state.status} {state.kind} {state.stage_id}: {state.error or ''}")
        for state in triage.unknown:
            report(f"  warning: unknown {state.kind} {state.stage_id}: {state.error or ''}  (left alone)")
        if dry_run:
            return outcome
        _record_reconciled(run_dir, states)
        execute.prepare(the_plan, run_dir)
        if triage.to_run:
            running = [{"id": s.id, "kind": s.kind, "deps": s.deps} for s in triage.to_run]
            to_train = the_plan.selected_train_tokens({s.id for s in triage.to_run}, remaining=True)
            view = watch(run_dir, running, to_train) if watch and backend.finishes else contextlib.nullcontext()
            with view:
                outcome.ran = backend.run(run_dir, the_plan, triage, states)
            if not backend.finishes:
                outcome.submitted = True
                if not wait:
                    return outcome
                run_lock.release()
                execute.wait_for(run_dir, stages, report)
            states = stage_states(run_dir, stages, verify=True)
        db.ingest(run_dir, states)
        chosen_ids = set(only) if only is not None else set(states)
        outcome.failed = [s for sid, s in states.items() if sid in chosen_ids and s.status in ("failed", "cancelled")]
        outcome.unknown = [s for sid, s in states.items() if sid in chosen_ids and s.status == "unknown"]
        return outcome
    finally:
        if run_lock is not None:
            run_lock.release()


def submit_adaptive(grid: str | Path, executor: str = "local", workers: int | None = None,
                    retry_failed: bool = False, dry_run: bool = False, wait: bool = False, where: Iterable[str] = (),
                    wait_lock: bool = False, report: Callable[[str], None] = print,
                    watch: Callable[..., Any] | None = None) -> SubmitOutcome:
    """An adaptive study (gridlab.adaptive): run the grid's cells and every recorded round; once every stage is
    done, look at the verdicts and record the next round (or the reason to stop), and go on. Locally (and on SLURM
    with ``wait``) it runs the rounds to the end; on SLURM without ``wait`` each call advances the study by one
    round: it submits what is not done and returns, and a call that finds every stage done looks, records the next
    round and submits it. ``outcome.adaptive`` is the last step (gridlab.adaptive.Step)."""
    from gridlab import adaptive, lock
    from gridlab.errors import in_grid_file
    from gridlab.plan import build_plan
    from gridlab.rounds import read_record
    from gridlab.spec import load_grid
    from gridlab.state import stage_states

    if list(where or ()):
        raise UserError("--adaptive runs the whole grid and adds cells where its verdicts are open; --where selects "
                        "a sub-grid: give one or the other")
    with in_grid_file(grid):
        spec = load_grid(grid)
        adaptive.check_study(spec, read_record(spec.run_dir))
        adaptive.check_caps(spec, build_plan(spec))
    while True:
        outcome = submit(grid, executor=executor, workers=workers, retry_failed=retry_failed, dry_run=dry_run,
                         wait=wait, wait_lock=wait_lock, report=report, watch=watch)
        if dry_run:
            report("adaptive: once every stage is done, a look decides the next round")
            return outcome
        if outcome.exit_code != EXIT_OK:
            report("adaptive: the study waits until the failed or unknown stages are resolved (`gridlab status`; "
                   "`--retry-failed`)")
            return outcome
        stages = list(outcome.plan.stages.values())
        if not all(s.status == "done" for s in stage_states(outcome.run_dir, stages).values()):
            rounds = len(read_record(outcome.run_dir).rounds)
            where_now = f"round {rounds}" if rounds else "the grid's cells"
            report(f"adaptive: {where_now} submitted; run `gridlab submit {grid} --adaptive` again once its jobs "
                   f"are done (or with --wait) to look at it and go on")
            return outcome
        with lock.run_lock(outcome.run_dir, "submit", wait=wait_lock, report=report), in_grid_file(grid):
            step = adaptive.advance(load_grid(grid))
        outcome.adaptive = step
        report(f"adaptive: {step.line}")
        if step.status == "stopped":
            return outcome


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: give at least 1 local worker (default: [local].workers)")


def check_run_dir(grid: str | Path, run_dir: Path, create: bool = False) -> None:
    """The run folder must be one gridlab can create and write, before anything runs: one line naming runs_dir."""

    probe = Path(run_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    why = None
    if not probe.is_dir():
        why = f"{probe} is a file, not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        why = f"{probe} is not writable by this user"
    elif create:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            why = error.strerror or str(error)
    if why:
        raise UserError(f"{grid}: runs_dir: cannot create the run folder {run_dir}: {why}")


def _triage_line(triage, only) -> str:
    line = (f"stages: {len(triage.done)} done (skipped), {len(triage.active)} running or queued "
            f"(left alone), {len(triage.failed) + len(triage.lingering)} failed (not resubmitted), "
            f"{len(triage.unknown)} unknown (left alone), {len(triage.to_run)} to run")
    if only is not None:
        line += f"; {len(triage.skipped)} not selected by --where"
    return line


def _stale_since_last_submit(run_dir: Path, the_plan) -> list[str]:
    """Inputs whose content changed under the previous submit's finished stages (nothing when there was none)."""

    if not RunPaths(run_dir).plan.exists():
        return []
    return stale_inputs(read_plan_record(run_dir), the_plan.inputs, run_dir)


def _record_reconciled(run_dir: Path, states: dict) -> None:
    """Write the job ids found by name after an interrupted submission into the stages' records."""

    for state in states.values():
        if state.reconciled and state.job_id:
            record = read_submission(run_dir, state.stage_id)
            extra = {k: v for k, v in record.items() if k not in OWN_KEYS}
            record_submission(run_dir, state.stage_id, state.backend, state.job_id, **extra)


# ------------------------------------------------------------------------------------------------------ status

def _durations(run_dir: Path, states: dict) -> dict[str, list[float]]:
    """Seconds each done stage took (first start → its done marker), by kind."""

    run = RunPaths(run_dir)
    durations: dict[str, list[float]] = {}
    for state in states.values():
        if state.status == "done" and state.started:
            try:
                finished = run.stage(state.stage_id).done_marker.stat().st_mtime
            except OSError:
                continue
            durations.setdefault(state.kind, []).append(max(0.0, finished - state.started))
    return durations


def progress_snapshot(run_dir: Path, stages: list[dict], to_train: int) -> dict[str, Any]:
    """Where a running submit is (what its live view shows): of ``stages`` (those it runs), how many are done,
    running and failed or cancelled, the tokens trained so far out of ``to_train`` (finished training stages'
    last progress records plus the running ones'), the ETA at the pace of the finished stages, and each running
    stage's latest progress (gridlab.progress)."""

    run = RunPaths(run_dir)
    states = stage_states(run_dir, stages)
    counts = {"done": 0, "running": 0, "failed": 0, "pending": 0}
    trained, running = 0, []
    for state in states.values():
        key = "failed" if state.status in ("failed", "cancelled") else state.status
        counts[key if key in counts else "pending"] += 1
        record = read_progress(run.stage(state.stage_id)) if state.kind in ("parent", "train") else None
        if record is not None and state.status in ("done", "running"):
            trained += int(record.get("trained") or 0)
        if state.status == "running":
            running.append({"stage_id": state.stage_id, "kind": state.kind, "progress": record})
    return {**counts, "total": len(stages), "trained": min(trained, to_train) if to_train else trained,
            "to_train": to_train, "eta_s": estimate_eta(run_dir, states), "running_stages": running}


def estimate_eta(run_dir: Path, states: dict) -> float | None:
    """Seconds until the stages still to finish (pending, running, unknown) are done, at the pace the finished ones
    went: each kind's mean duration, spread over as many stages as run now (at least one). None before any stage
    has finished."""
    durations = _durations(run_dir, states)
    every = [d for values in durations.values() for d in values]
    if not every:
        return None
    overall = sum(every) / len(every)
    mean = {kind: sum(values) / len(values) for kind, values in durations.items()}
    now = time.time()
    work = 0.0
    running = 0
    for state in states.values():
        if state.status in ("pending", "running", "unknown"):
            expected = mean.get(state.kind, overall)
            if state.status == "running":
                running += 1
                expected = max(0.0, expected - (now - state.started)) if state.started else expected
            work += expected
    return work / max(1, running)


def status(grid: str | Path, log_lines: int = 5, where: Iterable[str] = (), scheduler=None) -> dict[str, Any]:
    """Stage counts by kind × state, cell counts by state, progress with an ETA, the running stages with their
    latest training progress (gridlab.progress), who holds the run, the failed stages with their log tails and the
    unknown ones with why. ``where``: only that sub-grid. ``scheduler``: a
    gridlab.state.SchedulerCache (a watching status asks SLURM at most every 30 s)."""

    run_dir = run_dir_of(grid)
    if not RunPaths(run_dir).index.exists():
        raise _never_submitted(grid, run_dir)
    index = read_index(run_dir)
    stages = index["stages"]
    cell_stages = index["cell_eval_stages"]
    if where:
        record = _record(grid)
        stages = [{"id": s.id, "kind": s.kind, "deps": s.deps} for s in record.stages]
    states = stage_states(run_dir, stages, scheduler=scheduler)
    effective, _ = effective_states(stages, {sid: s.status for sid, s in states.items()})
    if where:
        parsed = _where(where, record.stages, record.cells)
        chosen = select_stages(parsed, record.stages, record.cells, {sid: s.status for sid, s in states.items()})
        cells = [c for c in record.cells if parsed.cell_matches(c)] if parsed.on_cells else record.cells
        cell_stages = [c.eval_stage for c in cells]
        if "state" in parsed.conditions:
            cell_stages = [s for s in cell_stages if effective[s] in parsed.conditions["state"]]
        if "kind" in parsed.conditions or "stage" in parsed.conditions:
            cell_stages = [s for s in cell_stages if s in chosen]
        states = {sid: state for sid, state in states.items() if sid in chosen}
    planned = {stage["kind"] for stage in index["stages"]}
    by_kind = {kind: {state: 0 for state in STATES} for kind in STAGE_KINDS
               if kind in planned or kind not in DATA_TASK_KINDS}
    for state in states.values():
        by_kind[state.kind][state.status] += 1
    cells = {state: 0 for state in STATES}
    for eval_stage in cell_stages:
        cells[effective[eval_stage]] += 1
    failed = [{"stage_id": s.stage_id, "kind": s.kind, "status": s.status, "job_id": s.job_id,
               "attempts": s.attempts, "error": s.error, "log_path": s.log_path,
               "log_tail": tail(s.log_path, log_lines)}
              for s in states.values() if s.status in ("failed", "cancelled")]
    unknown = [{"stage_id": s.stage_id, "kind": s.kind, "job_id": s.job_id, "error": s.error}
               for s in states.values() if s.status == "unknown"]
    done = sum(1 for s in states.values() if s.status == "done")
    running = [{"stage_id": s.stage_id, "kind": s.kind, "job_id": s.job_id,
                "progress": read_progress(RunPaths(run_dir).stage(s.stage_id))}
               for s in states.values() if s.status == "running"]
    holder = held_by(run_dir)

    record = _record(grid)
    stale = stale_inputs(record, current_inputs(record.grid), run_dir)
    return {"grid": index["grid"], "run_dir": str(run_dir), "stages": by_kind, "cells": cells, "failed": failed,
            "unknown": unknown, "running": running, "held_by": holder, "stale": stale,
            "progress": {"done": done, "total": len(states), "eta_s": estimate_eta(run_dir, states)},
            "adaptive": adaptive_status(run_dir)}


def adaptive_status(run_dir: Path) -> dict[str, Any] | None:
    """An adaptive study's rounds (gridlab.rounds) as status shows them; None for a fixed grid."""
    from gridlab.rounds import read_record

    record = read_record(run_dir)
    if record.design is None:
        return None
    return {"design": record.design.model_dump(), "tokens": record.tokens, "gpu_hours": record.gpu_hours,
            "rounds": [{"round": r.round, "what": r.summary, "cells": r.cells, "tokens": r.tokens,
                        "gpu_hours": r.gpu_hours, "verdicts": r.verdicts, "open": r.open} for r in record.rounds],
            "stopped": record.stopped.model_dump() if record.stopped else None}


# ------------------------------------------------------------------------------------------------------ cancel

def cancel(grid: str | Path, where: Iterable[str] = (), report: Callable[[str], None] = print):
    """scancel the grid's queued and running SLURM jobs and stop its local workers (or only ``where``'s), marking
    their stages cancelled; a local `submit` still running then starts none of the selected stages. A cell filter
    stops only the stages no unselected cell needs (gridlab.select.destructive_scope): the parent, a shared random
    twin or a trajectory other cells wait for keeps running. Fail closed: what could not be stopped is left as it
    was and listed in ``problems``. Returns gridlab.execute.CancelOutcome."""

    where = list(where or ())
    run_dir = run_dir_of(grid)
    record = _record(grid)
    parsed = _where(where, record.stages, record.cells)
    holder = lock.held_by(run_dir)
    name = (holder or {}).get("backend") or (holder or {}).get("executor")   # lock files of older versions: executor
    local_submit = bool(holder) and holder.get("command") == "submit" and backends.installed(name) and \
        backends.backend_class(name).finishes and lock.process_alive(holder.get("pid"), holder.get("host"),
                                                                     holder.get("pid_start"))
    # A submit whose backend runs the stages in it (local, debug) holds the run for as long as they run: cancel
    # works beside it, through the stages' records (its loop reads them). Otherwise cancel takes the lock, waiting
    # a little for a submit that only submits (slurm) to finish.
    run_lock = None if local_submit else lock.acquire(run_dir, "cancel", wait=True, timeout_s=60, report=report)
    try:
        states = stage_states(run_dir, record.stages)
        scope = destructive_scope(parsed, record.stages, record.cells, {s: st.status for s, st in states.items()})
        if where:
            report(scope.describe("cancel", where))
            unfinished = {sid: why for sid, why in scope.kept.items() if states[sid].status != "done"}
            for line in _kept_lines(record.stages, unfinished, "not cancelled"):
                report(line)
        outcome = execute.cancel_stages(run_dir, [states[sid] for sid in scope.acted], also_waiting=local_submit)
    finally:
        if run_lock is not None:
            run_lock.release()
    for problem in outcome.problems:
        report(f"warning: {problem}")
    return outcome


# ------------------------------------------------------------------------------------------------------ reset, clean

_KEPT_WHY = {"shared": "needed by cells not selected",
             "grid": "needed by every cell (a cell filter never touches them; --where kind=data or kind=parent does)",
             "filter": "left out by the stage keys"}


def _kept_lines(stages, kept: dict[str, str], verb: str = "kept") -> list[str]:
    """One line per reason a stage the selected cells need is left alone, with the kinds it leaves."""

    kind_of = {stage.id: stage.kind for stage in stages}
    lines = []
    for why, text in _KEPT_WHY.items():
        counts: dict[str, int] = {}
        for stage_id, reason in kept.items():
            if reason == why:
                counts[kind_of[stage_id]] = counts.get(kind_of[stage_id], 0) + 1
        if counts:
            lines.append(f"  {verb}, {text}: " + ", ".join(f"{k} {n}" for k, n in in_kind_order(counts)))
    return lines


def _losing_cells(stages, cells, removed: list[str]) -> int:

    removed = set(removed)
    return len({index for sid, users in cell_needs(stages, cells).items() if sid in removed for index in users})


def _confirm(removal, verb: str, yes: bool, confirm: Callable[[str], bool] | None) -> None:
    """Go on only when no finished work is lost, ``yes`` is given, or ``confirm`` (a terminal's question) says so."""
    if yes or not removal.loses_finished_work:
        return
    lost = removal.lost
    what = f"{lost.count} done stage(s), {lost.tokens:,} tokens trained"
    if confirm is None:
        raise UserError(f"{verb} would remove finished work ({what}) and there is no terminal to confirm it on; "
                        f"nothing was removed: add --yes (yes=True) to go on, or look first with --dry-run")
    if not confirm(f"{verb}: remove {what}?"):
        raise UserError(f"{verb} not confirmed; nothing was removed")


def reset(grid: str | Path, where: Iterable[str], dry_run: bool = False, yes: bool = False,
          confirm: Callable[[str], bool] | None = None, report: Callable[[str], None] = print):
    """Remove the outputs of ``where``'s stages and of everything downstream of them, so the next submit reruns
    them. A cell filter acts only on the stages no unselected cell needs (gridlab.select.destructive_scope); a
    stage filter on the stages it selects and everything downstream. ``report`` gets the summary first (the same
    with ``dry_run``): what is selected, stages by kind, bytes, the finished work lost, what is kept and why.
    Removing finished work needs ``yes=True`` or a ``confirm(question) -> bool`` that answers yes; otherwise a
    UserError, and nothing is removed. A selected stage somebody holds is a UserError (cancel it first). Returns
    gridlab.tidy.Removal."""

    from gridlab import tidy  # torch: see the note under the imports

    where = list(where or ())
    if not where:
        raise UserError("reset needs --where (e.g. --where method=wanda, or --where kind=data for everything)")
    run_dir = run_dir_of(grid)
    record = _record(grid)
    parsed = _where(where, record.stages, record.cells)
    held = contextlib.nullcontext() if dry_run else lock.run_lock(run_dir, "reset", report=report)
    with held:
        states = stage_states(run_dir, record.stages)
        scope = destructive_scope(parsed, record.stages, record.cells, {s: st.status for s, st in states.items()})
        removal = tidy.reset(run_dir, record.stages, scope.acted, states)
        report(scope.describe("reset", where))
        for line in removal.summary("reset"):
            report(line)
        if scope.by == "stages" and len(removal.stages) > len(scope.acted):
            report(f"  of them {len(removal.stages) - len(scope.acted)} downstream of the selected stage(s)")
        report(f"  cells that lose work: {_losing_cells(record.stages, record.cells, removal.stages)} of "
               f"{len(record.cells)}")
        removed = set(removal.stages)
        for line in _kept_lines(record.stages, {sid: why for sid, why in scope.kept.items() if sid not in removed}):
            report(line)
        if dry_run:
            return removal
        _confirm(removal, "reset", yes, confirm)
        removal.carry_out()
    return removal


def clean(grid: str | Path, dry_run: bool = False, all_checkpoints: bool = False, where: Iterable[str] = (),
          yes: bool = False, confirm: Callable[[str], bool] | None = None, report: Callable[[str], None] = print):
    """Remove stage folders and trajectories no longer in the plan and checkpoints finished stages do not need.
    With a grid file the plan is the grid's current one; with a run folder, the one last submitted. ``where``: only
    the checkpoints of the stages it selects (a cell filter: those no unselected cell needs). Removing finished
    work (a done stage or a trajectory the plan no longer has) needs ``yes`` or ``confirm``, as in ``reset``; a dry
    run writes nothing. Returns gridlab.tidy.Removal (``freed`` bytes)."""

    from gridlab import tidy  # torch: see the note under the imports

    where = list(where or ())
    run_dir = run_dir_of(grid)
    if not RunPaths(run_dir).root.is_dir():
        raise _never_submitted(grid, run_dir)
    if Path(grid).is_dir():
        record = _record(grid)
        stages, cells = record.stages, record.cells
    else:
        current = plan(grid)
        stages, cells = list(current.stages.values()), current.cells
    held = contextlib.nullcontext() if dry_run else lock.run_lock(run_dir, "clean", report=report)
    with held:
        states = stage_states(run_dir, stages)
        only = None
        if where:
            parsed = _where(where, stages, cells)
            scope = destructive_scope(parsed, stages, cells, {s: st.status for s, st in states.items()})
            only = scope.acted
            report(scope.describe("clean", where))
        removal = tidy.clean(run_dir, stages, states, all_checkpoints=all_checkpoints, only=only)
        for line in removal.summary("remove"):
            report(line)
        if dry_run:
            return removal
        _confirm(removal, "clean", yes, confirm)
        removal.carry_out()
    return removal


# ------------------------------------------------------------------------------------------------------ results

def ingest(grid: str | Path) -> dict[str, int]:
    """Rebuild the run's results.duckdb from its files (a new file swapped in: readers are never disturbed)."""
    from gridlab import db  # DuckDB, polars: see the note under the imports

    run_dir = run_dir_of(grid)
    record = _record(grid)
    return db.ingest(run_dir, stage_states(run_dir, record.stages, verify=True))


def _selected_cells(grid: str | Path, where: Iterable[str]) -> tuple[list[str], list[str]] | None:
    """Cell ids and stage ids a cell-level verb keeps; None without ``where``."""

    where = list(where or ())
    if not where:
        return None
    run_dir = run_dir_of(grid)
    record = _record(grid)
    parsed = _where(where, record.stages, record.cells)
    states = stage_states(run_dir, record.stages)
    effective, _ = effective_states(record.stages, {sid: s.status for sid, s in states.items()})
    cells = select_cells(parsed, record.cells, {c.cell_id: effective[c.eval_stage] for c in record.cells})
    plain = parsed.__class__({k: v for k, v in parsed.conditions.items() if k != "state"})
    stages = select_stages(plain, record.stages, record.cells)
    return [c.cell_id for c in cells], sorted(stages)


def _writable_output(out: Path, option: str, folder: bool) -> None:
    """``--out`` must be writable before anything is computed: a file (``folder`` False) that is not a folder, or a
    folder that is not a file, in a place this user can create and write."""

    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise UserError(f"{option} {out}: a file, not a folder; give a folder for the report")
    if not folder and out.is_dir():
        raise UserError(f"{option} {out}: a folder; give a file name, e.g. {out / 'cells.csv'}")
    probe = out if folder else out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{option} {out}: cannot be created: {probe} is a file, not a folder")
    target = out if out.exists() else probe
    if not os.access(target, os.W_OK) or (target.is_dir() and not os.access(target, os.X_OK)):
        raise UserError(f"{option} {out}: cannot write there ({target} is not writable by this user)")


def report(grid: str | Path, out: str | Path = "report", metric: str = "val_loss",
           where: Iterable[str] = (), pool: str = "model", margin: float | None = None) -> dict[str, Path]:
    """Ingest the results, then write the HTML and PDF report, its Markdown summary, verdicts.csv and
    predictions.csv (of ``where``'s cells only, when given); {"html", "summary", "verdicts", "predictions", "pdf":
    path}. ``pool``: the interval model ("model" or "none"); ``margin``: the equivalence margin in the metric's
    units, overriding the grid's ``[report] margin`` (docs/report.md)."""
    from gridlab.export import subset_database  # DuckDB, polars, the report: see the note under the imports
    from gridlab.report import build_report
    from gridlab.report.render import check_options

    _writable_output(Path(out), "--out", folder=True)
    check_options(pool, margin)
    ingest(grid)
    database = RunPaths(run_dir_of(grid)).database
    selected = _selected_cells(grid, where)
    if selected is None:
        return build_report(database, Path(out), metric=metric, pool=pool, margin=margin)
    with tempfile.TemporaryDirectory(prefix="gridlab-report-") as folder:
        subset = subset_database(database, Path(folder) / "results.duckdb", *selected)
        return build_report(subset, Path(out), metric=metric, pool=pool, margin=margin)


def export(grid: str | Path, out: str | Path, fmt: str | None = None, where: Iterable[str] = ()) -> dict[str, Any]:
    """Write the cells (``where``'s, or all) joined with their metrics to ``out`` as csv, parquet or json (default:
    from the file's suffix); ingests first. {"path", "rows", "cells"}."""
    from gridlab.export import FORMATS  # DuckDB, polars: see the note under the imports
    from gridlab.export import export as write_export

    _writable_output(Path(out), "--out", folder=False)
    fmt = fmt or Path(out).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise UserError(f"cannot tell the export format of {str(out)!r}; give --format "
                        f"({', '.join(FORMATS)}) or a file ending in one of them")
    ingest(grid)
    selected = _selected_cells(grid, where)
    return write_export(RunPaths(run_dir_of(grid)).database, Path(out), fmt,
                        None if selected is None else selected[0])


# ------------------------------------------------------------------------------------------------------ logs

def _log_stages(grid: str | Path, stage: str | None, where: Iterable[str]) -> list[tuple[str, Path, Path | None]]:
    """(stage id, its stage.log, its SLURM stdout when it has one) for one stage id (or unique prefix) or
    ``where``'s stages."""

    where = list(where or ())
    if (stage is None) == (not where):
        raise UserError("logs needs a stage id or --where (not both)")
    run_dir = run_dir_of(grid)
    record = _record(grid)
    if stage is not None:
        where = [f"stage={stage}"]
    parsed = _where(where, record.stages, record.cells)
    status = None
    if "state" in parsed.conditions:
        status = {sid: s.status for sid, s in stage_states(run_dir, record.stages).items()}
    chosen = select_stages(parsed, record.stages, record.cells, status)
    run = RunPaths(run_dir)
    found = []
    for s in record.stages:
        if s.id in chosen:
            submitted = read_submission(run_dir, s.id)
            slurm_log = submitted.get("slurm_log")
            found.append((s.id, run.stage(s.id).log, Path(slurm_log) if slurm_log else None))
    return found


def latest_progress(grid: str | Path, stage_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The latest progress record (gridlab.progress) of each of these stages that has one and is not done."""

    run = RunPaths(run_dir_of(grid))
    found = {}
    for stage_id in stage_ids:
        files = run.stage(stage_id)
        record = None if files.result.exists() else read_progress(files)
        if record is not None:
            found[stage_id] = record
    return found


def logs(grid: str | Path, stage: str | None = None, where: Iterable[str] = (),
         lines: int | None = None) -> list[tuple[str, Path, str]]:
    """The log of one stage (id or unique prefix) or of ``where``'s stages: [(stage id, path, text)], the last
    ``lines`` lines of each (all without). A stage without its own log yet shows its SLURM job's output (where a
    job that died before the stage started says why)."""

    shown = []
    for stage_id, log, slurm_log in _log_stages(grid, stage, where):
        path = log if log.exists() or slurm_log is None else slurm_log
        if lines is not None:
            text = "\n".join(tail(path, lines))
        else:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                text = ""
        shown.append((stage_id, path, text))
    return shown


def follow_logs(grid: str | Path, stage: str | None = None, where: Iterable[str] = (), poll_s: float = 1.0,
                stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[str, str]]:
    """Yield (stage id, new line) as the logs of one stage or of ``where``'s stages grow (like `tail -f`), until
    ``stop()`` is true."""
    files = _log_stages(grid, stage, where)
    offsets: dict[Path, int] = {}    # start at the end: what is there already has been shown (api.logs)
    for _, log, slurm_log in files:
        for path in (log, slurm_log):
            if path is not None and path.exists():
                offsets[path] = path.stat().st_size
    while True:
        for stage_id, log, slurm_log in files:
            for path in (log, slurm_log):
                if path is None:
                    continue
                try:
                    with open(path, "rb") as handle:
                        handle.seek(offsets.get(path, 0))
                        chunk = handle.read()
                except OSError:
                    continue
                complete = chunk[:chunk.rfind(b"\n") + 1]
                offsets[path] = offsets.get(path, 0) + len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    yield stage_id, line
        if stop():
            return
        time.sleep(poll_s)
