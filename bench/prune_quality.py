"""Achieved ratio and held-out loss right after pruning (no retraining), per method and ratio, on a micro parent.

    python bench/prune_quality.py [--work-dir /tmp/gridlab-prune-quality] [--parent-tokens 600000]

Pretrains a micro Llama on the standard-library corpus with gridlab.data / gridlab.train (cached in --work-dir),
then prunes a copy with every method at 0.5/0.6/0.7/0.8 using the calibration split and measures the loss on the
validation split with gridlab.evaluate. The parent's own loss and a random-init model's loss are the baselines.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from gridlab.config import Schedule  # noqa: E402
from gridlab.data import CorpusSource, SplitFractions, TokenShard, build_shards, load_tokenizer, train_tokenizer  # noqa: E402
from gridlab.evaluate import heldout_loss  # noqa: E402
from gridlab.model import init_model, load_model, make_config  # noqa: E402
from gridlab.pruning import METHODS, prune  # noqa: E402
from gridlab.spec import EvaluationSpec  # noqa: E402
from gridlab.train import train  # noqa: E402

RATIOS = (0.5, 0.6, 0.7, 0.8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gridlab-prune-quality"))
    parser.add_argument("--parent-tokens", type=int, default=600_000)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration-sequences", type=int, default=64)
    parser.add_argument("--validation-sequences", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source, fractions = CorpusSource(kind="stdlib"), SplitFractions()
    tokenizer_dir = args.work_dir / f"tokenizer-{args.vocab}"
    if not tokenizer_dir.exists():
        train_tokenizer(source, fractions, args.vocab, tokenizer_dir)
    vocab = len(load_tokenizer(tokenizer_dir))
    shards = build_shards(source, tokenizer_dir, fractions, args.seq_len, args.work_dir / "shards")
    pretrain, calibration_shard, validation = (TokenShard.open(shards[s]) for s in ("pretrain", "calibration",
                                                                                      "validation"))
    config = make_config("micro", vocab_size=vocab, seq_len=args.seq_len)
    parent_dir = args.work_dir / f"parent-{args.parent_tokens}"
    branch = parent_dir / "branches" / str(args.parent_tokens)
    if not branch.exists():
        start = time.perf_counter()
        train(init_model(config, seed=0), pretrain,
              Schedule(batch_size=16, lr=3e-3, warmup_tokens=args.parent_tokens // 20,
                       checkpoint_every_tokens=args.parent_tokens // 4, device="cpu"),
              [args.parent_tokens], parent_dir, seed=0)
        print(f"pretrained the micro parent on {args.parent_tokens} tokens in {time.perf_counter() - start:.0f} s")
    parent, _ = load_model(branch)
    calibration = calibration_shard[slice(0, min(args.calibration_sequences, calibration_shard.n_sequences))]

    def loss(model) -> float:
        return heldout_loss(model, validation, max_sequences=args.validation_sequences,
                            windows_per_document=EvaluationSpec().windows_per_document).loss

    print(f"parent: {sum(p.numel() for p in parent.parameters()) / 1e6:.2f}M params, "
          f"validation loss {loss(parent):.4f}; random init {loss(init_model(config, seed=1)):.4f}; "
          f"calibration {tuple(calibration.shape)}")
    print(f"{'method':<16}{'granularity':<12}" + "".join(f"{f'r={r}':>18}" for r in RATIOS))
    print(f"{'':<28}" + "".join(f"{'achieved  loss':>18}" for _ in RATIOS))
    for method in sorted(METHODS, key=lambda m: (["depth", "width", "sparse"].index(METHODS[m].granularity), m)):
        cells = []
        for ratio in RATIOS:
            result = prune(copy.deepcopy(parent), method, ratio, calibration)
            cells.append(f"{result.achieved_ratio:>10.4f}{loss(result.model):>8.3f}")
        print(f"{method:<16}{METHODS[method].granularity:<12}" + "".join(cells), flush=True)


if __name__ == "__main__":
    main()
