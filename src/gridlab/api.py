"""gridlab as a library: every `gridlab` command, callable from a notebook or a sweep script.

    import gridlab.api as gl
    outcome = gl.submit("grid.toml", where=["method=wanda"])   # run (local) or submit (slurm) what is not done
    outcome.exit_code                                         # 0 on its way, 1 failed/blocked, 3 unknown
    gl.status("grid.toml")["cells"]                           # {"pending": …, "running": …, "done": …, …}
    gl.cancel("grid.toml", where=["kind=train"])              # scancel / stop workers, mark cancelled
    gl.reset("grid.toml", where=["method=wanda"], dry_run=True)
    gl.clean("grid.toml")                                     # orphans and unneeded checkpoints; bytes freed
    gl.export("grid.toml", "cells.parquet", fmt="parquet")
    gl.logs("grid.toml", where=["state=failed"])              # [(stage id, log path, text)]
    gl.report("grid.toml", out="report")                      # {"html": …, "pdf": …}

``where`` takes the CLI's --where expressions (gridlab.select). Mistakes a user can make raise
gridlab.errors.UserError with one line; the CLI only parses arguments, calls these and prints what they return.
Commands that change a run folder (submit, cancel, reset, clean) hold its lock (gridlab.lock); readers (status,
report, export, logs) never take it.
"""

from __future__ import annotations

import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridlab.errors import UserError

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
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as error:
        raise UserError(f"{path}: cannot read grid file ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML: {error}") from None
    if not isinstance(raw.get("name"), str):
        raise UserError(f"{path}: name: required key is missing")
    runs_dir = Path(raw.get("runs_dir", "runs"))
    return (runs_dir if runs_dir.is_absolute() else path.parent / runs_dir).resolve() / raw["name"]


def plan(grid: str | Path):
    """The validated grid's plan (gridlab.plan.Plan): cells, stages, token counts. Submits nothing."""
    from gridlab.plan import build_plan
    from gridlab.spec import load_grid

    return build_plan(load_grid(grid))


def _record(grid: str | Path):
    """What the run folder holds: the submitted plan (stages, cells)."""
    from gridlab.planfile import read_plan_record

    return read_plan_record(run_dir_of(grid))


def _where(where: Iterable[str], stages, cells):
    from gridlab.select import parse_where

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
           report: Callable[[str], None] = print) -> SubmitOutcome:
    """Run (local, debug) or submit (slurm) every stage of the grid (or of ``where``'s sub-grid, with what it needs
    upstream) that is not done; idempotent.

    ``report`` receives the progress lines. With ``dry_run`` nothing is written and no lock is taken. ``wait``
    (slurm) blocks until every submitted stage has finished. ``wait_lock``: wait for another submitter holding the
    run instead of raising. The database is rebuilt whenever stages have finished.
    """
    from gridlab import db, execute, lock
    from gridlab.plan import format_plan
    from gridlab.select import select_stages
    from gridlab.state import stage_states

    if executor not in execute.EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; valid executors: {', '.join(execute.EXECUTORS)}")
    the_plan = plan(grid)
    run_dir = the_plan.spec.run_dir
    stages = list(the_plan.stages.values())
    parsed = _where(where, stages, the_plan.cells)
    run_lock = None if dry_run else lock.acquire(run_dir, "submit", wait=wait_lock, report=report,
                                                 executor=executor)
    try:
        states = stage_states(run_dir, stages, verify=True)
        only = None
        if parsed:
            only = select_stages(parsed, stages, the_plan.cells, {s: st.status for s, st in states.items()},
                                 upstream=True)
        selection = execute.select(the_plan, states, retry_failed, only)
        outcome = SubmitOutcome(run_dir=run_dir, plan=the_plan, done=selection.done, active=selection.active,
                                failed=selection.failed + selection.lingering, unknown=selection.unknown,
                                selected=len(stages) if only is None else len(only))
        report(format_plan(the_plan, workers))
        for line in _stale_since_last_submit(run_dir, the_plan):
            report(f"  warning: {line}")
        report(_selection_line(selection, only))
        for state in selection.failed:
            report(f"  {state.status} {state.kind} {state.stage_id}: {state.error or ''}  "
                   f"(resubmit with --retry-failed)")
        for state in selection.lingering:
            report(f"  {state.status} {state.kind} {state.stage_id}: {state.error or ''}")
        for state in selection.unknown:
            report(f"  warning: unknown {state.kind} {state.stage_id}: {state.error or ''}  (left alone)")
        if dry_run:
            return outcome
        _record_reconciled(run_dir, states)
        execute.prepare(the_plan, run_dir)
        if selection.to_run:
            chosen = execute.make_executor(executor, workers or the_plan.spec.local.workers, report)
            outcome.ran = chosen.run(run_dir, the_plan, selection, states)
            if not chosen.finishes:
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


def _selection_line(selection, only) -> str:
    line = (f"stages: {len(selection.done)} done (skipped), {len(selection.active)} running or queued "
            f"(left alone), {len(selection.failed) + len(selection.lingering)} failed (not resubmitted), "
            f"{len(selection.unknown)} unknown (left alone), {len(selection.to_run)} to run")
    if only is not None:
        line += f"; {len(selection.skipped)} not selected by --where"
    return line


def _stale_since_last_submit(run_dir: Path, the_plan) -> list[str]:
    """Inputs whose content changed under the previous submit's finished stages (nothing when there was none)."""
    from gridlab.layout import RunPaths
    from gridlab.planfile import read_plan_record, stale_inputs

    if not RunPaths(run_dir).plan.exists():
        return []
    return stale_inputs(read_plan_record(run_dir), the_plan.inputs, run_dir)


def _record_reconciled(run_dir: Path, states: dict) -> None:
    """Write the job ids found by name after an interrupted submission into the stages' records."""
    from gridlab.execute import record_submission
    from gridlab.layout import RunPaths
    from gridlab.results import read_json

    for state in states.values():
        if state.reconciled and state.job_id:
            record = read_json(RunPaths(run_dir).stage(state.stage_id).submit) or {}
            extra = {k: v for k, v in record.items() if k not in (
                "executor", "job_id", "host", "pid", "pid_start", "submitted_at", "log_path")}
            record_submission(run_dir, state.stage_id, "slurm", state.job_id, **extra)


# ------------------------------------------------------------------------------------------------------ status

def _durations(run_dir: Path, states: dict) -> dict[str, list[float]]:
    """Seconds each done stage took (first start → its done marker), by kind."""
    from gridlab.layout import RunPaths

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
    """Stage counts by kind × state, cell counts by state, progress with an ETA, who holds the run, the failed
    stages with their log tails and the unknown ones with why. ``where``: only that sub-grid. ``scheduler``: a
    gridlab.state.SchedulerCache (a watching status asks SLURM at most every 30 s)."""
    from gridlab.contracts import DATA_TASK_KINDS, STAGE_KINDS
    from gridlab.lock import held_by
    from gridlab.planfile import read_index
    from gridlab.results import tail
    from gridlab.select import select_stages
    from gridlab.state import STATES, effective_states, stage_states

    run_dir = run_dir_of(grid)
    index = read_index(run_dir)
    stages = index["stages"]
    cell_stages = index["cell_eval_stages"]
    if where:
        record = _record(run_dir)
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
    holder = held_by(run_dir)
    from gridlab.planfile import current_inputs, stale_inputs

    record = _record(run_dir)
    stale = stale_inputs(record, current_inputs(record.grid), run_dir)
    return {"grid": index["grid"], "run_dir": str(run_dir), "stages": by_kind, "cells": cells, "failed": failed,
            "unknown": unknown, "held_by": holder, "stale": stale,
            "progress": {"done": done, "total": len(states), "eta_s": estimate_eta(run_dir, states)}}


# ------------------------------------------------------------------------------------------------------ cancel

def cancel(grid: str | Path, where: Iterable[str] = (), report: Callable[[str], None] = print):
    """scancel the grid's queued and running SLURM jobs and stop its local workers (or only ``where``'s), marking
    their stages cancelled; a local `submit` still running then starts none of the selected stages. Fail closed:
    what could not be stopped is left as it was and listed in ``problems``. Returns gridlab.execute.CancelOutcome."""
    from gridlab import execute, lock
    from gridlab.select import select_stages
    from gridlab.state import stage_states

    run_dir = run_dir_of(grid)
    record = _record(run_dir)
    parsed = _where(where, record.stages, record.cells)
    holder = lock.held_by(run_dir)
    local_submit = bool(holder) and holder.get("command") == "submit" and holder.get("executor") in (
        "local", "debug") and lock.process_alive(holder.get("pid"), holder.get("host"), holder.get("pid_start"))
    # A local submit holds the run for as long as it runs: cancel works beside it, through the stages' records
    # (its loop reads them). Otherwise cancel takes the lock, waiting a little for a slurm submit to finish.
    run_lock = None if local_submit else lock.acquire(run_dir, "cancel", wait=True, timeout_s=60, report=report)
    try:
        states = stage_states(run_dir, record.stages)
        chosen = select_stages(parsed, record.stages, record.cells, {s: st.status for s, st in states.items()})
        outcome = execute.cancel_stages(run_dir, [states[sid] for sid in chosen], also_waiting=local_submit)
    finally:
        if run_lock is not None:
            run_lock.release()
    for problem in outcome.problems:
        report(f"warning: {problem}")
    return outcome


# ------------------------------------------------------------------------------------------------------ reset, clean

def reset(grid: str | Path, where: Iterable[str], dry_run: bool = False, report: Callable[[str], None] = print):
    """Remove the outputs of ``where``'s stages and of everything downstream of them, so the next submit reruns
    them; a selected stage somebody holds is a UserError (cancel it first). Returns gridlab.tidy.Removal."""
    from gridlab import lock, tidy
    from gridlab.select import select_stages
    from gridlab.state import stage_states

    where = list(where or ())
    if not where:
        raise UserError("reset needs --where (e.g. --where method=wanda, or --where kind=data for everything)")
    run_dir = run_dir_of(grid)
    record = _record(run_dir)
    parsed = _where(where, record.stages, record.cells)
    with lock.run_lock(run_dir, "reset", report=report):
        states = stage_states(run_dir, record.stages)
        chosen = select_stages(parsed, record.stages, record.cells, {s: st.status for s, st in states.items()})
        return tidy.reset(run_dir, record.stages, chosen, states, dry_run=dry_run)


def clean(grid: str | Path, dry_run: bool = False, all_checkpoints: bool = False,
          report: Callable[[str], None] = print):
    """Remove stage folders and trajectories no longer in the plan and checkpoints finished stages do not need.
    With a grid file the plan is the grid's current one; with a run folder, the one last submitted. Returns
    gridlab.tidy.Removal (``freed`` bytes)."""
    from gridlab import lock, tidy
    from gridlab.state import stage_states

    run_dir = run_dir_of(grid)
    stages = list(plan(grid).stages.values()) if not Path(grid).is_dir() else _record(run_dir).stages
    with lock.run_lock(run_dir, "clean", report=report):
        states = stage_states(run_dir, stages)
        return tidy.clean(run_dir, stages, states, dry_run=dry_run, all_checkpoints=all_checkpoints)


# ------------------------------------------------------------------------------------------------------ results

def ingest(grid: str | Path) -> dict[str, int]:
    """Rebuild the run's results.duckdb from its files (a new file swapped in: readers are never disturbed)."""
    from gridlab import db
    from gridlab.state import stage_states

    run_dir = run_dir_of(grid)
    record = _record(run_dir)
    return db.ingest(run_dir, stage_states(run_dir, record.stages, verify=True))


def _selected_cells(grid: str | Path, where: Iterable[str]) -> tuple[list[str], list[str]] | None:
    """Cell ids and stage ids a cell-level verb keeps; None without ``where``."""
    from gridlab.select import select_cells, select_stages
    from gridlab.state import effective_states, stage_states

    where = list(where or ())
    if not where:
        return None
    run_dir = run_dir_of(grid)
    record = _record(run_dir)
    parsed = _where(where, record.stages, record.cells)
    states = stage_states(run_dir, record.stages)
    effective, _ = effective_states(record.stages, {sid: s.status for sid, s in states.items()})
    cells = select_cells(parsed, record.cells, {c.cell_id: effective[c.eval_stage] for c in record.cells})
    plain = parsed.__class__({k: v for k, v in parsed.conditions.items() if k != "state"})
    stages = select_stages(plain, record.stages, record.cells)
    return [c.cell_id for c in cells], sorted(stages)


def report(grid: str | Path, out: str | Path = "report", metric: str = "val_loss",
           where: Iterable[str] = (), pool: str = "seeds") -> dict[str, Path]:
    """Ingest the results, then write the HTML and PDF report, its Markdown summary and predictions.csv (of
    ``where``'s cells only, when given); {"html": path, "summary": path, "pdf": path, "predictions": path}.
    ``pool``: how gap intervals pool their spread ("none", "seeds", "ratios"; docs/report.md)."""
    from gridlab.export import subset_database
    from gridlab.layout import RunPaths
    from gridlab.report import build_report

    ingest(grid)
    database = RunPaths(run_dir_of(grid)).database
    selected = _selected_cells(grid, where)
    if selected is None:
        return build_report(database, Path(out), metric=metric, pool=pool)
    with tempfile.TemporaryDirectory(prefix="gridlab-report-") as folder:
        subset = subset_database(database, Path(folder) / "results.duckdb", *selected)
        return build_report(subset, Path(out), metric=metric, pool=pool)


def export(grid: str | Path, out: str | Path, fmt: str | None = None, where: Iterable[str] = ()) -> dict[str, Any]:
    """Write the cells (``where``'s, or all) joined with their metrics to ``out`` as csv, parquet or json (default:
    from the file's suffix); ingests first. {"path", "rows", "cells"}."""
    from gridlab.export import FORMATS
    from gridlab.export import export as write_export
    from gridlab.layout import RunPaths

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
    from gridlab.layout import RunPaths
    from gridlab.results import read_json
    from gridlab.select import select_stages
    from gridlab.state import stage_states

    where = list(where or ())
    if (stage is None) == (not where):
        raise UserError("logs needs a stage id or --where (not both)")
    run_dir = run_dir_of(grid)
    record = _record(run_dir)
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
            submitted = read_json(run.stage(s.id).submit) or {}
            slurm_log = submitted.get("slurm_log")
            found.append((s.id, run.stage(s.id).log, Path(slurm_log) if slurm_log else None))
    return found


def logs(grid: str | Path, stage: str | None = None, where: Iterable[str] = (),
         lines: int | None = None) -> list[tuple[str, Path, str]]:
    """The log of one stage (id or unique prefix) or of ``where``'s stages: [(stage id, path, text)], the last
    ``lines`` lines of each (all without). A stage without its own log yet shows its SLURM job's output (where a
    job that died before the stage started says why)."""
    from gridlab.results import tail

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
