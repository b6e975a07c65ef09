"""The model families gridlab prunes: the one registry every stage asks which transformers classes a model uses and
which tensors its decoder layers hold beyond Llama's.

A family is a transformers ``model_type`` whose decoder layer is Llama's: RMSNorm before attention and before the MLP,
rotary grouped-query attention with q/k/v/o projections, a gated MLP (gate/up/down), one shape for every layer. The
families differ only in what this module describes:

  llama    biases on q/k/v/o when ``attention_bias``, on gate/up/down when ``mlp_bias`` (published Llamas: none)
  mistral  Llama's layout; a ``sliding_window`` every layer attends within (a config value, no tensor)
  qwen2    (Qwen2 and Qwen2.5) q, k and v projections always carry biases; o and the MLP none
  qwen3    per-head RMSNorms ``q_norm`` / ``k_norm`` of size head_dim on queries and keys; head_dim is a config
           field independent of hidden_size / heads; biases on q/k/v/o only when ``attention_bias`` (published: none)

What each pruning method does with the extra tensors is written where the method is (gridlab.pruning.depth, width,
sparse) and summed up in docs/pruning.md ("Families").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gridlab.errors import UserError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str
    name: str
    config_class: type[PretrainedConfig]
    model_class: type  # the class AutoModelForCausalLM picks for config_class
    # the projections (of gridlab.model.DECODER_WEIGHTS) that carry a bias in a model of this config
    biases: Callable[[PretrainedConfig], frozenset[str]]
    # per-head RMSNorms on queries and keys (self_attn.q_norm / k_norm, head_dim weights each)
    qk_norm: bool = False
    # the config class refuses a hidden_size that is not a multiple of num_attention_heads (even with head_dim set)
    hidden_multiple_of_heads: bool = False


def _llama_biases(config) -> frozenset[str]:
    return frozenset((ATTENTION_PROJECTIONS if getattr(config, "attention_bias", False) else ())
                     + (MLP_PROJECTIONS if getattr(config, "mlp_bias", False) else ()))


def _attention_biases(config) -> frozenset[str]:
    return frozenset(ATTENTION_PROJECTIONS if getattr(config, "attention_bias", False) else ())


FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("llama", "Llama", LlamaConfig, LlamaForCausalLM, _llama_biases, hidden_multiple_of_heads=True),
    Family("mistral", "Mistral", MistralConfig, MistralForCausalLM, lambda config: frozenset()),
    Family("qwen2", "Qwen2 / Qwen2.5", Qwen2Config, Qwen2ForCausalLM,
           lambda config: frozenset(("q_proj", "k_proj", "v_proj"))),
    Family("qwen3", "Qwen3", Qwen3Config, Qwen3ForCausalLM, _attention_biases, qk_norm=True),
)}
SUPPORTED = ", ".join(FAMILIES)


def family(config_or_type: PretrainedConfig | dict | str) -> Family:
    """The family of a config (object or dict) or model_type; a one-line UserError naming the supported ones."""
    if isinstance(config_or_type, str):
        model_type = config_or_type
    elif isinstance(config_or_type, dict):
        model_type = config_or_type.get("model_type", "llama")
    else:
        model_type = getattr(config_or_type, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"model_type {model_type!r} is not a family gridlab prunes; supported model types: "
                        f"{SUPPORTED} (Llama, Mistral, Qwen2/Qwen2.5, Qwen3)")
    return FAMILIES[model_type]


def check_supported(config: PretrainedConfig, where: str = "the parent") -> Family:
    """The family of a parent's config, refusing in one line what gridlab cannot prune: another model_type, or
    layers of mixed attention types (a Qwen2/Qwen3 config with use_sliding_window and max_window_layers below its
    depth: the sequential calibration flow replays one attention mask for every layer, and depth pruning could not
    say before pruning which layers' types survive)."""
    try:
        found = family(config)
    except UserError as error:
        raise UserError(f"{where}: {error}") from None
    kinds = sorted(set(getattr(config, "layer_types", None) or []))
    if len(kinds) > 1:
        raise UserError(f"{where}: its layers mix attention types ({', '.join(kinds)}); gridlab prunes parents whose "
                        f"layers all attend alike (e.g. use_sliding_window = false)")
    return found


def config_from_dict(fields: dict) -> PretrainedConfig:
    """A config object of the family the dict names (model_type; absent: llama, as gridlab's own presets)."""
    return family(fields).config_class.from_dict(fields)


def build_model(config: PretrainedConfig):
    """The family's causal-LM model for `config` (the class AutoModelForCausalLM.from_config picks), in the current
    default device and dtype; weights are transformers' default init."""
    return family(config).model_class(config)


def head_dim(config: PretrainedConfig) -> int:
    """Width of one attention head: the config's explicit head_dim (pruned widths keep it), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_norms(config: PretrainedConfig) -> int:
    """Norm weights one decoder layer holds: two RMSNorms of hidden_size, and Qwen3's q_norm and k_norm of
    head_dim."""
    return 2 * config.hidden_size + (2 * head_dim(config) if family(config).qk_norm else 0)
