"""`--where`: a sub-grid, by what its cells are and what state its stages are in.

    --where method=wanda,sparsegpt --where budget=50B --where state=failed

Each ``--where KEY=VALUE[,VALUE…]`` accepts any of its values; several ``--where`` must all hold (the values of one
key given twice are pooled). Keys:

- cell keys — ``method`` (label), ``granularity``, ``ratio``, ``init`` (pruned, random, embeddings), ``lr`` (the
  arm's peak learning rate), ``budget`` (B, a token count as in grid.toml; 0 for the reference cells), ``setting``,
  ``seed``: a stage is selected when any cell it serves matches (the stages
  that produce the cell's numbers and everything upstream of them, the parent's evaluation included);
- stage keys — ``kind`` (data, parent, prune, init, train, eval; tokenizer, shard: the data stage's tasks),
  ``state`` (pending, running, done, failed, cancelled, unknown), ``stage`` (a stage id or a unique prefix of one).

An unknown key or a value the grid does not have is a UserError naming the valid ones. Cell-level verbs (report,
export) select cells: by the cell keys, and by ``state`` as the cell's state.

The verbs that destroy or stop work (reset, cancel, clean) select differently (``destructive_scope``), so that they
never take work that other cells share:

- a *cell filter* (any cell key, with or without stage keys) selects cells, and the verb acts only on the stages
  those cells need and **no unselected cell needs**. A stage a selected cell needs is kept when an unselected cell
  needs it too: the data stage and its tasks, the parent and its evaluation (every cell of the grid needs them,
  whatever its method, ratio, init, budget, setting or seed, so a cell filter never touches them), a random twin
  two methods share, a train stage whose trajectory also serves budgets or settings that are not selected (a train
  stage serves every budget of its model: resetting one budget resets that budget's evaluation, never the
  trajectory the others ride on), the evaluation of a branch that a pruned cell of the other setting also reads.
  Stage keys given beside it narrow the stages it acts on further.
- a *stage filter* (only ``kind``, ``stage``, ``state``) selects stages; reset acts on them and on everything
  downstream of them, cancel on them, and the verbs say so.

For cancel, "needs" is the same relation over stages that have not finished: a queued or running stage an
unselected cell waits for (the parent, a shared random twin, a trajectory) keeps running, and only the selected
cells' own stages are stopped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gridlab.config import parse_tokens
from gridlab.contracts import DATA_TASK_KINDS, STAGE_KINDS
from gridlab.errors import UserError
from gridlab.state import STATES

CELL_KEYS = ("method", "granularity", "ratio", "init", "lr", "budget", "setting", "seed")
_FLOAT_KEYS = ("ratio", "lr")   # compared within a relative tolerance (a value written another way is the same)
STAGE_KEYS = ("kind", "state", "stage")
KEYS = CELL_KEYS + STAGE_KEYS
_CELL_FIELD = {"budget": "budget_tokens"}


@dataclass
class Where:
    """Parsed --where conditions: key → the values it accepts (typed as the cells and stages hold them)."""

    conditions: dict[str, set[Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.conditions)

    @property
    def on_cells(self) -> bool:
        return any(key in self.conditions for key in CELL_KEYS)

    def cell_matches(self, cell) -> bool:
        for key in CELL_KEYS:
            if key in self.conditions:
                value = getattr(cell, _CELL_FIELD.get(key, key))
                if key in _FLOAT_KEYS:
                    if value is None or not any(_same(value, accepted) for accepted in self.conditions[key]):
                        return False
                elif value not in self.conditions[key]:
                    return False
        return True


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def _stage_fields(stage) -> tuple[str, str, dict[str, str]]:
    if isinstance(stage, dict):
        return stage["id"], stage["kind"], stage["deps"]
    return stage.id, stage.kind, stage.deps


def _token_value(text: str) -> int:
    if text.strip() == "0":
        return 0
    return parse_tokens(text)


def parse_where(expressions: Iterable[str], stages: list[Any], cells: list[Any]) -> Where:
    """Check and type ``--where`` expressions against the grid's own stages and cells."""
    where = Where()
    kinds = {_stage_fields(s)[1] for s in stages}
    valid = {
        "method": sorted({c.method for c in cells}), "granularity": sorted({c.granularity for c in cells}),
        "ratio": sorted({c.ratio for c in cells}), "init": sorted({c.init for c in cells}),
        "lr": sorted({c.lr for c in cells if getattr(c, "lr", None) is not None}),
        "budget": sorted({c.budget_tokens for c in cells}), "setting": sorted({c.setting for c in cells}),
        "seed": sorted({c.seed for c in cells}),
        "kind": [kind for kind in STAGE_KINDS if kind in kinds or kind not in DATA_TASK_KINDS], "state": list(STATES),
    }
    ids = [_stage_fields(s)[0] for s in stages]
    for expression in expressions:
        key, equals, text = expression.partition("=")
        key = key.strip()
        if not equals or not key or not text.strip():
            raise UserError(f"--where {expression!r}: give KEY=VALUE[,VALUE…]; keys: {', '.join(KEYS)}")
        if key not in KEYS:
            raise UserError(f"--where {expression!r}: unknown key {key!r}; valid keys: {', '.join(KEYS)}")
        accepted = where.conditions.setdefault(key, set())
        for raw in (part.strip() for part in text.split(",")):
            accepted.add(_value(key, raw, expression, valid, ids))
    return where


def _value(key: str, raw: str, expression: str, valid: dict[str, list], ids: list[str]) -> Any:
    def refuse(why: str = "") -> UserError:
        shown = ", ".join(_show(key, v) for v in valid[key])
        return UserError(f"--where {expression!r}: {key} {raw!r} {why or 'is not in this grid'}; valid: {shown}")

    if key == "stage":
        matches = [stage_id for stage_id in ids if stage_id.startswith(raw)]
        if len(matches) != 1:
            state = "matches no stage of this grid" if not matches else f"is ambiguous ({len(matches)} stages)"
            raise UserError(f"--where {expression!r}: stage {raw!r} {state}; give a stage id or a unique prefix "
                            f"of one (the folders under stages/ of the run)")
        return matches[0]
    if key in _FLOAT_KEYS:
        try:
            value = float(raw)
        except ValueError:
            raise refuse("is not a number") from None
        if not any(_same(value, v) for v in valid[key]):
            raise refuse()
        return value
    if key in ("setting", "seed"):
        try:
            value = int(raw)
        except ValueError:
            raise refuse("is not a whole number") from None
    elif key == "budget":
        try:
            value = _token_value(raw)
        except ValueError:
            raise refuse("is not a token count") from None
    else:
        value = raw
    if value not in valid[key]:
        raise refuse()
    return value


def _show(key: str, value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def upstream_closure(stages: list[Any], chosen: Iterable[str]) -> set[str]:
    """``chosen`` and every stage they depend on, directly or not."""
    deps = {sid: list(d.values()) for sid, _, d in map(_stage_fields, stages)}
    closed: set[str] = set()
    todo = list(chosen)
    while todo:
        stage_id = todo.pop()
        if stage_id not in closed:
            closed.add(stage_id)
            todo.extend(deps.get(stage_id, []))
    return closed


def downstream_closure(stages: list[Any], chosen: Iterable[str]) -> set[str]:
    """``chosen`` and every stage that depends on them, directly or not (stages in dependency order)."""
    closed = set(chosen)
    for stage in stages:
        stage_id, _, deps = _stage_fields(stage)
        if set(deps.values()) & closed:
            closed.add(stage_id)
    return closed


def cells_of(where: Where, cells: list[Any]) -> list[Any]:
    return [cell for cell in cells if where.cell_matches(cell)]


def select_stages(where: Where, stages: list[Any], cells: list[Any], status: dict[str, str] | None = None,
                  upstream: bool = False) -> set[str]:
    """The stage ids ``where`` selects. ``status``: stage id → state (needed for ``state``). ``upstream``: add what
    the selected stages need (what submit runs)."""
    selected = {_stage_fields(s)[0] for s in stages}
    if where.on_cells:
        matching = cells_of(where, cells)
        served = upstream_closure(stages, [s for c in matching for s in (c.eval_stage, c.start_eval_stage)])
        parents = {sid for sid, kind, _ in map(_stage_fields, stages) if kind == "parent"} & served
        served |= {sid for sid, kind, deps in map(_stage_fields, stages)
                   if kind == "eval" and deps.get("model") in parents}
        selected &= served
    kinds = where.conditions.get("kind")
    states = where.conditions.get("state")
    ids = where.conditions.get("stage")
    chosen = set()
    for stage in stages:
        stage_id, kind, _ = _stage_fields(stage)
        if stage_id not in selected:
            continue
        if kinds and kind not in kinds:
            continue
        if ids and stage_id not in ids:
            continue
        if states and (status is None or status.get(stage_id) not in states):
            continue
        chosen.add(stage_id)
    return upstream_closure(stages, chosen) if upstream else chosen


def select_cells(where: Where, cells: list[Any], cell_status: dict[str, str] | None = None) -> list[Any]:
    """The cells a cell-level verb (report, export) keeps: by the cell keys, and ``state`` as the cell's state."""
    for key in ("kind", "stage"):
        if key in where.conditions:
            raise UserError(f"--where {key}=… selects stages; report and export select cells by "
                            f"{', '.join(CELL_KEYS)} and state")
    chosen = cells_of(where, cells)
    states = where.conditions.get("state")
    if states:
        chosen = [c for c in chosen if (cell_status or {}).get(c.cell_id) in states]
    return chosen


# ------------------------------------------------------------------------------------------------ destructive verbs

# Stages every cell of a grid needs whatever its cell keys: a cell filter never acts on them.
GRID_WIDE_KINDS = ("tokenizer", "shard", "data", "parent")


@dataclass
class Scope:
    """What a destructive verb (reset, cancel, clean) acts on, and why.

    ``by`` is "cells" (a cell filter: ``acted`` are the stages only the selected cells need, narrowed by any stage
    keys) or "stages" (a stage filter: ``acted`` are the stages it selects). ``kept`` maps the stages the selected
    cells need but the verb leaves alone to why (``"shared"``: an unselected cell needs it too; ``"grid"``: every
    cell of the grid needs it; ``"filter"``: the stage keys left it out)."""

    by: str
    acted: set[str]
    cells: int = 0                       # cells selected (cell filter)
    total_cells: int = 0
    kept: dict[str, str] = field(default_factory=dict)

    def describe(self, verb: str, where: Iterable[str]) -> str:
        """The first line of a destructive verb's summary: what was selected and by which rule."""
        shown = " ".join(f"--where {w}" for w in where)
        if self.by == "cells":
            return (f"{verb} {shown}: a cell filter, {self.cells} of {self.total_cells} cells; acting only on the "
                    f"stages no unselected cell needs")
        return f"{verb} {shown}: a stage filter, acting on the {len(self.acted)} stage(s) it selects"


def cell_needs(stages: list[Any], cells: list[Any]) -> dict[str, set[int]]:
    """Stage id → the indices of the cells that need it: the stages producing each cell's numbers (its evaluation
    and its model's evaluation before training) and everything upstream of them."""
    deps = {sid: list(d.values()) for sid, _, d in map(_stage_fields, stages)}
    closures: dict[str, set[str]] = {}

    def closure(stage_id: str) -> set[str]:
        if stage_id not in closures:
            found = {stage_id}
            for dep in deps.get(stage_id, []):
                found |= closure(dep)
            closures[stage_id] = found
        return closures[stage_id]

    needs: dict[str, set[int]] = {}
    for index, cell in enumerate(cells):
        for stage_id in closure(cell.eval_stage) | closure(cell.start_eval_stage):
            needs.setdefault(stage_id, set()).add(index)
    return needs


def grid_wide_stages(stages: list[Any]) -> set[str]:
    """The data stage (and its tasks), the parent and the parent's evaluation: every cell needs them."""
    wide = {sid for sid, kind, _ in map(_stage_fields, stages) if kind in GRID_WIDE_KINDS}
    parents = {sid for sid, kind, _ in map(_stage_fields, stages) if kind == "parent"}
    wide |= {sid for sid, kind, deps in map(_stage_fields, stages) if kind == "eval" and deps.get("model") in parents}
    return wide


def _matches_stage_keys(where: Where, stage_id: str, kind: str, status: dict[str, str] | None) -> bool:
    kinds, ids, states = (where.conditions.get(key) for key in ("kind", "stage", "state"))
    if kinds and kind not in kinds:
        return False
    if ids and stage_id not in ids:
        return False
    return not (states and (status is None or status.get(stage_id) not in states))


def destructive_scope(where: Where, stages: list[Any], cells: list[Any],
                      status: dict[str, str] | None = None) -> Scope:
    """The stages a reset, cancel or clean with ``where`` acts on (module docstring: cell filter vs stage filter)."""
    if not where.on_cells:
        return Scope(by="stages", acted=select_stages(where, stages, cells, status), total_cells=len(cells))
    selected = {index for index, cell in enumerate(cells) if where.cell_matches(cell)}
    needs = cell_needs(stages, cells)
    wide = grid_wide_stages(stages)
    scope = Scope(by="cells", acted=set(), cells=len(selected), total_cells=len(cells))
    for stage_id, kind, _ in map(_stage_fields, stages):
        users = needs.get(stage_id, set())
        if not users & selected:
            continue
        if stage_id in wide:
            scope.kept[stage_id] = "grid"
        elif users - selected:
            scope.kept[stage_id] = "shared"
        elif not _matches_stage_keys(where, stage_id, kind, status):
            scope.kept[stage_id] = "filter"
        else:
            scope.acted.add(stage_id)
    return scope
