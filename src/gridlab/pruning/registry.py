"""The method registry, the result type and the checks every call goes through before a model is touched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from gridlab.contracts import Granularity
from gridlab.errors import InvalidValue
from gridlab.families import FAMILIES, SUPPORTED, check_supported


@dataclass
class PruneResult:
    model: PreTrainedModel  # the parent's family (gridlab.families)
    achieved_ratio: float  # fraction of decoder-layer parameters removed (zeros, for sparse methods)
    removed: Any  # depth: removed layer indices; width: kept indices per dimension; sparse: None
    mask: dict[str, torch.Tensor] | None  # sparse: parameter name -> bool tensor, True = kept
    method: str
    granularity: Granularity
    options: dict[str, Any]
    note: str | None = None  # anything the caller asked for that the method could not honour


@dataclass(frozen=True)
class Method:
    name: str
    granularity: Granularity
    # (model, ratio, calibration or None, options) -> PruneResult
    run: Callable[..., PruneResult]
    # (parent config, ratio, options) -> the pruned model's config, a new object (sparse: a copy of the parent's);
    # `run` builds its model's config through it
    config: Callable[[PretrainedConfig, float, dict], PretrainedConfig]
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_calibration: bool = True
    # extra checks on the resolved options; raise ValueError (gridlab.errors.InvalidValue naming the option)
    check_options: Callable[[dict], None] | None = None
    # checks of the resolved options against the parent's shapes (its config), run when the grid is planned
    check_shapes: Callable[[dict, PretrainedConfig], None] | None = None
    # visits the decoder layers one at a time, in order, so it can prune a parent whose layers stay on disk
    layerwise: bool = False
    # part of every prune stage id of this method: bump it when a change to the method changes what it computes
    # (its scores, its choices, its defaults), so exactly this method's stages and what depends on them rerun
    version: int = 1


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise RuntimeError(f"pruning method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"pruning ratio must be a number strictly between 0 and 1; got {ratio!r}")
    return float(ratio)


def check_against(method: Method, options: dict, parent_config: PretrainedConfig) -> None:
    """The method's own check of its (resolved) options against the parent it will prune."""
    if method.check_shapes is not None:
        method.check_shapes(options, parent_config)


def resolve_options(method: Method, options: dict) -> dict:
    unknown = sorted(set(options) - set(method.defaults))
    if unknown:
        valid = ", ".join(sorted(method.defaults)) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {method.name}; valid options: {valid}")
    resolved = {**method.defaults, **options}
    if method.check_options is not None:
        method.check_options(resolved)
    return resolved


def check_model(model) -> None:
    """A causal LM of a supported family (its own transformers class), whose layers all attend alike."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in FAMILIES or not isinstance(
            model, FAMILIES[config.model_type].model_class):
        raise ValueError(f"pruning needs a decoder-only causal LM of a supported family ({SUPPORTED}: "
                         f"transformers' *ForCausalLM of that model_type); got {type(model).__name__}")
    check_supported(config, "the model")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


def check_calibration(calibration, config: PretrainedConfig) -> torch.Tensor:
    if not isinstance(calibration, torch.Tensor) or calibration.dtype not in (torch.int32, torch.int64):
        raise ValueError("calibration must be an integer tensor of token ids shaped [n_sequences, seq_len]")
    if calibration.dim() != 2 or calibration.shape[0] < 1 or calibration.shape[1] < 2:
        raise ValueError(
            f"calibration must hold at least one sequence of >= 2 tokens, shaped [n_sequences, seq_len]; "
            f"got shape {tuple(calibration.shape)}"
        )
    if calibration.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"calibration sequences have {calibration.shape[1]} tokens; the model takes at most "
            f"{config.max_position_embeddings}"
        )
    if int(calibration.min()) < 0 or int(calibration.max()) >= config.vocab_size:
        raise ValueError(f"calibration token ids must lie in [0, {config.vocab_size}) (the model's vocabulary)")
    return calibration.long()


def check_nsamples(options: dict) -> None:
    n = options.get("nsamples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InvalidValue("nsamples", f"must be a positive integer or None (all calibration sequences); got {n!r}")
    b = options.get("batch_size")
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
        raise InvalidValue("batch_size", f"must be a positive integer; got {b!r}")
