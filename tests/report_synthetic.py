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

_POLARS = {"VARCHAR": pl.Utf8, "BIGINT": pl.Int64, "INTEGER": pl.Int32, "DOUBLE": pl.Float64}

GRANULARITY = {"shortgpt": "depth", "minitron-depth": "depth", "minitron-width": "width", "llm-pruner": "width",
               "wanda": "sparse", "sparsegpt": "sparse"}

# metric value of one cell: (method, ratio, init, setting, trained tokens, seed) -> value
LossFunction = Callable[[str, float, str, int, int, int], float]


def power_law(e: float, a: float, alpha: float, reference: float = 1e6) -> Callable[[float], float]:
    return lambda tokens: e + a * (tokens / reference) ** (-alpha)


def build_cells(methods: list[str], ratios: list[float], budgets: list[int], seeds: list[int], parent_tokens: int,
                granularity: dict[str, str] | None = None) -> list[dict]:
    """Every cell of the grid, all pending: pruned cells once per setting, random cells per setting."""
    granularity = {**GRANULARITY, **(granularity or {})}
    cells = []
    for method in methods:
        for ratio in ratios:
            for setting in (1, 2):
                for init in ("pruned", "random"):
                    for budget in budgets:
                        for seed in seeds:
                            trained = budget + (parent_tokens if (init, setting) == ("random", 2) else 0)
                            cells.append(dict(
                                cell_id=f"{method}-{ratio}-{init}-s{setting}-{budget}-{seed}", method=method,
                                granularity=granularity.get(method, "depth"), ratio=ratio, achieved_ratio=ratio,
                                init=init, setting=setting, budget_tokens=budget, trained_tokens=trained, seed=seed,
                                status="pending", error=None,
                                train_stage=f"train-{method}-{ratio}-{init}-"
                                            f"{setting if init == 'random' else 0}-{seed}",
                                branch_path=None,
                            ))
    return cells


def finish(cells: list[dict], loss: LossFunction, metric: str = "val_loss", curve_points: int = 8,
           done: Callable[[dict], bool] = lambda cell: True) -> list[dict]:
    """Mark cells done (those `done` selects) and produce their metrics, with a train_loss curve per cell."""
    rows = []
    for cell in cells:
        if not done(cell):
            continue
        cell["status"] = "done"
        cell["branch_path"] = f"runs/x/stages/{cell['train_stage']}/branches/{cell['budget_tokens']}"
        trained = cell["trained_tokens"]
        value = loss(cell["method"], cell["ratio"], cell["init"], cell["setting"], trained, cell["seed"])
        rows.append(dict(cell_id=cell["cell_id"], tokens=trained, name=metric, value=value, stderr=None))
        if metric != "val_loss":
            rows.append(dict(cell_id=cell["cell_id"], tokens=trained, name="val_loss", value=value, stderr=None))
        for tokens in np.linspace(trained / curve_points, trained, curve_points).astype(int):
            rows.append(dict(cell_id=cell["cell_id"], tokens=int(tokens), name="train_loss",
                             value=value + 2.0 / (1 + tokens / 1e6), stderr=None))
    return rows


def _frame(rows: list[dict] | pl.DataFrame, columns: dict[str, str]) -> pl.DataFrame:
    """Rows in the table's column order and types; columns a row does not name are null."""
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(
        [{c: row.get(c) for c in columns} for row in rows], schema={c: _POLARS[t] for c, t in columns.items()})
    return frame.with_columns(*(pl.lit(None, dtype=_POLARS[t]).alias(c) for c, t in columns.items()
                                if c not in frame.columns)).select(list(columns))


def write_db(path: Path, cells: list[dict], metrics: list[dict] | pl.DataFrame, *, name: str = "synthetic",
             parent: str = "nano", parent_tokens: int = 50_000_000, calibration_tokens: int = 65_536,
             spec: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = dict(name=name, parent=parent, parent_tokens=parent_tokens, calibration_tokens=calibration_tokens,
                corpus_fingerprint="sha256:0123abcd", gridlab_version="0.1.0", spec_json=json.dumps(spec or {}),
                submitted_at=1_764_000_000.0)
    with duckdb.connect(str(path)) as con:
        for table, rows in (("grid", [grid]), ("cells", cells), ("metrics", metrics), ("stages", [])):
            columns = SCHEMA[table]
            con.execute(f"create table {table} (" + ", ".join(f"{c} {t}" for c, t in columns.items()) + ")")
            if len(rows):
                con.register("frame", _frame(rows, columns))
                con.execute(f"insert into {table} select * from frame")
                con.unregister("frame")
    return path
