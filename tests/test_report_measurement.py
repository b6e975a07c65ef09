"""The held-out sample's error in the report's intervals, proven by simulation: every model of a grid is scored on
the same sample of documents, so the sample's error of a gap is common to all seeds — the seeds' spread does not
contain it and more seeds do not shrink it. stats.measurement_error measures it from the per-document losses
(the paired ratio-estimator stderr of gridlab.measure, vectorised) and gap_table adds it to the seeds' variance."""

import numpy as np
import polars as pl
import pytest

from gridlab.measure import paired_gap
from gridlab.report import stats as S

POPULATION = 4000   # documents of the whole validation split
SAMPLED = 150       # documents the held-out sample scores (the default study: its 145 validation files)
SEEDS = 3
REPS = 800
TRUE_GAP = -0.10    # pruned − random on the whole split, averaged over seeds


def _population(rng: np.random.Generator):
    """A split whose documents differ in length and in how much pruning helps on them (the pairing's residual)."""
    tokens = rng.lognormal(4.0, 0.8, POPULATION)
    random_loss = 3.0 + rng.normal(0, 0.5, POPULATION)
    benefit = rng.normal(0, 0.6, POPULATION)  # per-document gap: heterogeneous, so the sample matters
    benefit += TRUE_GAP - np.sum(benefit * tokens) / tokens.sum()
    return tokens, random_loss, random_loss + benefit


def _study(rng: np.random.Generator, seed_sd: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    """REPS replicate studies (one cell each, told apart by `method`): each draws its own document sample (with
    replacement, as the estimator assumes) scored by every seed of both arms, and per seed a seed effect on the gap.
    Returns the seed-level headline values and the per-document losses, as the report reads them."""
    tokens, random_loss, pruned_loss = _population(rng)
    picked = rng.integers(0, POPULATION, (REPS, SAMPLED))
    x = tokens[picked]
    seed_effect = rng.normal(0, seed_sd, (REPS, SEEDS))
    value_rows, document_rows = [], []
    for init, loss in (("random", random_loss), ("pruned", pruned_loss)):
        shift = seed_effect[:, :, None] if init == "pruned" else np.zeros((REPS, SEEDS, 1))
        per_token = loss[picked][:, None, :] + shift
        sums = per_token * x[:, None, :]                                    # (reps, seeds, documents)
        values = sums.sum(axis=2) / x.sum(axis=1)[:, None]
        for rep in range(REPS):
            for seed in range(SEEDS):
                cell = f"{init}-{rep}-{seed}"
                value_rows.append(dict(cell_id=cell, granularity="depth", method=f"m{rep}", ratio=0.5, init=init,
                                       setting=1, budget_tokens=1000, trained_tokens=1000, seed=seed,
                                       value=float(values[rep, seed])))
        cells = np.array([f"{init}-{rep}-{seed}" for rep in range(REPS) for seed in range(SEEDS)])
        document_rows.append(pl.DataFrame({
            "cell_id": np.repeat(cells, SAMPLED),
            "document": np.tile(np.arange(SAMPLED, dtype=np.uint64), REPS * SEEDS),
            "tokens": np.repeat(x, SEEDS, axis=0).ravel(),
            "loss_sum": sums.reshape(-1)}))
    return pl.DataFrame(value_rows), pl.concat(document_rows)


def test_measurement_error_is_the_paired_gap_stderr_of_gridlab_measure():
    values, documents = _study(np.random.default_rng(1), seed_sd=0.02)
    measured = S.measurement_error(values, documents).sort("method")
    for rep in (0, 7):
        cells = values.filter(pl.col("method") == f"m{rep}")
        arm = {init: documents.join(cells.filter(pl.col("init") == init).select("cell_id"), on="cell_id")
               for init in ("pruned", "random")}
        expected = paired_gap(arm["pruned"], arm["random"])
        row = measured.filter(pl.col("method") == f"m{rep}").row(0, named=True)
        assert row["se_measurement"] == pytest.approx(expected.stderr, rel=1e-9)
        assert row["documents"] == expected.documents == SAMPLED


@pytest.mark.parametrize("seed_sd", [0.01, 0.04])
def test_intervals_with_the_samples_error_cover_the_whole_split_gap(seed_sd):
    """95 % intervals of the gap on the whole split (not on the sample): with the sample's error added they cover at
    the nominal rate; the seeds' spread alone under-covers, badly when the seed effect is small beside the sample's
    error — the failure this test exists to catch."""
    values, documents = _study(np.random.default_rng(int(seed_sd * 1000)), seed_sd)
    with_sample = S.gap_table(values, False, "none", measurement=S.measurement_error(values, documents))
    seeds_only = S.gap_table(values, False, "none")

    def coverage(gaps):
        return float(((gaps["gap"] - gaps["half"] <= TRUE_GAP) & (TRUE_GAP <= gaps["gap"] + gaps["half"])).mean())

    covered, naive = coverage(with_sample), coverage(seeds_only)
    assert covered >= 0.93, covered
    assert naive < covered - 0.05, (naive, covered)
    parts = with_sample.select("se", "se_seeds", "se_measurement").to_numpy()
    assert np.allclose(parts[:, 0] ** 2, parts[:, 1] ** 2 + parts[:, 2] ** 2)


def test_the_samples_error_limits_what_more_seeds_can_decide():
    """Design power counts the sample's error, which no number of seeds removes."""
    between = np.array([0.01 ** 2, 0.01 ** 2])
    plain, limited = S.design_seeds(between, 0.02, np.array([0.0, 0.02]))
    assert plain < 20 and limited == S.MAX_SEEDS + 1


def test_without_per_document_losses_nothing_changes():
    values, _ = _study(np.random.default_rng(3), seed_sd=0.02)
    empty = S.measurement_error(values, pl.DataFrame(schema={"cell_id": pl.Utf8, "document": pl.UInt64,
                                                             "tokens": pl.Float64, "loss_sum": pl.Float64}))
    assert empty.height == 0
    plain, joined = S.gap_table(values, False, "none"), S.gap_table(values, False, "none", measurement=empty)
    assert plain.drop("se_measurement").equals(joined.drop("se_measurement"))
    assert plain["se_measurement"].null_count() == plain.height
