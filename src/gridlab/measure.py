"""The held-out loss's estimator and its document-sampling stderr: pure functions over per-document sums, no torch.

A held-out sample (gridlab.evaluate.sample_windows) scores some windows of some documents. Each sampled document d
carries two weighted sums, its estimated loss sum Y_d and its estimated token count X_d (each window's summed loss
and predicted tokens, times N_d / m_d: the document's windows over the windows sampled from it). The loss is the
ratio estimator over documents,

    R = Σ_d Y_d / Σ_d X_d,

an estimate of the whole split's token-weighted mean loss. Its stderr is the linearised (Taylor) ratio-estimator
variance over documents, the documents treated as the units of a with-replacement sample (the ultimate-cluster
variance: it includes the within-document sampling of windows, and leaves out any finite-population correction, so
it errs on the wide side when the sample holds most of the split):

    var(R) = n / (n − 1) · Σ_d (Y_d − R · X_d)² / (Σ_d X_d)².

A gap between two models scored on the same sample (the same documents, windows and weights) is a ratio with the
same denominator, so ``paired_gap`` is the same computation on the difference of their Y_d — the pairing removes the
documents' shared difficulty from the stderr. Why linearisation rather than a bootstrap, and its coverage measured by
simulation: docs/engine.md ("Evaluation"), tests/test_measure.py.

The report imports this module (the per-document rows come from results.duckdb's ``document_losses`` table,
gridlab.report.read.document_losses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

# An eval stage's document_losses.parquet (gridlab.stages.write_document_losses), one row per document of each
# held-out loss: the metric, the document's 64-bit key, its weighted token count X_d and loss sum Y_d, its windows
# N_d and how many were scored m_d. The database's document_losses table holds the same columns and the eval stage.
DOCUMENT_LOSS_SCHEMA = {"metric": pl.String, "document": pl.UInt64, "tokens": pl.Float64, "loss_sum": pl.Float64,
                        "windows": pl.Int64, "sampled": pl.Int64}
# The columns paired_gap needs of a per-document frame.
DOCUMENT_COLUMNS = ("document", "tokens", "loss_sum")
# A grid that sweeps learning rates measures the held-out loss on both halves of the validation documents
# (gridlab.evaluate.document_parts): ``val_loss`` on the "report" half (what the report compares) and this metric on
# the "select" half (what chooses each arm's lr: gridlab.report.recipes), each from its own documents.
SELECT_METRIC = "val_loss/select"


def ratio_stderr(loss_sum: np.ndarray, tokens: np.ndarray) -> float | None:
    """The linearised stderr of Σ loss_sum / Σ tokens over the documents (module docstring), with the n/(n − 1)
    correction; None for fewer than two documents (one says nothing about the spread)."""
    loss_sum, tokens = np.asarray(loss_sum, np.float64), np.asarray(tokens, np.float64)
    n = len(loss_sum)
    if n < 2:
        return None
    total = tokens.sum()
    if total <= 0:
        raise ValueError("a held-out loss needs at least one scored token")
    residual = loss_sum - loss_sum.sum() / total * tokens
    return float(math.sqrt(n / (n - 1) * np.sum(residual ** 2)) / total)


@dataclass(frozen=True)
class Gap:
    """A paired gap (first arm − second arm) in nats per token, its document-sampling stderr (None for fewer than
    two documents) and how many documents it is measured on."""

    value: float
    stderr: float | None
    documents: int


def _seed_mean(frame: pl.DataFrame, arm: str) -> pl.DataFrame:
    """One row per document: its tokens and its loss_sum averaged over the arm's replicates (rows of the same
    document). Every replicate must have scored every document of the sample with the same weights."""
    missing = [column for column in DOCUMENT_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{arm}: a per-document frame needs columns {', '.join(DOCUMENT_COLUMNS)}; "
                         f"missing {', '.join(missing)}")
    if frame.height == 0:
        raise ValueError(f"{arm}: no documents")
    per_document = frame.group_by("document").agg(
        rows=pl.len(), tokens=pl.col("tokens").first(), spread=pl.col("tokens").max() - pl.col("tokens").min(),
        loss_sum=pl.col("loss_sum").mean())
    if per_document["rows"].n_unique() != 1:
        raise ValueError(f"{arm}: its replicates scored different documents (a document appears "
                         f"{per_document['rows'].min()} to {per_document['rows'].max()} times)")
    if float(per_document["spread"].max()) > 1e-9 * float(per_document["tokens"].abs().max()):
        raise ValueError(f"{arm}: its replicates weighted a document differently (not the same sample)")
    return per_document.select("document", "tokens", "loss_sum").sort("document")


def paired_gap(first: pl.DataFrame, second: pl.DataFrame) -> Gap:
    """The seed-mean gap first − second between two arms measured on the same held-out sample, and its
    document-sampling stderr.

    Each frame holds per-document rows (``document``, ``tokens``, ``loss_sum``: document_losses.parquet or the
    database table, one metric) of one or more replicates (e.g. the seeds of a cell's pruned arm: several rows per
    document, one per replicate). A replicate's loss is Σ loss_sum / Σ tokens; the gap is the mean over the first
    arm's replicates minus the mean over the second's — exactly the difference of the seed-mean losses — and its
    stderr is the linearised ratio-estimator stderr of the documents' paired differences (module docstring). It
    is the uncertainty of measuring on this sample rather than on the whole split; the seeds' spread around the gap
    measured on the sample is a separate term (the sample is the same for every seed, so it does not average out:
    add the two variances). A ValueError when the arms were not measured on the same sample."""
    a, b = _seed_mean(first, "first arm"), _seed_mean(second, "second arm")
    joined = a.join(b, on="document", how="full", suffix="_second", coalesce=True)
    if joined.height != a.height or joined.height != b.height or joined["tokens_second"].null_count():
        raise ValueError(f"the arms were measured on different documents ({a.height} and {b.height}, "
                         f"{a.join(b, on='document').height} shared): not the same held-out sample")
    tokens = joined["tokens"].to_numpy()
    if not np.allclose(tokens, joined["tokens_second"].to_numpy(), rtol=1e-9, atol=0):
        raise ValueError("the arms weighted the same documents differently: not the same held-out sample")
    difference = joined["loss_sum"].to_numpy() - joined["loss_sum_second"].to_numpy()
    return Gap(value=float(difference.sum() / tokens.sum()), stderr=ratio_stderr(difference, tokens),
               documents=joined.height)


def paired_gap_stderr(first: pl.DataFrame, second: pl.DataFrame) -> float | None:
    """The document-sampling stderr of the seed-mean gap first − second (``paired_gap``'s stderr)."""
    return paired_gap(first, second).stderr
