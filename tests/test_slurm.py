"""The slurm executor against a real cluster (scripts/slurm-local.sh start): submit returns at once, scancel shows up
in status and --retry-failed completes it, a preempted (USR2) training job requeues and resumes, resubmitting a
finished grid submits nothing, site options reach the job, `gridlab cancel` stops every job, a controller that does
not answer makes stages unknown (nothing resubmitted), and the smoke grid runs end to end. Skipped when no cluster
answers `sinfo`."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from gridlab import api
from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.planfile import read_plan_record
from gridlab.state import stage_states

from runner_helpers import SMOKE, slurm_available, tiny_grid, wait_until_settled, write_grid

pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(not slurm_available(), reason="no SLURM cluster answers sinfo")]

BUDGET = 24576


def _submit(grid_file, *options):
    return CliRunner().invoke(app, ["submit", str(grid_file), "--executor", "slurm", *options])


def _job_of(run_dir, stage_id):
    return json.loads(RunPaths(run_dir).stage(stage_id).submit.read_text())["job_id"]


@pytest.fixture(scope="module")
def cancelled_grid(tmp_path_factory):
    """A grid submitted to SLURM whose parent job was scancel'led right away."""
    folder = tmp_path_factory.mktemp("slurm")
    grid_file = write_grid(folder, tiny_grid(name="slurm", budgets=[BUDGET]))
    run_dir = folder / "runs" / "slurm"
    started = time.time()
    result = _submit(grid_file)
    submit_seconds = time.time() - started
    assert result.exit_code == 0, result.output
    record = read_plan_record(run_dir)
    parent = record.parent_stage
    states_right_after = stage_states(run_dir, record.stages)
    subprocess.run(["scancel", _job_of(run_dir, parent)], check=True)
    return grid_file, run_dir, parent, submit_seconds, states_right_after


def test_submit_returns_at_once(cancelled_grid):
    _, _, _, _, states = cancelled_grid
    assert all(s.submitted for s in states.values())
    assert not all(s.status == "done" for s in states.values())


def test_scancel_shows_in_status_and_blocks_downstream(cancelled_grid):
    _, run_dir, parent, _, _ = cancelled_grid
    wait_until_settled(run_dir)
    status = api.status(run_dir)
    failed = {f["stage_id"]: f for f in status["failed"]}
    assert failed[parent]["status"] == "cancelled"
    assert status["stages"]["parent"]["cancelled"] == 1
    assert status["stages"]["data"]["done"] == 1
    # pruned cells sit below the parent; random cells do not (their model is initialised from the architecture)
    assert status["cells"]["cancelled"] == 4
    assert status["cells"]["done"] == 4


def test_retry_failed_completes_and_a_preempted_training_job_resumes(cancelled_grid):
    grid_file, run_dir, _, _, _ = cancelled_grid
    result = _submit(grid_file)
    assert "--retry-failed" in result.output and "0 to run" in result.output    # reported, not resubmitted
    result = _submit(grid_file, "--retry-failed")
    assert result.exit_code == 0, result.output
    run = RunPaths(run_dir)
    record = read_plan_record(run_dir)
    cell = next(c for c in record.cells if c.init == "pruned" and c.train_stage)
    trajectory = run.trajectory(next(s for s in record.stages if s.id == cell.train_stage).config.trajectory)
    train = run.stage(cell.train_stage)
    deadline = time.time() + 900
    while not (trajectory / "checkpoint").exists():
        assert time.time() < deadline, "training never checkpointed"
        time.sleep(0.1)
    # Preemption: SLURM signals the job (USR2, as before a time limit); submitit checkpoints and requeues it.
    subprocess.run(["scancel", "--signal=USR2", _job_of(run_dir, cell.train_stage)], check=True)
    states = wait_until_settled(run_dir)
    assert all(s.status == "done" for s in states.values()), {s.stage_id: s.error for s in states.values()}
    attempts = train.attempts.read_text().split()
    assert len(attempts) >= 2, "the preempted job was not requeued"
    api.ingest(run_dir)
    with duckdb.connect(str(run.database), read_only=True) as connection:
        assert connection.execute("SELECT DISTINCT status FROM cells").fetchall() == [("done",)]


def test_resubmitting_a_finished_grid_submits_nothing(cancelled_grid):
    grid_file, run_dir, _, _, _ = cancelled_grid
    jobs_before = sorted(p.read_text() for p in run_dir.glob("stages/*/submit.json"))
    result = _submit(grid_file)
    assert result.exit_code == 0, result.output
    assert "13 done (skipped)" in result.output and "0 to run" in result.output
    assert sorted(p.read_text() for p in run_dir.glob("stages/*/submit.json")) == jobs_before


def test_smoke_grid_end_to_end_on_slurm(tmp_path):
    grid_file = tmp_path / "smoke.toml"
    grid_file.write_text(SMOKE.read_text().replace('runs_dir = "../runs"', 'runs_dir = "runs"'))
    result = _submit(grid_file, "--wait")
    assert result.exit_code == 0, result.output
    with duckdb.connect(str(RunPaths(tmp_path / "runs" / "smoke").database), read_only=True) as connection:
        assert connection.execute("SELECT status, count(*) FROM cells GROUP BY ALL").fetchall() == [("done", 144)]


def _slurm_job_field(job_id, field):
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(.*?)(?=\s+[A-Za-z:]+=|\s*$)", shown, re.M)
    return match.group(1) if match else None


def test_site_options_reach_the_real_cluster(tmp_path):
    grid = tiny_grid(name="site", resources={
        "default": {"cpus": 1, "mem_gb": 1, "time_min": 10},
        "data": {"qos": "normal", "comment": "gridlab site options", "mail_type": "NONE",
                 "setup": ["export GRIDLAB_SETUP_MARK=ran", "echo setup says $GRIDLAB_SETUP_MARK"],
                 "sbatch": {"nice": 5}}})
    grid_file = write_grid(tmp_path, grid)
    run_dir = tmp_path / "runs" / "site"
    result = _submit(grid_file, "--where", "kind=data", "--wait")
    assert result.exit_code == 0, result.output
    record = read_plan_record(run_dir)
    data = next(s for s in record.stages if s.kind == "data")
    submitted = json.loads(RunPaths(run_dir).stage(data.id).submit.read_text())
    assert api.status(run_dir)["stages"]["data"]["done"] == 1
    assert sum(api.status(run_dir)["stages"]["parent"].values()) == 1    # not selected: never submitted
    assert "setup says ran" in Path(submitted["slurm_log"]).read_text()
    job = submitted["job_id"]
    assert _slurm_job_field(job, "Comment") == "gridlab site options"
    assert _slurm_job_field(job, "QOS") == "normal" and _slurm_job_field(job, "Nice") == "5"
    assert _slurm_job_field(job, "JobName") == submitted["job_name"]


def test_gridlab_cancel_and_an_unreachable_controller_on_the_real_cluster(tmp_path, monkeypatch):
    grid_file = write_grid(tmp_path, tiny_grid(name="stop", budgets=[BUDGET]))
    run_dir = tmp_path / "runs" / "stop"
    assert _submit(grid_file).exit_code == 0
    record = read_plan_record(run_dir)

    # A controller that does not answer (here: the wrong port): sacct (slurmdbd) still knows the jobs.
    conf = tmp_path / "slurm.conf"
    real_conf = Path(os.environ["SLURM_CONF"]).read_text()
    conf.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=6899", real_conf))
    records = sorted(p.read_text() for p in run_dir.glob("stages/*/submit.json"))
    with monkeypatch.context() as patched:
        patched.setenv("SLURM_CONF", str(conf))
        patched.setenv("GRIDLAB_SCHEDULER_TIMEOUT_S", "5")
        states = stage_states(run_dir, record.stages)
        assert not [s for s in states.values() if s.status in ("failed", "cancelled")]
        assert all(s.held for s in states.values() if s.status != "done")
    # Neither controller nor database answers: held stages are unknown, and nothing is resubmitted.
    conf.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=6899", real_conf)
                    + "\nAccountingStoragePort=6898\n")
    with monkeypatch.context() as patched:
        patched.setenv("SLURM_CONF", str(conf))
        patched.setenv("GRIDLAB_SCHEDULER_TIMEOUT_S", "5")
        states = stage_states(run_dir, record.stages)
        held = [s for s in states.values() if s.status != "done"]
        assert held and all(s.status == "unknown" and s.held for s in held), {s.status for s in held}
        result = _submit(grid_file, "--retry-failed")
        assert result.exit_code == 3, result.output
    assert sorted(p.read_text() for p in run_dir.glob("stages/*/submit.json")) == records

    result = CliRunner().invoke(app, ["cancel", str(grid_file)])
    assert result.exit_code == 0, result.output
    names = {json.loads(p.read_text())["job_name"] for p in run_dir.glob("stages/*/submit.json")}
    deadline = time.time() + 120
    while subprocess.run(["squeue", "-h", f"--name={','.join(names)}"], capture_output=True, text=True).stdout:
        assert time.time() < deadline, "cancelled jobs are still queued"
        time.sleep(1)
    states = wait_until_settled(run_dir)
    assert {s.status for s in states.values()} <= {"done", "cancelled"}
    assert any(s.status == "cancelled" for s in states.values())
    result = _submit(grid_file)
    assert result.exit_code == 1 and "--retry-failed" in result.output
