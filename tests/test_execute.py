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

from gridlab import store
from gridlab.cli import app, collect_status
from runner_helpers import SMOKE, tiny_grid, write_grid

pytestmark = pytest.mark.slow

# Long enough that a worker can be killed between two training checkpoints.
BUDGET = 24576


def _grid(**changes):
    return tiny_grid(name="local", budgets=[BUDGET], **changes)


def _submit(grid_file, *options):
    return CliRunner().invoke(app, ["submit", str(grid_file), *options])


def _val_losses(run_dir):
    with duckdb.connect(str(run_dir / store.DATABASE), read_only=True) as connection:
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
    with duckdb.connect(str(run_dir / store.DATABASE), read_only=True) as connection:
        cells = connection.execute("SELECT init, setting, trained_tokens, status FROM cells ORDER BY ALL").fetchall()
        names = {row[0] for row in connection.execute("SELECT DISTINCT name FROM metrics").fetchall()}
    assert cells == [("pruned", 1, BUDGET, "done"), ("pruned", 2, BUDGET, "done"),
                     ("random", 1, BUDGET, "done"), ("random", 2, 4096 + BUDGET, "done")]
    assert {"train_loss", "lr", "val_loss", "val_ppl"} <= names
    assert len(_val_losses(run_dir)) == 4


def test_resubmitting_a_finished_grid_runs_nothing(finished_grid):
    grid_file, run_dir = finished_grid
    attempts_before = sorted(p.read_text() for p in run_dir.glob("stages/*/attempts.log"))
    result = _submit(grid_file)
    assert result.exit_code == 0, result.output
    assert "8 done (skipped)" in result.output and "0 to run" in result.output
    assert sorted(p.read_text() for p in run_dir.glob("stages/*/attempts.log")) == attempts_before


def test_kill_9_a_worker_mid_train_then_retry_resumes_to_the_same_numbers(finished_grid):
    grid_file, run_dir = finished_grid
    reference = _val_losses(run_dir)
    saved = json.loads((run_dir / store.PLAN).read_text())
    cell = next(c for c in saved["cells"] if c["init"] == "pruned")
    for stage_id in (cell["train_stage"], cell["eval_stage"]):       # forget this trajectory: train it again
        subprocess.run(["rm", "-rf", str(run_dir / "stages" / stage_id), str(run_dir / store.DONE / stage_id)],
                       check=True)
    cli = subprocess.Popen([sys.executable, "-c", "from gridlab.cli import app; app()", "submit", str(grid_file)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    train_dir = run_dir / "stages" / cell["train_stage"]
    deadline = time.time() + 300
    while not (train_dir / "train" / "checkpoint").exists():
        assert time.time() < deadline and cli.poll() is None, "training never checkpointed"
        time.sleep(0.05)
    pid = json.loads((train_dir / store.SUBMIT).read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    output, _ = cli.communicate(timeout=300)
    assert cli.returncode == 1, output
    assert not (train_dir / store.RESULT).exists()

    status = collect_status(run_dir)
    failed = {f["stage_id"]: f for f in status["failed"]}
    assert "killed by signal 9" in failed[cell["train_stage"]]["error"]
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
    assert "6 done (skipped)" in result.output and "2 to run" in result.output
    new = set(os.listdir(run_dir / "stages")) - before
    kinds = {json.loads((run_dir / "stages" / stage_id / store.STAGE).read_text())["kind"] for stage_id in new}
    assert len(new) == 2 and kinds == {"eval"}


def test_smoke_grid_end_to_end_locally(tmp_path):
    grid_file = tmp_path / "smoke.toml"
    grid_file.write_text(SMOKE.read_text().replace('runs_dir = "../runs"', 'runs_dir = "runs"'))
    result = _submit(grid_file)
    assert result.exit_code == 0, result.output
    with duckdb.connect(str(tmp_path / "runs" / "smoke" / store.DATABASE), read_only=True) as connection:
        assert connection.execute("SELECT status, count(*) FROM cells GROUP BY ALL").fetchall() == [("done", 96)]
        methods = connection.execute("SELECT count(DISTINCT method), count(DISTINCT granularity) FROM cells").fetchone()
    assert methods == (6, 3)

    report = CliRunner().invoke(app, ["report", str(grid_file), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "report" / "index.html").read_text()
    for heading in ("Recommendation", "Crossover", "Cost"):
        assert heading in html
    assert "smoke" in html and "What is missing" in html
    assert (tmp_path / "report" / "report.pdf").read_bytes().startswith(b"%PDF")
