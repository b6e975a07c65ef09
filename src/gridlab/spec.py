"""grid.toml → a validated GridSpec.

``load_grid`` reads the file (data only: nothing in it is evaluated), resolves its paths relative to it
(gridlab.gridfile) and validates it with pydantic. Every problem a user can put in the file becomes one
gridlab.errors.UserError line naming the file and the key path (``grid.toml: methods[2].ratios[0]: …``), the
offending value and, for an unknown key, the nearest valid one: validators raise ValueError, or InvalidValue to name
the key below them (``methods[0]`` → ``options.axes``), and ``_describe`` turns pydantic's first error into that line.
Checks that need more than the file (a method against the parent's real shapes) are the planner's (gridlab.plan).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from gridlab.config import Schedule, Tokens, parse_tokens  # noqa: F401  (parse_tokens: part of this module's API)
from gridlab.contracts import resource_table
from gridlab.data.schema import CorpusSource, SplitFractions, TokenizerConfig
from gridlab.errors import InvalidValue, UserError, in_grid_file
from gridlab.evaluate import check_tasks
from gridlab.families import family
from gridlab.gridfile import read_grid_file, resolve_grid_paths
from gridlab.model import PRESETS
from gridlab.pruning import METHODS
from gridlab.pruning.registry import resolve_options

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NM_SUFFIX = re.compile(r"^(?P<base>.+)-(?P<n>\d+):(?P<m>\d+)$")


class _Table(BaseModel):
    """A table of the grid file: unknown keys refused, frozen, finite floats. Types are lax (pydantic's default
    mode: "4" is taken for 4, and 4 for 4.0), unlike the engine's strict Schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# A seed is stored in DuckDB's INTEGER column and fed to torch.Generator.manual_seed.
MAX_SEED = 2**31 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


# Config fields that are sizes: positive integers.
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings")


def check_overrides(overrides: dict[str, Any], pretrains: bool, preset: dict[str, Any]) -> None:
    """parent.overrides against the real fields and types of the preset's family's config class (LlamaConfig,
    Qwen2Config, ...: gridlab.families), and the shape they give with the preset's own fields; one InvalidValue
    naming the key."""
    config_class = family(preset).config_class
    defaults = config_class().to_dict()
    for key, value in overrides.items():
        where = f"overrides.{key}"
        if key not in defaults or key.startswith("_") or key in ("transformers_version", "architectures",
                                                                  "model_type"):
            fields = [k for k in defaults if not k.startswith("_")]
            hint = difflib.get_close_matches(key, fields, n=1)
            did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
            raise InvalidValue(where, f"not a {config_class.__name__} field; {did_you_mean}e.g. "
                                      f"{', '.join(_SIZE_FIELDS[:5])}")
        if key == "vocab_size" and pretrains:
            raise InvalidValue(where, "a pretrained parent's vocabulary is its tokenizer's (tokenizer.vocab_size or "
                                      "tokenizer.path); remove it here")
        expected = defaults[key]
        if key in _SIZE_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValue(where, f"{value!r} is not a positive whole number")
        elif isinstance(expected, bool):
            if not isinstance(value, bool):
                raise InvalidValue(where, f"{value!r} is not true or false")
        elif isinstance(expected, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidValue(where, f"{value!r} is not a finite number")
        elif isinstance(expected, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidValue(where, f"{value!r} is not a whole number")
        elif isinstance(expected, str):
            if not isinstance(value, str):
                raise InvalidValue(where, f"{value!r} is not a string ({config_class.__name__}.{key} is, e.g. "
                                          f"{expected!r})")
        _check_field_type(config_class, key, value, where)
    shape = {**preset, **overrides}
    hidden, heads, kv = (shape.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if heads and kv and heads % kv:
        raise InvalidValue("overrides", f"num_key_value_heads {kv} does not divide num_attention_heads {heads}")
    if family(preset).hidden_multiple_of_heads and hidden and heads and hidden % heads:
        raise InvalidValue("overrides", f"num_attention_heads {heads} does not divide hidden_size {hidden}")


def _check_field_type(config_class, key: str, value: Any, where: str) -> None:
    """The config class's own type check of one field (transformers' strict dataclass validation: e.g. an int for
    a float field, a string for Qwen2Config.sliding_window)."""
    try:
        config_class(**{key: copy.deepcopy(value)})  # a copy: transformers fills in a rope_parameters table in place
    except StrictDataclassFieldValidationError as error:
        cause = error.__cause__ or error
        reason = str(cause).splitlines()[0].split(". Errors:")[0]
        raise InvalidValue(where, f"{value!r} is refused by {config_class.__name__}: {reason}") from None
    except KeyError as error:  # rope_parameters without the keys its rope_type needs
        raise InvalidValue(where, f"{value!r} is refused by {config_class.__name__}: {error.args[0]}") from None
    except (StrictDataclassClassValidationError, ValueError, TypeError):
        pass  # a check across fields, made with the preset's other fields below and by make_config


class ParentSpec(_Table):
    """Either pretrain a preset for ``tokens`` tokens, or load ``path`` and declare what it cost (``tokens``).
    A loaded parent may also name the preset (and overrides, e.g. ``vocab_size``) its architecture matches, so the
    plan is built without fetching the parent's config. The parent has its own schedule, so tuning the retraining
    schedule never re-pretrains the parent."""

    preset: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None
    tokens: Tokens
    seed: Seed = 0
    schedule: Schedule = Schedule()

    @model_validator(mode="after")
    def _one_source(self) -> ParentSpec:
        if self.preset is None and self.path is None:
            raise ValueError("give parent.preset (pretrain) or parent.path (load a pretrained model)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        if self.preset is None and self.overrides:
            raise ValueError("parent.overrides change a preset's shape; give parent.preset too")
        check_overrides(self.overrides, self.pretrains, PRESETS[self.preset] if self.preset else {})
        if self.pretrains and self.schedule.warmup_tokens >= self.tokens:
            raise ValueError(f"parent.schedule.warmup_tokens ({self.schedule.warmup_tokens}) must be below "
                             f"parent.tokens ({self.tokens})")
        return self

    @property
    def pretrains(self) -> bool:
        """True when the grid pretrains this parent; False when it loads ``path``."""
        return self.path is None


# ------------------------------------------------------------------------------------------- retraining recipes

# The arms a grid may train: the pruned model, its random-init twin, and the twin with the parent's trained token
# embeddings, final norm and lm_head (the embeddings control).
ARMS = ("pruned", "random", "embeddings")


def _learning_rates(value: Any) -> tuple[float, ...]:
    """``lr``: one peak learning rate, or a list of them (a sweep: every arm × architecture × budget runs at each)."""
    values = value if isinstance(value, list | tuple) else [value]
    if not values:
        raise ValueError("an empty list of learning rates; give one lr or a list of them, e.g. [1e-3, 3e-3, 1e-2]")
    rates = []
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item) or item <= 0:
            raise ValueError(f"{item!r} is not a learning rate: give a positive finite number (or a list of them)")
        rates.append(float(item))
    _unique(rates, "lr")
    return tuple(rates)


LearningRates = Annotated[tuple[float, ...], BeforeValidator(_learning_rates)]


def _schedule_fields(optional: bool) -> dict[str, Any]:
    """config.Schedule's fields, with ``lr`` a list of learning rates (LearningRates); ``optional``: every field
    None by default (an arm's table overrides only what it gives). One definition: the types and bounds are
    Schedule's own."""
    fields: dict[str, Any] = {}
    for name, info in Schedule.model_fields.items():
        if name == "lr":
            annotation = LearningRates
        else:
            annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        default = (info.default,) if name == "lr" else info.default
        fields[name] = (annotation | None, None) if optional else (annotation, default)
    return fields


class _Recipes(BaseModel):
    """What ScheduleSpec adds to Schedule's fields: the arms' own tables, and each arm's resolved schedules."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def table(self, arm: str) -> BaseModel | None:
        """The table an arm follows: its own; the embeddings arm without one follows the random arm's."""
        own = getattr(self, arm)
        return self.random if own is None and arm == "embeddings" else own

    def recipe(self, arm: str) -> tuple[dict[str, Any], tuple[float, ...]]:
        """The arm's schedule fields but lr ([schedule] with its table's keys over it), and its learning rates."""
        fields = {name: getattr(self, name) for name in Schedule.model_fields if name != "lr"}
        own = self.table(arm)
        given = {} if own is None else {name: getattr(own, name) for name in own.model_fields_set}
        rates = given.pop("lr", None) or self.lr
        return {**fields, **{k: v for k, v in given.items() if v is not None}}, rates

    def schedules(self, arm: str) -> tuple[Schedule, ...]:
        """One Schedule per learning rate of the arm, in the order given: what its train stages take. An override
        equal to [schedule]'s value gives the same Schedule, so it changes no id."""
        fields, rates = self.recipe(arm)
        return tuple(Schedule(**fields, lr=lr) for lr in rates)

    def lrs(self, arm: str) -> tuple[float, ...]:
        return self.recipe(arm)[1]

    @property
    def base(self) -> Schedule:
        """[schedule] itself (at its first lr), without the arms' tables."""
        fields = {name: getattr(self, name) for name in Schedule.model_fields if name != "lr"}
        return Schedule(**fields, lr=self.lr[0])

    @model_validator(mode="after")
    def _every_recipe_valid(self) -> _Recipes:
        """Each arm's resolved schedule passes Schedule's own checks (e.g. the device), named at the arm's key."""
        for arm in ARMS:
            fields, rates = self.recipe(arm)
            try:
                Schedule(**fields, lr=rates[0])
            except ValidationError as error:
                first = error.errors()[0]
                key = ".".join(str(part) for part in first["loc"])
                own = self.table(arm)
                where = f"{arm}.{key}" if own is not None and first["loc"][0] in own.model_fields_set else key
                raise InvalidValue(where, first["msg"].removeprefix("Value error, ")) from None
        return self


# An arm's table, [schedule.pruned] / [schedule.random] / [schedule.embeddings]: any key of [schedule], given ones only.
ArmSchedule = create_model("ArmSchedule", __config__=_Recipes.model_config, **_schedule_fields(optional=True))
# The grid's [schedule]: config.Schedule's keys (lr may be a list: a sweep), and one optional table per arm.
ScheduleSpec = create_model("ScheduleSpec", __base__=_Recipes, **_schedule_fields(optional=False),
                            **{arm: (ArmSchedule | None, None) for arm in ARMS})


class InitSpec(_Table):
    """How random twins are drawn. ``sparse``: a sparse twin's surviving weights with std 0.02/√(density of their
    row) ("scaled", so each unit's fan-in variance is the dense init's), or the dense draw masked ("dense")."""

    sparse: Literal["scaled", "dense"] = "scaled"


# One definition of each data config (gridlab.data.schema); the grid file's tables are these classes.
CorpusSpec = CorpusSource
SplitsSpec = SplitFractions
TokenizerSpec = TokenizerConfig


class CalibrationSpec(_Table):
    sequences: int = Field(32, ge=1)
    # prune with the parent's decoder layers left on disk, one in memory at a time (methods that support it)
    layerwise: bool = False


class MethodSpec(_Table):
    """One pruning method of gridlab.pruning.METHODS with its options, named two ways: ``name``, the registry's
    name, and ``label``, what the results call it (grid.toml's ``label``, default: the name as written there).
    ``ratios`` overrides the grid's. N:M sparsity (options.nm = "2:4", or a name like "wanda-2:4", read as name
    "wanda", options.nm "2:4", label "wanda-2:4") prunes at its own ratio N/M only."""

    name: str
    label: str
    options: dict[str, Any] = Field(default_factory=dict)
    ratios: list[Annotated[float, Field(gt=0, lt=1)]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _names(cls, raw: Any) -> Any:
        """Split an N:M suffix off the name into options.nm; the label defaults to the name as written."""
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            return raw
        raw = dict(raw)
        written = raw["name"]
        label = raw.get("label")
        if label is None:
            raw["label"] = written
        elif not isinstance(label, str) or not _NAME_PATTERN.match(label):
            raise InvalidValue("label", f"{label!r} is not a label: use letters, digits, '_', '.' and '-', "
                                        f"starting with a letter or digit")
        match = _NM_SUFFIX.match(written)
        if match:
            options = raw.get("options") or {}
            if isinstance(options, dict) and "nm" in options:
                raise ValueError(f"{written!r} already names its N:M pattern; remove options.nm")
            raw["name"] = match["base"]
            raw["options"] = {**options, "nm": f"{match['n']}:{match['m']}"} if isinstance(options, dict) else options
        return raw

    @field_validator("ratios")
    @classmethod
    def _some_ratios(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not value:
            raise ValueError("an empty list would drop this method from the grid; give at least one ratio, or leave "
                             "the key out to use the grid's ratios")
        return value

    @property
    def fixed_ratio(self) -> float | None:
        nm = self.options.get("nm")
        if nm is None:
            return None
        n, m = (int(part) for part in str(nm).split(":"))
        return n / m

    @model_validator(mode="after")
    def _known_method(self) -> MethodSpec:
        if self.name not in METHODS:
            hint = difflib.get_close_matches(self.name, list(METHODS), n=1)
            did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
            raise ValueError(f"unknown pruning method {self.label!r}; {did_you_mean}valid methods: "
                             f"{', '.join(sorted(METHODS))}")
        try:
            resolve_options(METHODS[self.name], self.options)
        except InvalidValue as bad:
            raise InvalidValue(f"options.{bad.key}", bad.message) from None
        if self.fixed_ratio is not None and self.ratios is not None:
            raise ValueError(f"{self.label!r} prunes at its own ratio {self.fixed_ratio:g} (N:M); remove 'ratios'")
        return self


class EvalCorpusSpec(CorpusSource):
    """An extra held-out corpus, reported as eval/<label>/loss."""

    label: str = Field(pattern=_NAME_PATTERN.pattern)


class EvaluationSpec(_Table):
    # The held-out sample (gridlab.evaluate.sample_windows): max_sequences windows of seq_len tokens, at most
    # windows_per_document of each validation document, documents in a seeded hash order (a split that holds no more
    # windows is used whole). See docs/engine.md (Evaluation) for the choice of both.
    max_sequences: int | None = Field(default=512, ge=1)
    windows_per_document: int = Field(1, ge=1)
    sample_seed: int = Field(0, ge=0)   # which documents and windows the sample holds (the same for every model)
    corpora: list[EvalCorpusSpec] = Field(default_factory=list)
    lm_eval_tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _known_tasks(self) -> EvaluationSpec:
        try:
            check_tasks(self.lm_eval_tasks)
        except InvalidValue as bad:
            raise InvalidValue(f"lm_eval_tasks{bad.key}", bad.message) from None
        return self


# SLURM's --mail-type values (sbatch(1)); a comma-separated list of them is valid.
MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT", "TIME_LIMIT",
              "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
# sbatch options gridlab sets itself (so it can find, log, chain and requeue its jobs): not allowed in `sbatch`.
_OWNED_SBATCH_OPTIONS = ("job-name", "array", "dependency", "output", "error", "open-mode", "signal")
# sbatch options with a typed key of their own: `sbatch` must not set them behind that key's back.
_TYPED_SBATCH_OPTIONS = {
    "nodes": "nodes", "gpus-per-node": "gpus_per_node", "ntasks-per-node": "tasks_per_node", "cpus-per-task": "cpus",
    "mem": "mem_gb", "time": "time_min", "partition": "partition", "account": "account", "qos": "qos",
    "constraint": "constraint", "gres": "gres", "exclude": "exclude", "nodelist": "nodelist",
    "reservation": "reservation", "mail-type": "mail_type", "mail-user": "mail_user", "comment": "comment",
}
_SBATCH_OPTION = re.compile(r"^[a-z][a-z0-9_-]*$")
_GRES = re.compile(r"^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*(,[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*)*$")


def _one_line(value: str | None, what: str) -> str | None:
    if value is not None and ("\n" in value or "\r" in value or not value.strip()):
        raise ValueError(f"{what} must be one non-empty line")
    return value


class ResourceSpec(_Table):
    """What one stage job asks the scheduler for. Unset keys of a per-kind table fall back to [resources.default].
    ``cpus`` and ``mem_gb`` are per task and per node; a job runs ``nodes × tasks_per_node`` processes (ranks).
    Site options (qos … comment) go to sbatch as they are; ``setup`` lines run in the job script before the stage;
    ``sbatch`` is a table of any other sbatch options (``{ exclusive = true, "mem-bind" = "local" }``).
    ``tasks`` ([resources.data] only): tokenize the corpus as that many partition tasks (a SLURM array, or the local
    workers) after a tokenizer job, then assemble the shards; the shards are the same bytes whatever it is."""

    nodes: int | None = Field(default=None, ge=1)
    gpus_per_node: int | None = Field(default=None, ge=0)
    tasks_per_node: int | None = Field(default=None, ge=1)
    cpus: int | None = Field(default=None, ge=1)
    mem_gb: float | None = Field(default=None, gt=0)
    time_min: int | None = Field(default=None, ge=1)
    partition: str | None = None
    account: str | None = None
    array_parallelism: int | None = Field(default=None, ge=1)
    qos: str | None = None
    constraint: str | None = None
    gres: str | None = None
    exclude: str | None = None
    nodelist: str | None = None
    reservation: str | None = None
    mail_type: str | None = None
    mail_user: str | None = None
    comment: str | None = None
    setup: list[str] | None = None
    sbatch: dict[str, str | int | float | bool] | None = None
    tasks: int | None = Field(default=None, ge=1)

    @field_validator("partition", "account", "qos", "exclude", "nodelist", "reservation", "mail_user")
    @classmethod
    def _one_word(cls, value: str | None, info) -> str | None:
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise ValueError(f"{info.field_name} must be one word without spaces")
        return value

    @field_validator("gres")
    @classmethod
    def _gres(cls, value: str | None) -> str | None:
        if value is not None and not _GRES.match(value):
            raise ValueError("not a SLURM gres list; e.g. \"gpu:2\", \"gpu:a100:4\", "
                             "\"gpu:1,nvme:1\"")
        return value

    @model_validator(mode="after")
    def _site_options(self) -> ResourceSpec:
        _one_line(self.constraint, "constraint")
        _one_line(self.comment, "comment")
        if self.mail_type is not None:
            unknown = [t for t in self.mail_type.split(",") if t.strip().upper() not in MAIL_TYPES]
            if unknown:
                raise ValueError(f"mail_type {unknown[0]!r} is not a SLURM mail type; valid: {', '.join(MAIL_TYPES)} "
                                 f"(several: \"END,FAIL\")")
        for index, line in enumerate(self.setup or []):
            if "\n" in line or "\r" in line:
                raise ValueError(f"setup[{index}] holds a line break; give each shell line as its own list item")
        for key, value in (self.sbatch or {}).items():
            option = key.replace("_", "-")
            if not _SBATCH_OPTION.match(key):
                raise ValueError(f"sbatch option {key!r} is not a long sbatch option name (e.g. \"exclusive\", "
                                 f"\"mem-bind\"; no leading dashes)")
            if option in _OWNED_SBATCH_OPTIONS:
                raise ValueError(f"sbatch option {key!r} is set by gridlab itself and cannot be changed; options it "
                                 f"owns: {', '.join(_OWNED_SBATCH_OPTIONS)}")
            if option in _TYPED_SBATCH_OPTIONS:
                raise ValueError(f"sbatch option {key!r} has a key of its own: set {_TYPED_SBATCH_OPTIONS[option]} "
                                 f"= … in this table instead")
            if value is False:
                raise ValueError(f"sbatch option {key!r} = false: leave the option out instead (true gives a bare "
                                 f"--{option})")
            if isinstance(value, str):
                _one_line(value, f"sbatch option {key!r}")
        return self


_RESOURCE_DEFAULTS = ResourceSpec(nodes=1, gpus_per_node=0, cpus=1, mem_gb=2.0, time_min=60, array_parallelism=64)
# Stages that run as one process; only training (train, a pretrained parent) runs as many ranks.
_SINGLE_PROCESS_KINDS = ("data", "prune", "init", "eval")


class ResourcesSpec(_Table):
    default: ResourceSpec = _RESOURCE_DEFAULTS
    data: ResourceSpec = ResourceSpec()
    parent: ResourceSpec = ResourceSpec()
    prune: ResourceSpec = ResourceSpec()
    init: ResourceSpec = ResourceSpec()
    train: ResourceSpec = ResourceSpec()
    eval: ResourceSpec = ResourceSpec()

    def for_kind(self, kind: str) -> dict[str, Any]:
        """The merged resources of a stage kind: its table's keys over [resources.default]'s over the built-in
        defaults (``sbatch`` tables are merged key by key; ``setup`` of the kind replaces the default's).
        ``tasks_per_node`` defaults to ``gpus_per_node`` (one rank per GPU), or 1 without GPUs, and ``ranks`` is the
        job's world size. The data stage's tasks (kinds tokenizer and shard) ask for [resources.data]; ``tasks``
        is how many shard tasks the data stage's tokenization is split into (1: it runs in the data stage)."""
        merged = _RESOURCE_DEFAULTS.model_dump()
        for layer in (self.default, getattr(self, resource_table(kind))):
            for key, value in layer.model_dump().items():
                if value is None:
                    continue
                merged[key] = {**(merged.get(key) or {}), **value} if key == "sbatch" else value
        if merged["tasks_per_node"] is None:
            merged["tasks_per_node"] = merged["gpus_per_node"] or 1
        merged["ranks"] = merged["nodes"] * merged["tasks_per_node"]
        merged["tasks"] = merged["tasks"] or 1
        return merged

    @model_validator(mode="after")
    def _multi_process_only_for_training(self) -> ResourcesSpec:
        for kind in _SINGLE_PROCESS_KINDS:
            ranks = self.for_kind(kind)["ranks"]
            if ranks > 1:
                raise ValueError(f"resources.{kind} asks for {ranks} processes (nodes × tasks_per_node), but {kind} "
                                 f"stages run as one process; only train and parent stages run as many ranks "
                                 f"(set tasks_per_node = 1 and nodes = 1 for {kind}, e.g. in [resources.{kind}])")
        for table in ("default", *(kind for kind in type(self).model_fields if kind not in ("default", "data"))):
            tasks = getattr(self, table).tasks
            if tasks is not None:
                raise InvalidValue(f"{table}.tasks", f"{tasks} given, but only [resources.data] takes tasks (the "
                                   f"number of partition tasks the data stage's tokenization is split into); "
                                   f"remove it here")
        return self


class ReportSpec(_Table):
    """How `gridlab report` judges the gaps; read back from the grid's stored spec, never part of a stage's id."""

    # The margin δ of the equivalence test: the smallest gap in the headline metric's units that matters, declared
    # before looking. 0.02 nats of loss is 2 % of perplexity (docs/report.md).
    margin: float = Field(0.02, gt=0)
    margins: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)  # per metric name


class AdaptiveSpec(_Table):
    """`gridlab submit --adaptive` (gridlab.adaptive): once the grid's cells are done, rounds that add the next seed
    where a verdict is still inconclusive and a budget where a crossover is bracketed, until every verdict is
    decided, a cap is reached, or nothing more can change a verdict. Never part of a stage's id."""

    # The equivalence margin: the [report] one (one definition). Given here too, it must agree with [report]; given
    # only here, it becomes [report]'s (GridSpec._one_margin).
    margin: float | None = Field(None, gt=0)
    metric: str = "val_loss"  # the headline metric the verdicts judge
    max_seeds: int = Field(8, ge=2, le=1000)  # per cell: the last look of the sequential design
    max_tokens: Tokens | None = None  # what the rounds may train in all; default: as much as the grid's own cells
    max_gpu_hours: float | None = Field(None, gt=0)  # the same in estimated GPU-hours (grids whose training has GPUs)
    max_budget: Tokens | None = None  # the largest budget a round may add; default: 4 × the grid's largest
    spending: Literal["pocock", "obrien-fleming"] = "pocock"  # Lan–DeMets alpha spending over the looks
    min_bracket: float = Field(1.5, gt=1)  # a crossover bracketed by budgets within this ratio is not narrowed
    # an open cell gets no more seeds when, at its current estimate, even max_seeds would decide it with less than
    # this chance (futility; 0: never stop a cell for it)
    futility: float = Field(0.1, ge=0, lt=1)


class LocalSpec(_Table):
    """The local executor: parallel worker processes sharing this machine's cores (cores ÷ workers threads each)."""

    workers: int = Field(2, ge=1)


class ExcludeRule(_Table):
    """Cells matching every key given here are left out of the grid."""

    method: str | None = None
    ratio: float | None = None
    init: Literal["pruned", "random"] | None = None
    budget: Tokens | None = None
    setting: Literal[1, 2] | None = None
    seed: Seed | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> ExcludeRule:
        if all(value is None for value in self.model_dump().values()):
            raise ValueError("an exclude rule needs at least one of: " + ", ".join(ExcludeRule.model_fields))
        return self

    def matches(self, cell: dict[str, Any]) -> bool:
        return all(
            value is None or (abs(cell[key] - value) < 1e-9 if key == "ratio" else cell[key] == value)
            for key, value in self.model_dump().items()
        )


def _unique(values: list, what: str) -> None:
    duplicates = sorted({str(v) for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"{what} lists {', '.join(duplicates)} more than once")


# A grid's name is a folder name (runs/<name>) and part of SLURM job names.
MAX_NAME_LENGTH = 100


def _folder_name(value: Any) -> Any:
    """A name that becomes a folder: letters, digits, '_', '.', '-', starting with a letter or digit; not too long."""
    if isinstance(value, str):
        if not _NAME_PATTERN.match(value):
            raise ValueError(f"{value!r} cannot name a folder: use letters, digits, '_', '.' and '-', starting with a "
                             f"letter or digit")
        if len(value) > MAX_NAME_LENGTH:
            raise ValueError(f"{len(value)} characters is too long for a folder and a SLURM job name: at most "
                             f"{MAX_NAME_LENGTH}")
    return value


FolderName = Annotated[str, BeforeValidator(_folder_name)]


class GridSpec(_Table):
    name: FolderName
    runs_dir: str = "runs"
    seq_len: int = Field(ge=8, le=1 << 20)
    parent: ParentSpec
    corpus: CorpusSpec
    splits: SplitsSpec = SplitsSpec()
    tokenizer: TokenizerSpec
    calibration: CalibrationSpec = CalibrationSpec()
    methods: list[MethodSpec] = Field(min_length=1)
    ratios: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=list)
    inits: list[Literal["pruned", "random", "embeddings"]] = Field(default_factory=lambda: ["pruned", "random"],
                                                                   min_length=1)
    budgets: list[Tokens] = Field(min_length=1)
    settings: list[Literal[1, 2]] = Field(default_factory=lambda: [1, 2], min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
    schedule: ScheduleSpec = ScheduleSpec()
    init: InitSpec = InitSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    local: LocalSpec = LocalSpec()
    report: ReportSpec = ReportSpec()
    adaptive: AdaptiveSpec | None = None
    exclude: list[ExcludeRule] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _one_margin(cls, raw: Any) -> Any:
        """[adaptive] margin and [report] margin are one definition: a margin given only in [adaptive] becomes the
        report's; given in both, they must agree."""
        adaptive = raw.get("adaptive") if isinstance(raw, dict) else None
        if not isinstance(adaptive, dict) or adaptive.get("margin") is None:
            return raw
        report = raw.get("report") if isinstance(raw.get("report"), dict) else {}
        metric = adaptive.get("metric", "val_loss")
        margins = report.get("margins") if isinstance(report.get("margins"), dict) else {}
        key, declared = (f"report.margins.{metric}", margins[metric]) if metric in margins else (
            "report.margin", report.get("margin"))
        if declared is None:
            return {**raw, "report": {**report, "margin": adaptive["margin"]}}
        if declared != adaptive["margin"]:
            raise InvalidValue("adaptive.margin", f"{adaptive['margin']!r} differs from {key} = {declared!r}: the "
                                                  f"adaptive study's verdicts and the report's use one margin; give it "
                                                  f"once, in [report] (or the same value in both)")
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> GridSpec:
        if not self.parent.pretrains and self.tokenizer.vocab_size is not None:
            raise InvalidValue("tokenizer.vocab_size", "a loaded parent (parent.path) reads text with the tokenizer "
                                                       "it was trained with; a tokenizer gridlab trains would not "
                                                       "match its vocabulary: give tokenizer.path (e.g. the parent's "
                                                       "own folder, as parent.path) instead")
        _unique([m.label for m in self.methods], "methods (by label)")
        for key in ("ratios", "inits", "budgets", "settings", "seeds"):
            _unique(getattr(self, key), key)
        if not self.ratios and any(m.ratios is None and m.fixed_ratio is None for m in self.methods):
            raise ValueError("ratios is empty and some methods have no ratios of their own")
        _unique([c.label for c in self.evaluation.corpora], "evaluation.corpora (by label)")
        labels = [m.label for m in self.methods]
        for index, rule in enumerate(self.exclude):
            if rule.method is not None and rule.method not in labels:
                raise ValueError(f"exclude[{index}].method {rule.method!r} names no method; "
                                 f"methods: {', '.join(labels)}")
            if rule.budget is not None and rule.budget not in self.budgets:
                raise ValueError(f"exclude[{index}].budget {rule.budget} is not one of the budgets")
        ranks = self.resources.for_kind("parent")["ranks"]
        if ranks > 1 and self.parent.schedule.batch_size % ranks:
            raise ValueError(f"parent.schedule.batch_size {self.parent.schedule.batch_size} does not split over the "
                             f"{ranks} ranks of resources.parent; give a multiple of {ranks}")
        ranks = self.resources.for_kind("train")["ranks"]
        for arm in self.inits:
            schedule = self.schedule.schedules(arm)[0]
            batch = self.schedule_key(arm, "batch_size")
            if ranks > 1 and schedule.batch_size % ranks:
                raise ValueError(f"{batch} {schedule.batch_size} does not split over the {ranks} ranks of "
                                 f"resources.train; give a multiple of {ranks}")
            batch_tokens = schedule.batch_size * self.seq_len
            if min(self.budgets) < batch_tokens:
                raise ValueError(f"budget {min(self.budgets)} is smaller than one batch ({batch} × seq_len = "
                                 f"{batch_tokens} tokens)")
            if schedule.warmup_tokens >= min(self.budgets):
                raise ValueError(f"{self.schedule_key(arm, 'warmup_tokens')} ({schedule.warmup_tokens}) must be "
                                 f"below the smallest budget ({min(self.budgets)})")
        if self.adaptive is not None:
            if self.adaptive.max_seeds < len(self.seeds):
                raise InvalidValue("adaptive.max_seeds", f"{self.adaptive.max_seeds} is fewer than the grid's "
                                                         f"{len(self.seeds)} seeds; give at least {len(self.seeds)}")
            if self.adaptive.max_budget is not None and self.adaptive.max_budget < max(self.budgets):
                raise InvalidValue("adaptive.max_budget", f"{self.adaptive.max_budget} is below the grid's largest "
                                                          f"budget {max(self.budgets)}; give at least that")
            if self.sweeps:
                raise InvalidValue("adaptive", "a grid that sweeps learning rates (an lr list) cannot run adaptively: "
                                               "each look would choose the lrs anew, which the sequential design "
                                               "does not account for; run the sweep first, then give each arm its "
                                               "chosen lr")
        return self

    def schedule_key(self, arm: str, key: str) -> str:
        """Where an arm's value of ``key`` is written: the table it follows when that table gives it (the embeddings
        arm without a table of its own follows [schedule.random]), else [schedule]."""
        own = self.schedule.table(arm)
        if own is None or key not in own.model_fields_set:
            return f"schedule.{key}"
        return f"schedule.{arm if getattr(self.schedule, arm) is not None else 'random'}.{key}"

    def schedules(self, arm: str) -> tuple[Schedule, ...]:
        """The arm's retraining schedules, one per learning rate (gridlab.config.Schedule: what train stages take)."""
        return self.schedule.schedules(arm)

    @property
    def sweeps(self) -> bool:
        """True when some arm of the grid trains at more than one learning rate: its evaluations then measure the
        held-out loss on two disjoint halves of the validation documents (val_loss/select chooses each arm's lr,
        val_loss is reported), so the choice never reads the documents the reported loss is measured on."""
        return any(len(self.schedule.lrs(arm)) > 1 for arm in self.inits)

    def method_ratios(self, method: MethodSpec) -> list[float]:
        if method.fixed_ratio is not None:
            return [method.fixed_ratio]
        return list(method.ratios if method.ratios is not None else self.ratios)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def load_grid(path: str | Path) -> GridSpec:
    """Read and validate a grid file; every problem is one UserError line naming the file and the key path. Every
    path in the grid is relative to the file (gridlab.gridfile)."""
    raw = read_grid_file(path)
    with in_grid_file(path):
        raw = resolve_grid_paths({"runs_dir": "runs", **raw}, path)
    return parse_grid(raw, source=str(path))


def parse_grid(raw: dict[str, Any], source: str = "grid") -> GridSpec:
    try:
        return GridSpec.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{source}: {_describe(error.errors()[0])}") from None


def _describe(error: dict[str, Any]) -> str:
    loc = error["loc"]
    path = _key_path(loc)
    if error["type"] == "extra_forbidden":
        valid = _valid_keys(loc[:-1])
        nearest = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean {nearest[0]!r}? " if nearest else ""
        return f"{path}: unknown key; {hint}valid keys here: {', '.join(valid)}"
    if error["type"] == "missing":
        given = error.get("input")
        valid = set(_valid_keys(loc[:-1]))
        strays = [key for key in given if key not in valid] if isinstance(given, dict) else []
        nearest = difflib.get_close_matches(str(loc[-1]), strays, n=1, cutoff=0.6)
        if nearest:
            return f"{path}: required key is missing; the grid has {nearest[0]!r}: did you mean {str(loc[-1])!r}?"
        return f"{path}: required key is missing"
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, InvalidValue):  # a validator named the key below it (methods[0] → options.axes)
        return f"{path}.{cause.key}: {cause.message}" if path else f"{cause.key}: {cause.message}"
    message = error["msg"].removeprefix("Value error, ")
    where = f"{path}: " if path else ""
    if error["type"].startswith(("value_error", "assertion_error")) and "input" in error and isinstance(
        error["input"], dict
    ):
        return f"{where}{message}"
    shown = repr(error.get("input"))
    if shown in message:
        return f"{where}{message}"
    return f"{where}{message} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"


def _key_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_validator_tag(part):
            path += f".{part}" if path else str(part)
    return path


def _is_validator_tag(part: str) -> bool:
    # pydantic inserts the validator or union member name into loc for some errors, e.g. 'function-before[...]'.
    return "[" in part or part in {"int", "float", "str", "literal", "list", "dict"}


def _valid_keys(loc: tuple) -> list[str]:
    """The field names of the model found by walking ``loc`` down from GridSpec."""
    model: Any = GridSpec
    for part in loc:
        if isinstance(part, int) or _is_validator_tag(str(part)):
            continue
        annotation = model.model_fields[part].annotation
        model = _model_in(annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
