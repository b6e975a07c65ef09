"""Report scale: `build_report` on ~10,000 cells × 50 metric points each must take ≤ 10 s.

Prints the time split (analysis, plotting, HTML, PDF) and the ratio against a baseline measured in the same
process: the same report on a grid with the same methods and ratios but one budget and one seed (96 cells). Plot and
table sizes grow with methods × ratios × budgets, not with seeds, so the ratio shows what the cell count costs.

    python bench/report_scale.py [--pdf-engine auto|chromium|weasyprint]

CPU time is this process's plus that of its child processes (Chromium, when it prints the PDF; sampled every
20 ms, so up to 20 ms of each child's last moments can be missed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report_synthetic import build_cells, write_db  # noqa: E402

from gridlab.report import build_report  # noqa: E402
from gridlab.report.render import PDF_ENGINES  # noqa: E402

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


class ChildCPU:
    """CPU seconds of this process's descendants (Chromium's browser, GPU and renderer processes, which their parents
    do not always reap, so RUSAGE_CHILDREN misses them), sampled every 20 ms while they run."""

    def __init__(self):
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        me = psutil.Process()
        while not self._stop.wait(0.02):
            for child in me.children(recursive=True):
                try:
                    times = child.cpu_times()
                    self._seen[(child.pid, child.create_time())] = times.user + times.system
                except psutil.Error:
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self._seen.values())


def timed_report(db: Path, out: Path, pdf_engine: str) -> tuple[float, float, float, dict]:
    """Wall seconds, CPU seconds of this process, CPU seconds of its child processes (Chromium), and the wall-time
    split reported by build_report."""
    timings: dict = {}
    start, cpu = time.perf_counter(), time.process_time()
    with ChildCPU() as children:
        build_report(db, out, timings=timings, pdf_engine=pdf_engine)
    return time.perf_counter() - start, time.process_time() - cpu, children.seconds, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdf-engine", default="auto", choices=PDF_ENGINES)
    engine = parser.parse_args().pdf_engine
    budgets = [10_000_000 * 2**i for i in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small_cells = synthetic_db(tmp / "small.duckdb", budgets[:1], [0])
        large_cells = synthetic_db(tmp / "large.duckdb", budgets, list(range(13)))
        timed_report(tmp / "small.duckdb", tmp / "warmup", engine)  # font caches, imports
        small_seconds, small_cpu, small_children, _ = timed_report(tmp / "small.duckdb", tmp / "small", engine)
        large_seconds, large_cpu, large_children, split = timed_report(tmp / "large.duckdb", tmp / "large", engine)
    split_text = ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}" for k, v in split.items())
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} (wall time grows with the load; CPU time less)")
    print(f"baseline: {small_cells} cells × {POINTS_PER_CELL} metric points: wall {small_seconds:.2f} s, "
          f"CPU {small_cpu:.2f} s (+ {small_children:.2f} s in child processes)")
    print(f"scale:    {large_cells} cells × {POINTS_PER_CELL} metric points: wall {large_seconds:.2f} s, "
          f"CPU {large_cpu:.2f} s (+ {large_children:.2f} s in child processes) (wall split: {split_text})")
    total_cpu = large_cpu + large_children
    print(f"ratio scale/baseline: {large_seconds / small_seconds:.1f}× wall for {large_cells / small_cells:.0f}× the "
          f"cells; budget 10 s: {'met' if large_seconds <= 10 else 'NOT met'} (wall), "
          f"{'met' if total_cpu <= 10 else 'NOT met'} (CPU, children included: {total_cpu:.2f} s)")


if __name__ == "__main__":
    main()
