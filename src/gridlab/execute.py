"""Run a plan's stages: `local` (parallel worker processes), `debug` (in-process) or `slurm` (submitit job arrays).

Submission is idempotent: a stage with a result is skipped, one somebody holds (a live worker, a queued or running
SLURM job, or one whose state is unknown because the scheduler did not answer) is left alone, a failed or cancelled
one is reported (and resubmitted with ``retry_failed``), and everything else is submitted. Per-stage state lives in
small files under runs/<grid>/stages/<id>/ (gridlab.layout, gridlab.state), so status never needs the DuckDB file.

Every executor records who holds a stage through ``record_submission`` (the one writer of submit.json): executor,
job id, host, pid and its start time. The slurm executor records its intent (the job name) before it calls sbatch,
so a crash between sbatch and the record is reconciled from the scheduler by job name instead of submitting twice.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from gridlab import atomic
from gridlab.contracts import STAGE_KINDS, resource_table
from gridlab.errors import UserError
from gridlab.layout import RunPaths
from gridlab.lock import holder_record, process_alive, process_start, this_host
from gridlab.planfile import write_plan_files
from gridlab.results import clear_outcome, read_json
from gridlab.state import (
    ACTIVE,
    STATES,
    StageState,
    is_cancel_record,
    run_command,
    scheduler_timeout_s,
    stage_states,
)

# How many explicit array-task dependencies one job may list before we depend on whole arrays instead.
_MAX_TASK_DEPENDENCIES = 200


def prepare(plan, run_dir: Path) -> None:
    """Write each stage's stage.json, then plan.json and index.json. stage.json is content-addressed, so one that
    exists with the right bytes is kept; a folder without one (a preparation interrupted by Ctrl-C) or with other
    bytes gets it (re)written — stage.json is written atomically, so it is whole or absent."""
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
    from gridlab.plan import disk_per_stage

    atomic.write_json(run.disk_estimate, disk_per_stage(plan))


def record_submission(run_dir: Path, stage_id: str, executor: str, job_id: str | None, pid: int | None = None,
                      **extra: Any) -> None:
    """The one writer of a stage's submit.json: who holds the stage (executor, job or job name, host, pid and the
    pid's start time, so a reused pid is not taken for it) and since when."""
    files = RunPaths(run_dir).stage(stage_id)
    atomic.write_json(files.submit, {"executor": executor, "job_id": job_id, "host": this_host(), "pid": pid,
                                     "pid_start": process_start(pid) if pid else None,
                                     "submitted_at": time.time(), "log_path": str(files.log), **extra})


def record_cancel(run_dir: Path, stage_id: str, how: str) -> None:
    """Mark a stage cancelled (error.json with ``cancelled``), as `gridlab cancel` does."""
    who = holder_record("cancel")
    atomic.write_json(RunPaths(run_dir).stage(stage_id).error, {
        "error": f"cancelled by {who['user']} on {who['host']} ({how})", "cancelled": True,
        "finished": time.time(), "traceback": []})


def cancelled_since(run_dir: Path, stage_id: str, since: float) -> bool:
    error = read_json(RunPaths(run_dir).stage(stage_id).error)
    return is_cancel_record(error) and error.get("finished", 0) >= since


# ------------------------------------------------------------------------------------------------------ submission

@dataclass
class Selection:
    """What one `gridlab submit` does with each stage."""

    to_run: list[Any] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)          # queued or running: left alone
    unknown: list[StageState] = field(default_factory=list)  # maybe held, nobody can say: left alone, never rerun
    failed: list[StageState] = field(default_factory=list)   # failed / cancelled: rerun only with retry_failed
    lingering: list[StageState] = field(default_factory=list)  # failed, but the job still runs: not rerun yet
    skipped: list[str] = field(default_factory=list)         # not selected by --where


def select(plan, states: dict[str, StageState], retry_failed: bool, only: set[str] | None = None) -> Selection:
    """Sort a plan's stages by what submit does with them; ``only``: the stage ids --where selected."""
    selection = Selection()
    for stage in plan.stages.values():
        state = states[stage.id]
        if only is not None and stage.id not in only:
            selection.skipped.append(stage.id)
        elif state.status == "done":
            selection.done.append(stage.id)
        elif state.lingering:
            selection.lingering.append(state)
        elif state.status == "unknown" and state.submitted:
            selection.unknown.append(state)
        elif state.status in ACTIVE and state.submitted:
            selection.active.append(stage.id)
        elif state.status in ("failed", "cancelled") and not retry_failed:
            selection.failed.append(state)
        else:
            selection.to_run.append(stage)
    return selection


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def _stage_ranks(plan, stage) -> int:
    return plan.spec.resources.for_kind(stage.kind)["ranks"]


def _assigned(run_dir: Path, stage_id: str, pid: int) -> None:
    record_submission(run_dir, stage_id, "local", f"local-{pid}", pid)


def _thread_environment(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "GRIDLAB_THREADS": str(threads)}


def _fail_unless_reported(run_dir: Path, stage_id: str, how: str) -> str:
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


def _how_it_ended(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"


class _Worker:
    """A long-lived worker process (``python -m gridlab.stages --serve RUN_DIR``) that runs the stage ids written to
    its stdin one at a time and answers "done ID" or "failed ID" on its stdout. Keeping workers alive pays the
    torch/transformers import once per worker instead of once per stage."""

    slots = 1

    def __init__(self, run_dir: Path, threads: int):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gridlab.stages", "--serve", str(run_dir)], env=_thread_environment(threads),
            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=1)
        self.stage_id: str | None = None
        self.started = 0.0

    def alive(self) -> bool:
        return self.process.poll() is None

    def assign(self, run_dir: Path, stage_id: str) -> None:
        _assigned(run_dir, stage_id, self.process.pid)
        self.stage_id, self.started = stage_id, time.time()
        self.process.stdin.write(stage_id + "\n")
        self.process.stdin.flush()

    def finished(self, run_dir: Path) -> str | None:
        """The status of the worker's stage once it has finished, else None."""
        import select

        readable, _, _ = select.select([self.process.stdout], [], [], 0)
        if readable:
            answer = self.process.stdout.readline().split()
            if answer and answer[-1] == self.stage_id:
                return _fail_unless_reported(run_dir, self.stage_id, "the stage") if answer[0] != "done" else "done"
        if self.process.poll() is None:
            return None
        return _fail_unless_reported(run_dir, self.stage_id, f"worker {_how_it_ended(self.process.returncode)}")

    def terminate(self) -> None:
        self.process.terminate()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class _RankGroup:
    """One multi-process stage run locally: ``ranks`` processes of ``python -m gridlab.stages RUN_DIR STAGE_ID``
    joined the way torchrun joins them (MASTER_ADDR/MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE; gloo on CPU). It
    holds ``ranks`` of the local executor's worker slots and ends with its stage; if one rank dies, the others are
    stopped rather than left waiting in a collective."""

    def __init__(self, run_dir: Path, stage_id: str, ranks: int, threads: int):
        port = _free_port()
        self.slots = ranks
        self.processes = []
        for rank in range(ranks):
            environment = {**_thread_environment(threads), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                           "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                           "LOCAL_WORLD_SIZE": str(ranks)}
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "gridlab.stages", str(run_dir), stage_id], env=environment,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        record_submission(run_dir, stage_id, "local", f"local-{self.processes[0].pid}", self.processes[0].pid,
                          pids=[process.pid for process in self.processes])
        self.stage_id: str | None = stage_id
        self.started = time.time()

    def alive(self) -> bool:
        return any(process.poll() is None for process in self.processes)

    def finished(self, run_dir: Path) -> str | None:
        codes = [process.poll() for process in self.processes]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            self.terminate()
            for process in self.processes:
                process.wait()
            rank, code = failed[0]
            return _fail_unless_reported(run_dir, self.stage_id, f"rank {rank} {_how_it_ended(code)}")
        if any(code is None for code in codes):
            return None
        return _fail_unless_reported(run_dir, self.stage_id, "all ranks exited")

    def terminate(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()

    def stop(self) -> None:
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Executor:
    """What every executor does: ``run`` the selected stages of a plan. ``finishes`` says whether ``run`` returns
    with them finished (local, debug) or as soon as they are submitted (slurm)."""

    name: str
    finishes: bool

    def run(self, run_dir: Path, plan, selection: Selection, states: dict[str, StageState]) -> dict[str, str]:
        """Stage id → what happened to it ("done", "failed", "cancelled", "blocked", "submitted")."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """A scheduler loop in this process running ready stages in parallel worker processes.

    Each worker gets cores ÷ workers torch threads (OMP_NUM_THREADS and torch.set_num_threads), so workers share the
    machine without oversubscribing it. A worker that dies (killed, crashed) fails its stage and is replaced. A stage
    whose resources ask for N ranks (nodes × tasks_per_node, train and parent only) runs as N processes that take N
    worker slots (all of them, waiting for the others to finish, when N exceeds the pool). `gridlab cancel` from
    another terminal marks stages cancelled: the loop starts none of them and ends those it runs.
    """

    name = "local"
    finishes = True

    def __init__(self, workers: int, report: Callable[[str], None] = print, poll_s: float = 0.2):
        self.workers = workers
        self.threads = max(1, available_cores() // workers)
        self.report = report
        self.poll_s = poll_s

    def run(self, run_dir: Path, plan, selection: Selection, states: dict[str, StageState]) -> dict[str, str]:
        """Run the selected stages to completion; stage id → final status ("done", "failed", "cancelled",
        "blocked")."""
        done = set(selection.done)
        waiting = list(selection.to_run)
        blocked_by = {s.stage_id for s in selection.failed + selection.unknown + selection.lingering}
        workers: list[_Worker | _RankGroup] = []
        outcome: dict[str, str] = {}
        total = len(waiting)
        for stage in waiting:
            clear_outcome(RunPaths(run_dir).stage(stage.id))
        started = time.time()

        def finish(stage_id: str, status: str, detail: str) -> None:
            outcome[stage_id] = status
            (done if status == "done" else blocked_by).add(stage_id)
            self.report(f"[{len(outcome)}/{total}] {status:9} {plan.stages[stage_id].kind:9} {stage_id} {detail}")

        try:
            while waiting or any(w.stage_id for w in workers):
                for worker in [w for w in workers if w.stage_id]:
                    if cancelled_since(run_dir, worker.stage_id, started) and worker.alive():
                        worker.terminate()
                    status = worker.finished(run_dir)
                    if status:
                        stage_id, worker.stage_id = worker.stage_id, None
                        finish(stage_id, status, f"({time.time() - worker.started:.0f} s)")
                workers = [w for w in workers if w.stage_id or (isinstance(w, _Worker) and w.alive())]
                for stage in list(waiting):
                    deps = set(stage.deps.values())
                    if cancelled_since(run_dir, stage.id, started):
                        waiting.remove(stage)
                        finish(stage.id, "cancelled", "(gridlab cancel)")
                    elif deps & blocked_by:
                        waiting.remove(stage)
                        finish(stage.id, "blocked", "(upstream failed, cancelled or unknown)")
                    elif deps <= done:
                        ranks = _stage_ranks(plan, stage)
                        if ranks > 1:
                            group = self._start_group(run_dir, stage.id, ranks, workers)
                            if group is None:
                                break
                            workers.append(group)
                            waiting.remove(stage)
                            continue
                        idle = next((w for w in workers if w.stage_id is None), None)
                        if idle is None and sum(w.slots for w in workers) < self.workers:
                            idle = _Worker(run_dir, self.threads)
                            workers.append(idle)
                        if idle is None:
                            break
                        waiting.remove(stage)
                        idle.assign(run_dir, stage.id)
                if waiting and not any(w.stage_id for w in workers):
                    # Nothing runs and nothing could start: the rest waits on stages another submission holds.
                    for stage in list(waiting):
                        waiting.remove(stage)
                        finish(stage.id, "blocked", "(waits on a stage queued or running elsewhere)")
                if waiting or any(w.stage_id for w in workers):
                    time.sleep(self.poll_s)
        finally:
            for worker in workers:
                if worker.stage_id:
                    worker.terminate()
                worker.stop()
        return outcome

    def _start_group(self, run_dir: Path, stage_id: str, ranks: int, workers: list) -> _RankGroup | None:
        """Start a rank group when its slots are free, stopping idle workers to make room; None: not yet."""
        busy = sum(w.slots for w in workers if w.stage_id)
        if busy and busy + ranks > self.workers:
            return None
        idle = [w for w in workers if w.stage_id is None]
        while idle and busy + sum(w.slots for w in idle) + ranks > self.workers:
            worker = idle.pop()
            worker.stop()
            workers.remove(worker)
        threads = max(1, available_cores() // max(self.workers, ranks))
        return _RankGroup(run_dir, stage_id, ranks, threads)


class DebugExecutor(LocalExecutor):
    """Stages one after another in this process (for pdb); same bookkeeping as local."""

    name = "debug"

    def __init__(self, report: Callable[[str], None] = print):
        super().__init__(workers=1, report=report)

    def run(self, run_dir: Path, plan, selection: Selection, states: dict[str, StageState]) -> dict[str, str]:
        from gridlab.stages import execute_stage

        done = set(selection.done)
        failed = {s.stage_id for s in selection.failed + selection.unknown + selection.lingering}
        outcome = {}
        for stage in selection.to_run:
            if set(stage.deps.values()) & failed:
                failed.add(stage.id)
                outcome[stage.id] = "blocked"
                continue
            clear_outcome(RunPaths(run_dir).stage(stage.id))
            record_submission(run_dir, stage.id, "debug", None, os.getpid())
            ok = execute_stage(run_dir, stage.id, redirect_output=False)
            (done if ok else failed).add(stage.id)
            outcome[stage.id] = "done" if ok else "failed"
            self.report(f"{outcome[stage.id]:6} {stage.kind:9} {stage.id}")
        return outcome


class StageJob(submitit.helpers.Checkpointable):
    """The callable a SLURM array task runs, once per task (rank) of a multi-task job: each rank runs the stage,
    training joins the job's process group from submitit's JobEnvironment, and rank 0 writes the result. On
    preemption or timeout submitit requeues it with the same arguments; the stage then resumes from its own
    checkpoint (training resumes from out_dir/checkpoint, at any world size)."""

    def __call__(self, run_dir: str, stage_id: str) -> bool:
        from gridlab.stages import execute_stage

        threads = os.environ.get("SLURM_CPUS_PER_TASK", "1")
        os.environ["OMP_NUM_THREADS"] = os.environ["GRIDLAB_THREADS"] = threads
        ok = execute_stage(Path(run_dir), stage_id)
        if not ok:
            raise RuntimeError(f"stage {stage_id} failed; see {RunPaths(run_dir).stage(stage_id).log}")
        return ok


def max_array_size() -> int:
    answer = run_command(["scontrol", "show", "config"])
    match = re.search(r"MaxArraySize\s*=\s*(\d+)", answer.stdout) if answer.ok else None
    return int(match.group(1)) if match else 1001


class _Submitter(submitit.SlurmExecutor):
    """submitit's SLURM executor with a time limit on sbatch: a hung sbatch must not hang `gridlab submit`."""

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return ["timeout", f"{3 * scheduler_timeout_s():g}", "sbatch", str(submission_file_path)]


def sbatch_parameters(resources: dict[str, Any], name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one stage kind's merged resources (gridlab.spec.ResourceSpec)."""
    mem_gb = resources["mem_gb"]
    parameters: dict[str, Any] = {
        "job_name": name, "cpus_per_task": resources["cpus"],
        "mem": f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{round(mem_gb * 1024)}MB",
        "time": resources["time_min"], "array_parallelism": resources["array_parallelism"],
        "nodes": resources["nodes"], "ntasks_per_node": resources["tasks_per_node"],
    }
    if resources["gpus_per_node"]:
        parameters["gpus_per_node"] = resources["gpus_per_node"]
    for key in ("partition", "account", "qos", "constraint", "gres", "exclude", "nodelist", "mail_type",
                "mail_user", "comment"):
        if resources.get(key):
            parameters[key] = resources[key]
    if resources.get("reservation"):
        parameters.setdefault("additional_parameters", {})["reservation"] = resources["reservation"]
    if resources.get("setup"):
        parameters["setup"] = list(resources["setup"])
    if resources.get("sbatch"):
        parameters.setdefault("additional_parameters", {}).update(resources["sbatch"])
    return parameters


class SlurmExecutor(Executor):
    """Submits one job array per stage kind (chunked below MaxArraySize) with dependencies along the DAG, and
    returns at once.

    A SLURM dependency holds a whole array, so one failed task under `afterok` would cancel every task of the next
    kind, including those that do not need it. Arrays therefore wait with `afterany` for their upstream tasks to end,
    and each task checks its own upstream results first: a stage whose input is missing fails at once, naming it,
    while its siblings run.

    Each array gets a fresh job name (gridlab-<grid>-<kind>-<token>), written into its stages' submission records
    before sbatch runs; the job ids are written after. A crash in between leaves records that name the job, and the
    next `submit` or `status` finds the job by that name in squeue/sacct (gridlab.state) instead of submitting it
    again."""

    name = "slurm"
    finishes = False

    def __init__(self, report: Callable[[str], None] = print):
        self.report = report

    def run(self, run_dir: Path, plan, selection: Selection, states: dict[str, StageState]) -> dict[str, str]:
        job_of = {sid: s.job_id for sid, s in states.items() if s.held and s.job_id}
        done = set(selection.done)
        chunk_size = max(1, max_array_size() - 1)
        folder = RunPaths(run_dir).slurm_dir
        outcome = {}
        # Nothing is submitted below a stage that is failed, cancelled or unknown and not rerun: it would only fail
        # for want of its input (or, unknown, wait on a job that may not exist).
        blocked = {s.stage_id for s in selection.failed + selection.unknown + selection.lingering}
        for kind in STAGE_KINDS:
            stages = []
            for stage in (s for s in selection.to_run if s.kind == kind):
                if set(stage.deps.values()) & blocked:
                    blocked.add(stage.id)
                    outcome[stage.id] = "blocked"
                else:
                    stages.append(stage)
            if len(stages) < sum(1 for s in selection.to_run if s.kind == kind):
                self.report(f"not submitted: {sum(1 for s in selection.to_run if s.kind == kind) - len(stages)} "
                            f"{kind} stage(s) below a failed, cancelled or unknown stage")
            for start in range(0, len(stages), chunk_size):
                chunk = stages[start:start + chunk_size]
                jobs = self._submit_chunk(run_dir, folder, plan, kind, chunk, job_of, done)
                for stage, job in zip(chunk, jobs, strict=True):
                    job_of[stage.id] = job.job_id
                    outcome[stage.id] = "submitted"
                self.report(f"submitted {len(chunk)} {kind} stage(s) as {'array ' if len(chunk) > 1 else 'job '}"
                            f"{jobs[0].job_id.split('_')[0]}")
        return outcome

    def _submit_chunk(self, run_dir, folder, plan, kind, chunk, job_of, done):
        resources = plan.spec.resources.for_kind(kind)
        name = f"gridlab-{plan.spec.name}-{kind}-{secrets.token_hex(4)}"
        executor = _Submitter(folder=folder / "%j")
        parameters = sbatch_parameters(resources, name)
        dependency = _dependency([dep for stage in chunk for dep in stage.deps.values() if dep not in done],
                                 job_of)
        if dependency:
            parameters.setdefault("additional_parameters", {})["dependency"] = dependency
        executor.update_parameters(**parameters)
        asked = {key: resources[key] for key in ("mem_gb", "time_min")}
        for index, stage in enumerate(chunk):
            clear_outcome(RunPaths(run_dir).stage(stage.id))
            record_submission(run_dir, stage.id, "slurm", None, job_name=name,
                              array_task=str(index) if len(chunk) > 1 else None, resources=asked)
        ids = [stage.id for stage in chunk]
        try:
            jobs = executor.map_array(StageJob(), [str(run_dir)] * len(ids), ids)
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as error:
            message = (str(error).strip().splitlines() or ["sbatch gave no message"])[-1]
            timed_out = getattr(error.__cause__, "returncode", None) == 124
            if timed_out or isinstance(error, submitit.core.utils.FailedSubmissionError):
                # sbatch hung or answered something unreadable: the job may exist. The records name it, and the
                # next submit or status looks it up by that name.
                what = (f"did not answer within {3 * scheduler_timeout_s():g} s" if timed_out
                        else f"answered something unreadable ({message})")
                raise UserError(f"sbatch {what} while submitting {len(ids)} {kind} stage(s) as {name}; whether "
                                f"SLURM has them is unknown until it answers: run `gridlab status` or `gridlab "
                                f"submit` again later") from None
            for stage in chunk:   # sbatch refused the array: nobody holds these stages
                RunPaths(run_dir).stage(stage.id).submit.unlink(missing_ok=True)
            raise UserError(f"sbatch refused the {kind} stages ({name}): {message}; check "
                            f"[resources.{resource_table(kind)}] (or [resources.default])") from None
        for index, (stage, job) in enumerate(zip(chunk, jobs, strict=True)):
            record_submission(run_dir, stage.id, "slurm", job.job_id, job_name=name,
                              array_task=str(index) if len(chunk) > 1 else None, resources=asked,
                              slurm_log=str(job.paths.stdout))
        return jobs


def _dependency(deps: list[str], job_of: dict[str, str]) -> str | None:
    jobs = sorted({job_of[dep] for dep in deps if dep in job_of})
    if not jobs:
        return None
    if len(jobs) > _MAX_TASK_DEPENDENCIES:
        jobs = sorted({job.split("_")[0] for job in jobs})
    return "afterany:" + ":".join(jobs)


EXECUTORS = ("local", "debug", "slurm")
SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "scancel")
_RESOURCE_TABLES = ("default", "data", "parent", "prune", "init", "train", "eval")


def slurm_preflight(spec, submitting: bool, source: str = "grid") -> list[str]:
    """Checks before anything goes to SLURM. Its commands must be on PATH (a UserError when submitting; a warning on
    a dry run), and the partitions and accounts the grid's [resources] name must exist (sinfo, sacctmgr): a name the
    cluster does not have is a UserError naming the key; when the cluster cannot say, a warning says they could not
    be checked. Returns the warnings. ``source``: the grid file, named in the errors about its keys."""
    import getpass
    import shutil

    named: dict[str, dict[str, str]] = {"partition": {}, "account": {}}
    for table in _RESOURCE_TABLES:
        for key in named:
            value = getattr(getattr(spec.resources, table), key)
            if value:
                named[key].setdefault(value, f"resources.{table}.{key}")
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if missing:
        message = (f"--executor slurm: no SLURM commands here ({', '.join(missing)} not on PATH), so the partitions "
                   f"and accounts of [resources] cannot be checked")
        if submitting:
            raise UserError(f"{message}; submit from a machine of the cluster (a login node)")
        return [message]
    warnings = []
    queries = {"partition": ["sinfo", "-h", "-o", "%R"],
               "account": ["sacctmgr", "-n", "-P", "show", "associations", f"user={getpass.getuser()}",
                           "format=account"]}
    for key, names in named.items():
        if not names:
            continue
        answer = run_command(queries[key])
        known = {word.strip() for word in answer.stdout.split()} if answer.ok else set()
        if not known:
            warnings.append(f"the {key}s of [resources] ({', '.join(sorted(names))}) cannot be checked: "
                            f"{answer.problem or f'{queries[key][0]} lists none'}")
            continue
        for value, where in names.items():
            if value not in known:
                raise UserError(f"{source}: {where}: {value!r} is not {'an' if key == 'account' else 'a'} {key} "
                                f"of this cluster"
                                f"{' for this user' if key == 'account' else ''}; valid: {', '.join(sorted(known))}")
    return warnings


def make_executor(name: str, workers: int, report: Callable[[str], None] = print) -> Executor:
    if name == "local":
        return LocalExecutor(workers, report)
    if name == "debug":
        return DebugExecutor(report)
    if name == "slurm":
        return SlurmExecutor(report)
    raise UserError(f"unknown executor {name!r}; valid executors: {', '.join(EXECUTORS)}")


# ------------------------------------------------------------------------------------------------------ cancel

@dataclass
class CancelOutcome:
    cancelled: list[str] = field(default_factory=list)      # stages marked cancelled
    jobs: list[str] = field(default_factory=list)           # SLURM jobs scancel'led
    pids: list[int] = field(default_factory=list)           # local worker processes stopped
    problems: list[str] = field(default_factory=list)       # what could not be cancelled (left as it was)


_SCANCEL_BENIGN = ("Invalid job id specified", "already completing or completed", "Job/step already")


def cancel_stages(run_dir: Path, states: Iterable[StageState], also_waiting: bool = False) -> CancelOutcome:
    """Stop the jobs and local workers holding these stages and mark the stages cancelled.

    Fail closed: a stage whose SLURM job scancel could not be sure to stop (scancel failed or did not answer) is
    left as it was and reported in ``problems``; so is one held by a local worker on another host. ``also_waiting``:
    mark stages nobody holds yet too (a local submit still running will then not start them)."""
    outcome = CancelOutcome()
    slurm = [s for s in states if s.held and s.executor == "slurm"]
    local = [s for s in states if s.held and s.executor in ("local", "debug")]
    waiting = [s for s in states if also_waiting and not s.held and s.status in ACTIVE]
    jobs: dict[str, list[StageState]] = {}
    by_name: dict[str, list[StageState]] = {}
    for state in slurm:
        if state.job_id:
            jobs.setdefault(state.job_id, []).append(state)
        elif state.job_name:
            by_name.setdefault(state.job_name, []).append(state)
    if jobs:
        answer = run_command(["scancel", *sorted(jobs)])
        if _only_benign_scancel_errors(answer):
            outcome.jobs.extend(sorted(jobs))
            for job_states in jobs.values():
                for state in job_states:
                    record_cancel(run_dir, state.stage_id, f"scancel {state.job_id}")
                    outcome.cancelled.append(state.stage_id)
        else:
            outcome.problems.append(f"scancel of {len(jobs)} job(s) failed ({answer.problem}); their stages are "
                                    f"left as they were")
    for name, named in by_name.items():
        answer = run_command(["scancel", f"--name={name}"])
        if answer.ok:
            outcome.jobs.append(name)
            for state in named:
                record_cancel(run_dir, state.stage_id, f"scancel --name={name}")
                outcome.cancelled.append(state.stage_id)
        else:
            outcome.problems.append(f"scancel --name={name} failed ({answer.problem}); its stages are left as they "
                                    f"were")
    for state in local:
        record = read_json(RunPaths(run_dir).stage(state.stage_id).submit) or {}
        pids = record.get("pids") or [record.get("pid")]
        alive = process_alive(record.get("pid"), record.get("host"), record.get("pid_start"))
        if alive is None:
            outcome.problems.append(f"{state.stage_id} is run by pid {record.get('pid')} on host "
                                    f"{record.get('host')}; cancel it from there")
            continue
        # Mark first: the worker's exit is then read as a cancellation, and a running local submit starts
        # nothing more for this stage.
        record_cancel(run_dir, state.stage_id, f"stopped pid {record.get('pid')}")
        outcome.cancelled.append(state.stage_id)
        if alive and record.get("executor") == "local":
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                    outcome.pids.append(pid)
                except (ProcessLookupError, PermissionError) as error:
                    outcome.problems.append(f"could not stop pid {pid} of {state.stage_id}: {error}")
    for state in waiting:
        record_cancel(run_dir, state.stage_id, "not started")
        outcome.cancelled.append(state.stage_id)
    return outcome


def _only_benign_scancel_errors(answer) -> bool:
    """scancel exits non-zero when a listed job has already ended; that is no reason to doubt the others."""
    if answer.ok:
        return True
    errors = [line for line in answer.stderr.splitlines() if line.strip()]
    return bool(errors) and not answer.timed_out and all(any(b in line for b in _SCANCEL_BENIGN) for line in errors)


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
