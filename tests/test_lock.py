"""Liveness (host-aware, pid reuse, another user's process) and the run lock: a second submitter is told who holds
the run and exits 2 (or waits with --wait-lock), a lock whose holder died is taken over and reported, readers take
no lock; and interrupted bookkeeping (a Ctrl-C while preparing) recovers."""

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from gridlab import atomic, execute, lock
from gridlab.backends.records import record_submission
from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.plan import build_plan
from gridlab.spec import load_grid
from gridlab.state import stage_states

from runner_helpers import finish_stage, tiny_grid, write_grid


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_liveness_checks_host_pid_start_and_other_users():
    me = os.getpid()
    assert lock.process_alive(me) is True
    assert lock.process_alive(me, lock.this_host(), lock.process_start(me)) is True
    assert lock.process_alive(me, lock.this_host(), lock.process_start(me) + 1) is False   # pid reused
    assert lock.process_alive(me, "another-host.example") is None                          # cannot tell
    assert lock.process_alive(_dead_pid()) is False
    assert lock.process_alive(None) is False


def test_another_users_process_is_alive(monkeypatch):
    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    assert lock.process_alive(1) is True


def _local_record(run_dir, stage_id, pid, host=None):
    RunPaths(run_dir).stage(stage_id).folder.mkdir(parents=True, exist_ok=True)
    record_submission(run_dir, stage_id, "local", f"local-{pid}", pid)
    if host:
        path = RunPaths(run_dir).stage(stage_id).submit
        record = json.loads(path.read_text())
        atomic.write_json(path, {**record, "host": host})


def test_stage_states_of_local_workers_use_the_host(tmp_path):
    _local_record(tmp_path, "alive", os.getpid())
    _local_record(tmp_path, "dead", _dead_pid())
    _local_record(tmp_path, "elsewhere", os.getpid(), host="another-host.example")
    states = stage_states(tmp_path, [{"id": s, "kind": "train"} for s in ("alive", "dead", "elsewhere")])
    assert states["alive"].status == "running" and states["alive"].held
    assert states["dead"].status == "pending" and not states["dead"].held
    assert states["elsewhere"].status == "unknown" and states["elsewhere"].held
    assert "another-host.example" in states["elsewhere"].error
    selection = execute.triage(
        type("P", (), {"stages": {s: type("S", (), {"id": s})() for s in states}})(), states, retry_failed=True)
    assert [s.id for s in selection.to_run] == ["dead"]


def _holder(run_dir, seconds=30):
    process = subprocess.Popen([sys.executable, "-m", "gridlab.lock", str(run_dir), str(seconds)],
                               stdout=subprocess.PIPE, text=True, env={**os.environ})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_held_run_names_its_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(lock.RunLocked) as refused:
            lock.acquire(tmp_path, "submit")
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and lock.this_host() in message and "gridlab hold" in message
        assert lock.held_by(tmp_path)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_waiting_for_the_lock_and_taking_over_from_a_dead_holder(tmp_path):
    holder = _holder(tmp_path, seconds=1.5)
    said = []
    started = time.time()
    taken = lock.acquire(tmp_path, "submit", wait=True, timeout_s=30, report=said.append, poll_s=0.1)
    assert time.time() - started > 0.5 and "waiting for" in said[0]
    taken.release()
    holder.wait()
    assert lock.held_by(tmp_path) is None

    killed = _holder(tmp_path)
    killed.kill()          # dies holding the lock: the kernel releases it, its record stays
    killed.wait()
    said = []
    with lock.run_lock(tmp_path, "submit", report=said.append) as taken:
        assert taken.stale["pid"] == killed.pid
        assert "stale run lock" in said[0] and str(killed.pid) in said[0]
    assert lock.read_holder(tmp_path) is None   # released: emptied


def _finished_grid(tmp_path):
    grid_file = write_grid(tmp_path, tiny_grid())
    plan = build_plan(load_grid(grid_file))
    execute.prepare(plan, plan.spec.run_dir)
    for stage in plan.stages.values():
        finish_stage(plan.spec.run_dir, stage)
    return grid_file, plan


def test_a_second_submit_exits_2_naming_the_holder_and_readers_are_not_blocked(tmp_path):
    grid_file, plan = _finished_grid(tmp_path)
    holder = _holder(plan.spec.run_dir)
    try:
        result = CliRunner().invoke(app, ["submit", str(grid_file)])
        assert result.exit_code == 2, result.output
        assert "is held by `gridlab hold`" in result.output and f"pid {holder.pid}" in result.output
        assert "--wait-lock" in result.output
        status = CliRunner().invoke(app, ["status", str(grid_file)])
        assert status.exit_code == 0 and "held by `gridlab hold`" in status.output
        assert CliRunner().invoke(app, ["submit", str(grid_file), "--dry-run"]).exit_code == 0
    finally:
        holder.kill()
        holder.wait()


def test_wait_lock_waits_then_runs_nothing_more(tmp_path):
    grid_file, plan = _finished_grid(tmp_path)
    holder = _holder(plan.spec.run_dir, seconds=2)
    result = CliRunner().invoke(app, ["submit", str(grid_file), "--wait-lock"])
    holder.wait()
    assert result.exit_code == 0, result.output
    assert "waiting for `gridlab hold`" in result.output and "0 to run" in result.output


def test_a_ctrl_c_while_preparing_leaves_nothing_that_fails(tmp_path, monkeypatch):
    grid_file = write_grid(tmp_path, tiny_grid())
    plan = build_plan(load_grid(grid_file))
    run_dir = plan.spec.run_dir
    real = atomic.write_text
    written = []

    def interrupted(path, text, mode=None):
        if len(written) == 4:
            RunPaths(run_dir).stages_dir.joinpath(path.parent.name).mkdir(parents=True, exist_ok=True)
            raise KeyboardInterrupt
        written.append(path)
        return real(path, text, mode)

    monkeypatch.setattr(atomic, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        execute.prepare(plan, run_dir)
    monkeypatch.setattr(atomic, "write_text", real)
    folders = list(RunPaths(run_dir).stages_dir.iterdir())
    assert len(folders) == 5 and sum(1 for f in folders if (f / "stage.json").exists()) == 4
    broken = next(f for f in folders if not (f / "stage.json").exists())
    states = stage_states(run_dir, list(plan.stages.values()), verify=True)
    assert states[broken.name].status == "pending" and not states[broken.name].held   # not failed: just unprepared
    (RunPaths(run_dir).stage(next(iter(plan.stages))).stage).write_text("{torn")     # a foreign write, say
    execute.prepare(plan, run_dir)
    for stage in plan.stages.values():
        assert RunPaths(run_dir).stage(stage.id).stage.read_text() == stage.model_dump_json()
