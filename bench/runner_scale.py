"""Runner scale on a 10,000-cell grid: plan, submit --dry-run, ingest of every stage's result file, status.

Each figure is printed with its target and with a ratio against a floor measured in the same process:
    plan      vs hashing the plan's stage configs alone (canonical JSON + sha256 of every stage)
    dry-run   same floor
    ingest    vs json.loads of every result file (reading the files is the least any ingest must do)
    status    vs listing every stage folder
Result files are synthetic (shaped like the real ones, 5 curve points per branch); nothing is trained.

    python bench/runner_scale.py [--seeds 52]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from gridlab import api, db, execute  # noqa: E402
from gridlab.contracts import content_id  # noqa: E402
from gridlab.layout import RunPaths  # noqa: E402
from gridlab.plan import build_plan  # noqa: E402
from gridlab.spec import load_grid  # noqa: E402
from gridlab.state import stage_states  # noqa: E402

from runner_helpers import finish_stage, tiny_grid, write_grid  # noqa: E402

SIX = [{"name": n} for n in ("shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt")]


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=52,
                        help="192 cells per seed (budget 2048 and the budget-0 reference)")
    seeds = parser.parse_args().seeds
    with tempfile.TemporaryDirectory() as folder:
        grid = tiny_grid(name="scale", runs_dir=str(Path(folder) / "runs"), methods=SIX,
                         ratios=[0.5, 0.6, 0.7, 0.8], budgets=[2048], seeds=list(range(seeds)))
        grid["parent"]["overrides"]["num_hidden_layers"] = 12
        grid_file = write_grid(Path(folder), grid)

        plan_s, plan = timed(lambda: build_plan(load_grid(grid_file)))
        stages = list(plan.stages.values())
        floor_s, _ = timed(lambda: [content_id({"kind": s.kind, "config": s.config.identity(), "deps": s.deps})
                                    for s in stages])
        print(f"grid: {len(plan.cells):,} cells, {len(stages):,} stages")
        print(f"plan            {plan_s:6.2f} s  (target ≤ 2 s)  {plan_s / floor_s:5.1f}× hashing the stages alone "
              f"({floor_s:.2f} s)")

        def dry_run():
            fresh = build_plan(load_grid(grid_file))
            return execute.triage(fresh, stage_states(fresh.spec.run_dir, list(fresh.stages.values())),
                                  retry_failed=False)

        dry_s, selection = timed(dry_run)
        assert len(selection.to_run) == len(stages)
        print(f"submit --dry-run {dry_s:5.2f} s  (target ≤ 2 s)  {dry_s / floor_s:5.1f}× hashing the stages alone")

        run_dir = plan.spec.run_dir
        execute.prepare(plan, run_dir)
        for stage in stages:
            finish_stage(run_dir, stage)
        result_files = [RunPaths(run_dir).stage(s.id).result for s in stages]
        read_s, _ = timed(lambda: [json.loads(path.read_bytes()) for path in result_files])
        ingest_s, counts = timed(lambda: db.ingest(run_dir, stage_states(run_dir, stages, verify=True)))
        assert counts["results"] == len(stages) and counts["cells"] == len(plan.cells)
        print(f"ingest          {ingest_s:6.2f} s  (target ≤ 5 s)  {ingest_s / read_s:5.1f}× json.loads of the "
              f"{len(result_files):,} result files ({read_s:.2f} s); {counts['metrics']:,} metric rows")

        list_s, _ = timed(lambda: [os.listdir(RunPaths(run_dir).stage(s.id).folder) for s in stages])
        status_s, report = timed(api.status, run_dir)
        assert report["cells"]["done"] == len(plan.cells)
        print(f"status          {status_s:6.2f} s  (target ≤ 1 s)  {status_s / list_s:5.1f}× listing the stage "
              f"folders ({list_s:.2f} s)")


if __name__ == "__main__":
    main()
