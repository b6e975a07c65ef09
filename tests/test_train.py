import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gridlab.data import TokenShard
from gridlab.model import init_model, load_model, make_config
from gridlab.train import TrainConfig, TrainingDiverged, _DataOrder, learning_rate, plan_branches, train

VOCAB, SEQ = 256, 32


def write_shard(folder: Path, n_sequences: int = 64, seed: int = 0) -> TokenShard:
    """A shard of token streams with structure to learn: each sequence counts up from a random start."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, VOCAB, size=(n_sequences, 1))
    tokens = ((starts + np.arange(SEQ)) % VOCAB).astype(np.uint16)
    folder.mkdir(parents=True, exist_ok=True)
    tokens.tofile(folder / "train.bin")
    meta = {"seq_len": SEQ, "n_sequences": n_sequences, "dtype": "uint16"}
    (folder / "train.json").write_text(json.dumps(meta))
    return TokenShard.open(folder / "train.bin")


def tiny_model(seed: int = 0):
    config = make_config("micro", VOCAB, SEQ, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return init_model(config, seed)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(lr=1e-2, warmup_tokens=2 * 4 * SEQ, batch_size=4, seq_len=SEQ, log_every_steps=2,
                  checkpoint_every_tokens=3 * 4 * SEQ, decay_fraction=0.25)
    return TrainConfig(**{**values, **overrides})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_budget_smaller_than_one_batch_is_a_one_line_error():
    with pytest.raises(ValueError, match="smaller than one batch") as error:
        plan_branches(tiny_config(), [100])
    assert "\n" not in str(error.value)


def test_wsd_branches_fork_at_budget_times_one_minus_decay_fraction():
    config = tiny_config(decay_fraction=0.25)
    step_tokens = config.tokens_per_step
    plans = {plan.budget_tokens: plan for plan in plan_branches(config, [40 * step_tokens, 8 * step_tokens])}
    assert (plans[40 * step_tokens].fork_step, plans[40 * step_tokens].steps) == (30, 40)
    assert (plans[8 * step_tokens].fork_step, plans[8 * step_tokens].steps) == (6, 8)


@pytest.mark.parametrize("shape", ["1-sqrt", "linear"])
def test_wsd_lr_warms_up_holds_then_decays_to_min(shape):
    config = tiny_config(lr=1.0, min_lr_ratio=0.1, warmup_tokens=4 * 4 * SEQ, decay_shape=shape)
    (plan,) = plan_branches(config, [20 * config.tokens_per_step])
    lrs = [learning_rate(config, step, plan) for step in range(plan.steps)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:plan.fork_step] == [1.0] * (plan.fork_step - 4)
    decay = lrs[plan.fork_step:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.1)


def test_cosine_lr_reaches_min_at_the_budget():
    config = tiny_config(schedule="cosine", lr=1.0, min_lr_ratio=0.0, warmup_tokens=0)
    (plan,) = plan_branches(config, [10 * config.tokens_per_step])
    assert plan.fork_step == 0
    lrs = [learning_rate(config, step, plan) for step in range(plan.steps)]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_data_order_is_a_fresh_permutation_every_epoch():
    order = _DataOrder(n_sequences=10, batch_size=4, seed=3)
    seen = torch.cat([order.batch(step) for step in range(5)])  # 20 sequences: exactly two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])
    assert torch.equal(_DataOrder(10, 4, seed=3).batch(3), order.batch(3))


def test_wsd_branch_equals_a_run_to_that_budget_alone(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    step_tokens = config.tokens_per_step
    both = train(tiny_model(), data, config, [8 * step_tokens, 16 * step_tokens], tmp_path / "both")
    alone = train(tiny_model(), data, config, [8 * step_tokens], tmp_path / "alone")
    assert [b.budget_tokens for b in both.branches] == [8 * step_tokens, 16 * step_tokens]
    assert both.branches[0].trained_tokens == 8 * step_tokens
    assert_same_weights(weights(both.branches[0].path), weights(alone.branches[0].path))
    assert both.branches[0].curve == alone.branches[0].curve
    # the long branch shares the main trajectory up to its own fork, then decays on its own
    long_curve = both.branches[1].curve
    assert [p["tokens"] for p in long_curve] == [2 * step_tokens * k for k in range(1, 9)]
    assert long_curve[:3] == both.branches[0].curve[:3]
    assert long_curve[-1]["lr"] == pytest.approx(config.lr * config.min_lr_ratio)
    assert long_curve[-1]["loss"] < long_curve[0]["loss"]
    reloaded, mask = load_model(both.branches[1].path)
    assert mask is None and reloaded.config.num_hidden_layers == 2


def test_cosine_runs_each_budget_independently(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config(schedule="cosine")
    step_tokens = config.tokens_per_step
    both = train(tiny_model(), data, config, [4 * step_tokens, 6 * step_tokens], tmp_path / "both")
    alone = train(tiny_model(), data, config, [6 * step_tokens], tmp_path / "alone")
    assert_same_weights(weights(both.branches[1].path), weights(alone.branches[0].path))
    assert both.branches[0].curve[-1]["tokens"] == 4 * step_tokens


def test_calling_again_returns_the_finished_result_without_training(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    first = train(tiny_model(), data, config, [6 * config.tokens_per_step], tmp_path / "run")
    stamp = (first.branches[0].path / "model.safetensors").stat().st_mtime_ns
    again = train(tiny_model(), data, config, [6 * config.tokens_per_step], tmp_path / "run")
    assert again == first
    assert (first.branches[0].path / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_checkpoint_of_other_arguments_is_refused(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    train(tiny_model(), data, config, [6 * config.tokens_per_step], tmp_path / "run")
    with pytest.raises(ValueError, match="different training run"):
        train(tiny_model(), data, tiny_config(lr=0.5), [6 * config.tokens_per_step], tmp_path / "run")


def test_masked_weights_stay_exactly_zero_after_every_step(tmp_path):
    data = write_shard(tmp_path / "data")
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    mask = {name: torch.rand(p.shape, generator=generator) > 0.5
            for name, p in model.named_parameters() if name.endswith(("q_proj.weight", "down_proj.weight"))}
    assert all((p[~mask[n]] != 0).any() for n, p in model.named_parameters() if n in mask)
    params = dict(model.named_parameters())
    forwards = []
    original_forward = model.forward

    def checking_forward(*args, **kwargs):
        forwards.append(all(bool((params[n][~keep] == 0).all()) for n, keep in mask.items()))
        return original_forward(*args, **kwargs)

    model.forward = checking_forward
    config = tiny_config(weight_decay=0.5, beta1=0.9, lr=5e-2)  # decay and momentum both push masked weights
    result = train(model, data, config, [10 * config.tokens_per_step], tmp_path / "run", mask=mask)
    assert len(forwards) == 10 and all(forwards)
    saved, saved_mask = load_model(result.branches[0].path)
    assert saved_mask.keys() == mask.keys()
    for name, keep in mask.items():
        weight = dict(saved.named_parameters())[name]
        assert torch.equal(saved_mask[name], keep)
        assert bool((weight[~keep] == 0).all()) and bool((weight[keep] != 0).all())


def test_nan_loss_raises_training_diverged_with_the_step(tmp_path):
    data = write_shard(tmp_path / "data")
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    config = tiny_config()
    with pytest.raises(TrainingDiverged, match=r"at step 0 \(128 tokens\)") as error:
        train(model, data, config, [6 * config.tokens_per_step], tmp_path / "run")
    assert error.value.step == 0


def test_seq_len_must_match_the_shard(tmp_path):
    data = write_shard(tmp_path / "data")
    with pytest.raises(ValueError, match="sequences of 32"):
        train(tiny_model(), data, tiny_config(seq_len=64), [64 * 64], tmp_path / "run")


RUNNER = """
import sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_train import tiny_model, tiny_config, write_shard
from gridlab.data import TokenShard
from gridlab.train import train
model = tiny_model()
original_forward = model.forward
def slow_forward(*args, **kwargs):  # slow enough for the parent to kill us mid-run; numerics untouched
    time.sleep({delay})
    return original_forward(*args, **kwargs)
model.forward = slow_forward
config = tiny_config()
result = train(model, TokenShard.open({data!r}), config, [8 * config.tokens_per_step, 16 * config.tokens_per_step],
               Path({out!r}))
print("DONE")
"""


def _start(tmp_path: Path, out: Path, delay: float) -> subprocess.Popen:
    script = RUNNER.format(tests=str(Path(__file__).parent), data=str(tmp_path / "data" / "train.bin"),
                           out=str(out), delay=delay)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _kill_when(process: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def test_sigkilled_run_resumes_to_the_same_curve_and_weights(tmp_path):
    write_shard(tmp_path / "data")
    config = tiny_config()
    checkpoints = tmp_path / "killed" / "checkpoint"

    def main_checkpoint_past_start() -> bool:
        path = checkpoints / "main.json"
        try:
            return json.loads(path.read_text())["step"] > 0
        except FileNotFoundError:
            return False

    # 1st kill: after the first periodic checkpoint of the main trajectory
    _kill_when(_start(tmp_path, tmp_path / "killed", delay=0.05), main_checkpoint_past_start)
    # 2nd kill: during the decay of the 16-step branch (a checkpoint inside the branch exists)
    branch_checkpoint = checkpoints / f"branch-{16 * config.tokens_per_step}.json"
    _kill_when(_start(tmp_path, tmp_path / "killed", delay=0.05), branch_checkpoint.exists)
    resumed = _start(tmp_path, tmp_path / "killed", delay=0.0)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()[-2000:]

    data = TokenShard.open(tmp_path / "data" / "train.bin")
    budgets = [8 * config.tokens_per_step, 16 * config.tokens_per_step]
    straight = train(tiny_model(), data, config, budgets, tmp_path / "straight")
    killed = train(tiny_model(), data, config, budgets, tmp_path / "killed")  # finished: reads the result
    assert killed.curve == straight.curve
    for a, b in zip(killed.branches, straight.branches):
        assert a.curve == b.curve and a.trained_tokens == b.trained_tokens
        assert_same_weights(weights(a.path), weights(b.path))
