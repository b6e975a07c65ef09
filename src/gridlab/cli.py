"""The gridlab command: parse arguments, call gridlab.api, print what it returns.

A user's mistake (gridlab.errors.UserError) is one line on stderr and exit code 2; anything else is a bug and
prints its traceback (exit 1). `gridlab --debug …` or GRIDLAB_DEBUG=1 shows the traceback of user errors too.
Heavy modules (torch, transformers, DuckDB) are imported inside gridlab.api's commands that need them, so `status`
starts fast (tests/test_cli.py checks that it loads no torch).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from gridlab import api, backends
from gridlab.errors import UserError
from gridlab.layout import RunPaths
from gridlab.lock import describe
from gridlab.progress import format_progress
from gridlab.state import STATES, SchedulerCache
from gridlab.units import duration

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune-or-train-from-scratch experiment grids.")

DEFAULT_GRID = "grid.toml"
WHERE_HELP = ("select a sub-grid: KEY=VALUE[,VALUE…] with KEY one of method, granularity, ratio, init, lr, budget, "
              "setting, seed, kind, state, stage; repeat for more conditions (all must hold)")

SUBMIT_HELP = """Run (local, debug) or submit (slurm) every stage not yet done. Idempotent.

Exit codes: 0 every selected stage is done, or queued/running with nothing failed, blocked or unknown;
1 a stage failed, was cancelled or is blocked by one (see `gridlab status`; rerun with --retry-failed);
2 a user error (bad grid or option, or the run is held by another submitter: --wait-lock waits);
3 nothing failed but some stages' state is unknown (the scheduler did not answer; nothing was resubmitted);
130 interrupted (Ctrl-C)."""


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="show tracebacks of user errors too")):
    if debug:
        os.environ["GRIDLAB_DEBUG"] = "1"


def _user_errors(command):
    """Turn UserError into one line on stderr and exit code 2 (unless debugging); bugs keep their traceback;
    Ctrl-C exits 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            if os.environ.get("GRIDLAB_DEBUG"):
                raise
            typer.echo(f"gridlab: {error}", err=True)
            raise typer.Exit(api.EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            if os.environ.get("GRIDLAB_DEBUG"):
                raise
            typer.echo("gridlab: interrupted", err=True)
            raise typer.Exit(130) from None
        except OSError as error:
            # A full disk under gridlab's own bookkeeping (a stage that hits it fails with its own line: stages.
            # disk_full): what happened and what to do, not a traceback. Finished stages are on disk and stay done.
            if error.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("GRIDLAB_DEBUG"):
                raise
            typer.echo(f"gridlab: no space left on the disk ({error.filename or 'writing a record'}): finished "
                       f"stages are kept; free space (`gridlab clean` removes what the run no longer needs) and run "
                       f"the command again", err=True)
            raise typer.Exit(1) from None

    return wrapper


Where = Annotated[list[str] | None, typer.Option("--where", help=WHERE_HELP)]
DEFAULT_REPORT = Path("report")


@app.command()
@_user_errors
def plan(grid: str = typer.Argument(DEFAULT_GRID, help="grid file"),
         workers: int | None = typer.Option(None, help="local workers for the time estimate"),
         where: Where = None):
    """Print the matrix, stage counts, tokens to train and a time estimate. Submits nothing.

    The time comes from measured throughput: this run's finished training stages, else a short measurement of the
    parent's shape on this host (cached); the plan says which. --where: also the sub-grid's cells, tokens, time."""
    typer.echo(api.plan_text(grid, workers, where=where))


class SubmitView:
    """What `gridlab submit` shows while its stages run. On a terminal: a live panel (rich) redrawn every second
    under the lines the executor prints — stages done, running and failed of those it runs, tokens trained of those
    to train, the ETA, and each running stage's latest training progress. Otherwise (a pipe, a log file, the
    tests): plain lines, one "progress:" line every ``GRIDLAB_PROGRESS_EVERY_S`` seconds (default 30) with the
    running training stages' progress below it."""

    def __init__(self, live: bool):
        self.live = live
        self.console = None

    def line(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False)
        else:
            typer.echo(text)

    def __call__(self, run_dir: Path, stages: list[dict], to_train: int):

        @contextlib.contextmanager
        def watching():
            stop = threading.Event()
            live = None
            if self.live:

                live = Live(self._panel(None), auto_refresh=False, transient=True)
                live.start()
                self.console = live.console
            every = 1.0 if self.live else float(os.environ.get("GRIDLAB_PROGRESS_EVERY_S", "30"))

            def loop():
                while not stop.wait(every):
                    try:
                        snapshot = api.progress_snapshot(run_dir, stages, to_train)
                    except Exception:   # a view must never end a run
                        continue
                    if live is not None:
                        live.update(self._panel(snapshot), refresh=True)
                    elif snapshot["running"]:
                        for text in self._plain(snapshot):
                            typer.echo(text)

            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join(timeout=5)
                if live is not None:
                    live.stop()
                    self.console = None

        return watching()

    @staticmethod
    def _summary(snapshot: dict) -> str:
        tokens = (f"; {snapshot['trained']:,} of {snapshot['to_train']:,} tokens trained"
                  if snapshot["to_train"] else "")
        return (f"progress: {snapshot['done']}/{snapshot['total']} stages done, {snapshot['running']} running, "
                f"{snapshot['failed']} failed{tokens}; ETA {_eta(snapshot['eta_s'])}")

    def _plain(self, snapshot: dict) -> list[str]:

        lines = [f"{time.strftime('%H:%M:%S')} {self._summary(snapshot)}"]
        lines += [f"  {r['kind']} {r['stage_id'][:12]}: {format_progress(r['progress'])}"
                  for r in snapshot["running_stages"] if r["progress"]]
        return lines

    def _panel(self, snapshot: dict | None):


        if snapshot is None:
            return Text("starting workers…")
        parts = [Text(self._summary(snapshot)),
                 ProgressBar(total=max(1, snapshot["total"]), completed=snapshot["done"], width=60)]
        if snapshot["to_train"]:
            parts.append(ProgressBar(total=snapshot["to_train"], completed=snapshot["trained"], width=60))
        for running in snapshot["running_stages"][:12]:
            detail = format_progress(running["progress"]) if running["progress"] else "running"
            parts.append(Text(f"  {running['kind']:6} {running['stage_id'][:12]}  {detail}", style="cyan"))
        return Group(*parts)


@app.command(help=SUBMIT_HELP)
@_user_errors
def submit(grid: str = typer.Argument(DEFAULT_GRID, help="grid file"),
           executor: str = typer.Option("local", help="where the stages run: " + " | ".join(backends.names())),
           workers: int | None = typer.Option(None, help="local workers (default: [local].workers)"),
           retry_failed: bool = typer.Option(False, "--retry-failed",
                                             help="resubmit failed and cancelled stages (never unknown ones)"),
           dry_run: bool = typer.Option(False, "--dry-run", help="show what would be submitted; change nothing"),
           wait: bool = typer.Option(False, "--wait", help="slurm: block until every stage has finished"),
           wait_lock: bool = typer.Option(False, "--wait-lock",
                                          help="wait for another submitter holding this run instead of exiting 2"),
           where: Where = None,
           adaptive: bool = typer.Option(False, "--adaptive",
                                         help="an adaptive study ([adaptive] in the grid): once every cell is done, "
                                              "rounds add seeds where verdicts are inconclusive and budgets where "
                                              "crossovers are bracketed; slurm: one round per call (--wait: all)")):
    view = SubmitView(live=sys.stdout.isatty())
    outcome = api.submit(grid, executor=executor, workers=workers, retry_failed=retry_failed, dry_run=dry_run,
                         wait=wait, where=where, wait_lock=wait_lock, report=view.line, watch=view,
                         adaptive=adaptive)
    if not dry_run:
        if outcome.submitted and not wait:
            typer.echo(f"submitted; follow with: gridlab status {grid} --watch")
        else:

            typer.echo(f"results in {RunPaths(outcome.run_dir).database}")
    code = outcome.exit_code
    if code == api.EXIT_FAILED:
        typer.echo(f"{len(outcome.failed)} stage(s) failed or cancelled, {len(outcome.blocked)} blocked; see: "
                   f"gridlab status {grid}", err=True)
    elif code == api.EXIT_UNKNOWN:
        typer.echo(f"{len(outcome.unknown)} stage(s) in an unknown state (nothing was resubmitted); see: "
                   f"gridlab status {grid}", err=True)
    if code:
        raise typer.Exit(code)


def _eta(seconds: float | None) -> str:
    return "unknown (no finished stage to measure the pace by yet)" if seconds is None else duration(seconds)


def format_status(report: dict) -> str:

    progress = report["progress"]
    lines = [f"grid {report['grid']} ({report['run_dir']})",
             "cells: " + ", ".join(f"{state} {count}" for state, count in report["cells"].items()),
             f"progress: {progress['done']}/{progress['total']} stages done; ETA {_eta(progress['eta_s'])}"]
    if report["held_by"] is not None:
        lines.append(f"held by {describe(report['held_by'])}")
    lines.append(f"{'stage':9}" + "".join(f"{state:>11}" for state in STATES))
    for kind, counts in report["stages"].items():
        lines.append(f"{kind:9}" + "".join(f"{counts[state]:>11}" for state in STATES))
    for failure in report["failed"]:
        lines.append(f"{failure['status']} {failure['kind']} {failure['stage_id']} (job {failure['job_id']}, "
                     f"{failure['attempts']} attempt(s)): {failure['error'] or ''}")
        lines.append(f"  log {failure['log_path']}")
        lines.extend(f"  | {line}" for line in failure["log_tail"])
    lines.extend(_running_lines(report))
    lines.extend(_adaptive_lines(report.get("adaptive")))
    for unknown in report["unknown"]:
        lines.append(f"warning: unknown {unknown['kind']} {unknown['stage_id']}: {unknown['error'] or ''}")
    lines.extend(f"warning: {line}" for line in report.get("stale", []))
    return "\n".join(lines)


def _adaptive_lines(study: dict | None) -> list[str]:
    """An adaptive study's rounds: what each added and why, its tokens and GPU-hours, and where the study stands."""
    if not study:
        return []
    design = study["design"]
    kind = {"pocock": "Pocock-type", "obrien-fleming": "O'Brien–Fleming-type"}.get(design["spending"],
                                                                                  design["spending"])
    lines = [f"adaptive study: looks at {design['first']}–{design['last']} seeds per cell, {kind} alpha spending, "
             f"margin {design['margin']:g} ({design['metric']})"]
    for entry in study["rounds"]:
        hours = f", ≈ {entry['gpu_hours']:,.1f} GPU-hours" if entry["gpu_hours"] is not None else ""
        counts = ", ".join(f"{n} {v}" for v, n in entry["verdicts"].items())
        lines.append(f"  round {entry['round']}: {entry['what']} — {entry['tokens']:,} tokens{hours} (the look "
                     f"before it: {counts})")
    hours = f", ≈ {study['gpu_hours']:,.1f} GPU-hours" if study["gpu_hours"] is not None else ""
    lines.append(f"  rounds so far: {len(study['rounds'])}, {study['tokens']:,} tokens{hours}")
    stopped = study["stopped"]
    if stopped:
        lines.append(f"  stopped ({stopped['reason']}): {stopped['line']}")
    else:
        lines.append("  going on: `gridlab submit --adaptive` looks again once the last round's cells are done")
    return lines


def _running_lines(report: dict, limit: int = 20) -> list[str]:
    """One line per running stage: its latest training progress when it reports any."""

    lines = []
    for running in report.get("running", [])[:limit]:
        progress = running.get("progress")
        lines.append(f"running {running['kind']} {running['stage_id']}"
                     + (f": {format_progress(progress)}" if progress else ""))
    more = len(report.get("running", [])) - limit
    if more > 0:
        lines.append(f"running: {more} more")
    return lines


def _rich_status(report: dict):
    """The live view of `status --watch`: a progress bar with the ETA, the stage table, problems."""


    progress = report["progress"]
    colour = {"done": "green", "failed": "red", "cancelled": "magenta", "unknown": "yellow", "running": "cyan"}
    table = Table(title=f"grid {report['grid']}", caption=report["run_dir"])
    table.add_column("stage")
    for state in STATES:
        table.add_column(state, justify="right", style=colour.get(state))
    for kind, counts in report["stages"].items():
        table.add_row(kind, *(str(counts[state]) for state in STATES))
    table.add_row("cells", *(str(report["cells"][state]) for state in STATES), style="bold")
    parts = [Text(f"{progress['done']}/{progress['total']} stages done, ETA {_eta(progress['eta_s'])}"),
             ProgressBar(total=max(1, progress["total"]), completed=progress["done"], width=60), table]
    if report["held_by"] is not None:
        parts.append(Text(f"held by {describe(report['held_by'])}"))
    parts.extend(Text(line, style="cyan") for line in _running_lines(report, limit=10))
    for failure in report["failed"][:10]:
        parts.append(Text(f"{failure['status']} {failure['kind']} {failure['stage_id']}: {failure['error'] or ''}",
                          style="red"))
    for unknown in report["unknown"][:10]:
        parts.append(Text(f"unknown {unknown['kind']} {unknown['stage_id']}: {unknown['error'] or ''}",
                          style="yellow"))
    return Group(*parts)


@app.command()
@_user_errors
def status(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder"),
           watch: bool = typer.Option(False, "--watch", help="live view, redrawn every --interval seconds"),
           interval: float = typer.Option(2.0, help="seconds between redraws with --watch"),
           as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
           lines: int = typer.Option(5, help="log lines shown per failed stage"),
           where: Where = None):
    """Stage and cell counts by state, progress and ETA, failures with their log tails.

    Also who holds the run and the stages whose state is unknown (with why). With --watch: a live view, SLURM asked
    at most every 30 s."""

    if interval <= 0:
        raise UserError(f"--interval {interval:g}: give a positive number of seconds between redraws")
    if lines < 0:
        raise UserError(f"--lines {lines}: give 0 or more log lines per failed stage")
    scheduler = SchedulerCache(max_age_s=30.0)
    if not watch or as_json:
        while True:
            report = api.status(grid, lines, where=where, scheduler=scheduler)
            typer.echo(json.dumps(report) if as_json else format_status(report))
            if not watch:
                return
            time.sleep(interval)

    with Live(_rich_status(api.status(grid, lines, where=where, scheduler=scheduler)), auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(_rich_status(api.status(grid, lines, where=where, scheduler=scheduler)), refresh=True)


@app.command()
@_user_errors
def cancel(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder"),
           where: Where = None):
    """Stop the grid's queued and running jobs and local workers; mark their stages cancelled.

    Only --where's stages when given: a cell filter (method, ratio, budget …) stops only the stages no unselected
    cell needs; a stage filter (kind, stage, state) the stages it selects. `submit --retry-failed` runs them again.
    Exits 1 when something could not be stopped (it is left as it was)."""
    outcome = api.cancel(grid, where=where, report=typer.echo)
    typer.echo(f"cancelled {len(outcome.cancelled)} stage(s): {len(outcome.jobs)} SLURM job(s) scancel'led, "
               f"{len(outcome.pids)} local process(es) stopped")
    if outcome.problems:
        raise typer.Exit(1)


Yes = Annotated[bool, typer.Option("--yes", "-y", help="remove finished work without asking (for scripts)")]


def _terminal_confirm():
    """A yes/no question on the terminal, or None when there is none to ask on (then --yes is needed)."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        return lambda question: typer.confirm(question, default=False)
    return None


@app.command()
@_user_errors
def reset(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder"),
          where: Where = None,
          dry_run: bool = typer.Option(False, "--dry-run", help="show what would be removed; remove nothing"),
          yes: Yes = False):
    """Remove the outputs of the --where selection so the next submit reruns it.

    A cell filter (method, granularity, ratio, init, lr, budget, setting, seed) acts only on the stages no unselected
    cell needs: shared work (data, parent, a random twin two methods share, a trajectory other budgets ride on)
    stays. A stage filter (kind, stage, state) acts on the stages it selects and everything downstream of them.
    Prints the summary first (stages by kind, bytes, finished work lost); removing finished work asks on a
    terminal, needs --yes otherwise."""
    removal = api.reset(grid, where=where, dry_run=dry_run, yes=yes, confirm=_terminal_confirm(), report=typer.echo)
    typer.echo("\n".join(removal.lines()))


@app.command()
@_user_errors
def clean(grid: str = typer.Argument(DEFAULT_GRID, help="grid file (its current plan) or run folder"),
          dry_run: bool = typer.Option(False, "--dry-run", help="show what would be removed; remove nothing"),
          all_checkpoints: bool = typer.Option(False, "--all-checkpoints",
                                               help="also the main state finished trajectories keep for longer "
                                                    "budgets"),
          where: Where = None,
          yes: Yes = False):
    """Remove what the run no longer needs; print what it freed.

    Stage folders and trajectories no longer in the plan, and checkpoints finished stages do not need (a finished
    trajectory keeps the main state a longer budget extends, unless --all-checkpoints). --where: only the
    checkpoints of those stages (a cell filter: the stages no unselected cell needs). Removing finished work (a
    done stage no longer in the plan) asks on a terminal, needs --yes otherwise."""
    removal = api.clean(grid, dry_run=dry_run, all_checkpoints=all_checkpoints, where=where, yes=yes,
                        confirm=_terminal_confirm(), report=typer.echo)
    typer.echo("\n".join(removal.lines()))


@app.command()
@_user_errors
def ingest(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder")):
    """Rebuild runs/<grid>/results.duckdb from the result files."""

    counts = api.ingest(grid)
    typer.echo(f"{RunPaths(api.run_dir_of(grid)).database}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@app.command()
@_user_errors
def report(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder"),
           out: Annotated[Path, typer.Option("--out", help="folder for the report")] = DEFAULT_REPORT,
           metric: str = typer.Option("val_loss", help="headline metric"),
           pool: str = typer.Option("model", help="interval model: model (mixed model of the per-seed differences) "
                                                  "| none (each cell's own paired t)"),
           margin: float | None = typer.Option(None, help="equivalence margin in the headline metric's units "
                                                          "(default: the grid's [report] margin, 0.02)"),
           where: Where = None):
    """Ingest the results, then write the HTML/PDF report, summary.md, verdicts.csv and predictions.csv (of the
    --where cells only, when given)."""
    for kind, path in api.report(grid, out=out, metric=metric, where=where, pool=pool, margin=margin).items():
        typer.echo(f"{kind}: {path}")


@app.command()
@_user_errors
def export(out: Annotated[Path, typer.Option("--out", help="file to write")],
           grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder"),
           fmt: str | None = typer.Option(None, "--format",
                                             help="csv | parquet | json (default: from --out's suffix)"),
           where: Where = None):
    """Write the cells with their metrics (one row per measurement) as CSV, Parquet or JSON."""
    written = api.export(grid, out, fmt=fmt, where=where)
    typer.echo(f"{written['path']}: {written['rows']} row(s), {written['cells']} cell(s)")


@app.command()
@_user_errors
def logs(grid: str = typer.Argument(DEFAULT_GRID, help="grid file or run folder (may be left out)"),
         stage: str | None = typer.Argument(None, help="stage id (or a unique prefix)"),
         where: Where = None,
         follow: bool = typer.Option(False, "--follow", "-f", help="keep printing lines as they are written"),
         lines: int | None = typer.Option(None, "--lines", "-n", help="only the last N lines")):
    """Show (or follow) the log of a stage (`gridlab logs [GRID] STAGE_ID`), or of the --where stages."""
    if lines is not None and lines < 0:
        raise UserError(f"--lines {lines}: give 0 or more lines (or leave it out for the whole log)")
    if stage is None and not where and not Path(grid).exists():
        grid, stage = DEFAULT_GRID, grid     # `gridlab logs STAGE_ID`
    shown = api.logs(grid, stage, where=where, lines=lines)
    several = len(shown) > 1
    progress = api.latest_progress(grid, [stage_id for stage_id, _, _ in shown])
    for stage_id, path, text in shown:
        if several:
            typer.echo(f"==> {stage_id} ({path}) <==")
        if text:
            typer.echo(text.rstrip("\n"))
        if stage_id in progress:

            typer.echo(f"latest progress: {format_progress(progress[stage_id])}")
    if not shown:
        typer.echo("no stage selected", err=True)
    if follow:
        sys.stdout.flush()
        for stage_id, line in api.follow_logs(grid, stage, where=where):
            typer.echo(f"{stage_id[:8]} | {line}" if several else line)


if __name__ == "__main__":
    app()
