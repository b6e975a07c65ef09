"""Coverage and error rates of the report's intervals and verdicts, simulated with the design's correlation.

The exhaustive version of tests/test_report_mixed.py and tests/test_report_verdicts.py: more replicates, every
scenario, and the alternatives the report does not use, so the choice can be checked:

- model        — the report's: per family and budget a mixed model over the ratios (REML), dof = harmonic mean of
                 Satterthwaite's and the cell's own n − 1;
- satterthwaite — the same model with Satterthwaite's dof alone;
- linked       — one model over all of a family's budgets (seed, seed × ratio, seed × budget and residual per budget,
                 every component ≥ 0), Satterthwaite's dof;
- own t        — each cell's own paired t (n − 1 dof): the sensitivity check;
- pooled σ     — what the report did before: one σ² per family pooled over ratios and budgets, m(n − 1) dof.

    python bench/report_coverage.py [--reps 4000] [--linked-reps 500]

Prints coverage of 95 % intervals per scenario, seed count and budget (the spread grows 1.5× per budget), then the
rates of false verdicts: any prune/scratch among a setting's 16 cells under a zero gap, any equivalent at |gap| = δ,
and the same for the answer's squares with two methods sharing a random twin.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from gridlab.report import mixed  # noqa: E402
from gridlab.report import stats as S  # noqa: E402

from report_synthetic import design_noise  # noqa: E402

RATIOS, BUDGETS = 4, 4
SCENARIOS = {
    "design": {},
    "seed dominates": dict(sd_seed=0.1, sd_seed_ratio=0.005, sd_seed_budget=0.01, sd_residual=0.01),
    "seed × budget dominates": dict(sd_seed=0.0, sd_seed_ratio=0.0, sd_seed_budget=0.08, sd_residual=0.01,
                                    growth=2.0),
    "no seed effect": dict(sd_seed=0.0, sd_seed_ratio=0.0, sd_seed_budget=0.0, sd_residual=0.05),
}


def by_budget(noise: np.ndarray) -> np.ndarray:
    reps, methods, seeds, _ = noise.shape
    return noise.reshape(reps, methods, seeds, RATIOS, BUDGETS).transpose(0, 1, 4, 2, 3).reshape(-1, seeds, RATIOS)


def coverage(seeds: int, reps: int, linked_reps: int, scenario: dict) -> dict[str, np.ndarray]:
    """Per method: coverage of the true gap 0 per budget."""
    rng = np.random.default_rng(seeds)
    noise = design_noise(rng, reps, seeds, RATIOS, BUDGETS, **scenario)
    rows = by_budget(noise)  # (reps · budgets, seeds, ratios)
    out = {}
    result = S.model_intervals(rows)
    fit = mixed.fit(rows, mixed.layout(np.arange(RATIOS), np.zeros(RATIOS, int)))
    mean = np.abs(result["gap"])
    for name, half in (("model", S.half_width(result["se"], result["dof"])),
                       ("satterthwaite", S.half_width(np.sqrt(fit.variance), fit.dof))):
        out[name] = (mean <= half).reshape(reps, BUDGETS, RATIOS).mean(axis=(0, 2))
    own = stats.t.ppf(0.975, seeds - 1) * rows.std(axis=1, ddof=1) / np.sqrt(seeds)
    out["own t"] = (np.abs(rows.mean(axis=1)) <= own).reshape(reps, BUDGETS, RATIOS).mean(axis=(0, 2))
    family = noise[:, 0]  # (reps, seeds, cells)
    pooled = family.var(axis=1, ddof=1).mean(axis=1, keepdims=True)
    half = stats.t.ppf(0.975, RATIOS * BUDGETS * (seeds - 1)) * np.sqrt(pooled / seeds)
    budget_of = np.tile(np.arange(BUDGETS), RATIOS)
    hit = np.abs(family.mean(axis=1)) <= half
    out["pooled σ"] = np.array([hit[:, budget_of == b].mean() for b in range(BUDGETS)])
    layout = mixed.layout(np.repeat(np.arange(RATIOS), BUDGETS), budget_of)
    linked = mixed.fit(family[:linked_reps], layout)
    ok = linked.converged
    hit = np.abs(linked.mean[ok]) <= S.half_width(np.sqrt(linked.variance[ok]), linked.dof[ok])
    out["linked"] = np.array([hit[:, budget_of == b].mean() for b in range(BUDGETS)])
    return out


def _fit(noise: np.ndarray, gaps: np.ndarray) -> dict[str, np.ndarray]:
    reps, methods, seeds, cells = noise.shape
    result = S.model_intervals(by_budget(noise + gaps[None, :, None, :]))

    def back(x):
        return x.reshape(reps, methods, BUDGETS, RATIOS).transpose(0, 1, 3, 2).reshape(reps, methods, cells)

    return dict(benefit=-back(result["gap"]), se=back(result["se"]), dof=back(result["dof"]))


def cell_rate(fit: dict, margin: float, words: tuple[str, ...]) -> float:
    reps, methods, cells = fit["se"].shape
    group = np.repeat(np.arange(reps), methods * cells)
    verdict = S.decide(fit["benefit"].ravel(), fit["se"].ravel(), fit["dof"].ravel(), group, margin)["verdict"]
    return float(np.isin(verdict.reshape(reps, -1), words).any(axis=1).mean())


def square_rate(fit: dict, margin: float, words: tuple[str, ...]) -> float:
    reps, methods, cells = fit["se"].shape
    square = np.broadcast_to(np.arange(reps)[:, None, None] * cells + np.arange(cells), (reps, methods, cells))
    tests = S.square_tests(fit["benefit"].ravel(), fit["se"].ravel(), fit["dof"].ravel(), square.ravel(), margin)
    group = tests["ids"] // cells
    q, q_eq = S.benjamini_hochberg(tests["p"], group), S.benjamini_hochberg(tests["p_equivalent"], group)
    call = np.where(q_eq <= S.ALPHA, "equivalent",
                    np.where(q <= S.ALPHA, np.where(tests["prune"], "prune", "scratch"), "inconclusive"))
    return float(np.isin(call.reshape(reps, cells), words).any(axis=1).mean())


def naive_square_rate(fit: dict) -> float:
    """The choice without adjustment: the best method's own verdict per square (BH over squares, no Bonferroni)."""
    reps, methods, cells = fit["se"].shape
    best = np.argmax(fit["benefit"], axis=1)[:, None, :]
    pick = {k: np.take_along_axis(v, best, axis=1)[:, 0] for k, v in fit.items()}
    group = np.repeat(np.arange(reps), cells)
    verdict = S.decide(pick["benefit"].ravel(), pick["se"].ravel(), pick["dof"].ravel(), group, 0.02)["verdict"]
    return float((verdict.reshape(reps, cells) == "prune").any(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4000)
    parser.add_argument("--linked-reps", type=int, default=500)
    args = parser.parse_args()
    start = time.perf_counter()
    methods = ("model", "satterthwaite", "linked", "own t", "pooled σ")
    print(f"Coverage of 95 % intervals ({args.reps} replicates × 16 cells; linked: {args.linked_reps}); per budget "
          f"B1…B4, the spread growing 1.5× per budget; min over budgets first")
    for name, scenario in SCENARIOS.items():
        for seeds in (2, 3, 5):
            found = coverage(seeds, args.reps, args.linked_reps, scenario)
            cells = "  ".join(f"{m} {found[m].min():.3f} [{' '.join(f'{c:.3f}' for c in found[m])}]"
                              for m in methods)
            print(f"{name:24s} n={seeds}  {cells}")
    print("\nFalse verdict rates (share of replicates with any, α = 0.05, BH over the setting's 16 cells/squares)")
    for seeds in (2, 3, 5):
        rng = np.random.default_rng(seeds)
        null = _fit(design_noise(rng, args.reps, seeds, RATIOS, BUDGETS), np.zeros((1, 16)))
        noise = design_noise(rng, args.reps, seeds, RATIOS, BUDGETS, sd_seed=0.01, sd_seed_ratio=0.005,
                             sd_seed_budget=0.01, sd_residual=0.01, growth=1.2)
        at_margin = _fit(noise, np.where(np.arange(16) % 2 == 0, 0.1, -0.1)[None, :])
        twins = design_noise(rng, args.reps, seeds, RATIOS, BUDGETS, methods=2, sd_twin=0.03)
        twin_null = _fit(twins, np.zeros((2, 16)))
        twin_eq = _fit(0.25 * twins, np.stack([np.full(16, -0.1), np.full(16, 0.1)]))
        print(f"n={seeds}: zero gap → prune/scratch cell {cell_rate(null, 0.02, ('prune', 'scratch')):.3f}; "
              f"|gap| = δ → equivalent cell {cell_rate(at_margin, 0.1, ('equivalent',)):.3f}; two methods, zero gap → "
              f"prune/scratch square {square_rate(twin_null, 0.02, ('prune', 'scratch')):.3f} (unadjusted choice "
              f"{naive_square_rate(twin_null):.3f}); best method at δ → equivalent square "
              f"{square_rate(twin_eq, 0.1, ('equivalent',)):.3f}")
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
