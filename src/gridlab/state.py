"""What state is each stage in: the one answer, used by `submit`, `status` and `ingest` alike.

A stage's state comes from its folder (gridlab.layout) and, for stages submitted to SLURM and not yet finished,
from the scheduler (one squeue + one sacct call for all of them):

- done       its result exists (with ``verify``: and reads back with a matching checksum; a corrupt one is failed)
- failed     an error file no older than its latest submission, or the scheduler says the job ended without a result
- cancelled  the scheduler says the job was cancelled
- running / pending   a live local worker holds it, or the scheduler has the job running / queued
- pending    nobody holds it (never submitted, or a local worker that is gone)

``effective_states`` then gives each stage the state the cells below it see (a failure upstream dominates).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridlab.layout import RunPaths
from gridlab.results import CorruptResult, read_json, read_result

STATES = ("pending", "running", "done", "failed", "cancelled")
ACTIVE = ("pending", "running")


@dataclass
class StageState:
    stage_id: str
    kind: str
    status: str                    # one of STATES
    job_id: str | None = None
    attempts: int = 0
    started: float | None = None
    log_path: str = ""
    error: str | None = None
    submitted: bool = False        # someone (a live worker, the scheduler) holds it

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _done_markers(paths: RunPaths) -> set[str]:
    try:
        return set(os.listdir(paths.done_dir))
    except FileNotFoundError:
        return set()


def _attempts(path: Path) -> tuple[int, float | None]:
    try:
        lines = path.read_text().split()
    except OSError:
        return 0, None
    return len(lines), (float(lines[0]) if lines else None)


def stage_states(run_dir: Path, stages: list[Any], verify: bool = False) -> dict[str, StageState]:
    """Every stage's state. ``stages``: objects with ``id`` and ``kind`` (plan stages) or dicts with those keys
    (index.json). Without ``verify`` a done marker is trusted (fast, what status does); with it every result is read
    and its checksum checked (what submit and ingest do)."""
    paths = RunPaths(run_dir)
    done = _done_markers(paths)
    states: dict[str, StageState] = {}
    unfinished: list[tuple[StageState, dict | None, dict | None]] = []
    for stage in stages:
        stage_id, kind = (stage["id"], stage["kind"]) if isinstance(stage, dict) else (stage.id, stage.kind)
        files = paths.stage(stage_id)
        attempts, started = _attempts(files.attempts)
        state = StageState(stage_id, kind, "pending", attempts=attempts, started=started, log_path=str(files.log))
        states[stage_id] = state
        if verify:
            try:
                read_result(files)
                state.status = "done"
                continue
            except FileNotFoundError:
                pass
            except CorruptResult as corrupt:
                state.status, state.error = "failed", f"corrupt result: {corrupt}"
                continue
        elif stage_id in done:
            state.status = "done"
            continue
        submit = read_json(files.submit) if files.submit.exists() else None
        error = read_json(files.error) if files.error.exists() else None
        unfinished.append((state, submit, error))
    slurm_jobs = [submit["job_id"] for _, submit, _ in unfinished if submit and submit.get("executor") == "slurm"]
    scheduler = slurm_job_states(slurm_jobs) if slurm_jobs else {}
    for state, submit, error in unfinished:
        submit = submit or {}
        state.job_id = submit.get("job_id")
        state.submitted = bool(submit)
        if error is not None and error.get("finished", 0) >= submit.get("submitted_at", 0):
            state.status, state.error = "failed", error.get("error")
        elif submit.get("executor") == "slurm":
            state.status, state.error = scheduler.get(state.job_id, ("failed", "job unknown to SLURM"))
        elif submit.get("executor") == "local" and _alive(submit.get("pid")):
            state.status = "running"
        else:
            state.submitted = False  # a local/debug stage whose worker is gone: nobody holds it any more
    return states


def effective_states(stages: list[Any], status: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each stage's state as the cells below it see it, and the stage to blame when that is failed or cancelled.

    A failed or cancelled stage upstream dominates (the one furthest upstream is blamed); then a stage is done when
    it is; running when it or something upstream runs; pending otherwise. ``stages`` must be in dependency order
    (as plans list them), as objects with ``id``/``deps`` or dicts with those keys.
    """
    effective: dict[str, str] = {}
    culprit: dict[str, str] = {}
    for stage in stages:
        sid, deps = (stage["id"], stage["deps"]) if isinstance(stage, dict) else (stage.id, stage.deps)
        own = status[sid]
        blamed = [culprit[dep] for dep in deps.values() if dep in culprit]
        blamed += [sid] if own in ("failed", "cancelled") else []
        if blamed:
            culprit[sid] = blamed[0]
            effective[sid] = status[culprit[sid]]
        elif own == "done":
            effective[sid] = "done"
        elif own == "running" or any(effective[dep] == "running" for dep in deps.values()):
            effective[sid] = "running"
        else:
            effective[sid] = "pending"
    return effective, culprit


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------------------------------ SLURM

_SLURM_STATE = {
    "PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending", "RESV_DEL_HOLD": "pending", "SUSPENDED": "pending", "RESIZING": "pending",
    "RUNNING": "running", "COMPLETING": "running", "STAGE_OUT": "running", "SIGNALING": "running",
    "CANCELLED": "cancelled", "COMPLETED": "failed", "FAILED": "failed", "TIMEOUT": "failed",
    "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed", "DEADLINE": "failed",
    "PREEMPTED": "pending", "REVOKED": "cancelled", "SPECIAL_EXIT": "failed",
}


def slurm_job_states(job_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """job id ("123" or "123_4") → (status, error) for jobs without a result; squeue first, then sacct."""
    states: dict[str, tuple[str, str | None]] = {}
    wanted = set(job_ids)
    squeue = run_command(["squeue", "-h", "-r", "-o", "%i|%T|%r"])
    for line in squeue.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        if job in wanted:
            if reason == "DependencyNeverSatisfied":
                states[job] = ("cancelled", "an upstream job failed (DependencyNeverSatisfied)")
            else:
                states[job] = (_SLURM_STATE.get(state, "pending"), None)
    missing = wanted - states.keys()
    if missing:
        arrays = sorted({job.split("_")[0] for job in missing})
        sacct = run_command(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(arrays)])
        for line in sacct.splitlines():
            job, _, state = line.partition("|")
            state = state.split()[0] if state else ""
            for task in _expand_array(job):
                if task in missing:
                    status = _SLURM_STATE.get(state, "failed")
                    error = None if status in ACTIVE else (
                        "SLURM job completed without a result" if state == "COMPLETED" else f"SLURM job {state}")
                    states[task] = (status, error)
    return states


def _expand_array(job: str) -> list[str]:
    """sacct shows not-yet-started array tasks collapsed, e.g. 12_[3-5,7%2]."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job)
    if not match:
        return [job]
    tasks = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        tasks.extend(f"{match.group(1)}_{i}" for i in range(int(low), int(high or low) + 1))
    return tasks


def run_command(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
