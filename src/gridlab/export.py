"""`gridlab export` and sub-grid databases: the cells with their metrics as CSV, Parquet or JSON (DuckDB's COPY),
and a copy of results.duckdb restricted to some cells (what `gridlab report --where` renders).

Both read results.duckdb read-only (gridlab.db.connect_read_only) and write their output whole or not at all
(gridlab.atomic.staged_file).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from gridlab import atomic
from gridlab.db import SCHEMA, VIEWS, connect_read_only
from gridlab.errors import UserError

FORMATS = {"csv": "(FORMAT csv, HEADER true)", "parquet": "(FORMAT parquet)", "json": "(FORMAT json, ARRAY true)"}

# One row per (cell, metric measurement); a cell without metrics yet (pending, failed) is one row of NULL metrics.
_CELLS_WITH_METRICS = """
    SELECT c.*, m.tokens AS metric_tokens, m.name AS metric, m.value, m.stderr, m.higher_is_better
    FROM cells c LEFT JOIN metrics m USING (cell_id)
    {where}
    ORDER BY c.method, c.ratio, c.init, c.setting, c.budget_tokens, c.seed, c.cell_id, m.name, m.tokens"""


def _chosen(connection, cell_ids: list[str] | None) -> str:
    if cell_ids is None:
        return ""
    connection.register("chosen_cells", pl.DataFrame({"cell_id": list(cell_ids)}, schema={"cell_id": pl.String}))
    return "WHERE cell_id IN (SELECT cell_id FROM chosen_cells)"


def export(database: Path, out: Path, fmt: str = "csv", cell_ids: list[str] | None = None) -> dict[str, int | str]:
    """Write the cells (all, or ``cell_ids``) joined with their metrics to ``out``; {"path", "rows", "cells"}."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    out = Path(out)
    connection = connect_read_only(database)
    try:
        query = _CELLS_WITH_METRICS.format(where=_chosen(connection, cell_ids))
        rows, cells = connection.execute(f"SELECT count(*), count(DISTINCT cell_id) FROM ({query})").fetchone()
        with atomic.staged_file(out) as staging:
            path = str(staging).replace("'", "''")
            connection.execute(f"COPY ({query}) TO '{path}' {FORMATS[fmt]}")
    finally:
        connection.close()
    return {"path": str(out), "rows": rows, "cells": cells}


def subset_database(database: Path, target: Path, cell_ids: list[str], stage_ids: list[str] | None = None) -> Path:
    """A copy of ``database`` holding only these cells (and their metrics; ``stage_ids``: and these stages), the
    other tables whole and the views rebuilt — what a report of a sub-grid reads."""
    source = connect_read_only(database)
    source.close()   # only to wait out a writer holding the file, with the same message
    with atomic.staged_file(target) as staging:
        connection = duckdb.connect(str(staging))
        try:
            quoted = str(database).replace("'", "''")
            connection.execute(f"ATTACH '{quoted}' AS source (READ_ONLY)")
            connection.register("chosen_cells", pl.DataFrame({"cell_id": cell_ids}, schema={"cell_id": pl.String}))
            connection.register("chosen_stages", pl.DataFrame({"stage_id": stage_ids or []},
                                                              schema={"stage_id": pl.String}))
            for table, columns in SCHEMA.items():
                names = {name for name, _ in columns}
                where = ""
                if "cell_id" in names:
                    where = "WHERE cell_id IN (SELECT cell_id FROM chosen_cells)"
                elif table == "stages" and stage_ids is not None:
                    where = "WHERE stage_id IN (SELECT stage_id FROM chosen_stages)"
                connection.execute(f"CREATE TABLE {table} AS SELECT * FROM source.{table} {where}")
            for name, query in VIEWS.items():
                connection.execute(f"CREATE VIEW {name} AS {query}")
            connection.execute("DETACH source")
            connection.execute("CHECKPOINT")
        finally:
            connection.close()
    return Path(target)
