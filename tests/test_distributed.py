"""Multi-process training on CPU (gloo): N ranks compute what one process computes, and resume exactly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gridlab.data import TokenShard
from gridlab.train import train

from test_train import STEP, tiny_config, tiny_model, weights, write_shard

WORKER = Path(__file__).parent / "distributed_worker.py"
BUDGETS = [8, 12]  # steps; WSD branches fork at 6 and 9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, out: Path, strategy: str, nproc: int = 2, **extra) -> subprocess.Popen:
    args = {"data": str(tmp_path / "data" / "train.bin"), "out": str(out), "budgets": BUDGETS,
            "strategy": strategy, "result": str(out) + ".json", **extra}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(WORKER), json.dumps(args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output.decode()[-3000:]


def single_process(tmp_path: Path, masked: bool = False):
    config = tiny_config()
    model = tiny_model()
    mask = None
    if masked:
        from distributed_worker import checkerboard_mask

        mask = checkerboard_mask(model)
    budgets = [steps * STEP for steps in BUDGETS]
    return train(model, TokenShard.open(tmp_path / "data" / "train.bin"), config, budgets, tmp_path / "single",
                 seed=0, mask=mask)


def assert_close_curves(a: list[dict], b: list[dict]) -> None:
    assert [p["tokens"] for p in a] == [p["tokens"] for p in b]
    assert [p["lr"] for p in a] == pytest.approx([p["lr"] for p in b])
    assert [p["loss"] for p in a] == pytest.approx([p["loss"] for p in b], rel=1e-4)


def assert_close_weights(path_a, path_b) -> None:
    a, b = weights(path_a), weights(path_b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=5e-5, msg=name)


@pytest.fixture
def shard(tmp_path):
    write_shard(tmp_path / "data")
    return tmp_path


# fsdp (the default) in the fast suite; ddp with the slow ones
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(shard, strategy):
    tmp_path = shard
    finish(launch(tmp_path, tmp_path / strategy, strategy))
    reference = single_process(tmp_path)
    ranked = json.loads((tmp_path / f"{strategy}.json").read_text())
    assert ranked["world_size"] == 2
    assert_close_curves(ranked["curve"], reference.curve)
    for branch, expected in zip(ranked["branches"], reference.branches):
        assert branch["budget"] == expected.budget_tokens
        assert_close_curves(branch["curve"], expected.curve)
        assert_close_weights(branch["path"], expected.path)


@pytest.mark.slow   # multi-process runs: pytest -m slow (the fast suite keeps the fsdp equality)
def test_sparse_mask_survives_sharded_training(shard):
    tmp_path = shard
    finish(launch(tmp_path, tmp_path / "masked", "fsdp", masked=True))
    reference = single_process(tmp_path, masked=True)
    ranked = json.loads((tmp_path / "masked.json").read_text())
    from distributed_worker import checkerboard_mask

    mask = checkerboard_mask(tiny_model())
    for branch, expected in zip(ranked["branches"], reference.branches):
        trained = weights(branch["path"])
        for name, keep in mask.items():
            assert torch.all(trained[name][~keep] == 0), name
        assert_close_weights(branch["path"], expected.path)


def _kill_when(process: subprocess.Popen, condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow   # multi-process runs: pytest -m slow (the fast suite keeps the fsdp equality)
def test_two_rank_run_killed_and_resumed_is_exact_and_resumes_at_another_world_size(shard):
    tmp_path = shard
    finish(launch(tmp_path, tmp_path / "straight", "fsdp"))
    straight = json.loads((tmp_path / "straight.json").read_text())

    checkpoints = tmp_path / "killed" / "checkpoint"

    def past_first_checkpoint() -> bool:
        try:
            return json.loads((checkpoints / "main.json").read_text())["step"] > 0
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    _kill_when(launch(tmp_path, tmp_path / "killed", "fsdp", delay=0.2), past_first_checkpoint)
    finish(launch(tmp_path, tmp_path / "killed", "fsdp"))
    resumed = json.loads((tmp_path / "killed.json").read_text())
    assert resumed["curve"] == straight["curve"]
    for a, b in zip(resumed["branches"], straight["branches"]):
        assert a["curve"] == b["curve"]
        for name, tensor in weights(a["path"]).items():
            assert torch.equal(tensor, weights(b["path"])[name]), name

    # The same 2-rank checkpoint resumed by one process (sharded state re-read at world size 1).
    _kill_when(launch(tmp_path, tmp_path / "regrouped", "fsdp", delay=0.2),
               lambda: (tmp_path / "regrouped" / "checkpoint" / "main.json").exists()
               and json.loads((tmp_path / "regrouped" / "checkpoint" / "main.json").read_text())["step"] > 0)
    finish(launch(tmp_path, tmp_path / "regrouped", "fsdp", nproc=1))
    regrouped = json.loads((tmp_path / "regrouped.json").read_text())
    assert regrouped["world_size"] == 1
    assert_close_curves(regrouped["curve"], straight["curve"])
    for a, b in zip(regrouped["branches"], straight["branches"]):
        assert_close_weights(a["path"], b["path"])
