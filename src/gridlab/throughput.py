"""How fast this host trains a grid's models: what `gridlab plan` estimates time from, and says it used.

In order of preference:

1. **this run's finished training stages** (the parent's pretraining, train stages): the tokens each trained in how
   many seconds, from its last progress record (gridlab.progress), scaled to the parent's shape by the relative cost
   of a pruned model's step. They ran with the grid's workers side by side, so their pace includes that contention.
2. **a measurement on this host**: a few optimizer steps (AdamW, fp32, the grid's sequence length and batch size;
   fewer sequences a step for a large model) of a randomly initialised model of the parent's shape, with the
   threads one local worker gets (cores ÷ workers). It takes a few seconds and is cached under
   ``$GRIDLAB_CACHE/throughput/`` keyed by the shape, the sequences a step, the threads, the host and the torch
   version, so the next plan reuses it.
3. **an assumption**, labelled as one, only where measuring is impossible: a parent too large to take a step on
   this CPU in seconds (a GPU-scale model planned on a login node).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gridlab import atomic
from gridlab.backends.local import worker_threads
from gridlab.config import Schedule
from gridlab.inputs import cache_root
from gridlab.layout import RunPaths
from gridlab.model import architecture, init_model, param_counts
from gridlab.progress import read_progress
from gridlab.train import make_optimizer

# fp32 training throughput in tokens/s of one worker on the 2-core development machine (docs/engine.md,
# bench/train_throughput.py): micro idle; nano and mini with the machine shared with three busy processes; small: a
# 135M-parameter model at seq 256, batch 16, 2 threads; pico: 1-thread workers of the default study; smollm2-135m:
# the example's 1-thread workers side by side. Never the silent default: `gridlab plan` measures this host and uses
# this table only, labelled as an assumption, for a parent too large to measure here (``measure``'s ``assumed``).
ASSUMED_TOKENS_PER_S: dict[str, float] = {
    "pico": 5200.0,
    "micro": 790.0,
    "nano": 220.0,
    "mini": 136.0,
    "small": 94.0,
    "smollm2-135m": 41.0,
}

# A measurement steps a model of the parent's shape on this CPU. Beyond these it would take minutes (or the memory
# of a GPU node): the plan then says it assumed a throughput instead.
MAX_MEASURED_PARAMETERS = 2_000_000_000
MAX_SEQUENCE_FLOPS = 2e12          # 6 · parameters · seq_len of one sequence (~30 s at 70 GFLOP/s)
STEP_FLOPS = 5e10                  # sequences per measured step: about this many FLOPs (~1 s here)
MEASURE_SECONDS = 2.0              # timed steps after one warm-up step: at least 2, until this long


@dataclass(frozen=True)
class Throughput:
    """Tokens per second of one local worker training the parent's shape, and where the number comes from."""

    tokens_per_s: float | None
    source: str                    # "run", "measured", "cached", "assumed"
    basis: str                     # what the plan prints about it
    seconds: float = 0.0           # what measuring took now (0: not measured now)


def from_run(run_dir: Path, costs: dict[str, float]) -> Throughput | None:
    """The pace of this run's finished training stages (``costs``: stage id → a step's cost relative to the
    parent's), in parent-equivalent tokens per second; None when none has finished with a progress record."""
    run = RunPaths(run_dir)
    equivalent, seconds, stages = 0.0, 0.0, 0
    for stage_id, cost in costs.items():
        files = run.stage(stage_id)
        if not files.result.exists():
            continue
        record = read_progress(files)
        if not record or not record.get("finished") or not record.get("trained") or not record.get("elapsed_s"):
            continue
        equivalent += record["trained"] * cost
        seconds += record["elapsed_s"]
        stages += 1
    if not stages or seconds <= 0:
        return None
    speed = equivalent / seconds
    return Throughput(speed, "run", f"throughput of this run's {stages} finished training stage(s): {speed:,.0f} "
                                    f"parent-equivalent tokens/s per worker")


def measure(config, seq_len: int, batch_size: int, workers: int, assumed: float | None = None) -> Throughput:
    """The parent's shape measured on this host (or taken from the cache of an earlier measurement); an
    assumption (``assumed``, labelled) only when the shape is too large to measure here."""
    params = param_counts(config).total
    sequence_flops = 6 * params * seq_len
    if params > MAX_MEASURED_PARAMETERS or sequence_flops > MAX_SEQUENCE_FLOPS:
        why = f"a {params / 1e9:.1f}B-parameter parent is too large to measure on this host's CPU"
        if assumed is None:
            return Throughput(None, "assumed", f"{why}; no throughput to assume for it")
        return Throughput(assumed, "assumed", f"{why}: assumed throughput {assumed:,.0f} tokens/s per worker (a "
                                              f"table measured on a 2-core development machine, not on this host)")
    sequences = max(1, min(batch_size, int(STEP_FLOPS // sequence_flops)))
    threads = worker_threads(workers)
    key = _cache_key(config, seq_len, sequences, threads)
    shape = (f"the parent's shape, {sequences} × {seq_len} tokens a step"
             f"{f' (of {batch_size})' if sequences < batch_size else ''}, {threads} thread(s), one worker alone")
    cached = _read_cache(key)
    if cached is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(cached["measured_at"]))
        return Throughput(cached["tokens_per_s"], "cached",
                          f"throughput measured on this host at {when} ({shape}): {cached['tokens_per_s']:,.0f} "
                          f"tokens/s per worker, cached")
    started = time.perf_counter()
    speed = _measure(config, seq_len, sequences, threads)
    took = time.perf_counter() - started
    _write_cache(key, {"tokens_per_s": speed, "measured_at": time.time(), "seconds": took, "threads": threads,
                       "sequences": sequences, "seq_len": seq_len, "host": socket.gethostname()})
    return Throughput(speed, "measured", f"throughput measured on this host just now ({shape}; took {took:.1f} s): "
                                         f"{speed:,.0f} tokens/s per worker, cached for the next plan", took)


def _measure(config, seq_len: int, sequences: int, threads: int) -> float:
    """Tokens per second of AdamW steps (forward, backward, clipping, update) on random tokens."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = init_model(config, seed=0)
        model.train()
        optimizer = make_optimizer(model, Schedule())
        batch = torch.randint(0, config.vocab_size, (sequences, seq_len), generator=torch.Generator().manual_seed(0))
        params = [p for p in model.parameters() if p.requires_grad]

        def step() -> None:
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()   # warm-up: allocations, kernel selection
        steps, started = 0, time.perf_counter()
        while steps < 2 or (time.perf_counter() - started < MEASURE_SECONDS and steps < 50):
            step()
            steps += 1
        return steps * sequences * seq_len / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)


def _cache_key(config, seq_len: int, sequences: int, threads: int) -> str:
    identity = {"architecture": architecture(config), "seq_len": seq_len, "sequences": sequences,
                "threads": threads, "host": socket.gethostname(), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cache_file(key: str) -> Path:
    return cache_root() / "throughput" / f"{key}.json"


def _read_cache(key: str) -> dict[str, Any] | None:
    try:
        cached = json.loads(_cache_file(key).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(cached, dict) and isinstance(cached.get("tokens_per_s"), (int, float)) and cached["tokens_per_s"] > 0:
        return cached
    return None


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    try:
        atomic.write_json(_cache_file(key), entry)
    except OSError:   # a read-only cache only costs the next plan a measurement
        pass


def clear_cache() -> None:
    """Forget every cached measurement (the next plan measures again)."""
    shutil.rmtree(_cache_file("x").parent, ignore_errors=True)

