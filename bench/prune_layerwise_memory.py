"""Peak memory of pruning a parent layer by layer from disk, against loading the whole parent, same method and data.

    python bench/prune_layerwise_memory.py [--preset small] [--method wanda] [--work-dir /tmp/gridlab-layerwise]

Saves a random-init parent of the preset, then prunes it in two fresh processes: one loads the whole model
(gridlab.model.load_model → prune → save_model), one opens it with gridlab.pruning.offload.open_layerwise (→ prune →
save_layerwise). Each reports its peak resident memory (ru_maxrss) and its time; the script prints both and the
ratios. The torch import and the calibration batch are in both, so the difference is the model.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from pathlib import Path

import torch


def prune_once(args) -> tuple[float, float]:
    mode, parent_dir, out_dir, method, calibration_shape, vocab = args
    torch.set_num_threads(1)
    from gridlab.model import load_model, save_model
    from gridlab.pruning import prune
    from gridlab.pruning.offload import open_layerwise, save_layerwise

    calibration = torch.randint(0, vocab, calibration_shape, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    if mode == "whole":
        result = prune(load_model(parent_dir)[0], method, 0.5, calibration)
        save_model(result.model, out_dir / mode, mask=result.mask)
    else:
        model = open_layerwise(parent_dir, "cpu", out_dir / "spill")
        result = prune(model, method, 0.5, calibration)
        save_layerwise(result.model, out_dir / mode, mask=result.mask)
    seconds = time.perf_counter() - started
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, seconds  # Linux: kilobytes → MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--calibration", type=int, nargs=2, default=[16, 128], metavar=("SEQUENCES", "SEQ_LEN"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gridlab-layerwise"))
    args = parser.parse_args()

    from gridlab.model import init_model, make_config, param_counts, save_model

    parent = init_model(make_config(args.preset, args.vocab, args.calibration[1]), seed=0)
    parent_dir = save_model(parent, args.work_dir / "parent")
    counts = param_counts(parent)
    del parent
    print(f"{args.preset}: {counts.total / 1e6:.1f}M parameters ({counts.total * 4 / 2**20:.0f} MB fp32), "
          f"{args.method} at 0.5, calibration {args.calibration[0]}×{args.calibration[1]} tokens")
    context = multiprocessing.get_context("spawn")
    measured = {}
    for mode in ("whole", "layerwise"):
        with context.Pool(1) as pool:  # a fresh process each, so ru_maxrss is this mode's alone
            measured[mode] = pool.apply(prune_once, ((mode, parent_dir, args.work_dir, args.method,
                                                      tuple(args.calibration), args.vocab),))
        print(f"{mode:>10}: peak RSS {measured[mode][0]:8.0f} MB, {measured[mode][1]:6.1f} s")
    print(f"layerwise / whole: memory {measured['layerwise'][0] / measured['whole'][0]:.2f}×, "
          f"time {measured['layerwise'][1] / measured['whole'][1]:.2f}×")


if __name__ == "__main__":
    main()
