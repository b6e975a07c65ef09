"""Each arm at its own best learning rate: the choice of lr per group, made on held-out documents the reported loss
never reads.

A grid that sweeps learning rates (``lr`` a list in ``[schedule]`` or an arm's table) trains every arm ×
architecture × budget at each of its lrs, and its evaluations measure the held-out loss on two disjoint halves of the
validation documents (by a hash of each document's key: gridlab.evaluate.document_parts): ``val_loss/select``
(SELECT_METRIC) on the "select" half, ``val_loss`` on the "report" half. Per group — arm (init) × granularity ×
method × ratio × setting × budget — the lr with the lowest seed-mean ``val_loss/select`` is chosen, among the lrs
that have every seed the group has (an lr whose run diverged for a seed is out), and the report compares each arm at
its choice. The choice reads only SELECT_METRIC, so no document the reported loss is measured on enters it; what
remains is seed-level selection noise (the same seeds' models are measured on both halves: only the documents are
disjoint), measured by tests/test_report_recipes.py and stated in docs/report.md.

A group whose lrs cannot be told apart without reading the reported loss (no SELECT_METRIC: a database of a grid
that did not sweep, for a group that has several lrs) is left out, never chosen by its reported values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from gridlab.measure import SELECT_METRIC
from gridlab.report.read import headline_values
from gridlab.report.stats import GROUP_KEYS

ARM_ORDER = {"pruned": 0, "random": 1, "embeddings": 2}
ARM_NAMES = {"pruned": "pruned", "random": "random-init", "embeddings": "embeddings-control"}

_CHOSEN_SCHEMA = {"granularity": pl.Utf8, "method": pl.Utf8, "ratio": pl.Float64, "init": pl.Utf8,
                  "setting": pl.Int64, "budget_tokens": pl.Int64, "lr": pl.Float64, "lrs": pl.List(pl.Float64),
                  "edge": pl.Utf8, "select_value": pl.Float64, "n_seeds": pl.UInt32}


@dataclass
class Selection:
    """The lr chosen per group (``chosen``: GROUP_KEYS, lr, the lrs planned for the group, edge "low"/"high" when the
    choice is the smallest or largest of several, the chosen lr's seed-mean SELECT_METRIC and its seeds), whether
    the grid swept at all, groups left out, and the warnings a reader needs (a choice at the edge of its sweep)."""

    chosen: pl.DataFrame
    swept: bool
    dropped: int = 0
    warnings: list[str] = field(default_factory=list)

    def keep(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The rows of a cell-level frame (GROUP_KEYS and lr) at their group's chosen lr."""
        if not self.swept or "lr" not in frame.columns:
            return frame
        chosen = self.chosen.select(*GROUP_KEYS, "lr")
        return frame.join(chosen, on=[*GROUP_KEYS, "lr"], how="semi", nulls_equal=True)

    def lr_of(self) -> pl.DataFrame:
        """Per group (GROUP_KEYS): the chosen lr, for joining beside the gaps."""
        return self.chosen.select(*GROUP_KEYS, "lr")


def planned_lrs(cells: pl.DataFrame) -> pl.DataFrame:
    """Per group (GROUP_KEYS, budget > 0 or not): the learning rates the grid planned for it, sorted."""
    if "lr" not in cells.columns or cells.height == 0:
        return pl.DataFrame(schema={**{k: _CHOSEN_SCHEMA[k] for k in GROUP_KEYS}, "lrs": pl.List(pl.Float64)})
    return cells.group_by(GROUP_KEYS).agg(lrs=pl.col("lr").drop_nulls().unique().sort())


def select_learning_rates(values: pl.DataFrame, cells: pl.DataFrame, metrics: pl.DataFrame) -> Selection:
    """The lr of every group of ``values`` (headline values of finished cells, with their lr): its only lr, or —
    where the grid planned several — the one with the lowest seed-mean SELECT_METRIC among those with every seed the
    group has. The headline values themselves are never read for the choice."""
    planned = planned_lrs(cells)
    swept = bool(planned.height) and bool((planned["lrs"].list.len() > 1).any())
    if "lr" not in values.columns:
        values = values.with_columns(lr=pl.lit(None, dtype=pl.Float64))
    seeds = values.group_by([*GROUP_KEYS, "lr"]).agg(n_seeds=pl.col("seed").n_unique().cast(pl.UInt32))
    if not swept:
        chosen = (seeds.join(planned, on=GROUP_KEYS, how="left")
                  .with_columns(edge=pl.lit(None, dtype=pl.Utf8), select_value=pl.lit(None, dtype=pl.Float64)))
        return Selection(chosen.select(list(_CHOSEN_SCHEMA)).cast(_CHOSEN_SCHEMA), swept=False)
    select = headline_values(cells, metrics, SELECT_METRIC).select(*GROUP_KEYS, "lr", "seed", select="value")
    scored = (seeds.join(select.group_by([*GROUP_KEYS, "lr"]).agg(select_value=pl.col("select").mean(),
                                                                  n_scored=pl.col("seed").n_unique()),
                         on=[*GROUP_KEYS, "lr"], how="left")
              .with_columns(most=pl.col("n_seeds").max().over(GROUP_KEYS),
                            choices=pl.col("lr").n_unique().over(GROUP_KEYS)))
    # One lr: nothing to choose. Several: only those with every seed, scored on every seed on the selection half.
    single = scored.filter(pl.col("choices") == 1).with_columns(select_value=pl.lit(None, dtype=pl.Float64))
    several = scored.filter((pl.col("choices") > 1) & (pl.col("n_seeds") == pl.col("most"))
                            & (pl.col("n_scored") == pl.col("n_seeds")))
    best = several.sort([*GROUP_KEYS, "select_value", "lr"]).group_by(GROUP_KEYS, maintain_order=True).first()
    chosen = pl.concat([single.select(best.columns), best]).join(planned, on=GROUP_KEYS, how="left")
    chosen = chosen.with_columns(edge=pl.when(pl.col("lrs").list.len() < 2).then(None)
                                 .when(pl.col("lr") == pl.col("lrs").list.min()).then(pl.lit("low"))
                                 .when(pl.col("lr") == pl.col("lrs").list.max()).then(pl.lit("high")))
    chosen = chosen.select(list(_CHOSEN_SCHEMA)).cast(_CHOSEN_SCHEMA).sort(GROUP_KEYS)
    dropped = scored.select(GROUP_KEYS).unique().height - chosen.height
    return Selection(chosen, swept=True, dropped=dropped, warnings=edge_warnings(chosen, dropped))


def edge_warnings(chosen: pl.DataFrame, dropped: int = 0) -> list[str]:
    """Per arm that swept: how many of its groups (budget > 0) chose the smallest or the largest lr of their sweep —
    there the sweep was too narrow, and the arm may do better outside it."""
    warnings = []
    trained = chosen.filter((pl.col("budget_tokens") > 0) & (pl.col("lrs").list.len() > 1))
    for (arm,), part in sorted(trained.group_by("init"), key=lambda item: ARM_ORDER.get(item[0][0], 9)):
        edges = part.filter(pl.col("edge").is_not_null())
        if edges.height == 0:
            continue
        sides = []
        for side, word, pick in (("high", "largest", max), ("low", "smallest", min)):
            at = edges.filter(pl.col("edge") == side)
            if at.height:
                rates = sorted({pick(lrs) for lrs in at["lrs"].to_list()})
                sides.append(f"at its {word} lr ({', '.join(f'{r:g}' for r in rates)}) in {at.height}")
        warnings.append(f"The {ARM_NAMES.get(arm, arm)} arm's selected learning rate sits at the edge of its sweep "
                        f"{' and '.join(sides)} of {part.height} groups: the sweep was too narrow there (extend it "
                        f"past that edge).")
    if dropped:
        warnings.append(f"{dropped} group(s) with several learning rates have no {SELECT_METRIC} on every seed of an "
                        f"lr: no lr is chosen for them and they are left out (choosing by the reported loss would "
                        f"read the documents it is measured on).")
    return warnings
