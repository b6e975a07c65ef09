"""Fake execution for the adaptive loop's tests: every stage returns runner_helpers.fake_payload except the
evaluations, whose held-out loss comes from a function of the cell (init, method, ratio, seed, trained tokens), so a
test plants the gaps the study must find. The debug executor runs the stages in-process through
gridlab.stages.run_stage, which this replaces."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

from runner_helpers import fake_payload

Loss = Callable[[str, str, float, int, int], float]


def noise(*key) -> float:
    """A standard normal fixed by `key`."""
    import numpy as np

    return float(np.random.default_rng(zlib.crc32(repr(key).encode())).standard_normal())


def planted(gaps: Callable[[str, float, int], float], sd: float = 0.01) -> Loss:
    """Held-out losses with a planted gap pruned − random: gaps(method, ratio, budget) at the budget of a setting-1
    comparison (a random model trained P + B is the random curve at P + B); a seed effect shared by every cell of
    the seed and a cell effect, both of spread `sd`."""

    def loss(init: str, method: str, ratio: float, seed: int, tokens: int) -> float:
        random = 4.0 - 0.2 * math.log2(tokens / 1000) + sd * noise("seed", seed) + sd * noise(init, method, ratio,
                                                                                              seed, tokens)
        return random + gaps(method, ratio, tokens) if init == "pruned" else random

    return loss


def payload_with(loss: Loss):
    """run_stage(stage, run_dir) → a fake payload (runner_helpers.fake_payload), and for a branch's evaluation its
    held-out loss from `loss` of the cell it scores (read from the upstream stages' stage.json)."""
    from gridlab.contracts import EvalPayload, Metric, Stage
    from gridlab.layout import RunPaths

    def upstream(run_dir, stage_id: str) -> Stage:
        return Stage.model_validate_json(RunPaths(run_dir).stage(stage_id).stage.read_bytes())

    def run_stage(stage, run_dir):
        if stage.kind != "eval" or stage.config.source != "branch":
            return fake_payload(stage)
        train = upstream(run_dir, stage.deps["train"])
        model = upstream(run_dir, train.deps["model"])
        if model.kind == "prune":
            init, method, ratio = "pruned", model.config.method, model.config.ratio
        else:  # a random twin: its loss does not depend on the method or ratio it mirrors
            init, method, ratio = "random", "", 0.0
        value = loss(init, method, ratio, train.config.seed, stage.config.budget)
        return EvalPayload(model_path="m", tokens=stage.config.budget, metrics=[
            Metric(name="val_loss", value=value, tokens=stage.config.budget, higher_is_better=False)])

    return run_stage


def fake_execution(monkeypatch, loss: Loss, ran: list | None = None) -> None:
    """Replace gridlab.stages.run_stage (what the debug executor runs in-process) with payload_with(loss); `ran`
    (when given) receives every stage run, in order."""
    from gridlab import stages

    compute = payload_with(loss)

    def run_stage(stage, run_dir):
        if ran is not None:
            ran.append(stage)
        return compute(stage, run_dir)

    monkeypatch.setattr(stages, "run_stage", run_stage)


def upstream_loss_writer(loss: Loss):
    """finish(run_dir, plan): leave every stage of the plan that is not done finished, as SLURM jobs would, with
    payload_with(loss)'s payloads (stage.json must be there: a submit wrote it)."""
    from gridlab.layout import RunPaths
    from gridlab.results import write_result

    compute = payload_with(loss)

    def finish(run_dir, plan) -> None:
        run = RunPaths(run_dir)
        for stage in plan.stages.values():
            files = run.stage(stage.id)
            if not files.result.exists():
                write_result(files, stage, compute(stage, run_dir))

    return finish
