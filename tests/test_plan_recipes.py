"""Per-arm recipes, learning-rate sweeps and the embeddings control in the plan: what they train, what they share,
and the ids they leave alone."""

import pytest

from gridlab.contracts import EmbeddingsInit, EvalBranch, EvalModel, MaskInit, TrainConfig
from gridlab.plan import build_plan
from gridlab.spec import parse_grid

from runner_helpers import tiny_grid

SCHEDULE = tiny_grid()["schedule"]
FOUR_METHODS = [{"name": "shortgpt"}, {"name": "minitron-depth"}, {"name": "minitron-width"}, {"name": "wanda"}]


def _plan(**changes):
    return build_plan(parse_grid(tiny_grid(**changes)))


def _ids(plan):
    return set(plan.stages), {c.cell_id for c in plan.cells}


def _trains(plan, init):
    models = {c.model_stage for c in plan.cells if c.init == init}
    return [s for s in plan.stages.values() if s.kind == "train" and s.deps["model"] in models]


def test_an_override_equal_to_the_base_changes_no_id():
    """Ids come from each arm's resolved schedule with defaults left out: an arm table that repeats [schedule], an
    lr written as a one-element list, or the default lr written out, change no stage or cell id."""
    base = _plan(methods=FOUR_METHODS)
    same = _plan(methods=FOUR_METHODS, schedule={
        **SCHEDULE, "lr": [3e-3],
        "pruned": {"lr": 3e-3, "warmup_tokens": SCHEDULE["warmup_tokens"], "batch_size": SCHEDULE["batch_size"]},
        "random": {"lr": [0.003], "decay_fraction": 0.2}})
    assert _ids(same) == _ids(base)
    assert not same.spec.sweeps and all(c.lr == 3e-3 for c in same.cells)


def test_an_arm_table_changes_only_its_arms_trajectories():
    base = _plan(methods=FOUR_METHODS)
    tuned = _plan(methods=FOUR_METHODS, schedule={**SCHEDULE, "random": {"lr": 1e-2, "warmup_tokens": 512}})
    assert {s.id for s in _trains(tuned, "pruned")} == {s.id for s in _trains(base, "pruned")}
    random = _trains(tuned, "random")
    assert random and not {s.id for s in random} & {s.id for s in _trains(base, "random")}
    assert all(s.config.schedule.lr == 1e-2 and s.config.schedule.warmup_tokens == 512 for s in random)
    assert {c.lr for c in tuned.cells if c.init == "random"} == {1e-2}
    assert {c.lr for c in tuned.cells if c.init == "pruned"} == {3e-3}
    # no sweep: every evaluation measures the whole sample, as before
    assert not any(s.config.halves for s in tuned.stages.values() if s.kind == "eval")


def test_a_sweep_trains_every_lr_with_budgets_as_branches_and_evaluates_both_halves():
    """lr = [1e-3, 1e-2] for the random arm: one trajectory per model and lr, each taken to every budget it needs (B
    and, for setting 2, P + B: branches of one trunk); cells per lr with their own ids; every evaluation measures the
    selection half beside the report half (its id says so)."""
    budgets = [2048, 4096]
    plan = _plan(budgets=budgets, schedule={**SCHEDULE, "random": {"lr": [1e-3, 1e-2]}})
    assert plan.spec.sweeps
    random = _trains(plan, "random")
    assert sorted(s.config.schedule.lr for s in random) == [1e-3, 1e-2]
    p = plan.spec.parent.tokens
    for stage in random:
        assert stage.config.budgets == sorted({*budgets, *(p + b for b in budgets), p})
    assert len({s.config.trajectory for s in random}) == 2
    assert all(s.config.halves for s in plan.stages.values() if isinstance(s.config, EvalModel | EvalBranch))
    cells = [c for c in plan.cells if c.init == "random"]
    assert sorted({c.lr for c in cells}) == [1e-3, 1e-2]
    assert len(cells) == 2 * 2 * (1 + len(budgets))          # lrs × settings × (budget 0 + budgets)
    assert len({c.cell_id for c in plan.cells}) == len(plan.cells)
    # the reference cells of one random model share its evaluation at init, whatever the lr
    assert len({c.eval_stage for c in cells if c.budget_tokens == 0 and c.setting == 1}) == 1
    # an evaluation stage's id holds its halves: the same grid without a sweep evaluates the same models otherwise
    plain = _plan(budgets=budgets, schedule={**SCHEDULE, "random": {"lr": 1e-3}})
    assert not plain.spec.sweeps
    assert not {s.id for s in plain.stages.values() if s.kind == "eval"} & {
        s.id for s in plan.stages.values() if s.kind == "eval"}


def test_the_embeddings_control_is_the_random_twin_given_the_parents_embeddings():
    """One embeddings twin per random twin and donor: methods that share an architecture (shortgpt, minitron-depth)
    share it; a sparse one takes its mask twin; a width method that cuts the hidden size takes the pruned model's
    embeddings (the parent's at the kept channels). It trains B in either setting, like the pruned arm."""
    plan = _plan(methods=FOUR_METHODS, inits=["pruned", "random", "embeddings"])
    parent = plan.parent_stage.id
    by_method = {}
    for cell in plan.cells:
        by_method.setdefault((cell.method, cell.init), set()).add(cell.model_stage)
    controls = {m: plan.stages[next(iter(by_method[m, "embeddings"]))] for m in ("shortgpt", "minitron-depth",
                                                                                 "minitron-width", "wanda")}
    assert all(isinstance(s.config, EmbeddingsInit) and s.kind == "init" for s in controls.values())
    for method, stage in controls.items():
        assert stage.deps["model"] == next(iter(by_method[method, "random"]))
    assert controls["shortgpt"].id == controls["minitron-depth"].id
    assert controls["shortgpt"].deps["embeddings"] == parent and controls["wanda"].deps["embeddings"] == parent
    assert isinstance(plan.stages[controls["wanda"].deps["model"]].config, MaskInit)
    width = plan.stages[controls["minitron-width"].deps["embeddings"]]
    hidden = width.kind == "prune"
    assert (width.id == parent) is not hidden    # the donor is the pruned model exactly when the hidden size shrank
    assert all(c.trained_tokens == c.budget_tokens for c in plan.cells if c.init == "embeddings")
    # without the random arm the twin is still planned (the control's input) but has no cells or trajectories
    alone = _plan(methods=FOUR_METHODS, inits=["pruned", "embeddings"])
    assert {c.init for c in alone.cells} == {"pruned", "embeddings"}
    twins = {s.deps["model"] for s in alone.stages.values() if isinstance(s.config, EmbeddingsInit)}
    assert twins <= set(alone.stages)
    assert not any(isinstance(s.config, TrainConfig) and s.deps["model"] in twins for s in alone.stages.values())


@pytest.mark.parametrize("sparse", ["scaled", "dense"])
def test_the_sparse_draw_is_in_the_mask_twins_id(sparse):
    plan = _plan(methods=[{"name": "wanda"}], init={"sparse": sparse})
    twins = [s for s in plan.stages.values() if isinstance(s.config, MaskInit)]
    assert twins and all(s.config.sparse == sparse for s in twins)
    assert ("sparse" in twins[0].config.identity()) is (sparse == "dense")   # the default enters no id
