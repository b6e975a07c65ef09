"""Width pruning: attention KV groups (with their query heads), FFN channels and hidden channels leave.

A Hugging Face config gives every layer one shape, so every layer keeps the same number of KV groups and FFN
channels (each layer chooses *which* by its own scores) and all layers share the kept hidden channels (the residual
stream). head_dim never changes. The result is a plain, smaller model of the parent's family (gridlab.families).

Per family, the extra tensors follow the rows they belong to (`shrink`):
  biases    a bias is cut with its projection's output rows: Qwen2's q/k/v biases leave with their heads (KV
            groups); an o_proj or down_proj bias (Llama/Qwen3 with attention_bias, Llama with mlp_bias) keeps the
            kept hidden channels; gate/up biases keep the kept FFN channels.
  qk-norms  Qwen3's q_norm / k_norm act on head_dim, which never changes: kept whole whichever heads leave, never
            sliced by hidden channels. They take no part in the scores (Minitron's hidden score reads the two
            hidden-wide RMSNorms of each layer only).
  config    every field but the pruned sizes stays the parent's (Mistral's sliding_window, Qwen's layer_types);
            head_dim is written explicitly (Qwen2's config has no such field; its model reads it if present).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from gridlab.errors import InvalidValue
from gridlab.families import build_model, family
from gridlab.layerwise import batches, decoder_layers, model_device, select_samples
from gridlab.model import decoder_layer_params, head_dim, param_counts
from gridlab.pruning.registry import Method, PruneResult, check_nsamples, register

AXES = ("heads", "ffn", "hidden")
LLM_PRUNER_AXES = ("heads", "ffn")  # LLM-Pruner keeps the hidden size


@dataclass(frozen=True)
class WidthSizes:
    kv_groups: int
    ffn: int
    hidden: int


def width_sizes(config, ratio: float, axes) -> WidthSizes:
    """Sizes whose decoder parameter count is nearest (1 - ratio) of the parent's, shrinking the axes evenly.

    For Llama, hidden sizes are multiples of the kept query-head count (LlamaConfig requires it); the other
    families take any hidden size. For every (KV groups, hidden) pair the FFN size nearest the target is taken;
    among candidates whose count is within half a step of the finest pruned axis (so no other size on that axis is
    nearer), the one whose keep
    fractions (kv/KV, ffn/F, hidden/D over the pruned axes) are most alike wins; then the smaller error; then more
    KV groups and more hidden channels. If no candidate is that close (extreme ratios), the nearest wins.
    """
    total_kv, total_ffn, total_hidden = config.num_key_value_heads, config.intermediate_size, config.hidden_size
    group_size = config.num_attention_heads // total_kv
    multiple_of_heads = family(config).hidden_multiple_of_heads
    count = _layer_counter(config)
    target = (1.0 - ratio) * count(total_kv, total_ffn, total_hidden)
    best_key, best = None, None
    for kv in (range(1, total_kv + 1) if "heads" in axes else [total_kv]):
        heads = group_size * kv
        # LlamaConfig validates hidden_size % num_attention_heads == 0 even when head_dim is explicit.
        if multiple_of_heads and "hidden" not in axes and total_hidden % heads:
            continue
        hidden_step = heads if multiple_of_heads else 1
        hidden_options = range(hidden_step, total_hidden + 1, hidden_step) if "hidden" in axes else [total_hidden]
        for hidden in hidden_options:
            attention = count(kv, 0, hidden)  # ffn 0: the attention parameters (and any down_proj bias) alone
            per_ffn = count(kv, 1, hidden) - attention  # one FFN channel: its gate/up rows, down column, biases
            ffn = total_ffn
            if "ffn" in axes:
                ffn = min(max(round((target - attention) / per_ffn), 1), total_ffn)
            kept = count(kv, ffn, hidden)
            error = abs(kept - target)
            steps, fractions = [], []
            if "heads" in axes:
                steps.append(count(kv + 1, ffn, hidden) - kept)
                fractions.append(kv / total_kv)
            if "ffn" in axes:
                steps.append(per_ffn)
                fractions.append(ffn / total_ffn)
            if "hidden" in axes:
                steps.append(count(kv, ffn, hidden + hidden_step) - kept)
                fractions.append(hidden / total_hidden)
            close = error <= min(steps) / 2 + 1e-6
            spread = max(fractions) - min(fractions) if close else 0.0
            key = (not close, spread, error, -kv, -hidden)
            if best_key is None or key < best_key:
                best_key, best = key, WidthSizes(kv, ffn, hidden)
    return best


def _layer_counter(config):
    """decoder_layer_params(config, kv, ffn, hidden) as a fast function: the count is linear in ffn and in hidden
    for fixed kv, so it is read off the exact formula once per KV-group count (the size search calls it ~10^5 times
    for a 4096-wide parent)."""
    cache: dict[int, tuple[int, int, int, int]] = {}

    def count(kv: int, ffn: int, hidden: int) -> int:
        if kv not in cache:
            base = decoder_layer_params(config, kv, 0, 0)
            per_ffn = decoder_layer_params(config, kv, 1, 0) - base
            per_hidden = decoder_layer_params(config, kv, 0, 1) - base
            both = decoder_layer_params(config, kv, 1, 1) - base - per_ffn - per_hidden
            cache[kv] = (base, per_ffn, per_hidden, both)
        base, per_ffn, per_hidden, both = cache[kv]
        return base + per_ffn * ffn + per_hidden * hidden + both * ffn * hidden

    return count


def sizes_of(config) -> WidthSizes:
    return WidthSizes(config.num_key_value_heads, config.intermediate_size, config.hidden_size)


def width_config(parent_config, sizes: WidthSizes):
    config = copy.deepcopy(parent_config)
    group_size = parent_config.num_attention_heads // parent_config.num_key_value_heads
    config.head_dim = head_dim(parent_config)  # explicit: hidden_size / num_heads no longer gives it
    config.num_key_value_heads = sizes.kv_groups
    config.num_attention_heads = sizes.kv_groups * group_size
    config.intermediate_size = sizes.ffn
    config.hidden_size = sizes.hidden
    expected = config.num_hidden_layers * decoder_layer_params(parent_config, sizes.kv_groups, sizes.ffn, sizes.hidden)
    config.validate()
    if param_counts(config).decoder != expected:
        raise RuntimeError("width size search disagrees with gridlab.model.param_counts")
    return config


def check_axes(options: dict) -> None:
    axes = options["axes"]
    if not isinstance(axes, (list, tuple)) or not axes or not set(axes) <= set(AXES):
        raise InvalidValue("axes", f"must be a non-empty list drawn from {', '.join(AXES)}; got {axes!r}")
    options["axes"] = [axis for axis in AXES if axis in set(axes)]


def shrink(model, kept_groups: list[list[int]], kept_ffn: list[list[int]], kept_hidden: list[int], config):
    """A new, smaller model of the parent's family and of architecture `config` (width_config's) holding the kept
    slices of `model`'s tensors: each weight's kept rows and columns, each bias's kept rows (a bias has one entry per
    output row), each hidden-wide norm's kept hidden channels; Qwen3's head_dim-wide q_norm / k_norm whole."""
    sizes = sizes_of(config)
    if (len(kept_hidden), {len(g) for g in kept_groups}, {len(f) for f in kept_ffn}) != (
            sizes.hidden, {sizes.kv_groups}, {sizes.ffn}):
        raise RuntimeError("width pruning kept slices that do not fit its config")
    group_size = model.config.num_attention_heads // model.config.num_key_value_heads
    hd = head_dim(model.config)
    device = model_device(model)
    hidden_idx = torch.tensor(kept_hidden, device=device)

    def rows_of(groups: list[int], per_group: int) -> torch.Tensor:
        # KV group k serves query heads k*g .. k*g+g-1 (transformers' repeat_kv), each head_dim rows long.
        units = [k * per_group + j for k in groups for j in range(per_group)]
        return torch.tensor([u * hd + c for u in units for c in range(hd)], device=device)

    def layer_slices(layer: int) -> dict[str, tuple]:
        # module name -> (kept output rows, kept input columns); None keeps the whole dimension.
        q_rows, kv_rows = rows_of(kept_groups[layer], group_size), rows_of(kept_groups[layer], 1)
        ffn_idx = torch.tensor(kept_ffn[layer], device=device)
        return {"q_proj": (q_rows, hidden_idx), "k_proj": (kv_rows, hidden_idx), "v_proj": (kv_rows, hidden_idx),
                "o_proj": (hidden_idx, q_rows), "gate_proj": (ffn_idx, hidden_idx), "up_proj": (ffn_idx, hidden_idx),
                "down_proj": (hidden_idx, ffn_idx), "input_layernorm": (hidden_idx, None),
                "post_attention_layernorm": (hidden_idx, None),
                "q_norm": (None, None), "k_norm": (None, None)}  # Qwen3: head_dim wide, head_dim stays

    state, slices = {}, {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = tensor[:, hidden_idx]
        elif name == "model.norm.weight":
            state[name] = tensor[hidden_idx]
        elif parts[:2] == ["model", "layers"] and parts[-1] in ("weight", "bias"):
            layer, module = int(parts[2]), parts[-2]
            if layer not in slices:
                slices[layer] = layer_slices(layer)
            if module not in slices[layer]:
                raise RuntimeError(f"width pruning does not know how to slice {name}")
            rows, columns = slices[layer][module]
            if rows is not None:
                tensor = tensor[rows]
            if columns is not None and tensor.dim() == 2:
                tensor = tensor[:, columns]
            state[name] = tensor
        else:
            raise RuntimeError(f"width pruning does not know how to slice {name}")
    with torch.device("meta"):
        pruned = build_model(config)
    pruned.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    # Same head_dim and rope settings: the parent's rotary table is the pruned model's too.
    pruned.model.rotary_emb = model.model.rotary_emb
    if any(t.is_meta for t in list(pruned.parameters()) + list(pruned.buffers())):
        raise RuntimeError("width pruning left a tensor unmaterialised")
    pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.train(model.training)
    return pruned


def top_indices(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the `keep` highest scores, ascending; ties go to the lower index."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices[:keep]
    return sorted(order.tolist())


def _finish(model, method, config, options, group_scores, ffn_scores, hidden_scores):
    sizes = sizes_of(config)
    parent_decoder = param_counts(model).decoder
    kept_groups = [top_indices(s, sizes.kv_groups) for s in group_scores]
    kept_ffn = [top_indices(s, sizes.ffn) for s in ffn_scores]
    kept_hidden = top_indices(hidden_scores, sizes.hidden) if hidden_scores is not None else list(
        range(model.config.hidden_size))
    pruned = shrink(model, kept_groups, kept_ffn, kept_hidden, config)
    return PruneResult(
        model=pruned,
        achieved_ratio=1.0 - param_counts(pruned).decoder / parent_decoder,
        removed={"kv_groups": kept_groups, "ffn": kept_ffn, "hidden": kept_hidden},
        mask=None, method=method, granularity="width", options=options,
    )


@torch.no_grad()
def activation_importance(model, calibration: torch.Tensor, batch_size: int):
    """Minitron's activation scores: mean |x| over the sequence, then L2 over samples.

    FFN channel: input of down_proj. Head: its slice of o_proj's input (the attention output), L2 over head_dim;
    a KV group scores the sum of its query heads. Hidden channel: outputs of both RMSNorms, summed over layers.
    """
    layers = decoder_layers(model)
    config = model.config
    group_size = config.num_attention_heads // config.num_key_value_heads
    hd = head_dim(config)
    squares: dict[tuple[str, int], torch.Tensor] = {}

    def accumulate(key):
        def hook(module, args, output=None):
            x = (args[0] if output is None else output).float()
            per_sample = x.abs().mean(dim=1)  # [batch, channels]: mean over the sequence
            total = (per_sample ** 2).sum(dim=0)
            squares[key] = squares[key] + total if key in squares else total
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(accumulate(("ffn", i))))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(accumulate(("heads", i))))
        handles.append(layer.input_layernorm.register_forward_hook(accumulate(("norm_in", i))))
        handles.append(layer.post_attention_layernorm.register_forward_hook(accumulate(("norm_post", i))))
    try:
        device = model_device(model)
        for batch in batches(calibration, batch_size):
            model.model(batch.to(device), use_cache=False)  # hidden states only: no logits
    finally:
        for handle in handles:
            handle.remove()

    ffn_scores, group_scores = [], []
    hidden_scores = torch.zeros(config.hidden_size, device=model_device(model))
    for i in range(len(layers)):
        ffn_scores.append(squares[("ffn", i)].sqrt())
        head_scores = squares[("heads", i)].sqrt().view(config.num_attention_heads, hd).norm(dim=1)
        group_scores.append(head_scores.view(config.num_key_value_heads, group_size).sum(dim=1))
        hidden_scores += squares[("norm_in", i)].sqrt() + squares[("norm_post", i)].sqrt()
    return group_scores, ffn_scores, hidden_scores


def _prune_minitron_width(model, ratio, calibration, options):
    group_scores, ffn_scores, hidden_scores = activation_importance(
        model, select_samples(calibration, options["nsamples"]), options["batch_size"])
    return _finish(model, "minitron-width", _minitron_config(model.config, ratio, options), options, group_scores,
                   ffn_scores, hidden_scores if "hidden" in options["axes"] else None)


def taylor_importance(model, calibration: torch.Tensor, batch_size: int):
    """LLM-Pruner's first-order Taylor score |w · dL/dw| summed over each coupled group.

    A KV group couples its query heads' q rows, its own k and v rows and those heads' o columns; an FFN channel
    couples its gate and up rows and its down column. A bias entry belongs to its output row's group, as in the
    reference's dependency graph: Qwen2's q/k/v biases score with their heads' KV group, gate/up biases (Llama
    mlp_bias) with their FFN channel; o_proj and down_proj biases are hidden-wide, which LLM-Pruner keeps, so they
    score nothing. Qwen3's q_norm / k_norm are shared by all heads and never removed: no score.
    """
    config = model.config
    group_size = config.num_attention_heads // config.num_key_value_heads
    hd = head_dim(config)
    layers = decoder_layers(model)
    weights = [p for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                layer.self_attn.v_proj, layer.self_attn.o_proj,
                                                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
               for p in (m.weight, m.bias) if p is not None]
    previous = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        model.eval()
        device = model_device(model)
        total_tokens = calibration.shape[0] * (calibration.shape[1] - 1)
        for batch in batches(calibration, batch_size):
            batch = batch.to(device)
            loss = model(batch, labels=batch, use_cache=False).loss
            # Weight each batch by its share of tokens so the sum is the gradient of the mean loss.
            (loss * (batch.shape[0] * (batch.shape[1] - 1)) / total_tokens).backward()
        with torch.no_grad():
            group_scores, ffn_scores = [], []
            for layer in layers:
                attn, mlp = layer.self_attn, layer.mlp
                saliency = {name: (m.weight * m.weight.grad).abs().float() for name, m in (
                    ("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                    ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj))}
                bias = {name: (m.bias * m.bias.grad).abs().float() for name, m in (
                    ("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("gate", mlp.gate_proj),
                    ("up", mlp.up_proj)) if m.bias is not None}
                per_q_head = saliency["q"].sum(dim=1).view(config.num_attention_heads, hd).sum(dim=1)
                if "q" in bias:
                    per_q_head += bias["q"].view(config.num_attention_heads, hd).sum(dim=1)
                per_q_head += saliency["o"].sum(dim=0).view(config.num_attention_heads, hd).sum(dim=1)
                per_group = per_q_head.view(config.num_key_value_heads, group_size).sum(dim=1)
                per_group += saliency["k"].sum(dim=1).view(config.num_key_value_heads, hd).sum(dim=1)
                per_group += saliency["v"].sum(dim=1).view(config.num_key_value_heads, hd).sum(dim=1)
                for kind in ("k", "v"):
                    if kind in bias:
                        per_group += bias[kind].view(config.num_key_value_heads, hd).sum(dim=1)
                group_scores.append(per_group)
                per_channel = saliency["gate"].sum(dim=1) + saliency["up"].sum(dim=1) + saliency["down"].sum(dim=0)
                for kind in ("gate", "up"):
                    if kind in bias:
                        per_channel += bias[kind]
                ffn_scores.append(per_channel)
    finally:
        for w in weights:
            w.grad = None
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return group_scores, ffn_scores


def _prune_llm_pruner(model, ratio, calibration, options):
    group_scores, ffn_scores = taylor_importance(
        model, select_samples(calibration, options["nsamples"]), options["batch_size"])
    return _finish(model, "llm-pruner", _llm_pruner_config(model.config, ratio, options), options, group_scores,
                   ffn_scores, None)


def _minitron_config(parent_config, ratio, options):
    return width_config(parent_config, width_sizes(parent_config, ratio, options["axes"]))


def _llm_pruner_config(parent_config, ratio, options):
    return width_config(parent_config, width_sizes(parent_config, ratio, LLM_PRUNER_AXES))


register(Method(name="minitron-width", granularity="width", run=_prune_minitron_width, config=_minitron_config,
                defaults=dict(axes=list(AXES), nsamples=None, batch_size=8),
                check_options=lambda o: (check_nsamples(o), check_axes(o))))
register(Method(name="llm-pruner", granularity="width", run=_prune_llm_pruner, config=_llm_pruner_config,
                defaults=dict(nsamples=10, batch_size=8), check_options=check_nsamples))
