"""gridlab as a library: what the `gridlab` command does, callable from a notebook or a sweep script.

    import gridlab
    outcome = gridlab.submit("grid.toml")            # run (local) or submit (slurm) every stage not yet done
    gridlab.status("grid.toml")["cells"]             # {"pending": …, "running": …, "done": …, …}
    gridlab.report("grid.toml", out="report")        # {"html": …, "pdf": …}

Mistakes a user can make raise gridlab.errors.UserError with one line; the CLI only parses arguments, calls these
and prints what they return.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridlab.errors import UserError


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


@dataclass
class SubmitOutcome:
    """What one `submit` did. ``ok`` is False when the grid is not on its way to complete."""

    run_dir: Path
    plan: Any
    done: list[str] = field(default_factory=list)        # skipped: already done
    active: list[str] = field(default_factory=list)      # left alone: queued or running elsewhere
    failed: list[Any] = field(default_factory=list)      # StageState of failed/cancelled stages not resubmitted
    ran: dict[str, str] = field(default_factory=dict)    # stage id → what happened this call
    submitted: bool = False                              # slurm: jobs were submitted and are still running

    @property
    def ok(self) -> bool:
        return not self.failed and all(status in ("done", "submitted") for status in self.ran.values())


def submit(grid: str | Path, executor: str = "local", workers: int | None = None, retry_failed: bool = False,
           dry_run: bool = False, wait: bool = False, report: Callable[[str], None] = print) -> SubmitOutcome:
    """Run (local, debug) or submit (slurm) every stage of the grid that is not done; idempotent.

    ``report`` receives the progress lines. With ``dry_run`` nothing is written. ``wait`` (slurm) blocks until
    every submitted stage has finished. The database is rebuilt whenever stages have finished.
    """
    from gridlab import db, execute
    from gridlab.plan import format_plan
    from gridlab.state import stage_states

    if executor not in execute.EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; valid executors: {', '.join(execute.EXECUTORS)}")
    the_plan = plan(grid)
    run_dir = the_plan.spec.run_dir
    states = stage_states(run_dir, list(the_plan.stages.values()), verify=True)
    selection = execute.select(the_plan, states, retry_failed)
    outcome = SubmitOutcome(run_dir=run_dir, plan=the_plan, done=selection.done, active=selection.active,
                            failed=selection.failed)
    report(format_plan(the_plan, workers))
    report(f"stages: {len(selection.done)} done (skipped), {len(selection.active)} running or queued "
           f"(left alone), {len(selection.failed)} failed (not resubmitted), {len(selection.to_run)} to run")
    for state in selection.failed:
        report(f"  {state.status} {state.kind} {state.stage_id}: {state.error or ''}  (resubmit with --retry-failed)")
    if dry_run:
        return outcome
    execute.prepare(the_plan, run_dir)
    stages = list(the_plan.stages.values())
    if selection.to_run:
        chosen = execute.make_executor(executor, workers or the_plan.spec.local.workers, report)
        outcome.ran = chosen.run(run_dir, the_plan, selection, states)
        if not chosen.finishes:
            outcome.submitted = True
            if not wait:
                return outcome
            execute.wait_for(run_dir, stages, report)
        states = stage_states(run_dir, stages, verify=True)
    db.ingest(run_dir, states)
    outcome.failed = [s for s in states.values() if s.status in ("failed", "cancelled")]
    return outcome


def status(grid: str | Path, log_lines: int = 5) -> dict[str, Any]:
    """Stage counts by kind × state, cell counts by state, and the failed stages with their log tails."""
    from gridlab.contracts import STAGE_KINDS
    from gridlab.plan import read_index
    from gridlab.results import tail
    from gridlab.state import STATES, effective_states, stage_states

    run_dir = run_dir_of(grid)
    index = read_index(run_dir)
    states = stage_states(run_dir, index["stages"])
    by_kind = {kind: {state: 0 for state in STATES} for kind in STAGE_KINDS}
    for state in states.values():
        by_kind[state.kind][state.status] += 1
    effective, _ = effective_states(index["stages"], {sid: s.status for sid, s in states.items()})
    cells = {state: 0 for state in STATES}
    for eval_stage in index["cell_eval_stages"]:
        cells[effective[eval_stage]] += 1
    failed = [{"stage_id": s.stage_id, "kind": s.kind, "status": s.status, "job_id": s.job_id,
               "attempts": s.attempts, "error": s.error, "log_path": s.log_path,
               "log_tail": tail(s.log_path, log_lines)}
              for s in states.values() if s.status in ("failed", "cancelled")]
    return {"grid": index["grid"], "run_dir": str(run_dir), "stages": by_kind, "cells": cells, "failed": failed}


def ingest(grid: str | Path) -> dict[str, int]:
    """Rebuild the run's results.duckdb from its files; row counts."""
    from gridlab import db
    from gridlab.plan import read_plan_record
    from gridlab.state import stage_states

    run_dir = run_dir_of(grid)
    record = read_plan_record(run_dir)
    return db.ingest(run_dir, stage_states(run_dir, record.stages, verify=True))


def report(grid: str | Path, out: str | Path = "report", metric: str = "val_loss") -> dict[str, Path]:
    """Ingest the results, then write the HTML and PDF report; {"html": path, "pdf": path}."""
    from gridlab.layout import RunPaths
    from gridlab.report import build_report

    ingest(grid)
    return build_report(RunPaths(run_dir_of(grid)).database, Path(out), metric=metric)
