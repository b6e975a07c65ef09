"""A grid's cells before any stage exists: which (method, ratio, init, lr, setting, budget, seed) points a plan holds.

The grid file gives a product — methods × their ratios × seeds × budgets, each point in every init (arm) at each of
that arm's learning rates, and in every setting — and ``exclude`` rules take cells out of it. A caller may add
points beyond the product (``extra``: ``CellKey``s), e.g. more seeds or budgets for chosen groups after a first round
of results; they pass the same checks and exclusions as the grid's own. Every (method, ratio, seed) that appears is
a ``Replicate``: one prune stage, one random twin (and embeddings twin), one trajectory per model and lr, and budget
0 (the models before any retraining: the reference cells) beside its budgets. gridlab.plan builds the stages from this.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gridlab.errors import UserError
from gridlab.pruning import METHODS
from gridlab.spec import MAX_SEED, GridSpec, MethodSpec


@dataclass(frozen=True)
class CellKey:
    """One (method, ratio, budget, seed) point of a grid; it stands for its cells of every init, lr and setting the
    grid has — or, with ``setting``, of that setting only (an adaptive round adds a seed where one setting's verdict
    is open: a setting-1 seed need not buy setting 2's P + B random training). ``method`` is the method's label
    (``MethodSpec.label``: what the results call it), ``budget`` a token count (0: the reference cells only)."""

    method: str
    ratio: float
    budget: int
    seed: int
    setting: int | None = None


@dataclass(frozen=True)
class CellDraft:
    """A cell before its stages exist (gridlab.contracts.Cell once planned)."""

    method: MethodSpec
    granularity: str
    ratio: float
    init: str
    setting: int
    budget_tokens: int
    trained_tokens: int      # B, or P + B for a random cell in setting 2
    seed: int
    lr: float                # the peak learning rate of the arm's schedule this cell trains with


@dataclass
class Replicate:
    """One (method, ratio, seed): one prune stage, its random twin (and embeddings twin), each trained to
    ``budgets`` (0 first) at every learning rate of its arm, each budget in the settings ``settings[budget]`` (every
    setting of the grid, unless an extra cell asked for one)."""

    method: MethodSpec
    ratio: float
    seed: int
    budgets: list[int]
    settings: dict[int, set[int]] = field(default_factory=dict)
    cells: list[CellDraft] = field(default_factory=list)   # those the exclude rules leave, in plan order


@dataclass
class CellGrid:
    replicates: list[Replicate]
    excluded: int

    @property
    def cells(self) -> list[CellDraft]:
        return [cell for replicate in self.replicates for cell in replicate.cells]

    def ratios(self, method: MethodSpec) -> list[float]:
        """The ratios a method is pruned at (the grid's and any extra cells'), in order."""
        return list(dict.fromkeys(r.ratio for r in self.replicates if r.method is method))


def granularity(method: MethodSpec) -> str:
    return METHODS[method.name].granularity


def grid_keys(spec: GridSpec) -> list[CellKey]:
    """The product the grid file declares (budget 0 is added per replicate by ``enumerate_cells``)."""
    return [CellKey(method.label, float(ratio), budget, seed)
            for method in spec.methods for ratio in spec.method_ratios(method) for seed in spec.seeds
            for budget in spec.budgets]


def enumerate_cells(spec: GridSpec, extra: Iterable[CellKey] = ()) -> CellGrid:
    """The grid's cells and any ``extra`` ones (each checked: a UserError names the bad one), grouped by replicate,
    the exclude rules applied to all of them. An extra cell the grid already has changes nothing. An exclude rule
    that matches no cell is a UserError."""
    methods = {method.label: method for method in spec.methods}
    extra = [_checked(spec, methods, key) for key in extra]
    replicates: dict[tuple[str, float, int], Replicate] = {}
    every = set(spec.settings)
    for key in [*grid_keys(spec), *extra]:
        group = (key.method, key.ratio, key.seed)
        if group not in replicates:
            replicates[group] = Replicate(methods[key.method], key.ratio, key.seed, [0], {0: set(every)})
        replicate = replicates[group]
        if key.budget not in replicate.budgets:
            replicate.budgets.append(key.budget)
        replicate.settings.setdefault(key.budget, set()).update(every if key.setting is None else {key.setting})
    excluded, matched = 0, set()
    for replicate in replicates.values():
        kind = granularity(replicate.method)
        for init in spec.inits:
            for lr in spec.schedule.lrs(init):
                for budget in replicate.budgets:
                    for setting in spec.settings:
                        if setting not in replicate.settings[budget]:
                            continue
                        point = {"method": replicate.method.label, "ratio": replicate.ratio, "init": init,
                                 "budget": budget, "setting": setting, "seed": replicate.seed}
                        hits = {i for i, rule in enumerate(spec.exclude) if rule.matches(point)}
                        if hits:
                            matched |= hits
                            excluded += 1
                            continue
                        replicate.cells.append(CellDraft(replicate.method, kind, replicate.ratio, init, setting,
                                                         budget, trained_tokens(spec, init, setting, budget),
                                                         replicate.seed, lr))
    unmatched = [i for i in range(len(spec.exclude)) if i not in matched]
    if unmatched:
        rule = spec.exclude[unmatched[0]]
        given = ", ".join(f"{k} = {v!r}" for k, v in rule.model_dump().items() if v is not None)
        raise UserError(f"exclude[{unmatched[0]}] ({given}) matches no cell of the grid; remove it or fix its values")
    return CellGrid(list(replicates.values()), excluded)


def trained_tokens(spec: GridSpec, init: str, setting: int, budget: int) -> int:
    """What a cell's model trains: B, or P + B for a random cell in setting 2 (scratch pays for the parent too). A
    pruned or embeddings cell starts from what the parent learnt, so it trains B in either setting."""
    return budget + spec.parent.tokens if (init == "random" and setting == 2) else budget


def _checked(spec: GridSpec, methods: dict[str, MethodSpec], key: CellKey) -> CellKey:
    """An extra cell as the grid would take it (ratio as a float), or a UserError naming what is wrong."""
    def refuse(why: str) -> UserError:
        return UserError(f"extra cell {key}: {why}")

    if key.method not in methods:
        raise refuse(f"no method is labelled {key.method!r}; methods: {', '.join(methods)}")
    method = methods[key.method]
    ratio = float(key.ratio)
    if method.fixed_ratio is not None and abs(ratio - method.fixed_ratio) > 1e-9:
        raise refuse(f"{method.label} prunes at its own ratio {method.fixed_ratio:g} (N:M) only")
    if not 0 < ratio < 1:
        raise refuse("a ratio is above 0 and below 1")
    schedules = [schedule for init in spec.inits for schedule in spec.schedules(init)]
    batch = max(schedule.batch_size for schedule in schedules) * spec.seq_len
    warmup = max(schedule.warmup_tokens for schedule in schedules)
    if key.budget != 0 and (key.budget < batch or key.budget <= warmup):
        raise refuse(f"a budget is 0 (the reference cells) or at least one batch ({batch} tokens) and above "
                     f"schedule.warmup_tokens ({warmup})")
    if not 0 <= key.seed <= MAX_SEED:
        raise refuse(f"a seed is between 0 and {MAX_SEED}")
    if key.setting is not None and key.setting not in spec.settings:
        raise refuse(f"the grid's settings are {', '.join(map(str, spec.settings))}")
    return CellKey(key.method, ratio, int(key.budget), int(key.seed), key.setting)


def fits(spec: GridSpec, key: CellKey) -> bool:
    """Whether an extra cell is a point of this grid's lists but for its seed and budget: a method it has (by label),
    one of that method's ratios, one of its settings. An adaptive study's record keeps its additions when the grid
    file changes; those that no longer fit are left out of the plan, as the cells of a method removed from the grid
    would be (gridlab.rounds.extra_cells)."""
    method = next((m for m in spec.methods if m.label == key.method), None)
    return (method is not None and any(abs(float(key.ratio) - r) < 1e-9 for r in spec.method_ratios(method))
            and (key.setting is None or key.setting in spec.settings))
