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

from gridlab.checkpoint import checkpoint_bytes
from gridlab.config import Schedule
from gridlab.data import TokenShard
from gridlab.model import init_model, load_model, make_config
from gridlab.train import _DataOrder, learning_rate, plan_branches, remaining_tokens, train

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


STEP = 4 * SEQ  # tokens per step of tiny_config (batch 4 × SEQ)


def tiny_config(**overrides) -> Schedule:
    values = dict(lr=1e-2, warmup_tokens=2 * STEP, batch_size=4, log_every_steps=2,
                  checkpoint_every_tokens=3 * STEP, decay_fraction=0.25)
    return Schedule(**{**values, **overrides})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_budget_smaller_than_one_batch_is_a_one_line_error():
    with pytest.raises(ValueError, match="smaller than one batch") as error:
        plan_branches(tiny_config(), [100], STEP)
    assert "\n" not in str(error.value)


def test_wsd_branches_fork_at_budget_times_one_minus_decay_fraction():
    config = tiny_config(decay_fraction=0.25)
    step_tokens = STEP
    plans = {plan.budget_tokens: plan for plan in plan_branches(config, [40 * step_tokens, 8 * step_tokens], STEP)}
    assert (plans[40 * step_tokens].fork_step, plans[40 * step_tokens].steps) == (30, 40)
    assert (plans[8 * step_tokens].fork_step, plans[8 * step_tokens].steps) == (6, 8)


@pytest.mark.parametrize("shape", ["1-sqrt", "linear"])
def test_wsd_lr_warms_up_holds_then_decays_to_min(shape):
    config = tiny_config(lr=1.0, min_lr_ratio=0.1, warmup_tokens=4 * 4 * SEQ, decay_shape=shape)
    (plan,) = plan_branches(config, [20 * STEP], STEP)
    lrs = [learning_rate(config, STEP, step, plan) for step in range(plan.steps)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:plan.fork_step] == [1.0] * (plan.fork_step - 4)
    decay = lrs[plan.fork_step:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.1)


def test_cosine_lr_reaches_min_at_the_budget():
    config = tiny_config(kind="cosine", lr=1.0, min_lr_ratio=0.0, warmup_tokens=0)
    (plan,) = plan_branches(config, [10 * STEP], STEP)
    assert plan.fork_step == 0
    lrs = [learning_rate(config, STEP, step, plan) for step in range(plan.steps)]
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
    step_tokens = STEP
    both = train(tiny_model(), data, config, [8 * step_tokens, 16 * step_tokens], tmp_path / "both", seed=0)
    alone = train(tiny_model(), data, config, [8 * step_tokens], tmp_path / "alone", seed=0)
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
    config = tiny_config(kind="cosine")
    step_tokens = STEP
    both = train(tiny_model(), data, config, [4 * step_tokens, 6 * step_tokens], tmp_path / "both", seed=0)
    alone = train(tiny_model(), data, config, [6 * step_tokens], tmp_path / "alone", seed=0)
    assert_same_weights(weights(both.branches[1].path), weights(alone.branches[0].path))
    assert both.branches[0].curve[-1]["tokens"] == 4 * step_tokens


def test_calling_again_returns_the_finished_result_without_training(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    first = train(tiny_model(), data, config, [6 * STEP], tmp_path / "run", seed=0)
    stamp = (first.branches[0].path / "model.safetensors").stat().st_mtime_ns
    again = train(tiny_model(), data, config, [6 * STEP], tmp_path / "run", seed=0)
    assert again == first
    assert (first.branches[0].path / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_checkpoint_of_other_arguments_is_refused(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    train(tiny_model(), data, config, [6 * STEP], tmp_path / "run", seed=0)
    with pytest.raises(ValueError, match="different training run"):
        train(tiny_model(), data, tiny_config(lr=0.5), [6 * STEP], tmp_path / "run", seed=0)


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
    result = train(model, data, config, [10 * STEP], tmp_path / "run", seed=0, mask=mask)
    assert len(forwards) == 10 and all(forwards)
    saved, saved_mask = load_model(result.branches[0].path)
    assert saved_mask.keys() == mask.keys()
    for name, keep in mask.items():
        weight = dict(saved.named_parameters())[name]
        assert torch.equal(saved_mask[name], keep)
        assert bool((weight[~keep] == 0).all()) and bool((weight[keep] != 0).all())


def test_the_clipped_gradient_norm_counts_only_kept_positions(tmp_path, monkeypatch):
    """Gradients are masked before clipping: every clip sees zero gradients at masked positions, and the norm it
    clips is the norm of the kept positions' gradients — recomputed here from a separate forward/backward of the same
    batch on the same weights — not of all of them (which is larger: the masked positions get gradients)."""
    import gridlab.train as train_module

    data = write_shard(tmp_path / "data")
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    mask = {name: torch.rand(p.shape, generator=generator) > 0.7
            for name, p in model.named_parameters() if name.endswith("proj.weight")}
    params = dict(model.named_parameters())
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, **kwargs):
        parameters = list(parameters)
        masked_grad = max(float(params[n].grad[~keep].abs().max()) for n, keep in mask.items())
        kept = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in parameters))
        total = real_clip(parameters, max_norm, **kwargs)
        seen.append((masked_grad, float(kept), float(total)))
        return total

    monkeypatch.setattr(train_module.torch.nn.utils, "clip_grad_norm_", spy)
    first_batch = data[train_module._DataOrder(data.n_sequences, 4, 0).batch(0)]
    reference = tiny_model()
    with torch.no_grad():
        for name, keep in mask.items():
            dict(reference.named_parameters())[name].mul_(keep)
    reference(input_ids=first_batch, labels=first_batch).loss.backward()
    reference_params = dict(reference.named_parameters())
    all_positions = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in reference.parameters()))
    only_kept = math.sqrt(sum(float((p.grad.double() ** 2).sum()) if n not in mask else
                              float(((p.grad.double() * mask[n]) ** 2).sum())
                              for n, p in reference_params.items()))
    train(model, data, tiny_config(grad_clip=0.5), [4 * STEP], tmp_path / "run", seed=0, mask=mask)
    assert len(seen) == 4 and all(masked == 0 for masked, _, _ in seen)
    assert seen[0][2] == pytest.approx(only_kept, rel=1e-5)
    assert all_positions - seen[0][2] > 1000 * abs(seen[0][2] - only_kept)   # the masked positions would count
    assert all(total == pytest.approx(kept, rel=1e-5) for _, kept, total in seen)


def test_a_starting_model_with_non_finite_weights_is_refused(tmp_path):
    data = write_shard(tmp_path / "data")
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="starting model holds non-finite weights"):
        train(model, data, tiny_config(), [6 * STEP], tmp_path / "run", seed=0)
    assert not (tmp_path / "run" / "checkpoint").exists()


RUNNER = """
import sys, time, torch
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_train import STEP, tiny_model, tiny_config, write_shard
from gridlab.data import TokenShard
from gridlab.train import train
model = tiny_model()
original_forward = model.forward
def slow_forward(*args, **kwargs):  # slow enough for the parent to kill us mid-run; numerics untouched
    time.sleep({delay})
    return original_forward(*args, **kwargs)
model.forward = slow_forward
config = tiny_config()
result = train(model, TokenShard.open({data!r}), config, {budgets!r}, Path({out!r}), seed=0)
print("DONE")
"""


def _start(tmp_path: Path, out: Path, delay: float, budgets=(8 * STEP, 16 * STEP)) -> subprocess.Popen:
    script = RUNNER.format(tests=str(Path(__file__).parent), data=str(tmp_path / "data" / "train.bin"),
                           budgets=list(budgets),
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


@pytest.mark.slow   # three training processes killed and resumed (the fast suite keeps the killed extension)
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
    branch_checkpoint = checkpoints / f"branch-{16 * STEP}.json"
    _kill_when(_start(tmp_path, tmp_path / "killed", delay=0.05), branch_checkpoint.exists)
    resumed = _start(tmp_path, tmp_path / "killed", delay=0.0)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()[-2000:]

    data = TokenShard.open(tmp_path / "data" / "train.bin")
    budgets = [8 * STEP, 16 * STEP]
    straight = train(tiny_model(), data, config, budgets, tmp_path / "straight", seed=0)
    killed = train(tiny_model(), data, config, budgets, tmp_path / "killed", seed=0)  # finished: reads the result
    assert killed.curve == straight.curve
    for a, b in zip(killed.branches, straight.branches):
        assert a.curve == b.curve and a.trained_tokens == b.trained_tokens
        assert_same_weights(weights(a.path), weights(b.path))


# ------------------------------------------------------------------------------------------------ trajectories

def counting(model) -> list[int]:
    """Count the model's forward calls (one per training step) in the returned list's length."""
    calls: list[int] = []
    original_forward = model.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return original_forward(*args, **kwargs)

    model.forward = forward
    return calls


def poisoned(model, at_call: int):
    """The loss of the `at_call`-th forward (0-based, counted over the whole call) becomes NaN."""
    calls = []
    original_forward = model.forward

    def forward(*args, **kwargs):
        output = original_forward(*args, **kwargs)
        if len(calls) == at_call:
            output.loss = output.loss * float("nan")
        calls.append(1)
        return output

    model.forward = forward
    return model


def test_identity_leaves_out_execution_fields():
    base = tiny_config()
    # the fields it sets that change numbers; execution fields and fields at their default stay out
    assert set(base.identity()) == {"lr", "warmup_tokens", "batch_size", "decay_fraction"}
    for name, value in [("strategy", "ddp"), ("activation_checkpointing", True), ("device", "cpu"),
                        ("log_every_steps", 7), ("checkpoint_every_tokens", "40k"), ("keep_checkpoints", "all")]:
        assert tiny_config(**{name: value}).identity() == base.identity(), name
    assert tiny_config(lr=0.5).identity() != base.identity()


@pytest.mark.parametrize("bad", [dict(lr=float("inf")), dict(batch_size=4.5), dict(batch_size=True),
                                 dict(warmup_tokens="1e400"), dict(kind="linear"), dict(seq_len=32),
                                 dict(activation_checkpointing="yes"), dict(keep_checkpoints="some")])
def test_schedule_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        tiny_config(**bad)


def test_a_new_largest_budget_extends_the_trajectory_bit_exactly(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    a, b, c = 8 * STEP, 12 * STEP, 20 * STEP  # forks at steps 6, 9, 15
    assert remaining_tokens(config, [a, b, c], SEQ, tmp_path / "fresh") == (15 + 2 + 3 + 5) * STEP
    fresh = train(tiny_model(), data, config, [a, b, c], tmp_path / "fresh", seed=0)

    first = train(tiny_model(), data, config, [a, b], tmp_path / "grown", seed=0)
    stamps = {br.budget_tokens: (br.path / "model.safetensors").stat().st_mtime_ns for br in first.branches}
    assert remaining_tokens(config, [a, b], SEQ, tmp_path / "grown") == 0
    # the trunk from the kept main state at fork 9 to fork 15, then the new branch's decay
    assert remaining_tokens(config, [a, b, c], SEQ, tmp_path / "grown") == (6 + 5) * STEP
    model = tiny_model()
    calls = counting(model)
    grown = train(model, data, config, [a, b, c], tmp_path / "grown", seed=0)
    assert len(calls) == 6 + 5
    assert remaining_tokens(config, [a, b, c], SEQ, tmp_path / "grown") == 0
    assert [br.budget_tokens for br in grown.branches] == [a, b, c]
    assert grown.branches[:2] == first.branches  # paths, curves, tokens unchanged
    for br in first.branches:
        assert (br.path / "model.safetensors").stat().st_mtime_ns == stamps[br.budget_tokens]
    for mine, theirs in zip(grown.branches, fresh.branches):
        assert mine.curve == theirs.curve and mine.trained_tokens == theirs.trained_tokens
        assert_same_weights(weights(mine.path), weights(theirs.path))
    assert grown.curve == fresh.curve


def test_a_new_budget_forking_before_the_kept_trunk_replays_it_from_the_start(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    a, b, c = 8 * STEP, 12 * STEP, 20 * STEP
    fresh = train(tiny_model(), data, config, [a, b, c], tmp_path / "fresh", seed=0)
    train(tiny_model(), data, config, [a, c], tmp_path / "gap", seed=0)  # main kept at fork 15
    assert remaining_tokens(config, [a, b, c], SEQ, tmp_path / "gap") == 12 * STEP  # b from step 0
    model = tiny_model()
    calls = counting(model)
    filled = train(model, data, config, [a, b, c], tmp_path / "gap", seed=0)
    assert len(calls) == 12
    assert filled.branches[1].curve == fresh.branches[1].curve
    assert_same_weights(weights(filled.branches[1].path), weights(fresh.branches[1].path))
    # the trunk state is still the one at fork 15: a budget above c extends from there
    assert remaining_tokens(config, [a, b, c, 24 * STEP], SEQ, tmp_path / "gap") == (18 - 15 + 6) * STEP


def test_cosine_adds_one_run_per_new_budget(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config(kind="cosine")
    train(tiny_model(), data, config, [4 * STEP, 6 * STEP], tmp_path / "runs", seed=0)
    assert not (tmp_path / "runs" / "checkpoint").exists()  # extendable cosine keeps nothing
    assert remaining_tokens(config, [4 * STEP, 6 * STEP, 8 * STEP], SEQ, tmp_path / "runs") == 8 * STEP
    model = tiny_model()
    calls = counting(model)
    grown = train(model, data, config, [4 * STEP, 6 * STEP, 8 * STEP], tmp_path / "runs", seed=0)
    assert len(calls) == 8
    alone = train(tiny_model(), data, config, [8 * STEP], tmp_path / "alone", seed=0)
    assert_same_weights(weights(grown.branches[2].path), weights(alone.branches[0].path))


@pytest.mark.parametrize("keep, kind, left", [("extendable", "wsd", ["main-000000012", "main.json"]),
                                             ("all", "wsd", ["main-000000012", "main.json"]),
                                             ("none", "wsd", None), ("extendable", "cosine", None),
                                             ("all", "cosine", ["start-000000000", "start.json"])])
def test_retention_keeps_what_extension_needs(tmp_path, keep, kind, left):
    data = write_shard(tmp_path / "data")
    config = tiny_config(keep_checkpoints=keep, kind=kind)
    result = train(tiny_model(), data, config, [8 * STEP, 16 * STEP], tmp_path / "run", seed=0)
    folder = tmp_path / "run" / "checkpoint"
    assert (sorted(p.name for p in folder.iterdir()) if folder.exists() else None) == left
    assert all(branch.path.is_dir() for branch in result.branches)
    # whatever was kept, one more budget is still trained correctly (after "none": the trunk from step 0)
    expected = {"wsd": (18 - 12 + 6 if left else 24), "cosine": 24}[kind]
    assert remaining_tokens(config, [8 * STEP, 16 * STEP, 24 * STEP], SEQ, tmp_path / "run") == expected * STEP


def test_checkpoint_bytes_is_what_a_saved_training_state_takes(tmp_path):
    data = write_shard(tmp_path / "data")
    model = tiny_model()
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters())) * 4  # weight, exp_avg, exp_avg_sq, step
    train(model, data, tiny_config(), [8 * STEP], tmp_path / "run", seed=0)
    (state,) = [p for p in (tmp_path / "run" / "checkpoint").iterdir() if p.is_dir()]
    on_disk = sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
    assert checkpoint_bytes(n_params) == 12 * n_params
    # beyond the 12 bytes per parameter: a few kB per tensor (serialisation, DCP metadata) and the RNG file,
    # a large share of this 35k-parameter model and nothing at any size worth planning for
    assert checkpoint_bytes(n_params) <= on_disk < checkpoint_bytes(n_params) + 3000 * n_tensors + 10_000


def test_a_nan_in_one_branch_fails_only_that_branch(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    budgets = [8 * STEP, 16 * STEP]  # forks 6 and 12; calls 0-5 trunk, 6-7 branch 8, 8-13 trunk, 14-17 branch 16
    clean = train(tiny_model(), data, config, budgets, tmp_path / "clean", seed=0)
    result = train(poisoned(tiny_model(), at_call=7), data, config, budgets, tmp_path / "run", seed=0)
    short, long = result.branches
    assert short.status == "diverged" and short.path is None
    assert short.error == f"branch {8 * STEP}: training diverged: loss nan at step 7 ({8 * STEP} tokens)"
    assert not (tmp_path / "run" / "branches" / str(8 * STEP)).exists()
    assert long.status == "done" and long.error is None and result.diverged == [short]
    assert long.curve == clean.branches[1].curve
    assert_same_weights(weights(long.path), weights(clean.branches[1].path))
    # the diverged branch is a result too: calling again does not retrain it
    assert remaining_tokens(config, budgets, SEQ, tmp_path / "run") == 0


def test_a_nan_on_the_trunk_fails_the_branches_after_it_and_blocks_extension(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    budgets = [8 * STEP, 16 * STEP]
    clean = train(tiny_model(), data, config, budgets, tmp_path / "clean", seed=0)
    result = train(poisoned(tiny_model(), at_call=9), data, config, budgets, tmp_path / "run", seed=0)  # step 7
    short, long = result.branches
    assert short.status == "done"
    assert_same_weights(weights(short.path), weights(clean.branches[0].path))
    assert long.status == "diverged" and "loss nan at step 7" in long.error and "on the trunk" in long.error
    assert json.loads((tmp_path / "run" / "checkpoint" / "main.json").read_text())["step"] == 6
    # a budget forking after the diverged step is not trained, now or later
    assert remaining_tokens(config, budgets + [24 * STEP], SEQ, tmp_path / "run") == 0
    model = tiny_model()
    calls = counting(model)
    again = train(model, data, config, budgets + [24 * STEP], tmp_path / "run", seed=0)
    assert len(calls) == 0 and again.branches[2].status == "diverged"


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    import gridlab.train as train_module

    data = write_shard(tmp_path / "data")
    steps = []
    make_optimizer = train_module.make_optimizer

    def poisoning_optimizer(model, schedule):
        optimizer = make_optimizer(model, schedule)

        def after_step(optimizer, args, kwargs):
            steps.append(1)
            if len(steps) == 9:  # the update of step 8: step 9's state, due for a checkpoint, is non-finite
                with torch.no_grad():
                    next(iter(model.parameters()))[0, 0] = float("inf")

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", poisoning_optimizer)
    result = train(tiny_model(), data, tiny_config(), [16 * STEP], tmp_path / "run", seed=0)
    (branch,) = result.branches
    assert branch.status == "diverged" and "non-finite weights after step 8" in branch.error
    assert json.loads((tmp_path / "run" / "checkpoint" / "main.json").read_text())["step"] == 6
    assert not (tmp_path / "run" / "branches").exists()


def test_an_extension_killed_midway_resumes_bit_exactly(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    budgets = [8 * STEP, 16 * STEP]
    train(tiny_model(), data, config, budgets[:1], tmp_path / "killed", seed=0)  # main kept at fork 6
    main = tmp_path / "killed" / "checkpoint" / "main.json"

    def trunk_extended() -> bool:
        try:
            return json.loads(main.read_text())["step"] > 6
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    _kill_when(_start(tmp_path, tmp_path / "killed", delay=0.05, budgets=budgets), trunk_extended)
    branch = main.with_name(f"branch-{16 * STEP}.json")
    if branch.exists():  # killed in the decay: the branch resumes
        left = 16 - json.loads(branch.read_text())["step"]
    else:  # killed on the trunk: from its last checkpoint to fork 12, then the decay
        left = 12 - json.loads(main.read_text())["step"] + 4
    assert remaining_tokens(config, budgets, SEQ, tmp_path / "killed") == left * STEP < 10 * STEP
    resumed = train(tiny_model(), data, config, budgets, tmp_path / "killed", seed=0)
    straight = train(tiny_model(), data, config, budgets, tmp_path / "straight", seed=0)
    assert resumed.curve == straight.curve
    for a, b in zip(resumed.branches, straight.branches):
        assert a.curve == b.curve
        assert_same_weights(weights(a.path), weights(b.path))


def test_progress_reports_every_log_interval_and_what_the_call_trained(tmp_path):
    data = write_shard(tmp_path / "data")
    config = tiny_config()
    a, b = 8 * STEP, 12 * STEP                      # forks at steps 6 and 9; branches end at 8 and 12
    points = []
    plain = train(tiny_model(), data, config, [a, b], tmp_path / "plain", seed=0)
    result = train(tiny_model(), data, config, [a, b], tmp_path / "watched", seed=0, progress=points.append)
    assert result.curve == plain.curve and result.branches[0].curve == plain.branches[0].curve   # no change
    *running, last = points
    # one point per curve point: trunk steps 2, 4, 6 (fork 6), branch a 8, trunk 8 (fork 9), branch b 10, 12
    assert [(p["phase"], p["step"]) for p in running] == [
        ("trunk", 2), ("trunk", 4), ("trunk", 6), (f"branch {a}", 8), ("trunk", 8), (f"branch {b}", 10),
        (f"branch {b}", 12)]
    assert all(p["to_train"] == remaining_tokens(config, [a, b], SEQ, None) for p in points)
    assert [p["trained"] for p in running] == sorted(p["trained"] for p in running)
    assert all(p["loss"] > 0 and p["lr"] > 0 and p["tokens_per_s"] > 0 for p in running)
    assert last["finished"] and last["trained"] == last["to_train"] and last["elapsed_s"] > 0
    again = []
    train(tiny_model(), data, config, [a, b], tmp_path / "watched", seed=0, progress=again.append)
    assert [p["trained"] for p in again] == [0] and again[0]["to_train"] == 0     # nothing left to train
