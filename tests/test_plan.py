"""The plan: cells, shared stages, and content-addressed ids that are stable under formatting and precise under edits."""

import copy
import json

import pytest

from gridlab.plan import build_plan, canonical, content_id, parent_config
from gridlab.pruning import pruned_config
from gridlab.spec import load_grid, parse_grid
from runner_helpers import tiny_grid, write_grid

SIX = [{"name": n} for n in ("shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt")]


def _plan(**changes):
    return build_plan(parse_grid(tiny_grid(**changes)))


def _downstream(plan, changed: set[str]) -> set[str]:
    closure = set(changed)
    for stage in plan.stages.values():  # dependency order
        if set(stage["deps"].values()) & closure:
            closure.add(stage["id"])
    return closure


def test_cells_are_the_full_product_and_stages_are_shared():
    plan = _plan(methods=SIX, ratios=[0.5, 0.75], budgets=[2048, 4096], seeds=[0, 1])
    assert len(plan.cells) == 6 * 2 * 2 * 2 * 2 * 2
    assert plan.counts["data"] == 1 and plan.counts["parent"] == 1
    assert plan.counts["prune"] == 6 * 2 * 2                      # one per method × ratio × seed, for all budgets
    # structured methods share one random model per distinct architecture and seed; sparse ones get one per mask
    parent = parent_config(plan.spec)
    architectures = {json.dumps(pruned_config(parent, m["name"], r).to_dict(), sort_keys=True)
                     for m in SIX[:4] for r in (0.5, 0.75)}
    assert len(architectures) < 8                                   # the two depth methods coincide
    assert plan.counts["init"] == (len(architectures) + 2 * 2) * 2
    assert plan.counts["train"] == plan.counts["prune"] + plan.counts["init"]
    assert plan.counts["eval"] == plan.counts["train"]


def test_pruned_settings_share_a_run_and_random_budgets_are_branches_of_one_trajectory():
    plan = _plan(budgets=[2048, 4096])
    parent_tokens = 4096
    pruned = [c for c in plan.cells if c["init"] == "pruned"]
    assert {c["setting"] for c in pruned} == {1, 2}
    assert len({c["train_stage"] for c in pruned}) == 1
    assert {c["trained_tokens"] for c in pruned} == {2048, 4096}
    random = [c for c in plan.cells if c["init"] == "random"]
    assert len({c["train_stage"] for c in random}) == 1
    train = plan.stages[random[0]["train_stage"]]
    assert train["config"]["budgets"] == [2048, 4096, parent_tokens + 2048, parent_tokens + 4096]
    assert {(c["setting"], c["trained_tokens"]) for c in random} == {
        (1, 2048), (1, 4096), (2, parent_tokens + 2048), (2, parent_tokens + 4096)}


def test_depth_methods_share_the_random_model_and_its_training():
    plan = _plan(methods=[{"name": "shortgpt"}, {"name": "minitron-depth"}, {"name": "wanda"}])
    random_train = {c["method"]: c["train_stage"] for c in plan.cells if c["init"] == "random"}
    assert random_train["shortgpt"] == random_train["minitron-depth"] != random_train["wanda"]


def test_exclude_rules_and_nm_ratio():
    plan = _plan(methods=[{"name": "wanda-2:4"}, {"name": "magnitude"}], ratios=[0.5, 0.6],
                 exclude=[{"method": "magnitude", "ratio": 0.6}, {"init": "random", "setting": 2}])
    assert {(c["method"], c["ratio"]) for c in plan.cells} == {("wanda-2:4", 0.5), ("magnitude", 0.5)}
    assert not any(c["init"] == "random" and c["setting"] == 2 for c in plan.cells)
    assert plan.excluded == 1 * 2 * 2 + 2 * 1   # magnitude@0.6: all 4 cells; random setting 2 of the other two
    nm_prune = next(s for s in plan.stages.values() if s["kind"] == "prune" and s["config"]["method"] == "wanda")
    assert nm_prune["config"]["options"] == {"nm": "2:4"}


def _ids(plan):
    return set(plan.stages), {c["cell_id"] for c in plan.cells}


def test_reordering_keys_and_reformatting_numbers_changes_no_id(tmp_path):
    grid = tiny_grid(methods=SIX[:2] + SIX[4:5], budgets=[2048, 4096])
    reordered = dict(reversed(list(grid.items())))
    reordered["schedule"] = dict(reversed(list(grid["schedule"].items())))
    reordered["budgets"] = ["4k", "2.048e3"][::-1]
    reordered["budgets"] = ["2.048k", "4096"]
    reordered["ratios"] = [5e-1]
    reordered["schedule"]["lr"] = 0.0030
    grid["schedule"]["lr"] = 3e-3
    first = load_grid(write_grid(tmp_path, grid, "a.toml"))
    second = load_grid(write_grid(tmp_path, reordered, "b.toml"))
    assert _ids(build_plan(first)) == _ids(build_plan(second))


def _changed(before, after):
    old, new = set(before.stages), set(after.stages)
    return old - new, new - old


def test_changing_a_value_changes_exactly_the_downstream_ids():
    base = dict(methods=SIX, budgets=[2048, 4096])
    before = _plan(**base)
    by_kind = lambda plan, kind: {i for i, s in plan.stages.items() if s["kind"] == kind}

    # a pruning option of one method: its prune stages and everything downstream of them; nothing else
    methods = copy.deepcopy(SIX)
    methods[4]["options"] = {"nsamples": 4}
    after = _plan(**{**base, "methods": methods})
    removed, added = _changed(before, after)
    wanda_prunes = {i for i in by_kind(before, "prune") if before.stages[i]["config"]["method"] == "wanda"}
    assert removed == _downstream(before, wanda_prunes) and len(added) == len(removed)

    # the retraining schedule: train and eval stages only; the parent keeps its own schedule
    after = _plan(**{**base, "schedule": {**tiny_grid()["schedule"], "lr": 1e-3}})
    removed, _ = _changed(before, after)
    assert removed == by_kind(before, "train") | by_kind(before, "eval")

    # calibration size: every prune stage and what follows; the shared structured random models stay
    after = _plan(**{**base, "calibration": {"sequences": 3}})
    removed, _ = _changed(before, after)
    assert removed == _downstream(before, by_kind(before, "prune"))
    structured_inits = {i for i in by_kind(before, "init") if "architecture" in before.stages[i]["config"]}
    assert structured_inits and not structured_inits & removed

    # the parent's token count: the parent and everything downstream except the structured random inits
    after = _plan(**{**base, "parent": {**tiny_grid()["parent"], "tokens": 8192}})
    removed, _ = _changed(before, after)
    parent = by_kind(before, "parent")
    assert removed == _downstream(before, parent) | {
        c["train_stage"] for c in before.cells if c["init"] == "random"} | {
        c["eval_stage"] for c in before.cells if c["init"] == "random"}


def test_canonical_normalises_numbers():
    assert canonical({"b": 1.0, "a": [0.1 + 0.2, 3]}) == {"b": 1, "a": [0.3, 3]}
    assert content_id(canonical({"x": 1, "y": 2.0})) == content_id(canonical({"y": 2, "x": 1.0}))
    assert content_id({"x": 1}) != content_id({"x": 2})


def test_time_estimate_charges_sparse_models_the_parents_cost_and_smaller_models_less():
    from gridlab.model import make_config, param_counts
    from gridlab.plan import relative_step_cost

    counts = param_counts(make_config("pico", 1024, 64))
    assert relative_step_cost(counts, "sparse", 0.8) == 1.0
    half_depth = relative_step_cost(counts, "depth", 0.5)
    assert half_depth == pytest.approx((counts.embedding + 0.5 * counts.decoder) / (counts.embedding + counts.decoder))
    assert relative_step_cost(counts, "width", 0.8) < half_depth < 1.0
    assert relative_step_cost(None, "depth", 0.5) == 1.0
