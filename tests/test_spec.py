"""grid.toml validation: every malformed grid is one clear line, exit code 2, nothing written."""

import copy

import pytest
from typer.testing import CliRunner

from gridlab.cli import app
from gridlab.plan import build_plan
from gridlab.plantext import format_plan
from gridlab.spec import load_grid, parse_tokens

from runner_helpers import REPO, tiny_grid, to_toml, write_grid


def _edit(grid: dict, path: tuple, value) -> dict:
    grid = copy.deepcopy(grid)
    target = grid
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    elif isinstance(value, _Rename):
        target[value.to] = target.pop(path[-1])
    else:
        target[path[-1]] = value
    return grid


_DELETE = object()


class _Rename:
    """Move the key to another (misspelt) name."""

    def __init__(self, to: str):
        self.to = to

# (case name, key path to change, new value, substrings the one-line error must contain)
MALFORMED = [
    ("typo at top level", ("ratio",), [0.5], ["ratio: unknown key", "did you mean 'ratios'"]),
    ("typo in a method", ("methods", 0, "optons"), {}, ["methods[0].optons: unknown key", "'options'"]),
    ("typo in a table", ("schedule", "warmup"), 10, ["schedule.warmup: unknown key", "'warmup_tokens'"]),
    ("unknown method", ("methods", 0, "name"), "shortgtp", ["methods[0]", "did you mean 'shortgpt'"]),
    ("unknown method option", ("methods", 0, "options"), {"colour": 1}, ["methods[0]", "colour"]),
    ("ratio out of range", ("ratios",), [0.5, 1.5], ["ratios[1]", "1.5"]),
    ("method ratio out of range", ("methods", 0, "ratios"), [0.0], ["methods[0].ratios[0]", "0.0"]),
    ("malformed budget", ("budgets",), ["2X"], ["budgets[0]", "'2X'", "40k"]),
    ("negative budget", ("budgets",), [-5], ["budgets[0]", "-5"]),
    ("bad init", ("inits",), ["pruned", "scratch"], ["inits[1]", "'scratch'"]),
    ("bad setting", ("settings",), [1, 3], ["settings[1]", "3"]),
    ("missing required key", ("budgets",), _DELETE, ["budgets: required key is missing"]),
    ("parent with neither preset nor path", ("parent", "preset"), _DELETE, ["parent", "parent.preset", "parent.path"]),
    ("multi-rank prune", ("resources", "prune"), {"tasks_per_node": 2}, ["resources.prune", "2 processes",
                                                                          "only train and parent"]),
    ("batch not splitting over ranks", ("resources", "train"), {"nodes": 3},
     ["schedule.batch_size 4", "3 ranks", "multiple of 3"]),
    ("bad strategy", ("schedule", "strategy"), "zero3", ["schedule.strategy", "'fsdp'", "'zero3'"]),
    ("unknown preset", ("parent", "preset"), "giant", ["parent", "'giant'", "micro"]),
    ("hf corpus without a name", ("corpus", "kind"), "hf", ["corpus", "needs 'name'"]),
    ("splits not adding up", ("splits",), {"pretrain": 0.9}, ["splits", "add up to"]),
    ("tokenizer without a source", ("tokenizer",), {}, ["tokenizer", "exactly one of"]),
    ("wrong type", ("seq_len",), "long", ["seq_len", "'long'"]),
    ("duplicate ratios", ("ratios",), [0.5, 0.5], ["ratios lists 0.5 more than once"]),
    ("bad schedule kind", ("schedule", "kind"), "linear", ["schedule.kind", "'wsd'", "'linear'"]),
    ("warmup beyond budget", ("schedule", "warmup_tokens"), 4096, ["warmup_tokens (4096)", "smallest budget"]),
    ("zero cpus", ("resources", "train"), {"cpus": 0}, ["resources.train.cpus", "0"]),
    ("data tasks in another table", ("resources", "train"), {"tasks": 4},
     ["resources.train.tasks", "4", "only [resources.data]"]),
    ("zero data tasks", ("resources", "data"), {"tasks": 0}, ["resources.data.tasks", "0"]),
    ("unsafe grid name", ("name",), "../x", ["name", "'../x'"]),
    ("empty exclude rule", ("exclude",), [{}], ["exclude[0]", "at least one of"]),
    ("N:M with ratios", ("methods",), [{"name": "wanda-2:4", "ratios": [0.6]}], ["methods[0]", "own ratio 0.5"]),
    ("budget below one batch", ("budgets",), [64], ["budget 64", "one batch"]),
    # numbers that are not numbers
    ("infinite budget", ("budgets",), [float("inf")], ["budgets[0]", "inf"]),
    ("budget beyond a float", ("budgets",), ["1e400"], ["budgets[0]", "'1e400'"]),
    ("NaN budget", ("budgets",), ["nan"], ["budgets[0]", "'nan'"]),
    ("fractional budget", ("budgets",), [2048.5], ["budgets[0]", "whole number"]),
    ("infinite parent tokens", ("parent", "tokens"), float("inf"), ["parent.tokens", "inf"]),
    ("infinite warmup", ("schedule", "warmup_tokens"), float("inf"), ["schedule.warmup_tokens", "inf"]),
    ("infinite lr", ("schedule", "lr"), float("inf"), ["schedule.lr", "inf"]),
    ("NaN lr", ("schedule", "lr"), float("nan"), ["schedule.lr", "nan"]),
    ("infinite grad clip", ("schedule", "grad_clip"), float("inf"), ["schedule.grad_clip", "inf"]),
    ("infinite parent lr", ("parent", "schedule", "lr"), float("inf"), ["parent.schedule.lr", "inf"]),
    ("infinite ratio", ("ratios",), [float("inf")], ["ratios[0]", "inf"]),
    ("infinite memory", ("resources", "train"), {"mem_gb": float("inf")}, ["resources.train.mem_gb", "inf"]),
    ("NaN split fraction", ("splits",), {"pretrain": float("nan"), "retrain": 0.3, "calibration": 0.1,
                                          "validation": 0.1}, ["splits.pretrain", "nan"]),
    ("fractional batch size", ("schedule", "batch_size"), 2.5, ["schedule.batch_size", "2.5"]),
    ("decay fraction above 1", ("schedule", "decay_fraction"), 1.5, ["schedule.decay_fraction", "1.5"]),
    ("fractional seq_len", ("seq_len",), 32.5, ["seq_len", "32.5"]),
    # seeds
    ("seed too large for the database", ("seeds",), [2**31], ["seeds[0]", "2147483648"]),
    ("negative seed", ("seeds",), [-1], ["seeds[0]", "-1"]),
    ("fractional seed", ("seeds",), [1.5], ["seeds[0]", "1.5"]),
    ("parent seed too large", ("parent", "seed"), 2**40, ["parent.seed", str(2**40)]),
    ("split seed too large", ("splits",), {"pretrain": 0.5, "retrain": 0.3, "calibration": 0.1, "validation": 0.1,
                                            "seed": 2**40}, ["splits.seed", str(2**40)]),
    # the parent's architecture
    ("fractional layer count", ("parent", "overrides", "num_hidden_layers"), 4.5,
     ["parent.overrides.num_hidden_layers", "4.5"]),
    ("zero layers", ("parent", "overrides", "num_hidden_layers"), 0, ["parent.overrides.num_hidden_layers", "0"]),
    ("unknown override", ("parent", "overrides", "num_layers"), 4,
     ["parent.overrides.num_layers", "did you mean 'num_hidden_layers'"]),
    ("override of the wrong type", ("parent", "overrides", "hidden_act"), 5, ["parent.overrides.hidden_act", "5"]),
    ("heads not dividing the hidden size", ("parent", "overrides", "num_attention_heads"), 3,
     ["parent.overrides", "num_attention_heads", "3"]),
    ("KV heads not dividing the heads", ("parent", "overrides", "num_key_value_heads"), 3,
     ["parent.overrides", "num_key_value_heads", "3"]),
    ("vocabulary override on a pretrained parent", ("parent", "overrides", "vocab_size"), 600,
     ["parent.overrides.vocab_size", "tokenizer"]),
    ("tokenizer vocabulary too small", ("tokenizer", "vocab_size"), 300, ["tokenizer.vocab_size", "512"]),
    ("missing tokenizer folder", ("tokenizer",), {"path": "/nonexistent/tokenizer"},
     ["tokenizer.path", "/nonexistent/tokenizer"]),
    ("missing parent folder", ("parent",), {"path": "/nonexistent/parent", "tokens": 1000},
     ["parent.path", "/nonexistent/parent"]),
    # method options, checked by the method against the parent's shapes
    ("method option of the wrong type", ("methods",), [{"name": "minitron-width", "options": {"axes": 5}}],
     ["methods[0].options.axes", "5"]),
    ("unknown width axis", ("methods",), [{"name": "minitron-width", "options": {"axes": ["heads", "depth"]}}],
     ["methods[0].options.axes", "'depth'"]),
    ("fractional nsamples", ("methods",), [{"name": "wanda", "options": {"nsamples": 1.5}}],
     ["methods[0].options.nsamples", "1.5"]),
    ("N:M whose M does not divide the widths", ("methods",), [{"name": "wanda-1:5"}], ["methods[0]", "1:5", "32"]),
    ("N above M", ("methods",), [{"name": "wanda-3:2"}], ["methods[0]", "3:2"]),
    ("malformed N:M option", ("methods",), [{"name": "sparsegpt", "options": {"nm": "two:four"}}],
     ["methods[0].options.nm", "'two:four'"]),
    # exclusions that exclude nothing
    ("exclude rule matching no cell", ("exclude",), [{"ratio": 0.9}], ["exclude[0]", "matches no cell"]),
    ("exclude naming no method", ("exclude",), [{"method": "wanda"}], ["exclude[0].method", "'wanda'"]),
    ("exclude of a budget not in the grid", ("exclude",), [{"budget": 999}], ["exclude[0].budget", "999"]),
    # other tables
    ("zero local workers", ("local", "workers"), 0, ["local.workers", "0"]),
    ("zero calibration sequences", ("calibration", "sequences"), 0, ["calibration.sequences", "0"]),
    ("zero evaluation sequences", ("evaluation", "max_sequences"), 0, ["evaluation.max_sequences", "0"]),
    ("zero windows per document", ("evaluation", "windows_per_document"), 0, ["evaluation.windows_per_document", "0"]),
    ("negative few-shot count", ("evaluation", "num_fewshot"), -1, ["evaluation.num_fewshot", "-1"]),
    ("zero report margin", ("report",), {"margin": 0}, ["report.margin", "0"]),
    ("typo in the report table", ("report",), {"margn": 0.1}, ["report.margn: unknown key", "'margin'"]),
    ("runs_dir not a string", ("runs_dir",), 5, ["runs_dir", "5"]),
    ("name not a string", ("name",), 5, ["name", "5"]),
    ("files corpus matching nothing", ("corpus",), {"kind": "files", "files": ["/nonexistent/*.jsonl"]},
     ["corpus.files", "/nonexistent/*.jsonl"]),
    # misspelt required keys: the nearest key the grid does have
    ("misspelt required key", ("budgets",), _Rename("budget"),
     ["budgets: required key is missing", "the grid has 'budget'", "did you mean 'budgets'"]),
    ("misspelt required parent key", ("parent", "tokens"), _Rename("token"),
     ["parent.tokens: required key is missing", "did you mean 'tokens'"]),
    ("misspelt seq_len", ("seq_len",), _Rename("seqlen"), ["seq_len: required key is missing", "'seqlen'"]),
    ("misspelt table", ("schedule",), _Rename("scheduler"), ["scheduler: unknown key", "did you mean 'schedule'"]),
    # accepted before, failing later
    ("seq_len above the parent's context", ("parent", "overrides", "max_position_embeddings"), 16,
     ["seq_len: 32 is longer than the parent's context", "max_position_embeddings 16", "seq_len ≤ 16"]),
    ("device that torch does not have", ("schedule", "device"), "gpu",
     ["schedule.device", "'gpu' is not a torch device", "cuda"]),
    ("parent device that torch does not have", ("parent", "schedule", "device"), "GPU:0",
     ["parent.schedule.device", "'GPU:0'"]),
    ("method with an empty ratio list", ("methods",), [{"name": "shortgpt", "ratios": []}],
     ["methods[0].ratios", "at least one ratio"]),
    ("name too long for a folder", ("name",), "n" * 300, ["name: 300 characters", "at most 100"]),
    ("name with a slash", ("name",), "a/b", ["name: 'a/b' cannot name a folder", "letters, digits"]),
    ("name with a space", ("name",), "my grid", ["name: 'my grid' cannot name a folder"]),
    ("loaded parent with a tokenizer gridlab trains", ("parent",), {"path": str(REPO / "examples"), "tokens": 1000},
     ["tokenizer.vocab_size", "loaded parent", "tokenizer.path"]),
    ("runs_dir inside a file", ("runs_dir",), "grid.toml/runs", ["runs_dir: cannot create", "is a file"]),
    # paths: relative to the grid file, and named when missing
    ("relative parent folder that does not exist", ("parent",), {"path": "./models/none", "tokens": 1000,
                                                                 "preset": "micro"},
     ["parent.path: './models/none'", "does not exist", "python -m gridlab.convert --gguf"]),
    ("relative corpus file that does not exist", ("corpus",), {"kind": "files", "files": ["data/*.jsonl"]},
     ["corpus.files[0]", "data/*.jsonl", "matches nothing"]),
    ("relative tokenizer folder that does not exist", ("tokenizer",), {"path": "../no/tokenizer"},
     ["tokenizer.path: '../no/tokenizer'", "does not exist"]),
    ("saved dataset folder that does not exist", ("corpus",), {"kind": "disk", "path": "saved"},
     ["corpus.path", "saved", "does not exist"]),
    # more a new user tries
    ("no budgets", ("budgets",), [], ["budgets", "at least 1"]),
    ("no methods", ("methods",), [], ["methods", "at least 1"]),
    ("zero batch size", ("schedule", "batch_size"), 0, ["schedule.batch_size", "0"]),
    ("zero log interval", ("schedule", "log_every_steps"), 0, ["schedule.log_every_steps", "0"]),
    ("seq_len below 8", ("seq_len",), 4, ["seq_len", "4"]),
    ("unknown corpus kind", ("corpus", "kind"), "web", ["corpus.kind", "'web'"]),
    ("ratios as a string", ("ratios",), "0.5", ["ratios", "'0.5'"]),
    ("tokenizer with both sources", ("tokenizer",), {"vocab_size": 512, "path": "gpt2"},
     ["tokenizer", "exactly one of"]),
    ("zero corpus documents", ("corpus", "max_documents"), 0, ["corpus.max_documents", "0"]),
    ("settings empty", ("settings",), [], ["settings", "at least 1"]),
    # per-arm recipes and learning-rate sweeps
    ("typo in an arm's table", ("schedule", "random"), {"warmup": 10},
     ["schedule.random.warmup: unknown key", "'warmup_tokens'"]),
    ("a table for an arm that does not exist", ("schedule", "scratch"), {"lr": 1e-3},
     ["schedule.scratch: unknown key", "pruned, random, embeddings"]),
    ("an empty lr sweep", ("schedule", "lr"), [], ["schedule.lr", "empty list of learning rates"]),
    ("an lr swept twice", ("schedule", "random"), {"lr": [1e-3, 1e-3]}, ["schedule.random.lr", "more than once"]),
    ("a negative lr in a sweep", ("schedule", "pruned"), {"lr": [1e-3, -1e-3]},
     ["schedule.pruned.lr", "-0.001 is not a learning rate"]),
    ("an lr that is not a number", ("schedule", "lr"), ["fast"], ["schedule.lr", "'fast' is not a learning rate"]),
    ("an arm's fractional batch", ("schedule", "embeddings"), {"batch_size": 2.5},
     ["schedule.embeddings.batch_size", "2.5"]),
    ("an arm's warmup beyond the budget", ("schedule", "random"), {"warmup_tokens": 4096},
     ["schedule.random.warmup_tokens (4096)", "smallest budget"]),
    ("an arm's device torch does not have", ("schedule", "pruned"), {"device": "gpu"},
     ["schedule.pruned.device", "'gpu' is not a torch device"]),
    ("an unknown sparse draw", ("init",), {"sparse": "wide"}, ["init.sparse", "'scaled'", "'wide'"]),
    pytest.param("unknown lm-eval task", ("evaluation", "lm_eval_tasks"), ["no_such_task"],
                 ["evaluation.lm_eval_tasks[0]", "'no_such_task'"], marks=pytest.mark.slow),  # indexes lm-eval (~30 s)
]


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("command", ["plan", "submit"])
@pytest.mark.parametrize("case, path, value, expected", MALFORMED, ids=[_case_id(case) for case in MALFORMED])
def test_malformed_grid_is_one_clear_line_and_exit_2(tmp_path, command, case, path, value, expected):
    grid_file = write_grid(tmp_path, _edit(tiny_grid(), path, value))
    result = CliRunner().invoke(app, [command, str(grid_file)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"gridlab: {grid_file}: "), lines[0]     # every grid error names its file so
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "runs").exists()


def test_at_least_a_hundred_malformed_grids_are_tried():
    assert len(MALFORMED) >= 100


def test_an_override_of_a_field_the_preset_sets_wins(tmp_path):
    grid = _edit(tiny_grid(), ("parent", "overrides", "rms_norm_eps"), 1e-6)
    plan = build_plan(load_grid(write_grid(tmp_path, grid)))
    parent = next(s for s in plan.stages.values() if s.kind == "parent")
    assert parent.config.architecture["rms_norm_eps"] == 1e-6


def test_invalid_toml_is_one_line(tmp_path):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(to_toml(tiny_grid()) + "ratios = [0.5\n")
    result = CliRunner().invoke(app, ["plan", str(grid_file)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "not valid TOML" in result.output


def test_valid_grid_loads_and_runs_dir_is_relative_to_the_file(tmp_path):
    spec = load_grid(write_grid(tmp_path, tiny_grid()))
    assert spec.run_dir == (tmp_path / "runs" / "tiny").resolve()
    assert spec.budgets == [2048]


@pytest.mark.parametrize("text, tokens", [(2048, 2048), ("40k", 40_000), ("1.5M", 1_500_000), ("2e6", 2_000_000),
                                          ("3B", 3_000_000_000), (1.5e6, 1_500_000)])
def test_token_counts_accept_numbers_and_suffixes(text, tokens):
    assert parse_tokens(text) == tokens


@pytest.mark.parametrize("text", ["1.5", "2X", True, 0, "k"])
def test_token_counts_reject_fractions_and_garbage(text):
    with pytest.raises(ValueError):
        parse_tokens(text)


def test_nm_name_sets_its_own_ratio(tmp_path):
    spec = load_grid(write_grid(tmp_path, tiny_grid(methods=[{"name": "wanda-2:4"}, {"name": "magnitude"}])))
    nm, magnitude = spec.methods
    assert spec.method_ratios(nm) == [0.5]
    assert nm.name == "wanda" and nm.options == {"nm": "2:4"} and nm.label == "wanda-2:4"
    assert spec.method_ratios(magnitude) == [0.5]


def test_llama31_8b_example_plans_offline_from_its_declared_architecture(monkeypatch):
    """The full-scale example validates and plans without network or the model: the parent declares its shape."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_grid(REPO / "examples" / "llama31-8b.toml")
    train = spec.resources.for_kind("train")
    assert (train["nodes"], train["gpus_per_node"], train["tasks_per_node"], train["ranks"]) == (4, 8, 8, 32)
    assert spec.resources.for_kind("eval")["ranks"] == 1
    assert spec.schedule.strategy == "fsdp" and spec.schedule.activation_checkpointing
    plan = build_plan(spec)
    assert len({m.name for m in spec.methods}) == 6
    text = format_plan(plan)
    assert "train jobs: 4 node(s) × 8 rank(s), 8 GPU(s)/node" in text
    assert "GPU-hours" in text and "local worker" not in text
    assert "then 64 shard tasks" in text and "shard 64, data 1" in text
