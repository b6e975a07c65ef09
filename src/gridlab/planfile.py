"""A submitted plan as the run folder keeps it: plan.json (every stage and cell, typed) and index.json (what status
reads). Light on purpose: status, ingest and the report read these files without importing the planner (and with it
torch)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridlab import atomic, inputs
from gridlab.contracts import Cell, Stage, canonical
from gridlab.data import CorpusSource, corpus_identity
from gridlab.errors import UserError
from gridlab.layout import RunPaths
from gridlab.results import read_json


@dataclass
class PlanRecord:
    """What a submitted plan left in the run folder: plan.json read back with typed stages and cells."""

    grid: dict[str, Any]
    submitted_at: float | None
    stages: list[Stage]
    cells: list[Cell]
    inputs: dict[str, Any]

    @property
    def data_stage(self) -> str:
        return next(s.id for s in self.stages if s.kind == "data")

    @property
    def parent_stage(self) -> str:
        return next(s.id for s in self.stages if s.kind == "parent")

    @property
    def parent_eval(self) -> str | None:
        parent = self.parent_stage
        return next((s.id for s in self.stages if s.kind == "eval" and s.deps.get("model") == parent), None)


def write_plan_files(run_dir: Path, plan) -> None:
    """plan.json (everything) and index.json (what status needs: stage ids, kinds, deps, each cell's eval stage)."""
    paths = RunPaths(run_dir)
    atomic.write_json(paths.plan, {
        "grid": plan.spec.model_dump(mode="json"), "submitted_at": time.time(), "inputs": plan.inputs,
        "stages": [stage.model_dump(mode="json") for stage in plan.stages.values()],
        "cells": [cell.model_dump(mode="json") for cell in plan.cells],
    })
    atomic.write_json(paths.index, {
        "grid": plan.spec.name,
        "stages": [{"id": s.id, "kind": s.kind, "deps": s.deps} for s in plan.stages.values()],
        "cell_eval_stages": [cell.eval_stage for cell in plan.cells],
    })


def read_plan_record(run_dir: Path) -> PlanRecord:
    paths = RunPaths(run_dir)
    raw = read_json(paths.plan)
    if raw is None:
        raise UserError(f"{paths.root}: no plan.json; run `gridlab submit GRID` first")
    return PlanRecord(grid=raw["grid"], submitted_at=raw.get("submitted_at"), inputs=raw.get("inputs", {}),
                      stages=[Stage.model_validate(s) for s in raw["stages"]],
                      cells=[Cell.model_validate(c) for c in raw["cells"]])


def read_index(run_dir: Path) -> dict[str, Any]:
    paths = RunPaths(run_dir)
    index = read_json(paths.index)
    if index is None:
        raise UserError(f"{paths.root}: no index.json; run `gridlab submit GRID` first")
    return index


# ------------------------------------------------------------------------------------------------ stale inputs

# Which stage kind first reads each input; the stages built on it inherit what it read.
_INPUT_READERS = {"corpus": "data", "tokenizer": "data", "parent": "parent", "eval_corpora": "eval"}
_INPUT_NAMES = {"corpus": "the corpus", "tokenizer": "the tokenizer folder", "parent": "the parent checkpoint",
                "eval_corpora": "an extra evaluation corpus"}


def current_inputs(grid: dict[str, Any]) -> dict[str, Any]:
    """The identities of what a submitted grid reads, as they are now (gridlab.inputs: cheap when unchanged)."""
    corpus = CorpusSource.model_validate(grid["corpus"])
    evaluation = [CorpusSource.model_validate({k: v for k, v in c.items() if k != "label"})
                  for c in grid.get("evaluation", {}).get("corpora", [])]
    tokenizer, parent = grid["tokenizer"].get("path"), grid["parent"].get("path")
    return {"corpus": canonical(corpus_identity(corpus)),
            "tokenizer": canonical(inputs.tokenizer_identity(tokenizer)) if tokenizer else None,
            "eval_corpora": canonical([corpus_identity(c) for c in evaluation]),
            "parent": canonical(inputs.model_identity(parent)) if parent else None}


def stale_inputs(record: PlanRecord, now: dict[str, Any], run_dir: Path) -> list[str]:
    """One line per input that changed under the finished stages of a submitted plan, naming how many of them were
    computed from the old content (they are never reused: the new content gives new ids)."""
    run = RunPaths(run_dir)
    lines = []
    for key, reader in _INPUT_READERS.items():
        if key not in record.inputs or record.inputs.get(key) == now.get(key):
            continue
        built = {s.id for s in record.stages if s.kind == reader and (key != "eval_corpora" or s.config.corpora)}
        for stage in record.stages:  # dependency order
            if set(stage.deps.values()) & built:
                built.add(stage.id)
        finished = [sid for sid in built if run.stage(sid).result.exists()]
        if finished:
            kinds = sorted({s.kind for s in record.stages if s.id in finished})
            lines.append(f"{_INPUT_NAMES[key]} changed since the last submit: {len(finished)} finished stage(s) "
                         f"({', '.join(kinds)}) were computed from the old content and are stale; resubmitting "
                         f"recomputes them (`gridlab clean` removes the old ones)")
    return lines
