"""Results → everything the report shows: `analyse()` composes reading (read.py), statistics (stats.py), the gap's
trend and crossovers (scaling.py), effective data transferred and setting 2 (transfer.py) and the tables and
sentences (tables.py)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from gridlab.report import sequential, tables
from gridlab.report.control import embedding_shares, pooled_shares
from gridlab.report.read import (
    LM_EVAL_AVERAGE,
    Results,
    available_metrics,
    directions,
    grid_spec,
    headline_values,
    lm_eval_average_tasks,
    metric_direction,
    training_curves,
)
from gridlab.report.recipes import Selection, select_learning_rates
from gridlab.report.regime import Regime, regime, regime_line
from gridlab.report.scaling import Crossover, trend
from gridlab.report.stats import DEFAULT_MARGIN, gap_table, measurement_error, seed_summary
from gridlab.report.transfer import Transfer, effective_transfer


@dataclass
class Downstream:
    """The lm-eval average beside the headline metric: verdicts per square with the same statistics."""

    metric: str
    tasks: list[str]
    margin: float
    gaps: pl.DataFrame
    squares: pl.DataFrame
    verdicts: dict[int, dict[str, int]]
    sentences: list[str]


@dataclass
class Control:
    """The embeddings control beside pruned vs random: the pruned − embeddings gaps by the same statistics
    (stats.gap_table against "embeddings"), the share of the pruned arm's advantage the embeddings carry per group
    and pooled per setting and budget (report.control), and the tables the report lays out."""

    gaps: pl.DataFrame
    shares: pl.DataFrame
    pooled: pl.DataFrame
    verdicts: dict[int, dict[str, int]]
    rows: dict[int, tuple[list[int], list[dict]]]
    sentences: dict[int, str]


@dataclass
class Analysis:
    metric: str
    higher_is_better: bool
    pool: str
    margin: float  # δ of the equivalence test, in the headline metric's units
    grid: dict
    spec: dict
    counts: dict[str, int]
    dimensions: dict
    metrics_available: list[str]  # metrics with a declared direction (what --metric can rank by)
    values: pl.DataFrame  # seed-level headline values of the budgets B > 0
    references: pl.DataFrame  # budget-0 cells: right after pruning, at init, setting-2 random after P tokens
    summary: pl.DataFrame  # seed statistics per group, budget 0 included
    gaps: pl.DataFrame
    families: list[dict]  # the variance model per (granularity, method, setting, budget): tables.model_rows
    sensitivity: dict[int, dict[str, int]]  # verdicts the cells' own paired t would change, per setting
    squares: pl.DataFrame  # the answer: one call per granularity × ratio × setting × budget
    answer: list[str]  # at most three sentences
    verdicts: dict[int, dict[str, int]]
    crossovers: list[Crossover]
    crossover_lines: dict[int, str]
    crossover_table: list[dict]
    holdout: dict[int, dict]  # per setting: groups, checked, covered (scaling.holdout_summary)
    holdout_line: str
    predictions: pl.DataFrame  # predictions.csv (scaling.PREDICTION_SCHEMA)
    effective: Transfer  # D_eff, the random arm's slope around P, the parent's tokens per parameter
    transfer: pl.DataFrame  # D_eff per (setting, granularity, method, ratio, budget_tokens): transfer.TRANSFER_SCHEMA
    transfer_table: tuple[list[int], list[dict]]
    setting2_summary: str
    recommendations: dict[int, tuple[list[int], list[dict]]]
    answer_tables: dict[int, tuple[list[int], list[dict]]]
    arms: tuple[list[int], list[dict]]
    costs: list[dict]
    missing: list[dict]
    curves: pl.DataFrame  # train_loss per (granularity, method, ratio, init, setting, tokens) at the largest budget
    downstream: Downstream | None
    environments: list[dict]  # where the results were computed (gridlab.db's environments view)
    adaptive: dict | None  # an adaptive study: how the design was reached (tables.study_design); None: a fixed grid
    regime: Regime  # optimizer steps, tokens per parameter, the held-out sample; warnings for the first screen
    regime_line: str
    selection: Selection | None = None  # the lr each arm is compared at (report.recipes), per group
    selection_rows: tuple[list[int], list[dict]] = ([], [])
    control: Control | None = None  # the embeddings control, when the grid has the embeddings arm
    comparisons: pl.DataFrame | None = None  # per cell: each arm's lr and the embeddings comparison (verdicts.csv)


def margin_for(spec: dict, metric: str, override: float | None = None) -> float:
    """The equivalence margin of a metric: the override (`gridlab report --margin`), else the grid spec's
    `[report] margins[metric]`, else its `[report] margin`, else stats.DEFAULT_MARGIN (a spec stored before the
    `[report]` table existed)."""
    if override is not None:
        return float(override)
    report = spec.get("report") if isinstance(spec.get("report"), dict) else {}
    margins = report.get("margins") if isinstance(report.get("margins"), dict) else {}
    return float(margins.get(metric, report.get("margin", DEFAULT_MARGIN)))


def study_design(results: Results) -> sequential.Design | None:
    """The sequential design of an adaptive study (None: a fixed grid, whose verdicts are the fixed-sample ones)."""
    if results.adaptive is None:
        return None
    study = results.adaptive.study
    return sequential.Design(first=int(study["first_seeds"]), last=int(study["max_seeds"]),
                             spending=study["spending"], alpha=float(study["alpha"]))


def gaps_of(results: Results, values: pl.DataFrame, higher: bool, pool: str, margin: float,
            metric: str) -> pl.DataFrame:
    """The gap table with the verdicts the study's design calls for: stats.gap_table for a fixed grid; for an
    adaptive study sequential.sequential_gap_table, replaying its looks from the rounds that added each cell."""
    design = study_design(results)
    documents = results.documents.filter(pl.col("metric") == metric)   # the held-out sample's error (stats)
    if design is None:
        return gap_table(values, higher, pool, margin, measurement_error(values, documents))
    return sequential.sequential_gap_table(values, higher, pool, margin, design, results.adaptive.additions,
                                           documents)


def _downstream(results: Results, pool: str, spec: dict, selection: Selection) -> Downstream | None:
    if not (results.metrics["name"] == LM_EVAL_AVERAGE).any():
        return None
    values = headline_values(results.cells, results.metrics, LM_EVAL_AVERAGE).filter(pl.col("budget_tokens") > 0)
    values = selection.keep(values)
    margin = margin_for(spec, LM_EVAL_AVERAGE)
    gaps = gaps_of(results, values, True, pool, margin, LM_EVAL_AVERAGE)
    squares = tables.answer_squares(gaps, margin)
    sentences = [s for s in (tables.setting_sentence(squares, setting, LM_EVAL_AVERAGE, True) for setting in (1, 2))
                 if s]
    return Downstream(LM_EVAL_AVERAGE, lm_eval_average_tasks(results.metrics), margin, gaps, squares,
                      tables.verdict_counts(gaps), sentences)


def analyse(results: Results, metric: str = "val_loss", pool: str = "model", margin: float | None = None) -> Analysis:
    """Everything the report needs from the results, for one headline metric, interval model (stats.POOLING) and
    equivalence margin (None: the grid spec's, see margin_for)."""
    names = available_metrics(results.metrics)
    scores = sorted(name for name, higher in directions(results.metrics).items() if higher is not None)
    # An empty database (every cell pending) has no metrics yet: val_loss is then assumed, as it will be declared.
    higher = metric_direction(results.metrics, metric) if names else False
    spec = grid_spec(results.grid)
    margin = margin_for(spec, metric, margin)
    every_value = headline_values(results.cells, results.metrics, metric)
    # Each arm at its own lr: chosen per group on the selection half of the held-out documents (report.recipes).
    selection = select_learning_rates(every_value, results.cells, results.metrics)
    every_value = selection.keep(every_value)
    cells = selection.keep(results.cells)
    values = every_value.filter(pl.col("budget_tokens") > 0)
    summary = seed_summary(every_value)
    gaps = gaps_of(results, values, higher, pool, margin, metric)
    documents = results.documents.filter(pl.col("metric") == metric)
    control = _control(values, documents, higher, pool, margin, gaps)
    parent_tokens = results.grid.get("parent_tokens")
    squares = tables.answer_squares(gaps, margin)
    dimensions = tables.grid_dimensions(results.cells)
    gap_trend = trend(values, gaps, dimensions["budgets"])
    found = gap_trend.crossovers
    effective = effective_transfer(every_value, higher, sorted(gaps["setting"].unique().to_list()), parent_tokens,
                                   results.grid.get("parent_params"))
    answer = [s for s in (tables.setting_sentence(squares, setting, metric, higher,
                                                  control.sentences.get(setting) if control else None)
                          for setting in (1, 2)) if s]
    setting2_summary = tables.setting2_sentence(effective)
    if answer and 2 in dimensions["settings"]:
        answer.append(tables.setting2_sentence(effective, short=True))
    measured = regime(spec, results.grid, values, results.metrics, metric, margin, gaps)
    return Analysis(
        metric=metric,
        higher_is_better=higher,
        pool=pool,
        margin=margin,
        grid=results.grid,
        environments=results.environments,
        adaptive=(tables.study_design(results.adaptive, study_design(results))
                  if results.adaptive is not None else None),
        spec=spec,
        counts=tables.status_counts(results.cells),
        dimensions=dimensions,
        metrics_available=scores,
        values=values,
        references=every_value.filter(pl.col("budget_tokens") == 0),
        summary=summary,
        gaps=gaps,
        families=tables.model_rows(gaps),
        sensitivity=tables.sensitivity(gaps),
        squares=squares,
        answer=answer,
        verdicts=tables.verdict_counts(gaps),
        crossovers=found,
        crossover_lines={s: line for s in (1, 2) if (line := tables.crossover_summary(found, s))},
        crossover_table=tables.crossover_rows(found),
        holdout=gap_trend.holdout,
        holdout_line=tables.holdout_sentence(gap_trend.holdout),
        predictions=gap_trend.predictions,
        effective=effective,
        transfer=effective.frame,
        transfer_table=tables.transfer_rows(effective),
        setting2_summary=setting2_summary,
        recommendations={s: tables.recommendation_rows(gaps, s) for s in (1, 2)},
        answer_tables={s: tables.square_rows(squares, s) for s in (1, 2)},
        arms=tables.arm_rows(summary),
        costs=tables.cost_rows(dimensions["budgets"], parent_tokens, results.grid.get("calibration_tokens")),
        missing=tables.missing_groups(cells, every_value),
        curves=training_curves(cells, results.metrics),
        downstream=_downstream(results, pool, spec, selection) if metric != LM_EVAL_AVERAGE else None,
        regime=measured,
        regime_line=regime_line(measured, metric),
        selection=selection,
        selection_rows=tables.selection_rows(selection),
        control=control,
        comparisons=tables.comparisons(selection, control),
    )


def _control(values: pl.DataFrame, documents: pl.DataFrame, higher: bool, pool: str, margin: float,
             random_gaps: pl.DataFrame) -> Control | None:
    """The embeddings control (report.control), when the grid has finished embeddings cells."""
    if not (values["init"] == "embeddings").any():
        return None
    gaps = gap_table(values, higher, pool, margin, measurement_error(values, documents, against="embeddings"),
                     against="embeddings")
    shares, pooled = embedding_shares(values, documents, higher), pooled_shares(values, documents, higher)
    return Control(gaps=gaps, shares=shares, pooled=pooled, verdicts=tables.verdict_counts(gaps),
                   rows={s: tables.control_rows(random_gaps, gaps, shares, s) for s in (1, 2)},
                   sentences={s: text for s in (1, 2) if (text := tables.control_clause(pooled, s))})
