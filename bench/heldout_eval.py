"""The held-out sample's design and size: the error and stderr each buys, against what it costs, on real models.

    python bench/heldout_eval.py [--run RUN_DIR] [--cache FILE.npz] [--sizes 256 512 1024 2048]
                                 [--windows 1 2 4 8] [--draws 200]
    python bench/heldout_eval.py --synthetic [DOCUMENTS LOG_MEDIAN SIGMA] [--sizes …] [--windows …] [--draws …]

Without --run it first trains a small study like the default one (pico parent pretrained on 150k tokens of the
stdlib corpus, wanda and minitron-width at ratio 0.5, pruned and random init, budgets 20k and 80k, seeds 0 and 1,
setting 1; ~5 min on 2 cores) with `gridlab submit`, in a temporary folder. Then, in this process:

1. every trained model (the parent and each budget branch) scores every window of every validation document
   (gridlab.evaluate.window_losses on the whole split; --cache keeps them for a rerun): the whole-split loss, and
   the old evaluation's (the first 256 packed rows) bias against it;
2. for each design — whole documents (the branch's first design) and two-stage samples of up to k windows per
   document (gridlab's, ``[evaluation] windows_per_document``) — and each size (``max_sequences``, in windows), over
   --draws sample seeds: the documents sampled, the sampled val_loss's error around the whole-split value (rmse),
   the mean stderr gridlab reports, how often ±1.96 stderr holds the whole-split value, and the same for the paired
   difference pruned − random of one method, ratio, budget and seed (the report's gap);
   --synthetic: the same table on tests/test_measure.py's synthetic split (3,000 documents with lognormal lengths,
   median e^8 tokens, σ 1.15, or as given; correlated windows: a split with more documents than a sample takes,
   which the default study's has not), and nothing else;
3. the time of one evaluation: the old way (the first 256 packed sequences, batch 16) against gridlab's sample at
   each size (two-stage with the default windows_per_document, and whole documents), alternating in rounds, best
   round each; the ratios, and the default study's eval phase projected from them (641 evaluations; README: 342 s
   of busy worker time with the old evaluation, 2 workers, the whole study 1,145 s).
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
from gridlab.evaluate import HeldOut, heldout_loss, sample_windows, window_losses  # noqa: E402
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
DEFAULT_STUDY_WALL_S = 1145.0       # README: `gridlab submit` of the default study, 2 workers
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


def whole_split_losses(validation: TokenShard, models: dict[str, str], cache: Path | None):
    """Every model's loss on every window of the split ({label: per-window loss sums}), from --cache when it holds
    them; and the old evaluation of each (printed as it goes)."""
    index = validation.documents()
    every = sample_windows(index, validation.seq_len, None, None)
    if cache and cache.exists():
        stored = np.load(cache)
        if set(models) <= set(stored.files):
            return every, {label: stored[label] for label in models}
    per_window = {}
    print(f"\n{'model':<42} {'whole split':>11} {'first 256':>10} {'bias':>7} {'tok/s':>7}")
    for label, path in models.items():
        model = load_model(path)[0]
        start = time.perf_counter()
        per_window[label] = window_losses(model, validation, index, every)
        speed = (every.window_size - 1).sum() / (time.perf_counter() - start)
        whole = per_window[label].sum() / (every.window_size - 1).sum()
        first = old_heldout_loss(model, validation)
        print(f"{label:<42} {whole:>11.4f} {first:>10.4f} {first - whole:>+7.3f} {speed:>7,.0f}", flush=True)
    if cache:
        np.savez(cache, **per_window)
    return every, per_window


def sampling(index, every, losses: np.ndarray, differences: np.ndarray, seq_len: int, size: int, k: int | None,
             draws: int) -> dict[str, float]:
    """Over ``draws`` sample seeds of one design: mean documents; per model (rows of ``losses``, per-window loss sums
    over the whole split) and per pair (rows of ``differences``), the rmse of the sampled estimate around the
    whole-split value, the mean stderr, and the coverage of ±1.96 stderr."""
    predicted = (every.window_size - 1).astype(np.float64)
    first = np.concatenate([[0], np.cumsum(every.windows)[:-1]])
    truth = {"loss": losses.sum(1) / predicted.sum(), "gap": differences.sum(1) / predicted.sum()}
    errors = {"loss": [], "gap": []}
    stderrs = {"loss": [], "gap": []}
    documents = []
    for seed in range(draws):
        sample = sample_windows(index, seq_len, size, k, seed)
        positions = first[sample.documents][sample.window_document] + sample.window_offset // (seq_len - 1)
        documents.append(len(sample.documents))
        for name, rows in (("loss", losses), ("gap", differences)):
            held = [HeldOut.of(sample, row[positions]) for row in rows]
            errors[name].append([h.loss for h in held] - truth[name])
            stderrs[name].append([np.nan if h.stderr is None else h.stderr for h in held])
    out = {"docs": float(np.mean(documents))}
    for name in errors:
        error, stderr = np.array(errors[name]), np.array(stderrs[name])       # draws × models
        out[f"{name}_rmse"] = float(np.mean(np.sqrt(np.mean(error ** 2, axis=0))))
        out[f"{name}_se"] = float(np.nanmean(stderr))
        out[f"{name}_cover"] = float(np.mean(np.abs(error) <= 1.96 * stderr))
    return out


HEADER = (f"{'design':>14} {'size':>6} {'docs':>6} | {'loss rmse':>9} {'stderr':>7} {'cover':>6} | {'gap rmse':>8} "
          f"{'stderr':>7} {'cover':>6}")


def row(design: str, size, stats: dict) -> str:
    return (f"{design:>14} {size:>6} {stats['docs']:>6.1f} | {stats['loss_rmse']:>9.4f} {stats['loss_se']:>7.4f} "
            f"{stats['loss_cover']:>6.2f} | {stats['gap_rmse']:>8.4f} {stats['gap_se']:>7.4f} "
            f"{stats['gap_cover']:>6.2f}")


def timing(validation: TokenShard, models: list, sizes: list[int], k: int, rounds: int) -> None:
    """One evaluation, old against new, alternating in rounds (best round each), and the projected study."""
    designs = {"old (first 256 rows)": lambda model: old_heldout_loss(model, validation)}
    for size in sizes:
        designs[f"k={k}, {size} windows"] = (
            lambda model, size=size: heldout_loss(model, validation, max_sequences=size, windows_per_document=k))
        designs[f"whole docs, {size}"] = (
            lambda model, size=size: heldout_loss(model, validation, max_sequences=size, windows_per_document=None))
    best = dict.fromkeys(designs, float("inf"))
    for _ in range(rounds):
        for name, evaluate in designs.items():
            start = time.perf_counter()
            for model in models:
                evaluate(model)
            best[name] = min(best[name], (time.perf_counter() - start) / len(models))
    old = best["old (first 256 rows)"]
    index = validation.documents()
    print(f"\n{'evaluation':<26} {'tokens':>7} {'s / eval':>8} {'× old':>6} | default study's eval phase (busy s): "
          f"{'+Δs':>6} {'×ratio':>7} | study wall (min, 2 workers)")
    for name, seconds in best.items():
        if name.startswith("old"):
            tokens = OLD_SEQUENCES * (validation.seq_len - 1)
        else:
            size = int(name.split(",")[1].split()[0])
            k_of = None if name.startswith("whole") else k
            tokens = int((sample_windows(index, validation.seq_len, size, k_of, 0).window_size - 1).sum())
        ratio = seconds / old
        additive = DEFAULT_STUDY_EVAL_BUSY_S + DEFAULT_STUDY_EVALS * (seconds - old)
        scaled = DEFAULT_STUDY_EVAL_BUSY_S * ratio   # as if all of an eval stage's busy time were the held-out loss
        wall = (DEFAULT_STUDY_WALL_S + (max(additive, scaled) - DEFAULT_STUDY_EVAL_BUSY_S) / 2) / 60
        print(f"{name:<26} {tokens:>7,} {seconds:>8.3f} {ratio:>6.2f} | {additive:>43.0f} {scaled:>7.0f} | "
              f"{wall:.1f}")


def within_document(every, window_loss: np.ndarray, what: str) -> None:
    """How alike a document's windows are: the sd of the per-token window loss around its document's mean, and the
    correlation of those deviations between windows 1, 5, 10, 20 apart in the same document (full windows only)."""
    predicted = every.window_size - 1
    rate = window_loss / predicted
    document = every.window_document
    mean = np.bincount(document, weights=window_loss) / np.bincount(document, weights=predicted)
    deviation = rate - mean[document]
    full = every.window_size == every.window_size.max()
    correlation = []
    for lag in (1, 5, 10, 20):
        same = (document[lag:] == document[:-lag]) & full[lag:] & full[:-lag]
        correlation.append(np.corrcoef(deviation[:-lag][same], deviation[lag:][same])[0, 1])
    print(f"within a document, {what}: sd of a window's per-token loss around the document's "
          f"{deviation[full].std():.2f} nats (documents' sd {mean.std():.2f}); correlation at lags 1, 5, 10, 20: "
          + ", ".join(f"{c:.2f}" for c in correlation))


def print_designs(index, every, losses, differences, seq_len, sizes, windows, draws) -> None:
    default = EvaluationSpec()
    print(f"\nover {draws} sample seeds, {len(losses)} models and {len(differences)} pruned − random pairs: rmse of "
          f"the sampled value around the whole split's, mean stderr, share within ±1.96 stderr (defaults: "
          f"max_sequences {default.max_sequences}, windows_per_document {default.windows_per_document})")
    print(HEADER)
    for size in sizes:
        for k in [None, *windows]:
            stats = sampling(index, every, losses, differences, seq_len, size, k, draws)
            print(row("whole docs" if k is None else f"k={k}", size, stats), flush=True)


def synthetic(args) -> None:
    """The design table on the tests' synthetic split (one model and one pair)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from test_measure import SEQ_LEN, synthetic_split

    documents, log_median, sigma = args.synthetic
    index, windows, first, second = synthetic_split(int(documents), 0, log_median, sigma)
    every = sample_windows(index, SEQ_LEN, None, None)
    print(f"synthetic split: {len(index)} documents, {every.n_windows:,} windows of {SEQ_LEN}; windows per document: "
          f"median {np.median(every.windows):.0f}, mean {every.windows.mean():.1f}, max {every.windows.max()}")
    print_designs(index, every, first[None], (first - second)[None], SEQ_LEN, args.sizes, args.windows, args.draws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run folder (runs/<grid>); default: train one")
    parser.add_argument("--cache", type=Path, help="an .npz keeping the whole-split window losses between runs")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="windows per document of the two-stage designs compared")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--synthetic", type=float, nargs="*", metavar="DOCUMENTS LOG_MEDIAN SIGMA",
                        help="only the design table, on a synthetic split (default 3000 8.0 1.15)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic is not None:
        args.synthetic = [*args.synthetic, *(3000, 8.0, 1.15)[len(args.synthetic):]]
        return synthetic(args)
    run_dir = args.run or make_run(Path(tempfile.mkdtemp(prefix="heldout-")))
    validation, models, pairs = run_models(run_dir)
    index = validation.documents()
    seq_len = validation.seq_len
    default = EvaluationSpec()
    every, per_window = whole_split_losses(validation, models, args.cache)
    print(f"validation split: {len(index)} documents, {int(index.lengths.sum()):,} tokens, {every.n_windows:,} "
          f"windows of {seq_len}; windows per document: median {np.median(every.windows):.0f}, mean "
          f"{every.windows.mean():.1f}, max {every.windows.max()}")
    losses = np.stack([per_window[label] for label in models])
    differences = np.stack([per_window[a] - per_window[b] for a, b in pairs])
    within_document(every, per_window["parent"], "the parent's loss")
    within_document(every, differences[0], f"the gap {pairs[0][0]} − random")
    print_designs(index, every, losses, differences, seq_len, args.sizes, args.windows, args.draws)

    print(f"\none evaluation, best of {args.rounds} rounds (the parent and the first pair's models), on this machine:")
    timed = [models["parent"], *(models[label] for label in pairs[0])] if pairs else [models["parent"]]
    timing(validation, [load_model(path)[0] for path in timed], [512, 1024], default.windows_per_document,
           args.rounds)


if __name__ == "__main__":
    main()
