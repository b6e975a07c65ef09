"""Run a plan's stages: `local` (parallel worker processes), `debug` (in-process) or `slurm` (submitit job arrays).

Submission is idempotent: a stage with a result is skipped, one the scheduler still holds is left alone, a failed or
cancelled one is reported (and resubmitted with ``retry_failed``), and everything else is submitted. Per-stage state
lives in small files under runs/<grid>/stages/<id>/ (gridlab.layout, gridlab.state), so status never needs the DuckDB
file.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit

from gridlab import atomic
from gridlab.contracts import STAGE_KINDS
from gridlab.errors import UserError
from gridlab.layout import RunPaths
from gridlab.plan import write_plan_files
from gridlab.results import clear_outcome
from gridlab.state import ACTIVE, STATES, StageState, run_command, stage_states

# How many explicit array-task dependencies one job may list before we depend on whole arrays instead.
_MAX_TASK_DEPENDENCIES = 200


def prepare(plan, run_dir: Path) -> None:
    """Write each stage's stage.json (content-addressed: an existing complete one is already right), then plan.json
    and index.json."""
    run = RunPaths(run_dir)
    run.stages_dir.mkdir(parents=True, exist_ok=True)
    for stage in plan.stages.values():
        files = run.stage(stage.id)
        if not files.stage.exists():
            atomic.write_text(files.stage, stage.model_dump_json())
    write_plan_files(run_dir, plan)


def record_submission(run_dir: Path, stage_id: str, executor: str, job_id: str | None, pid: int | None = None,
                      **extra: Any) -> None:
    """The one writer of a stage's submit.json: who holds the stage (executor, job, host, pid) and since when."""
    files = RunPaths(run_dir).stage(stage_id)
    atomic.write_json(files.submit, {"executor": executor, "job_id": job_id, "host": socket.gethostname(),
                                     "pid": pid, "submitted_at": time.time(), "log_path": str(files.log), **extra})


# ------------------------------------------------------------------------------------------------------ submission

@dataclass
class Selection:
    """What one `gridlab submit` does with each stage."""

    to_run: list[dict[str, Any]] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    failed: list[StageState] = field(default_factory=list)


def select(plan, states: dict[str, StageState], retry_failed: bool) -> Selection:
    selection = Selection()
    for stage in plan.stages.values():
        state = states[stage.id]
        if state.status == "done":
            selection.done.append(stage.id)
        elif state.status in ACTIVE and state.submitted:
            selection.active.append(stage.id)
        elif state.status in ("failed", "cancelled") and not retry_failed:
            selection.failed.append(state)
        else:
            selection.to_run.append(stage)
    return selection


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def _stage_ranks(plan, stage: dict[str, Any]) -> int:
    return plan.spec.resources.for_kind(stage.kind)["ranks"]


def _assigned(run_dir: Path, stage_id: str, pid: int) -> None:
    clear_outcome(RunPaths(run_dir).stage(stage_id))
    record_submission(run_dir, stage_id, "local", f"local-{pid}", pid)


def _thread_environment(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "GRIDLAB_THREADS": str(threads)}


def _fail_unless_reported(run_dir: Path, stage_id: str, how: str) -> str:
    """A stage whose process(es) ended: done if its result exists, else failed (with an error file saying how)."""
    files = RunPaths(run_dir).stage(stage_id)
    if files.result.exists():
        return "done"
    if not files.error.exists():
        atomic.write_json(files.error, {
            "error": f"{how} before writing its result", "finished": time.time(), "traceback": []})
    return "failed"


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
                return answer[0]
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
        clear_outcome(RunPaths(run_dir).stage(stage_id))
        for rank in range(ranks):
            environment = {**_thread_environment(threads), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                           "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                           "LOCAL_WORLD_SIZE": str(ranks)}
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "gridlab.stages", str(run_dir), stage_id], env=environment,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        record_submission(run_dir, stage_id, "local", f"local-{self.processes[0].pid}", self.processes[0].pid)
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
        """Stage id → what happened to it ("done", "failed", "blocked", "submitted")."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """A scheduler loop in this process running ready stages in parallel worker processes.

    Each worker gets cores ÷ workers torch threads (OMP_NUM_THREADS and torch.set_num_threads), so workers share the
    machine without oversubscribing it. A worker that dies (killed, crashed) fails its stage and is replaced. A stage
    whose resources ask for N ranks (nodes × tasks_per_node, train and parent only) runs as N processes that take N
    worker slots (all of them, waiting for the others to finish, when N exceeds the pool).
    """

    name = "local"
    finishes = True

    def __init__(self, workers: int, report: Callable[[str], None] = print, poll_s: float = 0.2):
        self.workers = workers
        self.threads = max(1, available_cores() // workers)
        self.report = report
        self.poll_s = poll_s

    def run(self, run_dir: Path, plan, selection: Selection, states: dict[str, StageState]) -> dict[str, str]:
        """Run the selected stages to completion; stage id → final status ("done", "failed", "blocked")."""
        done = set(selection.done)
        waiting = list(selection.to_run)
        blocked_by = {s.stage_id for s in selection.failed}
        workers: list[_Worker | _RankGroup] = []
        outcome: dict[str, str] = {}
        total = len(waiting)

        def finish(stage_id: str, status: str, detail: str) -> None:
            outcome[stage_id] = status
            (done if status == "done" else blocked_by).add(stage_id)
            self.report(f"[{len(outcome)}/{total}] {status:7} {plan.stages[stage_id].kind:6} {stage_id} {detail}")

        try:
            while waiting or any(w.stage_id for w in workers):
                for worker in [w for w in workers if w.stage_id]:
                    status = worker.finished(run_dir)
                    if status:
                        stage_id, worker.stage_id = worker.stage_id, None
                        finish(stage_id, status, f"({time.time() - worker.started:.0f} s)")
                workers = [w for w in workers if w.stage_id or (isinstance(w, _Worker) and w.alive())]
                for stage in list(waiting):
                    deps = set(stage.deps.values())
                    if deps & blocked_by:
                        waiting.remove(stage)
                        finish(stage.id, "blocked", "(upstream failed)")
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

        done, failed = set(selection.done), {s.stage_id for s in selection.failed}
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
            self.report(f"{outcome[stage.id]:6} {stage.kind:6} {stage.id}")
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
    match = re.search(r"MaxArraySize\s*=\s*(\d+)", run_command(["scontrol", "show", "config"]))
    return int(match.group(1)) if match else 1001


class SlurmExecutor(Executor):
    """Submits one job array per stage kind (chunked below MaxArraySize) with dependencies along the DAG, and
    returns at once.

    A SLURM dependency holds a whole array, so one failed task under `afterok` would cancel every task of the next
    kind, including those that do not need it. Arrays therefore wait with `afterany` for their upstream tasks to end,
    and each task checks its own upstream results first: a stage whose input is missing fails at once, naming it,
    while its siblings run."""

    name = "slurm"
    finishes = False

    def __init__(self, report: Callable[[str], None] = print):
        self.report = report

    def run(self, run_dir: Path, plan, selection: Selection, states: dict[str, StageState]) -> dict[str, str]:
        job_of = {sid: s.job_id for sid, s in states.items() if s.status in ACTIVE and s.submitted and s.job_id}
        done = set(selection.done)
        chunk_size = max(1, max_array_size() - 1)
        folder = RunPaths(run_dir).slurm_dir
        outcome = {}
        for kind in STAGE_KINDS:
            stages = [s for s in selection.to_run if s.kind == kind]
            for start in range(0, len(stages), chunk_size):
                chunk = stages[start:start + chunk_size]
                jobs = self._submit_chunk(run_dir, folder, plan, kind, chunk, job_of, done)
                for stage, job in zip(chunk, jobs):
                    job_of[stage.id] = job.job_id
                    outcome[stage.id] = "submitted"
                    record_submission(run_dir, stage.id, "slurm", job.job_id, slurm_log=str(job.paths.stdout))
                self.report(f"submitted {len(chunk)} {kind} stage(s) as array {jobs[0].job_id.split('_')[0]}")
        return outcome

    def _submit_chunk(self, run_dir, folder, plan, kind, chunk, job_of, done):
        resources = plan.spec.resources.for_kind(kind)
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
        parameters = {
            "name": f"gridlab-{plan.spec.name}-{kind}", "cpus_per_task": resources["cpus"],
            "mem_gb": resources["mem_gb"], "timeout_min": resources["time_min"],
            "slurm_array_parallelism": resources["array_parallelism"],
            "nodes": resources["nodes"], "tasks_per_node": resources["tasks_per_node"],
        }
        if resources["gpus_per_node"]:
            parameters["gpus_per_node"] = resources["gpus_per_node"]
        if resources["partition"]:
            parameters["slurm_partition"] = resources["partition"]
        if resources["account"]:
            parameters["slurm_account"] = resources["account"]
        dependency = _dependency([dep for stage in chunk for dep in stage.deps.values() if dep not in done],
                                 job_of)
        if dependency:
            parameters["slurm_additional_parameters"] = {"dependency": dependency}
        executor.update_parameters(**parameters)
        for stage in chunk:
            clear_outcome(RunPaths(run_dir).stage(stage.id))
        ids = [stage.id for stage in chunk]
        return executor.map_array(StageJob(), [str(run_dir)] * len(ids), ids)


def _dependency(deps: list[str], job_of: dict[str, str]) -> str | None:
    jobs = sorted({job_of[dep] for dep in deps if dep in job_of})
    if not jobs:
        return None
    if len(jobs) > _MAX_TASK_DEPENDENCIES:
        jobs = sorted({job.split("_")[0] for job in jobs})
    return "afterany:" + ":".join(jobs)


EXECUTORS = ("local", "debug", "slurm")


def make_executor(name: str, workers: int, report: Callable[[str], None] = print) -> Executor:
    if name == "local":
        return LocalExecutor(workers, report)
    if name == "debug":
        return DebugExecutor(report)
    if name == "slurm":
        return SlurmExecutor(report)
    raise UserError(f"unknown executor {name!r}; valid executors: {', '.join(EXECUTORS)}")


def wait_for(run_dir: Path, stages: list[Any], report: Callable[[str], None] = print,
             poll_s: float = 5.0) -> dict[str, StageState]:
    """Block until no stage is pending or running, reporting counts when they change."""
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
        if not any(state.status in ACTIVE and state.submitted for state in states.values()):
            return states
        time.sleep(poll_s)
