"""Where everything of a run lives: the one definition of the paths under ``runs/<grid>/``.

    runs/<grid>/
      plan.json                 the planned stages and cells (written by `gridlab submit`)
      index.json                what status reads: stage ids, kinds, deps, each cell's eval stage
      disk.json                 the plan's disk estimate per stage of each kind (named when a disk fills up)
      adaptive.json             an adaptive study's rounds: the cells each added and why (gridlab.adaptive); the
                                planner adds them to the grid's cells
      results.duckdb            written only by the submitting/ingesting process; workers never open it
      lock                      the run lock: who is submitting to this run folder
      done/<id>                 an empty marker a worker leaves after its result.json (status lists this folder)
      slurm/                    submitit's job folders
      cache/                    content-addressed caches shared by stages (shards of extra eval corpora)
      trajectories/<id>/        one training trajectory: its checkpoint/ and branches/<budget>/ models, shared by
                                every train stage that extends it
      stages/<id>/
        stage.json              the stage the worker runs (kind, config, deps)
        submit.json             the submission record: executor, job id, host, pid, time
        attempts.log            one line per worker start
        stage.log               the worker's stdout/stderr
        error.json              written when a worker fails: error line and traceback tail
        progress.json           a training stage's latest progress (gridlab.progress): step, tokens, loss, lr, speed
        result.json             written last by a finished worker (checksummed header + payload)
        <outputs>               model/, tokenizer/, shards/ … as the stage kind writes them

Like submitit's ``JobPaths``: code asks a ``RunPaths`` or a ``StagePaths`` for a path and never joins names itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StagePaths:
    folder: Path
    stage_id: str
    done_marker: Path

    @property
    def stage(self) -> Path:
        return self.folder / "stage.json"

    @property
    def submit(self) -> Path:
        return self.folder / "submit.json"

    @property
    def attempts(self) -> Path:
        return self.folder / "attempts.log"

    @property
    def log(self) -> Path:
        return self.folder / "stage.log"

    @property
    def error(self) -> Path:
        return self.folder / "error.json"

    @property
    def result(self) -> Path:
        return self.folder / "result.json"

    @property
    def progress(self) -> Path:
        return self.folder / "progress.json"

    def output(self, name: str) -> Path:
        """A stage output (``model``, ``tokenizer``, ``shards`` …) inside the stage folder."""
        return self.folder / name


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def index(self) -> Path:
        return self.root / "index.json"

    @property
    def disk_estimate(self) -> Path:
        return self.root / "disk.json"

    @property
    def adaptive(self) -> Path:
        return self.root / "adaptive.json"

    @property
    def database(self) -> Path:
        return self.root / "results.duckdb"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def done_dir(self) -> Path:
        return self.root / "done"

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def trajectories_dir(self) -> Path:
        return self.root / "trajectories"

    def stage(self, stage_id: str) -> StagePaths:
        return StagePaths(self.stages_dir / stage_id, stage_id, self.done_dir / stage_id)

    def trajectory(self, trajectory_id: str) -> Path:
        return self.trajectories_dir / trajectory_id
