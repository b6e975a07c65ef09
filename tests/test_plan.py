"""The plan: cells, shared stages, and ids that are what each stage computes: stable under formatting and
execution settings, precise under edits."""

import copy
import json

import pytest

from gridlab.contracts import canonical, content_id
from gridlab.plan import build_plan, parent_config
from gridlab.pruning import pruned_config
from gridlab.spec import load_grid, parse_grid

from runner_helpers import tiny_grid, write_grid

SIX = [{"name": n} for n in ("shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt")]


def _plan(**changes):
    return build_plan(parse_grid(tiny_grid(**changes)))


def _downstream(plan, changed: set[str]) -> set[str]:
    """The stages whose inputs include a changed stage's output. A structured init stands in its id for the parent's
    architecture (in its config), and a branch eval for its trajectory (model and data) and budget, not for the
    stage ids they wait for."""
    closure = set(changed)
    for stage in plan.stages.values():  # dependency order
        carried = {dep for role, dep in stage.deps.items() if role not in stage.dep_identities}
        if "train" in stage.dep_identities:
            carried |= set(plan.stages[stage.deps["train"]].deps.values())
        if carried & closure:
            closure.add(stage.id)
    return closure


def test_cells_are_the_full_product_and_stages_are_shared():
    plan = _plan(methods=SIX, ratios=[0.5, 0.75], budgets=[2048, 4096], seeds=[0, 1])
    # method × ratio × init × (budgets + the budget-0 reference) × setting × seed
    assert len(plan.cells) == 6 * 2 * 2 * 3 * 2 * 2
    assert plan.counts["data"] == 1 and plan.counts["parent"] == 1
    assert plan.counts["prune"] == 6 * 2 * 2                      # one per method × ratio × seed, for all budgets
    # structured methods share one random model per distinct architecture and seed; sparse ones get one per mask
    parent = parent_config(plan.spec)
    architectures = {json.dumps(pruned_config(parent, m["name"], r).to_dict(), sort_keys=True)
                     for m in SIX[:4] for r in (0.5, 0.75)}
    assert len(architectures) < 8                                   # the two depth methods coincide
    assert plan.counts["init"] == (len(architectures) + 2 * 2) * 2
    assert plan.counts["train"] == plan.counts["prune"] + plan.counts["init"]
    # one eval per model before training, one per budget branch, and the parent's
    branches = sum(len(s.config.budgets) for s in plan.stages.values() if s.kind == "train")
    assert plan.counts["eval"] == plan.counts["train"] + branches + 1


def test_pruned_settings_share_a_run_and_random_budgets_are_branches_of_one_trajectory():
    plan = _plan(budgets=[2048, 4096])
    parent_tokens = 4096
    pruned = [c for c in plan.cells if c.init == "pruned"]
    assert {c.setting for c in pruned} == {1, 2}
    assert {c.train_stage for c in pruned} - {None} == {pruned[-1].train_stage}
    assert {c.trained_tokens for c in pruned} == {0, 2048, 4096}
    random = [c for c in plan.cells if c.init == "random"]
    assert {c.train_stage for c in random} - {None} == {random[-1].train_stage}
    train = plan.stages[random[-1].train_stage]
    # setting 2's budget-0 reference is the random trajectory after exactly P tokens (here P = 4096, a budget too)
    assert train.config.budgets == [2048, 4096, parent_tokens + 2048, parent_tokens + 4096]
    assert {(c.setting, c.trained_tokens) for c in random} == {
        (1, 0), (1, 2048), (1, 4096), (2, parent_tokens), (2, parent_tokens + 2048), (2, parent_tokens + 4096)}
    untrained = [c for c in plan.cells if c.trained_tokens == 0]
    assert all(c.train_stage is None and c.eval_stage == c.start_eval_stage for c in untrained)


def test_depth_methods_share_the_random_model_and_its_training():
    plan = _plan(methods=[{"name": "shortgpt"}, {"name": "minitron-depth"}, {"name": "wanda"}])
    random_train = {c.method: c.train_stage for c in plan.cells if c.init == "random" and c.train_stage}
    assert random_train["shortgpt"] == random_train["minitron-depth"] != random_train["wanda"]


def test_exclude_rules_and_nm_ratio():
    plan = _plan(methods=[{"name": "wanda-2:4"}, {"name": "magnitude"}], ratios=[0.5, 0.6],
                 exclude=[{"method": "magnitude", "ratio": 0.6}, {"init": "random", "setting": 2}])
    assert {(c.method, c.ratio) for c in plan.cells} == {("wanda-2:4", 0.5), ("magnitude", 0.5)}
    assert not any(c.init == "random" and c.setting == 2 for c in plan.cells)
    # magnitude@0.6: all its 2 inits × 2 budgets × 2 settings; random setting 2 of the other two: 2 budgets each
    assert plan.excluded == 2 * 2 * 2 + 2 * 2
    nm_prune = next(s for s in plan.stages.values() if s.kind == "prune" and s.config.method == "wanda")
    assert nm_prune.config.options == {"nm": "2:4"}


def _ids(plan):
    return set(plan.stages), {c.cell_id for c in plan.cells}


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
    by_kind = lambda plan, kind: {i for i, s in plan.stages.items() if s.kind == kind}

    # a pruning option of one method: its prune stages and everything downstream of them; nothing else
    methods = copy.deepcopy(SIX)
    methods[4]["options"] = {"nsamples": 4}
    after = _plan(**{**base, "methods": methods})
    removed, added = _changed(before, after)
    wanda_prunes = {i for i in by_kind(before, "prune") if before.stages[i].config.method == "wanda"}
    assert removed == _downstream(before, wanda_prunes) and len(added) == len(removed)

    # the retraining schedule: train stages and the evals of their branches; the parent keeps its own schedule,
    # and the evaluations before training stay
    after = _plan(**{**base, "schedule": {**tiny_grid()["schedule"], "lr": 1e-3}})
    removed, _ = _changed(before, after)
    branch_evals = {i for i in by_kind(before, "eval") if before.stages[i].config.source == "branch"}
    assert removed == by_kind(before, "train") | branch_evals

    # calibration size: every prune stage and what follows; the shared structured random models stay
    after = _plan(**{**base, "calibration": {"sequences": 3}})
    removed, _ = _changed(before, after)
    assert removed == _downstream(before, by_kind(before, "prune"))
    structured_inits = {i for i in by_kind(before, "init") if before.stages[i].config.source == "architecture"}
    assert structured_inits and not structured_inits & removed

    # the parent's token count: the parent and everything downstream except the structured random inits
    after = _plan(**{**base, "parent": {**tiny_grid()["parent"], "tokens": 8192}})
    removed, _ = _changed(before, after)
    parent = by_kind(before, "parent")
    # (setting 2 trains random models P + B tokens: their trajectories stay, their train stages and the evals of
    # the setting-2 branches change; a branch of the same trajectory and budget keeps its eval)
    still_trained = {c.trained_tokens for c in after.cells if c.init == "random"}
    random_setting_2 = {c.eval_stage for c in before.cells
                        if c.init == "random" and c.setting == 2 and c.trained_tokens not in still_trained}
    assert removed == _downstream(before, parent) | {
        c.train_stage for c in before.cells if c.init == "random" and c.train_stage} | random_setting_2


def test_canonical_normalises_numbers():
    assert canonical({"b": 1.0, "a": [0.1 + 0.2, 3]}) == {"b": 1, "a": [0.3, 3]}
    assert content_id(canonical({"x": 1, "y": 2.0})) == content_id(canonical({"y": 2, "x": 1.0}))
    assert content_id({"x": 1}) != content_id({"x": 2})


def test_time_estimate_charges_sparse_models_the_parents_cost_and_smaller_models_less():
    from gridlab.estimates import relative_step_cost
    from gridlab.model import make_config, param_counts

    counts = param_counts(make_config("pico", 1024, 64))
    assert relative_step_cost(counts, "sparse", 0.8) == 1.0
    half_depth = relative_step_cost(counts, "depth", 0.5)
    assert half_depth == pytest.approx((counts.embedding + 0.5 * counts.decoder) / (counts.embedding + counts.decoder))
    assert relative_step_cost(counts, "width", 0.8) < half_depth < 1.0


EXECUTION_ONLY = [
    ("schedule", "strategy", "ddp"), ("schedule", "activation_checkpointing", True),
    ("schedule", "log_every_steps", 7), ("schedule", "checkpoint_every_tokens", 4096),
    ("parent.schedule", "strategy", "ddp"), ("parent.schedule", "activation_checkpointing", True),
    ("parent.schedule", "log_every_steps", 3), ("parent.schedule", "checkpoint_every_tokens", 2048),
    ("calibration", "layerwise", True), ("local", "workers", 1),
    ("resources", "train", {"cpus": 2, "mem_gb": 3, "time_min": 99, "array_parallelism": 4}),
]


@pytest.mark.parametrize("table, key, value", EXECUTION_ONLY, ids=[f"{t}.{k}" for t, k, _ in EXECUTION_ONLY])
def test_settings_that_only_change_how_a_stage_runs_change_no_id(table, key, value):
    grid = tiny_grid(methods=SIX, budgets=[2048, 4096])
    before = build_plan(parse_grid(grid))
    edited = copy.deepcopy(grid)
    target = edited
    for part in table.split("."):
        target = target.setdefault(part, {})
    target[key] = value
    assert _ids(build_plan(parse_grid(edited))) == _ids(before)


def test_data_tasks_split_the_data_stage_without_changing_its_id_or_any_downstream_id():
    one = _plan(methods=SIX, budgets=[2048, 4096])
    assert "tokenizer" not in one.counts and "shard" not in one.counts       # K = 1: today's single data stage
    assert _ids(_plan(methods=SIX, budgets=[2048, 4096], resources={"data": {"tasks": 1}})) == _ids(one)
    three = _plan(methods=SIX, budgets=[2048, 4096], resources={"default": {"cpus": 1}, "data": {"tasks": 3}})
    kinds = [stage.kind for stage in three.stages.values()]
    assert kinds[:5] == ["tokenizer", "shard", "shard", "shard", "data"]   # in dependency order
    assert three.counts["tokenizer"] == 1 and three.counts["shard"] == 3 and three.counts["data"] == 1
    assert len(three.stages) == len(one.stages) + 4
    # the data stage and everything downstream keep their ids, configs and inputs; the cells are the same
    added = set(three.stages) - set(one.stages)
    assert set(one.stages) <= set(three.stages) and {three.stages[i].kind for i in added} == {"tokenizer", "shard"}
    assert [c.model_dump() for c in three.cells] == [c.model_dump() for c in one.cells]
    for stage_id, stage in one.stages.items():
        if stage.kind != "data":
            assert three.stages[stage_id] == stage
    data = three.stages[next(i for i, s in one.stages.items() if s.kind == "data")]
    assert data.config == one.stages[data.id].config
    tokenizer, *shards = (three.stages[i] for i in sorted(added, key=lambda i: three.stages[i].kind != "tokenizer"))
    shards.sort(key=lambda s: s.config.partition)
    assert [(s.config.partition, s.config.partitions) for s in shards] == [(0, 3), (1, 3), (2, 3)]
    assert all(s.deps == {"tokenizer": tokenizer.id} for s in shards) and tokenizer.deps == {}
    for task in (tokenizer, *shards):
        assert task.config.data_stage == data.id
        assert {key: getattr(task.config, key) for key in ("corpus", "splits", "tokenizer", "seq_len")} == \
            {key: getattr(data.config, key) for key in ("corpus", "splits", "tokenizer", "seq_len")}
    # the data stage waits for its tasks (SLURM dependencies, local order) but does not compute from them
    assert data.deps == {"tokenizer": tokenizer.id, **{f"shard{k}": s.id for k, s in enumerate(shards)}}
    assert data.dep_identities == dict.fromkeys(data.deps)
    # another K: other shard stages, the same data stage
    two = _plan(methods=SIX, budgets=[2048, 4096], resources={"data": {"tasks": 2}})
    assert data.id in two.stages and tokenizer.id in two.stages
    assert not {i for i, s in two.stages.items() if s.kind == "shard"} & set(three.stages)


def test_an_evaluation_setting_changes_only_eval_ids():
    before = _plan(methods=SIX, budgets=[2048, 4096])
    after = _plan(methods=SIX, budgets=[2048, 4096], evaluation={"max_sequences": 9})
    removed, added = _changed(before, after)
    assert removed == {i for i, s in before.stages.items() if s.kind == "eval"} and len(added) == len(removed)


def test_a_bumped_method_version_reruns_exactly_its_stages(monkeypatch):
    import dataclasses

    from gridlab.pruning import METHODS

    before = _plan(methods=SIX, budgets=[2048, 4096])
    monkeypatch.setitem(METHODS, "wanda", dataclasses.replace(METHODS["wanda"], version=METHODS["wanda"].version + 1))
    after = _plan(methods=SIX, budgets=[2048, 4096])
    removed, added = _changed(before, after)
    wanda = {i for i, s in before.stages.items() if s.kind == "prune" and s.config.method == "wanda"}
    assert wanda and removed == _downstream(before, wanda) and len(added) == len(removed)


def test_a_bumped_stage_kind_version_reruns_that_kind_and_what_depends_on_it(monkeypatch):
    from gridlab import contracts

    before = _plan(methods=SIX, budgets=[2048, 4096])
    monkeypatch.setitem(contracts.VERSION, "prune", contracts.VERSION["prune"] + 1)
    after = _plan(methods=SIX, budgets=[2048, 4096])
    removed, _ = _changed(before, after)
    assert removed == _downstream(before, {i for i, s in before.stages.items() if s.kind == "prune"})


def test_one_more_budget_keeps_every_existing_branch_eval_and_the_trajectories():
    before = _plan(methods=SIX, budgets=[2048, 4096])
    after = _plan(methods=SIX, budgets=[2048, 4096, 8192])
    removed, added = _changed(before, after)
    # the train stages are new (they reach one more budget) but extend the same trajectories; no eval is redone
    assert {before.stages[i].kind for i in removed} == {"train"}
    trajectories = lambda plan: {s.config.trajectory for s in plan.stages.values() if s.kind == "train"}
    assert trajectories(before) == trajectories(after)
    assert {after.stages[i].kind for i in added} == {"train", "eval"}
    assert all(after.stages[i].config.budget in (8192, 4096 + 8192) for i in added if after.stages[i].kind == "eval")


def test_disk_figures_follow_the_models_and_training_states():
    from gridlab.checkpoint import checkpoint_bytes
    from gridlab.estimates import MODEL_BYTES_PER_PARAMETER, disk_usage
    from gridlab.model import param_counts

    plan = _plan(budgets=[2048, 4096])
    usage = disk_usage(plan)
    dense = param_counts(plan.parent_config).total
    # the pretrained parent: its model and (extendable) its trunk's last state; at peak a branch state besides
    assert usage["parent"].end == MODEL_BYTES_PER_PARAMETER * dense + checkpoint_bytes(dense)
    assert usage["parent"].peak == MODEL_BYTES_PER_PARAMETER * dense + 2 * checkpoint_bytes(dense)
    assert usage["train"].peak > usage["train"].end > usage["prune"].end > 0
    nothing_kept = _plan(budgets=[2048, 4096], schedule={**tiny_grid()["schedule"], "keep_checkpoints": "none"})
    assert disk_usage(nothing_kept)["train"].end < usage["train"].end


def _jsonl_corpus(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def test_an_edited_corpus_file_changes_the_data_id_and_everything_downstream(tmp_path):
    corpus = _jsonl_corpus(tmp_path / "corpus", [f"document {i} " * 20 for i in range(50)])
    grid = tiny_grid(methods=SIX[:1] + SIX[4:5], corpus={"kind": "files", "files": [str(corpus)]})
    before = build_plan(parse_grid(grid))
    assert _ids(build_plan(parse_grid(grid))) == _ids(before)           # nothing changed: same ids
    moved = _jsonl_corpus(tmp_path / "elsewhere", [f"document {i} " * 20 for i in range(50)])
    grid_moved = {**grid, "corpus": {"kind": "files", "files": [str(moved)]}}
    assert _ids(build_plan(parse_grid(grid_moved))) == _ids(before)     # same content at another path: same ids
    _jsonl_corpus(tmp_path / "corpus", [f"document {i} " * 20 for i in range(49)] + ["an edited document"])
    after = build_plan(parse_grid(grid))
    removed, added = _changed(before, after)
    data = {i for i, s in before.stages.items() if s.kind == "data"}
    # every stage reads the data stage's shards or sits below one that does
    assert removed == _downstream(before, data) and len(added) == len(removed)
    assert before.inputs["corpus"] != after.inputs["corpus"]


def test_an_edited_corpus_is_reported_stale_by_submit_and_status(tmp_path):
    from typer.testing import CliRunner

    from gridlab.cli import app
    from gridlab.layout import RunPaths

    from runner_helpers import finish_stage, write_grid

    corpus = _jsonl_corpus(tmp_path / "corpus", [f"document {i} " * 20 for i in range(50)])
    grid_file = write_grid(tmp_path, tiny_grid(corpus={"kind": "files", "files": [str(corpus)]}))
    plan = build_plan(load_grid(grid_file))
    from gridlab import execute

    execute.prepare(plan, plan.spec.run_dir)
    for stage in plan.stages.values():
        finish_stage(plan.spec.run_dir, stage)
    status = CliRunner().invoke(app, ["status", str(grid_file)])
    assert status.exit_code == 0 and "stale" not in status.output
    _jsonl_corpus(tmp_path / "corpus", [f"document {i} " * 20 for i in range(49)] + ["an edited document"])
    status = CliRunner().invoke(app, ["status", str(grid_file)])
    assert "warning: the corpus changed since the last submit" in status.output, status.output
    # every stage reads the data stage's output (random inits save its tokenizer beside their weights)
    assert f"{len(plan.stages)} finished stage(s)" in status.output
    dry = CliRunner().invoke(app, ["submit", str(grid_file), "--dry-run"])
    assert "warning: the corpus changed since the last submit" in dry.output, dry.output
    assert RunPaths(plan.spec.run_dir).plan.exists()
