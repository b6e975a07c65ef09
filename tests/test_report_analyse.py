"""analyse() through a results database: directions from the metrics table, the lm-eval average, the answer's
squares and sentences, crossovers, partial grids."""

import math

import duckdb
import numpy as np
import polars as pl
import pytest
from scipy import optimize

from gridlab.errors import UserError
from gridlab.report import analyse as A
from gridlab.report.read import LM_EVAL_AVERAGE, lm_eval_average, read_results

from report_synthetic import build_cells, finish, power_law, write_db

BUDGETS = [1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000]
PARENT = 50_000_000


def _analysis(tmp_path, loss, seeds=(0, 1, 2), budgets=BUDGETS, methods=("shortgpt",), metric="val_loss",
              higher_is_better=False, **kw):
    cells = build_cells(list(methods), [0.5], list(budgets), list(seeds), PARENT)
    metrics = finish(cells, loss, metric=metric, higher_is_better=higher_is_better, **kw)
    db = write_db(tmp_path / "results.duckdb", cells, metrics, parent_tokens=PARENT)
    return A.analyse(read_results(db), metric)


def _crossover(analysis, setting):
    (found,) = [c for c in analysis.crossovers if c.setting == setting]
    return found


def test_direction_comes_from_the_metrics_table_not_the_name(tmp_path):
    # "loss_gain" reads like a loss but is declared a score: larger pruned values mean pruning wins.
    loss = lambda m, r, i, s, tok, seed: (0.7 if i == "pruned" else 0.5) + 0.001 * seed  # noqa: E731
    analysis = _analysis(tmp_path, loss, metric="loss_gain", higher_is_better=True, budgets=BUDGETS[:2])
    assert analysis.higher_is_better
    assert set(analysis.gaps["verdict"].filter(analysis.gaps["setting"] == 1)) == {"prune"}
    declared_loss = _analysis(tmp_path / "b", loss, metric="accuracy_drop", higher_is_better=False,
                              budgets=BUDGETS[:2])
    assert set(declared_loss.gaps["verdict"].filter(declared_loss.gaps["setting"] == 1)) == {"scratch"}


def test_a_metric_without_direction_is_one_clear_user_error(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS[:1], [0], PARENT)
    db = write_db(tmp_path / "results.duckdb", cells, finish(cells, lambda *a: 2.0))
    with pytest.raises(UserError, match=r"metric 'lr' declares no direction .*metrics with a direction: "
                                        r"train_loss, val_loss"):
        A.analyse(read_results(db), "lr")
    with pytest.raises(UserError, match="metric 'lm_eval/arc/acc' is not in the results; available: .*val_loss"):
        A.analyse(read_results(db), "lm_eval/arc/acc")
    with pytest.raises(UserError, match="no results database"):
        read_results(tmp_path / "nowhere.duckdb")


def test_a_database_from_before_directions_asks_for_a_new_ingest(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS[:1], [0], PARENT)
    db = write_db(tmp_path / "results.duckdb", cells, finish(cells, lambda *a: 2.0))
    with duckdb.connect(str(db)) as con:
        con.execute("alter table metrics drop column higher_is_better")
    results = read_results(db)
    assert results.metrics["higher_is_better"].null_count() == results.metrics.height
    with pytest.raises(UserError, match="run `gridlab ingest`"):
        A.analyse(results)


def test_lm_eval_average_over_declared_scores(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS[:2], [0, 1], PARENT)
    metrics = finish(cells, lambda m, r, i, s, tok, seed: 3.0 - 0.1 * (i == "pruned"))
    for cell in cells[:-1]:  # the last cell misses a task: it gets no average
        bonus = 0.1 if cell["init"] == "pruned" else 0.0
        for name, value, higher in (("lm_eval/arc_easy/acc", 0.30, True), ("lm_eval/arc_easy/acc_norm", 0.40, True),
                                    ("lm_eval/piqa/acc", 0.60, True), ("lm_eval/wikitext/word_perplexity", 90, False)):
            metrics.append(dict(cell_id=cell["cell_id"], tokens=cell["trained_tokens"], name=name,
                                value=value + bonus + 0.001 * cell["seed"], stderr=0.02, higher_is_better=higher))
    metrics.append(dict(cell_id=cells[-1]["cell_id"], tokens=cells[-1]["trained_tokens"], name="lm_eval/piqa/acc",
                        value=0.6, stderr=0.02, higher_is_better=True))
    db = write_db(tmp_path / "results.duckdb", cells, metrics, parent_tokens=PARENT)
    results = read_results(db)
    average = results.metrics.filter(pl.col("name") == LM_EVAL_AVERAGE)
    assert average.height == len(cells) - 1 and average["higher_is_better"].all()
    first = average.filter(pl.col("cell_id") == cells[0]["cell_id"]).row(0, named=True)
    assert first["value"] == pytest.approx((0.40 + 0.60) / 2 + 0.1 + 0.001 * cells[0]["seed"])  # acc_norm, acc
    assert first["stderr"] == pytest.approx(math.sqrt(2 * 0.02**2) / 2)
    analysis = A.analyse(results)
    assert analysis.downstream.metric == LM_EVAL_AVERAGE
    assert analysis.downstream.tasks == ["lm_eval/arc_easy/acc_norm", "lm_eval/piqa/acc"]
    assert set(analysis.downstream.gaps.filter(pl.col("setting") == 1)["verdict"]) == {"prune"}
    assert LM_EVAL_AVERAGE in analysis.metrics_available and "lr" not in analysis.metrics_available
    headline = A.analyse(results, LM_EVAL_AVERAGE)
    assert headline.higher_is_better and headline.downstream is None
    assert lm_eval_average(results.metrics.filter(~pl.col("name").str.starts_with("lm_eval"))).height == 0


def test_answer_squares_let_the_best_method_stand_for_the_granularity(tmp_path):
    def loss(method, ratio, init, setting, tokens, seed):
        gap = {"shortgpt": -0.5, "minitron-depth": 0.3}[method] if init == "pruned" else 0.0
        return 3.0 + gap + 0.01 * seed + (0.2 if setting == 2 and init == "random" else 0)

    analysis = _analysis(tmp_path, loss, methods=("shortgpt", "minitron-depth"), budgets=BUDGETS[:2])
    squares = analysis.squares.filter(pl.col("setting") == 1)
    assert squares.height == 2 and set(squares["call"]) == {"prune"} and set(squares["method"]) == {"shortgpt"}
    assert set(squares["methods"]) == {2}
    # Setting 2: shortgpt's gap −0.7 still wins; were every method to lose, the call would be scratch.
    assert set(analysis.squares.filter(pl.col("setting") == 2)["call"]) == {"prune"}
    assert len(analysis.answer) == 3
    assert analysis.answer[0].startswith("Setting 1 (random init trains the same B tokens): of 2 granularity × "
                                         "ratio × budget squares, prune 2, equivalent 0, inconclusive 0, "
                                         "scratch 0")


def test_planted_crossover_inside_grid_found_through_the_database(tmp_path):
    pruned, random = power_law(2.0, 0.5, 0.3), power_law(1.9, 2.0, 0.5)
    planted = math.exp(optimize.brentq(lambda x: pruned(math.exp(x)) - random(math.exp(x)), math.log(1e6), 40))
    budgets = [int(planted / 8 * 2**i) for i in range(6)]  # planted lies between the 4th and 5th budget
    analysis = _analysis(tmp_path, lambda m, r, i, s, tok, seed: (pruned if i == "pruned" else random)(tok)
                         + 0.001 * (seed - 1), budgets=budgets)
    found = _crossover(analysis, 1)
    assert found.kind == "interpolated"
    assert found.budget == pytest.approx(planted, rel=0.05)
    assert found.direction == "scratch catches up with pruning"
    assert found.low < planted < found.high  # between the two significant verdicts that bracket it
    line = analysis.crossover_lines[1]
    assert line.startswith("Setting 1: 1 group (method × ratio)")
    assert "1 cross inside the grid between significant verdicts" in line
    assert [row["kind"] for row in analysis.crossover_table] == ["interpolated"]  # setting 2 does not cross


def test_groups_that_neither_cross_nor_fit_are_counted_not_listed(tmp_path):
    analysis = _analysis(tmp_path, lambda m, r, i, s, tok, seed: (2.0 if i == "pruned" else 2.5) + 0.01 * seed,
                         budgets=BUDGETS[:2])
    assert analysis.crossover_table == []
    assert "1 neither (1 too few budgets to extrapolate)" in analysis.crossover_lines[1]
    single = _analysis(tmp_path / "one", lambda m, r, i, s, tok, seed: 2.0 + 0.5 * (i == "pruned"), seeds=(0,),
                       budgets=BUDGETS[:3])
    assert "1 neither (1 too few seeds or budgets to fit and check a model)" in single.crossover_lines[1]
    assert "a model needs ≥ 2 seeds" in _crossover(single, 1).reason


def test_interval_model_and_margin_reach_the_gaps(tmp_path):
    rng = np.random.default_rng(0)
    cells = build_cells(["shortgpt"], [0.5, 0.6, 0.7], BUDGETS[:3], [0, 1], PARENT)
    metrics = finish(cells, lambda m, r, i, s, tok, seed: 3.0 - 0.3 * (i == "pruned") + rng.normal(0, 0.02))
    spec = {"report": {"margin": 0.5, "margins": {"val_ppl": 1.0}}}
    results = read_results(write_db(tmp_path / "results.duckdb", cells, metrics, parent_tokens=PARENT, spec=spec))
    assert set(A.analyse(results, pool="none").gaps["dof"]) == {1.0}
    model = A.analyse(results, pool="model")
    assert set(model.gaps["model"]) == {"mixed model (REML)"} and (model.gaps["dof"] > 1).all()
    # A margin of 0.5 nats from the grid's [report] table: a gap of −0.3 is then equivalent where it is precise;
    # at the default 0.02 it is a difference.
    verdicts = set(model.gaps["verdict"])
    assert model.margin == 0.5 and "equivalent" in verdicts and "prune" not in verdicts
    strict = A.analyse(results, margin=0.02)
    assert strict.margin == 0.02 and "equivalent" not in set(strict.gaps["verdict"])
    assert A.margin_for(spec, "val_ppl") == 1.0 and A.margin_for(spec, "val_loss", 0.1) == 0.1
    assert A.margin_for({}, "val_loss") == 0.02
    assert model.sensitivity[1]["total"] == 9 and model.families[0]["model"] == "mixed model (REML)"


def test_partial_grid_lists_missing_cells_and_counts(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS, [0, 1], PARENT)
    metrics = finish(cells, lambda m, r, i, s, tok, seed: 2.0 + 0.01 * seed,
                     done=lambda c: c["budget_tokens"] <= 4_000_000)
    cells[-1]["status"], cells[-1]["error"] = "failed", "TrainingDiverged: loss is nan"
    db = write_db(tmp_path / "results.duckdb", cells, metrics)
    analysis = A.analyse(read_results(db))
    assert analysis.counts["done"] == 24 and analysis.counts["pending"] == 15 and analysis.counts["failed"] == 1
    failed = [m for m in analysis.missing if m["reason"] == "failed"]
    assert failed and failed[0]["errors"] == ["TrainingDiverged: loss is nan"]
    assert sum(m["cells"] for m in analysis.missing) == 16
    assert sorted(analysis.gaps["budget_tokens"].unique()) == BUDGETS[:3]


def test_all_pending_grid_analyses_to_nothing(tmp_path):
    cells = build_cells(["shortgpt"], [0.5], BUDGETS[:2], [0], PARENT)
    analysis = A.analyse(read_results(write_db(tmp_path / "results.duckdb", cells, [])))
    assert analysis.answer == [] and analysis.gaps.height == 0 and analysis.squares.height == 0
    assert analysis.crossovers == [] and not analysis.effective.available
    assert analysis.predictions.height == 0 and analysis.transfer.height == 0
