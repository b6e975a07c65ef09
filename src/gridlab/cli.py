"""The gridlab command: parse arguments, call gridlab.api, print what it returns.

A user's mistake (gridlab.errors.UserError) is one line on stderr and exit code 2; anything else is a bug and
prints its traceback (exit 1). `gridlab --debug …` or GRIDLAB_DEBUG=1 shows the traceback of user errors too.
Heavy modules (torch, transformers) are imported inside the commands that need them, so `status` starts fast.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Optional

import typer

from gridlab import api
from gridlab.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune-or-train-from-scratch experiment grids.")

DEFAULT_GRID = "grid.toml"


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="show tracebacks of user errors too")):
    if debug:
        os.environ["GRIDLAB_DEBUG"] = "1"


def _user_errors(command):
    """Turn UserError into one line on stderr and exit code 2 (unless debugging); bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            if os.environ.get("GRIDLAB_DEBUG"):
                raise
            typer.echo(f"gridlab: {error}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_user_errors
def plan(grid: str = typer.Argument(DEFAULT_GRID, help="grid file"),
         workers: Optional[int] = typer.Option(None, help="local workers for the time estimate")):
    """Print the matrix, stage counts, tokens to train and a time estimate. Submits nothing."""
    from gridlab.plan import format_plan

    typer.echo(format_plan(api.plan(grid), workers))


@app.command()
@_user_errors
def submit(grid: str = typer.Argument(DEFAULT_GRID, help="grid file"),
           executor: str = typer.Option("local", help="local | debug | slurm"),
           workers: Optional[int] = typer.Option(None, help="local workers (default: [local].workers)"),
           retry_failed: bool = typer.Option(False, "--retry-failed", help="resubmit failed and cancelled stages"),
           dry_run: bool = typer.Option(False, "--dry-run", help="show what would be submitted; change nothing"),
           wait: bool = typer.Option(False, "--wait", help="slurm: block until every stage has finished")):
    """Run (local, debug) or submit (slurm) every stage not yet done. Idempotent."""
    outcome = api.submit(grid, executor=executor, workers=workers, retry_failed=retry_failed, dry_run=dry_run,
                         wait=wait, report=typer.echo)
    if dry_run:
        return
    if outcome.submitted and not wait:
        typer.echo(f"submitted; follow with: gridlab status {grid}")
        return
    from gridlab.layout import RunPaths

    typer.echo(f"results in {RunPaths(outcome.run_dir).database}")
    if not outcome.ok:
        typer.echo(f"{len(outcome.failed)} stage(s) failed; see: gridlab status {grid}", err=True)
        raise typer.Exit(1)


def format_status(report: dict) -> str:
    from gridlab.state import STATES

    lines = [f"grid {report['grid']} ({report['run_dir']})",
             "cells: " + ", ".join(f"{state} {count}" for state, count in report["cells"].items()),
             f"{'stage':8}" + "".join(f"{state:>11}" for state in STATES)]
    for kind, counts in report["stages"].items():
        lines.append(f"{kind:8}" + "".join(f"{counts[state]:>11}" for state in STATES))
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
    while True:
        report = api.status(grid, lines)
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
    from gridlab.layout import RunPaths

    counts = api.ingest(grid)
    typer.echo(f"{RunPaths(api.run_dir_of(grid)).database}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command()
@_user_errors
def report(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder"),
           out: Path = typer.Option(Path("report"), "--out", help="folder for the report"),
           metric: str = typer.Option("val_loss", help="headline metric")):
    """Ingest the results, then write the HTML/PDF report."""
    for kind, path in api.report(grid, out=out, metric=metric).items():
        typer.echo(f"{kind}: {path}")
