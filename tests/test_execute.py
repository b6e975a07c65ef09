"""The local and debug executors with real workers: end to end, idempotent resubmission, kill -9 and resume, edits."""

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest
from typer.testing import CliRunner

from gridlab import api
from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.planfile import read_plan_record

from runner_helpers import SMOKE, tiny_grid, write_grid

pytestmark = pytest.mark.slow

# Long enough that a worker can be killed between two training checkpoints.
BUDGET = 24576


def _grid(**changes):
    return tiny_grid(name="local", budgets=[BUDGET], **changes)


def _submit(grid_file, *options):
    return CliRunner().invoke(app, ["submit", str(grid_file), *options])


def _val_losses(run_dir):
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        return dict(connection.execute(
            "SELECT cell_id, value FROM metrics WHERE name = 'val_loss' AND tokens > 0").fetchall())


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    grid_file = write_grid(folder, _grid())
    result = _submit(grid_file)
    assert result.exit_code == 0, result.output
    return grid_file, folder / "runs" / "local"


def test_local_run_fills_the_database(finished_grid):
    _, run_dir = finished_grid
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        cells = connection.execute("SELECT init, setting, trained_tokens, status FROM cells ORDER BY ALL").fetchall()
        names = {row[0] for row in connection.execute("SELECT DISTINCT name FROM metrics").fetchall()}
    # budget 0: the pruned model as pruned, the random one at init, and (setting 2) after the parent's P tokens
    assert cells == [("pruned", 1, 0, "done"), ("pruned", 1, BUDGET, "done"), ("pruned", 2, 0, "done"),
                     ("pruned", 2, BUDGET, "done"), ("random", 1, 0, "done"), ("random", 1, BUDGET, "done"),
                     ("random", 2, 4096, "done"), ("random", 2, 4096 + BUDGET, "done")]
    assert {"train_loss", "lr", "val_loss", "val_ppl"} <= names
    assert len(_val_losses(run_dir)) == 5


def test_resubmitting_a_finished_grid_runs_nothing(finished_grid):
    grid_file, run_dir = finished_grid
    attempts_before = sorted(p.read_text() for p in run_dir.glob("stages/*/attempts.log"))
    result = _submit(grid_file)
    assert result.exit_code == 0, result.output
    assert "13 done (skipped)" in result.output and "0 to run" in result.output
    assert sorted(p.read_text() for p in run_dir.glob("stages/*/attempts.log")) == attempts_before


def test_training_stages_report_progress_and_plan_uses_their_pace(finished_grid):
    from gridlab.progress import read_progress

    grid_file, run_dir = finished_grid
    record = read_plan_record(run_dir)
    training = [s for s in record.stages if s.kind in ("parent", "train")]
    for stage in training:
        files = RunPaths(run_dir).stage(stage.id)
        last = read_progress(files)
        assert last["finished"] and last["trained"] == last["to_train"] > 0 and last["tokens_per_s"] > 0
        assert "progress: trunk step " in files.log.read_text() and "tokens/s" in files.log.read_text()
        header = json.loads(files.result.read_text())
        assert header["resources"]["ranks"] == 1 and header["resources"]["threads"] >= 1
    result = CliRunner().invoke(app, ["plan", str(grid_file)])
    assert f"(throughput of this run's {len(training)} finished training stage(s): " in result.output, result.output
    # what a reset would lose is counted from the run's own records: trajectory tokens, recorded runtimes
    from gridlab.train import remaining_tokens

    removal = api.reset(grid_file, where=["init=random"], dry_run=True, report=lambda line: None)
    train = next(s for s in record.stages if s.kind == "train" and s.id in removal.stages)
    assert removal.lost.tokens == remaining_tokens(train.config.schedule, train.config.budgets, 32, None) > 0
    assert removal.lost.cpu_hours > 0 and removal.lost.unrecorded == 0 and not removal.carried_out


def test_kill_9_a_worker_mid_train_then_retry_resumes_to_the_same_numbers(finished_grid):
    grid_file, run_dir = finished_grid
    reference = _val_losses(run_dir)
    run = RunPaths(run_dir)
    record = read_plan_record(run_dir)
    cell = next(c for c in record.cells if c.init == "pruned" and c.train_stage)
    trajectory = run.trajectory(next(s for s in record.stages if s.id == cell.train_stage).config.trajectory)
    for stage_id in (cell.train_stage, cell.eval_stage):       # forget this trajectory: train it again
        subprocess.run(["rm", "-rf", str(run.stage(stage_id).folder), str(run.stage(stage_id).done_marker),
                        str(trajectory)], check=True)
    cli = subprocess.Popen([sys.executable, "-c", "from gridlab.cli import app; app()", "submit", str(grid_file)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    train = run.stage(cell.train_stage)
    deadline = time.time() + 300
    while not (trajectory / "checkpoint").exists():
        assert time.time() < deadline and cli.poll() is None, "training never checkpointed"
        time.sleep(0.05)
    pid = json.loads(train.submit.read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    output, _ = cli.communicate(timeout=300)
    assert cli.returncode == 1, output
    assert not train.result.exists()

    status = api.status(run_dir)
    failed = {f["stage_id"]: f for f in status["failed"]}
    assert "killed by signal 9" in failed[cell.train_stage]["error"]
    assert status["stages"]["train"]["failed"] == 1

    result = _submit(grid_file)                                       # failed stages are reported, not rerun
    assert result.exit_code == 1 and "--retry-failed" in result.output
    result = _submit(grid_file, "--retry-failed")
    assert result.exit_code == 0, result.output
    assert _val_losses(run_dir) == pytest.approx(reference, rel=1e-6)


def test_editing_one_value_reruns_only_what_it_changes(finished_grid, tmp_path):
    grid_file, run_dir = finished_grid
    edited = _grid(evaluation={"max_sequences": 8, "num_fewshot": 1}, runs_dir=str(run_dir.parent))
    edited_file = write_grid(tmp_path, edited)
    before = set(os.listdir(run_dir / "stages"))
    result = _submit(edited_file, "--executor", "debug")
    assert result.exit_code == 0, result.output
    # evaluation settings are only in eval ids: the parent, the models and their training are reused
    assert "6 done (skipped)" in result.output and "7 to run" in result.output
    new = set(os.listdir(run_dir / "stages")) - before
    kinds = {json.loads(RunPaths(run_dir).stage(stage_id).stage.read_text())["kind"] for stage_id in new}
    assert len(new) == 7 and kinds == {"eval"}


def test_smoke_grid_end_to_end_locally(tmp_path):
    grid_file = tmp_path / "smoke.toml"
    grid_file.write_text(SMOKE.read_text().replace('runs_dir = "../runs"', 'runs_dir = "runs"'))
    result = _submit(grid_file)
    assert result.exit_code == 0, result.output
    with duckdb.connect(str(RunPaths(tmp_path / "runs" / "smoke").database), read_only=True) as connection:
        assert connection.execute("SELECT status, count(*) FROM cells GROUP BY ALL").fetchall() == [("done", 144)]
        methods = connection.execute("SELECT count(DISTINCT method), count(DISTINCT granularity) FROM cells").fetchone()
    assert methods == (6, 3)

    report = CliRunner().invoke(app, ["report", str(grid_file), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "report" / "index.html").read_text()
    for heading in ("Recommendation", "Crossover", "Cost"):
        assert heading in html
    assert "smoke" in html and "What is missing" in html
    assert (tmp_path / "report" / "report.pdf").read_bytes().startswith(b"%PDF")


def test_submits_started_together_run_every_stage_once_and_lose_nothing(tmp_path):
    grid_file = write_grid(tmp_path, tiny_grid(name="together"))
    run_dir = tmp_path / "runs" / "together"
    command = [sys.executable, "-c", "from gridlab.cli import app; app()", "submit", str(grid_file)]
    processes = [subprocess.Popen(command + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for extra in ([], [], ["--wait-lock"])]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    codes = [process.returncode for process in processes]
    assert codes[2] == 0, outputs[2]                      # it waited for the holder, then found everything done
    assert sorted(codes[:2]) in ([0, 2], [2, 2]), outputs
    for code, output in zip(codes, outputs, strict=True):
        if code == 2:
            assert "is held by `gridlab submit`" in output and "--wait-lock" in output
    record = read_plan_record(run_dir)
    for stage in record.stages:
        assert len(RunPaths(run_dir).stage(stage.id).attempts.read_text().split()) == 1, stage.id
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        assert connection.execute("SELECT status, count(*) FROM cells GROUP BY ALL").fetchall() == [("done", 8)]


def test_real_results_carry_their_provenance(finished_grid):
    _, run_dir = finished_grid
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        rows = connection.execute("SELECT DISTINCT gridlab_version, torch_version, transformers_version, "
                                  "lm_eval_version, host FROM stages WHERE status = 'done'").fetchall()
        [environment] = connection.execute("SELECT stages FROM environments").fetchall()
    assert len(rows) == 1 and all(rows[0]), rows
    assert environment == (13,)


def test_gridlab_cancel_stops_a_running_local_submit(tmp_path):
    grid_file = write_grid(tmp_path, tiny_grid(name="stopme", budgets=[BUDGET]))
    run_dir = tmp_path / "runs" / "stopme"
    cli = subprocess.Popen([sys.executable, "-c", "from gridlab.cli import app; app()", "submit", str(grid_file)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list(run_dir.glob("trajectories/*/checkpoint")):     # training has started
        assert time.time() < deadline and cli.poll() is None, "training never started"
        time.sleep(0.1)
    result = CliRunner().invoke(app, ["cancel", str(grid_file)])
    assert result.exit_code == 0, result.output
    output, _ = cli.communicate(timeout=120)
    assert cli.returncode == 1, output
    assert "cancelled" in output
    status = api.status(run_dir)
    assert sum(status["stages"][kind]["cancelled"] for kind in status["stages"]) >= 1
    assert not any(status["stages"][kind]["running"] for kind in status["stages"])
    # Cancelled stages stay cancelled until --retry-failed; nothing was left half-held.
    assert all(s.get("status") in ("cancelled", "failed") for s in status["failed"])


def test_reset_by_method_on_a_real_run_reruns_only_that_methods_stages(tmp_path):
    grid_file = write_grid(tmp_path, tiny_grid(name="two", methods=[{"name": "shortgpt"}, {"name": "magnitude"}]))
    assert _submit(grid_file).exit_code == 0
    run_dir = tmp_path / "runs" / "two"
    run, record = RunPaths(run_dir), read_plan_record(run_dir)
    attempts = {s.id: run.stage(s.id).attempts.read_text() for s in record.stages}
    before = _val_losses(run_dir)
    removal = api.reset(grid_file, where=["method=magnitude"], yes=True, report=lambda line: None)
    kinds = {s.kind for s in record.stages if s.id in removal.stages}
    assert kinds == {"prune", "init", "train", "eval"} and removal.lost.tokens > 0
    result = _submit(grid_file)
    assert result.exit_code == 0 and f"{len(removal.stages)} to run" in result.output, result.output
    for stage in record.stages:
        again = run.stage(stage.id).attempts.read_text()
        assert (again != attempts[stage.id]) == (stage.id in removal.stages), stage.kind
    after = _val_losses(run_dir)
    magnitude = {c.cell_id for c in record.cells if c.method == "magnitude"}
    assert {k: v for k, v in after.items() if k not in magnitude} == {
        k: v for k, v in before.items() if k not in magnitude}
    assert after.keys() == before.keys()
    with duckdb.connect(str(run.database), read_only=True) as connection:
        assert connection.execute("SELECT DISTINCT status FROM cells").fetchall() == [("done",)]
