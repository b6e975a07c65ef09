"""grid.toml validation: every malformed grid is one clear line, exit code 2, nothing written."""

import copy

import pytest
from typer.testing import CliRunner

from gridlab.cli import app
from gridlab.plan import build_plan, format_plan
from gridlab.spec import load_grid, parse_tokens
from runner_helpers import REPO, tiny_grid, to_toml, write_grid


def _edit(grid: dict, path: tuple, value) -> dict:
    grid = copy.deepcopy(grid)
    target = grid
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return grid


_DELETE = object()

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
    ("unsafe grid name", ("name",), "../x", ["name", "'../x'"]),
    ("empty exclude rule", ("exclude",), [{}], ["exclude[0]", "at least one of"]),
    ("N:M with ratios", ("methods",), [{"name": "wanda-2:4", "ratios": [0.6]}], ["methods[0]", "own ratio 0.5"]),
    ("budget below one batch", ("budgets",), [64], ["budget 64", "one batch"]),
]


@pytest.mark.parametrize("case, path, value, expected", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_grid_is_one_clear_line_and_exit_2(tmp_path, case, path, value, expected):
    grid_file = write_grid(tmp_path, _edit(tiny_grid(), path, value))
    result = CliRunner().invoke(app, ["submit", str(grid_file), "--dry-run"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "runs").exists()


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
    assert nm.method == "wanda" and nm.prune_options == {"nm": "2:4"}
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
    assert len({m.method for m in spec.methods}) == 6
    text = format_plan(plan)
    assert "train jobs: 4 node(s) × 8 rank(s), 8 GPU(s)/node" in text
    assert "GPU-hours" in text and "local worker" not in text
