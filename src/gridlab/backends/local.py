"""The ``local`` backend: a scheduler loop in the submitting process feeding ready stages to worker processes.

Workers are long-lived (``python -m gridlab.stages --serve RUN_DIR``: stage ids on stdin, "done|failed ID" on
stdout), so torch and transformers are imported once per worker, not once per stage. Its resource model: ``workers``
slots on this machine, each worker cores ÷ workers torch threads (OMP_NUM_THREADS, torch.set_num_threads), so
workers share the machine without oversubscribing it; a stage whose resources ask for N ranks (nodes ×
tasks_per_node: train and parent only) runs as a rank group of N processes joined as torchrun joins them, holding
N slots (all of them, waiting for the others to finish, when N exceeds the pool).

A worker that dies (killed, crashed) fails its stage and is replaced. `gridlab cancel` from another terminal marks
stages cancelled: the loop starts none of them and ends those it runs. A stage a local worker holds is running while
its process lives (``gridlab.lock.process_alive``: host, pid and start time); one held on another host is unknown.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gridlab.backends import Backend, CancelOutcome
from gridlab.backends.records import (
    cancelled_since,
    fail_unless_reported,
    read_submission,
    record_cancel,
    record_submission,
)
from gridlab.layout import RunPaths
from gridlab.lock import process_alive
from gridlab.results import clear_outcome


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def worker_threads(workers: int, ranks: int = 1) -> int:
    """The torch threads each process of a pool of ``workers`` gets (a rank group of more ranks: cores ÷ ranks)."""
    return max(1, available_cores() // max(1, workers, ranks))


def _thread_environment(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "GRIDLAB_THREADS": str(threads)}


def _how_it_ended(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"


class _Worker:
    """A long-lived worker process that runs the stage ids written to its stdin one at a time and answers "done ID"
    or "failed ID" on its stdout."""

    slots = 1

    def __init__(self, run_dir: Path, threads: int, backend: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gridlab.stages", "--serve", str(run_dir)], env=_thread_environment(threads),
            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=1)
        self.backend = backend
        self.stage_id: str | None = None
        self.started = 0.0

    def alive(self) -> bool:
        return self.process.poll() is None

    def assign(self, run_dir: Path, stage_id: str) -> None:
        record_submission(run_dir, stage_id, self.backend, f"local-{self.process.pid}", self.process.pid)
        self.stage_id, self.started = stage_id, time.time()
        self.process.stdin.write(stage_id + "\n")
        self.process.stdin.flush()

    def finished(self, run_dir: Path) -> str | None:
        """The status of the worker's stage once it has finished, else None."""
        readable, _, _ = select.select([self.process.stdout], [], [], 0)
        if readable:
            answer = self.process.stdout.readline().split()
            if answer and answer[-1] == self.stage_id:
                return fail_unless_reported(run_dir, self.stage_id, "the stage") if answer[0] != "done" else "done"
        if self.process.poll() is None:
            return None
        return fail_unless_reported(run_dir, self.stage_id, f"worker {_how_it_ended(self.process.returncode)}")

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
    holds ``ranks`` of the pool's slots and ends with its stage; if one rank dies, the others are stopped rather
    than left waiting in a collective."""

    def __init__(self, run_dir: Path, stage_id: str, ranks: int, threads: int, backend: str):
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
        record_submission(run_dir, stage_id, backend, f"local-{self.processes[0].pid}", self.processes[0].pid,
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
            return fail_unless_reported(run_dir, self.stage_id, f"rank {rank} {_how_it_ended(code)}")
        if any(code is None for code in codes):
            return None
        return fail_unless_reported(run_dir, self.stage_id, "all ranks exited")

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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalBackend(Backend):
    """Ready stages in parallel worker processes on this machine (module docstring)."""

    name = "local"
    finishes = True
    stops_processes = True      # cancel stops the processes holding a stage (debug: the submitting process itself)

    def __init__(self, workers: int = 1, report=print, poll_s: float = 0.2):
        super().__init__(workers, report)
        self.threads = worker_threads(workers)
        self.poll_s = poll_s

    @staticmethod
    def ranks(plan, stage) -> int:
        """The processes a stage runs as (its kind's nodes × tasks_per_node), each holding one worker slot."""
        return plan.spec.resources.for_kind(stage.kind)["ranks"]

    def run(self, run_dir: Path, plan, triage, states) -> dict[str, str]:
        """Run the selected stages to completion; stage id → final status ("done", "failed", "cancelled",
        "blocked")."""
        done = set(triage.done)
        waiting = list(triage.to_run)
        blocked_by = {s.stage_id for s in triage.failed + triage.unknown + triage.lingering}
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
                        ranks = self.ranks(plan, stage)
                        if ranks > 1:
                            group = self._start_group(run_dir, stage.id, ranks, workers)
                            if group is None:
                                break
                            workers.append(group)
                            waiting.remove(stage)
                            continue
                        idle = next((w for w in workers if w.stage_id is None), None)
                        if idle is None and sum(w.slots for w in workers) < self.workers:
                            idle = _Worker(run_dir, self.threads, self.name)
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
        return _RankGroup(run_dir, stage_id, ranks, worker_threads(self.workers, ranks), self.name)

    def observe(self, run_dir: Path, held: list[tuple[Any, dict[str, Any]]], cache) -> None:
        """Running while the recorded process lives; nobody holds a stage whose process is gone (or that failed);
        unknown when the process is on another host."""
        for state, record in held:
            if state.status in ("failed", "cancelled"):
                state.submitted = False
                continue
            alive = process_alive(record.get("pid"), record.get("host"), record.get("pid_start"))
            if alive is None:
                state.status = "unknown"
                state.error = (f"held by a {self.name} worker (pid {record.get('pid')}) on host "
                               f"{record.get('host')}; its state can only be seen from that host")
            elif alive:
                state.status = "running"
            else:
                state.submitted = False

    def cancel(self, run_dir: Path, states: list) -> CancelOutcome:
        """Mark each stage cancelled, then stop its processes (SIGTERM); one held on another host is left alone."""
        outcome = CancelOutcome()
        for state in states:
            record = read_submission(run_dir, state.stage_id)
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
            if alive and self.stops_processes:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGTERM)
                        outcome.pids.append(pid)
                    except (ProcessLookupError, PermissionError) as error:
                        outcome.problems.append(f"could not stop pid {pid} of {state.stage_id}: {error}")
        return outcome
