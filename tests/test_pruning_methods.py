"""What each pruning method computes, checked against independent constructions on small models."""

import copy
import math

import pytest
import torch
from torch import nn

from gridlab.layerwise import capture_layer_inputs, run_layer
from gridlab.model import init_model, make_config
from gridlab.pruning import prune
from gridlab.pruning.depth import block_influence
from gridlab.pruning.sparse import magnitude_mask, sparsegpt_prune, wanda_mask


@pytest.fixture(scope="module")
def parent():
    model = init_model(make_config("micro", vocab_size=256, seq_len=64), seed=0)
    # Larger weights than the 0.02 init so every layer changes the residual stream visibly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(5.0)
    return model


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def probe():
    return torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(2))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


class Skip(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def with_layers_skipped(parent, skipped):
    model = copy.deepcopy(parent)
    for i in skipped:
        model.model.layers[i] = Skip()
    return model


# ---------------------------------------------------------------- calibration plumbing

def test_captured_layer_inputs_replay_the_layer_exactly(parent, calibration):
    captured = capture_layer_inputs(parent, calibration, batch_size=3, layer_index=2)
    assert [h.shape[0] for h in captured.hidden] == [3, 3, 2]
    assert "position_embeddings" in captured.kwargs[0]
    seen = []
    handle = parent.model.layers[2].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            for start in range(0, 8, 3):
                parent(calibration[start:start + 3], use_cache=False)
    finally:
        handle.remove()
    replayed = run_layer(parent.model.layers[2], captured)
    for mine, reference in zip(replayed, seen, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


# ---------------------------------------------------------------- depth

def test_removing_a_layer_equals_running_the_parent_with_it_skipped(parent, calibration, probe):
    result = prune(copy.deepcopy(parent), "shortgpt", 1 / 12, calibration)
    assert len(result.removed) == 1
    expected = logits(with_layers_skipped(parent, result.removed), probe)
    torch.testing.assert_close(logits(result.model, probe), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, logits(parent, probe), atol=1e-3)


def test_shortgpt_removes_the_layers_with_the_lowest_block_influence(parent, calibration):
    with torch.no_grad():
        hidden = parent(calibration, output_hidden_states=True, use_cache=False).hidden_states
    # hidden[i] is the input of layer i; the last entry may be after the final norm, so compare layers 0..L-2.
    reference = [1 - torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1).mean().item()
                 for i in range(11)]
    scores = block_influence(parent, calibration, batch_size=8)
    assert scores[:11] == pytest.approx(reference, abs=1e-5)
    result = prune(copy.deepcopy(parent), "shortgpt", 0.5, calibration)
    assert result.removed == sorted(sorted(range(12), key=lambda i: scores[i])[:6])


def test_minitron_depth_removes_the_contiguous_block_with_the_lowest_loss(parent, calibration):
    result = prune(copy.deepcopy(parent), "minitron-depth", 0.25, calibration)  # 3 layers
    losses = []
    for start in range(10):
        with torch.no_grad():
            model = with_layers_skipped(parent, range(start, start + 3))
            losses.append(model(calibration, labels=calibration, use_cache=False).loss.item())
    best = min(range(10), key=lambda i: losses[i])
    assert result.removed == [best, best + 1, best + 2]
    assert len(set(round(x, 4) for x in losses)) > 1  # the choice is not a tie


# ---------------------------------------------------------------- width: structured equivalence

def zeroed_parent(parent, kept):
    """The parent with every removed head group, FFN channel and hidden channel zeroed.

    Dropping hidden channels also changes RMSNorm's mean over channels (D' instead of D); the zeroed parent matches
    the pruned model once each norm weight is scaled by sqrt(D'/D) and its epsilon by D'/D.
    """
    model = copy.deepcopy(parent)
    config = parent.config
    hd, group_size = config.head_dim, config.num_attention_heads // config.num_key_value_heads
    hidden_kept = torch.zeros(config.hidden_size, dtype=torch.bool)
    hidden_kept[kept["hidden"]] = True
    shrink = len(kept["hidden"]) / config.hidden_size
    norms = [model.model.norm] + [n for layer in model.model.layers
                                  for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, ~hidden_kept] = 0
        for norm in norms:
            norm.weight.mul_(math.sqrt(shrink))
            norm.variance_epsilon *= shrink
        for i, layer in enumerate(model.model.layers):
            head_kept = torch.zeros(config.num_attention_heads * hd, dtype=torch.bool)
            for group in kept["kv_groups"][i]:
                head_kept[group * group_size * hd:(group + 1) * group_size * hd] = True
            layer.self_attn.o_proj.weight[:, ~head_kept] = 0
            ffn_kept = torch.zeros(config.intermediate_size, dtype=torch.bool)
            ffn_kept[kept["ffn"][i]] = True
            layer.mlp.down_proj.weight[:, ~ffn_kept] = 0
            layer.self_attn.o_proj.weight[~hidden_kept] = 0
            layer.mlp.down_proj.weight[~hidden_kept] = 0
    return model


@pytest.mark.parametrize("method", ["minitron-width", "llm-pruner"])
def test_width_pruned_model_equals_the_parent_with_removed_structures_zeroed(method, parent, calibration, probe):
    result = prune(copy.deepcopy(parent), method, 0.5, calibration)
    config = result.model.config
    assert config.head_dim == parent.config.head_dim
    assert len(result.removed["kv_groups"][0]) == config.num_key_value_heads < parent.config.num_key_value_heads
    assert len(result.removed["ffn"][0]) == config.intermediate_size < parent.config.intermediate_size
    if method == "minitron-width":
        assert config.hidden_size < parent.config.hidden_size
    else:
        assert config.hidden_size == parent.config.hidden_size
    expected = logits(zeroed_parent(parent, result.removed), probe)
    torch.testing.assert_close(logits(result.model, probe), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, logits(parent, probe), atol=1e-2)


def test_layers_choose_their_own_ffn_channels(parent, calibration):
    result = prune(copy.deepcopy(parent), "minitron-width", 0.5, calibration)
    assert len({tuple(kept) for kept in result.removed["ffn"]}) > 1


def test_llm_pruner_keeps_the_ffn_channels_with_the_largest_taylor_score(parent, calibration):
    model = copy.deepcopy(parent)
    loss = model(calibration[:8], labels=calibration[:8], use_cache=False).loss
    loss.backward()
    mlp = model.model.layers[3].mlp
    saliency = lambda m: (m.weight * m.weight.grad).abs()  # noqa: E731
    scores = saliency(mlp.gate_proj).sum(1) + saliency(mlp.up_proj).sum(1) + saliency(mlp.down_proj).sum(0)
    result = prune(copy.deepcopy(parent), "llm-pruner", 0.5, calibration, nsamples=8, batch_size=3)
    kept = result.removed["ffn"][3]
    expected = sorted(torch.topk(scores, len(kept)).indices.tolist())
    assert kept == expected


def test_minitron_width_keeps_the_ffn_channels_with_the_largest_activations(parent, calibration):
    inputs = []
    handle = parent.model.layers[5].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        parent(calibration, use_cache=False)
    handle.remove()
    scores = inputs[0].abs().mean(dim=1).norm(dim=0)  # mean over the sequence, L2 over samples
    result = prune(copy.deepcopy(parent), "minitron-width", 0.5, calibration)
    kept = result.removed["ffn"][5]
    assert kept == sorted(torch.topk(scores, len(kept)).indices.tolist())


# ---------------------------------------------------------------- sparse

def test_wanda_on_a_hand_made_layer_zeroes_what_the_formula_says():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                           [4.0, 3.0, -2.0, 1.0]])
    inputs = torch.tensor([[1.0, 0.1, 0.0, 0.1],
                           [1.0, 0.1, 0.2, 0.1]])  # ||X_j||: 1.414, 0.141, 0.2, 0.141
    scores = weight.abs() * inputs.norm(dim=0)  # row 0: 1.41, .28, .6, .57  row 1: 5.66, .42, .4, .14
    keep = wanda_mask(weight, inputs.pow(2).sum(0), 0.5)
    assert keep.tolist() == [[True, False, True, False], [True, True, False, False]]
    assert torch.equal(~keep, scores <= scores.sort(dim=1).values[:, 1:2])
    # magnitude compares the whole matrix; 2:4 compares each run of four
    assert magnitude_mask(weight, 0.25).tolist() == [[False, True, True, True], [True, True, True, False]]
    assert wanda_mask(weight, inputs.pow(2).sum(0), 0.5, nm=(1, 2)).tolist() == [
        [True, False, True, False], [True, False, True, False]]


@pytest.mark.parametrize("method, ratio", [("wanda", 0.5), ("wanda", 0.7), ("sparsegpt", 0.7), ("magnitude", 0.5),
                                           ("magnitude", 0.7)])
def test_sparse_methods_zero_exactly_floor_r_n_per_comparison_group(method, ratio, parent, calibration):
    options = {"blocksize": 64} if method == "sparsegpt" else {}
    result = prune(copy.deepcopy(parent), method, ratio, calibration, **options)
    params = dict(result.model.named_parameters())
    assert len(result.mask) == 12 * 7
    for name, keep in result.mask.items():
        weight = params[name]
        assert torch.equal(weight != 0, keep), name
        pruned = ~keep
        rows, cols = pruned.shape
        if method == "wanda":
            assert (pruned.sum(dim=1) == math.floor(ratio * cols)).all()
        elif method == "magnitude":
            assert int(pruned.sum()) == math.floor(ratio * pruned.numel())
        else:
            for start in range(0, cols, 64):
                tile = pruned[:, start:start + 64]
                assert int(tile.sum()) == math.floor(ratio * tile.numel())


@pytest.mark.parametrize("method, nm", [("wanda", "2:4"), ("sparsegpt", "4:8"), ("magnitude", "2:4"),
                                        ("magnitude", "4:8")])
def test_nm_zeroes_n_of_every_m_consecutive_inputs(method, nm, parent, calibration):
    n, m = map(int, nm.split(":"))
    result = prune(copy.deepcopy(parent), method, 0.5, calibration, nm=nm)
    for keep in result.mask.values():
        runs = (~keep).reshape(keep.shape[0], -1, m).sum(dim=-1)
        assert (runs == n).all()
    assert result.achieved_ratio == n / m


def test_wanda_recomputes_each_layers_inputs_after_the_previous_layer_was_pruned(parent, calibration):
    result = prune(copy.deepcopy(parent), "wanda", 0.5, calibration)

    def layer1_masks(model):
        norms = {}
        hooks = [getattr(model.model.layers[1].self_attn if n[0] in "qkvo" else model.model.layers[1].mlp, n)
                 .register_forward_pre_hook(lambda mod, a, n=n: norms.__setitem__(n, a[0].pow(2).sum((0, 1))))
                 for n in ("q_proj", "o_proj", "down_proj")]
        with torch.no_grad():
            model(calibration, use_cache=False)
        for h in hooks:
            h.remove()
        layer = parent.model.layers[1]
        weights = {"q_proj": layer.self_attn.q_proj.weight, "o_proj": layer.self_attn.o_proj.weight,
                   "down_proj": layer.mlp.down_proj.weight}
        return {n: wanda_mask(weights[n], norms[n], 0.5) for n in weights}

    hybrid = copy.deepcopy(parent)  # layer 0 pruned, layer 1 still dense: what Wanda saw when scoring layer 1
    hybrid.model.layers[0] = copy.deepcopy(result.model.model.layers[0])
    recomputed, stale = layer1_masks(hybrid), layer1_masks(parent)
    got = {n: result.mask[f"model.layers.1.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}.weight"]
           for n in recomputed}
    assert all(torch.equal(got[n], recomputed[n]) for n in got)
    assert not all(torch.equal(got[n], stale[n]) for n in got)


def test_sparsegpt_reconstructs_the_layer_output_better_than_magnitude_and_wanda():
    generator = torch.Generator().manual_seed(0)
    d, tokens = 96, 1024
    mixing = torch.randn(d, d, generator=generator) * (torch.rand(d, generator=generator) * 3)
    X = torch.randn(tokens, d, generator=generator) @ mixing  # correlated inputs of uneven scale
    W = torch.randn(d, d, generator=generator)
    H = 2 * X.T @ X / tokens

    def error(pruned_weight):
        return torch.linalg.norm(X @ W.T - X @ pruned_weight.T).item()

    for ratio in (0.5, 0.7):
        new_weight, keep = sparsegpt_prune(W, H, ratio, blocksize=32)
        assert (~keep).sum() == sum(math.floor(ratio * d * 32) for _ in range(3))
        sparsegpt_error = error(new_weight)
        assert sparsegpt_error < error(W * magnitude_mask(W, ratio))
        assert sparsegpt_error < error(W * wanda_mask(W, X.pow(2).sum(0), ratio))
        # the OBS update is what helps: the same mask without the update is worse
        assert sparsegpt_error < error(W * keep)


def test_sparsegpt_with_no_pruning_leaves_the_weights_unchanged():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=generator)
    W = torch.randn(16, 32, generator=generator)
    new_weight, keep = sparsegpt_prune(W, X.T @ X, 0.0)
    assert keep.all()
    torch.testing.assert_close(new_weight, W)


def test_sparsegpt_zeroes_the_weights_of_inputs_never_seen():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=generator)
    X[:, 5] = 0
    W = torch.randn(16, 32, generator=generator)
    new_weight, keep = sparsegpt_prune(W, X.T @ X, 0.25)
    assert torch.isfinite(new_weight).all()
    assert (new_weight[:, 5] == 0).all() and not keep[:, 5].any()  # zero score: pruned first
    assert (~keep).sum() == math.floor(0.25 * W.numel())
