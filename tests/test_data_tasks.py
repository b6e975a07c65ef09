"""[resources.data] tasks = K end to end: a tokenizer stage, K shard stages and a data stage that only assembles give
the same shard bytes and the same numbers as one data stage; a shard stage whose worker is killed fails alone and
--retry-failed redoes only its partition; on a real SLURM cluster the shard stages run as one job array."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from gridlab import api
from gridlab.cli import app
from gridlab.layout import RunPaths
from gridlab.planfile import read_plan_record

from runner_helpers import slurm_available, tiny_grid, wait_until_settled, write_grid

pytestmark = pytest.mark.slow

# Imported by every Python process started with this folder on PYTHONPATH (the submit and its workers): the worker
# tokenizing unit HOLD_UNIT stops there, in the middle of its piece, until it is killed.
HOOK = """
import os
import time
from pathlib import Path

if os.environ.get("GRIDLAB_TEST_HOLD_UNIT"):
    from gridlab.data import shards

    _real = shards.iter_unit
    _unit = int(os.environ["GRIDLAB_TEST_HOLD_UNIT"])
    _mark = Path(os.environ["GRIDLAB_TEST_HOLD_MARK"])
    shards._BATCH_DOCUMENTS = 2  # so the held piece has really written tokens (the bytes do not depend on it)

    def _holding(source, unit):
        for count, document in enumerate(_real(source, unit)):
            if unit.index == _unit and count == 9 and not _mark.exists():
                _mark.write_text(str(os.getpid()))
                parent = os.getppid()
                while os.getppid() == parent:  # held until killed (a pool process whose worker died: ends)
                    time.sleep(0.05)
                os._exit(1)
            yield document

    shards.iter_unit = _holding
"""


def _grid(name: str, tasks: int) -> dict:
    return tiny_grid(name=name, inits=["pruned"], settings=[1],
                     resources={"default": {"cpus": 1, "mem_gb": 1, "time_min": 10}, "data": {"tasks": tasks}})


def _submit(grid_file, *options):
    return CliRunner().invoke(app, ["submit", str(grid_file), *options])


def _val_losses(run_dir) -> dict:
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        return dict(connection.execute("SELECT cell_id || '@' || tokens, value FROM metrics "
                                       "WHERE name = 'val_loss'").fetchall())


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _stages(run_dir, kind: str) -> list:
    return [stage for stage in read_plan_record(run_dir).stages if stage.kind == kind]


@pytest.fixture(scope="module")
def one_data_stage(tmp_path_factory):
    """The reference: the same grid with one data stage (tasks = 1)."""
    folder = tmp_path_factory.mktemp("k1")
    result = _submit(write_grid(folder, _grid("k1", 1)))
    assert result.exit_code == 0, result.output
    return folder / "runs" / "k1"


def test_two_tasks_give_the_same_shards_and_numbers_and_a_killed_shard_task_reruns_alone(one_data_stage, tmp_path):
    reference = one_data_stage
    grid_file = write_grid(tmp_path, _grid("k2", 2))
    run_dir = tmp_path / "runs" / "k2"
    run = RunPaths(run_dir)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    mark = tmp_path / "held"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
                   "GRIDLAB_TEST_HOLD_UNIT": "1", "GRIDLAB_TEST_HOLD_MARK": str(mark)}
    cli = subprocess.Popen([sys.executable, "-c", "from gridlab.cli import app; app()", "submit", str(grid_file)],
                           env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not mark.exists():
        assert time.time() < deadline and cli.poll() is None, "no shard stage reached the held unit"
        time.sleep(0.05)
    (data,) = _stages(run_dir, "data")
    shards = sorted(_stages(run_dir, "shard"), key=lambda stage: stage.config.partition)
    held = shards[1]                                       # unit 1 belongs to partition 1 of 2
    os.kill(json.loads(run.stage(held.id).submit.read_text())["pid"], signal.SIGKILL)
    output, _ = cli.communicate(timeout=600)
    assert cli.returncode == 1, output

    status = api.status(run_dir)
    failed = {failure["stage_id"]: failure for failure in status["failed"]}
    assert list(failed) == [held.id] and "killed by signal 9" in failed[held.id]["error"]
    assert status["stages"]["shard"]["done"] == 1 and status["stages"]["tokenizer"]["done"] == 1
    assert not run.stage(data.id).result.exists()
    (folder,) = {Path(json.loads(run.stage(shards[0].id).result.read_text())["payload"]["shard_dir"])}
    pieces = folder / "pieces"
    half = [p for p in pieces.iterdir() if p.name.startswith(".u000001.")]
    assert half and any(f.stat().st_size for f in half[0].iterdir())    # tokens written, the piece unfinished
    assert sorted(p.name for p in pieces.iterdir() if not p.name.startswith(".")) == ["u000000"]
    kept = (pieces / "u000000" / "piece.json").stat().st_mtime_ns

    result = _submit(grid_file, "--retry-failed")
    assert result.exit_code == 0, result.output
    attempts = {stage.id: len(run.stage(stage.id).attempts.read_text().split())
                for stage in [*_stages(run_dir, "tokenizer"), *shards]}
    assert attempts == {**dict.fromkeys(attempts, 1), held.id: 2}     # only the killed task ran again
    assert (pieces / "u000000" / "piece.json").stat().st_mtime_ns == kept
    assert not [p for p in pieces.iterdir() if p.name.startswith(".")]
    rerun = json.loads(run.stage(held.id).result.read_text())["payload"]
    assert rerun["units"] == {"written": 1} and rerun["partition"] == 1 and rerun["partitions"] == 2

    # the same data stage, the same bytes, the same numbers as one data stage
    assert data.id in {stage.id for stage in _stages(reference, "data")}
    for output_name in ("shards_dir", "tokenizer_dir"):
        files = _files(getattr(RunPaths(reference).stage(data.id), output_name))
        assert files and _files(getattr(run.stage(data.id), output_name)) == files, output_name
    assert f"{folder.name}/pieces/u000001/pretrain.bin" in _files(run.stage(data.id).shards_dir)
    losses = _val_losses(run_dir)
    assert len(losses) == 3 and losses == _val_losses(reference)


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_available(), reason="no SLURM cluster answers sinfo")
def test_shard_stages_run_as_one_slurm_array_and_the_grid_completes(one_data_stage, tmp_path):
    grid_file = write_grid(tmp_path, _grid("k2slurm", 2))
    run_dir = tmp_path / "runs" / "k2slurm"
    result = _submit(grid_file, "--executor", "slurm", "--wait")
    assert result.exit_code == 0, result.output
    states = wait_until_settled(run_dir)
    assert all(state.status == "done" for state in states.values()), {s.stage_id: s.error for s in states.values()}
    run = RunPaths(run_dir)
    records = [json.loads(run.stage(stage.id).submit.read_text()) for stage in _stages(run_dir, "shard")]
    arrays = {record["job_id"].split("_")[0] for record in records}
    assert len(arrays) == 1 and {record["array_task"] for record in records} == {"0", "1"}
    assert "submitted 2 shard stage(s) as array" in result.output
    assert _val_losses(run_dir) == _val_losses(one_data_stage)
