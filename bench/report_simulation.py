"""The report's gap models, crossovers and D_eff on synthetic studies whose truth is known: the exhaustive version of
the simulations in tests/test_report_scaling.py and tests/test_report_transfer.py.

    python bench/report_simulation.py [--replicates 2000] [--seed 0]

Gap curves (losses: negative favours pruning) that approach 0 without crossing (−1.2·(B/10k)^−0.5 and the flatter
−0.8·(B/10k)^−0.3), that cross as a line in log B (0 at 200k: beyond the grid; at 50k: inside it), and that are
constant (−0.3, and exactly 0), with the design's dependence: each seed has its own level and its own slope in
log B (one trunk per seed), AR(1) noise along the budgets (ρ = 0.5) whose spread grows by 30 % from the smallest to
the largest budget. Printed per seeds × budgets (10k, 20k, … doubling):
- how often each model is chosen (none = no candidate passed its lack-of-fit test);
- the coverage of the 90 % prediction intervals for the seed mean a rerun of the same seeds measures at 2× and 4×
  the largest budget, and of the report's hold-out check (fit without the largest budget, predict it);
- the crossovers declared: interpolated (between significant per-cell paired verdicts) and extrapolated, against
  the truth (a crossover declared where the truth does not cross is false; nominal 5 %).
Then D_eff: learning curves L(D) = 4.6 + 2·(D/10k)^−0.45 with a planted D_eff (a constant 30k, and 0.8·B·(1 −
B/160k)), P = 150k, budgets 10k–80k: the median error of B + D_eff in log tokens and the coverage of the 95 %
intervals. Every number is a rate over `--replicates` synthetic studies; the tests assert the same at fewer.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gridlab.report import scaling as F  # noqa: E402
from gridlab.report import transfer as T  # noqa: E402

from report_synthetic import declared_crossovers, gap_study, learning_study, power_law  # noqa: E402

TRUTHS = {
    "approaches 0 (γ 0.5)": (lambda b: -1.2 * (b / 1e4) ** -0.5, False),
    "approaches 0 (γ 0.3)": (lambda b: -0.8 * (b / 1e4) ** -0.3, False),
    "crosses at 200k": (lambda b: 0.25 * np.log2(b / 2e5), True),
    "crosses at 50k": (lambda b: 0.25 * np.log2(b / 5e4), True),
    "constant −0.3": (lambda b: -0.3 + 0 * b, False),
    "constant 0": (lambda b: 0 * b, False),
}
DESIGNS = [(2, 4), (2, 5), (3, 5), (5, 5), (8, 8)]  # seeds, budgets


def gap_models(replicates: int, rng: np.random.Generator) -> None:
    print(f"{'seeds × budgets':>15}  {'truth':<22} {'chosen: none / const / line / power':<36} "
          f"{'PI 2×':>6} {'PI 4×':>6} {'hold-out':>8}  crossovers declared (interpolated + extrapolated)")
    for seeds, k in DESIGNS:
        budgets = [10_000 * 2**i for i in range(k)]
        for name, (truth, crosses) in TRUTHS.items():
            data = gap_study(truth, [*budgets, 2 * budgets[-1], 4 * budgets[-1]], seeds, replicates, rng)
            fitted = data[:, :, :k]
            fits = F.fit_gap_models(budgets, fitted)
            chosen = np.bincount(fits.choice + 1, minlength=4) / replicates
            mean, low, high, _, _ = F.predict(fits, [2 * budgets[-1], 4 * budgets[-1]]).chosen(fits)
            target = data[:, :, k:].mean(axis=1)
            made = fits.choice >= 0
            coverage = ((low[made] <= target[made]) & (target[made] <= high[made])).mean(axis=0)
            check = F.holdout(fits)
            held = check.covered[check.checked].mean() if check is not None and check.checked.any() else math.nan
            kinds = Counter(declared_crossovers(budgets, fitted))
            declared = (kinds["interpolated"] + kinds["extrapolated"]) / replicates
            verdict = "found" if crosses else "FALSE"
            print(f"{seeds:>7} × {k:<5}  {name:<22} {' / '.join(f'{c:.2f}' for c in chosen):<36} "
                  f"{coverage[0]:>6.3f} {coverage[1]:>6.3f} {held:>8.3f}  {declared:.3f} {verdict} "
                  f"({kinds['interpolated']} + {kinds['extrapolated']}; unresolved {kinds['unresolved']})")


def effective_data(replicates: int, rng: np.random.Generator) -> None:
    curve = power_law(4.6, 2.0, 0.45, reference=1e4)
    budgets = np.array([10_000, 20_000, 40_000, 80_000], dtype=float)
    print(f"\n{'seeds':>5}  {'planted D_eff':<24} {'median log error':>16} {'95 % coverage':>13} {'bounds':>7}")
    for seeds in (2, 3, 5, 8):
        for name, transfer in (("30k", lambda b: 30_000 + 0 * b), ("0.8·B·(1 − B/160k)",
                                                                   lambda b: 0.8 * b * (1 - b / 1.6e5))):
            tokens, random, pruned = learning_study(curve, transfer, budgets, 150_000, seeds, replicates, rng)
            truth = transfer(budgets)
            errors, covered, bounds = [], [], 0
            for r in range(replicates):
                curves = [T.monotone_curve(tokens, random[r, s]) for s in range(seeds)]
                for k, row in enumerate(T.transfer_at(curves, budgets, pruned[r])):
                    if row["d_eff_low"] is None:
                        bounds += 1
                        continue
                    errors.append(math.log((budgets[k] + row["d_eff_tokens"]) / (budgets[k] + truth[k])))
                    covered.append(row["d_eff_low"] <= truth[k] <= row["d_eff_high"])
            print(f"{seeds:>5}  {name:<24} {np.median(errors):>+16.4f} {np.mean(covered):>13.3f} {bounds:>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    gap_models(args.replicates, rng)
    effective_data(max(args.replicates // 4, 100), rng)
    print(f"\n{args.replicates} replicates per row ({max(args.replicates // 4, 100)} for D_eff), "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
