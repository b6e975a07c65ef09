"""Llama configurations, random initialisation, parameter accounting and plain-HF save/load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gridlab.atomic import staged_directory

# Shapes only; vocab size and context length come from the tokenizer and the grid.
# pico/micro/nano have >= 12 layers so that depth ratios 0.5-0.8 remove distinct layer counts.
PRESETS: dict[str, dict] = {
    "pico": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=12,
                 num_attention_heads=4, num_key_value_heads=2),
    "micro": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=12,
                  num_attention_heads=4, num_key_value_heads=2),
    "nano": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=12,
                 num_attention_heads=6, num_key_value_heads=2),
    "mini": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=16,
                 num_attention_heads=6, num_key_value_heads=2),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                  num_attention_heads=12, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}

DECODER_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MASK_FILE = "sparse_mask.safetensors"


def make_config(preset: str, vocab_size: int, seq_len: int, **overrides) -> LlamaConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    shape = {**PRESETS[preset], **overrides}
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        **shape,
    )


def init_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A fresh model whose linear and embedding weights are drawn from trunc_normal(0, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
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


@dataclass(frozen=True)
class ParamCounts:
    decoder: int  # q, k, v, o, gate, up, down weights: the base of every pruning ratio
    embedding: int  # input embeddings + untied lm_head
    total: int


def param_counts(model_or_config: LlamaForCausalLM | LlamaConfig) -> ParamCounts:
    """Parameters of a model (counted from its tensors) or of a config (from its shapes alone; same numbers)."""
    if isinstance(model_or_config, LlamaConfig):
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


def head_dim(config: LlamaConfig) -> int:
    """Width of one attention head: the config's explicit head_dim (pruned widths keep it), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decoder_layer_params(config: LlamaConfig, kv_groups: int | None = None, ffn: int | None = None,
                         hidden: int | None = None) -> int:
    """Weights of one decoder layer's 7 projections (norms excluded): of `config`, or of `config` with its KV
    groups, FFN channels or hidden size replaced (width pruning searches these; query heads follow the KV groups)."""
    kv_groups = config.num_key_value_heads if kv_groups is None else kv_groups
    ffn = config.intermediate_size if ffn is None else ffn
    hidden = config.hidden_size if hidden is None else hidden
    heads = kv_groups * (config.num_attention_heads // config.num_key_value_heads)
    return 2 * hidden * head_dim(config) * (heads + kv_groups) + 3 * hidden * ffn


def _config_param_counts(config: LlamaConfig) -> ParamCounts:
    hidden = config.hidden_size
    decoder = decoder_layer_params(config) * config.num_hidden_layers
    embedding = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    norms = hidden * (2 * config.num_hidden_layers + 1)
    return ParamCounts(decoder=decoder, embedding=embedding, total=decoder + embedding + norms)


def save_model(model: LlamaForCausalLM, out_dir: Path, mask: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a plain HF checkpoint (safetensors) atomically: it appears complete or not at all."""
    with staged_directory(Path(out_dir)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if mask:
            save_file({name: m.to(torch.bool).contiguous() for name, m in mask.items()}, staging / MASK_FILE)
    return Path(out_dir)


def load_model(path: str | Path) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor] | None]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    mask_path = Path(path) / MASK_FILE
    mask = load_file(mask_path) if mask_path.exists() else None
    return model, mask
