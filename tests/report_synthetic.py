"""Synthetic results databases that follow docs/architecture.md's DuckDB schema exactly, with known answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

SCHEMA = """
create table grid (name varchar, parent varchar, parent_tokens bigint, calibration_tokens bigint,
                   corpus_fingerprint varchar, gridlab_version varchar, spec_json varchar, submitted_at timestamp);
create table cells (cell_id varchar primary key, method varchar, granularity varchar, ratio double,
                    achieved_ratio double, init varchar, setting integer, budget_tokens bigint, trained_tokens bigint,
                    seed integer, status varchar, error varchar, train_stage varchar, branch_path varchar);
create table metrics (cell_id varchar, tokens bigint, name varchar, value double, stderr double);
create table stages (stage_id varchar, kind varchar, status varchar, job_id varchar, attempts integer,
                     started timestamp, finished timestamp, log_path varchar, error varchar);
"""

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
                                train_stage=f"train-{method}-{ratio}-{init}-{setting if init == 'random' else 0}-{seed}",
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


def write_db(path: Path, cells: list[dict], metrics: list[dict] | pl.DataFrame, *, name: str = "synthetic", parent: str = "nano",
             parent_tokens: int = 50_000_000, calibration_tokens: int = 65_536, spec: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as con:
        con.execute(SCHEMA)
        con.execute(
            "insert into grid values (?, ?, ?, ?, ?, ?, ?, now())",
            [name, parent, parent_tokens, calibration_tokens, "sha256:0123abcd", "0.1.0", json.dumps(spec or {})],
        )
        if cells:
            cell_frame = pl.DataFrame(cells, schema={
                "cell_id": pl.Utf8, "method": pl.Utf8, "granularity": pl.Utf8, "ratio": pl.Float64,
                "achieved_ratio": pl.Float64, "init": pl.Utf8, "setting": pl.Int32, "budget_tokens": pl.Int64,
                "trained_tokens": pl.Int64, "seed": pl.Int32, "status": pl.Utf8, "error": pl.Utf8,
                "train_stage": pl.Utf8, "branch_path": pl.Utf8})
            con.register("cell_frame", cell_frame)
            con.execute("insert into cells select * from cell_frame")
        if len(metrics):
            metric_frame = pl.DataFrame(metrics, schema={
                "cell_id": pl.Utf8, "tokens": pl.Int64, "name": pl.Utf8, "value": pl.Float64, "stderr": pl.Float64})
            con.register("metric_frame", metric_frame)
            con.execute("insert into metrics select * from metric_frame")
    return path
