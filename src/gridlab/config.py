"""The engine's configuration schemas: one pydantic definition per concern, validated once.

The grid file (``gridlab.spec``) composes these models, and the engine (``gridlab.train``) takes them as they are,
so a value that passes ``gridlab plan`` cannot fail later in a worker for being out of range.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator


def identity_fields(model: BaseModel, exclude: Iterable[str] = (), keep: Iterable[str] = ()) -> dict[str, Any]:
    """The fields of ``model`` that enter an identity (a stage's id, a trajectory's): every field but those in
    ``exclude`` and those at their default (exca's rule), so that adding a field with a default to a config keeps
    every id of what was computed without it. ``keep``: fields that enter even at their default (a variant's tag).
    A nested model enters by its own ``identity()`` when it has one, else by this rule; other values as JSON.

    The other side of the rule: changing a field's default changes what the configs at that default compute while
    their ids stay; whoever changes a default bumps the code version of what it changes (contracts.VERSION, or a
    pruning method's ``version``)."""
    exclude, keep = set(exclude), set(keep)
    defaults = _defaults(type(model))
    dumped = model.model_dump(mode="json")
    fields = {}
    for name in type(model).model_fields:
        if name in exclude:
            continue
        value = getattr(model, name)
        if name not in keep and name in defaults and value == defaults[name]:
            continue
        fields[name] = _identity_value(value, dumped[name])
    return fields


@functools.cache
def _defaults(model_class: type[BaseModel]) -> dict[str, Any]:
    """Each field's default (a factory's value), for the fields that have one; only ever compared with."""
    return {name: info.get_default(call_default_factory=True)
            for name, info in model_class.model_fields.items() if not info.is_required()}


def _identity_value(value: Any, dumped: Any) -> Any:
    if isinstance(value, BaseModel):
        own = getattr(value, "identity", None)
        return own() if callable(own) else identity_fields(value)
    if isinstance(value, (list, tuple)) and any(isinstance(item, BaseModel) for item in value):
        return [_identity_value(item, item_dumped) for item, item_dumped in zip(value, dumped, strict=True)]
    return dumped

_TOKEN_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_TOKEN_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)
_TOKEN_HELP = "a token count must be a number or a string like '40k', '1.5M', '2e6'"


def parse_tokens(value: Any, allow_zero: bool = False) -> int:
    """A token count: an integer, or a string with an optional k/M/B/T suffix ("40k", "1.5M", "2e6"); positive
    unless ``allow_zero``."""
    if isinstance(value, bool):
        raise ValueError(_TOKEN_HELP)
    if isinstance(value, int):
        number = float(value)
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        match = _TOKEN_PATTERN.match(value)
        if not match:
            raise ValueError(_TOKEN_HELP)
        number = float(match.group(1)) * _TOKEN_SUFFIXES[match.group(2).lower()]
    else:
        raise ValueError(_TOKEN_HELP)
    if not math.isfinite(number):
        raise ValueError("a token count must be a finite number of tokens")
    if number != int(number) or number < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"a token count must be a {kind} whole number of tokens")
    return int(value) if isinstance(value, int) else int(number)


# torch device strings a schedule may name (torch.device accepts these; "gpu" it does not).
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")

Tokens = Annotated[int, BeforeValidator(parse_tokens)]  # >= 1
TokensOrZero = Annotated[int, BeforeValidator(lambda value: parse_tokens(value, allow_zero=True))]


class Schedule(BaseModel):
    """How a model is trained: AdamW with a WSD schedule (every budget a branch of one trajectory) or independent
    cosine runs, and how the run executes (strategy, checkpoint cadence, what is kept).

    Strict: numbers must be finite, integers real integers (not 4.5, 4.0 or "4"), booleans real booleans; token
    counts also accept "40k"-style strings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    kind: Literal["wsd", "cosine"] = "wsd"
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # min lr = lr · min_lr_ratio
    warmup_tokens: TokensOrZero = 10_000
    decay_fraction: float = Field(0.2, gt=0, le=1)  # WSD: the decay takes this fraction of each branch's budget
    decay_shape: Literal["1-sqrt", "linear"] = "1-sqrt"
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    batch_size: int = Field(16, ge=1)  # sequences per optimizer step (the global batch over all ranks)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    weight_decay: float = Field(0.1, ge=0)  # on matrices only (not norms)
    log_every_steps: int = Field(10, ge=1)
    checkpoint_every_tokens: Tokens = 50_000
    strategy: Literal["fsdp", "ddp"] = "fsdp"  # how a multi-process job splits the model (one process: unused)
    activation_checkpointing: bool = False
    device: str | None = None  # None: cuda when available, else cpu
    # What stays of the checkpoint folder when training ends: "extendable" keeps only what a later call with more
    # budgets needs (WSD: the main state at the last fork; cosine: nothing), "all" keeps it, "none" deletes it.
    keep_checkpoints: Literal["extendable", "all", "none"] = "extendable"

    # Fields that change how a run executes but not its numbers: out of every identity, a checkpoint resumes
    # across them.
    EXECUTION_FIELDS: ClassVar[tuple[str, ...]] = (
        "strategy", "activation_checkpointing", "device", "log_every_steps", "checkpoint_every_tokens",
        "keep_checkpoints",
    )

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str | None) -> str | None:
        if value is not None and not _DEVICE.match(value):
            raise ValueError(f"{value!r} is not a torch device; valid: cpu, cuda, cuda:<index>, mps, xpu (leave it "
                             f"out: cuda when the job has a GPU, else cpu)")
        return value

    def identity(self) -> dict[str, Any]:
        """The fields the numbers depend on: everything but EXECUTION_FIELDS, and no field at its default."""
        return identity_fields(self, exclude=self.EXECUTION_FIELDS)
