"""A backend defined outside gridlab, as another package would define one: tests/test_backends.py registers it
under the ``gridlab.backends`` entry-point group (a dist-info folder on sys.path) and gridlab finds it there.

It "submits" stages to a queue kept in one JSON file beside the run (job id → state), whose jobs a test sets to any
state, and cancels them by marking them cancelled there."""

from __future__ import annotations

import json
from pathlib import Path

from gridlab.backends import Backend, CancelOutcome
from gridlab.backends.records import record_cancel, record_submission


def queue_file(run_dir) -> Path:
    return Path(run_dir) / "queue.json"


def read_queue(run_dir) -> dict[str, str]:
    path = queue_file(run_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def write_queue(run_dir, queue: dict[str, str]) -> None:
    queue_file(run_dir).write_text(json.dumps(queue))


class QueueBackend(Backend):
    name = "queue"
    finishes = False

    def run(self, run_dir, plan, triage, states):
        queue = read_queue(run_dir)
        outcome = {}
        for stage in triage.to_run:
            job = f"q{len(queue)}"
            record_submission(run_dir, stage.id, self.name, job)
            queue[job] = "pending"
            outcome[stage.id] = "submitted"
        write_queue(run_dir, queue)
        self.report(f"queued {len(outcome)} stage(s)")
        return outcome

    def observe(self, run_dir, held, cache):
        queue = cache.ask(self.name, {record.get("job_id") for _, record in held}, lambda: read_queue(run_dir))
        for state, record in held:
            if state.status in ("failed", "cancelled"):
                state.submitted = False
                continue
            job = queue.get(record.get("job_id"))
            if job is None:
                state.status, state.error = "unknown", f"job {record.get('job_id')} is not in the queue"
            elif job == "cancelled":
                state.status, state.error, state.submitted = "cancelled", "cancelled in the queue", False
            else:
                state.status = job

    def cancel(self, run_dir, states):
        queue = read_queue(run_dir)
        outcome = CancelOutcome()
        for state in states:
            queue[state.job_id] = "cancelled"
            record_cancel(run_dir, state.stage_id, f"dequeued {state.job_id}")
            outcome.cancelled.append(state.stage_id)
            outcome.jobs.append(state.job_id)
        write_queue(run_dir, queue)
        return outcome
