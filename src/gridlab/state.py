"""What state is each stage in: the one answer, used by `submit`, `status`, `cancel`, `reset` and `ingest` alike.

A stage's state comes from its folder (gridlab.layout) and, for stages submitted to SLURM and not yet finished,
from the scheduler (one squeue call, and one sacct call for the jobs squeue no longer holds):

- done       its result exists (with ``verify``: and reads back with a matching checksum; a corrupt one is failed)
- failed     an error file no older than its latest submission, or the scheduler says the job ended without a result
             (``error`` says how: out of memory, time limit, node failure …, with what to change)
- cancelled  the scheduler says the job was cancelled (or preempted and not requeued), or `gridlab cancel` said so
- running / pending   a live local worker holds it, or the scheduler has the job running / queued
- unknown    someone may hold it but nobody can say: squeue/sacct failed or did not answer in time, the job is known
             to neither, or a local worker on another host holds it. Fail closed: an unknown stage is never
             resubmitted (not even with --retry-failed) and never counted failed.
- pending    nobody holds it (never submitted, or a local worker that is gone) — ``submitted`` is then False

``effective_states`` then gives each stage the state the cells below it see (a failure upstream dominates).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridlab.contracts import resource_table
from gridlab.layout import RunPaths
from gridlab.lock import process_alive
from gridlab.results import CorruptResult, read_json, read_result

STATES = ("pending", "running", "done", "failed", "cancelled", "unknown")
ACTIVE = ("pending", "running")            # held and on its way
HELD = ("pending", "running", "unknown")   # a held stage in one of these may still be running: never resubmit it
TERMINAL_FAILURES = ("failed", "cancelled")

# Seconds one squeue/sacct/scancel call may take before its answer counts as missing (the stages become unknown).
SCHEDULER_TIMEOUT_ENV = "GRIDLAB_SCHEDULER_TIMEOUT_S"
_DEFAULT_SCHEDULER_TIMEOUT_S = 30.0


@dataclass
class StageState:
    stage_id: str
    kind: str
    status: str                    # one of STATES
    job_id: str | None = None
    attempts: int = 0
    started: float | None = None
    log_path: str = ""
    error: str | None = None       # failed/cancelled: why; unknown: why nobody can say
    submitted: bool = False        # someone (a live worker, the scheduler) holds it, or may hold it (unknown)
    executor: str | None = None
    host: str | None = None
    pid: int | None = None
    job_name: str | None = None    # the SLURM job (array) name it was submitted under
    reconciled: bool = False       # the job id was found by name after an interrupted submission
    lingering: bool = False        # failed or cancelled, but its SLURM job is still queued or running

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


def _attempts(path: Path) -> tuple[int, float | None]:
    try:
        lines = path.read_text().split()
    except OSError:
        return 0, None
    return len(lines), (float(lines[0]) if lines else None)


def is_cancel_record(error: dict | None) -> bool:
    return bool(error and error.get("cancelled"))


def stage_states(run_dir: Path, stages: list[Any], verify: bool = False,
                 scheduler: SchedulerCache | None = None) -> dict[str, StageState]:
    """Every stage's state. ``stages``: objects with ``id`` and ``kind`` (plan stages) or dicts with those keys
    (index.json). Without ``verify`` a done marker is trusted (fast, what status does); with it every result is read
    and its checksum checked (what submit and ingest do). ``scheduler``: a cache that lets a watching status ask
    SLURM at most every 30 s."""
    paths = RunPaths(run_dir)
    done = _done_markers(paths)
    states: dict[str, StageState] = {}
    unfinished: list[tuple[StageState, dict, dict | None]] = []
    for stage in stages:
        stage_id, kind = (stage["id"], stage["kind"]) if isinstance(stage, dict) else (stage.id, stage.kind)
        files = paths.stage(stage_id)
        attempts, started = _attempts(files.attempts)
        state = StageState(stage_id, kind, "pending", attempts=attempts, started=started, log_path=str(files.log))
        states[stage_id] = state
        if _finished(files, state, verify, stage_id in done):
            continue
        submit = (read_json(files.submit) if files.submit.exists() else None) or {}
        error = read_json(files.error) if files.error.exists() else None
        state.job_id, state.executor = submit.get("job_id"), submit.get("executor")
        state.host, state.pid, state.job_name = submit.get("host"), submit.get("pid"), submit.get("job_name")
        state.submitted = bool(submit)
        if error is not None and error.get("finished", 0) >= submit.get("submitted_at", 0):
            state.status = "cancelled" if is_cancel_record(error) else "failed"
            state.error = error.get("error")
            if submit.get("executor") != "slurm":
                state.submitted = False
                continue
        unfinished.append((state, submit, error))

    slurm = [(state, submit) for state, submit, _ in unfinished if submit.get("executor") == "slurm"]
    if slurm:
        answer = (scheduler or SchedulerCache(max_age_s=0)).ask(
            [submit for state, submit in slurm if state.status not in TERMINAL_FAILURES],
            [submit for state, submit in slurm if state.status in TERMINAL_FAILURES])
        for state, submit in slurm:
            if state.status in TERMINAL_FAILURES:
                _lingering(state, submit, answer)
                continue
            _classify_slurm(state, submit, answer)
            if state.status in TERMINAL_FAILURES + ("unknown",):
                # The job may have finished between our look at the folder and the scheduler's answer.
                _finished(paths.stage(state.stage_id), state, verify, paths.stage(state.stage_id).done_marker.exists())
    for state, submit, _ in unfinished:
        if submit.get("executor") in ("local", "debug"):
            alive = process_alive(submit.get("pid"), submit.get("host"), submit.get("pid_start"))
            if alive is None:
                state.status = "unknown"
                state.error = (f"held by a {submit['executor']} worker (pid {submit.get('pid')}) on host "
                               f"{submit.get('host')}; its state can only be seen from that host")
            elif alive:
                state.status = "running"
            else:
                state.submitted = False  # a local/debug stage whose worker is gone: nobody holds it any more
        elif not submit:
            state.submitted = False
    return states


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


def _lingering(state: StageState, submit: dict, answer: SlurmAnswer) -> None:
    """A failed or cancelled stage whose job SLURM still holds (a rank that failed while the others hang, a
    cancelled job within KillWait) is still held: resubmitting it would put two jobs on one folder."""
    job = answer.jobs.get(submit.get("job_id") or "")
    if job is not None and job.status in ACTIVE:
        state.lingering = True
        state.error = (f"{state.error} (its SLURM job {state.job_id} is still {job.status}; it is not resubmitted "
                       f"before it ends: `gridlab cancel` stops it)")
    elif answer.squeue_problem and submit.get("job_id"):
        state.lingering = True
        state.error = (f"{state.error} (whether its SLURM job {state.job_id} still runs is unknown: "
                       f"{answer.squeue_problem})")
    else:
        state.submitted = False


def _classify_slurm(state: StageState, submit: dict, answer: SlurmAnswer) -> None:
    job_id = submit.get("job_id")
    if job_id is None:
        # Recorded before sbatch, not after: find the job by the name it was submitted under.
        name, task = submit.get("job_name"), submit.get("array_task")
        found = answer.by_name.get(name, {}) if name else {}
        job_id = found.get(task if task is not None else "")
        if job_id is None:
            if name and answer.complete_for_names:
                state.status, state.submitted = "pending", False   # sbatch never went through: nobody holds it
                return
            state.status = "unknown"
            state.error = ("its submission was interrupted before the job id was recorded, and " +
                           (answer.problem or "the scheduler does not know the job name") +
                           "; if no job runs it, `gridlab cancel` it and resubmit with --retry-failed")
            return
        state.job_id, state.reconciled = job_id, True
    job = answer.jobs.get(job_id)
    if job is not None:
        state.status, state.error = job.status, job.explain(state.kind, submit.get("resources") or {})
        return
    state.status = "unknown"
    if answer.problem:
        state.error = f"SLURM job {job_id}: {answer.problem}"
    else:
        state.error = (f"SLURM job {job_id} is known neither to squeue nor to sacct; if it is gone, "
                       f"`gridlab cancel` the stage and resubmit with --retry-failed")


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


# ------------------------------------------------------------------------------------------------------ SLURM

_QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "RESIZING"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "SUSPENDED"}

# Terminal states of a job that left no result: (stage state, what it means and what to do). {kind} (the resources
# table of the stage's kind) and the resources the job asked for ({mem_gb}, {time_min}) are filled in.
_TERMINAL: dict[str, tuple[str, str]] = {
    "COMPLETED": ("failed", "the SLURM job completed without writing a result; see the stage log"),
    "FAILED": ("failed", "the SLURM job failed (exit code {exit_code}) before writing a result; see the stage log"),
    "CANCELLED": ("cancelled", "the SLURM job was cancelled{by}"),
    "TIMEOUT": ("failed", "the SLURM job hit its time limit (resources.{kind}.time_min = {time_min}) and was not "
                          "requeued; raise time_min in [resources.{kind}]"),
    "OUT_OF_MEMORY": ("failed", "the SLURM job ran out of memory (resources.{kind}.mem_gb = {mem_gb}); raise mem_gb "
                                "in [resources.{kind}]"),
    "NODE_FAIL": ("failed", "the SLURM job's node failed (NODE_FAIL); the stage itself did not fail: resubmit with "
                            "--retry-failed (exclude the node with resources.{kind}.exclude if it recurs)"),
    "BOOT_FAIL": ("failed", "the SLURM job's node failed to boot (BOOT_FAIL); resubmit with --retry-failed"),
    "DEADLINE": ("failed", "the SLURM job reached its deadline before it could finish (DEADLINE); resubmit with "
                           "--retry-failed, with a later or no --deadline"),
    "PREEMPTED": ("cancelled", "the SLURM job was preempted and not requeued (the partition's PreemptMode cancels "
                               "preempted jobs); resubmit with --retry-failed, or use a partition or QOS that is not "
                               "preempted"),
    "REVOKED": ("cancelled", "the SLURM job was revoked (a federated sibling ran it elsewhere)"),
    "SPECIAL_EXIT": ("failed", "the SLURM job ended in SPECIAL_EXIT; see the stage log"),
}


@dataclass
class SlurmJob:
    status: str                          # one of STATES
    state: str                           # SLURM's own word
    reason: str = ""
    exit_code: str = ""
    by: str = ""                         # CANCELLED by <uid>

    def explain(self, kind: str, resources: dict[str, Any]) -> str | None:
        if self.reason == "DependencyNeverSatisfied":
            return "an upstream job failed (DependencyNeverSatisfied)"
        if self.state not in _TERMINAL:
            return None if self.status != "unknown" else f"SLURM reports the job as {self.state}"
        template = _TERMINAL[self.state][1]
        return template.format(kind=resource_table(kind), exit_code=self.exit_code or "?",
                               by=f" by {self.by}" if self.by else "", mem_gb=resources.get("mem_gb", "?"),
                               time_min=resources.get("time_min", "?"))


def slurm_job(state: str, reason: str = "", exit_code: str = "") -> SlurmJob:
    """What a SLURM job state means for its stage (a job that left no result)."""
    words = state.split()
    base = words[0] if words else ""
    by = words[2] if len(words) > 2 and words[1] == "by" else ""
    if reason == "DependencyNeverSatisfied":
        return SlurmJob("cancelled", base, reason, exit_code, by)
    if base in _QUEUED:
        return SlurmJob("pending", base, reason, exit_code)
    if base in _RUNNING:
        return SlurmJob("running", base, reason, exit_code)
    if base in _TERMINAL:
        return SlurmJob(_TERMINAL[base][0], base, reason, exit_code, by)
    return SlurmJob("unknown", base or "?", reason, exit_code)


@dataclass
class SlurmAnswer:
    jobs: dict[str, SlurmJob] = field(default_factory=dict)            # job id ("123" or "123_4") → state
    by_name: dict[str, dict[str, str]] = field(default_factory=dict)   # job name → {array task or "": job id}
    problem: str | None = None          # why some jobs may be missing (a query failed or did not answer)
    squeue_problem: str | None = None   # squeue itself failed: nothing is known about queued or running jobs
    complete_for_names: bool = True     # both squeue and sacct answered for every job name asked about


@dataclass
class CommandResult:
    ok: bool
    stdout: str = ""
    problem: str | None = None
    stderr: str = ""
    timed_out: bool = False


def scheduler_timeout_s() -> float:
    try:
        return float(os.environ.get(SCHEDULER_TIMEOUT_ENV, _DEFAULT_SCHEDULER_TIMEOUT_S))
    except ValueError:
        return _DEFAULT_SCHEDULER_TIMEOUT_S


def run_command(command: list[str], timeout_s: float | None = None) -> CommandResult:
    """Run a scheduler command; ``ok`` only when it exited 0 within the timeout (``problem`` says what went wrong)."""
    timeout_s = scheduler_timeout_s() if timeout_s is None else timeout_s
    try:
        # Its own process group, so a wrapper script is killed with everything it started.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   text=True, start_new_session=True)
    except FileNotFoundError:
        return CommandResult(False, problem=f"{command[0]} is not installed here")
    except OSError as error:
        return CommandResult(False, problem=f"{command[0]} could not run ({error})")
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return CommandResult(False, problem=f"{command[0]} did not answer within {timeout_s:g} s", timed_out=True)
    if process.returncode != 0:
        message = (stderr.strip().splitlines() or [""])[-1]
        return CommandResult(False, stdout, f"{command[0]} failed (exit {process.returncode}): {message}", stderr)
    return CommandResult(True, stdout, stderr=stderr)


def _sacct_since(records: list[dict]) -> str:
    earliest = min(record.get("submitted_at") or time.time() for record in records) - 3600
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(earliest))


def query_slurm(records: list[dict], queued_only: list[dict] = ()) -> SlurmAnswer:
    """Ask SLURM about the jobs of these submission records: squeue for what it still holds, then sacct for the
    rest. Jobs recorded only by name (an interrupted submission) are looked up by name. For ``queued_only`` (stages
    already known to have failed) only squeue is asked: does their job linger?"""
    answer = SlurmAnswer()
    lingering = {record["job_id"] for record in queued_only if record.get("job_id")}
    records = list(records) + list(queued_only)
    wanted = {record["job_id"] for record in records if record.get("job_id")}
    names = {record["job_name"] for record in records if record.get("job_name")}
    unnamed = any(not record.get("job_name") for record in records)
    searching = {record["job_name"] for record in records if not record.get("job_id") and record.get("job_name")}
    problems = []

    command = ["squeue", "-h", "-r", "-o", "%i|%T|%r|%j"] + ([] if unnamed else [f"--name={','.join(sorted(names))}"])
    squeue = run_command(command)
    if squeue.ok:
        for line in squeue.stdout.splitlines():
            job, state, reason, name = (line.split("|") + ["", "", ""])[:4]
            _found(answer, job.strip(), name, searching)
            if job in wanted or name in searching:
                answer.jobs[job] = slurm_job(state, reason)
    else:
        problems.append(squeue.problem)
        answer.squeue_problem = squeue.problem
    missing = wanted - lingering - answer.jobs.keys()
    lost_names = {name for name in searching if name not in answer.by_name}
    if missing or lost_names:
        fields = ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,JobName"]
        queries = []
        if missing:
            queries.append(fields + ["-j", ",".join(sorted({job.split("_")[0] for job in missing}))])
        if lost_names:
            queries.append(fields + [f"--name={','.join(sorted(lost_names))}", "-S",
                                     _sacct_since([r for r in records if r.get("job_name") in lost_names])])
        for query in queries:
            sacct = run_command(query)
            if not sacct.ok:
                problems.append(sacct.problem)
                continue
            for line in sacct.stdout.splitlines():
                job, state, exit_code, name = (line.split("|") + ["", "", ""])[:4]
                for task in _expand_array(job.strip()):
                    _found(answer, task, name, lost_names)
                    if (task in missing or name in lost_names) and task not in answer.jobs:
                        answer.jobs[task] = slurm_job(state, exit_code=exit_code)
    if problems:
        answer.problem = "; ".join(dict.fromkeys(problems))
        answer.complete_for_names = False
    return answer


def _found(answer: SlurmAnswer, job: str, name: str, names: set[str]) -> None:
    if name in names:
        array, _, task = job.partition("_")
        answer.by_name.setdefault(name, {})[task if task.isdigit() else ""] = job if task.isdigit() else array


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


class SchedulerCache:
    """SLURM's answers, reused for ``max_age_s`` seconds while they cover the jobs asked about (status --watch asks
    the scheduler at most every 30 s however often it redraws)."""

    def __init__(self, max_age_s: float = 30.0):
        self.max_age_s = max_age_s
        self.asked: set[tuple] = set()
        self.answer: SlurmAnswer | None = None
        self.at = 0.0

    def ask(self, records: list[dict], queued_only: list[dict] = ()) -> SlurmAnswer:
        keys = {(record.get("job_id"), record.get("job_name"), False) for record in records}
        keys |= {(record.get("job_id"), record.get("job_name"), True) for record in queued_only}
        fresh = time.time() - self.at < self.max_age_s
        if self.answer is None or not fresh or not keys <= self.asked:
            self.answer, self.asked, self.at = query_slurm(records, queued_only), keys, time.time()
        return self.answer
