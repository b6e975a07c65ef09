"""Ids that survive a new field (a config field at its default is not in any id), the extra-cells hook of
build_plan, and a plan that reads the parent's config once."""

import pydantic
import pytest
import transformers

from gridlab.cells import CellKey
from gridlab.config import Schedule
from gridlab.contracts import make_stage, trajectory_id
from gridlab.errors import UserError
from gridlab.plan import build_plan
from gridlab.spec import parse_grid

from runner_helpers import tiny_grid

SPARSE_AND_DEPTH = [{"name": "shortgpt"}, {"name": "wanda"}]


def _plan(extra_cells=(), **changes):
    return build_plan(parse_grid(tiny_grid(**changes)), extra_cells)


def _with_a_new_field(model_class, value=None):
    """The same model class with one more field, ``new_knob``, defaulted to 1.5 (or set to ``value``)."""
    extended = pydantic.create_model(model_class.__name__, __base__=model_class, new_knob=(float, 1.5))
    return extended, ({} if value is None else {"new_knob": value})


def _rebuilt(config, value=None):
    """``config`` as its class with a defaulted new field would hold it, its schedule too (a new Schedule field)."""
    extended, knob = _with_a_new_field(type(config), value)
    fields = {name: getattr(config, name) for name in type(config).model_fields}
    if "schedule" in fields:
        schedule_class, schedule_knob = _with_a_new_field(Schedule, value)
        fields["schedule"] = schedule_class(**fields["schedule"].model_dump(), **schedule_knob)
    return extended(**fields, **knob)


LM_EVAL = {"max_sequences": 8, "lm_eval_tasks": ["gridlab_stdlib_identifiers"]}


@pytest.mark.parametrize("changes", [{}, {"resources": {"data": {"tasks": 2}}}, {"methods": SPARSE_AND_DEPTH},
                                     {"evaluation": LM_EVAL}])
def test_a_new_field_at_its_default_changes_no_id(changes):
    plan = _plan(**changes)
    kinds = set()
    for stage in plan.stages.values():
        rebuilt = make_stage(_rebuilt(stage.config), stage.deps, stage.dep_identities or None)
        assert rebuilt.id == stage.id, stage.kind
        changed = make_stage(_rebuilt(stage.config, value=2.5), stage.deps, stage.dep_identities or None)
        assert changed.id != stage.id, stage.kind          # the rule leaves out defaults, not the field
        kinds.add(stage.kind)
        if stage.kind == "train":
            schedule_class, _ = _with_a_new_field(Schedule)
            schedule = schedule_class(**stage.config.schedule.model_dump())
            assert trajectory_id(stage.deps["model"], stage.deps["data"], schedule, stage.config.seed) == \
                stage.config.trajectory
    assert {"data", "parent", "prune", "init", "train", "eval"} <= kinds


def test_execution_fields_and_defaults_stay_out_of_the_schedule_identity():
    assert Schedule().identity() == {}
    assert Schedule(lr=1e-3, device="cpu", keep_checkpoints="all").identity() == {"lr": 1e-3}
    # a value given explicitly at its default is the default
    assert Schedule(lr=3e-3).identity() == Schedule().identity()


# ------------------------------------------------------------------------------------------------ extra cells

def test_extra_cells_add_seeds_and_budgets_and_change_no_existing_id():
    base = _plan(methods=SPARSE_AND_DEPTH, budgets=[2048])
    extra = [CellKey("wanda", 0.5, 4096, 0), CellKey("shortgpt", 0.5, 2048, 7)]
    grown = _plan(extra, methods=SPARSE_AND_DEPTH, budgets=[2048])
    # every stage stays, but the train stages a new budget extends: the grown one trains the same trajectory
    trajectories = {s.config.trajectory for s in grown.stages.values() if s.kind == "train"}
    for missing in set(base.stages) - set(grown.stages):
        assert base.stages[missing].kind == "train" and base.stages[missing].config.trajectory in trajectories
    old_cells = {c.cell_id: c for c in base.cells}
    new_cells = {c.cell_id: c for c in grown.cells}
    assert old_cells.keys() <= new_cells.keys()
    added = [new_cells[c] for c in new_cells.keys() - old_cells.keys()]
    # wanda at 4096: 2 inits × 2 settings; shortgpt seed 7: budgets 0 and 2048 × 2 inits × 2 settings
    assert sorted((c.method, c.budget_tokens, c.seed) for c in added) == sorted(
        [("wanda", 4096, 0)] * 4 + [("shortgpt", 0, 7)] * 4 + [("shortgpt", 2048, 7)] * 4)
    # a budget more for wanda extends its trajectories; the evaluation of every existing branch keeps its id
    wanda_prune = {c.prune_stage for c in base.cells if c.method == "wanda"}
    assert wanda_prune == {c.prune_stage for c in grown.cells if c.method == "wanda"}
    for cell in base.cells:
        assert new_cells[cell.cell_id].eval_stage == cell.eval_stage
    # a cell the grid has already changes nothing
    same = _plan([CellKey("wanda", 0.5, 2048, 0)], methods=SPARSE_AND_DEPTH, budgets=[2048])
    assert set(same.stages) == set(base.stages) and [c.cell_id for c in same.cells] == [c.cell_id for c in base.cells]


def test_extra_cells_obey_exclude_rules():
    grown = _plan([CellKey("shortgpt", 0.5, 2048, 3)], exclude=[{"seed": 3, "init": "random"}])
    assert {c.init for c in grown.cells if c.seed == 3} == {"pruned"}


@pytest.mark.parametrize("key, words", [
    (CellKey("nope", 0.5, 2048, 0), ["no method is labelled 'nope'", "shortgpt"]),
    (CellKey("shortgpt", 1.5, 2048, 0), ["ratio"]),
    (CellKey("shortgpt", 0.5, 64, 0), ["one batch"]),
    (CellKey("shortgpt", 0.5, 2048, -1), ["seed"]),
])
def test_a_bad_extra_cell_is_one_line(key, words):
    with pytest.raises(UserError) as error:
        _plan([key])
    for word in words:
        assert word in str(error.value)


# ------------------------------------------------------------------------------------------------ the parent once

def test_a_plan_reads_a_loaded_parents_config_once(tmp_path, monkeypatch):
    from gridlab.estimates import disk_per_stage, disk_usage, step_costs, training_flops
    from gridlab.model import init_model, make_config, save_model
    from gridlab.plantext import format_plan

    config = make_config("micro", 512, 32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    folder = save_model(init_model(config, seed=0), tmp_path / "parent")
    tokenizer = tmp_path / "tokenizer"
    from gridlab.data import CorpusSource, SplitFractions, train_tokenizer

    train_tokenizer(CorpusSource(max_documents=20), SplitFractions(), 512, tokenizer)
    reads = []
    real = transformers.AutoConfig.from_pretrained.__func__

    def counting(cls, name, *args, **kwargs):
        reads.append(str(name))
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", classmethod(counting))
    grid = tiny_grid(parent={"path": str(folder), "tokens": 4096}, tokenizer={"path": str(tokenizer)},
                     resources={"default": {"cpus": 1, "mem_gb": 1, "time_min": 10},
                                "train": {"gpus_per_node": 1}})
    plan = build_plan(parse_grid(grid))
    step_costs(plan), disk_usage(plan), disk_per_stage(plan), training_flops(plan)
    format_plan(plan)
    assert [name for name in reads if name == str(folder)] == [str(folder)]
