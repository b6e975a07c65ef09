"""The ``debug`` backend: the selected stages one after another in this process (for pdb), with the local backend's
bookkeeping. A stage it holds is running while the submitting process lives; cancelling one marks it (the loop then
starts nothing below it) but stops no process — that would be the submit itself."""

from __future__ import annotations

import os
from pathlib import Path

from gridlab.backends.local import LocalBackend
from gridlab.backends.records import record_submission
from gridlab.layout import RunPaths
from gridlab.results import clear_outcome


class DebugBackend(LocalBackend):
    name = "debug"
    stops_processes = False

    def __init__(self, workers: int = 1, report=print):
        super().__init__(workers=1, report=report)

    def run(self, run_dir: Path, plan, triage, states) -> dict[str, str]:
        # The worker side (torch, transformers) loads only when a debug run starts: observing or cancelling a stage
        # this backend holds (gridlab status, cancel) must not load it.
        from gridlab.stages import execute_stage

        done = set(triage.done)
        failed = {s.stage_id for s in triage.failed + triage.unknown + triage.lingering}
        outcome = {}
        for stage in triage.to_run:
            if set(stage.deps.values()) & failed:
                failed.add(stage.id)
                outcome[stage.id] = "blocked"
                continue
            clear_outcome(RunPaths(run_dir).stage(stage.id))
            record_submission(run_dir, stage.id, self.name, None, os.getpid())
            ok = execute_stage(run_dir, stage.id, redirect_output=False)
            (done if ok else failed).add(stage.id)
            outcome[stage.id] = "done" if ok else "failed"
            self.report(f"{outcome[stage.id]:6} {stage.kind:9} {stage.id}")
        return outcome
