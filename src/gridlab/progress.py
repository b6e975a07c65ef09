"""A training stage's progress while it runs: one line in its log and one small record in its folder.

A training stage (the parent's pretraining, a train stage) reports every ``schedule.log_every_steps`` steps and
when it ends: the phase (the trunk, or the decay branch of a budget), the step, the trajectory's tokens, the tokens
trained so far in this run of the stage out of those it has to train, the loss (mean since the last report), the
learning rate and the tokens per second. ``Recorder`` prints it into the stage log and writes it, through
gridlab.atomic, to ``StagePaths.progress`` (``progress.json``), which `gridlab status`, `gridlab logs` and the live
view of `gridlab submit` read. The last record (``finished``) says how many tokens the stage trained in how many
seconds: the measured throughput `gridlab plan` estimates time from (gridlab.throughput).
"""

from __future__ import annotations

import time
from typing import Any

from gridlab import atomic
from gridlab.layout import StagePaths
from gridlab.results import read_json


class Recorder:
    """The callback gridlab.train calls with each progress point (rank 0 only)."""

    def __init__(self, files: StagePaths, kind: str):
        self.files, self.kind = files, kind

    def __call__(self, point: dict[str, Any]) -> None:
        record = {"kind": self.kind, **point, "updated": time.time()}
        print(f"progress: {format_progress(record)}", flush=True)
        try:
            atomic.write_json(self.files.progress, record)
        except OSError:   # a full disk must not end training for want of a progress file
            pass


def read_progress(files: StagePaths) -> dict[str, Any] | None:
    """A stage's latest progress record, or None."""
    record = read_json(files.progress)
    return record if isinstance(record, dict) else None


def eta_seconds(record: dict[str, Any]) -> float | None:
    """Seconds until the stage has trained what it has to, at its current pace."""
    speed, left = record.get("tokens_per_s"), record.get("to_train", 0) - record.get("trained", 0)
    if not speed or left <= 0:
        return 0.0 if left <= 0 else None
    return left / speed


def format_progress(record: dict[str, Any]) -> str:
    """One line: "trunk step 40/128 (5,120 tokens): trained 5,120 of 16,384 (31%), loss 4.213, lr 3.0e-03, 1,850
    tokens/s, ETA 6 s" (or "… finished: trained … in … s")."""
    trained, to_train = int(record.get("trained", 0)), int(record.get("to_train", 0))
    share = f" ({100 * trained / to_train:.0f}%)" if to_train else ""
    if record.get("finished"):
        return (f"finished: trained {trained:,} tokens in {record.get('elapsed_s', 0):.1f} s "
                f"({record.get('tokens_per_s') or 0:,.0f} tokens/s)")
    parts = [f"{record.get('phase', '?')} step {record.get('step')}/{record.get('steps')} "
             f"({int(record.get('tokens', 0)):,} tokens): trained {trained:,} of {to_train:,}{share}"]
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4g}")
    if record.get("lr") is not None:
        parts.append(f"lr {record['lr']:.2e}")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:,.0f} tokens/s")
    eta = eta_seconds(record)
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return ", ".join(parts)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
