"""Seconds per pruning method, as a multiple of one forward pass over the same calibration set.

    python bench/prune_speed.py [--presets micro mini] [--threads 1]

Also times SparseGPT's core (Cholesky + blocked OBS updates) on a d×d layer against a d×d×d matmul measured in the
same run, and reports d³ / seconds as a GFLOP/s-equivalent.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from gridlab.model import init_model, make_config, param_counts  # noqa: E402
from gridlab.pruning import METHODS, prune  # noqa: E402
from gridlab.pruning.sparse import sparsegpt_prune  # noqa: E402

# (vocab, seq_len, calibration sequences) per preset: small enough for a laptop run of a few minutes.
SETTINGS = {"micro": (256, 64, 32), "mini": (32000, 128, 16), "nano": (8192, 128, 16)}


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_methods(preset: str) -> None:
    vocab, seq_len, n_seq = SETTINGS[preset]
    parent = init_model(make_config(preset, vocab_size=vocab, seq_len=seq_len), seed=0)
    calibration = torch.randint(0, vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
    counts = param_counts(parent)

    def forward_pass():
        with torch.no_grad():
            for start in range(0, n_seq, 8):
                parent(calibration[start:start + 8], use_cache=False)

    forward = timed(forward_pass, repeats=3)
    print(f"\n{preset}: {counts.total / 1e6:.1f}M params ({counts.decoder / 1e6:.1f}M decoder), "
          f"calibration {n_seq}x{seq_len} tokens, one forward pass {forward * 1e3:.1f} ms")
    print(f"{'method':<16}{'ratio':>7}{'seconds':>10}{'x forward':>11}{'achieved':>10}")
    for method in sorted(METHODS):
        model = copy.deepcopy(parent)
        options = {"nsamples": None} if "nsamples" in METHODS[method].defaults else {}
        start = time.perf_counter()
        result = prune(model, method, 0.5, calibration, **options)
        seconds = time.perf_counter() - start
        print(f"{method:<16}{0.5:>7.2f}{seconds:>10.2f}{seconds / forward:>11.1f}{result.achieved_ratio:>10.4f}")


def bench_sparsegpt_layer(sizes: list[int]) -> None:
    print("\nSparseGPT on one d×d layer (2048 calibration tokens, ratio 0.5, blocksize 128)")
    print(f"{'d':>6}{'seconds':>10}{'d^3 GFLOP/s-eq':>16}{'matmul ms':>11}{'x matmul':>10}")
    for d in sizes:
        generator = torch.Generator().manual_seed(d)
        X = torch.randn(2048, d, generator=generator)
        W = torch.randn(d, d, generator=generator)
        H = 2 * X.T @ X / X.shape[0]
        seconds = timed(lambda W=W, H=H: sparsegpt_prune(W, H, 0.5), repeats=2)
        matmul = timed(lambda W=W: W @ W, repeats=5)  # 2·d³ flops: the dense baseline on this machine
        print(f"{d:>6}{seconds:>10.3f}{d ** 3 / seconds / 1e9:>16.2f}{matmul * 1e3:>11.2f}{seconds / matmul:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["micro", "mini"], choices=sorted(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer-sizes", nargs="+", type=int, default=[256, 512, 1024])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset in args.presets:
        bench_methods(preset)
    bench_sparsegpt_layer(args.layer_sizes)


if __name__ == "__main__":
    main()
