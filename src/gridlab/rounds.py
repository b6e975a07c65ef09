"""The record of an adaptive study (`gridlab submit --adaptive`): runs/<grid>/adaptive.json.

Each round of gridlab.adaptive adds cells to the grid — the next seed of a cell whose verdict is inconclusive, a
budget that narrows a crossover — and says why. The record is written through gridlab.atomic before the round's
stages are submitted, so a crash between rounds loses nothing: the next `submit --adaptive` plans the recorded cells
(the planner reads them as `extra_cells`, gridlab.plan.cell_keys) and goes on. `gridlab status`, `report`, `reset`,
`clean` and `export` see them as ordinary cells, and gridlab.db ingests the rounds into the tables
`adaptive_rounds` and `adaptive_additions`. Workers never read it.

    {"version": 1,
     "design": {"first": 2, "last": 8, "spending": "pocock", "alpha": 0.05, "margin": 0.02, "metric": "val_loss"},
     "rounds": [{"round": 1, "looked_at": 1.7e9, "tokens": 81920, "gpu_hours": null, "open": 5,
                 "verdicts": {"prune": 3, "scratch": 0, "equivalent": 0, "inconclusive": 5},
                 "seeds": [{"method": "wanda", "ratio": 0.5, "setting": 1, "budget": 20000, "seed": 2,
                            "why": "inconclusive: gap +0.012, 95 % repeated CI ±0.031 with 2 seeds"}],
                 "budgets": [{"method": "wanda", "ratio": 0.5, "setting": 1, "budget": 28288, "seeds": [0, 1],
                              "why": "crossover between 20,000 and 40,000 tokens, where …: the geometric midpoint"}]}],
     "stopped": {"look": 3, "reason": "decided", "line": "…", "at": 1.7e9, "verdicts": {…}, "tokens": 163840,
                 "grid_tokens": 2457600, "fixed_tokens": 4915200}}

`design` is fixed by the first look that adds anything: a later call with another margin, max_seeds, spending or
metric is refused (the sequential design is declared before looking). `stopped` is the latest look's reason to stop,
cleared when a later call (caps raised) adds another round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from gridlab import atomic
from gridlab.errors import UserError
from gridlab.layout import RunPaths

VERSION = 1
STOP_REASONS = ("decided", "cap", "exhausted")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DesignRecord(_Record):
    """The sequential design the study's verdicts are made with (gridlab.report.sequential.Design + what it
    judges)."""

    first: int
    last: int
    spending: str
    alpha: float
    margin: float
    metric: str


class SeedAddition(_Record):
    """The next seed of one cell (both inits of method × ratio at a budget and setting)."""

    method: str
    ratio: float
    setting: int
    budget: int
    seed: int
    why: str


class BudgetAddition(_Record):
    """A new budget for one group (method × ratio × setting), with the grid's seeds."""

    method: str
    ratio: float
    setting: int
    budget: int
    seeds: list[int]
    why: str


class Round(_Record):
    round: int
    looked_at: float  # unix time of the look that decided the round
    seeds: list[SeedAddition]
    budgets: list[BudgetAddition]
    tokens: int  # what the round trains (its new branches and trajectories, trunks shared)
    gpu_hours: float | None  # the same in estimated GPU-hours; None without an estimate (no GPUs in [resources.train])
    verdicts: dict[str, int]  # the verdicts of the look that decided it
    open: int  # inconclusive cells at that look

    @property
    def cells(self) -> int:
        """Cells added (per arm)."""
        return len(self.seeds) + sum(len(a.seeds) for a in self.budgets)

    @property
    def summary(self) -> str:
        """What the round added and why, in one line."""
        parts = []
        if self.seeds:
            budgets = sorted({a.budget for a in self.seeds})
            parts.append(f"the next seed of {len(self.seeds)} cell(s) whose verdict is inconclusive (budgets "
                         + ", ".join(f"{b:,}" for b in budgets) + ")")
        parts += [f"budget {a.budget:,} for {a.method} ratio {a.ratio:g} setting {a.setting}: {a.why}"
                  for a in self.budgets]
        return "; ".join(parts)


class Stop(_Record):
    look: int  # the look that stopped (the number of rounds before it)
    reason: Literal["decided", "cap", "exhausted"]
    line: str  # what `submit --adaptive`, status and the report say
    at: float
    verdicts: dict[str, int]
    tokens: int  # what every round trained together
    grid_tokens: int  # what the grid's own cells train
    fixed_tokens: int | None  # a fixed grid reaching the same verdicts: every cell at the most seeds any cell got,
    #                           every budget any group got


class Record(_Record):
    version: int = VERSION
    design: DesignRecord | None = None
    rounds: list[Round] = []
    stopped: Stop | None = None

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.rounds)

    @property
    def gpu_hours(self) -> float | None:
        hours = [r.gpu_hours for r in self.rounds]
        return None if not hours or any(h is None for h in hours) else sum(hours)


def read_record(run_dir: Path) -> Record:
    """The study's record; an empty one when the run has none (a fixed grid). A file that is not a record (edited by
    hand, another tool's) is one UserError line: planning without its rounds would drop their cells."""
    path = RunPaths(run_dir).adaptive
    if not path.exists():
        return Record()
    try:
        return Record.model_validate_json(path.read_bytes())
    except ValidationError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path}: not an adaptive study's record ({first}); restore it (its rounds' cells are part "
                        f"of the plan), or move it away to plan the grid without them") from None


def write_record(run_dir: Path, record: Record) -> None:
    """Write the record whole (gridlab.atomic: a reader sees the old one or the new one)."""
    atomic.write_json(RunPaths(run_dir).adaptive, record.model_dump(mode="json"), indent=1)


def extra_cells(record: Record, spec=None) -> list:
    """The cells the rounds added, as the planner takes them (gridlab.cells.CellKey, each in the setting whose
    verdict asked for it, for build_plan(spec, extra_cells)); with ``spec``, only those that still fit the grid
    (cells.fits: the record outlives edits of the grid file)."""
    from gridlab.cells import CellKey, fits  # the pruning registry, torch: status and ingest read records without it

    cells = []
    for entry in record.rounds:
        cells += [CellKey(a.method, a.ratio, a.budget, a.seed, a.setting) for a in entry.seeds]
        cells += [CellKey(a.method, a.ratio, a.budget, seed, a.setting) for a in entry.budgets for seed in a.seeds]
    return cells if spec is None else [cell for cell in cells if fits(spec, cell)]


def run_extra_cells(spec) -> list:
    """extra_cells of the grid's run folder's record that fit the grid (none when it has no record)."""
    return extra_cells(read_record(spec.run_dir), spec)


def additions(record: Record) -> list[dict]:
    """One row per added cell (both arms): round, kind (seed | budget), method, ratio, setting, budget_tokens,
    seed, why — the rows of the database's adaptive_additions and of report.sequential.with_rounds."""
    rows = []
    for entry in record.rounds:
        for a in entry.seeds:
            rows.append(dict(round=entry.round, kind="seed", method=a.method, ratio=a.ratio, setting=a.setting,
                             budget_tokens=a.budget, seed=a.seed, why=a.why))
        for a in entry.budgets:
            rows += [dict(round=entry.round, kind="budget", method=a.method, ratio=a.ratio, setting=a.setting,
                          budget_tokens=a.budget, seed=seed, why=a.why) for seed in a.seeds]
    return rows
