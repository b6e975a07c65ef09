"""Backends: a backend another package registers (an entry point of the gridlab.backends group) runs, is observed
and cancels through gridlab without any change to gridlab; a stage held through a backend that is not installed is
unknown with the way out, never pending; `--executor` takes the registry's names; `gridlab status` loads no torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from queue_backend import read_queue, write_queue
from typer.testing import CliRunner

from gridlab import api, backends, execute
from gridlab.backends.records import read_submission, record_submission
from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.plan import build_plan
from gridlab.spec import load_grid
from gridlab.state import stage_states

from runner_helpers import REPO, finish_stage, tiny_grid, write_grid

TESTS = Path(__file__).resolve().parent


def _install_queue_backend(site: Path, monkeypatch) -> None:
    """What `pip install` of a package registering the queue backend leaves: a dist-info folder whose
    entry_points.txt names it, on sys.path (the module itself is tests/queue_backend.py)."""
    info = site / "gridlab_queue_backend-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gridlab-queue-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gridlab.backends]\nqueue = queue_backend:QueueBackend\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture
def queued(tmp_path, monkeypatch):
    """A tiny grid submitted through the queue backend: every stage queued."""
    _install_queue_backend(tmp_path / "site", monkeypatch)
    grid_file = write_grid(tmp_path, tiny_grid(name="q"))
    lines = []
    outcome = api.submit(grid_file, executor="queue", report=lines.append)
    assert outcome.exit_code == 0 and outcome.submitted, lines
    return grid_file, outcome.run_dir, outcome


def test_a_registered_backend_runs_is_observed_and_cancels(queued):
    grid_file, run_dir, outcome = queued
    assert backends.names() == ["local", "debug", "slurm", "queue"]
    assert set(outcome.ran.values()) == {"submitted"} and len(outcome.ran) == 13
    records = [json.loads(p.read_text()) for p in run_dir.glob("stages/*/submit.json")]
    assert len(records) == 13 and {r["backend"] for r in records} == {"queue"}
    status = api.status(grid_file)
    assert status["cells"]["pending"] == 8 and not status["unknown"]
    # the backend's own answers: one job runs, one left the queue
    queue = read_queue(run_dir)
    record = read_submission(run_dir, outcome.plan.parent_stage.id)
    queue[record["job_id"]] = "running"
    data = next(s for s in outcome.plan.stages.values() if s.kind == "data")
    finish_stage(run_dir, data)
    write_queue(run_dir, queue)
    status = api.status(grid_file)
    assert status["stages"]["parent"]["running"] == 1 and status["stages"]["data"]["done"] == 1
    # resubmitting leaves what the backend holds alone
    again = api.submit(grid_file, executor="queue", report=lambda line: None)
    assert again.exit_code == 0 and not again.ran and len(again.active) == 12
    # cancel goes through the backend that holds each stage
    cancelled = api.cancel(grid_file, where=["kind=eval"], report=lambda line: None)
    assert len(cancelled.cancelled) == 7 and not cancelled.problems
    assert sorted(read_queue(run_dir).values()).count("cancelled") == 7
    assert api.status(grid_file)["stages"]["eval"]["cancelled"] == 7


def test_a_stage_held_through_a_backend_not_installed_is_unknown_with_the_way_out(queued, monkeypatch):
    grid_file, run_dir, outcome = queued
    monkeypatch.undo()     # the package is uninstalled (or the run is looked at from another environment)
    assert "queue" not in backends.names()
    status = api.status(grid_file)
    assert status["cells"]["unknown"] == 8 and len(status["unknown"]) == 13
    why = status["unknown"][0]["error"]
    assert "names the backend 'queue', which is not installed here (installed: local, debug, slurm)" in why
    assert "submit.json and submit again" in why
    before = sorted(p.read_text() for p in run_dir.glob("stages/*/submit.json"))
    result = CliRunner().invoke(app, ["submit", str(grid_file), "--retry-failed"])
    assert result.exit_code == 3, result.output                  # never resubmitted, never failed
    assert "13 unknown (left alone), 0 to run" in result.output
    assert sorted(p.read_text() for p in run_dir.glob("stages/*/submit.json")) == before
    cancelled = api.cancel(grid_file, report=lambda line: None)
    assert not cancelled.cancelled and len(cancelled.problems) == 13 and "not installed here" in cancelled.problems[0]


def test_executor_takes_the_registered_names(tmp_path, monkeypatch):
    grid_file = write_grid(tmp_path, tiny_grid())
    result = CliRunner().invoke(app, ["submit", str(grid_file), "--executor", "kube"])
    assert result.exit_code == 2
    assert "unknown executor 'kube'; valid executors: local, debug, slurm" in result.output
    _install_queue_backend(tmp_path / "site", monkeypatch)
    result = CliRunner().invoke(app, ["submit", str(grid_file), "--executor", "kube"])
    assert "valid executors: local, debug, slurm, queue" in result.output


def test_an_entry_point_that_is_no_backend_is_refused_in_one_line(tmp_path, monkeypatch):
    info = tmp_path / "site" / "broken-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gridlab.backends]\nbroken = json:loads\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(api.UserError, match="is not a gridlab.backends.Backend named 'broken'"):
        backends.backend_class("broken")


def test_gridlab_status_loads_no_torch(tmp_path):
    """status reads files (and asks schedulers): it must start in a fraction of a second, without torch."""
    grid_file = write_grid(tmp_path, tiny_grid())
    plan = build_plan(load_grid(grid_file))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    for stage in plan.stages.values():
        if stage.kind in ("data", "parent"):
            finish_stage(run_dir, stage)
    gone = subprocess.Popen(["true"])
    gone.wait()
    prune = next(s for s in plan.stages.values() if s.kind == "prune")
    record_submission(run_dir, prune.id, "debug", None, gone.pid)      # a debug worker that is gone
    code = ("import sys\nfrom gridlab.cli import app\nsys.argv = ['gridlab', 'status', sys.argv[1]]\n"
            "try:\n    app()\nexcept SystemExit as end:\n    assert not end.code, end.code\n"
            "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'duckdb'}))")
    shown = subprocess.run([sys.executable, "-c", code, str(grid_file)], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "cells: pending 8" in shown.stdout and "LOADED []" in shown.stdout, shown.stdout
    assert stage_states(run_dir, [prune])[prune.id].status == "pending"


def _metric_rows(run_dir):
    import duckdb

    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        return connection.execute(
            "SELECT c.init, c.setting, c.budget_tokens, m.tokens, m.name, m.value FROM metrics m JOIN cells c "
            "USING (cell_id) WHERE m.name IN ('val_loss', 'train_loss') ORDER BY ALL").fetchall()


def test_a_tiny_grid_runs_on_local_workers_and_in_process_to_the_same_numbers(tmp_path):
    """The local backend end to end with real workers (the fast suite's one real run; tests/test_execute.py has the
    rest), and the debug backend in this process: every stage done, the same numbers."""
    grid = tiny_grid(name="e2e", inits=["pruned"], settings=[1], budgets=[1024],
                     parent={**tiny_grid()["parent"], "tokens": 2048})
    ran = {}
    for executor in ("local", "debug"):
        (tmp_path / executor).mkdir()
        grid_file = write_grid(tmp_path / executor, grid)
        result = CliRunner().invoke(app, ["submit", str(grid_file), "--executor", executor])
        assert result.exit_code == 0, result.output
        run_dir = tmp_path / executor / "runs" / "e2e"
        records = [json.loads(p.read_text()) for p in run_dir.glob("stages/*/submit.json")]
        assert {r["backend"] for r in records} == {executor} and len(records) == 7
        assert api.status(run_dir)["cells"]["done"] == 2
        ran[executor] = _metric_rows(run_dir)
    assert ran["local"] and ran["local"] == ran["debug"]
