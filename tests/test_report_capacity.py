"""The capacity diagnostic on synthetic results whose answer is known: the small architecture trained from scratch on
the parent's P tokens (setting-2 random cells at B = 0) against the parent's own loss at P."""

import polars as pl
import pytest

from gridlab.report import analyse as A
from gridlab.report.read import read_results

from report_synthetic import build_cells, finish, parent_loss, write_db

P = 150_000
BUDGETS = [10_000, 20_000, 40_000, 80_000]


def _loss(small_at_p: dict[str, float], spread: float | dict[str, float] = 0.01):
    """Losses where the setting-2 random cell at B = 0 (trained P tokens) reaches small_at_p[granularity]."""
    def loss(method, ratio, init, setting, tokens, seed):
        if init == "random" and setting == 2 and tokens == P:
            granularity = "sparse" if method in ("wanda", "sparsegpt") else "depth"
            wide = spread[granularity] if isinstance(spread, dict) else spread
            return small_at_p[granularity] + wide * (seed - 0.5) + 0.01 * ratio
        if tokens == 0:
            return 7.0 + 0.01 * seed
        return (4.0 if init == "pruned" else 4.4 - 0.1 * (setting == 2)) - 0.1 * tokens / 80_000 + 0.01 * seed
    return loss


def _analysis(tmp_path, small_at_p, parent=4.5, methods=("shortgpt", "minitron-depth", "wanda"), seeds=(0, 1),
              references=True, parent_metrics="default", spread=0.01, settings=(1, 2)):
    cells = build_cells(list(methods), [0.5, 0.7], BUDGETS, list(seeds), P, references=references)
    cells = [c for c in cells if c["setting"] in settings]
    metrics = finish(cells, _loss(small_at_p, spread))
    rows = parent_loss(parent, P) if parent_metrics == "default" else parent_metrics
    db = write_db(tmp_path / "results.duckdb", cells, metrics, parent_tokens=P, parent_metrics=rows)
    return A.analyse(read_results(db))


def test_a_small_architecture_that_beats_the_parent_on_p_tokens_means_data_limited(tmp_path):
    analysis = _analysis(tmp_path, {"depth": 4.2, "sparse": 4.0})
    capacity = analysis.capacity
    assert capacity.available and capacity.metric == "val_loss" and capacity.parent_value == 4.5
    assert capacity.counts == {"capacity-limited": 0, "data-limited": 4, "indistinguishable": 0}
    depth = next(r for r in capacity.rows if r["granularity"] == "depth" and r["ratio"] == 0.5)
    assert depth["small"] == pytest.approx(4.205) and depth["difference"] == pytest.approx(4.205 - 4.5)
    # shortgpt and minitron-depth share the random trajectory of this architecture: its seeds count once.
    assert depth["n"] == 2 and depth["methods"] == ["minitron-depth", "shortgpt"]
    sentence = analysis.answer[-1]
    assert len(analysis.answer) == 3
    assert sentence.startswith("At P = 150k tokens the parent is data-limited")
    assert "setting 2 must favour scratch at this scale" in sentence
    assert all("must favour scratch" in r["reading"] for r in analysis.capacity_table)


def test_a_parent_better_than_the_small_architecture_on_p_tokens_means_capacity_limited(tmp_path):
    analysis = _analysis(tmp_path, {"depth": 5.0, "sparse": 4.9})
    assert analysis.capacity.counts["capacity-limited"] == 4
    assert analysis.answer[-1].startswith("At P = 150k tokens the parent is capacity-limited")
    assert "setting 2 is a fair test" in analysis.answer[-1]
    assert all(r["advantage"] > 0 for r in analysis.capacity.rows)


def test_mixed_and_indistinguishable_regimes(tmp_path):
    analysis = _analysis(tmp_path, {"depth": 5.0, "sparse": 4.5}, spread={"depth": 0.01, "sparse": 0.4})
    by = {(r["granularity"], r["ratio"]): r["regime"] for r in analysis.capacity.rows}
    assert by[("depth", 0.5)] == "capacity-limited"
    assert by[("sparse", 0.5)] == "indistinguishable"  # 4.505 ± a wide interval against 4.5
    assert "capacity-limited in 2 of 4" in analysis.answer[-1]


def test_the_direction_comes_from_the_parent_metric(tmp_path):
    # A score (higher is better): the parent at 0.6 beats a small architecture at 0.4.
    cells = build_cells(["shortgpt"], [0.5], BUDGETS, [0, 1], P, references=True)
    metrics = finish(cells, _loss({"depth": 0.4}), metric="accuracy", higher_is_better=True)
    parent = [dict(tokens=P, name="accuracy", value=0.6, stderr=0.01, higher_is_better=True)]
    db = write_db(tmp_path / "results.duckdb", cells, metrics, parent_tokens=P, parent_metrics=parent)
    capacity = A.analyse(read_results(db), "accuracy").capacity
    assert capacity.metric == "accuracy" and capacity.higher_is_better
    (row,) = capacity.rows
    assert row["regime"] == "capacity-limited" and row["advantage"] == pytest.approx(0.6 - 0.405)


def test_single_seed_is_called_by_sign_and_marked(tmp_path):
    analysis = _analysis(tmp_path, {"depth": 4.0, "sparse": 4.0}, seeds=(0,))
    assert all(r["single_seed"] and r["half"] is None for r in analysis.capacity.rows)
    assert analysis.capacity.counts["data-limited"] == 4


@pytest.mark.parametrize("case, reason", [
    ("no references", "no setting-2 random branch at B = 0"),
    ("no table", "no parent_metrics table"),
    ("empty table", "parent_metrics has no val_loss"),
    ("no setting 2", "the grid has no setting 2"),
])
def test_grids_without_what_the_diagnostic_needs_still_render_and_say_why(tmp_path, case, reason):
    options = {"no references": dict(references=False), "no table": dict(parent_metrics=None),
               "empty table": dict(parent_metrics=[]), "no setting 2": dict(settings=(1,))}[case]
    analysis = _analysis(tmp_path, {"depth": 4.0, "sparse": 4.0}, **options)
    assert not analysis.capacity.available and reason in analysis.capacity.reason
    if case != "no setting 2":
        assert analysis.answer[-1].startswith("Whether setting 2 can favour pruning at this scale is not known")
    else:
        assert len(analysis.answer) == 1  # no setting 2: one sentence for setting 1, nothing about capacity


def test_reference_cells_are_not_part_of_the_recommendation(tmp_path):
    analysis = _analysis(tmp_path, {"depth": 4.0, "sparse": 4.0})
    assert 0 not in analysis.gaps["budget_tokens"].to_list()
    assert sorted(analysis.squares["budget_tokens"].unique()) == BUDGETS
    assert analysis.dimensions["budgets"] == BUDGETS and analysis.dimensions["references"]
    assert set(analysis.references["budget_tokens"]) == {0}
    budgets, _ = analysis.arms
    assert budgets[0] == 0  # the per-group table shows them, as reference points
    assert analysis.references.filter((pl.col("init") == "random") & (pl.col("setting") == 2))["trained_tokens"] \
        .unique().to_list() == [P]
