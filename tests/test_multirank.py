"""Multi-process (2-rank) training stages through the runner: the local executor's rank groups give the numbers one
process gives, and a 2-task SLURM job on the local cluster runs a 2-rank cell end to end."""

import json
import os
import time

import duckdb
import pytest
from typer.testing import CliRunner

from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.planfile import read_plan_record
from gridlab.results import read_result

from runner_helpers import REPO, slurm_available, tiny_grid, wait_until_settled, write_grid

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _workers_import_this_checkout(monkeypatch):
    """Worker processes (local rank groups, SLURM tasks) run sys.executable with this environment."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _grid(name, train_ranks, parent_ranks=1, **changes):
    resources = {"default": {"cpus": 1, "mem_gb": 1, "time_min": 10},
                 "train": {"tasks_per_node": train_ranks}, "parent": {"tasks_per_node": parent_ranks}}
    return tiny_grid(name=name, settings=[1], resources=resources, **changes)


def _val_losses(run_dir):
    """(method, ratio, init, setting, budget) → final val_loss (cell ids change with the schedule's strategy)."""
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        rows = connection.execute(
            "SELECT c.method, c.ratio, c.init, c.setting, c.budget_tokens, m.value FROM metrics m "
            "JOIN cells c USING (cell_id) WHERE m.name = 'val_loss' AND m.tokens > 0").fetchall()
    return {row[:-1]: row[-1] for row in rows}


def _stage_results(run_dir):
    return [read_result(RunPaths(run_dir).stage(stage.id)) for stage in read_plan_record(run_dir).stages]


def _run_local(folder, grid):
    folder.mkdir()
    grid_file = write_grid(folder, grid)
    result = CliRunner().invoke(app, ["submit", str(grid_file)])
    assert result.exit_code == 0, result.output
    return folder / "runs" / grid["name"]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    run_dir = _run_local(tmp_path_factory.mktemp("one") / "grid", _grid("multirank", 1))
    losses = _val_losses(run_dir)
    assert len(losses) == 2
    return losses


# ddp runs on a 1-worker pool (a 2-rank stage takes the whole pool rather than waiting forever) and also pretrains
# the parent with 2 ranks (FSDP, parent.schedule's default).
@pytest.mark.parametrize("strategy, workers, parent_ranks", [("fsdp", 2, 1), ("ddp", 1, 2)])
def test_two_rank_train_stages_match_one_process(tmp_path, one_process_losses, strategy, workers, parent_ranks):
    schedule = {**tiny_grid()["schedule"], "strategy": strategy}
    run_dir = _run_local(tmp_path / "grid", _grid("multirank", 2, parent_ranks, schedule=schedule,
                                                  local={"workers": workers}))
    multi_rank = [r for r in _stage_results(run_dir) if r["kind"] == "train" or (r["kind"] == "parent" and
                                                                                   parent_ranks == 2)]
    assert len(multi_rank) == 2 + (parent_ranks == 2)
    for result in multi_rank:
        assert result["attempts"] == 1  # rank 1 neither counts attempts nor writes the result
        log = RunPaths(run_dir).stage(result["stage_id"]).log.read_text()
        assert "rank 0" in log and "rank 1" in log
    losses = _val_losses(run_dir)
    assert losses.keys() == one_process_losses.keys()
    for cell, loss in one_process_losses.items():
        assert losses[cell] == pytest.approx(loss, rel=1e-3)


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_available(), reason="no SLURM cluster answers sinfo")
def test_two_task_slurm_job_runs_a_two_rank_cell(tmp_path):
    grid_file = write_grid(tmp_path, _grid("slurm-ranks", 2, inits=["pruned"]))
    result = CliRunner().invoke(app, ["submit", str(grid_file), "--executor", "slurm"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "slurm-ranks"
    states = wait_until_settled(run_dir, 600)
    assert {s.status for s in states.values()} == {"done"}, {s.stage_id: s.error for s in states.values()}
    (train,) = [s for s in read_plan_record(run_dir).stages if s.kind == "train"]
    log = RunPaths(run_dir).stage(train.id).log.read_text()
    assert "rank 0" in log and "rank 1" in log
    submit = json.loads(RunPaths(run_dir).stage(train.id).submit.read_text())
    assert submit["backend"] == "slurm"
    assert CliRunner().invoke(app, ["ingest", str(grid_file)]).exit_code == 0
    assert len(_val_losses(run_dir)) == 1


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_available(), reason="no SLURM cluster answers sinfo")
def test_a_preempted_two_task_training_job_requeues_and_resumes(tmp_path):
    import subprocess

    grid_file = write_grid(tmp_path, _grid("slurm-preempt", 2, inits=["pruned"], budgets=[24576]))
    result = CliRunner().invoke(app, ["submit", str(grid_file), "--executor", "slurm"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "slurm-preempt"
    (train,) = [s for s in read_plan_record(run_dir).stages if s.kind == "train"]
    files = RunPaths(run_dir).stage(train.id)
    deadline = time.time() + 600
    while not (RunPaths(run_dir).trajectory(train.config.trajectory) / "checkpoint").exists():
        assert time.time() < deadline, "training never checkpointed"
        time.sleep(0.1)
    job_id = json.loads(files.submit.read_text())["job_id"]
    # Preemption: SLURM signals every task (USR2, as before a time limit); the job is requeued with both ranks.
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    states = wait_until_settled(run_dir, 600)
    assert {s.status for s in states.values()} == {"done"}, {s.stage_id: s.error for s in states.values()}
    assert len(files.attempts.read_text().split()) >= 2, "the preempted job was not requeued"
    log = files.log.read_text()
    assert "rank 0" in log and "rank 1" in log
    assert CliRunner().invoke(app, ["ingest", str(grid_file)]).exit_code == 0
    assert len(_val_losses(run_dir)) == 1
