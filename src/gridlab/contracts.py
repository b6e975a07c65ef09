"""The typed contracts between stages: what each stage kind is asked to compute (its config), what it hands on
(its payload), and the one metric record every stage emits.

A stage is ``Stage(id, kind, config, deps)``; ``deps`` maps a role (``data``, ``parent``, ``model``, ``train``,
``tokenizer``, ``shard<k>``) to the id of the stage consumed or waited for. Variants of a kind are tagged, never
told apart by which keys happen to be present: a parent is ``PretrainParent`` (source "pretrain") or
``LoadedParent`` (source "load"); a random-init model is ``ArchitectureInit`` (a structured method's architecture,
shared by every method that gives it) or ``MaskInit`` (a sparse method's mask on fresh weights), and the embeddings
control is ``EmbeddingsInit`` (a random twin given the parent's trained embeddings); an evaluation
scores a model stage's model (``EvalModel``) or one budget branch of a training trajectory (``EvalBranch``).

A stage's id (``stage_id``) is what it computes: its kind, the kind's code ``VERSION``, its config's ``identity()``
and the identities of its inputs. Settings that only change how or where a stage runs are not in ``identity()``;
see docs/architecture.md ("Stage identity"). So a data stage has one id whether it does its work in one job or
assembles what its tasks did (a ``TokenizerTask`` and K ``ShardTask`` stages, which it waits for, not computes from).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gridlab.config import Schedule, identity_fields
from gridlab.data.schema import CorpusSource, SplitFractions, TokenizerConfig

STAGE_KINDS = ("tokenizer", "shard", "data", "parent", "prune", "init", "train", "eval")   # in dependency order
StageKind = Literal["tokenizer", "shard", "data", "parent", "prune", "init", "train", "eval"]
# What a pruning method removes: whole layers, widths (heads, FFN channels, hidden size), or single weights.
Granularity = Literal["depth", "width", "sparse"]

# The kinds a plan has only when ``[resources.data] tasks = K`` (K > 1) splits the data stage's work into tasks: one
# tokenizer stage, K shard stages (partition k of K), then the data stage, which only assembles the shards.
DATA_TASK_KINDS = ("tokenizer", "shard")

# The code version of each stage kind, part of every id of that kind. Bump a kind's number when a change to its code
# changes what it computes (its numbers or its outputs), so exactly its stages and what depends on them rerun.
# Pruning methods carry their own version (gridlab.pruning.Method.version), hashed into their prune stages.
# A variant of a kind may have its own entry, "<kind>/<source>", which replaces the kind's (``stage_version``): a change
# to one variant reruns only its stages.
# eval 2: the held-out loss over a seeded sample of documents and their windows with its stderr (was: the first packed
# sequences), per-document losses kept, floors (uniform, unigram, task chance) in the parent's evaluation.
# init/mask 2: a sparse twin's surviving weights drawn at std 0.02/√(density of their row) (was: the dense draw masked).
# init/embeddings 1: the embeddings control (a random twin with the parent's embeddings, final norm and lm_head).
# train 2: gradients masked before clipping in sparse models (was: the clipped norm counted the masked positions).
VERSION: dict[str, int] = {"tokenizer": 1, "shard": 1, "data": 1, "parent": 1, "prune": 1, "init": 1,
                           "init/mask": 2, "init/embeddings": 1, "train": 2, "eval": 2}


def stage_version(kind: str, source: str | None = None) -> int:
    """The code version of a stage kind, or of one variant of it when the variant has its own entry in VERSION."""
    return VERSION.get(f"{kind}/{source}", VERSION[kind]) if source is not None else VERSION[kind]


def in_kind_order(counts: dict[str, int]) -> list[tuple[str, int]]:
    """(kind, count) pairs in the data flow's order (unknown kinds last, by name)."""
    return sorted(counts.items(), key=lambda item: (STAGE_KINDS.index(item[0]) if item[0] in STAGE_KINDS else 99,
                                                    item[0]))


def resource_table(kind: str) -> str:
    """The ``[resources.<table>]`` a stage kind's jobs ask for: the data stage's tasks ask for [resources.data]."""
    return "data" if kind in DATA_TASK_KINDS else kind


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------------------------ metrics

class Metric(Contract):
    """One measurement of a model after ``tokens`` training tokens. ``higher_is_better`` is declared by whoever
    measures it (None: not a score, e.g. the learning rate)."""

    name: str
    value: float
    tokens: int
    stderr: float | None = None
    higher_is_better: bool | None = None


# ------------------------------------------------------------------------------------------------------ configs
# Each config's identity() is what the stage's numbers depend on: by default every field but those at their default
# (gridlab.config.identity_fields), its tags (kind, source) always; a config leaves out more where a field only
# says how or where it runs.

# Where a corpus is read from, not what it holds (its content identity stands in the id).
CORPUS_LOCATION_KEYS = ("path", "files", "name", "config", "split")


class StageConfig(Contract):
    def identity(self) -> dict[str, Any]:
        return identity_fields(self, keep=("kind", "source"))


class DataConfig(StageConfig):
    kind: Literal["data"] = "data"
    corpus: CorpusSource
    corpus_identity: dict[str, Any]   # what the corpus is made of (content fingerprints, revisions): in the id
    splits: SplitFractions
    tokenizer: TokenizerConfig
    tokenizer_identity: dict[str, Any] | None = None   # a loaded tokenizer's content fingerprint
    seq_len: int

    def identity(self) -> dict[str, Any]:
        # Where the corpus and tokenizer are read from is not what they are: their contents stand in the id.
        identity = super().identity()
        identity["corpus"] = {k: v for k, v in identity["corpus"].items() if k not in CORPUS_LOCATION_KEYS}
        identity["tokenizer"] = {k: v for k, v in identity["tokenizer"].items() if k != "path"}
        return identity


class _DataTask(StageConfig):
    """What one of a data stage's tasks reads: the data stage's corpus, splits, tokenizer and seq_len as the grid
    gave them (its id, ``data_stage``, stands for their contents). Its outputs go into the data stage's folder."""

    data_stage: str
    corpus: CorpusSource
    splits: SplitFractions
    tokenizer: TokenizerConfig
    seq_len: int

    def identity(self) -> dict[str, Any]:
        # What it reads is what the data stage reads: that stage's id stands for it.
        return {k: v for k, v in super().identity().items() if k not in ("corpus", "splits", "tokenizer", "seq_len")}


class TokenizerTask(_DataTask):
    """The first of a data stage's tasks: train its BPE tokenizer on the pretrain sample, into the data stage's
    folder (where a one-job data stage trains it too), or record the given tokenizer.path."""

    kind: Literal["tokenizer"] = "tokenizer"


class ShardTask(_DataTask):
    """Partition ``partition`` of ``partitions`` of a data stage's tokenization (deps: tokenizer): the shard pieces
    of the corpus units it owns, written into the data stage's shard folder, each piece whole or not at all."""

    kind: Literal["shard"] = "shard"
    partition: int
    partitions: int



class PretrainParent(StageConfig):
    kind: Literal["parent"] = "parent"
    source: Literal["pretrain"] = "pretrain"
    architecture: dict[str, Any]      # the config it is built from (to_dict with model_type, volatile fields dropped)
    tokens: int                       # P
    seed: int
    schedule: Schedule

class LoadedParent(StageConfig):
    kind: Literal["parent"] = "parent"
    source: Literal["load"] = "load"
    path: str                         # a local HF folder or a hub name
    model_identity: dict[str, Any]    # its content fingerprint (local) or resolved revision (hub)
    tokens: int                       # P: what the parent cost, as declared
    declared: dict[str, Any] | None = None   # the architecture the grid declared for offline planning (checked)

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in super().identity().items() if k != "path"}


ParentConfig = Annotated[PretrainParent | LoadedParent, Field(discriminator="source")]


class PruneConfig(StageConfig):
    kind: Literal["prune"] = "prune"
    method: str
    method_version: int
    options: dict[str, Any]           # as given (the method's defaults are part of its version)
    ratio: float
    seed: int                         # picks this replicate's calibration sample
    calibration_sequences: int
    layerwise: bool = False           # decoder layers stay on disk while pruning: same numbers, less memory

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in super().identity().items() if k != "layerwise"}


class ArchitectureInit(StageConfig):
    kind: Literal["init"] = "init"
    source: Literal["architecture"] = "architecture"
    architecture: dict[str, Any]      # pruned_config(parent config, method, ratio) as a dict
    seed: int


class MaskInit(StageConfig):
    kind: Literal["init"] = "init"
    source: Literal["mask"] = "mask"  # the pruned model's shapes and mask (deps: model = the prune stage)
    seed: int
    # "scaled": the surviving weights of each row drawn at std 0.02/√(the row's density), so a unit's fan-in variance
    # is the dense init's; "dense": the dense draw, masked (the mask's zeros shrink each unit's fan-in variance)
    sparse: Literal["scaled", "dense"] = "scaled"


class EmbeddingsInit(StageConfig):
    """The embeddings control: the random twin (deps: model = the init stage of the random twin, whose decoder and
    mask it keeps) given trained token embeddings, final norm and lm_head (deps: embeddings = the parent, or the
    prune stage when pruning cut the hidden size: then the pruned model's, the parent's at the kept channels)."""

    kind: Literal["init"] = "init"
    source: Literal["embeddings"] = "embeddings"


InitConfig = Annotated[ArchitectureInit | MaskInit | EmbeddingsInit, Field(discriminator="source")]


class TrainConfig(StageConfig):
    """Train one model (deps: model, data) to every budget of one trajectory (WSD branches, or cosine runs)."""

    kind: Literal["train"] = "train"
    budgets: list[int]
    schedule: Schedule
    seed: int
    trajectory: str                   # the trajectory folder's id: model, data, schedule identity, seed (no budgets)

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in super().identity().items() if k != "trajectory"}   # the folder it trains in


class _Evaluation(StageConfig):
    evaluation: dict[str, Any]        # gridlab.spec.EvaluationSpec fields
    corpora: list[dict[str, Any]] = Field(default_factory=list)   # each extra corpus's content identity
    tasks: dict[str, str] = Field(default_factory=dict)   # each lm-eval task's identity (its files, or lm-eval's)
    # The grid sweeps learning rates: the held-out loss is measured on two disjoint halves of the validation documents
    # (gridlab.evaluate.document_parts), val_loss/select (the choice of each arm's lr) and val_loss (what is reported).
    halves: bool = False

    def identity(self) -> dict[str, Any]:
        # An extra corpus is in the id by what it holds (``corpora``), not by where it is read from.
        identity = super().identity()
        identity["evaluation"] = {**identity["evaluation"], "corpora": [
            {k: v for k, v in corpus.items() if k not in CORPUS_LOCATION_KEYS}
            for corpus in identity["evaluation"]["corpora"]]}
        return identity


class EvalModel(_Evaluation):
    """Score a model stage's own model (deps: model = parent, prune or init; data) at ``tokens``. The parent's
    evaluation also measures the floors (``floors``): the uniform and unigram losses and each task's chance."""

    kind: Literal["eval"] = "eval"
    source: Literal["model"] = "model"
    tokens: int                       # its training tokens: 0 for a pruned or fresh model, P for the parent
    floors: bool = False


class EvalBranch(_Evaluation):
    """Score the model of one budget branch (deps: train, data)."""

    kind: Literal["eval"] = "eval"
    source: Literal["branch"] = "branch"
    budget: int


EvalConfig = Annotated[EvalModel | EvalBranch, Field(discriminator="source")]

AnyConfig = Annotated[TokenizerTask | ShardTask | DataConfig | ParentConfig | PruneConfig | InitConfig
                      | TrainConfig | EvalConfig, Field(discriminator="kind")]


class Stage(Contract):
    id: str
    kind: StageKind
    config: AnyConfig
    deps: dict[str, str] = Field(default_factory=dict)
    # What the deps stand for in the id, when that is not the dep's own id (an eval of a branch is the same
    # computation whichever train stage of its trajectory produced the branch): role -> identity. None: the stage
    # waits for that dep but it is no part of what the stage computes (a data stage and its tasks).
    dep_identities: dict[str, str | None] = Field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ identity

def canonical(value: Any) -> Any:
    """Normalise a value for hashing: integral floats become ints, floats keep 12 significant digits."""
    kind = type(value)
    if kind is float:
        if math.isfinite(value) and value == int(value):
            return int(value)
        return float(f"{value:.12g}")
    if kind is dict:
        return {str(k): canonical(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [canonical(v) for v in value]
    return value


def content_id(payload: Any) -> str:
    """16 hex digits of sha256 over the canonical sorted-keys JSON of ``payload``."""
    text = json.dumps(canonical(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_stage(config: StageConfig, deps: dict[str, str],
               dep_identities: dict[str, str | None] | None = None) -> Stage:
    """A stage whose id is what it computes: kind, code version, config identity and inputs' identities (a dep
    whose identity is None is waited for, and left out)."""
    inputs = {role: identity for role, identity in {**deps, **(dep_identities or {})}.items() if identity is not None}
    kind = config.kind
    version = stage_version(kind, getattr(config, "source", None))
    stage_id = content_id({"kind": kind, "version": version, "config": config.identity(), "inputs": inputs})
    return Stage(id=stage_id, kind=kind, config=config, deps=deps, dep_identities=dep_identities or {})


def trajectory_id(model_stage: str, data_stage: str, schedule: Schedule, seed: int) -> str:
    """The id of a training trajectory: a model trained on a dataset with a schedule and seed, whatever budgets it
    is taken to (each train stage with more budgets extends the same trajectory)."""
    return content_id({"trajectory": VERSION["train"], "model": model_stage, "data": data_stage,
                       "schedule": schedule.identity(), "seed": seed})


def branch_identity(trajectory: str, budget: int) -> str:
    return f"{trajectory}/{budget}"


# ------------------------------------------------------------------------------------------------------ payloads

class ParamCounts(Contract):
    """A model's parameters (gridlab.model.param_counts, the one formula: plan, pruning and reports use it)."""

    decoder: int      # q, k, v, o, gate, up, down weights and their biases: the base of every pruning ratio
    embedding: int    # input embeddings + untied lm_head
    total: int        # everything: decoder + embedding + every norm (Qwen3's q_norm / k_norm included)


class TokenizerPayload(Contract):
    kind: Literal["tokenizer"] = "tokenizer"
    tokenizer_dir: str
    vocab_size: int
    trained: bool                     # False: the grid's tokenizer.path, as it is


class ShardPayload(Contract):
    kind: Literal["shard"] = "shard"
    partition: int
    partitions: int
    shard_dir: str                    # the data stage's shard folder, which holds its pieces
    units: dict[str, int]             # how many of its corpus units were written, already complete, or beyond the cap


class DataPayload(Contract):
    kind: Literal["data"] = "data"
    tokenizer_dir: str
    shards: dict[str, str]            # split -> shard path
    vocab_size: int
    corpus_fingerprint: str
    manifest: dict[str, Any]


class ParentPayload(Contract):
    kind: Literal["parent"] = "parent"
    model_path: str
    tokenizer_dir: str
    trained_tokens: int
    params: ParamCounts
    metrics: list[Metric] = Field(default_factory=list)   # the pretraining curve (train_loss, lr)


class PrunePayload(Contract):
    kind: Literal["prune"] = "prune"
    model_path: str
    achieved_ratio: float
    granularity: Granularity
    removed: list[int] | None = None  # depth: removed layer indices
    note: str | None = None
    calibration_sequences: int
    layerwise: bool
    params: ParamCounts


class InitPayload(Contract):
    kind: Literal["init"] = "init"
    model_path: str
    params: ParamCounts


class BranchResult(Contract):
    budget_tokens: int
    trained_tokens: int
    status: Literal["done", "diverged"] = "done"
    path: str | None = None           # the branch's HF checkpoint (None when it diverged)
    error: str | None = None          # diverged: which branch, step and loss
    metrics: list[Metric] = Field(default_factory=list)   # its curve: the trunk to its fork, then its decay


class TrainPayload(Contract):
    kind: Literal["train"] = "train"
    trajectory: str
    branches: list[BranchResult]

    def branch(self, budget: int) -> BranchResult | None:
        return next((b for b in self.branches if b.budget_tokens == budget), None)


class EvalPayload(Contract):
    kind: Literal["eval"] = "eval"
    model_path: str
    tokens: int                       # the evaluated model's training tokens
    metrics: list[Metric]
    # Each held-out loss's per-document weighted loss sums and token counts (StagePaths.document_losses,
    # gridlab.measure), for paired analyses; None in results written before eval version 2.
    document_losses: str | None = None


PAYLOADS: dict[str, type[Contract]] = {"tokenizer": TokenizerPayload, "shard": ShardPayload, "data": DataPayload,
                                       "parent": ParentPayload, "prune": PrunePayload, "init": InitPayload,
                                       "train": TrainPayload, "eval": EvalPayload}


def parse_payload(kind: str, data: dict[str, Any]) -> Contract:
    return PAYLOADS[kind].model_validate(data)


# --------------------------------------------------------------------------------------------------------- cells

class Cell(Contract):
    """One point of the grid: a (method, ratio, init, lr, setting, budget, seed) and the stages its numbers come
    from. Budget 0 is a reference point: a pruned model right after pruning, a random one at initialisation, and in
    setting 2 the random model after exactly the parent's P tokens. ``init`` is the arm: pruned, random, or
    embeddings (the random twin with the parent's embeddings; like a pruned cell, it trains B in either setting)."""

    cell_id: str
    method: str
    granularity: Granularity
    ratio: float
    init: Literal["pruned", "random", "embeddings"]
    setting: Literal[1, 2]
    budget_tokens: int
    trained_tokens: int
    seed: int
    prune_stage: str
    model_stage: str
    train_stage: str | None           # None: the cell trains nothing (budget 0 in setting 1, or a pruned B = 0)
    eval_stage: str                   # the stage whose metrics are the cell's headline numbers
    start_eval_stage: str             # the model stage's model scored before training (tokens 0)
    lr: float | None = None           # the peak learning rate of its arm's schedule (None: in an older plan)
