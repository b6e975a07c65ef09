"""Adaptive studies on synthetic studies whose truth is known: are the sequential verdicts valid, and what do they save?

    python bench/adaptive.py [--reps 4000] [--studies 40] [--run runs/study]

1. **Validity** (the exhaustive version of tests/test_adaptive_validity.py): the whole adaptive loop on per-seed
   differences (tests/adaptive_synthetic.py: the report's statistics at every look, a seed added to every open cell
   up to max_seeds, Benjamini–Hochberg over a setting's 16 cells), the share of replicate studies with any wrong
   verdict, per truth (zero gap, at the margin, large, mixed), design (2 → 4, 2 → 8, 3 → 10, 2 → 16 seeds),
   spending function and interval model, for the sequential verdicts and for the naive loop (the fixed-sample
   verdicts at every look).
2. **The boundaries not used**: one cell's one-sided error when the looks' nominal levels come from the joint law
   of z statistics (Armitage–McPherson–Rowe's recursion, the textbook group-sequential boundaries) instead of the
   spending increments combined by Bonferroni (gridlab.report.sequential), with each cell's own paired t.
3. **Tokens**: synthetic studies (2 methods × 4 ratios × 4–5 budgets, setting 1) whose gap curves are known —
   "micro": shaped like the default study's measured gaps, most decided at once, a few open near crossings at the
   largest budgets; "hard": most groups' largest budgets near the margin or 0 — with the design's correlated noise,
   run through gridlab.adaptive.look_at (the sequential verdicts, the crossovers, the next seeds and budgets) round
   after round; the tokens each round trains are counted as gridlab.train trains WSD trajectories (a trunk per
   model and seed, a branch per budget; a budget below the kept trunk replays it). Against the fixed grid that
   reaches the same verdicts (every cell with as many seeds as the most any cell got, every budget any group got:
   gridlab's fixed_tokens) — target ≤ 0.60 — and against the hindsight bound (the fewest seeds with which the
   fixed-sample verdicts reach the adaptive study's, chosen after the fact), with the wrong and decided verdicts.
4. With `--run`: a finished run's own results (a grid with more seeds than its first look): the adaptive design
   replayed on them, seeds only (the budgets are the grid's).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
from scipy import special

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import adaptive_synthetic as A  # noqa: E402

from gridlab import adaptive  # noqa: E402
from gridlab.report import sequential as Q  # noqa: E402
from gridlab.report import stats as S  # noqa: E402
from gridlab.rounds import Record, Round  # noqa: E402
from gridlab.spec import parse_grid  # noqa: E402

from report_synthetic import design_noise  # noqa: E402

RATIOS, BUDGETS = 4, 4
QUIET = dict(sd_seed=0.01, sd_seed_ratio=0.005, sd_seed_budget=0.01, sd_residual=0.01, growth=1.2)


# ---------------------------------------------------------------------------------------------------------------
# 1. Validity


def _truth(name: str, margin: float) -> np.ndarray:
    cells = RATIOS * BUDGETS
    if name == "zero":
        return np.zeros(cells)
    if name == "margin":
        return np.where(np.arange(cells) % 2 == 0, margin, -margin)
    if name == "large":
        return np.where(np.arange(cells) % 2 == 0, 4 * margin, -4 * margin)
    return margin * np.array([0, 0, 0.5, -0.5, 1, -1, 1.5, -1.5, 2.5, -2.5, 5, -5, 15, -15, 50, -50])


def validity(reps: int) -> None:
    print("1. Validity: share of replicate studies with any wrong verdict — for the mixed truths (gaps from 0 to 50δ "
          "in one setting) the false discovery rate, the mean share of wrong verdicts among the decided ones — "
          "(α = 0.05; 16 cells, Benjamini–Hochberg)")
    print(f"{'design':>8} {'spending':>15} {'pool':>6} {'truth':>7} {'sequential':>11} {'naive':>7} "
          f"{'seeds':>6} {'decided':>8}")
    for first, last in ((2, 4), (2, 8), (3, 10), (2, 16)):
        for spending in Q.SPENDING:
            design = Q.Design(first, last, spending)
            for pool in ("model", "none"):
                for truth in ("zero", "margin", "large", "mixed"):
                    quiet = truth in ("margin", "large")
                    margin = 0.1 if quiet else 0.02
                    rng = np.random.default_rng(hash((first, last, truth)) % 2**32)
                    noise = design_noise(rng, reps, last, RATIOS, BUDGETS, **(QUIET if quiet else {}))[:, 0]
                    gap = _truth(truth, margin)
                    d = noise + gap[None, None, :]
                    rates = {}
                    for procedure in A.PROCEDURES:
                        outcome = A.run(d, design, margin, RATIOS, BUDGETS, pool, procedure)
                        wrong = A.wrong(outcome.verdicts, -gap, margin)
                        if truth == "mixed":  # some nulls false: BH controls the false discovery rate
                            count = (outcome.verdicts != "inconclusive").sum(axis=1)
                            rates[procedure] = (wrong.sum(axis=1) / np.maximum(count, 1)).mean()
                        else:  # every null true (or every gap large): the family-wise rate
                            rates[procedure] = wrong.any(axis=1).mean()
                        if procedure == "sequential":
                            seeds = outcome.seeds.mean()
                            decided = (outcome.verdicts != "inconclusive").mean()
                    print(f"{first:>3} → {last:<2} {spending:>15} {pool:>6} {truth:>7} {rates['sequential']:>11.3f} "
                          f"{rates['naive']:>7.3f} {seeds:>6.2f} {decided:>8.2f}")


# ---------------------------------------------------------------------------------------------------------------
# 2. The z boundaries (not used)


def z_nominal_levels(fractions: np.ndarray, level: float, spending: str, grid: int = 241) -> np.ndarray:
    """Nominal one-sided levels of the looks of a one-sided group-sequential test with the joint law of z statistics
    (Brownian motion in the information; Armitage, McPherson & Rowe 1969), each look spending the spending
    function's increment exactly."""
    t = np.asarray(fractions, dtype=float)
    increments = np.diff(Q.spent(t, level, spending), prepend=0.0)
    weights = np.ones(grid)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    weights /= 3.0
    low = -9.0
    upper = np.sqrt(t[0]) * special.ndtri(1 - increments[0])
    out = [increments[0]]
    top = min(upper, -low)
    x = np.linspace(low, top, grid)
    mass = np.exp(-x**2 / (2 * t[0])) / np.sqrt(2 * np.pi * t[0]) * weights * (top - low) / (grid - 1)
    for k in range(1, t.size):
        scale = np.sqrt(t[k] - t[k - 1])
        a, b = low, 60.0
        for _ in range(80):
            middle = (a + b) / 2
            if (mass * special.ndtr((x - middle) / scale)).sum() > increments[k]:
                a = middle
            else:
                b = middle
        upper = (a + b) / 2
        out.append(special.ndtr(-upper / np.sqrt(t[k])))
        top = min(upper, -low)
        new = np.linspace(low, top, grid)
        density = (np.exp(-(new[:, None] - x[None, :]) ** 2 / (2 * scale**2)) / (np.sqrt(2 * np.pi) * scale)) @ mass
        x, mass = new, density * weights * (top - low) / (grid - 1)
    return np.array(out)


def boundaries_not_used(paths: int) -> None:
    print("\n2. One cell's one-sided type-I error ÷ α (α = 0.025, each cell's own paired t, every look taken):")
    print(f"{'design':>8} {'spending':>15} {'z boundaries (joint law)':>25} {'increments + Bonferroni (used)':>31}")
    rng = np.random.default_rng(0)
    for first, last in ((2, 4), (2, 8), (3, 10), (2, 16), (5, 12)):
        x = rng.standard_normal((paths, last))
        total, squares = np.cumsum(x, axis=1), np.cumsum(x * x, axis=1)
        p = []
        for n in range(first, last + 1):
            mean = total[:, n - 1] / n
            sd = np.sqrt((squares[:, n - 1] - n * mean**2) / (n - 1))
            p.append(special.stdtr(n - 1, -mean / (sd / np.sqrt(n))))
        p = np.array(p).T
        for spending in Q.SPENDING:
            fractions = np.arange(first, last + 1) / last
            z = z_nominal_levels(fractions, 0.025, spending)
            used = Q.nominal_at(np.arange(first, last + 1), Q.Design(first, last, spending), 0.025)
            print(f"{first:>3} → {last:<2} {spending:>15} {(p <= z).any(axis=1).mean() / 0.025:>25.2f} "
                  f"{(p <= used).any(axis=1).mean() / 0.025:>31.2f}")


# ---------------------------------------------------------------------------------------------------------------
# 3. Tokens


METHODS = ("shortgpt", "minitron-depth")
STUDY_RATIOS = (0.5, 0.6, 0.7, 0.8)
DECAY = 0.1  # the default study's decay_fraction
MARGIN = 0.02
MIXES = ("micro", "hard")
BUDGETS_OF = {"micro": [10240, 20480, 40960, 81920, 163840], "hard": [10240, 20480, 40960, 81920]}


def _spec(max_seeds: int, mix: str = "micro"):
    return parse_grid({
        "name": "bench", "seq_len": 64, "ratios": list(STUDY_RATIOS), "budgets": BUDGETS_OF[mix], "settings": [1],
        "seeds": [0, 1], "parent": {"preset": "pico", "tokens": 150000},
        "corpus": {"kind": "stdlib"}, "tokenizer": {"vocab_size": 1024},
        "schedule": {"warmup_tokens": 4096, "batch_size": 16, "decay_fraction": DECAY},
        "methods": [{"name": m} for m in METHODS],
        "adaptive": {"max_seeds": max_seeds, "margin": MARGIN, "max_tokens": 10**12},
    })


def _hash_normal(*key) -> float:
    return float(np.random.default_rng(zlib.crc32(repr(key).encode())).standard_normal())


def true_gap(mix: str, study: int, method: str, ratio: float, budget: float) -> float:
    """The study's gap curves (pruned − random in nats; negative = pruning better), one per method × ratio.

    "micro": shaped like the default study's measured gaps (README, setting 1): about −1.05 at 10k tokens, closing
    linearly in log tokens, each group crossing 0 at its own budget between ≈ 110k and ≈ 2.6M tokens (drawn per
    study), so most cells are decided at once and a few near the crossings — at the largest budgets — are not.
    "hard": a quarter of the groups large and shrinking, a quarter approaching the margin, a quarter crossing 0
    inside the grid, a quarter near 0 — most groups' largest budgets are hard."""
    x = math.log2(budget / 10240)
    index = METHODS.index(method) * len(STUDY_RATIOS) + STUDY_RATIOS.index(ratio)
    if mix == "micro":
        crossing = 3.5 + 4.5 * (zlib.crc32(repr((study, index)).encode()) % 1000) / 1000  # doublings of 10k
        return -1.05 * (1 - x / crossing)
    kind = (index + study) % 4
    if kind == 0:
        return -0.4 * 0.7**x
    if kind == 1:
        return -(MARGIN * 1.5) - 0.1 * 0.5**x
    if kind == 2:
        return -0.15 + 0.08 * x  # crosses 0 at ≈ 1.9 doublings (≈ 37k tokens)
    return 0.3 * MARGIN * (1 if ratio < 0.65 else -1)


def _value(mix: str, study: int, init: str, method: str, ratio: float, seed: int, budget: int) -> float:
    """A seed's held-out loss: the random arm's curve, a seed effect, a seed × budget effect and a residual growing
    with the budget (the design's correlation: one seed's difference has an sd of ≈ 0.03 at 10k tokens, as in the
    default study); pruned = random + the true gap + a seed × ratio effect and its own residual."""
    growth = 1.3 ** math.log2(budget / 10240)
    shared = 0.03 * _hash_normal(study, "seed", seed) + 0.03 * growth * _hash_normal(study, "budget", seed, budget)
    random = 4.0 - 0.2 * math.log2(budget / 1000) + shared
    if init == "random":
        return random + 0.01 * growth * _hash_normal(study, "random", method, ratio, seed, budget)
    return (random + true_gap(mix, study, method, ratio, budget)
            + 0.015 * _hash_normal(study, "ratio", method, ratio, seed)
            + 0.02 * growth * _hash_normal(study, "pruned", method, ratio, seed, budget))


def trajectory_cost(done: set[int], new: set[int]) -> int:
    """Tokens a WSD trajectory trains to add the budgets `new` to those `done` (gridlab.train: the trunk state is
    kept at the last fork; a budget forking before it replays the trunk from step 0)."""
    fork = lambda b: b * (1 - DECAY)  # noqa: E731
    main = max((fork(b) for b in done), default=0.0)
    replay = sum(b for b in new if fork(b) < main)
    along = [b for b in new if fork(b) >= main]
    trunk = max((fork(b) for b in along), default=main) - main
    return int(round(replay + trunk + sum(DECAY * b for b in along)))


class Study:
    """One synthetic study: its cells (method, ratio, budget, seed), the trajectories trained so far and their
    tokens."""

    def __init__(self, mix: str, number: int, seeds: list[int], budgets: list[int]):
        self.mix = mix
        self.number = number
        self.gaps: pl.DataFrame | None = None
        self.cells: set[tuple] = set()
        self.trained: dict[tuple, set[int]] = {}
        self.tokens = 0
        self.add([(m, r, b, s) for m in METHODS for r in STUDY_RATIOS for b in budgets for s in seeds])

    def add(self, cells) -> int:
        wanted: dict[tuple, set[int]] = {}
        for method, ratio, budget, seed in cells:
            self.cells.add((method, ratio, budget, seed))
            for arm in ("pruned", "random"):
                wanted.setdefault((arm, method, ratio, seed), set()).add(budget)
        spent = 0
        for key, budgets in wanted.items():
            done = self.trained.setdefault(key, set())
            spent += trajectory_cost(done, budgets - done)
            done |= budgets
        self.tokens += spent
        return spent

    def values(self) -> pl.DataFrame:
        rows = []
        for method, ratio, budget, seed in sorted(self.cells):
            for init in ("pruned", "random"):
                rows.append(dict(granularity="depth", method=method, ratio=ratio, init=init, setting=1,
                                 budget_tokens=budget, trained_tokens=budget, seed=seed,
                                 value=_value(self.mix, self.number, init, method, ratio, seed, budget)))
        return pl.DataFrame(rows)

    def planned(self) -> list:
        return [SimpleNamespace(method=m, ratio=r, setting=1, budget_tokens=b, init=init, seed=s)
                for m, r, b, s in self.cells for init in ("pruned", "random")]


def _wrong_and_decided(gaps: pl.DataFrame, mix: str, study: int) -> tuple[int, int]:
    truth = np.array([-true_gap(mix, study, m, r, b)
                      for m, r, b in gaps.select("method", "ratio", "budget_tokens").rows()])
    verdicts = gaps["verdict"].to_numpy()
    return int(A.wrong(verdicts, truth, MARGIN).sum()), int((verdicts != "inconclusive").sum())


def _same_verdicts(mix: str, number: int, spec, budgets: list[int], adaptive_gaps: pl.DataFrame
                   ) -> tuple[Study, int]:
    """The fixed grid that reaches the adaptive study's decided verdicts: every budget the study reached, and the
    fewest seeds per cell (the same for every cell, up to max_seeds) with which the report's fixed-sample verdicts
    decide every cell the study decided, the same way; at max_seeds when none does."""
    keys = ["method", "ratio", "budget_tokens"]
    decided = adaptive_gaps.filter(pl.col("verdict") != "inconclusive").select(*keys, "verdict")
    for seeds in range(2, spec.adaptive.max_seeds + 1):
        fixed = Study(mix, number, adaptive.seed_order(spec, seeds), budgets)
        fixed.gaps = S.gap_table(fixed.values(), False, "model", MARGIN)
        same = decided.join(fixed.gaps.select(*keys, "verdict"), on=keys, suffix="_fixed")
        if (same["verdict"] == same["verdict_fixed"]).all() and same.height == decided.height:
            return fixed, seeds
    return fixed, spec.adaptive.max_seeds


def tokens(studies: int, max_seeds: int, mix: str) -> dict:
    """Per study: the adaptive design's tokens against (a) the fixed grid that reaches its verdicts — every cell with
    as many seeds as the most any cell got, every budget any group got (what gridlab reports as fixed_tokens: a fixed
    grid cannot give seeds only where they are needed) — and (b) the hindsight bound: the fewest seeds per cell with
    which the fixed-sample verdicts decide every cell the adaptive study decided, the same way (chosen after seeing
    the data, so not a design anyone could run, and its verdicts are not valid: the cheapest fixed grid there could
    be). Wrong and decided verdicts of each."""
    spec = _spec(max_seeds, mix)
    grid_budgets = BUDGETS_OF[mix]
    print(f"\n3. Tokens ({mix!r} gaps): {studies} synthetic studies, 2 methods × 4 ratios × {len(grid_budgets)} "
          f"budgets (setting 1), 2 seeds to start, max_seeds {max_seeds}, margin {MARGIN}, futility "
          f"{spec.adaptive.futility}")
    print(f"{'study':>5} {'rounds':>6} {'adaptive':>11} {'fixed':>11} {'seeds':>5} {'ratio':>6} {'hindsight':>11} "
          f"{'seeds':>5} {'ratio':>6} {'wrong a/f/h':>11} {'decided a/f/h':>14} {'budgets+':>8}")
    keys = ("adaptive", "fixed", "hindsight", "wrong_a", "wrong_f", "wrong_h", "decided_a", "decided_f", "decided_h")
    totals = dict.fromkeys(keys, 0)
    started = time.time()
    for number in range(studies):
        study = Study(mix, number, [0, 1], grid_budgets)
        record = Record(design=adaptive.design_record(spec))
        while True:
            look = adaptive.look_at(spec, study.planned(), study.values(), False, record)
            if not look.seeds and not look.budgets:
                break
            entry = Round(round=len(record.rounds) + 1, looked_at=0, seeds=look.seeds, budgets=look.budgets,
                          tokens=0, gpu_hours=None, verdicts=look.verdicts, open=look.open)
            record.rounds.append(entry)
            study.add([(a.method, a.ratio, a.budget, a.seed) for a in look.seeds]
                      + [(a.method, a.ratio, a.budget, s) for a in look.budgets for s in a.seeds])
        wrong_a, decided_a = _wrong_and_decided(look.gaps, mix, number)
        budgets = sorted({c[2] for c in study.cells})
        used = max(sum(1 for c in study.cells if c[:3] == key[:3]) for key in study.cells)
        fixed = Study(mix, number, adaptive.seed_order(spec, used), budgets)
        wrong_f, decided_f = _wrong_and_decided(S.gap_table(fixed.values(), False, "model", MARGIN), mix, number)
        hindsight, seeds = _same_verdicts(mix, number, spec, budgets, look.gaps)
        wrong_h, decided_h = _wrong_and_decided(hindsight.gaps, mix, number)
        print(f"{number:>5} {len(record.rounds):>6} {study.tokens:>11,} {fixed.tokens:>11,} {used:>5} "
              f"{study.tokens / fixed.tokens:>6.2f} {hindsight.tokens:>11,} {seeds:>5} "
              f"{study.tokens / hindsight.tokens:>6.2f} {wrong_a:>3}/{wrong_f}/{wrong_h:<5} "
              f"{decided_a:>4}/{decided_f}/{decided_h:<5} {len(budgets) - len(grid_budgets):>8}")
        for key, value in zip(keys, (study.tokens, fixed.tokens, hindsight.tokens, wrong_a, wrong_f, wrong_h,
                                     decided_a, decided_f, decided_h), strict=True):
            totals[key] += value
    print(f"all ({mix}): adaptive {totals['adaptive']:,} tokens; the fixed grid reaching its verdicts "
          f"{totals['fixed']:,}: ratio {totals['adaptive'] / totals['fixed']:.2f} (target ≤ 0.60); the hindsight "
          f"bound {totals['hindsight']:,}: ratio {totals['adaptive'] / totals['hindsight']:.2f}; wrong verdicts "
          f"{totals['wrong_a']} adaptive, {totals['wrong_f']} fixed, {totals['wrong_h']} hindsight; decided "
          f"{totals['decided_a']}, {totals['decided_f']}, {totals['decided_h']} ({time.time() - started:.0f} s)")
    return totals


# ---------------------------------------------------------------------------------------------------------------
# 4. A finished run's own results


def replay_run(run: Path, max_seeds: int | None) -> None:
    """Seeds only: the adaptive design on a finished run's results, starting from its first two seeds."""
    from gridlab.layout import RunPaths
    from gridlab.report.read import headline_values, metric_direction, read_results

    database = RunPaths(run).database
    if not database.exists():
        print(f"\n4. No finished run at {run} (no {database.name}); skipped")
        return
    results = read_results(database)
    values = headline_values(results.cells, results.metrics, "val_loss").filter(pl.col("budget_tokens") > 0)
    seeds = sorted(values["seed"].unique().to_list())
    if len(seeds) < 3:
        print(f"\n4. {run}: {len(seeds)} seed(s) per cell; an adaptive replay needs at least 3; skipped")
        return
    higher = metric_direction(results.metrics, "val_loss")
    design = Q.Design(2, min(max_seeds or len(seeds), len(seeds)))
    keys = ["method", "ratio", "setting", "budget_tokens"]
    have = {key: 2 for key in values.select(keys).unique().rows()}
    added = []
    round_ = 0
    while True:
        chosen = values.filter(pl.struct(keys + ["seed"]).map_elements(
            lambda row: seeds.index(row["seed"]) < have[tuple(row[k] for k in keys)], return_dtype=pl.Boolean))
        additions = pl.DataFrame(added) if added else None
        gaps = Q.sequential_gap_table(chosen, higher, "model", 0.02, design, additions)
        open_ = [tuple(r[k] for k in keys) for r in gaps.filter(pl.col("verdict") == "inconclusive").iter_rows(
            named=True) if have[tuple(r[k] for k in keys)] < design.last]
        if not open_:
            break
        round_ += 1
        for key in open_:
            added.append(dict(zip(keys, key, strict=True), seed=seeds[have[key]], round=round_))
            have[key] += 1
    used = sum(have.values())
    print(f"\n4. {run}: {len(have)} cells, seeds {seeds}: the adaptive replay used {used} cell-seeds in {round_} "
          f"round(s) against {len(have) * design.last} for every cell at {design.last} seeds "
          f"({used / (len(have) * design.last):.2f}); verdicts: "
          + ", ".join(f"{v} {n}" for v, n in gaps.group_by("verdict").len().iter_rows()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000, help="replicate studies per validity row")
    parser.add_argument("--paths", type=int, default=400_000, help="simulated cells for the boundaries")
    parser.add_argument("--studies", type=int, default=24, help="synthetic studies for the token count")
    parser.add_argument("--max-seeds", type=int, default=8)
    parser.add_argument("--mixes", nargs="*", default=list(MIXES), choices=MIXES, help="the studies' gap curves")
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "study", help="a finished run to replay")
    parser.add_argument("--skip", nargs="*", default=[], choices=["validity", "boundaries", "tokens", "run"])
    args = parser.parse_args()
    if "validity" not in args.skip:
        validity(args.reps)
    if "boundaries" not in args.skip:
        boundaries_not_used(args.paths)
    if "tokens" not in args.skip:
        for mix in args.mixes:
            tokens(args.studies, args.max_seeds, mix)
    if "run" not in args.skip:
        replay_run(args.run, args.max_seeds)


if __name__ == "__main__":
    main()
