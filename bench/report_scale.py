"""Report scale: `build_report` on ~10,000 cells × 50 metric points each must take ≤ 10 s.

Prints the time split (analysis, plotting, HTML, PDF) and the ratio against a baseline measured in the same
process: the same report on a grid with the same methods and ratios but one budget and one seed (96 cells). Plot and
table sizes grow with methods × ratios × budgets, not with seeds, so the ratio shows what the cell count costs.

    python bench/report_scale.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report_synthetic import build_cells, write_db  # noqa: E402

from gridlab.report import build_report  # noqa: E402

METHODS = ["shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt"]
RATIOS = [0.5, 0.6, 0.7, 0.8]
PARENT_TOKENS = 2_000_000_000
POINTS_PER_CELL = 50  # val_loss, val_ppl and 48 train_loss points


def synthetic_db(path: Path, budgets: list[int], seeds: list[int]) -> int:
    cells = build_cells(METHODS, RATIOS, budgets, seeds, PARENT_TOKENS)
    for cell in cells:
        cell["status"] = "done"
    frame = pl.DataFrame(cells)
    rng = np.random.default_rng(0)
    trained = frame["trained_tokens"].to_numpy().astype(float)
    pruned = (frame["init"] == "pruned").to_numpy()
    ratio = frame["ratio"].to_numpy()
    loss = np.where(pruned, 2.0 + (0.4 + ratio) * (trained / 1e7) ** -0.3, 1.9 + 3.0 * (trained / 1e7) ** -0.5)
    loss = loss + rng.normal(0, 0.01, loss.size)
    curve_tokens = np.linspace(1 / 48, 1, 48)[None, :] * trained[:, None]
    curve = loss[:, None] + 2.0 / (1 + curve_tokens / 1e7) + rng.normal(0, 0.02, curve_tokens.shape)
    ids = frame["cell_id"].to_numpy()
    metrics = pl.concat([
        pl.DataFrame({"cell_id": ids, "tokens": trained.astype(np.int64), "name": "val_loss", "value": loss}),
        pl.DataFrame({"cell_id": ids, "tokens": trained.astype(np.int64), "name": "val_ppl", "value": np.exp(loss)}),
        pl.DataFrame({"cell_id": np.repeat(ids, 48), "tokens": curve_tokens.ravel().astype(np.int64),
                      "name": "train_loss", "value": curve.ravel()}),
    ]).with_columns(stderr=pl.lit(None, dtype=pl.Float64))
    write_db(path, cells, metrics.select(["cell_id", "tokens", "name", "value", "stderr"]),
             parent_tokens=PARENT_TOKENS)
    return len(cells)


def timed_report(db: Path, out: Path) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds of this process, and the wall-time split reported by build_report."""
    timings: dict = {}
    start, cpu = time.perf_counter(), time.process_time()
    build_report(db, out, timings=timings)
    return time.perf_counter() - start, time.process_time() - cpu, timings


def main() -> None:
    budgets = [10_000_000 * 2**i for i in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small_cells = synthetic_db(tmp / "small.duckdb", budgets[:1], [0])
        large_cells = synthetic_db(tmp / "large.duckdb", budgets, list(range(13)))
        timed_report(tmp / "small.duckdb", tmp / "warmup")  # font caches, imports
        small_seconds, small_cpu, _ = timed_report(tmp / "small.duckdb", tmp / "small")
        large_seconds, large_cpu, split = timed_report(tmp / "large.duckdb", tmp / "large")
    split_text = ", ".join(f"{k} {v:.2f} s" for k, v in split.items())
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} (wall time grows with the load; CPU time less)")
    print(f"baseline: {small_cells} cells × {POINTS_PER_CELL} metric points: wall {small_seconds:.2f} s, "
          f"CPU {small_cpu:.2f} s")
    print(f"scale:    {large_cells} cells × {POINTS_PER_CELL} metric points: wall {large_seconds:.2f} s, "
          f"CPU {large_cpu:.2f} s (wall split: {split_text})")
    print(f"ratio scale/baseline: {large_seconds / small_seconds:.1f}× wall for {large_cells / small_cells:.0f}× the "
          f"cells; budget 10 s: {'met' if large_seconds <= 10 else 'NOT met'} (wall), "
          f"{'met' if large_cpu <= 10 else 'NOT met'} (CPU)")


if __name__ == "__main__":
    main()
