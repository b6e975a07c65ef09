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
        document_losses.parquet an eval stage's held-out losses per document (metric, document, tokens, loss_sum,
                                windows, sampled: gridlab.measure), one row per sampled document of each
        model/                  prune, init: the model (HF safetensors, + sparse_mask.safetensors)
        tokenizer/, shards/     data: the trained tokenizer; the token shards (and the pieces its tasks write)
        train/                  a pretrained parent's training folder (a TrainingPaths)
        layer-spill/            prune with calibration.layerwise: the decoder layers while they wait on disk

A training folder (``TrainingPaths``: a trajectory, or a parent's train/) holds ``trajectory.json`` (its record),
``branches/<budget>/`` (each budget's model) and ``checkpoint/`` (its saved training states, whose files
gridlab.checkpoint names).

Like submitit's ``JobPaths``: code asks a ``RunPaths``, ``StagePaths`` or ``TrainingPaths`` for a path and never
joins names itself.
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

    @property
    def document_losses(self) -> Path:
        """An eval stage's per-document losses (gridlab.stages.write_document_losses)."""
        return self.folder / "document_losses.parquet"

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    @property
    def shards_dir(self) -> Path:
        return self.folder / "shards"

    @property
    def training_dir(self) -> Path:
        """A pretrained parent's training folder (a TrainingPaths)."""
        return self.folder / "train"

    @property
    def layer_spill(self) -> Path:
        return self.folder / "layer-spill"


@dataclass(frozen=True)
class TrainingPaths:
    """A training folder (gridlab.train's ``out_dir``): a trajectory of the run, or a pretrained parent's train/."""

    folder: Path

    def __post_init__(self):
        object.__setattr__(self, "folder", Path(self.folder))

    @property
    def record(self) -> Path:
        """trajectory.json: the trajectory's identity, each finished branch, the trunk's curve."""
        return self.folder / "trajectory.json"

    @property
    def checkpoints(self) -> Path:
        """The saved training states (gridlab.checkpoint names the files inside)."""
        return self.folder / "checkpoint"

    def branch(self, budget_tokens: int) -> Path:
        """The model a budget's branch ends with."""
        return self.folder / "branches" / str(budget_tokens)


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
    def eval_corpus_cache(self) -> Path:
        """The token shards of the extra evaluation corpora, shared by every eval stage."""
        return self.cache / "eval"

    @property
    def trajectories_dir(self) -> Path:
        return self.root / "trajectories"

    def stage(self, stage_id: str) -> StagePaths:
        return StagePaths(self.stages_dir / stage_id, stage_id, self.done_dir / stage_id)

    def trajectory(self, trajectory_id: str) -> Path:
        return self.trajectories_dir / trajectory_id
