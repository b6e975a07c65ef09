"""The held-out loss's sample size: the stderr each size buys, against what it costs, on real models.

    python bench/heldout_eval.py [--run RUN_DIR] [--sizes 128 256 512 1024 2048 4096] [--draws 200]

Without --run it first trains a small study like the default one (pico parent pretrained on 150k tokens of the
stdlib corpus, wanda and minitron-width at ratio 0.5, pruned and random init, budgets 20k and 80k, seeds 0 and 1,
setting 1; ~5 min on 2 cores) with `gridlab submit`, in a temporary folder. Then, in this process:

1. every trained model (the parent and each budget branch) scores every document of the validation split
   (gridlab.evaluate.document_losses): the per-document losses of the whole split, and the whole-split loss;
2. the spread between documents (sd of the per-document mean loss), and for each sample size (in sequences of
   seq_len tokens, as `[evaluation] max_sequences`) over --draws sample seeds: the sd of the sampled val_loss around
   the whole-split value (the true standard error), the mean bootstrap stderr gridlab reports, and how often
   ±1.96 stderr covers the whole-split value — for one model's loss and for the paired difference pruned − random
   (same method, ratio, budget and seed: the report's gap);
3. for comparison only (it is not what gridlab does), the same statistics for a two-stage sample of the same
   cost — documents, then --windows random windows of each — from the per-window losses;
4. the time of one evaluation, the old way (the first 256 packed sequences, batch 16, as gridlab did before
   documents) against the new (a document sample of the default max_sequences), alternating in rounds, best round
   each; the ratio, and the default study's eval phase projected from it (641 evaluations; README: 342 s of busy
   worker time with the old evaluation).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gridlab.data import TokenShard  # noqa: E402
from gridlab.evaluate import bootstrap_stderr, heldout_loss, sample_documents, window_losses  # noqa: E402
from gridlab.layout import RunPaths  # noqa: E402
from gridlab.model import load_model  # noqa: E402
from gridlab.planfile import read_plan_record  # noqa: E402
from gridlab.results import read_payload  # noqa: E402
from gridlab.spec import EvaluationSpec  # noqa: E402

GRID = """
name = "heldout"
runs_dir = "runs"
seq_len = 64
ratios = [0.5]
inits = ["pruned", "random"]
budgets = ["20k", "80k"]
settings = [1]
seeds = [0, 1]
[parent]
preset = "pico"
tokens = "150k"
schedule = { lr = 3e-3, warmup_tokens = "10k", batch_size = 16, checkpoint_every_tokens = "50k" }
[corpus]
kind = "stdlib"
[tokenizer]
vocab_size = 1024
[calibration]
sequences = 64
[[methods]]
name = "wanda"
[[methods]]
name = "minitron-width"
[schedule]
kind = "wsd"
lr = 3e-3
warmup_tokens = "4k"
decay_fraction = 0.1
batch_size = 16
checkpoint_every_tokens = "50k"
[local]
workers = 2
"""
DEFAULT_STUDY_EVALS = 641
DEFAULT_STUDY_EVAL_BUSY_S = 342.0   # README: the eval phase's busy worker time with the old evaluation
OLD_SEQUENCES, OLD_BATCH = 256, 16


@torch.no_grad()
def old_heldout_loss(model, data: TokenShard, max_sequences: int = OLD_SEQUENCES, batch_size: int = OLD_BATCH):
    """The evaluation gridlab ran before documents (the baseline): the mean next-token loss over the first
    ``max_sequences`` packed sequences of the split."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, max_sequences, batch_size):
        batch = data[slice(start, min(start + batch_size, max_sequences))]
        logits = model(input_ids=batch).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                 reduction="sum").double()
    return total.item() / (max_sequences * (data.seq_len - 1))


def make_run(folder: Path) -> Path:
    (folder / "grid.toml").write_text(GRID)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "gridlab.cli", "submit", "grid.toml"], cwd=folder, env=env, check=False)
    return folder / "runs" / "heldout"


def run_models(run_dir: Path) -> tuple[TokenShard, dict[str, str], list[tuple[str, str]]]:
    """The validation shard, every trained model {label: path}, and the (pruned, random) label pairs."""
    record = read_plan_record(run_dir)
    paths = RunPaths(run_dir)
    data = read_payload(paths.stage(next(s.id for s in record.stages if s.kind == "data")))
    parent = read_payload(paths.stage(next(s.id for s in record.stages if s.kind == "parent")))
    models = {"parent": parent.model_path}
    arms: dict[tuple, dict[str, str]] = {}
    for cell in record.cells:
        if not cell.train_stage or cell.budget_tokens == 0:
            continue
        branch = read_payload(paths.stage(cell.train_stage)).branch(cell.trained_tokens)
        label = f"{cell.method} {cell.ratio} {cell.init} B={cell.budget_tokens} seed {cell.seed}"
        models[label] = branch.path
        arms.setdefault((cell.method, cell.ratio, cell.setting, cell.budget_tokens, cell.seed), {})[cell.init] = label
    pairs = [(arm["pruned"], arm["random"]) for arm in arms.values() if {"pruned", "random"} <= set(arm)]
    return TokenShard.open(data.shards["validation"]), models, pairs


def sampling(doc_loss: np.ndarray, doc_tokens: np.ndarray, index, size_tokens: int, draws: int) -> dict:
    """Over ``draws`` sample seeds: the sampled estimate's sd around the whole-split value, the mean bootstrap
    stderr, its coverage at ±1.96, the mean number of documents."""
    whole = doc_loss.sum() / doc_tokens.sum()
    estimates, stderrs, documents = [], [], []
    for seed in range(draws):
        chosen = sample_documents(index, size_tokens, seed)
        estimates.append(doc_loss[chosen].sum() / doc_tokens[chosen].sum())
        stderr = bootstrap_stderr(doc_loss[chosen], doc_tokens[chosen], seed)
        stderrs.append(np.nan if stderr is None else stderr)
        documents.append(len(chosen))
    estimates, stderrs = np.array(estimates), np.array(stderrs)
    return {"true_se": float(np.sqrt(np.mean((estimates - whole) ** 2))), "boot_se": float(np.nanmean(stderrs)),
            "cover": float(np.mean(np.abs(estimates - whole) <= 1.96 * stderrs)), "docs": float(np.mean(documents))}


def two_stage(window_loss: np.ndarray, windows, index, size: int, per_document: int, draws: int) -> dict:
    """The same statistics for a two-stage sample (the comparison, not gridlab's design): documents in the seeded
    order, ``per_document`` random windows of each, until ``size`` windows; each document's loss estimated as its
    tokens × its windows' mean loss per token; the ratio over documents, bootstrapped over documents."""
    document, _, width = windows
    predicted = width - 1
    of_document = np.split(np.argsort(document, kind="stable"), np.cumsum(np.bincount(document))[:-1])
    whole = window_loss.sum() / predicted.sum()
    estimates, stderrs, counts = [], [], []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        order = np.argsort(rng.random(len(index)))
        doc_loss, doc_tokens, used = [], [], 0
        for d in order:
            mine = of_document[d]
            taken = mine if len(mine) <= per_document else rng.choice(mine, per_document, replace=False)
            doc_loss.append(index.lengths[d] * window_loss[taken].sum() / predicted[taken].sum())
            doc_tokens.append(index.lengths[d])
            used += len(taken)
            if used >= size:
                break
        doc_loss, doc_tokens = np.array(doc_loss), np.array(doc_tokens)
        estimates.append(doc_loss.sum() / doc_tokens.sum())
        stderr = bootstrap_stderr(doc_loss, doc_tokens, seed)
        stderrs.append(np.nan if stderr is None else stderr)
        counts.append(len(doc_loss))
    estimates, stderrs = np.array(estimates), np.array(stderrs)
    return {"true_se": float(np.sqrt(np.mean((estimates - whole) ** 2))), "boot_se": float(np.nanmean(stderrs)),
            "cover": float(np.mean(np.abs(estimates - whole) <= 1.96 * stderrs)), "docs": float(np.mean(counts))}


HEADER = (f"{'size':>6} {'docs':>6} | {'val_loss se':>11} {'boot':>6} {'cover':>6} | {'paired se':>9} {'boot':>6} "
          f"{'cover':>6}")


def table_row(size, losses: list[dict], gaps: list[dict]) -> str:
    """One size: the statistics averaged over the models (val_loss) and over the pairs (paired difference)."""
    mean = {key: np.mean([row[key] for row in losses]) for key in losses[0]}
    paired = {key: np.mean([row[key] for row in gaps]) for key in gaps[0]} if gaps else dict.fromkeys(mean, np.nan)
    return (f"{size:>6} {mean['docs']:>6.1f} | {mean['true_se']:>11.4f} {mean['boot_se']:>6.4f} {mean['cover']:>6.2f} "
            f"| {paired['true_se']:>9.4f} {paired['boot_se']:>6.4f} {paired['cover']:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run folder (runs/<grid>); default: train one")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=4, help="windows per document of the two-stage comparison")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = args.run or make_run(Path(tempfile.mkdtemp(prefix="heldout-")))
    validation, models, pairs = run_models(run_dir)
    index = validation.documents()
    seq_len = validation.seq_len
    default = EvaluationSpec().max_sequences
    print(f"validation split: {len(index)} documents, {int(index.lengths.sum()):,} tokens (= "
          f"{index.lengths.sum() / seq_len:,.0f} sequences of {seq_len}); document tokens: median "
          f"{np.median(index.lengths):,.0f}, mean {index.lengths.mean():,.0f}, max {index.lengths.max():,}")

    every = np.arange(len(index))
    per_document: dict[str, np.ndarray] = {}
    per_window: dict[str, np.ndarray] = {}
    print(f"\n{'model':<42} {'whole split':>11} {'first 256':>10} {'bias':>7} {'doc sd':>7} {'tok/s':>7}")
    for label, path in models.items():
        model = load_model(path)[0]
        start = time.perf_counter()
        windows, per_window[label] = window_losses(model, validation, index, every)
        doc_tokens = index.lengths
        doc_loss = per_document[label] = np.bincount(windows[0], weights=per_window[label], minlength=len(index))
        speed = doc_tokens.sum() / (time.perf_counter() - start)
        whole = doc_loss.sum() / doc_tokens.sum()
        first = old_heldout_loss(model, validation)
        print(f"{label:<42} {whole:>11.4f} {first:>10.4f} {first - whole:>+7.3f} "
              f"{np.std(doc_loss / doc_tokens, ddof=1):>7.3f} {speed:>7,.0f}")
    tokens = index.lengths

    print(f"\nsampling over {args.draws} seeds (sizes in sequences of {seq_len}; se: sd of the estimate around the "
          f"whole-split value; boot: mean bootstrap stderr; cover: share within ±1.96 boot)")
    print(HEADER)
    for size in [*args.sizes, None]:
        size_tokens = int(index.lengths.sum()) + 1 if size is None else size * seq_len
        print(table_row("whole" if size is None else size,
                        [sampling(per_document[label], tokens, index, size_tokens, args.draws) for label in models],
                        [sampling(per_document[a] - per_document[b], tokens, index, size_tokens, args.draws)
                         for a, b in pairs]))

    print(f"\nfor comparison, not gridlab's design: a two-stage sample of the same cost (documents in a seeded order, "
          f"{args.windows} random windows of each, until as many windows as the size's sequences)")
    print(HEADER)
    for size in args.sizes:
        print(table_row(size, [two_stage(per_window[label], windows, index, size, args.windows, args.draws)
                               for label in models],
                        [two_stage(per_window[a] - per_window[b], windows, index, size, args.windows, args.draws)
                         for a, b in pairs]))

    print(f"\none evaluation, best of {args.rounds} rounds (the parent and the first pair's models):")
    timed = [models["parent"], *(models[label] for label in pairs[0])] if pairs else [models["parent"]]
    loaded = [load_model(path)[0] for path in timed]
    old_s, new_s = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for model in loaded:
            old_heldout_loss(model, validation)
        old_s.append((time.perf_counter() - start) / len(loaded))
        start = time.perf_counter()
        for model in loaded:
            held = heldout_loss(model, validation, max_sequences=default)
        new_s.append((time.perf_counter() - start) / len(loaded))
    old, new = min(old_s), min(new_s)
    busy = DEFAULT_STUDY_EVAL_BUSY_S + DEFAULT_STUDY_EVALS * (new - old)
    print(f"  old (first {OLD_SEQUENCES} sequences, batch {OLD_BATCH}): {old:.3f} s; new (max_sequences {default}: "
          f"{held.documents} documents, {held.tokens:,} tokens): {new:.3f} s; ratio new/old {new / old:.2f}")
    print(f"  default study's eval phase: {DEFAULT_STUDY_EVALS} evaluations, busy {DEFAULT_STUDY_EVAL_BUSY_S:.0f} s "
          f"→ {busy:.0f} s projected (+{busy - DEFAULT_STUDY_EVAL_BUSY_S:.0f} s; two workers: about "
          f"+{(busy - DEFAULT_STUDY_EVAL_BUSY_S) / 2:.0f} s of wall time)")


if __name__ == "__main__":
    main()
