"""Synthetic results databases in the store's exact schema (docs/architecture.md), with known answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from gridlab.db import SCHEMA as STORE_SCHEMA

# The runner's own table definitions, so these databases follow the schema exactly as the store writes it.
SCHEMA = {table: dict(columns) for table, columns in STORE_SCHEMA.items()}

_POLARS = {"VARCHAR": pl.Utf8, "BIGINT": pl.Int64, "INTEGER": pl.Int32, "DOUBLE": pl.Float64, "BOOLEAN": pl.Boolean}

GRANULARITY = {"shortgpt": "depth", "minitron-depth": "depth", "minitron-width": "width", "llm-pruner": "width",
               "wanda": "sparse", "sparsegpt": "sparse"}

# metric value of one cell: (method, ratio, init, setting, trained tokens, seed) -> value
LossFunction = Callable[[str, float, str, int, int, int], float]


def power_law(e: float, a: float, alpha: float, reference: float = 1e6) -> Callable[[float], float]:
    return lambda tokens: e + a * (tokens / reference) ** (-alpha)


def build_cells(methods: list[str], ratios: list[float], budgets: list[int], seeds: list[int], parent_tokens: int,
                granularity: dict[str, str] | None = None, references: bool = False) -> list[dict]:
    """Every cell of the grid, all pending: pruned cells once per setting, random cells per setting. With
    `references`, also the budget-0 cells: pruned right after pruning, random at init (setting 1) and the random
    trajectory at exactly P tokens (setting 2). Random cells of methods of one granularity share a train stage (the
    same architecture), as the planner shares them."""
    granularity = {**GRANULARITY, **(granularity or {})}
    cells = []
    for method in methods:
        for ratio in ratios:
            for setting in (1, 2):
                for init in ("pruned", "random"):
                    for budget in ([0] if references else []) + list(budgets):
                        for seed in seeds:
                            trained = budget + (parent_tokens if (init, setting) == ("random", 2) else 0)
                            family = granularity.get(method, "depth")
                            stage = (f"train-{method}-{ratio}-pruned-{seed}" if init == "pruned"
                                     else f"train-{family}-{ratio}-random-{seed}")
                            cells.append(dict(
                                cell_id=f"{method}-{ratio}-{init}-s{setting}-{budget}-{seed}", method=method,
                                granularity=family, ratio=ratio, achieved_ratio=ratio,
                                init=init, setting=setting, budget_tokens=budget, trained_tokens=trained, seed=seed,
                                status="pending", error=None, train_stage=stage, branch_path=None,
                            ))
    return cells


def finish(cells: list[dict], loss: LossFunction, metric: str = "val_loss", curve_points: int = 8,
           done: Callable[[dict], bool] = lambda cell: True, higher_is_better: bool | None = False) -> list[dict]:
    """Mark cells done (those `done` selects) and produce their metrics, with a train_loss curve per trained cell.
    `higher_is_better` is what the metric declares (the metrics table's column)."""
    rows = []
    for cell in cells:
        if not done(cell):
            continue
        cell["status"] = "done"
        cell["branch_path"] = f"runs/x/trajectories/{cell['train_stage']}/branches/{cell['trained_tokens']}"
        trained = cell["trained_tokens"]
        value = loss(cell["method"], cell["ratio"], cell["init"], cell["setting"], trained, cell["seed"])
        rows.append(dict(cell_id=cell["cell_id"], tokens=trained, name=metric, value=value, stderr=None,
                         higher_is_better=higher_is_better))
        if metric != "val_loss":
            rows.append(dict(cell_id=cell["cell_id"], tokens=trained, name="val_loss", value=value, stderr=None,
                             higher_is_better=False))
        if trained == 0:
            continue
        for tokens in np.linspace(trained / curve_points, trained, curve_points).astype(int):
            rows.append(dict(cell_id=cell["cell_id"], tokens=int(tokens), name="train_loss",
                             value=value + 2.0 / (1 + tokens / 1e6), stderr=None, higher_is_better=False))
            rows.append(dict(cell_id=cell["cell_id"], tokens=int(tokens), name="lr", value=1e-3, stderr=None,
                             higher_is_better=None))
    return rows


def _frame(rows: list[dict] | pl.DataFrame, columns: dict[str, str]) -> pl.DataFrame:
    """Rows in the table's column order and types; columns a row does not name are null."""
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(
        [{c: row.get(c) for c in columns} for row in rows], schema={c: _POLARS[t] for c, t in columns.items()})
    return frame.with_columns(*(pl.lit(None, dtype=_POLARS[t]).alias(c) for c, t in columns.items()
                                if c not in frame.columns)).select(list(columns))


def write_db(path: Path, cells: list[dict], metrics: list[dict] | pl.DataFrame, *, name: str = "synthetic",
             parent: str = "nano", parent_tokens: int = 50_000_000, calibration_tokens: int = 65_536,
             spec: dict | None = None, parent_metrics: list[dict] | None = None) -> Path:
    """A results database; `parent_metrics=None` leaves the parent_metrics table out (a database written before it
    existed), [] creates it empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = dict(name=name, parent=parent, parent_tokens=parent_tokens, calibration_tokens=calibration_tokens,
                corpus_fingerprint="sha256:0123abcd", gridlab_version="0.1.0", spec_json=json.dumps(spec or {}),
                submitted_at=1_764_000_000.0)
    tables = [("grid", [grid]), ("cells", cells), ("metrics", metrics), ("stages", [])]
    if parent_metrics is not None:
        tables.append(("parent_metrics", parent_metrics))
    with duckdb.connect(str(path)) as con:
        for table, rows in tables:
            columns = SCHEMA[table]
            con.execute(f"create table {table} (" + ", ".join(f"{c} {t}" for c, t in columns.items()) + ")")
            if len(rows):
                con.register("frame", _frame(rows, columns))
                con.execute(f"insert into {table} select * from frame")
                con.unregister("frame")
    return path


def parent_loss(value: float, tokens: int, stderr: float | None = None) -> list[dict]:
    """parent_metrics rows: the parent's val_loss (and val_ppl) after its `tokens` pretraining tokens."""
    return [dict(tokens=tokens, name="val_loss", value=value, stderr=stderr, higher_is_better=False),
            dict(tokens=tokens, name="val_ppl", value=float(np.exp(value)), stderr=None, higher_is_better=False)]
