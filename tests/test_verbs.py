"""The verbs over a run folder with synthetic result files: --where (and its errors), status --where, reset, clean,
export, logs, cancel of local workers, provenance in DuckDB (`environments`), DuckDB under concurrent readers and
writers, and user errors vs bugs at the CLI."""

import json
import os
import subprocess
import sys
import time

import duckdb
import pytest
from typer.testing import CliRunner

from gridlab import api, atomic, db, execute
from gridlab.backends.records import record_submission
from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.plan import build_plan
from gridlab.provenance import PROVENANCE_COLUMNS
from gridlab.results import write_result
from gridlab.spec import load_grid
from gridlab.state import stage_states

from runner_helpers import REPO, fake_payload, tiny_grid, write_grid

ENV = {"gridlab_version": "0.1.0", "git_commit": "abc123", "git_dirty": False, "python_version": "3.11.7",
       "torch_version": "2.13.0", "transformers_version": "5.24.0", "lm_eval_version": "0.4.13",
       "cuda_version": "12.4", "nccl_version": "2.21.5", "gpu": "NVIDIA H200", "host": "node1",
       "slurm_job_id": "77_1"}


def _run(tmp_path, finish=lambda stage: True):
    """Two methods (depth and sparse), submitted; stages for which ``finish`` holds have results."""
    grid_file = write_grid(tmp_path, tiny_grid(methods=[{"name": "shortgpt"}, {"name": "magnitude"}],
                                               budgets=[2048, 4096]))
    plan = build_plan(load_grid(grid_file))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    for stage in plan.stages.values():
        if finish(stage):
            provenance = {**ENV, "gpu": "NVIDIA A100"} if stage.kind == "eval" else ENV
            write_result(RunPaths(run_dir).stage(stage.id), stage, fake_payload(stage), provenance=provenance)
    return grid_file, plan, run_dir


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ --where

def test_where_errors_are_one_line_naming_what_is_valid(tmp_path):
    grid_file, _, _ = _run(tmp_path)
    for where, words in [("metod=wanda", ["unknown key 'metod'", "valid keys: method, granularity"]),
                         ("method=wanda", ["method 'wanda' is not in this grid", "valid: magnitude, shortgpt"]),
                         ("budget=5x", ["is not a token count", "valid: 0, 2048, 4096"]),
                         ("ratio=0.7", ["valid: 0.5"]), ("state=broken", ["valid: pending, running, done"]),
                         ("kind=prune,trian", ["kind 'trian'", "valid: data, parent"]), ("method", ["KEY=VALUE"]),
                         ("stage=zzzz", ["matches no stage"])]:
        result = _cli("status", grid_file, "--where", where)
        assert result.exit_code == 2, (where, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        for word in words:
            assert word in result.output, (where, result.output)


def test_status_where_counts_the_sub_grid(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path, finish=lambda s: s.kind != "eval")
    whole = api.status(grid_file)
    assert sum(whole["cells"].values()) == 24
    sparse = api.status(grid_file, where=["granularity=sparse"])
    assert sum(sparse["cells"].values()) == 12
    # the sparse cells' stages: data, parent, its eval; one prune, one init, two train; the two models' evals at
    # tokens 0, the pruned branches 2048 and 4096, the random ones 2048, 4096 (also P: setting 2 at budget 0),
    # P + 2048 and P + 4096 (P = 4096)
    assert sum(sum(c.values()) for c in sparse["stages"].values()) == 3 + 1 + 1 + 2 + 2 + 2 + 4
    both = api.status(grid_file, where=["method=magnitude", "budget=2048", "init=random"])
    assert sum(both["cells"].values()) == 2
    evals = api.status(grid_file, where=["kind=eval", "state=pending"])
    assert evals["stages"]["eval"]["pending"] == whole["stages"]["eval"]["pending"]
    assert sum(evals["stages"]["train"].values()) == 0
    result = _cli("status", grid_file, "--json", "--where", "method=shortgpt,magnitude", "--where", "seed=0")
    assert result.exit_code == 0 and sum(json.loads(result.output)["cells"].values()) == 24


def test_reset_removes_the_selection_and_everything_downstream(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path)
    prune = next(s for s in plan.stages.values() if s.kind == "prune" and s.config.method == "magnitude")
    dry = _cli("reset", grid_file, "--where", "method=magnitude", "--where", "kind=prune", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "to reset: " in dry.output and "would free" in dry.output
    assert RunPaths(run_dir).stage(prune.id).result.exists()
    result = _cli("reset", grid_file, "--where", "method=magnitude", "--where", "kind=prune", "--yes")
    assert result.exit_code == 0, result.output
    states = stage_states(run_dir, list(plan.stages.values()))
    below = {s.id for s in plan.stages.values() if s.id == prune.id or prune.id in s.deps.values()}
    below |= {s.id for s in plan.stages.values() if set(s.deps.values()) & below}
    below |= {s.id for s in plan.stages.values() if set(s.deps.values()) & below}
    assert {sid for sid, s in states.items() if s.status == "pending"} == below
    assert not RunPaths(run_dir).stage(prune.id).folder.exists()
    assert _cli("reset", grid_file).exit_code == 2      # --where is required


def test_resetting_the_data_stage_or_one_of_its_tasks_resets_all_of_them(tmp_path):
    """The tokenizer and shard stages leave their outputs in the data stage's folder: they go with it."""
    grid_file = write_grid(tmp_path, tiny_grid(resources={"data": {"tasks": 2}}))
    plan = build_plan(load_grid(grid_file))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    for stage in plan.stages.values():
        write_result(RunPaths(run_dir).stage(stage.id), stage, fake_payload(stage))
    shard = next(s for s in plan.stages.values() if s.kind == "shard" and s.config.partition == 1)
    for where in (f"stage={shard.id}", "kind=data"):
        result = _cli("reset", grid_file, "--where", where, "--yes")
        assert result.exit_code == 0, result.output
        states = stage_states(run_dir, list(plan.stages.values()))
        assert all(state.status == "pending" for state in states.values()), where
        for stage in plan.stages.values():
            write_result(RunPaths(run_dir).stage(stage.id), stage, fake_payload(stage))
    # an eval stage alone: nothing upstream goes
    evaluation = next(s for s in plan.stages.values() if s.kind == "eval")
    assert _cli("reset", grid_file, "--where", f"stage={evaluation.id}", "--yes").exit_code == 0
    pending = {sid for sid, s in stage_states(run_dir, list(plan.stages.values())).items() if s.status == "pending"}
    assert pending == {evaluation.id}


def test_reset_refuses_a_held_stage(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path, finish=lambda s: s.kind in ("data", "parent"))
    prune = next(s for s in plan.stages.values() if s.kind == "prune")
    record_submission(run_dir, prune.id, "local", f"local-{os.getpid()}", os.getpid())
    result = _cli("reset", grid_file, "--where", "kind=parent")
    assert result.exit_code == 2 and f"stage {prune.id} (prune) is running" in result.output
    assert "gridlab cancel" in result.output


def test_clean_removes_orphans_and_unneeded_checkpoints_and_says_what_it_freed(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path)
    run = RunPaths(run_dir)
    orphan = run.stage("0123456789abcdef")
    atomic.write_json(orphan.stage, {"id": "0123456789abcdef", "kind": "eval", "config": {}, "deps": {}})
    atomic.write_bytes(orphan.model_dir / "weights.bin", b"x" * 5000)
    train = next(s for s in plan.stages.values() if s.kind == "train")
    checkpoint = run.trajectory(train.config.trajectory) / "checkpoint"
    atomic.write_json(checkpoint / "main.json", {"folder": "main-000000010"})
    atomic.write_bytes(checkpoint / "main-000000010" / "shard", b"m" * 3000)
    atomic.write_bytes(checkpoint / "main-000000004" / "shard", b"o" * 2000)       # an older, unreferenced save
    atomic.write_bytes(run.trajectory("feedfacefeedface") / "branches" / "x", b"t" * 1000)   # no stage uses it
    parent = next(s for s in plan.stages.values() if s.kind == "parent")
    atomic.write_bytes(run.stage(parent.id).training_dir / "checkpoint" / "main-1" / "s", b"p" * 4000)
    atomic.write_bytes(run.stage(parent.id).folder / ".model.tmp123" / "x", b"z" * 100)

    dry = _cli("clean", grid_file, "--dry-run")
    assert dry.exit_code == 0 and "would free 12.2 kB in 5 path(s)" in dry.output, dry.output
    assert orphan.folder.exists()
    result = _cli("clean", grid_file)
    assert result.exit_code == 0 and "freed 12.2 kB in 5 path(s)" in result.output, result.output
    assert not orphan.folder.exists() and not run.trajectory("feedfacefeedface").exists()
    assert (checkpoint / "main-000000010").exists() and not (checkpoint / "main-000000004").exists()
    assert not (run.stage(parent.id).training_dir / "checkpoint").exists()
    assert run.stage(parent.id).result.exists()
    result = _cli("clean", grid_file, "--all-checkpoints")
    assert "freed 3.0 kB" in result.output and not checkpoint.exists()


def test_export_csv_parquet_json_with_where(tmp_path):
    import polars as pl

    grid_file, plan, run_dir = _run(tmp_path)
    for fmt in ("csv", "parquet", "json"):
        out = tmp_path / f"cells.{fmt}"
        result = _cli("export", grid_file, "--out", out, "--where", "granularity=sparse")
        assert result.exit_code == 0, result.output
        frame = {"csv": pl.read_csv, "parquet": pl.read_parquet, "json": pl.read_json}[fmt](out)
        assert set(frame["granularity"].to_list()) == {"sparse"}
        assert frame["cell_id"].n_unique() == 12
        assert {"method", "ratio", "budget_tokens", "metric", "value", "metric_tokens"} <= set(frame.columns)
        assert {"val_loss", "train_loss"} <= set(frame["metric"].to_list())
    result = _cli("export", grid_file, "--out", tmp_path / "all.txt", "--format", "csv")
    assert result.exit_code == 0 and "24 cell(s)" in result.output
    assert _cli("export", grid_file, "--out", tmp_path / "x.xlsx").exit_code == 2


def test_report_of_a_sub_grid(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path)
    out = tmp_path / "report"
    result = _cli("report", grid_file, "--out", out, "--where", "granularity=depth")
    assert result.exit_code == 0, result.output
    sub_html = (out / "index.html").read_text()
    assert _cli("report", grid_file, "--out", tmp_path / "whole").exit_code == 0
    whole_html = (tmp_path / "whole" / "index.html").read_text()
    # magnitude (sparse) stays only in the grid file the report quotes
    assert sub_html.count("magnitude") < whole_html.count("magnitude") and "shortgpt" in sub_html
    from gridlab.export import subset_database

    cells = [c.cell_id for c in plan.cells if c.granularity == "depth"]
    subset = subset_database(RunPaths(run_dir).database, tmp_path / "sub.duckdb", cells)
    with duckdb.connect(str(subset), read_only=True) as connection:
        assert connection.execute("SELECT DISTINCT granularity FROM cells").fetchall() == [("depth",)]
        assert connection.execute("SELECT count(DISTINCT cell_id) FROM metrics").fetchone() == (12,)
        assert connection.execute("SELECT count(*) FROM environments").fetchone() == (2,)
    assert _cli("report", grid_file, "--out", out, "--where", "kind=train").exit_code == 2


def test_logs_by_stage_id_prefix_and_where(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path)
    prune = [s for s in plan.stages.values() if s.kind == "prune"]
    for i, stage in enumerate(prune):
        RunPaths(run_dir).stage(stage.id).log.write_text(f"line one of {i}\nline two of {i}\n")
    result = _cli("logs", grid_file, prune[0].id[:6], "--lines", "1")
    assert result.exit_code == 0 and result.output == "line two of 0\n", result.output
    result = _cli("logs", grid_file, "--where", "kind=prune")
    assert result.exit_code == 0 and result.output.count("==> ") == 2 and "line one of 1" in result.output
    assert _cli("logs", grid_file).exit_code == 2


# ------------------------------------------------------------------------------------------------ cancel (local)

def test_cancel_stops_a_local_worker_and_marks_its_stage(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path, finish=lambda s: s.kind in ("data", "parent"))
    prune = next(s for s in plan.stages.values() if s.kind == "prune")
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record_submission(run_dir, prune.id, "local", f"local-{worker.pid}", worker.pid)
        result = _cli("cancel", grid_file)
        assert result.exit_code == 0, result.output
        assert "cancelled 1 stage(s)" in result.output and "1 local process(es) stopped" in result.output
        assert worker.wait(timeout=10) == -15
    finally:
        worker.kill()
    status = api.status(grid_file)
    assert status["stages"]["prune"]["cancelled"] == 1 and "cancelled by" in status["failed"][0]["error"]


# ------------------------------------------------------------------------------------------------ DuckDB

def test_provenance_lands_in_stages_and_environments(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path)
    api.ingest(grid_file)
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        columns = [row[0] for row in connection.execute("DESCRIBE stages").fetchall()]
        assert [name for name, _ in PROVENANCE_COLUMNS] == columns[-len(PROVENANCE_COLUMNS):]
        row = connection.execute("SELECT git_commit, gpu, slurm_job_id FROM stages WHERE kind = 'train'").fetchone()
        assert row == ("abc123", "NVIDIA H200", "77_1")
        environments = connection.execute("SELECT gpu, stages, kinds FROM environments ORDER BY gpu").fetchall()
    evals = sum(1 for s in plan.stages.values() if s.kind == "eval")
    assert environments == [("NVIDIA A100", evals, ["eval"]),
                            ("NVIDIA H200", len(plan.stages) - evals, ["data", "init", "parent", "prune", "train"])]


def test_the_worker_collects_provenance():
    from gridlab import provenance

    collected = provenance.collect()
    assert set(collected) == {name for name, _ in PROVENANCE_COLUMNS}
    assert collected["gridlab_version"] and collected["torch_version"] and collected["host"]
    commit, dirty = provenance.git_state(REPO / "src" / "gridlab")
    assert (commit is None) == (dirty is None)


_READER = """
import sys, time, duckdb
sys.path.insert(0, {src!r})
from gridlab.db import connect_read_only
deadline = time.time() + {seconds}
reads = 0
while time.time() < deadline:
    with connect_read_only({database!r}) as connection:
        assert connection.execute("SELECT count(*) FROM cells").fetchone()[0] == 24
        connection.execute("SELECT * FROM environments").fetchall()
    reads += 1
print(reads)
"""


def test_readers_and_writers_of_the_database_do_not_crash_each_other(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path)
    api.ingest(grid_file)
    database = RunPaths(run_dir).database
    src = str(REPO / "src")
    script = _READER.format(src=src, seconds=6, database=str(database))
    readers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    writer = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {src!r}); from gridlab import api\n"
                               f"deadline = time.time() + 5\nn = 0\n"
                               f"while time.time() < deadline:\n    api.ingest({str(grid_file)!r}); n += 1\n"
                               f"print(n)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    states = stage_states(run_dir, list(plan.stages.values()), verify=True)
    deadline = time.time() + 5
    while time.time() < deadline:                 # and a second writer in this process
        db.ingest(run_dir, states)
    for process in [*readers, writer]:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert int(out.strip()) > 0
    assert not list(database.parent.glob(".results.duckdb.*"))      # no staging file left behind


def test_a_database_held_open_for_writing_is_a_clear_message(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path)
    api.ingest(grid_file)
    database = RunPaths(run_dir).database
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(database)!r});"
                                                     f" print('open', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(db.UserError) as refused:
            db.connect_read_only(database, retry_s=0.5)
        assert "open for writing by another process" in str(refused.value)
        assert api.ingest(grid_file)["cells"] == 24       # a writer is not blocked: it swaps in a new file
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------------ errors

def test_user_error_is_one_line_exit_2_and_debug_shows_its_traceback(tmp_path):
    grid_file = write_grid(tmp_path, {**tiny_grid(), "budgets": ["lots"]})
    result = subprocess.run([sys.executable, "-m", "gridlab.cli", "plan", str(grid_file)], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("gridlab: ") and len(result.stderr.strip().splitlines()) == 1
    # the traceback of a user error, asked for two ways (status of a grid never submitted: a user error that loads
    # no torch, so these two runs take a second)
    for command in (["--debug", "status", str(grid_file)], ["status", str(grid_file)]):
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        if command[0] != "--debug":
            env["GRIDLAB_DEBUG"] = "1"
        result = subprocess.run([sys.executable, "-m", "gridlab.cli", *command], capture_output=True, text=True,
                                env=env)
        assert result.returncode == 1 and "Traceback" in result.stderr and "UserError" in result.stderr


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path):
    grid_file, _, _ = _run(tmp_path)
    code = ("import sys; sys.argv = ['gridlab', 'status', sys.argv[1]]\n"
            "from gridlab import api\n"
            "def broken(*a, **k): return {}['no such key']\n"
            "api.status = broken\n"
            "from gridlab.cli import app; app()")
    result = subprocess.run([sys.executable, "-c", code, str(grid_file)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "KeyError: 'no such key'" in result.stderr
    assert "gridlab: " not in result.stderr


def test_shell_completion_is_on():
    result = _cli("--help")
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_eta_from_the_pace_of_finished_stages(tmp_path):
    from gridlab.state import StageState

    run = RunPaths(tmp_path)
    now = time.time()
    states = {}
    for i, (kind, status, took) in enumerate([("train", "done", 100), ("train", "done", 300), ("eval", "done", 10),
                                              ("train", "running", None), ("train", "pending", None),
                                              ("eval", "pending", None), ("prune", "pending", None)]):
        sid = f"s{i}"
        started = now - (took or 50)
        states[sid] = StageState(sid, kind, status, started=started)
        if status == "done":
            run.stage(sid).done_marker.parent.mkdir(parents=True, exist_ok=True)
            run.stage(sid).done_marker.touch()
            os.utime(run.stage(sid).done_marker, (now, now))
    # train 200 s each (the running one has 150 s to go), eval 10 s, prune: the overall mean (410 / 3); one runs
    assert api.estimate_eta(tmp_path, states) == pytest.approx(150 + 200 + 10 + 410 / 3, abs=2)
    assert api.estimate_eta(tmp_path, {k: v for k, v in states.items() if v.status != "done"}) is None


def test_follow_logs_yields_new_lines(tmp_path):
    grid_file, plan, run_dir = _run(tmp_path)
    prune = next(s for s in plan.stages.values() if s.kind == "prune")
    log = RunPaths(run_dir).stage(prune.id).log
    log.write_text("old line\n")
    rounds = []

    def stop():
        rounds.append(1)
        if len(rounds) == 1:
            with open(log, "a") as handle:
                handle.write("new line\npartial")
        return len(rounds) > 2

    lines = list(api.follow_logs(grid_file, prune.id, poll_s=0.01, stop=stop))
    assert lines == [(prune.id, "new line")]


# ------------------------------------------------------------------------------------------------ reset by cells

def _shared_run(tmp_path):
    """Three methods (two depth methods sharing one random twin, one sparse), two budgets, two seeds, both settings
    (P = 4096 = the larger budget, so a setting-2 reference branch is also a setting-1 branch): every stage done,
    with a recorded runtime of an hour on 2 threads."""
    grid_file = write_grid(tmp_path, tiny_grid(methods=[{"name": "shortgpt"}, {"name": "minitron-depth"},
                                                        {"name": "magnitude"}],
                                               budgets=[2048, 4096], seeds=[0, 1]))
    plan = build_plan(load_grid(grid_file))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    for stage in plan.stages.values():
        write_result(RunPaths(run_dir).stage(stage.id), stage, fake_payload(stage), started=time.time() - 3600,
                     resources={"ranks": 1, "threads": 2, "gpus": 0})
    return grid_file, plan, run_dir


def _needed(plan, cells) -> set[str]:
    from gridlab.select import upstream_closure

    return upstream_closure(list(plan.stages.values()), [s for c in cells for s in (c.eval_stage,
                                                                                     c.start_eval_stage)])


def _check_reset(grid_file, plan, run_dir, where, selected):
    """Reset ``where``: every unselected cell keeps every stage it needs, the data and parent stages stay, and
    the next submit reruns exactly what was reset."""
    stages = list(plan.stages.values())
    removal = api.reset(grid_file, where=where, yes=True, report=lambda line: None)
    states = stage_states(run_dir, stages)
    others = [c for c in plan.cells if not selected(c)]
    assert others and all(states[sid].status == "done" for sid in _needed(plan, others)), where
    assert all(states[s.id].status == "done" for s in stages if s.kind in ("data", "parent")), where
    assert {sid for sid, s in states.items() if s.status == "pending"} == set(removal.stages), where
    assert set(removal.stages) <= _needed(plan, [c for c in plan.cells if selected(c)])
    dry = api.submit(grid_file, dry_run=True, report=lambda line: None)
    assert set(dry.plan.stages) - set(dry.done) == set(removal.stages), where
    return removal


def test_reset_by_method_keeps_every_other_methods_work_and_the_shared_twin(tmp_path):
    grid_file, plan, run_dir = _shared_run(tmp_path)
    removal = _check_reset(grid_file, plan, run_dir, ["method=shortgpt"], lambda c: c.method == "shortgpt")
    kinds = {plan.stages[sid].kind for sid in removal.stages}
    assert kinds == {"prune", "train", "eval"}          # the random twin (and its training) is minitron-depth's too
    prunes = {s.id for s in plan.stages.values() if s.kind == "prune" and s.config.method == "shortgpt"}
    assert prunes <= set(removal.stages)
    assert removal.lost.count == len(removal.stages) and removal.lost.cpu_hours == pytest.approx(
        2 * len(removal.stages), rel=1e-3)


@pytest.mark.parametrize("where, selected", [
    (["budget=2048"], lambda c: c.budget_tokens == 2048),
    (["seed=1"], lambda c: c.seed == 1),
    (["setting=1"], lambda c: c.setting == 1),
    (["method=magnitude", "init=random"], lambda c: c.method == "magnitude" and c.init == "random"),
])
def test_reset_by_budget_seed_or_setting_keeps_what_unselected_cells_share(tmp_path, where, selected):
    grid_file, plan, run_dir = _shared_run(tmp_path)
    removal = _check_reset(grid_file, plan, run_dir, where, selected)
    kinds = {plan.stages[sid].kind for sid in removal.stages}
    if where == ["budget=2048"]:
        # a train stage serves both budgets: only the 2048-token branches' evaluations go, never a trajectory
        assert kinds == {"eval"}
    if where == ["seed=1"]:
        assert kinds == {"prune", "init", "train", "eval"}
    if where == ["setting=1"]:
        # pruned cells share their evaluations with setting 2; the random 4096 branch is setting 2's reference
        assert kinds == {"eval"}
        assert all(plan.stages[sid].config.budget == 2048 for sid in removal.stages)


def test_reset_summary_is_the_same_dry_and_real_and_says_what_stays(tmp_path):
    grid_file, plan, run_dir = _shared_run(tmp_path)
    dry = _cli("reset", grid_file, "--where", "method=magnitude", "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.output.splitlines()
    assert lines[0] == ("reset --where method=magnitude: a cell filter, 24 of 72 cells; acting only on the stages "
                        "no unselected cell needs")
    # per seed: a prune, its mask twin, two trajectories; evals of both models at 0, of the pruned branches 2048 and
    # 4096, of the random ones 2048, 4096 (= P) and P + 2048, P + 4096
    assert lines[1].startswith("  to reset: 24 stage(s) (prune 2, init 2, train 4, eval 16); ")
    assert "finished work it removes: 24 done stage(s)" in lines[2] and "48.00 CPU-hours" in lines[2]
    assert "cells that lose work: 24 of 72" in dry.output
    assert "kept, needed by every cell" in dry.output and "data 1, parent 1" in dry.output
    real = _cli("reset", grid_file, "--where", "method=magnitude", "--yes")
    assert real.exit_code == 0, real.output
    assert real.output.splitlines()[:5] == lines[:5] and "would free" not in real.output
    stage_filter = _cli("reset", grid_file, "--where", "kind=parent", "--dry-run")
    assert "a stage filter, acting on the 1 stage(s) it selects" in stage_filter.output
    assert "downstream of the selected stage(s)" in stage_filter.output


def test_reset_of_finished_work_needs_yes_or_a_confirmation(tmp_path):
    grid_file, plan, run_dir = _shared_run(tmp_path)
    refused = subprocess.run([sys.executable, "-m", "gridlab.cli", "reset", str(grid_file), "--where", "seed=1"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "--yes" in refused.stderr
    assert "to reset: " in refused.stdout            # the summary came first
    assert all(s.status == "done" for s in stage_states(run_dir, list(plan.stages.values())).values())
    with pytest.raises(api.UserError, match="not confirmed"):
        api.reset(grid_file, where=["seed=1"], confirm=lambda question: False, report=lambda line: None)
    assert all(s.status == "done" for s in stage_states(run_dir, list(plan.stages.values())).values())
    asked = []
    removal = api.reset(grid_file, where=["seed=1"], confirm=lambda q: asked.append(q) or True,
                        report=lambda line: None)
    assert asked and "done stage(s)" in asked[0] and removal.carried_out
    # nothing finished left to lose: no question
    again = api.reset(grid_file, where=["seed=1"], report=lambda line: None)
    assert not again.loses_finished_work


def test_cancel_by_cells_stops_only_what_no_unselected_cell_needs(tmp_path):
    grid_file = write_grid(tmp_path, tiny_grid(methods=[{"name": "shortgpt"}, {"name": "minitron-depth"}]))
    plan = build_plan(load_grid(grid_file))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    for stage in plan.stages.values():
        if stage.kind in ("data", "parent"):
            write_result(RunPaths(run_dir).stage(stage.id), stage, fake_payload(stage))
    twin = next(s for s in plan.stages.values() if s.kind == "init")     # shared by both depth methods
    prune = next(s for s in plan.stages.values() if s.kind == "prune" and s.config.method == "shortgpt")
    workers = {sid: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
               for sid in (twin.id, prune.id)}
    try:
        for sid, worker in workers.items():
            record_submission(run_dir, sid, "local", f"local-{worker.pid}", worker.pid)
        result = _cli("cancel", grid_file, "--where", "method=shortgpt")
        assert result.exit_code == 0, result.output
        assert "cancelled 1 stage(s)" in result.output and "not cancelled, needed by cells not selected: init 1" \
            in result.output
        assert workers[prune.id].wait(timeout=10) == -15
        assert workers[twin.id].poll() is None
        states = stage_states(run_dir, list(plan.stages.values()))
        assert states[prune.id].status == "cancelled" and states[twin.id].status == "running"
    finally:
        for worker in workers.values():
            worker.kill()
            worker.wait()


def test_clean_of_a_grid_never_run_writes_nothing(tmp_path):
    grid_file = write_grid(tmp_path, tiny_grid())
    for args in (["clean", grid_file, "--dry-run"], ["clean", grid_file]):
        result = _cli(*args)
        assert result.exit_code == 2 and "run `gridlab submit" in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_clean_dry_run_takes_no_lock_and_clean_where_trims_only_the_selection(tmp_path):
    grid_file, plan, run_dir = _shared_run(tmp_path)
    run = RunPaths(run_dir)
    saves = {}
    for stage in plan.train_stages():
        checkpoint = run.trajectory(stage.config.trajectory) / "checkpoint"
        atomic.write_json(checkpoint / "main.json", {"folder": "main-2"})
        atomic.write_bytes(checkpoint / "main-2" / "shard", b"m" * 100)
        atomic.write_bytes(checkpoint / "main-1" / "shard", b"o" * 100)
        saves[stage.id] = checkpoint / "main-1"
    run.lock.unlink(missing_ok=True)
    assert _cli("clean", grid_file, "--dry-run").exit_code == 0 and not run.lock.exists()
    result = _cli("clean", grid_file, "--where", "method=magnitude")
    assert result.exit_code == 0, result.output
    magnitude = {c.train_stage for c in plan.cells if c.method == "magnitude" and c.train_stage}
    assert {sid for sid, path in saves.items() if not path.exists()} == magnitude


# ------------------------------------------------------------------------------------------------ faults

def test_a_full_disk_is_named_with_what_is_free_and_what_the_stage_needs(tmp_path, monkeypatch):
    import errno
    import shutil

    from gridlab import stages

    grid_file = write_grid(tmp_path, tiny_grid())
    plan = build_plan(load_grid(grid_file))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    data = next(s for s in plan.stages.values() if s.kind == "data")
    prune = next(s for s in plan.stages.values() if s.kind == "prune")

    def short_write(config, context):       # what numpy's tofile says on a full disk: no errno
        raise OSError("349186 requested and 315392 written")

    def no_space(config, context):
        raise RuntimeError("saving failed") from OSError(errno.ENOSPC, "No space left on device")

    free = {"bytes": 4096}
    monkeypatch.setattr(stages.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**12, 10**12, free["bytes"]))
    monkeypatch.setitem(stages._RUNNERS, "data", short_write)
    assert not stages.execute_stage(run_dir, data.id, redirect_output=False)
    state = stage_states(run_dir, list(plan.stages.values()), verify=True)[data.id]
    assert state.status == "failed" and not RunPaths(run_dir).stage(data.id).result.exists()
    assert state.error.startswith(f"the disk under {run_dir} is full: 4.1 kB free, what this data stage needs is "
                                  f"unknown before the corpus is read"), state.error
    assert "--retry-failed" in state.error and "349186 requested and 315392 written" in state.error

    for stage in plan.stages.values():
        if stage.kind in ("data", "parent"):
            write_result(RunPaths(run_dir).stage(stage.id), stage, fake_payload(stage))
    free["bytes"] = 5 * 10**9        # space left, but the writer said ENOSPC (a quota, another writer)
    monkeypatch.setitem(stages._RUNNERS, "prune", no_space)
    assert not stages.execute_stage(run_dir, prune.id, redirect_output=False)
    error = json.loads(RunPaths(run_dir).stage(prune.id).error.read_text())["error"]
    estimate = json.loads(RunPaths(run_dir).disk_estimate.read_text())["prune"]
    from gridlab.units import size

    assert f"5.0 GB free, this prune stage needs about {size(estimate)} (the plan's disk estimate)" in error
    selection = execute.triage(plan, stage_states(run_dir, list(plan.stages.values())), retry_failed=True)
    assert prune.id in {s.id for s in selection.to_run}          # nothing taken as done: --retry-failed reruns it
    # an ordinary failure with plenty of space stays what it is
    monkeypatch.setitem(stages._RUNNERS, "prune", lambda config, context: 1 / 0)
    assert not stages.execute_stage(run_dir, prune.id, redirect_output=False)
    assert json.loads(RunPaths(run_dir).stage(prune.id).error.read_text())["error"] == (
        "ZeroDivisionError: division by zero")


# ------------------------------------------------------------------------------------------------ progress

def _running_train(tmp_path):
    """A run whose first train stage is held by a live process and has reported progress."""
    from gridlab.progress import Recorder

    grid_file, plan, run_dir = _run(tmp_path, finish=lambda s: s.kind in ("data", "parent", "prune", "init"))
    train = plan.train_stages()[0]
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record_submission(run_dir, train.id, "local", f"local-{worker.pid}", worker.pid)
    Recorder(RunPaths(run_dir).stage(train.id), "train")({
        "phase": "trunk", "step": 4, "steps": 12, "tokens": 512, "trained": 512, "to_train": 2048, "loss": 5.25,
        "lr": 0.003, "tokens_per_s": 256.0, "elapsed_s": 2.0, "finished": False})
    return grid_file, plan, run_dir, train, worker


def test_status_and_logs_show_a_running_stages_latest_progress(tmp_path, capsys):
    grid_file, plan, run_dir, train, worker = _running_train(tmp_path)
    try:
        line = (f"running train {train.id}: trunk step 4/12 (512 tokens): trained 512 of 2,048 (25%), loss 5.25, "
                f"lr 3.00e-03, 256 tokens/s, ETA 6 s")
        result = _cli("status", grid_file)
        assert result.exit_code == 0 and line in result.output.splitlines(), result.output
        report = json.loads(_cli("status", grid_file, "--json").output)
        assert report["running"][0]["progress"]["trained"] == 512
        logs = _cli("logs", grid_file, train.id[:8])
        assert logs.exit_code == 0 and logs.output.splitlines()[-1] == "latest progress: " + line.split(": ", 1)[1]
    finally:
        worker.kill()
        worker.wait()


def test_submit_shows_plain_progress_lines_without_a_terminal(tmp_path, monkeypatch, capsys):
    from rich.console import Console

    from gridlab.cli import SubmitView

    grid_file, plan, run_dir, train, worker = _running_train(tmp_path)
    monkeypatch.setenv("GRIDLAB_PROGRESS_EVERY_S", "0.1")
    stages = [{"id": s.id, "kind": s.kind, "deps": s.deps} for s in plan.stages.values()
              if s.kind in ("train", "eval")]
    try:
        view = SubmitView(live=False)
        with view(run_dir, stages, 8192):
            time.sleep(0.6)
        out = capsys.readouterr().out.splitlines()
        summary = [line for line in out if " progress: " in line]
        assert summary and summary[0].endswith(f"progress: 0/{len(stages)} stages done, 1 running, 0 failed; 512 of "
                                               f"8,192 tokens trained; ETA unknown (no finished stage to measure "
                                               f"the pace by yet)"), out
        assert f"  train {train.id[:12]}: trunk step 4/12 (512 tokens): trained 512 of 2,048 (25%)" in \
            "\n".join(out)
        console = Console(record=True, width=160)
        console.print(view._panel(api.progress_snapshot(run_dir, stages, 8192)))
        panel = console.export_text()
        assert "1 running" in panel and "trunk step 4/12" in panel
    finally:
        worker.kill()
        worker.wait()


def test_a_full_disk_under_the_submitters_own_records_is_one_line(tmp_path, monkeypatch):
    """ENOSPC while gridlab writes its own bookkeeping (not inside a stage): one line saying what to do, exit 1; any
    other OSError keeps its traceback (a bug or a real fault)."""
    import errno

    grid_file = write_grid(tmp_path, tiny_grid())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "submit.json"))

    monkeypatch.setattr(api, "submit", full)
    result = CliRunner().invoke(app, ["submit", str(grid_file)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"gridlab: no space left on the disk ({tmp_path / 'runs' / 'submit.json'}): finished stages are kept; free "
        f"space (`gridlab clean` removes what the run no longer needs) and run the command again"]

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(api, "submit", broken)
    result = CliRunner().invoke(app, ["submit", str(grid_file)])
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EIO
