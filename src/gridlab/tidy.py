"""`gridlab reset` and `gridlab clean`: remove what a run folder no longer needs, saying what and how much.

reset   the outputs of the stages a --where selects (gridlab.select.destructive_scope: a cell filter acts only on
        the stages no unselected cell needs; a stage filter on the stages it selects) and of everything downstream
        of them (stage folders, done markers, and a train stage's trajectory unless a train stage kept by the reset
        shares it; a data stage's tokenizer and shard stages, whose outputs are in its folder, with it); the next
        `submit` reruns them.
clean   stage folders and trajectories no plan stage has any more (left by edits of the grid), and the checkpoints
        finished stages no longer need: a pretrained parent's resumable state, a prune stage's layer spill, and in a
        trajectory whose train stages are all done everything but the main state a longer budget would extend
        (with ``all_checkpoints`` that too), plus the temporary files finished stages left behind.

Neither touches a stage somebody holds (queued, running, or unknown): reset refuses, clean skips it and says so.
Both run under the run lock (gridlab.api). Both compute what they would remove first (``Removal``) and say it:
stages by kind, bytes, and the finished work that would be lost (``Lost``: stages done, tokens trained, GPU- and
CPU-hours from the runtimes and resources their results record); ``Removal.carry_out`` then removes it, and
``gridlab.api`` asks for confirmation before it when finished work would be lost.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridlab.checkpoint import state_entries
from gridlab.config import Schedule
from gridlab.contracts import in_kind_order
from gridlab.errors import UserError
from gridlab.layout import RunPaths, TrainingPaths
from gridlab.results import CorruptResult, read_json, read_result
from gridlab.select import downstream_closure
from gridlab.state import StageState, stage_states
from gridlab.train import MAIN_STATE, read_record, remaining_tokens
from gridlab.units import size


def size_of(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder; links are not followed)."""
    path = Path(path)
    try:
        if path.is_symlink() or path.is_file():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@dataclass
class Lost:
    """The finished work a removal takes: done stages by kind, the tokens their trajectories and the parent trained,
    and the hours their recorded runtimes took (GPU-hours: runtime × GPUs used; CPU-hours: runtime × threads of
    every rank)."""

    stages: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    gpu_hours: float = 0.0
    cpu_hours: float = 0.0
    unrecorded: int = 0          # done stages whose result records no runtime or resources (counted as 1 CPU)

    @property
    def count(self) -> int:
        return sum(self.stages.values())


@dataclass
class Removal:
    """What a reset or clean removes (or, dry, would remove)."""

    paths: list[tuple[str, int, str]] = field(default_factory=list)   # (path, bytes, why)
    skipped: list[str] = field(default_factory=list)                  # what it left, and why
    stages: list[str] = field(default_factory=list)                   # reset: the stages reset
    kinds: dict[str, int] = field(default_factory=dict)               # stage folders removed, by kind
    lost: Lost = field(default_factory=Lost)
    carried_out: bool = False

    @property
    def freed(self) -> int:
        return sum(count for _, count, _ in self.paths)

    @property
    def loses_finished_work(self) -> bool:
        return self.lost.count > 0 or self.lost.tokens > 0

    def add(self, path: Path, why: str) -> None:
        if Path(path).exists() or Path(path).is_symlink():
            self.paths.append((str(path), size_of(path), why))

    def add_stage(self, run: RunPaths, stage_id: str, kind: str, state: StageState | None, why: str) -> None:
        """A stage's folder and done marker; a done stage's recorded work counts as lost."""
        files = run.stage(stage_id)
        self.add(files.folder, why)
        self.add(files.done_marker, "done marker")
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if state is not None and state.status == "done":
            _count_lost(self.lost, files, kind)

    def carry_out(self) -> None:
        for path, _, _ in self.paths:
            target = Path(path)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        self.carried_out = True

    def summary(self, verb: str) -> list[str]:
        """What the dry run and the real run both print first (the same words): stages by kind, bytes, the finished
        work lost."""
        kinds = ", ".join(f"{kind} {count}" for kind, count in in_kind_order(self.kinds))
        lines = [f"  to {verb}: {sum(self.kinds.values())} stage(s){f' ({kinds})' if kinds else ''}; "
                 f"{size(self.freed)} in {len(self.paths)} path(s)"]
        lost = self.lost
        if lost.count or lost.tokens:
            done = ", ".join(f"{kind} {count}" for kind, count in in_kind_order(lost.stages))
            hours = f"{_hours(lost.gpu_hours)} GPU-hours, {_hours(lost.cpu_hours)} CPU-hours"
            note = (f" ({lost.unrecorded} stage(s) record no runtime or resources: counted as 1 CPU)"
                    if lost.unrecorded else "")
            lines.append(f"  finished work it removes: {lost.count} done stage(s)"
                         f"{f' ({done})' if done else ''}, {lost.tokens:,} tokens trained, {hours}{note}")
        else:
            lines.append("  finished work it removes: none")
        return lines

    def lines(self) -> list[str]:
        verb = "freed" if self.carried_out else "would free"
        out = [f"  {'removed' if self.carried_out else 'would remove'} {path} ({size(count)}; {why})"
               for path, count, why in self.paths]
        out += [f"  kept {line}" for line in self.skipped]
        out.append(f"{verb} {size(self.freed)} in {len(self.paths)} path(s)")
        return out


def _hours(hours: float) -> str:
    return f"{hours:,.2f}" if hours >= 1 or hours == 0 else f"{hours:.2g}"


def _count_lost(lost: Lost, files, kind: str) -> None:
    """Add a done stage's recorded runtime (its result's started → finished, times the resources it recorded) and,
    for a pretrained parent, the tokens it trained."""
    lost.stages[kind] = lost.stages.get(kind, 0) + 1
    try:
        header = read_result(files)
    except (OSError, CorruptResult):
        lost.unrecorded += 1
        return
    payload = header.get("payload") or {}
    if kind == "parent" and payload.get("metrics"):   # pretrained here (a loaded parent records no curve)
        lost.tokens += int(payload.get("trained_tokens") or 0)
    started, finished = header.get("started"), header.get("finished")
    resources = header.get("resources")
    if not (isinstance(started, (int, float)) and isinstance(finished, (int, float))):
        lost.unrecorded += 1
        return
    hours = max(0.0, finished - started) / 3600
    if not isinstance(resources, dict):
        lost.unrecorded += 1
        lost.cpu_hours += hours
        return
    lost.gpu_hours += hours * int(resources.get("gpus") or 0)
    lost.cpu_hours += hours * int(resources.get("ranks") or 1) * int(resources.get("threads") or 1)


def trajectory_tokens(folder: Path, schedule) -> int:
    """Tokens a trajectory folder's finished branches cost to train from nothing (trunk + decays; 0 without a
    record)."""
    try:
        record = read_record(folder)
    except (OSError, ValueError):
        return 0
    if not isinstance(record, dict):
        return 0
    budgets = [int(b) for b, branch in (record.get("branches") or {}).items()
               if isinstance(branch, dict) and branch.get("status") == "done"]
    if not budgets or schedule is None:
        return 0
    try:
        return remaining_tokens(schedule, budgets, int(record["identity"]["seq_len"]), None)
    except (KeyError, TypeError, ValueError):
        return 0


def _config(stage) -> dict[str, Any]:
    config = stage.config if not isinstance(stage, dict) else stage.get("config", {})
    return config if isinstance(config, dict) else config.model_dump()


def reset(run_dir: Path, stages: list[Any], chosen: set[str], states: dict[str, StageState]) -> Removal:
    """What resetting ``chosen`` removes: their outputs and those of every stage downstream of them (``stages``: the
    plan's, in dependency order). Nothing is removed until ``Removal.carry_out``. A held stage among them is a
    UserError: cancel it first."""
    run = RunPaths(run_dir)
    targets = downstream_closure(stages, chosen)
    # A data stage's tasks (tokenizer, shard) leave their outputs in its folder: they go with it, so they rerun.
    targets = downstream_closure(stages, targets | {stage.id for stage in stages
                                                    if _config(stage).get("data_stage") in targets})
    held = [states[sid] for sid in targets if sid in states and states[sid].held]
    if held:
        first = held[0]
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        raise UserError(f"stage {first.stage_id} ({first.kind}) is {first.status}"
                        f"{f' (job {first.job_id})' if first.job_id else ''}{more}; `gridlab cancel` it before "
                        f"resetting it")
    removal = Removal()
    kept_trajectories: dict[str, str] = {}   # trajectory → a train stage outside the reset that has used it
    for stage in stages:
        state = states.get(stage.id)
        if stage.kind == "train" and stage.id not in targets and state and (state.status == "done" or state.held):
            kept_trajectories.setdefault(_config(stage)["trajectory"], stage.id)
    removed_trajectories: set[str] = set()
    for stage in stages:
        if stage.id not in targets:
            continue
        removal.add_stage(run, stage.id, stage.kind, states.get(stage.id), f"{stage.kind} stage")
        removal.stages.append(stage.id)
        if stage.kind == "train":
            trajectory = _config(stage)["trajectory"]
            if trajectory in kept_trajectories:
                removal.skipped.append(f"trajectory {trajectory}: train stage {kept_trajectories[trajectory]}, "
                                       f"not reset, shares it")
            elif trajectory not in removed_trajectories:
                removed_trajectories.add(trajectory)
                removal.add(run.trajectory(trajectory), "its training trajectory")
                removal.lost.tokens += trajectory_tokens(run.trajectory(trajectory), getattr(stage.config,
                                                                                           "schedule", None))
    return removal


def _hidden_leftovers(folder: Path) -> list[Path]:
    """Temporary files and staging folders (gridlab.atomic names them .<name>.*) a finished writer left."""
    try:
        return [entry for entry in folder.iterdir() if entry.name.startswith(".")]
    except OSError:
        return []


def clean(run_dir: Path, stages: list[Any], states: dict[str, StageState], all_checkpoints: bool = False,
          only: set[str] | None = None) -> Removal:
    """What cleaning removes: stage folders and trajectories the plan (``stages``) no longer has, and checkpoints
    finished stages no longer need. ``only``: the stage ids a --where selected; then only their checkpoints (and no
    folder outside the plan, which no cell of it selects). Nothing is removed until ``Removal.carry_out``."""
    run = RunPaths(run_dir)
    removal = Removal()
    planned = {stage.id for stage in stages}
    if only is not None:
        return _clean_checkpoints(run, [s for s in stages if s.id in only], states, removal, all_checkpoints,
                                  trajectories=_trajectories_of(stages, only))

    # Stage folders the plan no longer has: gone, unless somebody still holds them (a job of an older plan).
    orphans = []
    try:
        orphans = sorted(entry.name for entry in run.stages_dir.iterdir() if entry.name not in planned)
    except FileNotFoundError:
        pass
    orphan_stages = []
    for stage_id in orphans:
        recorded = read_json(run.stage(stage_id).stage) or {}
        orphan_stages.append({"id": stage_id, "kind": recorded.get("kind", "?"), "config": recorded.get("config", {}),
                              "deps": recorded.get("deps", {})})
    orphan_states = stage_states(run_dir, orphan_stages) if orphan_stages else {}
    held_trajectories = set()
    for stage in orphan_stages:
        state = orphan_states[stage["id"]]
        if state.held:
            removal.skipped.append(f"{run.stage(stage['id']).folder}: not in the plan, but {state.status}"
                                   f"{f' (job {state.job_id})' if state.job_id else ''}")
            if stage["kind"] == "train":
                held_trajectories.add(stage["config"].get("trajectory"))
            continue
        removal.add_stage(run, stage["id"], stage["kind"], state, "not in the plan")
    try:
        for marker in sorted(run.done_dir.iterdir()):
            if marker.name not in planned and marker.name not in orphans:
                removal.add(marker, "done marker of a stage not in the plan")
    except FileNotFoundError:
        pass

    # Trajectories: those no planned train stage extends are gone; finished ones keep what extension needs.
    by_trajectory = _trajectories_of(stages, planned)
    try:
        trajectories = sorted(entry.name for entry in run.trajectories_dir.iterdir())
    except FileNotFoundError:
        trajectories = []
    for trajectory in trajectories:
        folder = run.trajectory(trajectory)
        if trajectory not in by_trajectory:
            if trajectory in held_trajectories:
                removal.skipped.append(f"{folder}: not in the plan, but a train stage holding it still runs")
            else:
                removal.add(folder, "no planned train stage uses this trajectory")
                schedule = next((_schedule(s) for s in orphan_stages if s["kind"] == "train"
                                 and s["config"].get("trajectory") == trajectory), None)
                removal.lost.tokens += trajectory_tokens(folder, schedule)
    return _clean_checkpoints(run, stages, states, removal, all_checkpoints,
                              {t: ids for t, ids in by_trajectory.items() if t in trajectories})


def _trajectories_of(stages: list[Any], among: set[str]) -> dict[str, list[str]]:
    """Trajectory → the train stages (of ``among``) that extend it."""
    by_trajectory: dict[str, list[str]] = {}
    for stage in stages:
        if stage.kind == "train" and stage.id in among:
            by_trajectory.setdefault(_config(stage)["trajectory"], []).append(stage.id)
    return by_trajectory


def _schedule(stage: dict[str, Any]):
    try:
        return Schedule.model_validate(stage["config"]["schedule"])
    except (KeyError, TypeError, ValueError):
        return None


def _clean_checkpoints(run: RunPaths, stages: list[Any], states: dict[str, StageState], removal: Removal,
                       all_checkpoints: bool, trajectories: dict[str, list[str]]) -> Removal:
    """The checkpoints finished stages no longer need: a finished trajectory's states but the main one a longer
    budget extends (``all_checkpoints``: that too), a finished parent's resumable state, a finished prune stage's
    layer spill, and temporary files finished writers left."""
    for trajectory, train_stages in trajectories.items():
        folder = run.trajectory(trajectory)
        if not all(states[sid].status == "done" for sid in train_stages):
            continue
        checkpoints = TrainingPaths(folder).checkpoints
        if all_checkpoints:
            removal.add(checkpoints, "resumable state of a finished trajectory")
        else:
            keep = state_entries(checkpoints, MAIN_STATE)
            try:
                for entry in sorted(checkpoints.iterdir()):
                    if entry.name not in keep:
                        removal.add(entry, "checkpoint a finished trajectory does not need (the main state that a "
                                           "longer budget extends is kept; --all-checkpoints removes it too)")
            except FileNotFoundError:
                pass
        for entry in _hidden_leftovers(folder):
            removal.add(entry, "temporary file of a finished writer")

    # Finished stages: what they kept only to resume.
    for stage in stages:
        if states[stage.id].status != "done":
            continue
        files = run.stage(stage.id)
        if stage.kind == "parent":
            removal.add(TrainingPaths(files.training_dir).checkpoints, "resumable state of the finished parent")
        if stage.kind == "prune":
            removal.add(files.layer_spill, "layer spill of a finished prune stage")
        for entry in _hidden_leftovers(files.folder):
            removal.add(entry, "temporary file of a finished writer")
    return removal
