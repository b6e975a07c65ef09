"""Write a tiny HF model as a llama.cpp GGUF file (float32) with the `gguf` package's writer, laid out as llama.cpp's
convert_hf_to_gguf.py lays out real ones: its tensor names, q/k rows permuted for the "llama" architecture, the
tokenizer as a byte-level BPE vocabulary with merges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_OUTSIDE = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
_IN_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout of q/k rows for the "llama" architecture (transformers undoes it on load)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(model, tokenizer, path: Path, architecture: str, name: str) -> Path:
    import gguf

    from gridlab.model import head_dim

    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    if architecture == "llama":
        writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [token for token, _ in sorted(backend["model"]["vocab"].items(), key=lambda item: item[1])]
    special = {added["content"] for added in backend["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if architecture.startswith("qwen") else "default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy()
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if architecture == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config.num_attention_heads if module == "self_attn.q_proj" else config.num_key_value_heads
                array = _llama_cpp_permute(array, heads)
            writer.add_tensor(f"blk.{index}.{_IN_LAYER[module]}.{kind}", np.ascontiguousarray(array))
        else:
            writer.add_tensor(_OUTSIDE[key], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
