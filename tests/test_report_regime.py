"""The regime on the report's first screen: optimizer steps, tokens per parameter, the held-out sample and its
noise against the margin, and the warnings."""

import polars as pl

from gridlab.report.regime import MIN_STEPS, regime, regime_line


def _values(budgets, params=(1000, 2000)):
    rows = [dict(cell_id=f"c{b}-{i}-{p}", init=i, budget_tokens=b, params=p)
            for b in budgets for i in ("pruned", "random") for p in params]
    return pl.DataFrame(rows)


def _metrics(values, stderr):
    return pl.DataFrame({"cell_id": values["cell_id"], "tokens": values["budget_tokens"], "name": "val_loss",
                         "value": 3.0, "stderr": stderr}, schema_overrides={"stderr": pl.Float64})


SPEC = {"seq_len": 64, "schedule": {"batch_size": 16}, "evaluation": {"max_sequences": 256}}


def test_short_budgets_and_a_noisy_sample_are_warned_about():
    values = _values([10_240, 204_800])
    r = regime(SPEC, {"parent_tokens": 150_000, "parent_params": 400_000}, values, _metrics(values, 0.05),
               "val_loss", margin=0.02)
    assert [b["steps"] for b in r.budgets] == [10, 200]
    assert r.budgets[0]["per_param"] == (10_240 / 2000, 10_240 / 1000)
    assert r.parent_per_param == 150_000 / 400_000 and r.stderr == 0.05
    short, noisy = r.warnings
    assert short.startswith(f"1 of 2 budgets are under {MIN_STEPS} optimizer steps of 1.02k tokens — B (steps): "
                            f"10.2k (10)")
    assert noisy.startswith("The held-out measurement cannot resolve the margin: val_loss's stderr is 0.05")
    line = regime_line(r, "val_loss")
    assert "10–200 optimizer steps of 1.02k tokens" in line and "256 sequences × 64 tokens = 16.4k tokens" in line
    assert "parent: 150k tokens = 0.38 per parameter (compute-optimal ≈ 20)" in line and "stderr ≈ 0.05" in line


def test_a_long_grid_with_a_precise_sample_has_no_warning_and_an_old_database_says_unknown():
    values = _values([1_024_000])
    r = regime(SPEC, {}, values, _metrics(values, 0.001), "val_loss", margin=0.02)
    assert r.warnings == [] and r.parent_per_param is None
    old = regime({}, {}, values.drop("params"), _metrics(values, None), "val_loss", margin=0.02)
    assert old.warnings == [] and old.stderr is None and old.batch_tokens is None
    assert "steps unknown" in regime_line(old, "val_loss")
