"""`gridlab reset` and `gridlab clean`: remove what a run folder no longer needs, saying what and how much.

reset   the outputs of the selected stages and of everything downstream of them (stage folders, done markers, and
        a train stage's trajectory unless a train stage kept by the reset shares it; a data stage's tokenizer and
        shard stages, whose outputs are in its folder, with it); the next `submit` reruns them.
clean   stage folders and trajectories no plan stage has any more (left by edits of the grid), and the checkpoints
        finished stages no longer need: a pretrained parent's resumable state, a prune stage's layer spill, and in a
        trajectory whose train stages are all done everything but the main state a longer budget would extend
        (with ``all_checkpoints`` that too), plus the temporary files finished stages left behind.

Neither touches a stage somebody holds (queued, running, or unknown): reset refuses, clean skips it and says so.
Both run under the run lock (gridlab.api).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gridlab.errors import UserError
from gridlab.layout import RunPaths
from gridlab.results import read_json
from gridlab.select import downstream_closure
from gridlab.state import StageState, stage_states


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


def human(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


@dataclass
class Removal:
    """What a reset or clean removed (or, dry, would remove)."""

    paths: list[tuple[str, int, str]] = field(default_factory=list)   # (path, bytes, why)
    skipped: list[str] = field(default_factory=list)                  # what it left, and why
    stages: list[str] = field(default_factory=list)                   # reset: the stages reset
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(size for _, size, _ in self.paths)

    def add(self, path: Path, why: str) -> None:
        if Path(path).exists() or Path(path).is_symlink():
            self.paths.append((str(path), size_of(path), why))

    def carry_out(self) -> None:
        if self.dry_run:
            return
        for path, _, _ in self.paths:
            target = Path(path)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)

    def lines(self) -> list[str]:
        verb = "would free" if self.dry_run else "freed"
        out = [f"  {'would remove' if self.dry_run else 'removed'} {path} ({human(size)}; {why})"
               for path, size, why in self.paths]
        out += [f"  kept {line}" for line in self.skipped]
        out.append(f"{verb} {human(self.freed)} in {len(self.paths)} path(s)")
        return out


def _config(stage) -> dict[str, Any]:
    config = stage.config if not isinstance(stage, dict) else stage.get("config", {})
    return config if isinstance(config, dict) else config.model_dump()


def reset(run_dir: Path, stages: list[Any], chosen: set[str], states: dict[str, StageState],
          dry_run: bool = False) -> Removal:
    """Remove the outputs of ``chosen`` and of every stage downstream of them (``stages``: the plan's, in
    dependency order). A held stage among them is a UserError: cancel it first."""
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
    removal = Removal(dry_run=dry_run)
    kept_trajectories: dict[str, str] = {}   # trajectory → a train stage outside the reset that has used it
    for stage in stages:
        state = states.get(stage.id)
        if stage.kind == "train" and stage.id not in targets and state and (state.status == "done" or state.held):
            kept_trajectories.setdefault(_config(stage)["trajectory"], stage.id)
    for stage in stages:
        if stage.id not in targets:
            continue
        files = run.stage(stage.id)
        removal.add(files.folder, f"{stage.kind} stage")
        removal.add(files.done_marker, "done marker")
        removal.stages.append(stage.id)
        if stage.kind == "train":
            trajectory = _config(stage)["trajectory"]
            if trajectory in kept_trajectories:
                removal.skipped.append(f"trajectory {trajectory}: train stage {kept_trajectories[trajectory]}, "
                                       f"not reset, shares it")
            else:
                removal.add(run.trajectory(trajectory), "its training trajectory")
    removal.carry_out()
    return removal


def _hidden_leftovers(folder: Path) -> list[Path]:
    """Temporary files and staging folders (gridlab.atomic names them .<name>.*) a finished writer left."""
    try:
        return [entry for entry in folder.iterdir() if entry.name.startswith(".")]
    except OSError:
        return []


def clean(run_dir: Path, stages: list[Any], states: dict[str, StageState], dry_run: bool = False,
          all_checkpoints: bool = False) -> Removal:
    """Remove stage folders and trajectories the plan (``stages``) no longer has, and checkpoints finished stages
    no longer need."""
    from gridlab.train import CHECKPOINT_DIR, MAIN_STATE

    run = RunPaths(run_dir)
    removal = Removal(dry_run=dry_run)
    planned = {stage.id for stage in stages}

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
        removal.add(run.stage(stage["id"]).folder, "not in the plan")
        removal.add(run.stage(stage["id"]).done_marker, "done marker of a stage not in the plan")
    try:
        for marker in sorted(run.done_dir.iterdir()):
            if marker.name not in planned and marker.name not in orphans:
                removal.add(marker, "done marker of a stage not in the plan")
    except FileNotFoundError:
        pass

    # Trajectories: those no planned train stage extends are gone; finished ones keep what extension needs.
    by_trajectory: dict[str, list[str]] = {}
    for stage in stages:
        if stage.kind == "train":
            by_trajectory.setdefault(_config(stage)["trajectory"], []).append(stage.id)
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
            continue
        if not all(states[sid].status == "done" for sid in by_trajectory[trajectory]):
            continue
        checkpoint = folder / CHECKPOINT_DIR
        if all_checkpoints:
            removal.add(checkpoint, "resumable state of a finished trajectory")
        else:
            keep = {f"{MAIN_STATE}.json"}
            pointer = read_json(checkpoint / f"{MAIN_STATE}.json")
            if isinstance(pointer, dict) and pointer.get("folder"):
                keep.add(pointer["folder"])
            try:
                for entry in sorted(checkpoint.iterdir()):
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
            removal.add(files.output("train") / CHECKPOINT_DIR, "resumable state of the finished parent")
        if stage.kind == "prune":
            removal.add(files.output("layer-spill"), "layer spill of a finished prune stage")
        for entry in _hidden_leftovers(files.folder):
            removal.add(entry, "temporary file of a finished writer")
    removal.carry_out()
    return removal
