"""Results database → polars frames (read-only), and what the metrics table declares about each metric.

Tables read: `grid` (one row), `cells`, `metrics` (with `higher_is_better`), and `parent_metrics` when present (the
parent's own measurements: its validation loss after its P pretraining tokens). `stages` is not needed.
A metric's direction comes only from the `higher_is_better` column: True (a score, higher is better), False (a loss,
lower is better), NULL (not a score, e.g. `lr`: the report cannot rank by it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from gridlab.db import connect_read_only
from gridlab.errors import UserError

CELL_COLUMNS = {
    "cell_id": pl.Utf8, "method": pl.Utf8, "granularity": pl.Utf8, "ratio": pl.Float64,
    "achieved_ratio": pl.Float64, "init": pl.Utf8, "setting": pl.Int64, "budget_tokens": pl.Int64,
    "trained_tokens": pl.Int64, "seed": pl.Int64, "status": pl.Utf8, "error": pl.Utf8, "train_stage": pl.Utf8,
    "branch_path": pl.Utf8, "params": pl.Int64, "lr": pl.Float64,
}
METRIC_COLUMNS = {"cell_id": pl.Utf8, "tokens": pl.Int64, "name": pl.Utf8, "value": pl.Float64,
                  "stderr": pl.Float64, "higher_is_better": pl.Boolean}
PARENT_METRIC_COLUMNS = {"tokens": pl.Int64, "name": pl.Utf8, "value": pl.Float64, "stderr": pl.Float64,
                         "higher_is_better": pl.Boolean}
DOCUMENT_LOSS_COLUMNS = {"cell_id": pl.Utf8, "eval_stage": pl.Utf8, "metric": pl.Utf8, "document": pl.UInt64,
                         "tokens": pl.Float64, "loss_sum": pl.Float64, "windows": pl.Int64, "sampled": pl.Int64}
_SQL_TYPES = {pl.Utf8: "VARCHAR", pl.Float64: "DOUBLE", pl.Int64: "BIGINT", pl.Boolean: "BOOLEAN"}

# The average over lm-eval tasks that papers report: per task one score the task declares higher-is-better
# (acc_norm where the task has it, else acc, else its first such metric by name).
LM_EVAL_AVERAGE = "lm_eval/average"
LM_EVAL_PREFERENCE = ("acc_norm", "acc")


@dataclass(frozen=True)
class Results:
    grid: dict
    cells: pl.DataFrame
    metrics: pl.DataFrame
    parent_metrics: pl.DataFrame
    has_parent_metrics: bool  # False: the database has no parent_metrics table (written before it existed)
    environments: list[dict]  # each distinct environment the results came from (the `environments` view)
    # per-document held-out losses of every finished cell (document_losses(); empty for an older database)
    documents: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=DOCUMENT_LOSS_COLUMNS))
    adaptive: Adaptive | None = None  # the study ran adaptively (tables adaptive, adaptive_rounds, _additions)


@dataclass(frozen=True)
class Adaptive:
    """An adaptive study's record as the database holds it (gridlab.db, from runs/<grid>/adaptive.json)."""

    study: dict  # the `adaptive` row: its sequential design, rounds, tokens, why it stopped
    rounds: list[dict]  # `adaptive_rounds`: what each round added and why, its tokens and GPU-hours
    additions: pl.DataFrame  # `adaptive_additions`: the cells each round added (round, method, ratio, setting, …)


def _select(con, table: str, columns: dict) -> pl.DataFrame:
    """The table's columns in `columns` order and types; a column the table lacks (an older database) is null."""
    present = {row[0] for row in con.execute(
        "select column_name from information_schema.columns where table_name = ?", [table]).fetchall()}
    select = ", ".join(c if c in present else f"cast(null as {_SQL_TYPES[t]}) as {c}" for c, t in columns.items())
    frame = con.sql(f"select {select} from {table}").pl()
    return frame.cast(columns, strict=False) if frame.height else pl.DataFrame(schema=columns)


def read_results(db_path: Path) -> Results:
    """Read the grid row, the cells, the metrics and the parent's metrics of a results database (read-only).
    The lm-eval average (`lm_eval/average`) is added to the metrics when lm-eval tasks ran."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise UserError(f"no results database at {db_path}: run `gridlab submit` first, or pass the grid's folder")
    with connect_read_only(db_path) as con:
        tables = {row[0] for row in con.execute("select table_name from information_schema.tables").fetchall()}
        missing = {"grid", "cells", "metrics"} - tables
        if missing:
            raise UserError(f"{db_path} is not a gridlab results database: tables {sorted(missing)} are missing")
        grid_rows = con.sql("select * from grid").pl()
        cells = _select(con, "cells", CELL_COLUMNS)
        metrics = _select(con, "metrics", METRIC_COLUMNS)
        has_parent = "parent_metrics" in tables
        parent = (_select(con, "parent_metrics", PARENT_METRIC_COLUMNS) if has_parent
                  else pl.DataFrame(schema=PARENT_METRIC_COLUMNS))
        environments = con.sql("select * from environments").pl().to_dicts() if "environments" in tables else []
        documents = document_losses(con, metric=None)
        adaptive = None
        study = con.sql("select * from adaptive").pl() if "adaptive" in tables else None
        if study is not None and study.height:
            adaptive = Adaptive(study.row(0, named=True),
                                con.sql("select * from adaptive_rounds order by round").pl().to_dicts(),
                                con.sql("select * from adaptive_additions").pl())
    grid = grid_rows.row(0, named=True) if grid_rows.height else {}
    average = lm_eval_average(metrics)
    if average.height:
        metrics = pl.concat([metrics, average])
    return Results(grid=grid, cells=cells, metrics=metrics, parent_metrics=parent, has_parent_metrics=has_parent,
                   environments=environments, documents=documents, adaptive=adaptive)


def grid_spec(grid: dict) -> dict:
    """The grid's validated spec as stored in `grid.spec_json`, or {} when absent or unreadable."""
    try:
        spec = json.loads(grid.get("spec_json") or "{}")
    except (TypeError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def available_metrics(metrics: pl.DataFrame) -> list[str]:
    return sorted(metrics.get_column("name").unique().drop_nulls().to_list())


def directions(metrics: pl.DataFrame) -> dict[str, bool | None]:
    """Each metric's declared direction: True higher is better, False lower is better, None not a score.
    A metric declared both ways is a bug in whatever wrote the database."""
    declared = metrics.group_by("name").agg(pl.col("higher_is_better").drop_nulls().unique())
    out = {}
    for name, values in declared.iter_rows():
        if len(values) > 1:
            raise ValueError(f"metric {name!r} is declared both higher- and lower-is-better in the database")
        out[name] = values[0] if values else None
    return out


def metric_direction(metrics: pl.DataFrame, metric: str) -> bool:
    """higher_is_better of the headline metric, as the database declares it; a user error when it is not a score."""
    names = directions(metrics)
    if metric not in names:
        raise UserError(f"metric {metric!r} is not in the results; available: {', '.join(sorted(names)) or 'none'}")
    if names[metric] is None:
        scores = sorted(name for name, direction in names.items() if direction is not None)
        raise UserError(f"metric {metric!r} declares no direction (metrics.higher_is_better is NULL: not a score, "
                        f"or a database ingested before directions existed: run `gridlab ingest`); metrics with a "
                        f"direction: {', '.join(scores) or 'none'}")
    return bool(names[metric])


def lm_eval_average(metrics: pl.DataFrame) -> pl.DataFrame:
    """Rows of `lm_eval/average` per (cell, tokens): the mean over tasks of one declared higher-is-better score per
    task (LM_EVAL_PREFERENCE, else the first by name), for cells that have every such task; stderr combined as
    √(Σ stderr²)/k when every task has one. Empty when no lm-eval score declares its direction."""
    scores = metrics.filter(pl.col("name").str.starts_with("lm_eval/") & pl.col("higher_is_better").eq(True)
                            & pl.col("value").is_finite())
    if scores.height == 0:
        return pl.DataFrame(schema=METRIC_COLUMNS)
    parts = scores.with_columns(
        task=pl.col("name").str.extract(r"^lm_eval/(.+)/[^/]+$"),
        score=pl.col("name").str.extract(r"^lm_eval/.+/([^/]+)$"),
    ).drop_nulls("task")
    chosen = {}
    for task, names in parts.group_by("task").agg(pl.col("score").unique().sort()).iter_rows():
        chosen[task] = next((p for p in LM_EVAL_PREFERENCE if p in names), names[0])
    picked = parts.join(pl.DataFrame({"task": list(chosen), "score": list(chosen.values())}), on=["task", "score"])
    average = (
        picked.group_by(["cell_id", "tokens"])
        .agg(value=pl.col("value").mean(), tasks=pl.col("task").n_unique(),
             stderr=(pl.col("stderr") ** 2).sum().sqrt() / pl.len(), stderr_missing=pl.col("stderr").null_count())
        .filter(pl.col("tasks") == len(chosen))
        .with_columns(stderr=pl.when(pl.col("stderr_missing") == 0).then(pl.col("stderr")))
    )
    return average.select(
        "cell_id", "tokens", pl.lit(LM_EVAL_AVERAGE).alias("name"), "value", "stderr",
        pl.lit(True).alias("higher_is_better"),
    ).cast(METRIC_COLUMNS).sort(["cell_id", "tokens"])


def lm_eval_average_tasks(metrics: pl.DataFrame) -> list[str]:
    """The `lm_eval/<task>/<score>` names the average is taken over (for the report's description)."""
    scores = metrics.filter(pl.col("name").str.starts_with("lm_eval/") & pl.col("higher_is_better").eq(True))
    by_task: dict[str, list[str]] = {}
    for name in sorted(scores["name"].unique().to_list()):
        task, _, score = name[len("lm_eval/"):].rpartition("/")
        if task:
            by_task.setdefault(task, []).append(score)
    return [f"lm_eval/{task}/{next((p for p in LM_EVAL_PREFERENCE if p in s), s[0])}" for task, s in by_task.items()]


def headline_values(cells: pl.DataFrame, metrics: pl.DataFrame, metric: str) -> pl.DataFrame:
    """One row per finished cell that has `metric`: the cell's columns plus `value` (the metric at its last tokens).
    Budget-0 cells (reference points) are included; callers split them off."""
    last = (
        metrics.filter(pl.col("name") == metric)
        .sort("tokens", nulls_last=False)
        .group_by("cell_id", maintain_order=True)
        .agg(pl.col("value").last())
    )
    return cells.filter(pl.col("status") == "done").join(last, on="cell_id", how="inner").filter(
        pl.col("value").is_finite()
    )


def training_curves(cells: pl.DataFrame, metrics: pl.DataFrame, name: str = "train_loss") -> pl.DataFrame:
    """Seed-mean `name` against tokens for each group's largest finished budget."""
    curve_points = metrics.filter(pl.col("name") == name).select(["cell_id", "tokens", "value"])
    done = cells.filter((pl.col("status") == "done") & (pl.col("budget_tokens") > 0))
    keys = ["granularity", "method", "ratio", "init", "setting"]
    largest = done.group_by(keys).agg(pl.col("budget_tokens").max())
    chosen = done.join(largest, on=[*keys, "budget_tokens"])
    return (
        chosen.join(curve_points, on="cell_id")
        .group_by([*keys, "budget_tokens", "tokens"])
        .agg(pl.col("value").mean())
        .sort([*keys, "tokens"])
    )


def document_losses(db, metric: str | None = "val_loss") -> pl.DataFrame:
    """Each finished cell's held-out losses per document (`document_losses` joined to `cells` by the cell's
    eval_stage: the evaluation its headline numbers come from), for one metric (None: every metric): cell_id,
    eval_stage, metric, document, tokens, loss_sum, windows, sampled. ``db``: a results database's path or an open
    DuckDB connection. A database written before the table existed gives an empty frame.

    Feed two arms' rows (e.g. a cell group's pruned and random seeds, one metric) to
    gridlab.measure.paired_gap / paired_gap_stderr for the gap's document-sampling stderr."""
    if isinstance(db, (str, Path)):
        from gridlab.db import connect_read_only

        with connect_read_only(Path(db)) as con:
            return document_losses(con, metric)
    tables = {row[0] for row in db.execute("select table_name from information_schema.tables").fetchall()}
    if "document_losses" not in tables:
        return pl.DataFrame(schema=DOCUMENT_LOSS_COLUMNS)
    where = "" if metric is None else "where d.metric = ?"
    frame = db.sql(
        "select c.cell_id, d.eval_stage, d.metric, d.document, d.tokens, d.loss_sum, d.windows, d.sampled "
        f"from document_losses d join cells c on c.eval_stage = d.eval_stage {where} "
        "order by c.cell_id, d.metric, d.document", params=None if metric is None else [metric]).pl()
    return frame.cast(DOCUMENT_LOSS_COLUMNS) if frame.height else pl.DataFrame(schema=DOCUMENT_LOSS_COLUMNS)
