"""Run a plan's stages: prepare the run folder, sort the stages by what a submit does with them, hand the ones to
run to a backend (gridlab.backends: local, debug, slurm, or one another package registers), cancel, wait.

Submission is idempotent: a stage with a result is skipped, one somebody holds (a live worker, a queued or running
job, or one whose state is unknown because its backend could not tell) is left alone, a failed or cancelled one is
reported (and run again with ``retry_failed``), and everything else goes to the backend. Per-stage state lives in
small files under runs/<grid>/stages/<id>/ (gridlab.layout, gridlab.state), so status never needs the DuckDB file.
Every backend records who holds a stage through ``gridlab.backends.records.record_submission`` (the one writer of
submit.json), before the stage's work starts. This module names no backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridlab import atomic, backends
from gridlab.backends import CancelOutcome
from gridlab.backends.records import record_cancel
from gridlab.layout import RunPaths
from gridlab.planfile import write_plan_files
from gridlab.state import ACTIVE, STATES, StageState, stage_states


def prepare(plan, run_dir: Path) -> None:
    """Write each stage's stage.json, then plan.json, index.json and the disk estimate. stage.json is
    content-addressed, so one that exists with the right bytes is kept; a folder without one (a preparation
    interrupted by Ctrl-C) or with other bytes gets it (re)written — stage.json is written atomically, so it is
    whole or absent."""
    run = RunPaths(run_dir)
    run.stages_dir.mkdir(parents=True, exist_ok=True)
    for stage in plan.stages.values():
        files = run.stage(stage.id)
        text = stage.model_dump_json()
        try:
            if files.stage.read_text() == text:
                continue
        except (OSError, UnicodeDecodeError):
            pass
        atomic.write_text(files.stage, text)
    write_plan_files(run_dir, plan)
    # The estimate needs the model's formulas (torch); `gridlab cancel` imports this module and must stay light.
    from gridlab.estimates import disk_per_stage

    atomic.write_json(run.disk_estimate, disk_per_stage(plan))


# ------------------------------------------------------------------------------------------------------ submission

@dataclass
class Triage:
    """What one `gridlab submit` does with each stage of its plan."""

    to_run: list[Any] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)          # queued or running: left alone
    unknown: list[StageState] = field(default_factory=list)  # maybe held, nobody can say: left alone, never rerun
    failed: list[StageState] = field(default_factory=list)   # failed / cancelled: rerun only with retry_failed
    lingering: list[StageState] = field(default_factory=list)  # failed, but its work still runs: not rerun yet
    skipped: list[str] = field(default_factory=list)         # not selected by --where


def triage(plan, states: dict[str, StageState], retry_failed: bool, only: set[str] | None = None) -> Triage:
    """Sort a plan's stages by what submit does with them; ``only``: the stage ids --where selected."""
    sorted_stages = Triage()
    for stage in plan.stages.values():
        state = states[stage.id]
        if only is not None and stage.id not in only:
            sorted_stages.skipped.append(stage.id)
        elif state.status == "done":
            sorted_stages.done.append(stage.id)
        elif state.lingering:
            sorted_stages.lingering.append(state)
        elif state.status == "unknown" and state.submitted:
            sorted_stages.unknown.append(state)
        elif state.status in ACTIVE and state.submitted:
            sorted_stages.active.append(stage.id)
        elif state.status in ("failed", "cancelled") and not retry_failed:
            sorted_stages.failed.append(state)
        else:
            sorted_stages.to_run.append(stage)
    return sorted_stages


# ------------------------------------------------------------------------------------------------------ cancel

def cancel_stages(run_dir: Path, states: Iterable[StageState], also_waiting: bool = False) -> CancelOutcome:
    """Stop the work holding these stages, each through the backend that holds it, and mark the stages cancelled.

    Fail closed: a stage whose backend could not be sure to stop it is left as it was and reported in ``problems``;
    so is one whose backend is not installed here. ``also_waiting``: mark stages nobody holds yet too (a local
    submit still running will then not start them)."""
    outcome = CancelOutcome()
    states = list(states)
    by_backend: dict[str | None, list[StageState]] = {}
    for state in states:
        if state.held:
            by_backend.setdefault(state.backend, []).append(state)
    for name, held in by_backend.items():
        if not backends.installed(name):
            run = RunPaths(run_dir)
            outcome.problems.extend(f"{s.stage_id}: {backends.missing_backend(name, run.stage(s.stage_id).submit)}"
                                    for s in held)
            continue
        outcome.add(backends.create(name).cancel(run_dir, held))
    for state in states:
        if also_waiting and not state.held and state.status in ACTIVE:
            record_cancel(run_dir, state.stage_id, "not started")
            outcome.cancelled.append(state.stage_id)
    return outcome


def wait_for(run_dir: Path, stages: list[Any], report: Callable[[str], None] = print,
             poll_s: float = 5.0) -> dict[str, StageState]:
    """Block until no stage is held any more (queued, running, or unknown), reporting counts when they change."""
    last = None
    while True:
        states = stage_states(run_dir, stages)
        counts = {status: 0 for status in STATES}
        for state in states.values():
            counts[state.status] += 1
        line = " ".join(f"{status} {count}" for status, count in counts.items())
        if line != last:
            report(f"{time.strftime('%H:%M:%S')} {line}")
            last = line
        if not any(state.held for state in states.values()):
            return states
        time.sleep(poll_s)
