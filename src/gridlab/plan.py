"""GridSpec → cells and the stage DAG that produces them, with ids that are what each stage computes.

Stages are typed (gridlab.contracts): ``Stage(id, kind, config, deps)``. A stage id hashes its kind, the kind's code
version, its config's identity (execution-only settings and fields at their defaults left out) and its inputs'
identities, so identical work is planned once, and an edit changes exactly the ids downstream of it
(docs/architecture.md, "Stage identity").

``build_plan`` takes the grid's cells from gridlab.cells (the grid's product, its exclusions, and any extra cells a
caller adds) and builds the stages in the data flow's order: the grid-wide ones (data, parent, the parent's
evaluation), one prune stage and one random twin (and embeddings twin) per (method, ratio, seed), one train stage
per model and learning rate of its arm, one evaluation per model and budget branch. The parent's config is computed
once per plan (``Plan.parent_config``). What a plan costs (time, disk, GPU-hours) is gridlab.estimates; what
`gridlab plan` prints, gridlab.plantext.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from transformers import AutoConfig

from gridlab import inputs as input_identity
from gridlab.cells import CellDraft, CellGrid, CellKey, Replicate, enumerate_cells
from gridlab.contracts import (
    DATA_TASK_KINDS,
    STAGE_KINDS,
    ArchitectureInit,
    Cell,
    DataConfig,
    EmbeddingsInit,
    EvalBranch,
    EvalModel,
    LoadedParent,
    MaskInit,
    PretrainParent,
    PruneConfig,
    ShardTask,
    Stage,
    TokenizerTask,
    TrainConfig,
    branch_identity,
    canonical,
    content_id,
    make_stage,
    trajectory_id,
)
from gridlab.data import load_tokenizer
from gridlab.errors import InvalidValue, UserError
from gridlab.families import check_supported
from gridlab.layout import RunPaths
from gridlab.model import PRESETS, architecture, make_config, param_counts
from gridlab.planfile import current_inputs
from gridlab.pruning import METHODS, pruned_config
from gridlab.pruning.registry import check_against, resolve_options
from gridlab.spec import GridSpec, MethodSpec
from gridlab.tasks import TASKS_DIR
from gridlab.train import remaining_tokens


@dataclass
class Plan:
    spec: GridSpec
    stages: dict[str, Stage]                     # id → stage, in dependency order
    cells: list[Cell]
    excluded: int = 0
    added: int = 0                               # cells beyond the grid's lists (extra_cells: adaptive rounds)
    counts: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)   # what the grid reads, by content (stale-input checks)
    parent_config: Any = None                    # the parent's config (transformers), computed once per plan

    @property
    def parent_stage(self) -> Stage:
        return next(stage for stage in self.stages.values() if stage.kind == "parent")

    @property
    def parent_counts(self):
        """The parent's parameter counts (gridlab.contracts.ParamCounts)."""
        return param_counts(self.parent_config)

    def train_stages(self) -> list[Stage]:
        return [stage for stage in self.stages.values() if stage.kind == "train"]

    def train_tokens(self) -> int:
        """Tokens this plan trains from nothing, the parent's pretraining included."""
        return self.parent_tokens(remaining=False) + sum(self.stage_tokens(s, remaining=False)
                                                         for s in self.train_stages())

    def remaining_train_tokens(self) -> int:
        """Tokens a submit would still train, given what the run folder already holds: finished stages train
        nothing, and a train stage with one more budget only extends its trajectory (gridlab.train)."""
        return self.parent_tokens(remaining=True) + sum(self.stage_tokens(s, remaining=True)
                                                        for s in self.train_stages())

    def naive_train_tokens(self) -> int:
        """One run per cell: the parent once, then every cell trains its own model from its start."""
        parent = self.spec.parent.tokens if self.spec.parent.pretrains else 0
        return parent + sum(cell.trained_tokens for cell in self.cells)

    def selected_train_tokens(self, only: set[str], remaining: bool) -> int:
        """Tokens the stages ``only`` train (the parent's pretraining included when selected)."""
        tokens = self.parent_tokens(remaining) if self.parent_stage.id in only else 0
        return tokens + sum(self.stage_tokens(s, remaining) for s in self.train_stages() if s.id in only)

    def parent_tokens(self, remaining: bool) -> int:
        """Tokens the parent stage trains (0 for a loaded parent); ``remaining``: of what its folder lacks."""
        parent = self.parent_stage
        if not isinstance(parent.config, PretrainParent):
            return 0
        files = RunPaths(self.spec.run_dir).stage(parent.id)
        if remaining and files.result.exists():
            return 0
        return remaining_tokens(parent.config.schedule, [parent.config.tokens], self.spec.seq_len,
                                files.training_dir if remaining else None)

    def stage_tokens(self, stage: Stage, remaining: bool) -> int:
        """Tokens a train stage trains; ``remaining``: of what its trajectory folder lacks."""
        run = RunPaths(self.spec.run_dir)
        if remaining and run.stage(stage.id).result.exists():
            return 0
        return remaining_tokens(stage.config.schedule, stage.config.budgets, self.spec.seq_len,
                                run.trajectory(stage.config.trajectory) if remaining else None)


# ------------------------------------------------------------------------------------------------ the parent

def parent_config(spec: GridSpec):
    """The parent's config (of its family's class: gridlab.families) as the parent stage will build or load it; a
    loaded parent of a family gridlab does not prune is refused here, in one line; seq_len must fit its context.
    A loaded parent's config.json is read here: call it once per plan (``Plan.parent_config`` keeps it)."""
    if spec.parent.preset is not None:
        # A loaded parent that declares its preset may declare its vocabulary too (no tokenizer download at plan time).
        overrides = dict(spec.parent.overrides)
        vocab = int(overrides.pop("vocab_size")) if "vocab_size" in overrides else vocab_size(spec)
        context = overrides.get("max_position_embeddings", PRESETS[spec.parent.preset].get("max_position_embeddings"))
        _check_context(spec, context, f"parent.preset {spec.parent.preset!r}"
                       + (" with parent.overrides" if "max_position_embeddings" in overrides else ""))
        return make_config(spec.parent.preset, vocab, spec.seq_len, **overrides)
    try:
        config = AutoConfig.from_pretrained(spec.parent.path)
    except (OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"parent.path: cannot read the config of {spec.parent.path!r} (a Hugging Face model folder, "
                        f"or a hub name in the local cache; or declare parent.preset to plan without it): "
                        f"{first}") from None
    check_supported(config, f"parent.path {spec.parent.path!r}")
    _check_context(spec, getattr(config, "max_position_embeddings", None), f"the loaded parent {spec.parent.path}")
    return config


def _check_context(spec: GridSpec, context: int | None, whose: str) -> None:
    """Training and evaluation sequences of seq_len tokens must fit the parent's context."""
    if context is not None and spec.seq_len > context:
        raise UserError(f"seq_len: {spec.seq_len} is longer than the parent's context (max_position_embeddings "
                        f"{context} of {whose}); give seq_len ≤ {context}")


def vocab_size(spec: GridSpec) -> int:
    if spec.tokenizer.vocab_size is not None:
        return spec.tokenizer.vocab_size
    try:
        return len(load_tokenizer(spec.tokenizer.path))
    except ValueError as error:
        raise UserError(f"tokenizer.path: {error}") from None


def config_dict(config) -> dict[str, Any]:
    """A model config as the plain dict stage configs carry: gridlab.model.architecture (every field, the volatile
    ones that say nothing about the architecture dropped), canonical for hashing."""
    return canonical(architecture(config))


def pruned_architecture(method: MethodSpec, ratio: float, parent) -> dict[str, Any] | None:
    config = pruned_config(parent, method.name, ratio, **method.options)
    return None if config is None else config_dict(config)


def task_identities(tasks: list[str]) -> dict[str, str]:
    """What an lm-eval task is, for eval ids: gridlab's own by the content of its files (editing one reruns the
    evaluations that use it), a registry task by the lm-eval release that defines it."""
    identities = {}
    for task in tasks:
        stem = task.removeprefix("gridlab_")
        if task.startswith("gridlab_") and (TASKS_DIR / f"{stem}.yaml").exists():
            files = sorted(TASKS_DIR.glob(f"{stem}.*"))
            identities[task] = content_id([input_identity.fingerprint(path) for path in files])
        else:
            identities[task] = f"lm-eval {version('lm_eval')}"
    return identities


def check_method(index: int, method: MethodSpec, ratios: list[float], parent) -> None:
    """A method's options, checked by the method itself against the parent's real shapes, and the architecture it
    gives at each ratio; one line naming methods[index]."""
    spec = METHODS[method.name]
    resolved = resolve_options(spec, method.options)
    try:
        check_against(spec, resolved, parent)
        for ratio in ratios:
            pruned_config(parent, method.name, ratio, **method.options)
    except InvalidValue as bad:
        raise UserError(f"methods[{index}].options.{bad.key}: {bad.message}") from None
    except ValueError as bad:
        raise UserError(f"methods[{index}] ({method.label}): {str(bad).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------ the stages

def data_stages(spec: GridSpec, config: DataConfig) -> tuple[list[Stage], Stage]:
    """The data stage, and the tasks it is split into when ``[resources.data] tasks = K`` (K > 1): a tokenizer
    stage, then K shard stages (partition k of K, each writing its units' pieces into the data stage's shard
    folder), after which the data stage only assembles. The data stage waits for its tasks but its id stays what it
    computes, the same for any K, and so do the ids of everything downstream."""
    data = make_stage(config, {})
    partitions = spec.resources.for_kind("data")["tasks"]
    if partitions == 1:
        return [], data
    # The tasks read what the data stage reads; its id stands for the contents (no copies of the file hashes).
    reads = {"data_stage": data.id, "corpus": config.corpus, "splits": config.splits, "tokenizer": config.tokenizer,
             "seq_len": config.seq_len}
    tokenizer = make_stage(TokenizerTask(**reads), {})
    shards = [make_stage(ShardTask(**reads, partition=k, partitions=partitions), {"tokenizer": tokenizer.id})
              for k in range(partitions)]
    waits = {"tokenizer": tokenizer.id, **{f"shard{k}": shard.id for k, shard in enumerate(shards)}}
    assembled = make_stage(config, waits, dict.fromkeys(waits))
    assert assembled.id == data.id
    return [tokenizer, *shards], assembled


@dataclass(frozen=True)
class _Evaluations:
    """How every model of the grid is evaluated: the grid's [evaluation], the content identities of its extra
    corpora and lm-eval tasks, on the data stage's validation split."""

    evaluation: dict[str, Any]
    corpora: list[dict[str, Any]]
    tasks: dict[str, str]
    data: str                          # the data stage's id
    halves: bool = False               # the grid sweeps learning rates: val_loss/select and val_loss on disjoint halves

    def of_model(self, model_id: str, tokens: int, floors: bool = False) -> Stage:
        """A model stage's own model (the parent, a pruned model, a random twin), trained ``tokens``; ``floors``: the
        parent's evaluation also measures the floors its scores are read against (uniform and unigram losses, each
        task's chance level)."""
        return make_stage(EvalModel(evaluation=self.evaluation, corpora=self.corpora, tasks=self.tasks,
                                    halves=self.halves, tokens=tokens, floors=floors),
                          {"model": model_id, "data": self.data})

    def of_branch(self, train: Stage, budget: int) -> Stage:
        """One budget branch of a trajectory: the same evaluation whichever train stage produced the branch."""
        return make_stage(EvalBranch(evaluation=self.evaluation, corpora=self.corpora, tasks=self.tasks,
                                     halves=self.halves, budget=budget), {"train": train.id, "data": self.data},
                          {"train": branch_identity(train.config.trajectory, budget)})


@dataclass(frozen=True)
class _GridWide:
    """The stages every cell needs."""

    data_tasks: list[Stage]
    data: Stage
    parent: Stage
    parent_eval: Stage


def _grid_wide_stages(spec: GridSpec, inputs: dict[str, Any], parent_shape) -> tuple[_GridWide, _Evaluations]:
    """The data stage (and its tasks), the parent (pretrained, or loaded and checked against what the grid declares
    of it), the parent's evaluation; and how the grid evaluates its models."""
    data_tasks, data = data_stages(spec, DataConfig(
        corpus=spec.corpus, corpus_identity=inputs["corpus"], splits=spec.splits, tokenizer=spec.tokenizer,
        tokenizer_identity=inputs["tokenizer"], seq_len=spec.seq_len))
    if spec.parent.pretrains:
        parent = make_stage(PretrainParent(architecture=config_dict(parent_shape), tokens=spec.parent.tokens,
                                           seed=spec.parent.seed, schedule=spec.parent.schedule),
                            {"data": data.id})
    else:
        declared = config_dict(parent_shape) if spec.parent.preset is not None else None
        parent = make_stage(LoadedParent(path=spec.parent.path, model_identity=inputs["parent"],
                                         tokens=spec.parent.tokens, declared=declared), {"data": data.id})
    evaluations = _Evaluations(canonical(spec.evaluation.model_dump()), inputs["eval_corpora"],
                               task_identities(spec.evaluation.lm_eval_tasks), data.id, halves=spec.sweeps)
    parent_eval = evaluations.of_model(parent.id, spec.parent.tokens, floors=True)
    return _GridWide(data_tasks, data, parent, parent_eval), evaluations


@dataclass(frozen=True)
class _Models:
    """A replicate's model stages, one per arm: the prune stage and, when the grid has those arms, the random twin and
    the embeddings twin (the random twin given the parent's trained embeddings, final norm and lm_head)."""

    pruned: Stage
    random: Stage | None = None
    embeddings: Stage | None = None

    def of(self, init: str) -> Stage:
        return getattr(self, init)


def _model_stages(spec: GridSpec, replicate: Replicate, wide: _GridWide, parent_shape,
                  architectures: dict[tuple, tuple[dict, str]]) -> _Models:
    """A replicate's prune stage and, when the grid has random or embeddings cells, its random twin: a sparse
    method's mask on fresh weights, or a structured method's architecture (shared by every method that gives it;
    ``architectures`` caches them across replicates); and with embeddings cells the embeddings twin, which takes the
    twin and the parent's embeddings (the pruned model's when pruning cut the hidden size: the parent's at the kept
    channels), so methods that share a twin and keep the hidden size share it too."""
    method, ratio, seed = replicate.method, replicate.ratio, replicate.seed
    options = canonical(method.options)
    prune = make_stage(PruneConfig(
        method=method.name, method_version=METHODS[method.name].version, options=options,
        ratio=canonical(float(ratio)), seed=seed, calibration_sequences=spec.calibration.sequences,
        layerwise=spec.calibration.layerwise,
    ), {"parent": wide.parent.id, "data": wide.data.id})
    if not {"random", "embeddings"} & set(spec.inits):
        return _Models(prune)
    if METHODS[method.name].granularity == "sparse":
        twin, same_hidden = make_stage(MaskInit(seed=seed, sparse=spec.init.sparse), {"model": prune.id}), True
    else:
        shape = (method.name, json.dumps(options, sort_keys=True), ratio)
        if shape not in architectures:
            pruned = pruned_architecture(method, ratio, parent_shape)
            architectures[shape] = (pruned, content_id(pruned))
        pruned, digest = architectures[shape]
        same_hidden = pruned["hidden_size"] == parent_shape.hidden_size
        # A loaded parent is waited for (its stage checks the declared architecture against the checkpoint), but
        # what init takes from it is the architecture, already in the config. A pretrained parent's architecture is
        # the grid's own: its random twins need not wait for it. The data stage's tokenizer is saved beside the
        # model (its weights do not depend on it).
        waits = {"data": wide.data.id} if spec.parent.pretrains else {"data": wide.data.id, "parent": wide.parent.id}
        twin = make_stage(ArchitectureInit(architecture=pruned, seed=seed), waits,
                          {"parent": digest} if "parent" in waits else None)
    embeddings = None
    if "embeddings" in spec.inits:
        donor = wide.parent if same_hidden else prune
        embeddings = make_stage(EmbeddingsInit(), {"model": twin.id, "embeddings": donor.id})
    return _Models(prune, twin if "random" in spec.inits or embeddings else None, embeddings)


def _cell_id(cell: dict[str, Any], sweeps: bool) -> str:
    """A cell's id: what it is and the evaluation its numbers come from; with a learning-rate sweep also its lr (the
    reference cells of one model share an evaluation at every lr), so a grid without one keeps its ids."""
    keys = ("method", "ratio", "init", "setting", "budget_tokens", "trained_tokens", "seed", "eval_stage")
    identity = "|".join(str(canonical(cell[key])) for key in (*keys, *(("lr",) if sweeps else ())))
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def build_plan(spec: GridSpec, extra_cells: Iterable[CellKey] = ()) -> Plan:
    """The plan of a grid: its cells and the stages that produce them, in dependency order.

    ``extra_cells``: (method label, ratio, budget, seed) points beyond the grid's product (gridlab.cells.CellKey),
    each in every init and setting of the grid — more seeds or budgets for chosen groups. They are checked as the
    grid's own are (a UserError names a bad one), the exclude rules apply to them, and a point the grid already has
    changes nothing; every stage id of the grid's own cells stays what it is without them.
    """
    grid: CellGrid = enumerate_cells(spec, extra_cells)
    parent_shape = parent_config(spec)
    for index, method in enumerate(spec.methods):
        ratios = list(dict.fromkeys([*spec.method_ratios(method), *grid.ratios(method)]))
        check_method(index, method, ratios, parent_shape)
    # Local inputs enter ids by content (a cached hash behind sizes and mtimes), hub ones by revision; the same
    # identities submit and status later compare with the inputs as they are then.
    inputs = current_inputs(spec.model_dump(mode="json"))
    wide, evaluations = _grid_wide_stages(spec, inputs, parent_shape)
    stages: dict[str, Stage] = {**{task.id: task for task in wide.data_tasks}, wide.data.id: wide.data,
                                wide.parent.id: wide.parent, wide.parent_eval.id: wide.parent_eval}

    # A trajectory: a model stage trained with one schedule (its arm's, at one lr); what it is trained to.
    budgets_of: dict[tuple[str, float], set[int]] = {}
    schedule_of = {(init, lr): schedule for init in spec.inits
                   for lr, schedule in zip(spec.schedule.lrs(init), spec.schedules(init), strict=True)}
    seed_of: dict[str, int] = {}
    placed: list[tuple[CellDraft, str, str]] = []   # (cell, its model stage, its prune stage)
    architectures: dict[tuple, tuple[dict, str]] = {}
    for replicate in grid.replicates:
        if not replicate.cells:
            continue
        models = _model_stages(spec, replicate, wide, parent_shape, architectures)
        stages.setdefault(models.pruned.id, models.pruned)
        if models.embeddings is not None:   # its random twin is its input, whether or not the grid trains it
            stages.setdefault(models.random.id, models.random)
        for cell in replicate.cells:
            model = models.of(cell.init)
            stages.setdefault(model.id, model)
            if cell.trained_tokens:
                budgets_of.setdefault((model.id, cell.init, cell.lr), set()).add(cell.trained_tokens)
            seed_of[model.id] = cell.seed
            placed.append((cell, model.id, models.pruned.id))

    start_eval: dict[str, Stage] = {}
    for _, model_id, _ in placed:
        if model_id not in start_eval:
            start_eval[model_id] = evaluations.of_model(model_id, 0)
    train_of: dict[tuple[str, float], Stage] = {}
    branch_eval: dict[tuple[str, float, int], Stage] = {}
    for (model_id, init, lr), budgets in budgets_of.items():
        schedule = schedule_of[init, lr]
        trajectory = trajectory_id(model_id, wide.data.id, schedule, seed_of[model_id])
        train = make_stage(TrainConfig(budgets=sorted(budgets), schedule=schedule, seed=seed_of[model_id],
                                       trajectory=trajectory), {"model": model_id, "data": wide.data.id})
        train_of[model_id, lr] = train
        for budget in sorted(budgets):
            branch_eval[model_id, lr, budget] = evaluations.of_branch(train, budget)

    cells = []
    for draft, model_id, prune_id in placed:
        trained = draft.trained_tokens
        train = train_of.get((model_id, draft.lr)) if trained else None
        evaluation = branch_eval[model_id, draft.lr, trained] if trained else start_eval[model_id]
        fields = {"method": draft.method.label, "granularity": draft.granularity, "ratio": float(draft.ratio),
                  "init": draft.init, "setting": draft.setting, "budget_tokens": draft.budget_tokens,
                  "trained_tokens": trained, "seed": draft.seed, "prune_stage": prune_id, "model_stage": model_id,
                  "train_stage": train.id if train else None, "eval_stage": evaluation.id,
                  "start_eval_stage": start_eval[model_id].id, "lr": draft.lr}
        cells.append(Cell(cell_id=_cell_id(fields, spec.sweeps), **fields))

    for group in (start_eval.values(), train_of.values(), branch_eval.values()):
        for stage in group:
            stages[stage.id] = stage
    ordered = dict(sorted(stages.items(), key=lambda item: STAGE_KINDS.index(item[1].kind)))
    counts = {kind: 0 for kind in STAGE_KINDS if kind not in DATA_TASK_KINDS or wide.data_tasks}
    for stage in ordered.values():
        counts[stage.kind] += 1
    budgets = {0, *spec.budgets}
    added = sum(1 for cell in cells if cell.seed not in spec.seeds or cell.budget_tokens not in budgets)
    return Plan(spec=spec, stages=ordered, cells=cells, excluded=grid.excluded, added=added, counts=counts,
                inputs=inputs, parent_config=parent_shape)
