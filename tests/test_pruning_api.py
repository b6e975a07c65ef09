"""gridlab.pruning through its public API: ratios, save/reload, counterparts, planner configs, bad input."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from gridlab.model import init_model, load_model, make_config, param_counts, save_model
from gridlab.pruning import METHODS, prune, pruned_config, random_counterpart

STUDY_METHODS = ("shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt")


@pytest.fixture(scope="module")
def config():
    return make_config("micro", vocab_size=256, seq_len=64)


@pytest.fixture(scope="module")
def parent(config):
    return init_model(config, seed=0)


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def probe():
    return torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def pruned(parent, calibration):
    """prune(parent, method, ratio) computed once per module; tests only read the results."""
    cache = {}

    def get(method, ratio, **options):
        key = (method, ratio, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = prune(copy.deepcopy(parent), method, ratio, calibration, **options)
        return cache[key]
    return get


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_registry_names_every_method_with_its_granularity():
    expected = {"shortgpt": "depth", "minitron-depth": "depth", "minitron-width": "width", "llm-pruner": "width",
                "wanda": "sparse", "sparsegpt": "sparse", "magnitude": "sparse"}
    assert {name: METHODS[name].granularity for name in expected} == expected


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_ratio_too_small_to_remove_anything_changes_nothing(method, parent, calibration, probe):
    result = prune(copy.deepcopy(parent), method, 1e-6, calibration)
    assert result.achieved_ratio == 0.0
    torch.testing.assert_close(logits(result.model, probe), logits(parent, probe), rtol=1e-5, atol=1e-5)


def ratio_step(method: str, parent) -> float:
    """How far from a requested ratio the method's granularity may land."""
    config = parent.config
    decoder = param_counts(parent).decoder
    granularity = METHODS[method].granularity
    if granularity == "depth":
        return 0.5 / config.num_hidden_layers  # round(r·L) of L equal layers
    if granularity == "width":
        return 1.5 * config.hidden_size * config.num_hidden_layers / decoder  # half an FFN channel in every layer
    # sparse: each comparison group loses floor(r·size), i.e. less than one weight short per group
    shapes = [p.shape for name, p in parent.named_parameters() if name.endswith("proj.weight")]
    groups = {"wanda": sum(rows for rows, _ in shapes),
              "sparsegpt": sum(-(-cols // 128) for _, cols in shapes),
              "magnitude": len(shapes)}[method]
    return groups / decoder


@pytest.mark.parametrize("method", STUDY_METHODS + ("magnitude",))
@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.7, 0.8])
def test_achieved_ratio_is_within_the_granularity_step_and_planner_config_matches(
        method, ratio, config, parent, pruned, probe):
    result = pruned(method, ratio)
    assert result.method == method and result.granularity == METHODS[method].granularity
    assert abs(result.achieved_ratio - ratio) <= ratio_step(method, parent)
    if result.granularity == "sparse":
        assert result.achieved_ratio <= ratio
    measured = 1 - param_counts(result.model).decoder / param_counts(parent).decoder
    if result.granularity == "sparse":
        assert measured == 0.0
        zeros = sum(int((p == 0).sum()) for name, p in result.model.named_parameters() if name in result.mask)
        assert zeros / param_counts(parent).decoder == pytest.approx(result.achieved_ratio)
    else:
        assert measured == pytest.approx(result.achieved_ratio)
    planned = pruned_config(config, method, ratio)
    assert planned.to_dict() == result.model.config.to_dict()
    assert planned is not config
    if result.granularity == "sparse":
        assert planned.to_dict() == config.to_dict()
    assert torch.isfinite(logits(result.model, probe)).all()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_reload_with_plain_transformers_gives_the_same_logits(method, pruned, probe, tmp_path):
    result = pruned(method, 0.6)
    path = save_model(result.model, tmp_path / "pruned", mask=result.mask)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(logits(reloaded, probe), logits(result.model, probe), rtol=0, atol=0)
    _, mask = load_model(path)
    if result.mask is None:
        assert mask is None
    else:
        assert mask.keys() == result.mask.keys()
        assert all(torch.equal(mask[k], result.mask[k]) for k in mask)


def test_width_pruning_handles_tied_embeddings(calibration, probe, tmp_path):
    config = make_config("micro", vocab_size=256, seq_len=64)
    config.tie_word_embeddings = True
    result = prune(init_model(config, seed=0), "minitron-width", 0.5, calibration)
    assert result.model.lm_head.weight is result.model.model.embed_tokens.weight
    reloaded = AutoModelForCausalLM.from_pretrained(save_model(result.model, tmp_path / "tied"))
    torch.testing.assert_close(logits(reloaded, probe), logits(result.model, probe), rtol=0, atol=0)


def test_nm_fixes_the_ratio_and_says_so(parent, calibration):
    asked = prune(copy.deepcopy(parent), "wanda", 0.7, calibration, nm="2:4")
    assert asked.achieved_ratio == 0.5
    assert "2:4" in asked.note and "0.7" in asked.note
    matching = prune(copy.deepcopy(parent), "magnitude", 0.5, calibration, nm="4:8")
    assert matching.achieved_ratio == 0.5 and matching.note is None


@pytest.mark.parametrize("method", STUDY_METHODS + ("magnitude",))
def test_random_counterpart_has_the_same_architecture_and_mask_but_fresh_weights(method, pruned):
    result = pruned(method, 0.5)
    twin = random_counterpart(result, seed=7)
    assert twin.model.config.to_dict() == result.model.config.to_dict()
    assert (twin.method, twin.granularity, twin.achieved_ratio) == (result.method, result.granularity,
                                                                    result.achieved_ratio)
    pruned_params = dict(result.model.named_parameters())
    for name, param in twin.model.named_parameters():
        assert param.shape == pruned_params[name].shape
        if name.endswith("proj.weight"):
            assert not torch.equal(param, pruned_params[name])
        if result.mask is not None and name in result.mask:
            assert torch.equal(param != 0, result.mask[name])
    again = random_counterpart(result, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(twin.model.parameters(), again.model.parameters(), strict=True))


def test_depth_pruning_renumbers_layers_and_generation_with_cache_still_works(pruned, calibration):
    result = pruned("shortgpt", 0.5)
    layers = result.model.model.layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(6))
    assert result.model.config.num_hidden_layers == 6
    prompt = calibration[:1, :8]
    cached = result.model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = result.model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_calibration_runs_without_gradients_and_leaves_none_behind(pruned):
    for method in ("llm-pruner", "sparsegpt"):
        result = pruned(method, 0.5)
        assert all(p.grad is None for p in result.model.parameters())
        assert all(p.requires_grad for p in result.model.parameters())


# ---------------------------------------------------------------- bad input: one line, nothing modified

def _bad_calls(parent, calibration):
    return [
        (dict(method="obs", ratio=0.5), "valid methods: llm-pruner, magnitude, minitron-depth"),
        (dict(method="wanda", ratio=0.0), "strictly between 0 and 1"),
        (dict(method="wanda", ratio=1.0), "strictly between 0 and 1"),
        (dict(method="shortgpt", ratio=-0.2), "strictly between 0 and 1"),
        (dict(method="shortgpt", ratio="0.5"), "strictly between 0 and 1"),
        (dict(method="wanda", ratio=0.5, nm="4:4"), "N < M"),
        (dict(method="sparsegpt", ratio=0.5, nm="6:4"), "N < M"),
        (dict(method="magnitude", ratio=0.5, nm="2-4"), "like '2:4'"),
        (dict(method="sparsegpt", ratio=0.5, nm="2:4", blocksize=30), "multiple of M"),
        (dict(method="wanda", ratio=0.5, blocksize=64), "valid options: batch_size, nm, nsamples"),
        (dict(method="minitron-width", ratio=0.5, axes=["layers"]), "axes: must be"),
        (dict(method="wanda", ratio=0.5, calibration=calibration[:0]), "at least one sequence"),
        (dict(method="wanda", ratio=0.5, calibration=calibration[0]), "at least one sequence"),
        (dict(method="shortgpt", ratio=0.5, calibration=calibration[:, :1]), "at least one sequence"),
        (dict(method="llm-pruner", ratio=0.5, calibration=None), "integer tensor of token ids"),
        (dict(method="wanda", ratio=0.5, calibration=calibration.float()), "integer tensor of token ids"),
        (dict(method="wanda", ratio=0.5, calibration=torch.cat([calibration, calibration], 1)), "at most 64"),
        (dict(method="wanda", ratio=0.5, calibration=calibration + 1000), "vocabulary"),
    ]


def test_bad_input_raises_one_line_and_leaves_the_model_untouched(parent, calibration):
    model = copy.deepcopy(parent)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, message in _bad_calls(parent, calibration):
        kwargs = {"calibration": calibration, **kwargs}
        with pytest.raises(ValueError) as error:
            prune(model, **kwargs)
        assert message in str(error.value), (kwargs, str(error.value))
        assert "\n" not in str(error.value)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert model.config.num_hidden_layers == 12


def test_a_model_that_is_not_a_decoder_only_llama_is_refused(calibration):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64))
    with pytest.raises(ValueError, match="decoder-only causal LM of a supported family"):
        prune(gpt2, "wanda", 0.5, calibration)
    with pytest.raises(ValueError, match="decoder-only causal LM of a supported family"):
        prune(torch.nn.Linear(4, 4), "magnitude", 0.5)


def test_nm_that_does_not_divide_the_input_widths_is_refused(calibration):
    config = make_config("micro", vocab_size=256, seq_len=64, intermediate_size=250)
    model = init_model(config, seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="divisible by 4"):
        prune(model, "wanda", 0.5, calibration, nm="2:4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_pruned_config_checks_its_arguments_too(config):
    with pytest.raises(ValueError, match="unknown pruning method"):
        pruned_config(config, "nope", 0.5)
    with pytest.raises(ValueError, match="strictly between"):
        pruned_config(config, "minitron-width", 1.5)
    width = pruned_config(config, "minitron-width", 0.5)
    assert width.head_dim == config.head_dim and width.hidden_size % width.num_attention_heads == 0
    assert pruned_config(config, "shortgpt", 0.5).num_hidden_layers == 6


def test_magnitude_needs_no_calibration(parent):
    result = prune(copy.deepcopy(parent), "magnitude", 0.5)
    assert result.achieved_ratio == 0.5 and result.options == {"nm": None}


@pytest.mark.parametrize("method", ["shortgpt", "minitron-width", "wanda"])
def test_the_callers_config_object_still_describes_the_parent(method, calibration):
    config = make_config("micro", vocab_size=256, seq_len=64)
    before = config.to_dict()
    result = prune(init_model(config, seed=0), method, 0.5, calibration)
    assert config.to_dict() == before
    assert pruned_config(config, method, 0.5).to_dict() == result.model.config.to_dict()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_sparse_twin_draws_each_row_at_its_own_density(method, pruned):
    """[init] sparse = "scaled": a row of density d is the dense draw × 1/√d (exactly), so its surviving weights have
    std 0.02/√d (in the truncated normal's sense: the dense init's std × 1/√d, measured per row); "dense" keeps the
    dense draw, masked. SparseGPT's mask gives rows of different densities, so the rule is checked row by row."""
    result = pruned(method, 0.8)
    scaled = dict(random_counterpart(result, seed=5).model.named_parameters())
    dense = dict(random_counterpart(result, seed=5, sparse="dense").model.named_parameters())
    fresh = dict(init_model(copy.deepcopy(result.model.config), 5).named_parameters())
    truncated_std = 0.02 * 0.8796   # std of a normal truncated at ±2σ, σ = 0.02 (gridlab.model.init_model)
    ratios, densities = [], []
    for name, keep in result.mask.items():
        density = keep.double().mean(dim=1)
        assert torch.equal(dense[name], fresh[name] * keep)
        assert torch.equal(scaled[name] != 0, keep)
        expected = fresh[name].double() * keep / density.clamp(min=1e-12).sqrt()[:, None]
        assert torch.allclose(scaled[name].double(), torch.where(density[:, None] > 0, expected, 0.0), rtol=1e-6)
        for row in range(keep.shape[0]):
            kept = scaled[name][row][keep[row]].double()
            if kept.numel() >= 20:
                ratios.append(kept.std().item() / (truncated_std / density[row].sqrt().item()))
                densities.append(density[row].item())
    ratios = torch.tensor(ratios)
    assert abs(ratios.mean().item() - 1) < 0.03      # the rule holds on average over rows ...
    assert ratios.std().item() < 0.35                 # ... and row by row, within sampling error
    if method == "sparsegpt":
        assert max(densities) - min(densities) > 0.05   # rows of different densities: a per-row rule was tested


@pytest.mark.parametrize("method", ["shortgpt", "minitron-width", "wanda"])
@pytest.mark.parametrize("tied", [False, True])
def test_the_embeddings_control_takes_the_embeddings_norm_and_lm_head_and_nothing_else(method, tied, calibration):
    """inherit_embeddings: the control's token embeddings, final norm and lm_head equal the donor's (tied: one
    tensor, still tied); its decoder stays the random twin's (not the parent's), a sparse twin keeps its mask."""
    from gridlab.pruning import inherit_embeddings

    config = make_config("micro", vocab_size=256, seq_len=64, tie_word_embeddings=tied)
    parent = init_model(config, seed=0)
    with torch.no_grad():   # a trained-looking norm, so that copying it is visible
        parent.model.norm.weight.uniform_(0.5, 1.5)
    result = prune(copy.deepcopy(parent), method, 0.5, calibration)
    donor = result.model if result.model.config.hidden_size != parent.config.hidden_size else parent
    twin = random_counterpart(result, seed=3).model
    control = copy.deepcopy(twin)
    copied = inherit_embeddings(control, donor)
    assert "model.embed_tokens.weight" in copied and "model.norm.weight" in copied
    assert ("lm_head.weight" in copied) is not tied
    assert torch.equal(control.get_input_embeddings().weight, donor.get_input_embeddings().weight)
    assert torch.equal(control.model.norm.weight, donor.model.norm.weight)
    assert torch.equal(control.get_output_embeddings().weight, donor.get_output_embeddings().weight)
    assert (control.get_output_embeddings().weight is control.get_input_embeddings().weight) is tied
    parent_params = dict(parent.named_parameters())
    for name, param in control.named_parameters():
        if name.endswith("proj.weight"):
            assert torch.equal(param, dict(twin.named_parameters())[name])
            if name in parent_params and param.shape == parent_params[name].shape:
                assert not torch.equal(param, parent_params[name])
            if result.mask is not None:
                assert torch.equal(param != 0, result.mask[name])


def test_the_embeddings_control_refuses_a_donor_of_another_shape(pruned, parent):
    from gridlab.pruning import inherit_embeddings

    narrow = pruned("minitron-width", 0.5)
    assert narrow.model.config.hidden_size != parent.config.hidden_size
    with pytest.raises(ValueError, match="shape"):
        inherit_embeddings(random_counterpart(narrow, seed=1).model, parent)
