"""Training tokens/s: gridlab's train() against a bare PyTorch loop on the same model, batch and optimizer.

    python bench/train_throughput.py [--preset micro] [--steps 12] [--rounds 3] [--threads 2] [--presets-only]

Both loops run in this process, alternating in rounds so that load from other processes hits both alike; each
reports its best round. gridlab's time is a whole train() call: optimizer creation, the checkpoint at step 0, the
fork checkpoint, the branch's HF save and the lr/log/checkpoint bookkeeping of every step. The bare loop is
forward, backward, grad clip, fused AdamW step and zero_grad on batches drawn from an in-memory tensor.
`--presets-only` instead prints bare-loop tokens/s for micro, nano and mini.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gridlab.data import TokenShard  # noqa: E402
from gridlab.model import init_model, make_config, param_counts  # noqa: E402
from gridlab.train import TrainConfig, make_optimizer, train  # noqa: E402

VOCAB = 4096


def synthetic_shard(folder: Path, n_sequences: int, seq_len: int) -> TokenShard:
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(n_sequences, seq_len)).astype(np.uint16)
    tokens.tofile(folder / "bench.bin")
    (folder / "bench.json").write_text(json.dumps({"seq_len": seq_len, "n_sequences": n_sequences,
                                                   "dtype": "uint16"}))
    return TokenShard.open(folder / "bench.bin")


def bare_loop(model, data: TokenShard, config: TrainConfig, steps: int) -> float:
    start = time.perf_counter()
    optimizer = make_optimizer(model, config)
    sequences = data[:]
    generator = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(steps):
        batch = sequences[torch.randint(0, len(sequences), (config.batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def gridlab_loop(model, data: TokenShard, config: TrainConfig, steps: int, out_dir: Path) -> float:
    start = time.perf_counter()
    train(model, data, config, [steps * config.tokens_per_step], out_dir)
    return time.perf_counter() - start


def compare(preset: str, seq_len: int, batch_size: int, steps: int, rounds: int) -> None:
    model_config = make_config(preset, VOCAB, seq_len)
    config = TrainConfig(batch_size=batch_size, seq_len=seq_len, warmup_tokens=batch_size * seq_len * 2,
                         log_every_steps=5, checkpoint_every_tokens=10**12)
    tokens = steps * config.tokens_per_step
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_shard(Path(tmp), 4 * batch_size, seq_len)
        bare_loop(init_model(model_config, 0), data, config, 2)  # warm-up: allocator, kernels
        for round_index in range(rounds):
            bare.append(bare_loop(init_model(model_config, 0), data, config, steps))
            ours.append(gridlab_loop(init_model(model_config, 0), data, config, steps, Path(tmp) / f"r{round_index}"))
    bare_rate, our_rate = tokens / min(bare), tokens / min(ours)
    print(f"{preset}: {param_counts(model_config).total / 1e6:.1f}M params, batch {batch_size} × seq {seq_len}, "
          f"{steps} steps × {rounds} rounds, {torch.get_num_threads()} threads")
    print(f"  bare PyTorch loop: {bare_rate:8.0f} tokens/s")
    print(f"  gridlab train():   {our_rate:8.0f} tokens/s")
    print(f"  ratio gridlab/bare: {our_rate / bare_rate:.3f}  (target >= 0.95)")


def preset_rates(seq_len: int, batch_size: int, steps: int) -> None:
    config = TrainConfig(batch_size=batch_size, seq_len=seq_len)
    for preset in ("micro", "nano", "mini"):
        model_config = make_config(preset, VOCAB, seq_len)
        with tempfile.TemporaryDirectory() as tmp:
            data = synthetic_shard(Path(tmp), 4 * batch_size, seq_len)
            bare_loop(init_model(model_config, 0), data, config, 1)
            seconds = bare_loop(init_model(model_config, 0), data, config, steps)
        print(f"{preset}: {param_counts(model_config).total / 1e6:.1f}M params (vocab {VOCAB}), "
              f"{steps * config.tokens_per_step / seconds:.0f} tokens/s fp32, batch {batch_size} × seq {seq_len}, "
              f"{torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.presets_only:
        preset_rates(args.seq_len, args.batch_size, args.steps)
    else:
        compare(args.preset, args.seq_len, args.batch_size, args.steps, args.rounds)


if __name__ == "__main__":
    main()
