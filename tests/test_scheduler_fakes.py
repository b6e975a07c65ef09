"""Fail closed against a fake SLURM (tests/fake_slurm.py on PATH): squeue/sacct that fail or hang make stages
unknown, never failed, and nothing is resubmitted; every terminal SLURM state means what it should for the stage;
a submission interrupted between sbatch and its record is found by job name instead of submitted twice; sbatch
that hangs or refuses; the generated sbatch script carries the site options; cancel."""

import json
import os
import time

import pytest
from typer.testing import CliRunner

from gridlab import api
from gridlab.backends import slurm as slurm_backend
from gridlab.backends.records import record_submission
from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.plan import build_plan
from gridlab.spec import load_grid
from gridlab.state import stage_states

from runner_helpers import FakeSlurm, finish_stage, tiny_grid, write_grid


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    return FakeSlurm(tmp_path / "slurm", monkeypatch, timeout_s=1.0)


def _held(run_dir, slurm, name="gridlab-t-prune-abcd0123", tasks=None, kind="prune", stage_id="s0"):
    """One stage recorded as submitted to a fake job; its job id."""
    job = slurm.add_job(name, tasks=tasks)
    job_id = job if tasks is None else f"{job}_0"
    RunPaths(run_dir).stage(stage_id).folder.mkdir(parents=True, exist_ok=True)
    record_submission(run_dir, stage_id, "slurm", job_id, job_name=name,
                              array_task="0" if tasks else None, resources={"mem_gb": 4.0, "time_min": 30})
    return job_id


def _state(run_dir, stage_id="s0", kind="prune", verify=False):
    return stage_states(run_dir, [{"id": stage_id, "kind": kind}], verify=verify)[stage_id]


# ------------------------------------------------------------------------------------------------ fail closed

def test_squeue_and_sacct_failing_make_stages_unknown_not_failed(tmp_path, slurm):
    _held(tmp_path, slurm)
    slurm.fail("squeue")
    slurm.fail("sacct", "sacct: error: Problem talking to the database")
    state = _state(tmp_path)
    assert state.status == "unknown" and state.submitted and state.held
    assert "squeue failed" in state.error and "sacct failed" in state.error


def test_squeue_failing_alone_is_answered_by_sacct(tmp_path, slurm):
    job = _held(tmp_path, slurm)
    slurm.queue(job, "RUNNING")
    slurm.fail("squeue")
    assert _state(tmp_path).status == "running"   # sacct knows running jobs too


def test_a_hung_squeue_is_cut_off_and_its_stages_are_unknown(tmp_path, slurm):
    _held(tmp_path, slurm)
    slurm.hang("squeue")
    slurm.hang("sacct")
    started = time.time()
    state = _state(tmp_path)
    assert time.time() - started < 10, "the scheduler timeout (GRIDLAB_SCHEDULER_TIMEOUT_S=1) was not applied"
    assert state.status == "unknown" and "did not answer within 1 s" in state.error


def test_a_job_gone_from_squeue_while_sacct_fails_is_unknown(tmp_path, slurm):
    job = _held(tmp_path, slurm)
    slurm.finish(job, "COMPLETED")
    slurm.fail("sacct")
    state = _state(tmp_path)
    assert state.status == "unknown" and "sacct failed" in state.error


def test_a_job_known_to_neither_is_unknown_with_the_way_out(tmp_path, slurm):
    job = _held(tmp_path, slurm)
    slurm.forget(job)
    state = _state(tmp_path)
    assert state.status == "unknown" and "known neither to squeue nor to sacct" in state.error
    assert "gridlab cancel" in state.error


@pytest.mark.parametrize("slurm_state, exit_code, status, words", [
    ("OUT_OF_MEMORY", "0:125", "failed", ["out of memory", "resources.prune.mem_gb = 4.0", "raise mem_gb"]),
    ("TIMEOUT", "0:0", "failed", ["time limit", "resources.prune.time_min = 30"]),
    ("NODE_FAIL", "0:0", "failed", ["node failed", "--retry-failed"]),
    ("BOOT_FAIL", "0:0", "failed", ["failed to boot"]),
    ("DEADLINE", "0:0", "failed", ["deadline"]),
    ("PREEMPTED", "0:0", "cancelled", ["preempted and not requeued", "PreemptMode"]),
    ("CANCELLED by 1234", "0:15", "cancelled", ["cancelled by 1234"]),
    ("FAILED", "1:0", "failed", ["exit code 1:0"]),
    ("COMPLETED", "0:0", "failed", ["completed without writing a result"]),
    ("REVOKED", "0:0", "cancelled", ["revoked"]),
    ("SPECIAL_EXIT", "0:0", "failed", ["SPECIAL_EXIT"]),
    ("SOMETHING_NEW", "0:0", "unknown", ["SOMETHING_NEW"]),
])
def test_every_terminal_slurm_state_means_what_it_should(tmp_path, slurm, slurm_state, exit_code, status, words):
    job = _held(tmp_path, slurm, tasks=3)
    slurm.finish(job, slurm_state, exit_code)
    state = _state(tmp_path)
    assert state.status == status, state.error
    for word in words:
        assert word in state.error


def test_a_shard_task_out_of_memory_names_the_data_table(tmp_path, slurm):
    job = _held(tmp_path, slurm, name="gridlab-t-shard-abcd0123", tasks=3, kind="shard")
    slurm.finish(job, "OUT_OF_MEMORY", "0:125")
    state = _state(tmp_path, kind="shard")
    assert state.status == "failed" and "resources.data.mem_gb = 4.0" in state.error, state.error


@pytest.mark.parametrize("slurm_state, reason, status", [
    ("PENDING", "Priority", "pending"), ("REQUEUED", "None", "pending"), ("CONFIGURING", "None", "pending"),
    ("RUNNING", "None", "running"), ("COMPLETING", "None", "running"), ("SUSPENDED", "None", "running"),
    ("PENDING", "DependencyNeverSatisfied", "cancelled"),
])
def test_queued_and_running_states(tmp_path, slurm, slurm_state, reason, status):
    job = _held(tmp_path, slurm)
    slurm.queue(job, slurm_state, reason)
    assert _state(tmp_path).status == status


def test_a_result_written_while_the_scheduler_was_asked_is_done(tmp_path, slurm):
    job = _held(tmp_path, slurm)
    slurm.finish(job, "COMPLETED")
    RunPaths(tmp_path).stage("s0").done_marker.parent.mkdir(parents=True, exist_ok=True)
    RunPaths(tmp_path).stage("s0").done_marker.touch()
    assert _state(tmp_path).status == "done"


def test_a_failed_stage_whose_job_still_runs_is_held(tmp_path, slurm):
    job = _held(tmp_path, slurm)
    slurm.queue(job, "RUNNING")   # e.g. rank 1 failed and wrote error.json while rank 0 hangs in a collective
    from gridlab import atomic
    atomic.write_json(RunPaths(tmp_path).stage("s0").error, {"error": "boom", "finished": time.time() + 1})
    state = _state(tmp_path)
    assert state.status == "failed" and state.lingering and state.held and "still running" in state.error
    slurm.fail("squeue")
    state = _state(tmp_path)
    assert state.held and "unknown" in state.error


# ------------------------------------------------------------------------------------------------ submit

def _grid(tmp_path, **changes):
    grid_file = write_grid(tmp_path, tiny_grid(name="t", **changes))
    return grid_file, build_plan(load_grid(grid_file))


def _submit(grid_file, *options):
    return CliRunner().invoke(app, ["submit", str(grid_file), "--executor", "slurm", *options])


def test_unknown_stages_are_never_resubmitted_and_submit_exits_3(tmp_path, slurm):
    grid_file, _ = _grid(tmp_path)
    result = _submit(grid_file)
    assert result.exit_code == 0, result.output
    submitted = len(slurm.calls("sbatch"))
    assert submitted == 6       # one job or array per stage kind
    slurm.fail("squeue")
    slurm.fail("sacct")
    for options in ((), ("--retry-failed",)):
        result = _submit(grid_file, *options)
        assert result.exit_code == 3, result.output
        assert "13 unknown (left alone), 0 to run" in result.output
    assert len(slurm.calls("sbatch")) == submitted
    status = CliRunner().invoke(app, ["status", str(grid_file)])
    assert status.exit_code == 0 and "warning: unknown" in status.output and "squeue failed" in status.output


def test_failed_stages_block_what_is_below_them_and_submit_exits_1(tmp_path, slurm):
    grid_file, plan = _grid(tmp_path)
    result = _submit(grid_file)
    assert result.exit_code == 0, result.output
    run_dir = plan.spec.run_dir
    for stage in plan.stages.values():
        record = json.loads(RunPaths(run_dir).stage(stage.id).submit.read_text())
        if stage.kind == "data":
            finish_stage(run_dir, stage)
        elif stage.kind == "parent":
            slurm.finish(record["job_id"], "OUT_OF_MEMORY", "0:125")
        else:
            slurm.finish(record["job_id"], "CANCELLED by 0", "0:15")
    result = _submit(grid_file)
    assert result.exit_code == 1 and "--retry-failed" in result.output and "out of memory" in result.output
    before = len(slurm.calls("sbatch"))
    result = _submit(grid_file, "--retry-failed", "--where", "kind=parent")
    assert result.exit_code == 0, result.output
    assert len(slurm.calls("sbatch")) == before + 1     # the parent only (its upstream, data, is done)


def test_a_crash_between_sbatch_and_the_record_does_not_submit_again(tmp_path, slurm, monkeypatch):
    grid_file, plan = _grid(tmp_path)
    real = slurm_backend.record_submission

    def crash_after_sbatch(run_dir, stage_id, backend, job_id, *args, **kwargs):
        if job_id is not None:
            raise KeyboardInterrupt      # the submitting process dies right after sbatch returned
        return real(run_dir, stage_id, backend, job_id, *args, **kwargs)

    monkeypatch.setattr(slurm_backend, "record_submission", crash_after_sbatch)
    with pytest.raises(KeyboardInterrupt):
        api.submit(grid_file, executor="slurm", report=lambda line: None)
    assert len(slurm.calls("sbatch")) == 1          # the data job went out; its record has no job id
    monkeypatch.setattr(slurm_backend, "record_submission", real)
    run_dir = plan.spec.run_dir
    data = next(s for s in plan.stages.values() if s.kind == "data")
    assert json.loads(RunPaths(run_dir).stage(data.id).submit.read_text())["job_id"] is None
    state = stage_states(run_dir, [data])[data.id]
    assert state.status == "pending" and state.held and state.reconciled and state.job_id == "1001"

    outcome = api.submit(grid_file, executor="slurm", report=lambda line: None)
    assert outcome.exit_code == 0
    calls = slurm.calls("sbatch")
    assert len(calls) == 6                            # the other five kinds, not data again
    assert json.loads(RunPaths(run_dir).stage(data.id).submit.read_text())["job_id"] == "1001"
    assert "afterany:1001" in slurm.scripts()["1002"]  # the parent waits on the reconciled data job


def test_the_data_stages_tasks_go_out_as_a_tokenizer_job_one_shard_array_and_an_assembly(tmp_path, slurm):
    grid_file = write_grid(tmp_path, tiny_grid(name="t", resources={
        "default": {"cpus": 1, "mem_gb": 1, "time_min": 10}, "data": {"tasks": 3, "cpus": 4}}))
    outcome = api.submit(grid_file, executor="slurm", report=lambda line: None)
    assert outcome.exit_code == 0
    plan = build_plan(load_grid(grid_file))
    run = RunPaths(plan.spec.run_dir)
    records = {stage.id: json.loads(run.stage(stage.id).submit.read_text()) for stage in plan.stages.values()}
    job_of = lambda kind: {records[s.id]["job_id"] for s in plan.stages.values() if s.kind == kind}
    (tokenizer,), shards, (data,) = job_of("tokenizer"), job_of("shard"), job_of("data")
    (array,) = {job.split("_")[0] for job in shards}
    assert shards == {f"{array}_{k}" for k in range(3)}             # one array of three tasks
    scripts = slurm.scripts()
    assert "#SBATCH --array=0-2" in scripts[array] and "#SBATCH --cpus-per-task=4" in scripts[array]
    assert f"afterany:{tokenizer}" in scripts[array]
    assert all(job in scripts[data] for job in shards)              # the assembly waits for every shard task
    assert "#SBATCH --cpus-per-task=4" in scripts[tokenizer] and "#SBATCH --cpus-per-task=4" in scripts[data]


def test_an_intent_the_scheduler_never_saw_is_submitted_again(tmp_path, slurm):
    RunPaths(tmp_path).stage("s0").folder.mkdir(parents=True)
    record_submission(tmp_path, "s0", "slurm", None, job_name="gridlab-t-data-00000000", array_task=None)
    state = _state(tmp_path)
    assert state.status == "pending" and not state.submitted       # sbatch never went through: nobody holds it
    slurm.fail("sacct")
    state = _state(tmp_path)
    assert state.status == "unknown" and "interrupted" in state.error


def test_a_hung_sbatch_leaves_records_the_next_look_resolves(tmp_path, slurm):
    grid_file, plan = _grid(tmp_path)
    slurm.hang("sbatch")
    result = _submit(grid_file)
    assert result.exit_code == 2 and "sbatch did not answer within 3 s" in result.output
    data = next(s for s in plan.stages.values() if s.kind == "data")
    # the fake hung before registering the job: both squeue and sacct answer that nobody has it
    assert stage_states(plan.spec.run_dir, [data])[data.id].submitted is False
    slurm.heal("sbatch")
    assert _submit(grid_file).exit_code == 0


def test_sbatch_refusing_is_one_line_and_holds_nothing(tmp_path, slurm):
    grid_file, plan = _grid(tmp_path)
    slurm.fail("sbatch", "sbatch: error: Invalid qos specification")
    result = _submit(grid_file)
    assert result.exit_code == 2
    assert "sbatch refused the data stages" in result.output and "Invalid qos specification" in result.output
    data = next(s for s in plan.stages.values() if s.kind == "data")
    assert not RunPaths(plan.spec.run_dir).stage(data.id).submit.exists()


def test_the_sbatch_script_carries_the_site_options(tmp_path, slurm):
    grid_file, plan = _grid(tmp_path, resources={
        "default": {"cpus": 1, "mem_gb": 1, "time_min": 10, "qos": "normal", "account": "proj",
                    "setup": ["module load cuda/12.4", "source $HOME/venv/bin/activate"],
                    "sbatch": {"exclusive": True, "nice": 10}},
        "train": {"constraint": "a100&ib", "gres": "gpu:a100:1", "exclude": "node[01-02]", "nodelist": "node07",
                  "reservation": "study", "mail_type": "END,FAIL", "mail_user": "me@lab.org",
                  "comment": "prune vs scratch", "sbatch": {"mem-bind": "local"}, "partition": "gpu"},
    })
    slurm.names(partitions=["cpu", "gpu"], accounts=["proj"])
    assert _submit(grid_file).exit_code == 0
    scripts = {}
    for path in RunPaths(plan.spec.run_dir).slurm_dir.glob("*/*_submission.sh"):   # submitit's copy, in the run
        scripts[path.parent.name] = path.read_text()
    assert len(scripts) == 6
    train = next(text for text in scripts.values() if "-train-" in text)
    data = next(text for text in scripts.values() if "-data-" in text)
    for line in ("#SBATCH --qos=normal", "#SBATCH --account=proj", "#SBATCH --constraint='a100&ib'",
                 "#SBATCH --gres=gpu:a100:1", "#SBATCH --exclude='node[01-02]'", "#SBATCH --nodelist=node07",
                 "#SBATCH --reservation=study", "#SBATCH --mail-type=END,FAIL", "#SBATCH --mail-user=me@lab.org",
                 "#SBATCH --comment='prune vs scratch'", "#SBATCH --exclusive", "#SBATCH --nice=10",
                 "#SBATCH --mem-bind=local", "#SBATCH --partition=gpu", "module load cuda/12.4",
                 "source $HOME/venv/bin/activate", "#SBATCH --mem=1GB", "#SBATCH --time=10",
                 "#SBATCH --cpus-per-task=1"):
        assert line in train, line
    assert "#SBATCH --qos=normal" in data and "--constraint" not in data and "--mem-bind" not in data
    assert train.index("module load cuda/12.4") < train.index("srun")


# ------------------------------------------------------------------------------------------------ cancel

def test_cancel_scancels_held_jobs_and_marks_their_stages(tmp_path, slurm):
    grid_file, plan = _grid(tmp_path)
    assert _submit(grid_file).exit_code == 0
    result = CliRunner().invoke(app, ["cancel", str(grid_file), "--where", "kind=train,eval"])
    assert result.exit_code == 0, result.output
    assert "cancelled 9 stage(s)" in result.output
    [call] = slurm.calls("scancel")
    assert len(call) == 9
    status = api.status(grid_file)
    assert status["stages"]["train"]["cancelled"] == 2 and status["stages"]["eval"]["cancelled"] == 7
    assert status["stages"]["prune"]["pending"] == 1
    # cancelled stages are rerun with --retry-failed, the others are left alone
    before = len(slurm.calls("sbatch"))
    assert _submit(grid_file).exit_code == 1
    assert _submit(grid_file, "--retry-failed").exit_code == 0
    assert len(slurm.calls("sbatch")) == before + 2


def test_cancel_fails_closed_when_scancel_fails(tmp_path, slurm):
    grid_file, plan = _grid(tmp_path)
    assert _submit(grid_file).exit_code == 0
    slurm.fail("scancel", "scancel: error: Unable to contact slurm controller")
    result = CliRunner().invoke(app, ["cancel", str(grid_file)])
    assert result.exit_code == 1 and "left as they were" in result.output
    assert api.status(grid_file)["stages"]["train"]["cancelled"] == 0


def test_cancel_of_jobs_that_already_ended_still_marks_the_rest(tmp_path, slurm):
    grid_file, plan = _grid(tmp_path)
    assert _submit(grid_file).exit_code == 0
    run_dir = plan.spec.run_dir
    parent = next(s for s in plan.stages.values() if s.kind == "parent")
    slurm.forget(json.loads(RunPaths(run_dir).stage(parent.id).submit.read_text())["job_id"])
    slurm.fail("sacct")          # the parent is unknown; scancel says its job id is invalid: benign
    result = CliRunner().invoke(app, ["cancel", str(grid_file)])
    assert result.exit_code == 0, result.output
    assert api.status(grid_file)["stages"]["parent"]["cancelled"] == 1


def test_a_watching_status_asks_slurm_at_most_every_30_s(tmp_path, slurm, monkeypatch):
    from gridlab import state as state_module

    job = _held(tmp_path, slurm)
    slurm.queue(job, "RUNNING")
    cache = state_module.SchedulerCache(max_age_s=30)
    now = [1000.0]
    monkeypatch.setattr(state_module.time, "time", lambda: now[0])
    for _ in range(5):
        assert stage_states(tmp_path, [{"id": "s0", "kind": "prune"}], scheduler=cache)["s0"].status == "running"
        now[0] += 5
    assert len(slurm.calls("squeue")) == 1
    now[0] += 30
    stage_states(tmp_path, [{"id": "s0", "kind": "prune"}], scheduler=cache)
    assert len(slurm.calls("squeue")) == 2


@pytest.mark.slow   # a real data stage in a job process
def test_a_job_the_slurm_backend_submits_runs_its_stage_where_slurm_starts_it(tmp_path, slurm):
    """The job side without a cluster: the sbatch script's own command (submitit's entry point, with the
    environment SLURM gives a job) unpickles the slurm backend's StageJob and runs the stage to its result."""
    import re
    import subprocess
    import sys

    grid_file, plan = _grid(tmp_path)
    assert api.submit(grid_file, executor="slurm", where=["kind=data"], report=lambda line: None).exit_code == 0
    data = next(s for s in plan.stages.values() if s.kind == "data")
    files = RunPaths(plan.spec.run_dir).stage(data.id)
    job = json.loads(files.submit.read_text())["job_id"]
    folder = re.search(r"submitit\.core\._submit (\S+)", slurm.scripts()[job]).group(1).replace("%j", job)
    environment = {"SLURM_JOB_ID": job, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                   "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1",
                   "SLURM_CPUS_PER_TASK": "1", "SUBMITIT_EXECUTOR": "slurm"}
    ran = subprocess.run([sys.executable, "-u", "-m", "submitit.core._submit", folder], capture_output=True,
                         text=True, env={**os.environ, **environment}, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert files.result.exists() and len(files.attempts.read_text().split()) == 1
    slurm.finish(job, "COMPLETED")
    assert stage_states(plan.spec.run_dir, [data])[data.id].status == "done"
