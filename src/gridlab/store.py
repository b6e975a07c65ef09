"""Files under runs/<grid>/ and their ingest into runs/<grid>/results.duckdb.

Layout (every file written atomically: temp file + os.replace):
    plan.json                       the planned stages and cells (written by `gridlab submit`)
    index.json                      stage ids, kinds, deps and each cell's eval stage (what status reads)
    done/<id>                       an empty marker a worker leaves after its result.json (status lists this folder)
    results.duckdb                  written only by the CLI (one writer); workers never open it
    stages/<id>/stage.json          the stage dict the worker runs
    stages/<id>/submit.json         executor, job id, log path, submission time (written by the submitter)
    stages/<id>/attempts.log        one line per worker start (appended)
    stages/<id>/stage.log           the worker's stdout/stderr
    stages/<id>/error.json          written when a worker fails: error line and traceback tail
    stages/<id>/result.json         written last by a finished worker: {stage_id, kind, finished, job_id, attempts,
                                    started, checksum, payload}
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gridlab
from gridlab import atomic

RESULT = "result.json"
ERROR = "error.json"
SUBMIT = "submit.json"
ATTEMPTS = "attempts.log"
LOG = "stage.log"
STAGE = "stage.json"
PLAN = "plan.json"
INDEX = "index.json"
DONE = "done"
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
                ("stderr", "DOUBLE"), ("higher_is_better", "BOOLEAN")],
    # The parent's own measurements (its validation loss after P tokens …), beside the cells it is pruned into.
    "parent_metrics": [("tokens", "BIGINT"), ("name", "VARCHAR"), ("value", "DOUBLE"), ("stderr", "DOUBLE"),
                       ("higher_is_better", "BOOLEAN")],
    "stages": [("stage_id", "VARCHAR"), ("kind", "VARCHAR"), ("status", "VARCHAR"), ("job_id", "VARCHAR"),
               ("attempts", "INTEGER"), ("started", "DOUBLE"), ("finished", "DOUBLE"), ("log_path", "VARCHAR"),
               ("error", "VARCHAR")],
}

STATES = ("pending", "running", "done", "failed", "cancelled")
STAGE_KINDS = ("data", "parent", "prune", "init", "train", "eval")


class CorruptResult(Exception):
    """A result.json that is not a complete, checksummed result of this stage."""


def write_json_atomic(path: Path, data: Any) -> None:
    atomic.write_json(path, data)


def write_result(stage_dir: Path, stage: dict[str, Any], payload: dict[str, Any], **bookkeeping: Any) -> None:
    """Write result.json (atomically) and then the stage's done marker.

    The file is JSON whose last key is the payload; the checksum covers the payload's bytes exactly as written, so
    reading verifies it without serialising again. ``bookkeeping`` (job_id, attempts, started) goes in the header.
    """
    payload_text = json.dumps(payload, separators=(",", ":"))
    header = {"stage_id": stage["id"], "kind": stage["kind"], "finished": time.time(),
              "gridlab_version": gridlab.__version__, **bookkeeping,
              "checksum": hashlib.sha256(payload_text.encode()).hexdigest()}
    atomic.write_text(stage_dir / RESULT, json.dumps(header, separators=(",", ":"))[:-1]
                       + _PAYLOAD_KEY.decode() + payload_text + "}")
    markers = stage_dir.parent.parent / DONE
    markers.mkdir(exist_ok=True)
    (markers / stage["id"]).touch()


_PAYLOAD_KEY = b',"payload":'


def read_result(stage_dir: Path | str, stage_id: str) -> dict[str, Any]:
    """The result's header and payload; FileNotFoundError when absent, CorruptResult for a truncated, edited or
    foreign file."""
    with open(os.path.join(stage_dir, RESULT), "rb") as handle:
        data = handle.read()
    split = data.find(_PAYLOAD_KEY)
    if split < 0 or not data.endswith(b"}"):
        raise CorruptResult("result.json is incomplete (no payload or not closed)")
    payload_bytes = data[split + len(_PAYLOAD_KEY):-1]
    try:
        header = json.loads(data[:split] + b"}")
    except ValueError as error:
        raise CorruptResult(f"unreadable result.json header: {error}") from None
    if not isinstance(header, dict) or not {"stage_id", "checksum", "finished"} <= header.keys():
        raise CorruptResult("result.json lacks stage_id/checksum/finished")
    if header["stage_id"] != stage_id:
        raise CorruptResult(f"result.json belongs to stage {header['stage_id']}, not {stage_id}")
    if hashlib.sha256(payload_bytes).hexdigest() != header["checksum"]:
        raise CorruptResult("result.json checksum does not match its payload")
    try:
        header["payload"] = json.loads(payload_bytes)
    except ValueError as error:
        raise CorruptResult(f"unreadable result.json payload: {error}") from None
    return header


def clear_outcome(run_dir: Path, stage_id: str) -> None:
    """Forget a stage's failure or (corrupt) result before it runs again."""
    folder = run_dir / "stages" / stage_id
    for path in (folder / ERROR, folder / RESULT, run_dir / DONE / stage_id):
        path.unlink(missing_ok=True)


def done_markers(run_dir: Path) -> set[str]:
    try:
        return set(os.listdir(run_dir / DONE))
    except FileNotFoundError:
        return set()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def write_plan(run_dir: Path, plan) -> None:
    """plan.json (everything) and index.json (what status needs: stage ids, kinds, deps, each cell's eval stage)."""
    write_json_atomic(run_dir / PLAN, {
        "grid": plan.spec.model_dump(mode="json"), "submitted_at": time.time(),
        "stages": list(plan.stages.values()), "cells": plan.cells,
    })
    write_json_atomic(run_dir / INDEX, {
        "grid": plan.spec.name,
        "stages": [{"id": s["id"], "kind": s["kind"], "deps": s["deps"]} for s in plan.stages.values()],
        "cell_eval_stages": [cell["eval_stage"] for cell in plan.cells],
    })


def read_index(run_dir: Path) -> dict[str, Any]:
    index = read_json(run_dir / INDEX)
    if index is None:
        raise ValueError(f"{run_dir}: no index.json; run `gridlab submit GRID` first")
    return index


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

    ``states`` (stage id → {status, error}) is the executor's view (scheduler states) of stages without a result;
    stages not in it are classified from their files alone. A corrupt result.json makes its stage failed and is not
    ingested.
    """
    run_dir = Path(run_dir)
    plan = read_plan(run_dir)
    states = states or {}
    records: dict[str, dict[str, Any]] = {}
    stage_rows = {name: [] for name, _ in SCHEMA["stages"]}
    stages_dir = os.path.join(run_dir, "stages")
    for stage in plan["stages"]:
        folder = os.path.join(stages_dir, stage["id"])
        row = {"stage_id": stage["id"], "kind": stage["kind"], "log_path": os.path.join(folder, LOG)}
        try:
            header = read_result(folder, stage["id"])
            records[stage["id"]] = header["payload"]
            row.update(status="done", job_id=header.get("job_id"), attempts=header.get("attempts"),
                       started=header.get("started"), finished=header["finished"])
        except (FileNotFoundError, CorruptResult) as problem:
            files = scan_stage(run_dir, stage)
            view = states.get(stage["id"], {})
            row.update(job_id=(files.submit or {}).get("job_id"), attempts=files.attempts, started=files.started)
            if isinstance(problem, CorruptResult):
                row.update(status="failed", error=str(problem))
            elif files.error is not None:
                row.update(status="failed", error=files.error.get("error"))
            else:
                row.update(status=view.get("status") or ("running" if files.attempts and files.submit else "pending"),
                           error=view.get("error"))
        for name, _ in SCHEMA["stages"]:
            stage_rows[name].append(row.get(name))
    status_of = dict(zip(stage_rows["stage_id"], stage_rows["status"]))
    error_of = dict(zip(stage_rows["stage_id"], stage_rows["error"]))
    effective, culprit = effective_states(plan["stages"], status_of)

    cell_rows = {name: [] for name, _ in SCHEMA["cells"]}
    metric_rows = {name: [] for name, _ in SCHEMA["metrics"]}
    for cell in plan["cells"]:
        status = effective[cell["eval_stage"]]
        blamed = culprit.get(cell["eval_stage"])
        prune = records.get(cell["prune_stage"], {})
        train = records.get(cell["train_stage"])
        evaluation = records.get(cell["eval_stage"])
        branch = _branch(train, cell["trained_tokens"]) if train else None
        row = {**cell, "status": status,
               "error": f"{blamed}: {error_of[blamed] or status_of[blamed]}" if blamed else None,
               "achieved_ratio": prune.get("achieved_ratio"),
               "trained_tokens": branch["trained_tokens"] if branch else cell["trained_tokens"],
               "branch_path": branch["path"] if branch else None}
        if branch and branch.get("status", "done") != "done":  # this budget's branch diverged; the others stand
            row.update(status="failed", error=f"{cell['train_stage']}: {branch['error']}")
        for name, _ in SCHEMA["cells"]:
            cell_rows[name].append(row.get(name))
        start = records.get(cell["model_stage"])
        if start and "val_loss" in start:
            _add_metrics(metric_rows, cell["cell_id"], 0, [
                {"name": "val_loss", "value": start["val_loss"], "higher_is_better": False},
                {"name": "val_ppl", "value": start["val_ppl"], "higher_is_better": False}])
        if branch:
            curve = branch["curve"]  # the trunk up to its fork, then its own tail
            count = len(curve)
            metric_rows["cell_id"].extend([cell["cell_id"]] * 2 * count)
            metric_rows["tokens"].extend([p["tokens"] for p in curve] * 2)
            metric_rows["name"].extend(["train_loss"] * count + ["lr"] * count)
            metric_rows["value"].extend([p["loss"] for p in curve] + [p["lr"] for p in curve])
            metric_rows["stderr"].extend([None] * 2 * count)
            metric_rows["higher_is_better"].extend([False] * count + [None] * count)  # lr is not a score
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
    parent_rows = {name: [] for name, _ in SCHEMA["parent_metrics"]}
    parent_stage = next(s for s in plan["stages"] if s["kind"] == "parent")
    parent_payload = records.get(parent_stage["id"])
    if parent_payload and "val_loss" in parent_payload:
        for name in ("val_loss", "val_ppl"):
            for column, value in (("tokens", parent["tokens"]), ("name", name),
                                  ("value", parent_payload[name]), ("stderr", None), ("higher_is_better", False)):
                parent_rows[column].append(value)
    tables = {"grid": grid_rows, "cells": cell_rows, "metrics": metric_rows, "parent_metrics": parent_rows,
              "stages": stage_rows}
    _write_tables(run_dir / DATABASE, tables)
    return {"cells": len(cell_rows["cell_id"]), "metrics": len(metric_rows["cell_id"]),
            "stages": len(stage_rows["stage_id"]), "results": len(records)}


def effective_states(stages: list[dict[str, Any]], status: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each stage's state as the cells below it see it, and the stage to blame when that is failed or cancelled.

    A failed or cancelled stage upstream dominates (the one furthest upstream is blamed); then a stage is done when
    it is; running when it or something upstream runs; pending otherwise. ``stages`` must be in dependency order (as plans list them).
    """
    effective: dict[str, str] = {}
    culprit: dict[str, str] = {}
    for stage in stages:
        sid, own = stage["id"], status[stage["id"]]
        # Blame the problem furthest upstream: a stage that failed because its input is missing is not the cause.
        blamed = [culprit[dep] for dep in stage["deps"].values() if dep in culprit]
        blamed += [sid] if own in ("failed", "cancelled") else []
        if blamed:
            culprit[sid] = blamed[0]
            effective[sid] = status[culprit[sid]]
        elif own == "done":
            effective[sid] = "done"
        elif own == "running" or any(effective[dep] == "running" for dep in stage["deps"].values()):
            effective[sid] = "running"
        else:
            effective[sid] = "pending"
    return effective, culprit


def _write_tables(database: Path, tables: dict[str, dict[str, list]]) -> None:
    """Replace every table's rows in one transaction; rows go in as polars frames (bulk, no per-row inserts)."""
    import duckdb
    import polars as pl

    polars_type = {"VARCHAR": pl.String, "BIGINT": pl.Int64, "INTEGER": pl.Int32, "DOUBLE": pl.Float64,
                   "BOOLEAN": pl.Boolean}
    connection = duckdb.connect(str(database))
    try:
        connection.execute("BEGIN TRANSACTION")
        for table, columns in tables.items():
            schema = SCHEMA[table]
            connection.execute(f"CREATE TABLE IF NOT EXISTS {table} ("
                               + ", ".join(f"{name} {kind}" for name, kind in schema) + ")")
            connection.execute(f"DELETE FROM {table}")
            frame = pl.DataFrame({name: columns[name] for name, _ in schema},
                                 schema={name: polars_type[kind] for name, kind in schema}, strict=False)
            connection.execute(f"INSERT INTO {table} SELECT * FROM frame")
        connection.execute("COMMIT")
    finally:
        connection.close()


def _branch(train: dict[str, Any], budget: int) -> dict[str, Any] | None:
    return next((b for b in train["branches"] if b["budget_tokens"] == budget), None)


def _add_metrics(rows: dict[str, list], cell_id: str, tokens: int, metrics: list[dict]) -> None:
    for metric in metrics:
        rows["cell_id"].append(cell_id)
        rows["tokens"].append(tokens)
        rows["name"].append(metric["name"])
        rows["value"].append(metric["value"])
        rows["stderr"].append(metric.get("stderr"))
        rows["higher_is_better"].append(metric.get("higher_is_better"))
