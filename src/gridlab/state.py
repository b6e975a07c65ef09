"""What state is each stage in: the one answer, used by `submit`, `status`, `cancel`, `reset` and `ingest` alike.

A stage's state comes from its folder (gridlab.layout) and, for a stage somebody holds and that has not finished,
from the backend its submission record names (gridlab.backends: a live local worker, a SLURM job …):

- done       its result exists (with ``verify``: and reads back with a matching checksum; a corrupt one is failed)
- failed     an error file no older than its latest submission, or its backend says the work ended without a result
             (``error`` says how: out of memory, time limit, node failure …, with what to change)
- cancelled  its backend says the work was cancelled (or preempted and not requeued), or `gridlab cancel` said so
- running / pending   its backend has it running / queued
- unknown    someone may hold it but nobody can say: the scheduler failed or did not answer in time, the job is
             known to it no more, a local worker on another host holds it, or the backend its record names is not
             installed here. Fail closed: an unknown stage is never resubmitted (not even with --retry-failed) and
             never counted failed.
- pending    nobody holds it (never submitted, or a worker that is gone) — ``submitted`` is then False

``effective_states`` then gives each stage the state the cells below it see (a failure upstream dominates).
This module names no backend: each one answers for the stages it holds (``Backend.observe``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gridlab import backends
from gridlab.backends.records import is_cancel_record, read_submission
from gridlab.layout import RunPaths
from gridlab.results import CorruptResult, read_attempts, read_json, read_result

STATES = ("pending", "running", "done", "failed", "cancelled", "unknown")
ACTIVE = ("pending", "running")            # held and on its way
HELD = ("pending", "running", "unknown")   # a held stage in one of these may still be running: never resubmit it
TERMINAL_FAILURES = ("failed", "cancelled")


@dataclass
class StageState:
    stage_id: str
    kind: str
    status: str                    # one of STATES
    job_id: str | None = None
    attempts: int = 0
    started: float | None = None   # the first start (attempts.log), None before any
    log_path: str = ""
    error: str | None = None       # failed/cancelled: why; unknown: why nobody can say
    submitted: bool = False        # someone (a live worker, the scheduler) holds it, or may hold it (unknown)
    backend: str | None = None     # the backend its submission record names (gridlab.backends)
    host: str | None = None
    pid: int | None = None
    job_name: str | None = None    # the scheduler's job (array) name it was submitted under
    reconciled: bool = False       # the job id was found by name after an interrupted submission
    lingering: bool = False        # failed or cancelled, but its job is still queued or running

    @property
    def held(self) -> bool:
        """Someone holds it, or may: resubmitting it now could put two workers on one stage folder."""
        return self.submitted and (self.status in HELD or self.lingering)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _done_markers(paths: RunPaths) -> set[str]:
    try:
        return set(os.listdir(paths.done_dir))
    except FileNotFoundError:
        return set()


def stage_states(run_dir: Path, stages: list[Any], verify: bool = False,
                 scheduler: SchedulerCache | None = None) -> dict[str, StageState]:
    """Every stage's state. ``stages``: objects with ``id`` and ``kind`` (plan stages) or dicts with those keys
    (index.json). Without ``verify`` a done marker is trusted (fast, what status does); with it every result is read
    and its checksum checked (what submit and ingest do). ``scheduler``: a cache that lets a watching status ask
    each scheduler at most every 30 s."""
    paths = RunPaths(run_dir)
    done = _done_markers(paths)
    states: dict[str, StageState] = {}
    held_by: dict[str, list[tuple[StageState, dict]]] = {}   # backend name → its stages with their records
    for stage in stages:
        stage_id, kind = (stage["id"], stage["kind"]) if isinstance(stage, dict) else (stage.id, stage.kind)
        files = paths.stage(stage_id)
        attempts = read_attempts(files)
        state = StageState(stage_id, kind, "pending", attempts=attempts.count, started=attempts.first,
                           log_path=str(files.log))
        states[stage_id] = state
        if _finished(files, state, verify, stage_id in done):
            continue
        record = read_submission(run_dir, stage_id) if files.submit.exists() else {}
        error = read_json(files.error) if files.error.exists() else None
        if error is not None and error.get("finished", 0) >= record.get("submitted_at", 0):
            state.status = "cancelled" if is_cancel_record(error) else "failed"
            state.error = error.get("error")
        if not record:
            continue   # nobody holds it: never submitted (or its record was removed)
        state.job_id, state.backend = record.get("job_id"), record.get("backend")
        state.host, state.pid, state.job_name = record.get("host"), record.get("pid"), record.get("job_name")
        state.submitted = True
        held_by.setdefault(state.backend, []).append((state, record))

    cache = scheduler or SchedulerCache(max_age_s=0)
    for name, held in held_by.items():
        if not backends.installed(name):
            _held_by_a_missing_backend(name, held, paths)
            continue
        open_before = [state for state, _ in held if state.status not in TERMINAL_FAILURES]
        backends.create(name).observe(run_dir, held, cache)
        for state in open_before:
            if state.status in TERMINAL_FAILURES + ("unknown",):
                # The work may have finished between our look at the folder and the backend's answer.
                files = paths.stage(state.stage_id)
                _finished(files, state, verify, files.done_marker.exists())
    return states


def _held_by_a_missing_backend(name: str | None, held: list[tuple[StageState, dict]], paths: RunPaths) -> None:
    """Stages whose records name a backend that is not installed here: nobody can say whether their work runs, so
    they stay held (unknown; a failed one lingers) with the way out."""
    for state, _ in held:
        why = backends.missing_backend(name, paths.stage(state.stage_id).submit)
        if state.status in TERMINAL_FAILURES:
            state.lingering = True
            state.error = f"{state.error} (whether its work still runs is unknown: {why})"
        else:
            state.status, state.error = "unknown", why


def _finished(files, state: StageState, verify: bool, marked: bool) -> bool:
    """Mark ``state`` done (or failed, for a corrupt result) when the stage has finished; True if it has."""
    if verify:
        try:
            read_result(files)
        except FileNotFoundError:
            return False
        except CorruptResult as corrupt:
            state.status, state.error, state.submitted = "failed", f"corrupt result: {corrupt}", False
            return True
    elif not marked:
        return False
    state.status, state.error, state.submitted = "done", None, False
    return True


T = TypeVar("T")


class SchedulerCache:
    """Each backend's last answer from its scheduler, reused for ``max_age_s`` seconds while it covers what is asked
    (status --watch asks a scheduler at most every 30 s however often it redraws)."""

    def __init__(self, max_age_s: float = 30.0):
        self.max_age_s = max_age_s
        self._answers: dict[str, tuple[set, Any, float]] = {}

    def ask(self, backend: str, keys: set, query: Callable[[], T]) -> T:
        """``query()``'s answer, or the one cached for ``backend`` when it is fresh and was asked for ``keys``."""
        asked, answer, at = self._answers.get(backend, (set(), None, 0.0))
        if answer is None or time.time() - at >= self.max_age_s or not set(keys) <= asked:
            answer = query()
            self._answers[backend] = (set(keys), answer, time.time())
        return answer


def effective_states(stages: list[Any], status: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each stage's state as the cells below it see it, and the stage to blame when that is failed or cancelled.

    A failed or cancelled stage upstream dominates (the one furthest upstream is blamed); then a stage is done when
    it is; unknown when it or something upstream is; running when it or something upstream runs; pending otherwise.
    ``stages`` must be in dependency order (as plans list them), as objects with ``id``/``deps`` or dicts.
    """
    effective: dict[str, str] = {}
    culprit: dict[str, str] = {}
    for stage in stages:
        sid, deps = (stage["id"], stage["deps"]) if isinstance(stage, dict) else (stage.id, stage.deps)
        own = status[sid]
        blamed = [culprit[dep] for dep in deps.values() if dep in culprit]
        blamed += [sid] if own in TERMINAL_FAILURES else []
        upstream = [effective[dep] for dep in deps.values()]
        if blamed:
            culprit[sid] = blamed[0]
            effective[sid] = status[culprit[sid]]
        elif own == "done":
            effective[sid] = "done"
        elif own == "unknown" or "unknown" in upstream:
            effective[sid] = "unknown"
        elif own == "running" or "running" in upstream:
            effective[sid] = "running"
        else:
            effective[sid] = "pending"
    return effective, culprit


