"""Model configurations, random initialisation, parameter accounting and plain-HF save/load, for every family of
gridlab.families (Llama, Mistral, Qwen2/Qwen2.5, Qwen3)."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from gridlab.atomic import staged_directory
from gridlab.contracts import ParamCounts
from gridlab.data import load_tokenizer
from gridlab.errors import UserError
from gridlab.families import build_model, config_from_dict, family, head_dim, layer_norms  # noqa: F401 (head_dim: part of this module's API)

# Every field of an architecture but the vocabulary (it comes from the tokenizer). gridlab's own presets are untied,
# use eps 1e-5 and take their context from the grid's seq_len; presets of published models carry every field of the
# published config (rope parameters, tying, context, eps, special-token ids), so a random-init model built from the
# declaration is the published architecture exactly. pico/micro/nano have >= 12 layers so that depth ratios
# 0.5-0.8 remove distinct layer counts. A preset of another family names its model_type (absent: llama).
_GRIDLAB = dict(tie_word_embeddings=False, rms_norm_eps=1e-5)
PRESETS: dict[str, dict] = {
    "pico": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=12,
                 num_attention_heads=4, num_key_value_heads=2, **_GRIDLAB),
    "micro": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=2, **_GRIDLAB),
    "nano": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=12,
                 num_attention_heads=6, num_key_value_heads=2, **_GRIDLAB),
    "mini": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=16,
                 num_attention_heads=6, num_key_value_heads=2, **_GRIDLAB),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                  num_attention_heads=12, num_key_value_heads=4, **_GRIDLAB),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, **_GRIDLAB),
    # meta-llama/Llama-3.1-8B's config.json (vocabulary 128256).
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, initializer_range=0.02,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001),
    # HuggingFaceTB/SmolLM2-135M(-Instruct) as `python -m gridlab.convert` writes it (vocabulary 49152).
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, initializer_range=0.02,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0),
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # Qwen/Qwen2.5-0.5B's config.json (vocabulary 151936): q/k/v biases, tied embeddings, 14 query heads in 2 KV
    # groups of head_dim 64. Its sliding_window is unused (use_sliding_window false; transformers sets it to None).
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=True, initializer_range=0.02, attention_dropout=0.0,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), use_sliding_window=False,
        sliding_window=32768, max_window_layers=24, use_mrope=False, bos_token_id=151643, eos_token_id=151643),
    # Qwen/Qwen3-0.6B's config.json (vocabulary 151936): q_norm/k_norm, head_dim 128 with hidden 1024 and 16 heads.
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, initializer_range=0.02, attention_dropout=0.0,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), use_sliding_window=False,
        sliding_window=None, max_window_layers=28, bos_token_id=151643, eos_token_id=151645),
    # mistralai/Mistral-7B-v0.1's config.json (vocabulary 32000): a 4096-token sliding window on every layer.
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), sliding_window=4096,
        bos_token_id=1, eos_token_id=2),
    # mistralai/Mistral-7B-v0.3's config.json (vocabulary 32768): no sliding window, rope_theta 1e6.
    "mistral-7b-v0.3": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02, attention_dropout=0.0,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), sliding_window=None,
        bos_token_id=1, eos_token_id=2),
}

DECODER_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MASK_FILE = "sparse_mask.safetensors"
# Config entries that describe where or how a config was saved or is run, not the network it builds.
VOLATILE_FIELDS = frozenset({
    "transformers_version", "_name_or_path", "name_or_path", "_model_name_or_path", "_commit_hash", "dtype",
    "torch_dtype", "architectures", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "_attn_implementation", "_attn_implementation_autoset", "_from_model_config",
})


def make_config(preset: str, vocab_size: int, seq_len: int, **overrides) -> PretrainedConfig:
    """The preset's architecture (a config of its family's class) with `overrides` on top; a preset without its own
    context gets `seq_len`.

    A legacy ``rope_theta`` override updates the preset's ``rope_parameters``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    # A deep copy: transformers fills in a rope_parameters table in place, which must not edit PRESETS or the caller's.
    fields = {key: copy.deepcopy(value) for key, value in {**PRESETS[preset], **overrides}.items()
              if key != "model_type"}
    if "rope_theta" in fields:
        fields["rope_parameters"] = {**fields.get("rope_parameters", {"rope_type": "default"}),
                                     "rope_theta": float(fields.pop("rope_theta"))}
    fields = {**fields, "vocab_size": fields.get("vocab_size", vocab_size)}
    fields.setdefault("max_position_embeddings", seq_len)
    if seq_len > fields["max_position_embeddings"]:
        raise ValueError(f"seq_len {seq_len} exceeds the {preset} architecture's max_position_embeddings "
                         f"{fields['max_position_embeddings']}")
    return family(preset_family(preset)).config_class(**fields)


def preset_family(preset: str) -> str:
    """The model_type of a preset's architecture."""
    return PRESETS[preset].get("model_type", "llama")


def architecture(config: PretrainedConfig | dict) -> dict:
    """The config as a plain dict of every field (defaults filled in, so a config.json's short form gives the same
    dict) without its volatile fields: what two models of one architecture share. A dict is read by its family's
    config class (model_type; absent: llama)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    return {key: value for key, value in config.to_dict().items() if key not in VOLATILE_FIELDS}


def architecture_diff(declared: PretrainedConfig | dict, loaded: PretrainedConfig | dict) -> list[str]:
    """Field-by-field differences, one "field: declared X, loaded Y" line each; [] when the architectures agree.

    Volatile fields (VOLATILE_FIELDS) are ignored; nested dicts (rope_parameters) are compared key by key; an absent
    field equals None; numbers compare with a relative tolerance of 1e-6 (a float32 round trip of rms_norm_eps).
    """
    differences: list[str] = []
    _diff(architecture(declared), architecture(loaded), "", differences)
    return differences


def check_declared_architecture(declared: PretrainedConfig | dict, loaded: PretrainedConfig | dict, path: str) -> None:
    """The parent stage's check: a grid that declares its loaded parent's architecture (parent.preset + overrides,
    so that planning needs no download) must declare exactly the checkpoint's, or every random-init model would be
    built from the wrong one. Raises a one-line UserError listing each differing field."""
    differences = architecture_diff(declared, loaded)
    if differences:
        raise UserError(f"parent.path {path}: the checkpoint is not the architecture that parent.preset + "
                        f"parent.overrides declare ({'; '.join(differences)}); fix the declaration or remove it")


_ABSENT = object()


def _diff(a, b, prefix: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            _diff(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{prefix}{key}.", out)
        return
    if not _same(a, b):
        def show(value):
            return "absent" if value is _ABSENT else repr(value)
        out.append(f"{prefix[:-1]}: declared {show(a)}, loaded {show(b)}")


def _same(a, b) -> bool:
    a, b = (None if v is _ABSENT else v for v in (a, b))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) or isinstance(b, dict):
        return False  # two dicts are compared key by key in _diff
    return a == b


def init_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A fresh model of the config's family whose linear and embedding weights are drawn from trunc_normal(0, 0.02);
    biases are zero and norms one (Qwen3's q_norm / k_norm too)."""
    generator = torch.Generator().manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                weight = torch.empty_like(module.weight)
                # trunc_normal_ has no generator argument; draw normals and redraw outliers ourselves.
                weight.normal_(0.0, 0.02, generator=generator)
                outliers = weight.abs() > 0.04
                while outliers.any():
                    weight[outliers] = torch.empty(int(outliers.sum())).normal_(0.0, 0.02, generator=generator)
                    outliers = weight.abs() > 0.04
                module.weight.copy_(weight)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return model


def param_counts(model_or_config: PreTrainedModel | PretrainedConfig) -> ParamCounts:
    """Parameters of a model (counted from its tensors) or of a config (from its shapes alone; same numbers).

    ``decoder`` — the base of every pruning ratio — is the decoder layers' projection parameters: the q, k, v, o,
    gate, up and down weights and whatever biases the family gives them (Qwen2's q/k/v biases). Norms (the layers'
    RMSNorms, Qwen3's q_norm / k_norm, the final norm) and embeddings count in ``total`` only.
    """
    if isinstance(model_or_config, PretrainedConfig):
        return _config_param_counts(model_or_config)
    decoder = embedding = total = 0
    seen: set[int] = set()
    for name, param in model_or_config.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if name.rsplit(".", 2)[-2] in DECODER_WEIGHTS:
            decoder += param.numel()
        elif "embed_tokens" in name or "lm_head" in name:
            embedding += param.numel()
    return ParamCounts(decoder=decoder, embedding=embedding, total=total)


def decoder_layer_params(config: PretrainedConfig, kv_groups: int | None = None, ffn: int | None = None,
                         hidden: int | None = None) -> int:
    """Parameters of one decoder layer's 7 projections, weights and the family's biases (norms excluded): of
    `config`, or of `config` with its KV groups, FFN channels or hidden size replaced (width pruning searches these;
    query heads follow the KV groups, head_dim stays). A bias has one entry per output row of its projection."""
    kv_groups = config.num_key_value_heads if kv_groups is None else kv_groups
    ffn = config.intermediate_size if ffn is None else ffn
    hidden = config.hidden_size if hidden is None else hidden
    heads = kv_groups * (config.num_attention_heads // config.num_key_value_heads)
    hd = head_dim(config)
    rows = {"q_proj": heads * hd, "k_proj": kv_groups * hd, "v_proj": kv_groups * hd, "o_proj": hidden,
            "gate_proj": ffn, "up_proj": ffn, "down_proj": hidden}
    biases = sum(rows[name] for name in family(config).biases(config))
    return 2 * hidden * hd * (heads + kv_groups) + 3 * hidden * ffn + biases


def _config_param_counts(config: PretrainedConfig) -> ParamCounts:
    hidden = config.hidden_size
    decoder = decoder_layer_params(config) * config.num_hidden_layers
    embedding = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    norms = layer_norms(config) * config.num_hidden_layers + hidden
    return ParamCounts(decoder=decoder, embedding=embedding, total=decoder + embedding + norms)


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """The tokenizer's bos/eos/pad ids, as config and generation_config name them."""
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def set_special_tokens(model: PreTrainedModel, tokenizer):
    """Make the model's config and generation_config carry the tokenizer's special-token ids (so generation stops
    on the tokenizer's eos); refuses a tokenizer whose ids do not fit the model's vocabulary. `tokenizer` may be a
    folder or hub name; returns the tokenizer object (None for None)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds "
                         f"{model.config.vocab_size}")
    for key, value in special_token_ids(tokenizer).items():
        setattr(model.config, key, value)
        if model.generation_config is not None:
            setattr(model.generation_config, key, value)
    return tokenizer


def write_beside_weights(staging: Path, model: PreTrainedModel, mask: dict[str, torch.Tensor] | None = None,
                         tokenizer=None) -> None:
    """What a gridlab checkpoint folder holds besides weights and config: generation_config, the tokenizer (call
    set_special_tokens before writing the config), the sparse mask; and file permissions others can read
    (transformers writes model.safetensors owner-only). Every writer of model folders calls it on its staging folder.
    """
    if model.generation_config is not None:
        model.generation_config.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if mask:
        save_file({name: m.to(torch.bool).contiguous() for name, m in mask.items()}, staging / MASK_FILE)
    umask = os.umask(0)
    os.umask(umask)
    for file in staging.iterdir():
        os.chmod(file, 0o666 & ~umask)


def save_model(model: PreTrainedModel, out_dir: Path, mask: dict[str, torch.Tensor] | None = None,
               tokenizer=None) -> Path:
    """Write a plain HF checkpoint (safetensors) atomically: it appears complete or not at all.

    With `tokenizer` (a tokenizer object, or a folder / hub name to load one from) the tokenizer is saved beside the
    weights and the model's config and generation_config take its bos/eos/pad ids first, so the folder works on its
    own: ``transformers.pipeline("text-generation", model=folder)``.
    """
    tokenizer = set_special_tokens(model, tokenizer)
    with staged_directory(Path(out_dir)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        write_beside_weights(staging, model, mask, tokenizer)
    return Path(out_dir)


def load_model(path: str | Path) -> tuple[PreTrainedModel, dict[str, torch.Tensor] | None]:
    """A saved model (any supported family, by its config's model_type) in float32, and its sparse mask if any."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    mask_path = Path(path) / MASK_FILE
    mask = load_file(mask_path) if mask_path.exists() else None
    return model, mask
