"""GridSpec → cells and the stage DAG that produces them, with ids that are what each stage computes.

Stages are typed (gridlab.contracts): ``Stage(id, kind, config, deps)``. A stage id hashes its kind, the kind's code
version, its config's identity (execution-only settings left out) and its inputs' identities, so identical work is
planned once, and an edit changes exactly the ids downstream of it (docs/architecture.md, "Stage identity").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from gridlab.contracts import (
    DATA_TASK_KINDS,
    STAGE_KINDS,
    ArchitectureInit,
    Cell,
    DataConfig,
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
from gridlab.errors import InvalidValue, UserError
from gridlab.layout import RunPaths
from gridlab.model import PRESETS
from gridlab.spec import GridSpec, MethodSpec

# fp32 training throughput in tokens/s of one worker on the 2-core development machine (docs/engine.md,
# bench/train_throughput.py): micro idle; nano and mini with the machine shared with three busy processes; small
# from /work/shared/environment.md (a 135M model); pico: 1-thread workers of the default study; smollm2-135m: the
# example's 1-thread workers side by side. Never the silent default: `gridlab plan` measures this host
# (gridlab.throughput) and uses this table only, labelled as an assumption, for a parent too large to measure here.
MEASURED_TOKENS_PER_S: dict[str, float] = {
    "pico": 5200.0,
    "micro": 790.0,
    "nano": 220.0,
    "mini": 136.0,
    "small": 94.0,
    "smollm2-135m": 41.0,
}


@dataclass
class Plan:
    spec: GridSpec
    stages: dict[str, Stage]                     # id → stage, in dependency order
    cells: list[Cell]
    excluded: int = 0
    added: int = 0                               # cells beyond the grid's lists (extra_cells: adaptive rounds)
    counts: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)   # what the grid reads, by content (stale-input checks)

    def train_stages(self) -> list[Stage]:
        return [stage for stage in self.stages.values() if stage.kind == "train"]

    def train_tokens(self) -> int:
        """Tokens this plan trains from nothing, the parent's pretraining included."""
        return self._parent_tokens(remaining=False) + sum(self._stage_tokens(s, remaining=False)
                                                          for s in self.train_stages())

    def remaining_train_tokens(self) -> int:
        """Tokens a submit would still train, given what the run folder already holds: finished stages train
        nothing, and a train stage with one more budget only extends its trajectory (gridlab.train)."""
        return self._parent_tokens(remaining=True) + sum(self._stage_tokens(s, remaining=True)
                                                         for s in self.train_stages())

    def naive_train_tokens(self) -> int:
        """One run per cell: the parent once, then every cell trains its own model from its start."""
        parent = self.spec.parent.tokens if self.spec.parent.pretrains else 0
        return parent + sum(cell.trained_tokens for cell in self.cells)

    def _parent_tokens(self, remaining: bool) -> int:
        from gridlab.train import remaining_tokens

        parent = next(s for s in self.stages.values() if s.kind == "parent")
        if not isinstance(parent.config, PretrainParent):
            return 0
        files = RunPaths(self.spec.run_dir).stage(parent.id)
        if remaining and files.result.exists():
            return 0
        return remaining_tokens(parent.config.schedule, [parent.config.tokens], self.spec.seq_len,
                                files.output("train") if remaining else None)

    def _stage_tokens(self, stage: Stage, remaining: bool) -> int:
        from gridlab.train import remaining_tokens

        run = RunPaths(self.spec.run_dir)
        if remaining and run.stage(stage.id).result.exists():
            return 0
        return remaining_tokens(stage.config.schedule, stage.config.budgets, self.spec.seq_len,
                                run.trajectory(stage.config.trajectory) if remaining else None)

    def step_costs(self) -> dict[str, float]:
        """Each training stage's step cost relative to the parent's (relative_step_cost): the parent 1."""
        counts = None
        if self.spec.parent.preset is not None or self.spec.parent.pretrains:
            from gridlab.model import param_counts

            counts = param_counts(parent_config(self.spec))
        costs = {s.id: 1.0 for s in self.stages.values() if s.kind == "parent"}
        for cell in self.cells:
            if cell.train_stage:
                costs[cell.train_stage] = relative_step_cost(counts, cell.granularity, cell.ratio)
        return costs

    def throughput(self, workers: int):
        """How fast one local worker trains the parent's shape (gridlab.throughput): this run's finished training
        stages, else a measurement of this host (cached), else a labelled assumption."""
        from gridlab import throughput

        found = throughput.from_run(self.spec.run_dir, self.step_costs())
        if found is not None:
            return found
        schedule = self.spec.parent.schedule if self.spec.parent.pretrains else self.spec.schedule
        return throughput.measure(parent_config(self.spec), self.spec.seq_len, schedule.batch_size, workers,
                                  assumed=MEASURED_TOKENS_PER_S.get(self.spec.parent.preset or ""))

    def estimated_seconds(self, workers: int, tokens_per_s: float, remaining: bool = True,
                          only: set[str] | None = None) -> float:
        """Training time of the plan (or of the stages ``only``) on ``workers`` local workers, each training the
        parent's shape at ``tokens_per_s`` (a pruned model's step costs relative_step_cost of the parent's)."""
        costs = self.step_costs()
        seconds = 0.0
        parent = next(s for s in self.stages.values() if s.kind == "parent")
        if only is None or parent.id in only:
            seconds += self._parent_tokens(remaining) / tokens_per_s
        for stage in self.train_stages():
            if only is None or stage.id in only:
                seconds += self._stage_tokens(stage, remaining) * costs.get(stage.id, 1.0) / tokens_per_s
        return seconds / max(1, workers)

    def selected_train_tokens(self, only: set[str], remaining: bool) -> int:
        """Tokens the stages ``only`` train (the parent's pretraining included when selected)."""
        parent = next(s for s in self.stages.values() if s.kind == "parent")
        tokens = self._parent_tokens(remaining) if parent.id in only else 0
        return tokens + sum(self._stage_tokens(s, remaining) for s in self.train_stages() if s.id in only)


def relative_step_cost(parent_counts, granularity: str, ratio: float) -> float:
    """A pruned model's training cost per token relative to its parent's. Depth and width models compute their
    embeddings and what is left of the decoder; sparse models keep dense shapes and cost what the parent does.
    (Measured on pico: 6 of its 12 layers train 1.7× faster; this gives 1.6×.) Unknown parent: 1."""
    if granularity == "sparse" or parent_counts is None:
        return 1.0
    dense = parent_counts.embedding + parent_counts.decoder
    return (parent_counts.embedding + (1 - ratio) * parent_counts.decoder) / dense


def granularity(method: MethodSpec) -> str:
    from gridlab.pruning import METHODS

    return METHODS[method.method].granularity


def parent_config(spec: GridSpec):
    """The parent's config (of its family's class: gridlab.families) as the parent stage will build or load it; a
    loaded parent of a family gridlab does not prune is refused here, in one line; seq_len must fit its context."""
    if spec.parent.preset is not None:
        from gridlab.model import make_config

        # A loaded parent that declares its preset may declare its vocabulary too (no tokenizer download at plan time).
        overrides = dict(spec.parent.overrides)
        vocab = int(overrides.pop("vocab_size")) if "vocab_size" in overrides else vocab_size(spec)
        context = overrides.get("max_position_embeddings", PRESETS[spec.parent.preset].get("max_position_embeddings"))
        _check_context(spec, context, f"parent.preset {spec.parent.preset!r}"
                       + (" with parent.overrides" if "max_position_embeddings" in overrides else ""))
        return make_config(spec.parent.preset, vocab, spec.seq_len, **overrides)
    from transformers import AutoConfig

    from gridlab.families import check_supported

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
    from gridlab.data import load_tokenizer

    try:
        return len(load_tokenizer(spec.tokenizer.path))
    except ValueError as error:
        raise UserError(f"tokenizer.path: {error}") from None


def config_dict(config) -> dict[str, Any]:
    """A model config as the plain dict stage configs carry: gridlab.model.architecture (every field, the volatile
    ones that say nothing about the architecture dropped), canonical for hashing."""
    from gridlab.model import architecture

    return canonical(architecture(config))


def pruned_architecture(method: MethodSpec, ratio: float, parent) -> dict[str, Any] | None:
    from gridlab.pruning import pruned_config

    config = pruned_config(parent, method.method, ratio, **method.prune_options)
    return None if config is None else config_dict(config)


def task_identities(tasks: list[str]) -> dict[str, str]:
    """What an lm-eval task is, for eval ids: gridlab's own by the content of its files (editing one reruns the
    evaluations that use it), a registry task by the lm-eval release that defines it."""
    from importlib.metadata import version

    from gridlab import inputs
    from gridlab.tasks import TASKS_DIR

    identities = {}
    for task in tasks:
        stem = task.removeprefix("gridlab_")
        if task.startswith("gridlab_") and (TASKS_DIR / f"{stem}.yaml").exists():
            files = sorted(TASKS_DIR.glob(f"{stem}.*"))
            identities[task] = content_id([inputs.fingerprint(path) for path in files])
        else:
            identities[task] = f"lm-eval {version('lm_eval')}"
    return identities


def check_method(index: int, method: MethodSpec, ratios: list[float], parent) -> None:
    """A method's options, checked by the method itself against the parent's real shapes, and the architecture it
    gives at each ratio; one line naming methods[index]."""
    from gridlab.pruning import METHODS, pruned_config
    from gridlab.pruning.registry import check_against, resolve_options

    spec = METHODS[method.method]
    resolved = resolve_options(spec, method.prune_options)
    try:
        check_against(spec, resolved, parent)
        for ratio in ratios:
            pruned_config(parent, method.method, ratio, **method.prune_options)
    except InvalidValue as bad:
        raise UserError(f"methods[{index}].options.{bad.key}: {bad.message}") from None
    except ValueError as bad:
        raise UserError(f"methods[{index}] ({method.name}): {str(bad).splitlines()[0]}") from None


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
    reads = {"data_stage": data.id, **config.model_dump(include={"corpus", "splits", "tokenizer", "seq_len"})}
    tokenizer = make_stage(TokenizerTask(**reads), {})
    shards = [make_stage(ShardTask(**reads, partition=k, partitions=partitions), {"tokenizer": tokenizer.id})
              for k in range(partitions)]
    waits = {"tokenizer": tokenizer.id, **{f"shard{k}": shard.id for k, shard in enumerate(shards)}}
    assembled = make_stage(config, waits, dict.fromkeys(waits))
    assert assembled.id == data.id
    return [tokenizer, *shards], assembled


@dataclass(frozen=True)
class ExtraCell:
    """A cell beyond the product of the grid's lists — an adaptive study's addition (gridlab.adaptive): both inits
    of (method, ratio, seed) at one budget and setting, planned like any other cell (the same stages, ids and cell
    id as in a grid that lists that seed and budget)."""

    method: str  # the method's key (its label, or name)
    ratio: float
    budget: int
    seed: int
    setting: int  # the setting whose verdict asked for it (a setting-1 seed buys no setting-2 random training)


def cell_keys(spec: GridSpec, extra_cells=()) -> dict[tuple[str, float], dict[int, list[tuple[int, int]]]]:
    """Per (method key, ratio) and seed, the (budget, setting) pairs the plan makes cells for: the grid's product —
    the reference budget 0 and every budget, each in every setting, for every seed — then the `extra_cells` that fit
    the grid (a method it has, one of that method's ratios, one of its settings; others are left out, as cells of a
    method removed from the grid would be). The one place where additions become cells."""
    keys: dict[tuple[str, float], dict[int, list[tuple[int, int]]]] = {}
    for method in spec.methods:
        for ratio in spec.method_ratios(method):
            keys[method.key, float(ratio)] = {seed: [(budget, setting) for budget in [0, *spec.budgets]
                                                     for setting in spec.settings] for seed in spec.seeds}
    for extra in sorted(extra_cells, key=lambda e: (e.seed, e.budget, e.setting)):
        ratio = next((r for (m, r) in keys if m == extra.method and abs(r - extra.ratio) < 1e-9), None)
        if ratio is None or extra.setting not in spec.settings or extra.budget <= 0:
            continue
        pairs = keys[extra.method, ratio].setdefault(extra.seed, [])
        if (extra.budget, extra.setting) not in pairs:
            pairs.append((extra.budget, extra.setting))
    return keys


def build_plan(spec: GridSpec, extra_cells=()) -> Plan:
    """The grid's stages and cells, with `extra_cells` (ExtraCell, an adaptive study's additions: cell_keys)."""
    from gridlab.planfile import current_inputs
    from gridlab.pruning import METHODS

    schedule = spec.schedule
    evaluation = canonical(spec.evaluation.model_dump())
    # Local inputs enter ids by content (a cached hash behind sizes and mtimes), hub ones by revision; the same
    # identities submit and status later compare with the inputs as they are then.
    inputs = current_inputs(spec.model_dump(mode="json"))
    corpora = inputs["eval_corpora"]
    tasks = task_identities(spec.evaluation.lm_eval_tasks)
    data_tasks, data = data_stages(spec, DataConfig(
        corpus=canonical(spec.corpus.model_dump()), corpus_identity=inputs["corpus"],
        splits=canonical(spec.splits.model_dump()), tokenizer=canonical(spec.tokenizer.model_dump()),
        tokenizer_identity=inputs["tokenizer"], seq_len=spec.seq_len))
    parent_tokens = spec.parent.tokens
    parent_architecture = parent_config(spec) if spec.parent.preset is not None or spec.parent.pretrains else None
    if spec.parent.pretrains:
        parent = make_stage(PretrainParent(architecture=config_dict(parent_architecture), tokens=parent_tokens,
                                           seed=spec.parent.seed, schedule=spec.parent.schedule),
                            {"data": data.id})
    else:
        declared = config_dict(parent_architecture) if parent_architecture is not None else None
        parent = make_stage(LoadedParent(path=spec.parent.path,
                                         model_identity=inputs["parent"],
                                         tokens=parent_tokens, declared=declared), {"data": data.id})
    stages: dict[str, Stage] = {**{task.id: task for task in data_tasks}, data.id: data, parent.id: parent}
    parent_eval = make_stage(EvalModel(evaluation=evaluation, corpora=corpora, tasks=tasks,
                                       tokens=parent_tokens),
                             {"model": parent.id, "data": data.id})
    stages[parent_eval.id] = parent_eval

    budgets_of: dict[str, set[int]] = {}     # model stage id → budgets its train stage must reach
    seed_of: dict[str, int] = {}
    drafts: list[dict[str, Any]] = []
    excluded = 0
    matched_rules: set[int] = set()
    architectures: dict[tuple, tuple[dict, str]] = {}

    parent_shape = parent_architecture if parent_architecture is not None else parent_config(spec)
    for index, method in enumerate(spec.methods):
        check_method(index, method, spec.method_ratios(method), parent_shape)
    keys = cell_keys(spec, extra_cells)
    for method in spec.methods:
        kind = granularity(method)
        options = canonical(method.prune_options)
        for ratio in spec.method_ratios(method):
            for seed, pairs in keys[method.key, float(ratio)].items():
                prune = make_stage(PruneConfig(
                    method=method.method, method_version=METHODS[method.method].version, options=options,
                    ratio=canonical(float(ratio)), seed=seed, calibration_sequences=spec.calibration.sequences,
                    layerwise=spec.calibration.layerwise,
                ), {"parent": parent.id, "data": data.id})
                init = None
                if "random" in spec.inits:
                    if kind == "sparse":
                        init = make_stage(MaskInit(seed=seed), {"model": prune.id})
                    else:
                        arch_key = (method.method, json.dumps(options, sort_keys=True), ratio)
                        if arch_key not in architectures:
                            if parent_architecture is None:
                                parent_architecture = parent_config(spec)
                            architecture = pruned_architecture(method, ratio, parent_architecture)
                            architectures[arch_key] = (architecture, content_id(architecture))
                        architecture, digest = architectures[arch_key]
                        # A loaded parent is waited for (its stage checks the declared architecture against the
                        # checkpoint), but what init takes from it is the architecture, already in the config. A
                        # pretrained parent's architecture is the grid's own: its random twins need not wait for it.
                        # The data stage's tokenizer is saved beside the model (its weights do not depend on it).
                        waits = {"data": data.id} if spec.parent.pretrains else {"data": data.id, "parent": parent.id}
                        init = make_stage(ArchitectureInit(architecture=architecture, seed=seed), waits,
                                          {"parent": digest} if "parent" in waits else None)
                for init_kind in spec.inits:
                    model = prune if init_kind == "pruned" else init
                    for budget, setting in pairs:
                        trained = budget + parent_tokens if (init_kind == "random" and setting == 2) else budget
                        cell = {"method": method.key, "granularity": kind, "ratio": float(ratio),
                                "init": init_kind, "setting": setting, "budget": budget,
                                "budget_tokens": budget, "trained_tokens": trained, "seed": seed}
                        hits = [i for i, rule in enumerate(spec.exclude) if rule.matches(cell)]
                        if hits:
                            matched_rules.update(hits)
                            excluded += 1
                            continue
                        del cell["budget"]
                        stages.setdefault(prune.id, prune)
                        if model is not prune:
                            stages.setdefault(model.id, model)
                        if trained:
                            budgets_of.setdefault(model.id, set()).add(trained)
                        seed_of[model.id] = seed
                        drafts.append({**cell, "model_stage": model.id, "prune_stage": prune.id})
    unmatched = [i for i in range(len(spec.exclude)) if i not in matched_rules]
    if unmatched:
        rule = spec.exclude[unmatched[0]]
        given = ", ".join(f"{k} = {v!r}" for k, v in rule.model_dump().items() if v is not None)
        raise UserError(f"exclude[{unmatched[0]}] ({given}) matches no cell of the grid; remove it or fix its values")

    start_eval: dict[str, Stage] = {}
    branch_eval: dict[tuple[str, int], Stage] = {}
    train_of: dict[str, Stage] = {}
    for draft in drafts:
        model_id = draft["model_stage"]
        if model_id not in start_eval:
            start_eval[model_id] = make_stage(EvalModel(evaluation=evaluation, corpora=corpora, tasks=tasks,
                                                        tokens=0),
                                              {"model": model_id, "data": data.id})
    for model_id, budgets in budgets_of.items():
        trajectory = trajectory_id(model_id, data.id, schedule, seed_of[model_id])
        train = make_stage(TrainConfig(budgets=sorted(budgets), schedule=schedule, seed=seed_of[model_id],
                                       trajectory=trajectory), {"model": model_id, "data": data.id})
        train_of[model_id] = train
        for budget in sorted(budgets):
            branch_eval[model_id, budget] = make_stage(
                EvalBranch(evaluation=evaluation, corpora=corpora, tasks=tasks, budget=budget),
                {"train": train.id, "data": data.id},
                {"train": branch_identity(trajectory, budget)})

    cells = []
    for draft in drafts:
        model_id = draft.pop("model_stage")
        trained = draft["trained_tokens"]
        train = train_of.get(model_id) if trained else None
        evaluation_stage = branch_eval[model_id, trained] if trained else start_eval[model_id]
        fields = {**draft, "model_stage": model_id, "train_stage": train.id if train else None,
                  "eval_stage": evaluation_stage.id, "start_eval_stage": start_eval[model_id].id}
        identity = "|".join(str(canonical(fields[key])) for key in (
            "method", "ratio", "init", "setting", "budget_tokens", "trained_tokens", "seed", "eval_stage"))
        cells.append(Cell(cell_id=hashlib.sha256(identity.encode()).hexdigest()[:16], **fields))

    for group in (start_eval.values(), train_of.values(), branch_eval.values()):
        for stage in group:
            stages[stage.id] = stage
    ordered = dict(sorted(stages.items(), key=lambda item: STAGE_KINDS.index(item[1].kind)))
    counts = {kind: 0 for kind in STAGE_KINDS if kind not in DATA_TASK_KINDS or data_tasks}
    for stage in ordered.values():
        counts[stage.kind] += 1
    budgets = {0, *spec.budgets}
    added = sum(1 for cell in cells if cell.seed not in spec.seeds or cell.budget_tokens not in budgets)
    return Plan(spec=spec, stages=ordered, cells=cells, excluded=excluded, added=added, counts=counts,
                inputs=inputs)


def format_plan(plan: Plan, workers: int | None = None, only: set[str] | None = None,
                cells: list[Cell] | None = None) -> str:
    """What `gridlab plan` and `gridlab submit` print: the matrix, stages, tokens (and still to train), the time
    estimate and where its throughput comes from, disk. ``only`` / ``cells``: a --where selection (its stages with
    what they need upstream, its cells), whose cells, stages, tokens and time are printed too."""
    spec = plan.spec
    workers = workers or spec.local.workers
    added = f", {plan.added} added by adaptive rounds" if plan.added else ""
    lines = [f"grid {spec.name}: {len(plan.cells)} cells ({plan.excluded} excluded{added}) → {plan.spec.run_dir}"]
    parent = spec.parent
    source = f"pretrain {parent.preset} for {parent.tokens:,} tokens" if parent.pretrains else f"load {parent.path}"
    lines.append(f"  parent: {source} (parent tokens P = {parent.tokens:,})")
    from gridlab.data import describe_corpus  # checks the corpus files too: a UserError names a bad one

    lines.append("  " + describe_corpus(spec.corpus))
    lines.extend("  " + describe_corpus(corpus, f"eval corpus {corpus.label}") for corpus in spec.evaluation.corpora)
    lines.append("  methods: " + ", ".join(
        f"{m.key} [{granularity(m)}] ratios {'/'.join(f'{r:g}' for r in spec.method_ratios(m))}"
        for m in spec.methods))
    lines.append(f"  inits {', '.join(spec.inits)} × budgets {', '.join(f'{b:,}' for b in spec.budgets)}"
                 f" × settings {', '.join(map(str, spec.settings))} × seeds {', '.join(map(str, spec.seeds))}")
    lines.append("  stages: " + ", ".join(f"{kind} {count}" for kind, count in plan.counts.items())
                 + f" (total {len(plan.stages)})")
    planned, naive, remaining = plan.train_tokens(), plan.naive_train_tokens(), plan.remaining_train_tokens()
    lines.append(f"  tokens to train: {planned:,} (naive one run per cell: {naive:,}; "
                 f"{naive / max(planned, 1):.1f}× saved)")
    if remaining != planned:
        lines.append(f"  still to train: {remaining:,} tokens ({planned - remaining:,} are trained already in "
                     f"{spec.run_dir})")
    gpus = spec.resources.for_kind("train")["gpus_per_node"]
    speed = None if gpus else plan.throughput(workers)
    if speed is not None and speed.tokens_per_s:
        seconds = plan.estimated_seconds(workers, speed.tokens_per_s)
        lines.append(f"  estimated training time: {_duration(seconds)} on {workers} local worker(s) ({speed.basis})")
    elif speed is not None:
        lines.append(f"  estimated training time: unknown ({speed.basis})")
    if only is not None:
        chosen = cells if cells is not None else []
        counts: dict[str, int] = {}
        for stage in plan.stages.values():
            if stage.id in only:
                counts[stage.kind] = counts.get(stage.kind, 0) + 1
        lines.append(f"  --where selects {len(chosen)} of {len(plan.cells)} cells and {len(only)} of "
                     f"{len(plan.stages)} stages with what they need upstream ("
                     + ", ".join(f"{kind} {n}" for kind, n in counts.items()) + ")")
        selected, left = plan.selected_train_tokens(only, False), plan.selected_train_tokens(only, True)
        line = f"  --where tokens to train: {selected:,}" + (f" (still to train: {left:,})" if left != selected
                                                              else "")
        if speed is not None and speed.tokens_per_s:
            seconds = plan.estimated_seconds(workers, speed.tokens_per_s, only=only)
            line += f"; estimated training time: {_duration(seconds)} on {workers} local worker(s)"
        lines.append(line)
    lines.extend(_job_lines(plan))
    lines.extend(_disk_lines(plan))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ disk

MODEL_BYTES_PER_PARAMETER = 4     # models are saved as fp32 safetensors (sparse masks: 1 byte per decoder weight)


@dataclass(frozen=True)
class Disk:
    """Bytes a stage kind leaves on disk when all its stages are done, and the most it holds at once before."""

    end: int
    peak: int


def disk_usage(plan: Plan) -> dict[str, Disk | None]:
    """Disk per stage kind (None where it cannot be known before running: the token shards of a corpus not yet
    read). Models are fp32; a saved training state is gridlab.checkpoint.checkpoint_bytes; a train stage holds its
    trajectory's kept state plus, while a branch decays, that branch's state; at most ``parallel`` stages of a kind
    (local workers, or the SLURM array's parallelism) hold their transient files at once."""
    from gridlab.checkpoint import checkpoint_bytes
    from gridlab.model import param_counts

    spec = plan.spec
    parent = param_counts(parent_config(spec))
    dense = parent.total

    def params(granularity: str, ratio: float) -> int:
        return dense if granularity == "sparse" else round(dense - ratio * parent.decoder)

    def model_bytes(granularity: str, ratio: float) -> int:
        mask = parent.decoder if granularity == "sparse" else 0
        return MODEL_BYTES_PER_PARAMETER * params(granularity, ratio) + mask

    def parallel(kind: str) -> int:
        resources = spec.resources.for_kind(kind)
        return resources["array_parallelism"] if resources["gpus_per_node"] else spec.local.workers

    def kept(schedule) -> int:
        return 0 if schedule.keep_checkpoints == "none" or (
            schedule.kind == "cosine" and schedule.keep_checkpoints == "extendable") else 1

    usage: dict[str, Disk | None] = {"data": None}
    parent_stage = next(s for s in plan.stages.values() if s.kind == "parent")
    if isinstance(parent_stage.config, PretrainParent):
        schedule = parent_stage.config.schedule
        end = MODEL_BYTES_PER_PARAMETER * dense + kept(schedule) * checkpoint_bytes(dense)
        usage["parent"] = Disk(end, MODEL_BYTES_PER_PARAMETER * dense + 2 * checkpoint_bytes(dense))
    else:
        usage["parent"] = Disk(0, 0)
    shape_of: dict[str, tuple[str, float]] = {}
    for cell in plan.cells:
        shape_of.setdefault(cell.model_stage, (cell.granularity, cell.ratio))
        if cell.train_stage:
            shape_of.setdefault(cell.train_stage, (cell.granularity, cell.ratio))
    for kind in ("prune", "init"):
        stages = [s for s in plan.stages.values() if s.kind == kind]
        end = sum(model_bytes(*shape_of[s.id]) for s in stages)
        spill = MODEL_BYTES_PER_PARAMETER * parent.decoder if kind == "prune" and spec.calibration.layerwise else 0
        usage[kind] = Disk(end, end + min(len(stages), parallel(kind)) * spill)
    ends, transients = [], []
    for stage in plan.train_stages():
        granularity, ratio = shape_of[stage.id]
        state = checkpoint_bytes(params(granularity, ratio))
        keep = kept(stage.config.schedule)
        ends.append(len(stage.config.budgets) * model_bytes(granularity, ratio) + keep * state)
        transients.append((2 - keep) * state)
    transients.sort(reverse=True)
    usage["train"] = Disk(sum(ends), sum(ends) + sum(transients[:parallel("train")]))
    usage["eval"] = Disk(0, 0)
    return usage


def disk_per_stage(plan: Plan) -> dict[str, int | None]:
    """The most one stage of each kind holds on disk (its kind's peak over its stages; None: unknown before the
    corpus is read), what a stage that finds the disk full says it needs."""
    counts: dict[str, int] = {}
    for stage in plan.stages.values():
        counts[stage.kind] = counts.get(stage.kind, 0) + 1
    return {kind: None if disk is None else -(-disk.peak // max(1, counts.get(kind, 1)))
            for kind, disk in disk_usage(plan).items()}


def _disk_lines(plan: Plan) -> list[str]:
    usage = disk_usage(plan)
    known = {kind: disk for kind, disk in usage.items() if disk is not None}
    parts = [f"{kind} {_bytes(disk.end)}" + (f" (peak {_bytes(disk.peak)})" if disk.peak != disk.end else "")
             for kind, disk in known.items() if disk.peak]
    end, peak = sum(d.end for d in known.values()), sum(d.peak for d in known.values())
    return [f"  disk, at the end (and at peak): {', '.join(parts)}; in all {_bytes(end)} (peak ≤ {_bytes(peak)}), "
            f"plus the token shards (2 bytes a token, 4 above a 65,536-token vocabulary)"]


def _bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError


# The GPU-hour estimate assumes this share of an H100/H200's dense bf16 peak (PyTorch-native FSDP trainers reach it).
_ASSUMED_MFU = 0.4
_GPU_PEAK_FLOPS = 989e12


def _job_lines(plan: Plan) -> list[str]:
    """Each multi-process or GPU stage kind's job shape, and the training compute in GPU-hours."""
    spec = plan.spec
    lines = []
    for kind in ("parent", "prune", "init", "train", "eval"):
        r = spec.resources.for_kind(kind)
        if r["ranks"] > 1 or r["gpus_per_node"]:
            where = f" partition {r['partition']}" if r["partition"] else ""
            lines.append(f"  {kind} jobs: {r['nodes']} node(s) × {r['tasks_per_node']} rank(s), "
                         f"{r['gpus_per_node']} GPU(s)/node, {r['mem_gb']:g} GB/node, {r['time_min']} min{where}")
    data = spec.resources.for_kind("data")
    if data["tasks"] > 1:
        lines.append(f"  data: 1 tokenizer job, then {data['tasks']} shard tasks (partitions of the corpus: one job "
                     f"array, {data['cpus']} process(es) each), then the data stage assembles the shards")
    train = spec.resources.for_kind("train")
    if train["gpus_per_node"] and (spec.parent.preset is not None or not spec.parent.pretrains):
        flops = _training_flops(plan)
        if flops is not None:
            gpu_hours = flops / (_ASSUMED_MFU * _GPU_PEAK_FLOPS) / 3600
            gpus = train["nodes"] * train["gpus_per_node"] * train["array_parallelism"]
            lines.append(f"  training compute: {flops:.2e} FLOPs (6·params·tokens) ≈ {gpu_hours:,.0f} GPU-hours at an "
                         f"assumed {_ASSUMED_MFU:.0%} MFU of {_GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s (H100 bf16); "
                         f"≈ {_duration(gpu_hours * 3600 / gpus)} with {train['array_parallelism']} train jobs at once "
                         f"({gpus} GPUs)")
    return lines


def _training_flops(plan: Plan, remaining: bool = False) -> float | None:
    """6·N·tokens over the train stages (``remaining``: what the run folder does not hold yet), N = the parent's
    parameters × the kept fraction of each cell."""
    if plan.spec.parent.preset is None:
        return None
    from gridlab.model import param_counts

    parent_params = param_counts(parent_config(plan.spec)).total
    kept_fraction = {c.train_stage: 1 - c.ratio for c in plan.cells}
    flops = 6 * parent_params * plan._parent_tokens(remaining=remaining)
    for stage in plan.train_stages():
        flops += 6 * parent_params * kept_fraction.get(stage.id, 1.0) * plan._stage_tokens(stage, remaining=remaining)
    return flops


def estimated_gpu_hours(plan: Plan, remaining: bool = False) -> float | None:
    """The plan's training in GPU-hours at the assumed MFU (what `gridlab plan` prints); None where there is no
    estimate: the grid's training runs without GPUs, or the parent declares no preset."""
    if not plan.spec.resources.for_kind("train")["gpus_per_node"]:
        return None
    flops = _training_flops(plan, remaining)
    return None if flops is None else flops / (_ASSUMED_MFU * _GPU_PEAK_FLOPS) / 3600


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 4 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"
