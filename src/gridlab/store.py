"""Files under runs/<grid>/ and their ingest into runs/<grid>/results.duckdb.

Layout (every file written atomically: temp file + os.replace):
    plan.json                       the planned stages and cells (written by `gridlab submit`)
    results.duckdb                  written only by the CLI (one writer); workers never open it
    stages/<id>/stage.json          the stage dict the worker runs
    stages/<id>/submit.json         executor, job id, log path, submission time (written by the submitter)
    stages/<id>/attempts.log        one line per worker start (appended)
    stages/<id>/stage.log           the worker's stdout/stderr
    stages/<id>/error.json          written when a worker fails: error line and traceback tail
    stages/<id>/result.json         written last by a finished worker: {stage_id, kind, finished, payload, checksum}
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

import gridlab

RESULT = "result.json"
ERROR = "error.json"
SUBMIT = "submit.json"
ATTEMPTS = "attempts.log"
LOG = "stage.log"
STAGE = "stage.json"
PLAN = "plan.json"
DATABASE = "results.duckdb"

SCHEMA = {
    "grid": [("name", "VARCHAR"), ("parent", "VARCHAR"), ("parent_tokens", "BIGINT"),
             ("calibration_tokens", "BIGINT"), ("corpus_fingerprint", "VARCHAR"), ("gridlab_version", "VARCHAR"),
             ("spec_json", "VARCHAR"), ("submitted_at", "DOUBLE")],
    "cells": [("cell_id", "VARCHAR"), ("method", "VARCHAR"), ("granularity", "VARCHAR"), ("ratio", "DOUBLE"),
              ("achieved_ratio", "DOUBLE"), ("init", "VARCHAR"), ("setting", "INTEGER"),
              ("budget_tokens", "BIGINT"), ("trained_tokens", "BIGINT"), ("seed", "INTEGER"), ("status", "VARCHAR"),
              ("error", "VARCHAR"), ("train_stage", "VARCHAR"), ("branch_path", "VARCHAR"),
              ("prune_stage", "VARCHAR"), ("model_stage", "VARCHAR"), ("eval_stage", "VARCHAR")],
    "metrics": [("cell_id", "VARCHAR"), ("tokens", "BIGINT"), ("name", "VARCHAR"), ("value", "DOUBLE"),
                ("stderr", "DOUBLE")],
    "stages": [("stage_id", "VARCHAR"), ("kind", "VARCHAR"), ("status", "VARCHAR"), ("job_id", "VARCHAR"),
               ("attempts", "INTEGER"), ("started", "DOUBLE"), ("finished", "DOUBLE"), ("log_path", "VARCHAR"),
               ("error", "VARCHAR")],
}

STATES = ("pending", "running", "done", "failed", "cancelled")


class CorruptResult(Exception):
    """A result.json that is not a complete, checksummed result of this stage."""


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _checksum(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_result(stage_dir: Path, stage: dict[str, Any], payload: dict[str, Any]) -> None:
    write_json_atomic(stage_dir / RESULT, {
        "stage_id": stage["id"], "kind": stage["kind"], "finished": time.time(),
        "gridlab_version": gridlab.__version__, "payload": payload, "checksum": _checksum(payload),
    })


def read_result(stage_dir: Path, stage_id: str) -> dict[str, Any]:
    """The result's full record; raises CorruptResult for a truncated, edited or foreign file."""
    try:
        record = json.loads((stage_dir / RESULT).read_bytes())
    except (OSError, ValueError) as error:
        raise CorruptResult(f"unreadable result.json: {error}") from None
    if not isinstance(record, dict) or not {"stage_id", "payload", "checksum", "finished"} <= record.keys():
        raise CorruptResult("result.json lacks stage_id/payload/checksum/finished")
    if record["stage_id"] != stage_id:
        raise CorruptResult(f"result.json belongs to stage {record['stage_id']}, not {stage_id}")
    if record["checksum"] != _checksum(record["payload"]):
        raise CorruptResult("result.json checksum does not match its payload")
    return record


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def write_plan(run_dir: Path, plan) -> None:
    write_json_atomic(run_dir / PLAN, {
        "grid": plan.spec.model_dump(mode="json"), "submitted_at": time.time(),
        "stages": list(plan.stages.values()), "cells": plan.cells,
    })


def read_plan(run_dir: Path) -> dict[str, Any]:
    plan = read_json(run_dir / PLAN)
    if plan is None:
        raise ValueError(f"{run_dir}: no plan.json; run `gridlab submit GRID` first")
    return plan


@dataclass
class StageFiles:
    """What the stage folder says about a stage, before asking any scheduler."""

    stage_id: str
    kind: str
    has_result: bool
    error: dict | None
    submit: dict | None
    attempts: int
    started: float | None
    log_path: str


def scan_stage(run_dir: Path, stage: dict[str, Any]) -> StageFiles:
    stage_dir = run_dir / "stages" / stage["id"]
    try:
        names = set(os.listdir(stage_dir))
    except FileNotFoundError:
        names = set()
    attempts, started = 0, None
    if ATTEMPTS in names:
        lines = (stage_dir / ATTEMPTS).read_text().split()
        attempts = len(lines)
        started = float(lines[0]) if lines else None
    return StageFiles(
        stage_id=stage["id"], kind=stage["kind"], has_result=RESULT in names,
        error=read_json(stage_dir / ERROR) if ERROR in names else None,
        submit=read_json(stage_dir / SUBMIT) if SUBMIT in names else None,
        attempts=attempts, started=started, log_path=str(stage_dir / LOG),
    )


def tail(path: str | Path, lines: int = 5) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            return handle.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def ingest(run_dir: Path, states: dict[str, dict[str, Any]] | None = None) -> dict[str, int]:
    """Rebuild results.duckdb from plan.json and the stage folders (idempotent: same files, same rows).

    ``states`` (stage id → {status, job_id, error}) comes from the executor's view (scheduler states); stages not in
    it are classified from their files alone. A corrupt result.json makes its stage failed and is not ingested.
    """
    run_dir = Path(run_dir)
    plan = read_plan(run_dir)
    states = states or {}
    records: dict[str, dict[str, Any]] = {}
    stage_rows = {name: [] for name, _ in SCHEMA["stages"]}
    for stage in plan["stages"]:
        files = scan_stage(run_dir, stage)
        view = states.get(stage["id"], {})
        status, error, finished = view.get("status"), view.get("error"), None
        if files.has_result:
            try:
                record = read_result(run_dir / "stages" / stage["id"], stage["id"])
                records[stage["id"]] = record["payload"]
                status, error, finished = "done", None, record["finished"]
            except CorruptResult as corrupt:
                status, error = "failed", str(corrupt)
        elif files.error is not None:
            status, error = "failed", files.error.get("error")
        status = status or ("running" if files.attempts and files.submit else "pending")
        for name, value in (("stage_id", stage["id"]), ("kind", stage["kind"]), ("status", status),
                            ("job_id", (files.submit or {}).get("job_id")), ("attempts", files.attempts),
                            ("started", files.started), ("finished", finished), ("log_path", files.log_path),
                            ("error", error)):
            stage_rows[name].append(value)
    stage_status = dict(zip(stage_rows["stage_id"], stage_rows["status"]))
    stage_error = dict(zip(stage_rows["stage_id"], stage_rows["error"]))
    stage_by_id = {stage["id"]: stage for stage in plan["stages"]}

    cell_rows = {name: [] for name, _ in SCHEMA["cells"]}
    metric_rows = {name: [] for name, _ in SCHEMA["metrics"]}
    for cell in plan["cells"]:
        chain = _upstream(stage_by_id, cell["eval_stage"])
        status, error = _cell_status(chain, stage_status, stage_error)
        prune = records.get(cell["prune_stage"], {})
        train = records.get(cell["train_stage"])
        evaluation = records.get(cell["eval_stage"])
        branch = _branch(train, cell["trained_tokens"]) if train else None
        row = {**cell, "status": status, "error": error,
               "achieved_ratio": prune.get("achieved_ratio"),
               "trained_tokens": branch["trained_tokens"] if branch else cell["trained_tokens"],
               "branch_path": branch["path"] if branch else None}
        for name, _ in SCHEMA["cells"]:
            cell_rows[name].append(row.get(name))
        start = records.get(cell["model_stage"])
        if start and "val_loss" in start:
            _add_metrics(metric_rows, cell["cell_id"], 0, [
                {"name": "val_loss", "value": start["val_loss"]}, {"name": "val_ppl", "value": start["val_ppl"]}])
        if branch:
            curve = branch["curve"]  # the trunk up to its fork, then its own tail
            count = len(curve)
            metric_rows["cell_id"].extend([cell["cell_id"]] * 2 * count)
            metric_rows["tokens"].extend([p["tokens"] for p in curve] * 2)
            metric_rows["name"].extend(["train_loss"] * count + ["lr"] * count)
            metric_rows["value"].extend([p["loss"] for p in curve] + [p["lr"] for p in curve])
            metric_rows["stderr"].extend([None] * 2 * count)
        if evaluation:
            for evaluated in evaluation["branches"]:
                if evaluated["budget_tokens"] == cell["trained_tokens"]:
                    _add_metrics(metric_rows, cell["cell_id"], evaluated["trained_tokens"], evaluated["metrics"])

    grid = plan["grid"]
    data_stage = next(s for s in plan["stages"] if s["kind"] == "data")
    parent = grid["parent"]
    grid_rows = {
        "name": [grid["name"]], "parent": [parent["preset"] or parent["path"]], "parent_tokens": [parent["tokens"]],
        "calibration_tokens": [grid["calibration"]["sequences"] * grid["seq_len"]],
        "corpus_fingerprint": [records.get(data_stage["id"], {}).get("corpus_fingerprint")],
        "gridlab_version": [gridlab.__version__], "spec_json": [json.dumps(grid, sort_keys=True)],
        "submitted_at": [plan.get("submitted_at")],
    }
    tables = {"grid": grid_rows, "cells": cell_rows, "metrics": metric_rows, "stages": stage_rows}
    _write_tables(run_dir / DATABASE, tables)
    counts = {"cells": len(cell_rows["cell_id"]), "metrics": len(metric_rows["cell_id"]),
              "stages": len(stage_rows["stage_id"]), "results": len(records)}
    return counts


def _write_tables(database: Path, tables: dict[str, dict[str, list]]) -> None:
    connection = duckdb.connect(str(database))
    try:
        connection.execute("BEGIN TRANSACTION")
        for table, columns in tables.items():
            schema = SCHEMA[table]
            connection.execute(f"CREATE TABLE IF NOT EXISTS {table} ("
                               + ", ".join(f"{name} {kind}" for name, kind in schema) + ")")
            connection.execute(f"DELETE FROM {table}")
            arrow = pa.table({name: pa.array(columns[name], type=_ARROW[kind]) for name, kind in schema})
            connection.register("incoming", arrow)
            connection.execute(f"INSERT INTO {table} SELECT * FROM incoming")
            connection.unregister("incoming")
        connection.execute("COMMIT")
    finally:
        connection.close()


_ARROW = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64()}


def _upstream(stage_by_id: dict[str, dict], stage_id: str) -> list[str]:
    chain, todo = [], [stage_id]
    while todo:
        current = todo.pop()
        if current not in chain:
            chain.append(current)
            todo.extend(stage_by_id[current]["deps"].values())
    return chain


def _cell_status(chain: list[str], status: dict[str, str], error: dict[str, str | None]) -> tuple[str, str | None]:
    """A failed or cancelled stage anywhere upstream makes the cell so; otherwise it is done when its eval stage is."""
    for state in ("failed", "cancelled"):
        for stage_id in chain:
            if status[stage_id] == state:
                return state, f"{stage_id}: {error[stage_id] or state}"
    if status[chain[0]] == "done":
        return "done", None
    if any(status[stage_id] == "running" for stage_id in chain):
        return "running", None
    return "pending", None


def _branch(train: dict[str, Any], budget: int) -> dict[str, Any] | None:
    return next((b for b in train["branches"] if b["budget_tokens"] == budget), None)


def _add_metrics(rows: dict[str, list], cell_id: str, tokens: int, metrics: list[dict]) -> None:
    for metric in metrics:
        rows["cell_id"].append(cell_id)
        rows["tokens"].append(tokens)
        rows["name"].append(metric["name"])
        rows["value"].append(metric["value"])
        rows["stderr"].append(metric.get("stderr"))
