"""Training tokens/s: gridlab's train() against a bare PyTorch loop on the same model, batch and optimizer.

    python bench/train_throughput.py [--preset micro] [--steps 12] [--rounds 3] [--threads 2] [--presets-only]
    python bench/train_throughput.py --world-sizes 1 2 [--preset micro] [--strategy fsdp|ddp]

Both loops run in this process, alternating in rounds so that load from other processes hits both alike; each
reports its best round. gridlab's time is a whole train() call: optimizer creation, the finite-weights checks, the
fork checkpoint, the branch's HF save, the trajectory record and the lr/log/checkpoint bookkeeping of every step.
The bare loop is forward, backward, grad clip, fused AdamW step and zero_grad on batches drawn from an in-memory tensor.
`--presets-only` instead prints bare-loop tokens/s for micro, nano and mini.

`--world-sizes` measures train() launched with torchrun at each world size (one thread per rank on CPU, one GPU per
rank on CUDA) on the same global batch, and prints the scaling against the first size. On CUDA it also prints model
FLOPs utilisation: 6 · parameters · tokens/s over the GPUs' bf16 peak (`--peak-tflops` per GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gridlab import distributed  # noqa: E402
from gridlab.config import Schedule  # noqa: E402
from gridlab.data import TokenShard  # noqa: E402
from gridlab.model import init_model, make_config, param_counts  # noqa: E402
from gridlab.train import make_optimizer, train  # noqa: E402

VOCAB = 4096


def synthetic_shard(folder: Path, n_sequences: int, seq_len: int) -> TokenShard:
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(n_sequences, seq_len)).astype(np.uint16)
    tokens.tofile(folder / "bench.bin")
    (folder / "bench.json").write_text(json.dumps({"seq_len": seq_len, "n_sequences": n_sequences,
                                                   "dtype": "uint16"}))
    return TokenShard.open(folder / "bench.bin")


def bare_loop(model, data: TokenShard, config: Schedule, steps: int) -> float:
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


def gridlab_loop(model, data: TokenShard, config: Schedule, steps: int, out_dir: Path) -> float:
    start = time.perf_counter()
    train(model, data, config, [steps * config.batch_size * data.seq_len], out_dir, seed=0)
    return time.perf_counter() - start


def compare(preset: str, seq_len: int, batch_size: int, steps: int, rounds: int) -> None:
    model_config = make_config(preset, VOCAB, seq_len)
    config = Schedule(batch_size=batch_size, warmup_tokens=batch_size * seq_len * 2, log_every_steps=5,
                      checkpoint_every_tokens=10**12)
    tokens = steps * batch_size * seq_len
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
    config = Schedule(batch_size=batch_size)
    for preset in ("micro", "nano", "mini"):
        model_config = make_config(preset, VOCAB, seq_len)
        with tempfile.TemporaryDirectory() as tmp:
            data = synthetic_shard(Path(tmp), 4 * batch_size, seq_len)
            bare_loop(init_model(model_config, 0), data, config, 1)
            seconds = bare_loop(init_model(model_config, 0), data, config, steps)
        print(f"{preset}: {param_counts(model_config).total / 1e6:.1f}M params (vocab {VOCAB}), "
              f"{steps * batch_size * seq_len / seconds:.0f} tokens/s fp32, batch {batch_size} × seq {seq_len}, "
              f"{torch.get_num_threads()} threads")


def rank_worker(args: dict) -> None:
    """One rank of a --world-sizes measurement: a warm-up train() call, then a timed one."""
    topology = distributed.setup()
    on_cuda = topology.device.type == "cuda"
    model_config = make_config(args["preset"], VOCAB, args["seq_len"])
    config = Schedule(batch_size=args["batch_size"], strategy=args["strategy"], warmup_tokens=0,
                      log_every_steps=10**6, checkpoint_every_tokens=10**15,
                      activation_checkpointing=args["activation_checkpointing"])
    tokens_per_step = args["batch_size"] * args["seq_len"]
    folder = Path(args["folder"])
    data = TokenShard.open(folder / "bench.bin")
    times = []
    for attempt, steps in enumerate((2, args["steps"])):
        model = init_model(model_config, 0)
        distributed.barrier(topology)
        start = time.perf_counter()
        train(model, data, config, [steps * tokens_per_step], folder / f"w{topology.world_size}-{attempt}", seed=0)
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if topology.is_main:
        tokens_per_s = args["steps"] * tokens_per_step / times[-1]
        record = {"world_size": topology.world_size, "tokens_per_s": tokens_per_s,
                  "params": param_counts(model_config).total}
        if on_cuda:
            record["mfu"] = 6 * record["params"] * tokens_per_s / (args["peak_tflops"] * 1e12 * topology.world_size)
        print("RESULT " + json.dumps(record), flush=True)
    distributed.teardown()


def scaling(args) -> None:
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_shard(Path(tmp), 8 * args.batch_size, args.seq_len)
        for world_size in args.world_sizes:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            worker = {"preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
                      "steps": args.steps, "strategy": args.strategy, "folder": tmp,
                      "peak_tflops": args.peak_tflops, "activation_checkpointing": args.activation_checkpointing}
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
                       f"--master_port={port}", __file__, "--rank-worker", json.dumps(worker)]
            output = subprocess.run(command, capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if output.returncode or not lines:
                raise SystemExit(f"world size {world_size} failed:\n{output.stdout[-2000:]}{output.stderr[-3000:]}")
            record = json.loads(lines[0][len("RESULT "):])
            rates[world_size] = record["tokens_per_s"]
            mfu = f", MFU {record['mfu']:.1%}" if "mfu" in record else ""
            print(f"{args.preset} ({record['params'] / 1e6:.1f}M params), {args.strategy}, world size {world_size}: "
                  f"{record['tokens_per_s']:.0f} tokens/s{mfu}", flush=True)
    base = args.world_sizes[0]
    for world_size in args.world_sizes[1:]:
        print(f"  scaling {world_size} vs {base} rank(s): {rates[world_size] / rates[base]:.2f}× "
              f"(ideal {world_size / base:.0f}×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets-only", action="store_true")
    parser.add_argument("--world-sizes", type=int, nargs="+")
    parser.add_argument("--strategy", default="fsdp", choices=("fsdp", "ddp"))
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100/H200: 989)")
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return rank_worker(json.loads(args.rank_worker))
    if args.world_sizes:
        return scaling(args)
    torch.set_num_threads(args.threads)
    if args.presets_only:
        preset_rates(args.seq_len, args.batch_size, args.steps)
    else:
        compare(args.preset, args.seq_len, args.batch_size, args.steps, args.rounds)


if __name__ == "__main__":
    main()
