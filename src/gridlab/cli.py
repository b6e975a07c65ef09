"""The gridlab command: plan, submit, status, ingest, report.

Mistakes a user can make (a bad grid file, a missing run) are one line on stderr and exit code 2.
Heavy modules (torch, transformers) are imported inside the commands that need them, so `status` starts fast.
"""

from __future__ import annotations

import functools
import json
import time
import tomllib
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune-or-train-from-scratch experiment grids.")

DEFAULT_GRID = "grid.toml"


def _user_errors(command):
    """Turn ValueError (bad user input) into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ValueError as error:
            typer.echo(f"gridlab: {error}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def run_dir_of(grid: str) -> Path:
    """The run folder of a grid file (read without full validation, so status needs no torch) or a run folder."""
    path = Path(grid)
    if path.is_dir():
        return path
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"{path}: cannot read grid file ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    if not isinstance(raw.get("name"), str):
        raise ValueError(f"{path}: name: required key is missing")
    runs_dir = Path(raw.get("runs_dir", "runs"))
    return (runs_dir if runs_dir.is_absolute() else path.parent / runs_dir).resolve() / raw["name"]


@app.command()
@_user_errors
def plan(grid: str = typer.Argument(DEFAULT_GRID, help="grid file"),
         workers: Optional[int] = typer.Option(None, help="local workers for the time estimate")):
    """Print the matrix, stage counts, tokens to train and a time estimate. Submits nothing."""
    from gridlab.plan import build_plan, format_plan
    from gridlab.spec import load_grid

    typer.echo(format_plan(build_plan(load_grid(grid)), workers))


@app.command()
@_user_errors
def submit(grid: str = typer.Argument(DEFAULT_GRID, help="grid file"),
           executor: str = typer.Option("local", help="local | debug | slurm"),
           workers: Optional[int] = typer.Option(None, help="local workers (default: [local].workers)"),
           retry_failed: bool = typer.Option(False, "--retry-failed", help="resubmit failed and cancelled stages"),
           dry_run: bool = typer.Option(False, "--dry-run", help="show what would be submitted; change nothing"),
           wait: bool = typer.Option(False, "--wait", help="slurm: block until every stage has finished")):
    """Run (local, debug) or submit (slurm) every stage not yet done. Idempotent."""
    from gridlab import execute, store
    from gridlab.plan import build_plan, format_plan
    from gridlab.spec import load_grid

    if executor not in ("local", "debug", "slurm"):
        raise ValueError(f"unknown executor {executor!r}; valid executors: local, debug, slurm")
    spec = load_grid(grid)
    the_plan = build_plan(spec)
    run_dir = spec.run_dir
    states = execute.stage_states(run_dir, list(the_plan.stages.values()), verify=True)
    selection = execute.select(the_plan, states, retry_failed)
    typer.echo(format_plan(the_plan, workers))
    typer.echo(f"stages: {len(selection.done)} done (skipped), {len(selection.active)} running or queued "
               f"(left alone), {len(selection.failed)} failed (not resubmitted), {len(selection.to_run)} to run")
    for state in selection.failed:
        typer.echo(f"  {state.status} {state.kind} {state.stage_id}: {state.error or ''}  "
                   f"(resubmit with --retry-failed)")
    if dry_run:
        return
    execute.prepare(the_plan, run_dir)
    if not selection.to_run:
        store.ingest(run_dir, _scheduler_view(states))
        return
    chosen = execute.make_executor(executor, workers or spec.local.workers)
    if executor == "slurm":
        chosen.run(run_dir, the_plan, selection, states)
        if not wait:
            typer.echo(f"submitted; follow with: gridlab status {grid}")
            return
        states = execute.wait_for(run_dir, list(the_plan.stages.values()))
    else:
        chosen.run(run_dir, the_plan, selection)
        states = execute.stage_states(run_dir, list(the_plan.stages.values()))
    store.ingest(run_dir, _scheduler_view(states))
    failed = [s for s in states.values() if s.status in ("failed", "cancelled")]
    typer.echo(f"results in {run_dir / store.DATABASE}")
    if failed:
        typer.echo(f"{len(failed)} stage(s) failed; see: gridlab status {grid}", err=True)
        raise typer.Exit(1)


def _scheduler_view(states) -> dict[str, dict]:
    return {sid: {"status": s.status, "error": s.error} for sid, s in states.items()}


def collect_status(run_dir: Path, log_lines: int = 5) -> dict:
    """Stage counts by kind × state, cell counts, and the failed stages with their log tails."""
    from gridlab import execute, store

    index = store.read_index(run_dir)
    states = execute.stage_states(run_dir, index["stages"])
    by_kind = {kind: {state: 0 for state in store.STATES} for kind in store.STAGE_KINDS}
    for state in states.values():
        by_kind[state.kind][state.status] += 1
    effective, _ = store.effective_states(index["stages"], {sid: s.status for sid, s in states.items()})
    cells = {state: 0 for state in store.STATES}
    for eval_stage in index["cell_eval_stages"]:
        cells[effective[eval_stage]] += 1
    failed = [{"stage_id": s.stage_id, "kind": s.kind, "status": s.status, "job_id": s.job_id,
               "attempts": s.attempts, "error": s.error, "log_path": s.log_path,
               "log_tail": store.tail(s.log_path, log_lines)}
              for s in states.values() if s.status in ("failed", "cancelled")]
    return {"grid": index["grid"], "run_dir": str(run_dir), "stages": by_kind, "cells": cells, "failed": failed}


def format_status(report: dict) -> str:
    from gridlab import store

    lines = [f"grid {report['grid']} ({report['run_dir']})",
             "cells: " + ", ".join(f"{state} {count}" for state, count in report["cells"].items()),
             f"{'stage':8}" + "".join(f"{state:>11}" for state in store.STATES)]
    for kind, counts in report["stages"].items():
        lines.append(f"{kind:8}" + "".join(f"{counts[state]:>11}" for state in store.STATES))
    for failure in report["failed"]:
        lines.append(f"{failure['status']} {failure['kind']} {failure['stage_id']} (job {failure['job_id']}, "
                     f"{failure['attempts']} attempt(s)): {failure['error'] or ''}")
        lines.append(f"  log {failure['log_path']}")
        lines.extend(f"  | {line}" for line in failure["log_tail"])
    return "\n".join(lines)


@app.command()
@_user_errors
def status(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder"),
           watch: bool = typer.Option(False, "--watch", help="refresh every --interval seconds"),
           interval: float = typer.Option(5.0, help="seconds between refreshes with --watch"),
           as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
           lines: int = typer.Option(5, help="log lines shown per failed stage")):
    """Counts by stage kind × state, and the failed stages with the last lines of their logs."""
    run_dir = run_dir_of(grid)
    while True:
        report = collect_status(run_dir, lines)
        if as_json:
            typer.echo(json.dumps(report))
        else:
            if watch:
                typer.echo("\033[2J\033[H", nl=False)
            typer.echo(format_status(report))
        if not watch:
            return
        time.sleep(interval)


@app.command()
@_user_errors
def ingest(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder")):
    """Rebuild runs/<grid>/results.duckdb from the result files."""
    from gridlab import execute, store

    run_dir = run_dir_of(grid)
    states = execute.stage_states(run_dir, store.read_plan(run_dir)["stages"])
    counts = store.ingest(run_dir, _scheduler_view(states))
    typer.echo(f"{run_dir / store.DATABASE}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command()
@_user_errors
def report(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder"),
           out: Path = typer.Option(Path("report"), "--out", help="folder for the report"),
           metric: str = typer.Option("val_loss", help="headline metric")):
    """Ingest the results, then write the HTML/PDF report."""
    from gridlab import execute, store
    from gridlab.report import build_report

    run_dir = run_dir_of(grid)
    states = execute.stage_states(run_dir, store.read_plan(run_dir)["stages"])
    store.ingest(run_dir, _scheduler_view(states))
    for kind, path in build_report(run_dir / store.DATABASE, out, metric=metric).items():
        typer.echo(f"{kind}: {path}")

