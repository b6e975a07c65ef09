"""The held-out estimator's stderr (gridlab.measure): exact on known inputs, and covering the whole split's value at
the nominal rate on a synthetic split like a code corpus, for one model's loss and for a paired seed-mean gap."""

import math

import numpy as np
import polars as pl
import pytest
from scipy.signal import lfilter

from gridlab.data import DocumentIndex
from gridlab.evaluate import HeldOut, document_windows, sample_windows
from gridlab.measure import paired_gap, paired_gap_stderr, ratio_stderr
from gridlab.spec import EvaluationSpec

SEQ_LEN = 64


def test_ratio_stderr_is_the_linearised_ratio_estimator_variance():
    # equal token counts: the mean of per-document means, whose stderr is the textbook sd / sqrt(n)
    means = np.random.default_rng(2).normal(3.0, 0.4, size=60)
    assert ratio_stderr(means * 100, np.full(60, 100)) == pytest.approx(means.std(ddof=1) / math.sqrt(60))
    # unequal: n/(n − 1) · Σ (Y − R X)² / (Σ X)²
    tokens = np.array([10.0, 200.0, 35.0, 80.0])
    loss = np.array([30.0, 500.0, 120.0, 170.0])
    ratio = loss.sum() / tokens.sum()
    assert ratio_stderr(loss, tokens) == pytest.approx(
        math.sqrt(4 / 3 * np.sum((loss - ratio * tokens) ** 2)) / tokens.sum())
    assert ratio_stderr(np.array([5.0]), np.array([2.0])) is None       # one document says nothing of the spread
    with pytest.raises(ValueError, match="scored token"):
        ratio_stderr(np.zeros(3), np.zeros(3))


def _frame(documents, tokens, loss_sum, replicate=0) -> pl.DataFrame:
    return pl.DataFrame({"document": np.asarray(documents, np.uint64), "tokens": np.asarray(tokens, float),
                         "loss_sum": np.asarray(loss_sum, float), "replicate": replicate})


def test_paired_gap_is_the_difference_of_seed_mean_losses_with_the_paired_stderr():
    rng = np.random.default_rng(0)
    keys, tokens = rng.integers(0, 2**63, 40), rng.integers(20, 400, 40).astype(float)
    arms = [[tokens * rng.normal(4.0 + shift, 0.3, 40) for _ in range(n)] for shift, n in ((0.0, 2), (0.2, 3))]
    frames = [pl.concat([_frame(keys, tokens, loss, r) for r, loss in enumerate(arm)]).sample(fraction=1.0, seed=1)
              for arm in arms]
    gap = paired_gap(*frames)
    seed_means = [np.mean([loss.sum() / tokens.sum() for loss in arm]) for arm in arms]
    assert gap.value == pytest.approx(seed_means[0] - seed_means[1])
    difference = np.mean(arms[0], axis=0) - np.mean(arms[1], axis=0)
    assert gap.stderr == pytest.approx(ratio_stderr(difference, tokens)) and gap.documents == 40
    assert paired_gap_stderr(*frames) == gap.stderr
    # pairing: a document's difficulty both arms share cancels from the gap's stderr
    hard = tokens * rng.normal(0, 1.0, 40)
    shared = [pl.concat([_frame(keys, tokens, loss + hard, r) for r, loss in enumerate(arm)]) for arm in arms]
    assert paired_gap(*shared).stderr == pytest.approx(gap.stderr)
    assert ratio_stderr(np.mean(arms[0], axis=0) + hard, tokens) > 3 * gap.stderr


def test_paired_gap_refuses_arms_not_measured_on_the_same_sample():
    keys, tokens = np.arange(1, 6), np.array([10.0, 20, 30, 40, 50])
    one = _frame(keys, tokens, tokens * 4)
    with pytest.raises(ValueError, match="different documents"):
        paired_gap(one, _frame(keys[:4], tokens[:4], tokens[:4] * 3))
    with pytest.raises(ValueError, match="different documents"):
        paired_gap(one, _frame(keys + 10, tokens, tokens * 3))
    with pytest.raises(ValueError, match="weighted the same documents differently"):
        paired_gap(one, _frame(keys, tokens * 2, tokens * 3))
    with pytest.raises(ValueError, match="replicates scored different documents"):
        paired_gap(pl.concat([one, _frame(keys[:3], tokens[:3], tokens[:3], 1)]), one)
    with pytest.raises(ValueError, match="weighted a document differently"):
        paired_gap(pl.concat([one, _frame(keys, tokens + 1, tokens, 1)]), one)
    with pytest.raises(ValueError, match="missing loss_sum"):
        paired_gap(one.drop("loss_sum"), one)


# ------------------------------------------------------------------------------------- coverage, by simulation

def _ar(rng, windows: np.ndarray, rho: float, sd: float) -> np.ndarray:
    """A stationary AR(1) series along each document's windows, restarted at each document."""
    total = int(windows.sum())
    first = np.concatenate([[0], np.cumsum(windows)[:-1]])
    noise = rng.normal(0, sd * math.sqrt(1 - rho ** 2), total)
    noise[first] = rng.normal(0, sd, len(first))
    series = lfilter([1.0], [1.0, -rho], noise)
    place = np.arange(total) - np.repeat(first, windows)
    carried = np.where(first > 0, series[np.maximum(first - 1, 0)], 0.0)   # the previous document's last value
    return series - rho ** (place + 1) * np.repeat(carried, windows)


def _within(rng, windows: np.ndarray, scale: float) -> np.ndarray:
    """Within-document variation of the per-token loss, correlated along the document as measured on the default
    study's pico models (bench/heldout_eval.py: window-to-window correlation ≈ 0.42 at lag 1, 0.2 at 5, 0.1 at 10,
    0.05 at 20; sd ≈ 0.43 nats for a pruned model, 0.27 for a pruned − random difference)."""
    total = int(windows.sum())
    return scale * (_ar(rng, windows, 0.9, 0.58) + _ar(rng, windows, 0.3, 0.60) + rng.normal(0, 0.53, total))


def synthetic_split(documents: int = 3000, seed: int = 0, log_median: float = 8.0, sigma: float = 1.15):
    """A split like the default corpus at seq_len 64: lognormal document lengths (median ~3,000 tokens, a long tail:
    mean windows per document ~2× the median; ``log_median`` and ``sigma`` change them), per-document losses that
    vary (sd 0.43) and drift with length, a first window that is harder, correlated windows within a document.
    Returns the index, the windows
    (document_windows) and the per-window loss sums of a first model and of a second one (another arm: shifted per
    document and per window). bench/heldout_eval.py --synthetic compares sample designs on it."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(2, rng.lognormal(log_median, sigma, documents)).astype(np.int64)
    windows = document_windows(lengths, SEQ_LEN)
    document, offset, size = windows
    count = np.bincount(document, minlength=documents)
    first = offset == 0
    level = 5.0 - 0.1 * (np.log(lengths) - log_median) + rng.normal(0, 0.43, documents)
    rate = level[document] + _within(rng, count, 0.43) + 0.6 * first
    shift = -0.9 + rng.normal(0, 0.24, documents)
    other = rate + shift[document] + _within(rng, count, 0.27) - 0.3 * first
    keys = rng.integers(0, 2**63, documents).astype(np.uint64)
    index = DocumentIndex.of(lengths, keys, int(lengths.sum()))
    return index, windows, rate * (size - 1), other * (size - 1)


def _window_positions(index, windows, sample) -> np.ndarray:
    """The sampled windows' positions among all of the split's windows (document_windows order)."""
    first = np.concatenate([[0], np.cumsum(np.bincount(windows[0], minlength=len(index)))[:-1]])
    return first[sample.documents][sample.window_document] + sample.window_offset // (SEQ_LEN - 1)


DEFAULT = EvaluationSpec()
DRAWS = 400


def test_the_loss_interval_covers_the_whole_split_value_at_the_default_size():
    index, windows, loss, _ = synthetic_split()
    predicted = windows[2] - 1
    whole = loss.sum() / predicted.sum()
    errors, stderrs, documents = [], [], []
    for seed in range(DRAWS):
        sample = sample_windows(index, SEQ_LEN, DEFAULT.max_sequences, DEFAULT.windows_per_document, seed)
        held = HeldOut.of(sample, loss[_window_positions(index, windows, sample)])
        errors.append(held.loss - whole)
        stderrs.append(held.stderr)
        documents.append(held.documents)
    errors, stderrs = np.array(errors), np.array(stderrs)
    covered = np.mean(np.abs(errors) <= 1.96 * stderrs)
    assert np.mean(documents) >= 250                       # a spread sample, not a few long documents
    assert 0.93 <= covered <= 0.98, covered
    assert abs(np.mean(errors)) < 0.2 * np.sqrt(np.mean(errors ** 2))           # no bias worth the name
    assert 0.85 < stderrs.mean() / np.sqrt(np.mean(errors ** 2)) < 1.2           # honest, not just wide


def test_the_paired_seed_mean_gap_interval_covers_at_the_default_size():
    """Two arms of two seeds each, every model scored on the same sample; the truth is the seed-mean gap on the
    whole split. paired_gap sees only what the report sees: per-document rows."""
    index, windows, first, second = synthetic_split(seed=1)
    rng = np.random.default_rng(5)
    predicted = windows[2] - 1
    document = windows[0]

    def replicate(loss):   # another seed of the same arm: a small per-document and per-window difference
        return loss + predicted * (rng.normal(0, 0.05, len(index))[document] + rng.normal(0, 0.1, len(loss)))

    arms = [[replicate(first) for _ in range(2)], [replicate(second) for _ in range(2)]]
    truth = np.mean([loss.sum() for loss in arms[0]]) / predicted.sum() - np.mean(
        [loss.sum() for loss in arms[1]]) / predicted.sum()
    errors, stderrs = [], []
    for seed in range(DRAWS):
        sample = sample_windows(index, SEQ_LEN, DEFAULT.max_sequences, DEFAULT.windows_per_document, seed)
        positions = _window_positions(index, windows, sample)
        frames = []
        for arm in arms:
            rows = [HeldOut.of(sample, loss[positions]) for loss in arm]
            frames.append(pl.concat([pl.DataFrame({"document": sample.keys, "tokens": held.doc_tokens,
                                                   "loss_sum": held.doc_loss}) for held in rows]))
        gap = paired_gap(*frames)
        errors.append(gap.value - truth)
        stderrs.append(gap.stderr)
    errors, stderrs = np.array(errors), np.array(stderrs)
    covered = np.mean(np.abs(errors) <= 1.96 * stderrs)
    assert 0.93 <= covered <= 0.98, covered
    assert 0.85 < stderrs.mean() / np.sqrt(np.mean(errors ** 2)) < 1.2


def test_the_report_side_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, gridlab.measure, gridlab.report.read; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"
