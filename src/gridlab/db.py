"""The results database, ``runs/<grid>/results.duckdb``: its schema, and ingest from the run's files.

Only the submitting / ingesting process writes it (workers never import this module); readers are status, the
report, and users with the DuckDB CLI or polars. Ingest rebuilds every table from plan.json and the stage result
files in one transaction, so the same files always give the same rows. Every metric — a training curve point, a
held-out loss, an lm-eval score — arrives as a gridlab.contracts.Metric and is read in one loop.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

import gridlab
from gridlab import atomic
from gridlab.contracts import (
    BranchResult,
    Contract,
    EvalPayload,
    InitPayload,
    Metric,
    ParentPayload,
    PrunePayload,
    TrainPayload,
)
from gridlab.errors import UserError
from gridlab.layout import RunPaths
from gridlab.planfile import read_plan_record
from gridlab.provenance import PROVENANCE_COLUMNS
from gridlab.results import CorruptResult, load_result
from gridlab.state import StageState, effective_states

SCHEMA = {
    "grid": [("name", "VARCHAR"), ("parent", "VARCHAR"), ("parent_tokens", "BIGINT"),
             ("calibration_tokens", "BIGINT"), ("corpus_fingerprint", "VARCHAR"), ("gridlab_version", "VARCHAR"),
             ("spec_json", "VARCHAR"), ("submitted_at", "DOUBLE"), ("parent_params", "BIGINT")],
    "cells": [("cell_id", "VARCHAR"), ("method", "VARCHAR"), ("granularity", "VARCHAR"), ("ratio", "DOUBLE"),
              ("achieved_ratio", "DOUBLE"), ("init", "VARCHAR"), ("setting", "INTEGER"),
              ("budget_tokens", "BIGINT"), ("trained_tokens", "BIGINT"), ("seed", "INTEGER"), ("status", "VARCHAR"),
              ("error", "VARCHAR"), ("train_stage", "VARCHAR"), ("branch_path", "VARCHAR"),
              ("prune_stage", "VARCHAR"), ("model_stage", "VARCHAR"), ("eval_stage", "VARCHAR"),
              # Non-zero parameters of the model the cell trains (sparse: the mask's zeros not counted).
              ("params", "BIGINT"),
              # The peak learning rate of the cell's arm (a sweep: one cell per lr; NULL from a plan before it).
              ("lr", "DOUBLE")],
    "metrics": [("cell_id", "VARCHAR"), ("tokens", "BIGINT"), ("name", "VARCHAR"), ("value", "DOUBLE"),
                ("stderr", "DOUBLE"), ("higher_is_better", "BOOLEAN")],
    # The parent's own measurements (its validation loss after P tokens …), beside the cells it is pruned into.
    "parent_metrics": [("tokens", "BIGINT"), ("name", "VARCHAR"), ("value", "DOUBLE"), ("stderr", "DOUBLE"),
                       ("higher_is_better", "BOOLEAN")],
    # Each finished eval stage's held-out losses per document (its document_losses.parquet, gridlab.measure): what
    # a paired gap's document-sampling stderr is computed from (gridlab.measure.paired_gap).
    "document_losses": [("eval_stage", "VARCHAR"), ("metric", "VARCHAR"), ("document", "UBIGINT"),
                        ("tokens", "DOUBLE"), ("loss_sum", "DOUBLE"), ("windows", "BIGINT"), ("sampled", "BIGINT")],
    # One row per planned stage; a finished stage also says what it ran on (its result's provenance).
    "stages": [("stage_id", "VARCHAR"), ("kind", "VARCHAR"), ("status", "VARCHAR"), ("job_id", "VARCHAR"),
               ("attempts", "INTEGER"), ("started", "DOUBLE"), ("finished", "DOUBLE"), ("log_path", "VARCHAR"),
               ("error", "VARCHAR"), *[(name, kind) for name, kind in PROVENANCE_COLUMNS]],
    # An adaptive study (gridlab.rounds: runs/<grid>/adaptive.json): its design and where it stands (one row, none
    # for a fixed grid), each round (what it added and why, what it cost, the verdicts that decided it), each cell
    # a round added (both arms: one row per method × ratio × setting × budget × seed).
    "adaptive": [("first_seeds", "INTEGER"), ("max_seeds", "INTEGER"), ("spending", "VARCHAR"), ("alpha", "DOUBLE"),
                 ("margin", "DOUBLE"), ("metric", "VARCHAR"), ("rounds", "INTEGER"), ("tokens", "BIGINT"),
                 ("gpu_hours", "DOUBLE"), ("stopped", "VARCHAR"), ("stop_line", "VARCHAR"),
                 ("grid_tokens", "BIGINT"), ("fixed_tokens", "BIGINT")],
    "adaptive_rounds": [("round", "INTEGER"), ("looked_at", "DOUBLE"), ("seeds_added", "INTEGER"),
                        ("budgets_added", "INTEGER"), ("cells_added", "INTEGER"), ("tokens", "BIGINT"),
                        ("gpu_hours", "DOUBLE"), ("open", "INTEGER"), ("prune", "INTEGER"), ("scratch", "INTEGER"),
                        ("equivalent", "INTEGER"), ("inconclusive", "INTEGER"), ("why", "VARCHAR")],
    "adaptive_additions": [("round", "INTEGER"), ("kind", "VARCHAR"), ("method", "VARCHAR"), ("ratio", "DOUBLE"),
                           ("setting", "INTEGER"), ("budget_tokens", "BIGINT"), ("seed", "INTEGER"),
                           ("why", "VARCHAR")],
}

# Views over the tables, for the report and for users: each distinct environment the results came from (software
# and GPU; hosts are counted, not told apart).
_ENVIRONMENT_COLUMNS = ", ".join(name for name, _ in PROVENANCE_COLUMNS if name not in ("host", "slurm_job_id"))
VIEWS = {
    "environments": f"""
        SELECT {_ENVIRONMENT_COLUMNS}, count(*) AS stages, count(DISTINCT host) AS hosts,
               list(DISTINCT kind ORDER BY kind) AS kinds, min(finished) AS first_finished,
               max(finished) AS last_finished
        FROM stages WHERE status = 'done'
        GROUP BY ALL ORDER BY first_finished""",
}

_METRIC_FIELDS = ("tokens", "name", "value", "stderr", "higher_is_better")


class _Table:
    """Column lists for one table, filled row by row and handed to DuckDB as one polars frame."""

    def __init__(self, name: str):
        self.name = name
        self.columns: dict[str, list] = {column: [] for column, _ in SCHEMA[name]}

    def add(self, **row: Any) -> None:
        for column, values in self.columns.items():
            values.append(row.get(column))

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


@dataclass(frozen=True)
class _FrameTable:
    """A table whose rows arrive as one polars frame (read from files), in SCHEMA's column order."""

    name: str
    frame: Any

    def __len__(self) -> int:
        return self.frame.height


def document_loss_rows(paths: RunPaths, payloads: dict[str, Contract]) -> _FrameTable:
    """The document_losses table: every finished eval stage's document_losses.parquet (found by the run's layout,
    so a moved run folder still finds them), with its stage id. A stage written before eval version 2 has none; a
    file gone from its folder gives no rows (its cells then have no per-document losses), never a failed ingest."""
    import polars as pl

    from gridlab.measure import DOCUMENT_LOSS_SCHEMA

    columns = [name for name, _ in SCHEMA["document_losses"]]
    frames = [pl.scan_parquet(paths.stage(stage_id).document_losses).with_columns(eval_stage=pl.lit(stage_id))
              for stage_id, payload in payloads.items()
              if isinstance(payload, EvalPayload) and payload.document_losses is not None
              and paths.stage(stage_id).document_losses.exists()]
    if not frames:
        return _FrameTable("document_losses", pl.DataFrame(schema={"eval_stage": pl.String, **DOCUMENT_LOSS_SCHEMA})
                           .select(columns))
    return _FrameTable("document_losses", pl.concat(frames).select(columns).collect())


def ingest(run_dir: Path, states: dict[str, StageState]) -> dict[str, int]:
    """Rebuild results.duckdb from plan.json and the stage folders. ``states``: gridlab.state.stage_states of every
    planned stage (verified, so a corrupt result is already failed). Returns row counts."""
    paths = RunPaths(run_dir)
    record = read_plan_record(run_dir)
    payloads: dict[str, Contract] = {}
    status_of: dict[str, str] = {}
    error_of: dict[str, str | None] = {}
    stages = _Table("stages")
    for stage in record.stages:
        state = states[stage.id]
        status, error = state.status, state.error
        row = {"job_id": state.job_id, "attempts": state.attempts, "started": state.started}
        if status == "done":
            try:
                result = load_result(paths.stage(stage.id))
                payloads[stage.id] = result.payload
                row = {"job_id": result.job_id, "attempts": result.attempts, "started": result.started,
                       "finished": result.finished, **provenance_row(result.provenance)}
            except (FileNotFoundError, CorruptResult) as problem:
                status, error = "failed", f"corrupt result: {problem}"
        status_of[stage.id], error_of[stage.id] = status, error
        stages.add(stage_id=stage.id, kind=stage.kind, status=status, log_path=state.log_path, error=error, **row)
    effective, culprit = effective_states(record.stages, status_of)

    cells, metrics = _Table("cells"), _Table("metrics")
    for cell in record.cells:
        blamed = culprit.get(cell.eval_stage)
        prune = payloads.get(cell.prune_stage)
        train = payloads.get(cell.train_stage) if cell.train_stage else None
        branch: BranchResult | None = train.branch(cell.trained_tokens) if isinstance(train, TrainPayload) else None
        cells.add(**{**cell.model_dump(), "status": effective[cell.eval_stage],
                     "error": f"{blamed}: {error_of[blamed] or status_of[blamed]}" if blamed else None,
                     "achieved_ratio": getattr(prune, "achieved_ratio", None),
                     "trained_tokens": branch.trained_tokens if branch else cell.trained_tokens,
                     "branch_path": branch.path if branch else None,
                     "params": _nonzero_params(payloads.get(cell.model_stage), prune)})
        sources = [cell.start_eval_stage] + ([cell.eval_stage] if cell.eval_stage != cell.start_eval_stage else [])
        measured: list[list[Metric]] = [branch.metrics] if branch else []
        measured += [payloads[s].metrics for s in sources if s in payloads]
        for series in measured:
            for metric in series:
                metrics.add(cell_id=cell.cell_id, **metric.model_dump(include=set(_METRIC_FIELDS)))

    parent_metrics = _Table("parent_metrics")
    if record.parent_eval in payloads:
        for metric in payloads[record.parent_eval].metrics:
            parent_metrics.add(**metric.model_dump(include=set(_METRIC_FIELDS)))

    grid = record.grid
    parent = grid["parent"]
    data = payloads.get(record.data_stage)
    parent_payload = payloads.get(record.parent_stage)
    summary = _Table("grid")
    summary.add(name=grid["name"], parent=parent["preset"] or parent["path"], parent_tokens=parent["tokens"],
                parent_params=parent_payload.params.total if isinstance(parent_payload, ParentPayload) else None,
                calibration_tokens=grid["calibration"]["sequences"] * grid["seq_len"],
                corpus_fingerprint=getattr(data, "corpus_fingerprint", None), gridlab_version=gridlab.__version__,
                spec_json=json.dumps(grid, sort_keys=True), submitted_at=record.submitted_at)
    documents = document_loss_rows(paths, payloads)
    tables = [summary, cells, metrics, parent_metrics, stages, documents, *adaptive_tables(run_dir)]
    write_tables(paths.database, tables)
    return {"cells": len(cells), "metrics": len(metrics), "stages": len(stages), "results": len(payloads),
            "document_losses": len(documents)}


def adaptive_tables(run_dir: Path) -> list[_Table]:
    """The tables adaptive, adaptive_rounds and adaptive_additions from the run's record (empty for a fixed grid)."""
    from gridlab.rounds import additions, read_record

    record = read_record(run_dir)
    study, rounds, added = _Table("adaptive"), _Table("adaptive_rounds"), _Table("adaptive_additions")
    if record.design is not None:
        stop = record.stopped
        study.add(first_seeds=record.design.first, max_seeds=record.design.last, spending=record.design.spending,
                  alpha=record.design.alpha, margin=record.design.margin, metric=record.design.metric,
                  rounds=len(record.rounds), tokens=record.tokens, gpu_hours=record.gpu_hours,
                  stopped=stop.reason if stop else None, stop_line=stop.line if stop else None,
                  grid_tokens=stop.grid_tokens if stop else None, fixed_tokens=stop.fixed_tokens if stop else None)
    for entry in record.rounds:
        rounds.add(round=entry.round, looked_at=entry.looked_at, seeds_added=len(entry.seeds),
                   budgets_added=len(entry.budgets), cells_added=entry.cells, tokens=entry.tokens,
                   gpu_hours=entry.gpu_hours, open=entry.open, why=entry.summary,
                   **{verdict: entry.verdicts.get(verdict, 0)
                      for verdict in ("prune", "scratch", "equivalent", "inconclusive")})
    for row in additions(record):
        added.add(**row)
    return [study, rounds, added]


def _nonzero_params(model: Contract | None, prune: Contract | None) -> int | None:
    """Parameters of a cell's model (its prune or init payload's count); for a sparse model the zeros its mask sets
    (achieved_ratio × decoder weights, the same mask for both inits) are not counted. None until the model exists."""
    if not isinstance(model, PrunePayload | InitPayload):
        return None
    zeros = 0
    if isinstance(prune, PrunePayload) and prune.granularity == "sparse":
        zeros = round(prune.achieved_ratio * model.params.decoder)
    return model.params.total - zeros


def provenance_row(provenance: dict[str, Any] | None) -> dict[str, Any]:
    """A result's provenance (gridlab.provenance.collect) as the stages table's columns."""
    provenance = provenance or {}
    return {name: provenance.get(name) for name, _ in PROVENANCE_COLUMNS}


def write_tables(database: Path, tables: list[_Table | _FrameTable]) -> None:
    """Write a new database file with every table and view, beside the old one, and swap it in (os.replace).

    Nobody ever opens ``database`` for writing, so readers (report, export, a user's DuckDB CLI, another ingest)
    and writers never wait on each other's file lock: a reader keeps the file it opened, a writer builds its own,
    and the last swap wins whole. Rows go in as polars frames (bulk, no per-row inserts)."""
    polars_type = {"VARCHAR": pl.String, "BIGINT": pl.Int64, "INTEGER": pl.Int32, "DOUBLE": pl.Float64,
                   "BOOLEAN": pl.Boolean}
    with atomic.staged_file(database) as staging:
        connection = duckdb.connect(str(staging))
        try:
            for table in tables:
                schema = SCHEMA[table.name]
                connection.execute(f"CREATE TABLE {table.name} ("
                                   + ", ".join(f"{name} {kind}" for name, kind in schema) + ")")
                frame = table.frame if isinstance(table, _FrameTable) else pl.DataFrame(
                    table.columns, schema={name: polars_type[kind] for name, kind in schema}, strict=False)
                connection.register("frame", frame)
                connection.execute(f"INSERT INTO {table.name} SELECT * FROM frame")
                connection.unregister("frame")
            for name, query in VIEWS.items():
                connection.execute(f"CREATE VIEW {name} AS {query}")
            connection.execute("CHECKPOINT")
        finally:
            connection.close()


def connect_read_only(database: Path, retry_s: float = 10.0):
    """Open results.duckdb read-only for a reader (report, export). A user holding it open for writing (the DuckDB
    CLI without -readonly) locks readers out: retry for ``retry_s`` seconds, then a UserError saying who holds it."""
    database = Path(database)
    if not database.exists():
        raise UserError(f"{database}: no results database; run `gridlab ingest` (or `gridlab submit`) first")
    deadline = time.time() + retry_s
    while True:
        try:
            return duckdb.connect(str(database), read_only=True)
        except duckdb.IOException as error:
            if "lock" not in str(error).lower():
                raise
            if time.time() >= deadline:
                holder = re.search(r"PID (\d+)", str(error))
                who = f" (pid {holder.group(1)})" if holder else ""
                raise UserError(f"{database} is open for writing by another process{who}; close it there (or open "
                                f"it with `duckdb -readonly`) and try again") from None
            time.sleep(0.2)
