"""How long `gridlab plan`'s throughput measurement takes, and its cached re-use.

For each grid (default: the default study's grid.toml and examples/smoke.toml), in a fresh $GRIDLAB_CACHE: the
measurement of the parent's shape on this host (gridlab.throughput.measure, what the first `gridlab plan` does),
then the same call again (what every later plan does: read from the cache). Prints both times, their ratio and the
tokens/s measured. Run it on an idle machine for numbers to compare; a loaded one gives the load's.

    python bench/plan_throughput.py [GRID …] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("grids", nargs="*", default=[str(REPO / "grid.toml"), str(REPO / "examples" / "smoke.toml")])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["GRIDLAB_CACHE"] = cache
        from gridlab import throughput
        from gridlab.backends.local import worker_threads
        from gridlab.plan import parent_config
        from gridlab.spec import load_grid

        for grid in args.grids:
            spec = load_grid(grid)
            schedule = spec.parent.schedule if spec.parent.pretrains else spec.schedule
            config = parent_config(spec)
            timings = []
            for _ in range(2):
                started = time.perf_counter()
                found = throughput.measure(config, spec.seq_len, schedule.batch_size, args.workers)
                timings.append((time.perf_counter() - started, found))
            (cold, measured), (warm, cached) = timings
            print(f"{Path(grid).name}: measured {cold:.2f} s ({measured.source}, {measured.tokens_per_s or 0:,.0f} "
                  f"tokens/s per worker, {worker_threads(args.workers)} thread(s)); cached "
                  f"{warm * 1000:.1f} ms ({cached.source}); ratio {cold / max(warm, 1e-9):,.0f}×")


if __name__ == "__main__":
    main()
