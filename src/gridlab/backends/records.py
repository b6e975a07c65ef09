"""A stage's submission and cancellation records: the files every backend writes, and gridlab.state reads.

``stages/<id>/submit.json`` says who holds the stage: its backend, the job (or the job name, recorded before the
scheduler is asked, so an interrupted submission is found by name), host, pid and the pid's start time, since when.
A cancellation is an ``error.json`` with ``cancelled``: the stage's work ended because somebody said so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gridlab import atomic
from gridlab.layout import RunPaths
from gridlab.lock import holder_record, process_start, this_host
from gridlab.results import read_json

# The keys record_submission writes itself; anything else a backend passes is kept beside them.
OWN_KEYS = ("backend", "job_id", "host", "pid", "pid_start", "submitted_at", "log_path")


def record_submission(run_dir: Path, stage_id: str, backend: str, job_id: str | None, pid: int | None = None,
                      **extra: Any) -> None:
    """The one writer of a stage's submit.json: who holds the stage (backend, job or job name, host, pid and the
    pid's start time, so a reused pid is not taken for it) and since when."""
    files = RunPaths(run_dir).stage(stage_id)
    atomic.write_json(files.submit, {"backend": backend, "job_id": job_id, "host": this_host(), "pid": pid,
                                     "pid_start": process_start(pid) if pid else None,
                                     "submitted_at": time.time(), "log_path": str(files.log), **extra})


def read_submission(run_dir: Path, stage_id: str) -> dict[str, Any]:
    """A stage's submission record ({} when it has none). Records written before backends had a registry name
    theirs under ``executor``; they read the same."""
    record = read_json(RunPaths(run_dir).stage(stage_id).submit)
    if not isinstance(record, dict):
        return {}
    if "backend" not in record and "executor" in record:
        record = {"backend": record.pop("executor"), **record}
    return record


def record_cancel(run_dir: Path, stage_id: str, how: str) -> None:
    """Mark a stage cancelled (error.json with ``cancelled``), as `gridlab cancel` does."""
    who = holder_record("cancel")
    atomic.write_json(RunPaths(run_dir).stage(stage_id).error, {
        "error": f"cancelled by {who['user']} on {who['host']} ({how})", "cancelled": True,
        "finished": time.time(), "traceback": []})


def is_cancel_record(error: dict | None) -> bool:
    return bool(error and error.get("cancelled"))


def cancelled_since(run_dir: Path, stage_id: str, since: float) -> bool:
    error = read_json(RunPaths(run_dir).stage(stage_id).error)
    return is_cancel_record(error) and error.get("finished", 0) >= since


def fail_unless_reported(run_dir: Path, stage_id: str, how: str) -> str:
    """A stage whose process(es) ended: done if its result exists, cancelled if `gridlab cancel` stopped it, else
    failed (with an error file saying how)."""
    files = RunPaths(run_dir).stage(stage_id)
    if files.result.exists():
        return "done"
    error = read_json(files.error)
    if error is None:
        try:
            atomic.write_json(files.error, {
                "error": f"{how} before writing its result", "finished": time.time(), "traceback": []})
        except OSError:   # a full disk: the stage is not done either way, and is run again by the next submit
            pass
    return "cancelled" if is_cancel_record(error) else "failed"
