"""Report scale: `build_report` on ~10,000 cells × 50 metric points each must take ≤ 8 s.

Prints the time split (analysis, plotting, HTML, PDF) and two ratios measured in the same run:
- against a 96-cell grid with the same methods and ratios but one budget and one seed: plot and table sizes grow
  with methods × ratios × budgets, not with seeds, so this ratio shows what the cell count costs;
- with `--against REV`, against the report code of git revision REV (e.g. the commit before a change), run on the
  same grid in a subprocess each (the grid then has no budget-0 reference cells, which older code does not know).

    python bench/report_scale.py [--pdf-engine auto|chromium|weasyprint] [--seeds 13] [--budgets 8] [--against REV]

The full grid (default) is 6 methods × 4 ratios × 8 budgets × 13 seeds × 2 inits × 2 settings = 9,984 cells, plus
the 1,248 budget-0 reference cells and the parent's own metrics that the capacity diagnostic reads; `--seeds 2
--budgets 4` is the default study's shape. CPU time is this process's plus that of its child processes (Chromium,
when it prints the PDF; sampled every 20 ms, so up to 20 ms of each child's last moments can be missed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt"]
RATIOS = [0.5, 0.6, 0.7, 0.8]
PARENT_TOKENS = 2_000_000_000
POINTS_PER_CELL = 50  # val_loss, val_ppl and 48 train_loss points
TARGET_SECONDS = 8.0
ENGINES = ("auto", "chromium", "weasyprint")


def synthetic_db(path: Path, budgets: list[int], seeds: list[int], references: bool = True) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from report_synthetic import build_cells, parent_loss, write_db

    cells = build_cells(METHODS, RATIOS, budgets, seeds, PARENT_TOKENS, references=references)
    for cell in cells:
        cell["status"] = "done"
        cell["branch_path"] = f"trajectories/{cell['train_stage']}/branches/{cell['trained_tokens']}"
    frame = pl.DataFrame(cells)
    rng = np.random.default_rng(0)
    trained = np.maximum(frame["trained_tokens"].to_numpy().astype(float), 1e6)
    pruned = (frame["init"] == "pruned").to_numpy()
    ratio = frame["ratio"].to_numpy()
    loss = np.where(pruned, 2.0 + (0.4 + ratio) * (trained / 1e7) ** -0.3, 1.9 + 3.0 * (trained / 1e7) ** -0.5)
    loss = loss + rng.normal(0, 0.01, loss.size)
    ids = frame["cell_id"].to_numpy()
    tokens = frame["trained_tokens"].to_numpy().astype(np.int64)
    curved = tokens > 0
    curve_tokens = np.linspace(1 / 48, 1, 48)[None, :] * tokens[curved, None]
    curve = loss[curved, None] + 2.0 / (1 + curve_tokens / 1e7) + rng.normal(0, 0.02, curve_tokens.shape)
    metrics = pl.concat([
        pl.DataFrame({"cell_id": ids, "tokens": tokens, "name": "val_loss", "value": loss}),
        pl.DataFrame({"cell_id": ids, "tokens": tokens, "name": "val_ppl", "value": np.exp(loss)}),
        pl.DataFrame({"cell_id": np.repeat(ids[curved], 48), "tokens": curve_tokens.ravel().astype(np.int64),
                      "name": "train_loss", "value": curve.ravel()}),
    ]).with_columns(stderr=pl.lit(None, dtype=pl.Float64), higher_is_better=pl.lit(False))
    write_db(path, cells, metrics, parent_tokens=PARENT_TOKENS, parent_metrics=parent_loss(2.05, PARENT_TOKENS))
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


def timed_report(db: Path, out: Path, pdf_engine: str) -> dict:
    """Wall seconds, CPU seconds of this process, CPU seconds of its child processes (Chromium), and the wall-time
    split reported by build_report."""
    from gridlab.report import build_report

    timings: dict = {}
    start, cpu = time.perf_counter(), time.process_time()
    with ChildCPU() as children:
        build_report(db, out, timings=timings, pdf_engine=pdf_engine)
    return dict(wall=time.perf_counter() - start, cpu=time.process_time() - cpu, children=children.seconds,
                split=timings)


def in_subprocess(db: Path, out: Path, engine: str, source: Path | None) -> dict:
    """timed_report in a fresh process, with the gridlab (src/ and templates/) of `source`, or of this checkout."""
    env = dict(os.environ)
    if source is not None:
        env.update(PYTHONPATH=str(source / "src"), GRIDLAB_TEMPLATES=str(source / "templates"))
    command = [sys.executable, __file__, "--worker", str(db), str(out), "--pdf-engine", engine]
    for attempt in ("warm-up", "measured"):  # the first run fills font caches and imports
        result = subprocess.run(command + (["--discard"] if attempt == "warm-up" else []), env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def extract_revision(revision: str, folder: Path) -> Path:
    """src/ and templates/ of a git revision of this repository, unpacked into `folder`."""
    archive = subprocess.run(["git", "archive", revision, "src", "templates"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _line(label: str, cells: int, measured: dict) -> str:
    return (f"{label}: {cells} cells × {POINTS_PER_CELL} metric points: wall {measured['wall']:.2f} s, "
            f"CPU {measured['cpu']:.2f} s (+ {measured['children']:.2f} s in child processes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdf-engine", default="auto", choices=ENGINES)
    parser.add_argument("--seeds", type=int, default=13)
    parser.add_argument("--budgets", type=int, default=8)
    parser.add_argument("--against", metavar="REV", help="also time the report code of this git revision")
    parser.add_argument("--worker", nargs=2, metavar=("DB", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--discard", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        measured = timed_report(Path(args.worker[0]), Path(args.worker[1]), args.pdf_engine)
        print(json.dumps(measured))
        return
    budgets = [10_000_000 * 2**i for i in range(args.budgets)]
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small_cells = synthetic_db(tmp / "small.duckdb", budgets[:1], [0], references=False)
        large_cells = synthetic_db(tmp / "large.duckdb", budgets, seeds)
        timed_report(tmp / "small.duckdb", tmp / "warmup", args.pdf_engine)  # font caches, imports
        small = timed_report(tmp / "small.duckdb", tmp / "small", args.pdf_engine)
        large = timed_report(tmp / "large.duckdb", tmp / "large", args.pdf_engine)
        previous = None
        if args.against:
            plain_cells = synthetic_db(tmp / "plain.duckdb", budgets, seeds, references=False)
            try:
                old = extract_revision(args.against, Path(tempfile.mkdtemp(dir=tmp)))
                previous = (plain_cells, in_subprocess(tmp / "plain.duckdb", tmp / "old", args.pdf_engine, old),
                            in_subprocess(tmp / "plain.duckdb", tmp / "new", args.pdf_engine, None))
            except (subprocess.CalledProcessError, RuntimeError) as error:
                previous = str(error)
    split = ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}" for k, v in large["split"].items())
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (wall time grows with the load; "
          f"CPU time less)")
    print(_line("baseline", small_cells, small))
    print(_line("scale   ", large_cells, large) + f" (wall split: {split})")
    total_cpu = large["cpu"] + large["children"]
    print(f"ratio scale/baseline: {large['wall'] / small['wall']:.1f}× wall for {large_cells / small_cells:.0f}× the "
          f"cells; target {TARGET_SECONDS:g} s: {'met' if large['wall'] <= TARGET_SECONDS else 'NOT met'} (wall), "
          f"{'met' if total_cpu <= TARGET_SECONDS else 'NOT met'} (CPU, children included: {total_cpu:.2f} s)")
    if isinstance(previous, str):
        print(f"against {args.against}: not measured ({previous})")
    elif previous is not None:
        cells, old, new = previous
        print(_line(f"{args.against:>8}", cells, old) + " (no budget-0 cells)")
        print(_line("this    ", cells, new) + " (no budget-0 cells)")
        print(f"ratio this/{args.against}: {new['wall'] / old['wall']:.2f}× wall, "
              f"{(new['cpu'] + new['children']) / (old['cpu'] + old['children']):.2f}× CPU")


if __name__ == "__main__":
    main()
