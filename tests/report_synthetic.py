"""Synthetic results databases in the store's exact schema (docs/architecture.md), with known answers."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from gridlab.db import SCHEMA as STORE_SCHEMA

# The runner's own table definitions, so these databases follow the schema exactly as the store writes it.
SCHEMA = {table: dict(columns) for table, columns in STORE_SCHEMA.items()}

_POLARS = {"VARCHAR": pl.Utf8, "BIGINT": pl.Int64, "INTEGER": pl.Int32, "DOUBLE": pl.Float64, "BOOLEAN": pl.Boolean}

GRANULARITY = {"shortgpt": "depth", "minitron-depth": "depth", "minitron-width": "width", "llm-pruner": "width",
               "wanda": "sparse", "sparsegpt": "sparse"}

# metric value of one cell: (method, ratio, init, setting, trained tokens, seed) -> value
LossFunction = Callable[[str, float, str, int, int, int], float]


def power_law(e: float, a: float, alpha: float, reference: float = 1e6) -> Callable[[float], float]:
    return lambda tokens: e + a * (tokens / reference) ** (-alpha)


def build_cells(methods: list[str], ratios: list[float], budgets: list[int], seeds: list[int], parent_tokens: int,
                granularity: dict[str, str] | None = None, references: bool = False) -> list[dict]:
    """Every cell of the grid, all pending: pruned cells once per setting, random cells per setting. With
    `references`, also the budget-0 cells: pruned right after pruning, random at init (setting 1) and the random
    trajectory at exactly P tokens (setting 2). Random cells of methods of one granularity share a train stage (the
    same architecture), as the planner shares them."""
    granularity = {**GRANULARITY, **(granularity or {})}
    cells = []
    for method in methods:
        for ratio in ratios:
            for setting in (1, 2):
                for init in ("pruned", "random"):
                    for budget in ([0] if references else []) + list(budgets):
                        for seed in seeds:
                            trained = budget + (parent_tokens if (init, setting) == ("random", 2) else 0)
                            family = granularity.get(method, "depth")
                            stage = (f"train-{method}-{ratio}-pruned-{seed}" if init == "pruned"
                                     else f"train-{family}-{ratio}-random-{seed}")
                            cells.append(dict(
                                cell_id=f"{method}-{ratio}-{init}-s{setting}-{budget}-{seed}", method=method,
                                granularity=family, ratio=ratio, achieved_ratio=ratio,
                                init=init, setting=setting, budget_tokens=budget, trained_tokens=trained, seed=seed,
                                status="pending", error=None, train_stage=stage, branch_path=None,
                            ))
    return cells


def finish(cells: list[dict], loss: LossFunction, metric: str = "val_loss", curve_points: int = 8,
           done: Callable[[dict], bool] = lambda cell: True, higher_is_better: bool | None = False) -> list[dict]:
    """Mark cells done (those `done` selects) and produce their metrics, with a train_loss curve per trained cell.
    `higher_is_better` is what the metric declares (the metrics table's column)."""
    rows = []
    for cell in cells:
        if not done(cell):
            continue
        cell["status"] = "done"
        cell["branch_path"] = f"runs/x/trajectories/{cell['train_stage']}/branches/{cell['trained_tokens']}"
        trained = cell["trained_tokens"]
        value = loss(cell["method"], cell["ratio"], cell["init"], cell["setting"], trained, cell["seed"])
        rows.append(dict(cell_id=cell["cell_id"], tokens=trained, name=metric, value=value, stderr=None,
                         higher_is_better=higher_is_better))
        if metric != "val_loss":
            rows.append(dict(cell_id=cell["cell_id"], tokens=trained, name="val_loss", value=value, stderr=None,
                             higher_is_better=False))
        if trained == 0:
            continue
        for tokens in np.linspace(trained / curve_points, trained, curve_points).astype(int):
            rows.append(dict(cell_id=cell["cell_id"], tokens=int(tokens), name="train_loss",
                             value=value + 2.0 / (1 + tokens / 1e6), stderr=None, higher_is_better=False))
            rows.append(dict(cell_id=cell["cell_id"], tokens=int(tokens), name="lr", value=1e-3, stderr=None,
                             higher_is_better=None))
    return rows


def _frame(rows: list[dict] | pl.DataFrame, columns: dict[str, str]) -> pl.DataFrame:
    """Rows in the table's column order and types; columns a row does not name are null."""
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(
        [{c: row.get(c) for c in columns} for row in rows], schema={c: _POLARS[t] for c, t in columns.items()})
    return frame.with_columns(*(pl.lit(None, dtype=_POLARS[t]).alias(c) for c, t in columns.items()
                                if c not in frame.columns)).select(list(columns))


def write_db(path: Path, cells: list[dict], metrics: list[dict] | pl.DataFrame, *, name: str = "synthetic",
             parent: str = "nano", parent_tokens: int = 50_000_000, calibration_tokens: int = 65_536,
             spec: dict | None = None, parent_metrics: list[dict] | None = None,
             parent_params: int | None = None) -> Path:
    """A results database; `parent_metrics=None` leaves the parent_metrics table out (a database written before it
    existed), [] creates it empty; `parent_params=None`: the parent's size unknown (a database from before it was
    recorded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = dict(name=name, parent=parent, parent_tokens=parent_tokens, parent_params=parent_params,
                calibration_tokens=calibration_tokens,
                corpus_fingerprint="sha256:0123abcd", gridlab_version="0.1.0", spec_json=json.dumps(spec or {}),
                submitted_at=1_764_000_000.0)
    tables = [("grid", [grid]), ("cells", cells), ("metrics", metrics), ("stages", [])]
    if parent_metrics is not None:
        tables.append(("parent_metrics", parent_metrics))
    with duckdb.connect(str(path)) as con:
        for table, rows in tables:
            columns = SCHEMA[table]
            con.execute(f"create table {table} (" + ", ".join(f"{c} {t}" for c, t in columns.items()) + ")")
            if len(rows):
                con.register("frame", _frame(rows, columns))
                con.execute(f"insert into {table} select * from frame")
                con.unregister("frame")
    return path


def parent_loss(value: float, tokens: int, stderr: float | None = None) -> list[dict]:
    """parent_metrics rows: the parent's val_loss (and val_ppl) after its `tokens` pretraining tokens."""
    return [dict(tokens=tokens, name="val_loss", value=value, stderr=stderr, higher_is_better=False),
            dict(tokens=tokens, name="val_ppl", value=float(np.exp(value)), stderr=None, higher_is_better=False)]


# ---------------------------------------------------------------------------------------------------------------
# The design's correlation, for simulations with a known truth (tests/test_report_mixed.py, test_report_verdicts.py)


def design_noise(rng: np.random.Generator, reps: int, seeds: int, ratios: int, budgets: int, *, sd_seed: float = 0.04,
                 sd_seed_ratio: float = 0.02, sd_seed_budget: float = 0.04, sd_residual: float = 0.03,
                 growth: float = 1.5, sd_twin: float = 0.0, methods: int = 1) -> np.ndarray:
    """Noise of the per-seed paired differences d(seed, ratio, budget) as the grid's design makes it:
    (reps, methods, seeds, ratios × budgets), cells ordered ratio-major (cell = ratio · budgets + budget).

    Per replicate and seed: a seed effect shared by every cell (the calibration sample and the data order), a seed ×
    ratio effect, a seed × budget effect shared by the ratios (budgets are branches of one trunk; every ratio sees
    the same batches), and a residual; the seed × budget and residual spreads grow by `growth` per budget (the
    spread grows with the budget). With `methods` > 1 the methods' differences share the random twin's noise
    (`sd_twin`, growing with the budget too): d_m = pruned_m − random, and one random arm serves every method of a
    granularity."""
    growth_b = growth ** np.arange(budgets)

    def one(shape_tail):
        return rng.standard_normal((reps, methods, seeds, *shape_tail))

    ratio_of = np.repeat(np.arange(ratios), budgets)
    budget_of = np.tile(np.arange(budgets), ratios)
    noise = (sd_seed * one((1,)) + sd_seed_ratio * one((ratios,))[..., ratio_of]
             + sd_seed_budget * (one((budgets,)) * growth_b)[..., budget_of]
             + sd_residual * one((ratios * budgets,)) * growth_b[budget_of])
    if sd_twin:
        twin = rng.standard_normal((reps, 1, seeds, ratios * budgets)) * growth_b[budget_of]
        noise = noise - sd_twin * twin
    return noise


def design_values(noise: np.ndarray, gaps: np.ndarray, ratios: list[float], budgets: list[int],
                  methods: list[str], granularity: str = "depth") -> pl.DataFrame:
    """One replicate's seed-level headline values (the frame stats.gap_table reads) from design_noise()[rep] and the
    true gap of every cell (methods, ratios × budgets): the random arm is 3.0 per seed; pruned = random + gap +
    noise. Setting 1 only."""
    rows = []
    for mi, method in enumerate(methods):
        for si in range(noise.shape[1]):
            for ri, ratio in enumerate(ratios):
                for bi, budget in enumerate(budgets):
                    cell = ri * len(budgets) + bi
                    common = dict(granularity=granularity, method=method, ratio=ratio, setting=1,
                                  budget_tokens=budget, trained_tokens=budget, seed=si)
                    rows.append({**common, "init": "random", "value": 3.0})
                    rows.append({**common, "init": "pruned",
                                 "value": 3.0 + float(gaps[mi, cell]) + float(noise[mi, si, cell])})
    return pl.DataFrame(rows, schema_overrides={"ratio": pl.Float64})


# Studies with a known answer: learning curves with a known effective data transferred, and gap curves with a known
# trend, correlated within seeds as the design makes them (budgets are branches of one trunk per seed).


def noise(*key) -> np.random.Generator:
    """A generator fixed by `key` (the same cell always gets the same noise, in any order)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def transfer_loss(curve: Callable[[float], float], transfer: Callable[[str, float, float], float],
                  seed_sd: float = 0.02, cell_sd: float = 0.01) -> LossFunction:
    """Losses where the random arm follows `curve` (value at trained tokens D) and the pruned model at budget B equals
    the random arm at B + transfer(method, ratio, B): D_eff(B) = transfer(...) by construction. A seed's own level
    (its data order, shared by both arms and every budget) plus independent noise per cell."""
    def loss(method, ratio, init, setting, tokens, seed):
        level = noise("seed", ratio, seed).normal(0, seed_sd)
        own = noise(method if init == "pruned" else "random", ratio, init, tokens, seed).normal(0, cell_sd)
        if tokens == 0:
            return 8.0 + level
        if init == "random":
            return curve(tokens) + level + own
        return curve(tokens + transfer(method, ratio, tokens)) + level + own
    return loss


def gap_study(truth: Callable[[np.ndarray], np.ndarray], budgets, seeds: int, replicates: int,
              rng: np.random.Generator, noise: float = 0.04, seed_sd: float = 0.05, slope_sd: float = 0.02,
              rho: float = 0.5, growth: float = 0.3) -> np.ndarray:
    """Paired differences d[replicate, seed, budget] = truth(B) + u_s + w_s·(x − x̄) + e, vectorised: a seed's own
    level u_s and slope w_s in x = ln B (shared by its budgets, as one trunk is), and noise that is AR(1) along the
    budgets (correlation `rho` between neighbouring branches) with a spread growing by `growth` from the smallest to
    the largest budget. `budgets` may include budgets held out of a fit (the truth a rerun of these seeds would see)."""
    b = np.asarray(budgets, dtype=float)
    x = np.log(b / b[0])
    level = rng.normal(0, seed_sd, (replicates, seeds, 1))
    slope = rng.normal(0, slope_sd, (replicates, seeds, 1))
    scale = noise * (1 + growth * x / max(x.max(), 1e-12))
    shocks = rng.normal(size=(replicates, seeds, b.size))
    e = np.empty_like(shocks)
    e[..., 0] = shocks[..., 0]
    for k in range(1, b.size):
        e[..., k] = rho * e[..., k - 1] + math.sqrt(1 - rho**2) * shocks[..., k]
    return truth(b)[None, None, :] + level + slope * (x - x.mean())[None, None, :] + e * scale


def paired_significance(data: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """Per replicate and budget of `gap_study` data (losses: a negative gap favours pruning): +1 where the per-cell
    paired t-interval says prune, −1 where it says scratch, 0 otherwise (the verdicts a crossover rests on)."""
    from scipy import special

    seeds = data.shape[1]
    mean = data.mean(axis=1)
    half = special.stdtrit(seeds - 1, 0.5 + confidence / 2) * data.std(axis=1, ddof=1) / math.sqrt(seeds)
    return np.where(mean + half < 0, 1, np.where(mean - half > 0, -1, 0))


def declared_crossovers(budgets, data: np.ndarray, families=None) -> list[str]:
    """The crossover kind gridlab.report.scaling declares for each replicate of `gap_study` data (G, S, K), with
    the per-cell paired verdicts: the same functions `trend` runs, vectorised over the replicates."""
    from gridlab.report import scaling as F

    budgets = np.asarray(budgets, dtype=float)
    fits = F.fit_gap_models(budgets, data, families)
    largest = budgets[-1]
    beyond = np.geomspace(largest, F.HORIZON * largest, F.EXTRAPOLATION_POINTS)
    prediction = F.predict(fits, beyond)
    check = F.holdout(fits, families)
    significant = paired_significance(data)
    kinds = []
    for g in range(fits.groups):
        benefit = -fits.means[g]
        inside = F.inside_crossing(budgets, benefit, significant[g])
        if inside is not None:
            kinds.append(inside[0])
            continue
        row = None if check is None else dict(checked=bool(check.checked[g]), covered=bool(check.covered[g]))
        found = F.extrapolate(fits, g, prediction, row, beyond, 0, benefit[-1],
                              dict(granularity="", method="", ratio=0.0, setting=1, model=fits.model(g)))
        kinds.append(found.kind)
    return kinds


def learning_study(curve: Callable[[np.ndarray], np.ndarray], transfer: Callable[[np.ndarray], np.ndarray],
                   budgets, parent_tokens: float, seeds: int, replicates: int, rng: np.random.Generator,
                   seed_sd: float = 0.03, cell_sd: float = 0.02) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Learning curves with a known D_eff, vectorised: the random arm's values at every token count its trajectory
    has (budgets B, the parent's P, and P + B), (replicates, seeds, tokens), and the pruned values at B, (replicates,
    seeds, budgets), equal to the random arm's curve at B + transfer(B). A seed's own level is shared by both arms
    and every token count (one data order); each cell adds its own noise. Returns (tokens, random, pruned)."""
    b = np.asarray(budgets, dtype=float)
    tokens = np.concatenate([b, [parent_tokens], parent_tokens + b])
    level = rng.normal(0, seed_sd, (replicates, seeds, 1))
    random = curve(tokens)[None, None, :] + level + rng.normal(0, cell_sd, (replicates, seeds, tokens.size))
    pruned = curve(b + transfer(b))[None, None, :] + level + rng.normal(0, cell_sd, (replicates, seeds, b.size))
    return tokens, random, pruned
