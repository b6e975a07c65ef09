"""A stage's result file: the single signal that it is done, and what it hands downstream.

``result.json`` is JSON whose last key is the payload: ``{stage_id, kind, finished, gridlab_version, job_id,
attempts, started, provenance, checksum, payload}``. ``checksum`` is sha256 of the payload's bytes exactly as
written, so reading verifies it without serialising again, and a truncated, edited or foreign file is detected
(``CorruptResult``). It is written last and atomically (gridlab.atomic), then the run's ``done/<id>`` marker.

Workers write results here; they never touch the database (gridlab.db).
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
from gridlab.contracts import Contract, Stage, parse_payload
from gridlab.layout import StagePaths

_PAYLOAD_KEY = b',"payload":'


class CorruptResult(Exception):
    """A result.json that is not a complete, checksummed result of this stage."""


def write_result(paths: StagePaths, stage: Stage, payload: Contract, **bookkeeping: Any) -> None:
    """Write result.json (atomically, durably) and then the stage's done marker. ``bookkeeping`` (job_id, attempts,
    started, provenance) goes in the header."""
    payload_text = payload.model_dump_json()
    header = {"stage_id": stage.id, "kind": stage.kind, "finished": time.time(),
              "gridlab_version": gridlab.__version__, **bookkeeping,
              "checksum": hashlib.sha256(payload_text.encode()).hexdigest()}
    atomic.write_text(paths.result, json.dumps(header, separators=(",", ":"))[:-1]
                      + _PAYLOAD_KEY.decode() + payload_text + "}")
    paths.done_marker.parent.mkdir(parents=True, exist_ok=True)
    paths.done_marker.touch()


def read_result(paths: StagePaths) -> dict[str, Any]:
    """The result's header with its raw ``payload`` dict; FileNotFoundError when absent, CorruptResult for a
    truncated, edited or foreign file."""
    data = paths.result.read_bytes()
    split = data.find(_PAYLOAD_KEY)
    if split < 0 or not data.endswith(b"}"):
        raise CorruptResult("result.json is incomplete (no payload or not closed)")
    payload_bytes = data[split + len(_PAYLOAD_KEY):-1]
    try:
        header = json.loads(data[:split] + b"}")
    except ValueError as error:
        raise CorruptResult(f"unreadable result.json header: {error}") from None
    if not isinstance(header, dict) or not {"stage_id", "checksum", "finished", "kind"} <= header.keys():
        raise CorruptResult("result.json lacks stage_id/kind/checksum/finished")
    if header["stage_id"] != paths.stage_id:
        raise CorruptResult(f"result.json belongs to stage {header['stage_id']}, not {paths.stage_id}")
    if hashlib.sha256(payload_bytes).hexdigest() != header["checksum"]:
        raise CorruptResult("result.json checksum does not match its payload")
    try:
        header["payload"] = json.loads(payload_bytes)
    except ValueError as error:
        raise CorruptResult(f"unreadable result.json payload: {error}") from None
    return header


@dataclass(frozen=True)
class Result:
    """A finished stage's result: its bookkeeping header and its typed payload."""

    stage_id: str
    kind: str
    finished: float
    job_id: str | None
    attempts: int | None
    started: float | None
    provenance: dict[str, Any] | None
    payload: Contract


def load_result(paths: StagePaths) -> Result:
    """The result with its payload parsed into its kind's contract; FileNotFoundError / CorruptResult as above."""
    header = read_result(paths)
    try:
        payload = parse_payload(header["kind"], header["payload"])
    except ValueError as error:
        raise CorruptResult(f"result.json payload does not match the {header['kind']} contract: "
                            f"{str(error).splitlines()[0]}") from None
    return Result(stage_id=header["stage_id"], kind=header["kind"], finished=header["finished"],
                  job_id=header.get("job_id"), attempts=header.get("attempts"), started=header.get("started"),
                  provenance=header.get("provenance"), payload=payload)


def read_payload(paths: StagePaths) -> Contract:
    """The typed payload of a finished stage."""
    return load_result(paths).payload


@dataclass(frozen=True)
class Attempts:
    """How often a stage's work has started (``attempts.log``: one start time a line, rank 0 of each start)."""

    count: int
    first: float | None       # the first start: what status counts a stage's time from
    latest: float | None      # the start of the attempt now running (or that finished): its runtime's start


def record_attempt(paths: StagePaths) -> None:
    """Count one more start of the stage's work (rank 0 only)."""
    with open(paths.attempts, "a") as attempts:
        attempts.write(f"{time.time()}\n")


def read_attempts(paths: StagePaths) -> Attempts:
    try:
        starts = [float(line) for line in paths.attempts.read_text().split()]
    except (OSError, ValueError):
        return Attempts(0, None, None)
    return Attempts(len(starts), starts[0] if starts else None, starts[-1] if starts else None)


def clear_outcome(paths: StagePaths) -> None:
    """Forget a stage's failure or (corrupt) result before it runs again."""
    for path in (paths.error, paths.result, paths.done_marker):
        path.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    """A small JSON file, or None when it is absent or does not parse."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None


def tail(path: str | Path, lines: int = 5) -> list[str]:
    """The last lines of a log file (at most its last 8 kB)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            return handle.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return []
