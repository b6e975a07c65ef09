"""The CLI over a run folder with synthetic result files: plan, status (text, JSON, failed-stage log tails), ingest,
report."""

import json
import time

import duckdb
from typer.testing import CliRunner

from gridlab import atomic, execute
from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.plan import build_plan
from gridlab.spec import load_grid

from runner_helpers import finish_stage, tiny_grid, write_grid


def _half_finished(tmp_path):
    """A submitted grid whose prune stage failed (with a log) and whose other stages finished."""
    grid_file = write_grid(tmp_path, tiny_grid(budgets=[2048, 4096]))
    plan = build_plan(load_grid(grid_file))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    prune = next(s for s in plan.stages.values() if s.kind == "prune")
    below_prune = {prune.id}
    for stage in plan.stages.values():  # dependency order
        if set(stage.deps.values()) & below_prune:
            below_prune.add(stage.id)
    for stage in plan.stages.values():
        files = RunPaths(run_dir).stage(stage.id)
        if stage is prune:
            files.log.write_text("loading parent\nTraceback (most recent call last):\nboom: bad weights\n")
            atomic.write_json(files.error, {"error": "RuntimeError: bad weights", "finished": time.time(),
                                            "traceback": []})
        elif stage.id not in below_prune:
            finish_stage(run_dir, stage)
    return grid_file, run_dir, prune


def test_plan_prints_matrix_counts_tokens_and_estimate(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(write_grid(tmp_path, tiny_grid()))])
    assert result.exit_code == 0, result.output
    # 2 inits × budgets {0, 2048} × 2 settings; evals: the parent, each model before training, each branch
    assert "8 cells" in result.output
    assert "stages: data 1, parent 1, prune 1, init 1, train 2, eval 7 (total 13)" in result.output
    assert "naive one run per cell" in result.output and "estimated training time" in result.output


def test_status_json_counts_and_failed_stage_log_tail(tmp_path):
    grid_file, run_dir, prune = _half_finished(tmp_path)
    result = CliRunner().invoke(app, ["status", str(grid_file), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["stages"]["prune"] == {"pending": 0, "running": 0, "done": 0, "failed": 1, "cancelled": 0,
                                         "unknown": 0}
    assert report["stages"]["train"]["done"] == 1 and report["stages"]["train"]["pending"] == 1
    assert report["cells"] == {"pending": 0, "running": 0, "done": 6, "failed": 6, "cancelled": 0, "unknown": 0}
    [failed] = report["failed"]
    assert failed["stage_id"] == prune.id and failed["error"] == "RuntimeError: bad weights"
    assert failed["log_tail"][-1] == "boom: bad weights"


def test_status_text_shows_the_table_and_log_lines(tmp_path):
    grid_file, run_dir, prune = _half_finished(tmp_path)
    result = CliRunner().invoke(app, ["status", str(run_dir), "--lines", "2"])
    assert result.exit_code == 0, result.output
    assert "cells: pending 0, running 0, done 6, failed 6, cancelled 0, unknown 0" in result.output
    assert f"failed prune {prune.id}" in result.output
    assert "  | boom: bad weights" in result.output and "loading parent" not in result.output


def test_status_of_an_unsubmitted_grid_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["status", str(write_grid(tmp_path, tiny_grid()))])
    assert result.exit_code == 2 and "run `gridlab submit GRID` first" in result.output


def test_ingest_command_and_failed_cells_name_their_cause(tmp_path):
    grid_file, run_dir, prune = _half_finished(tmp_path)
    result = CliRunner().invoke(app, ["ingest", str(grid_file)])
    assert result.exit_code == 0, result.output
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        errors = connection.execute("SELECT DISTINCT error FROM cells WHERE status = 'failed'").fetchall()
    assert errors == [(f"{prune.id}: RuntimeError: bad weights",)]


def test_report_command_ingests_and_calls_the_report(tmp_path):
    grid_file, run_dir, _ = _half_finished(tmp_path)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(grid_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (RunPaths(run_dir).database).exists()
    assert any(out.iterdir())


def test_report_with_an_unknown_metric_is_one_line_exit_2(tmp_path):
    grid_file, _, _ = _half_finished(tmp_path)
    result = CliRunner().invoke(app, ["report", str(grid_file), "--out", str(tmp_path / "r"), "--metric", "nope"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_report_takes_a_margin_and_refuses_a_removed_pooling_in_one_line(tmp_path):
    grid_file, _, _ = _half_finished(tmp_path)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(grid_file), "--out", str(out), "--margin", "0.05",
                                      "--pool", "none"])
    assert result.exit_code == 0, result.output
    assert (out / "verdicts.csv").is_file() and "verdicts:" in result.output
    for option, value, message in (("--pool", "seeds", "pooling 'seeds' was removed"),
                                   ("--margin", "0", "margin 0.0 must be a positive number")):
        refused = CliRunner().invoke(app, ["report", str(grid_file), "--out", str(tmp_path / "r"), option, value])
        assert refused.exit_code == 2, refused.output
        assert len(refused.output.strip().splitlines()) == 1 and message in refused.output
