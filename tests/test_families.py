"""Parents beyond Llama: Qwen2/Qwen2.5, Qwen3 and Mistral (and a Llama with biases), as tiny random-weight HF folders.

Each parent is its family's published preset with a tiny shape, saved with a gridlab-trained tokenizer. Its weights
are scaled up, its biases and norms drawn at random (not zeros and ones), so a bias sliced with the wrong rows or a
q_norm sliced by hidden channels changes the logits. Every method must run on every family, reach its ratio, keep the
family, give the random twin its exact config, and survive a save / plain-transformers reload.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gridlab.data import CorpusSource, SplitFractions, load_tokenizer, train_tokenizer
from gridlab.errors import UserError
from gridlab.families import FAMILIES, check_supported
from gridlab.model import (
    PRESETS,
    architecture,
    architecture_diff,
    check_declared_architecture,
    decoder_layer_params,
    head_dim,
    init_model,
    load_model,
    make_config,
    param_counts,
    save_model,
    special_token_ids,
)
from gridlab.pruning import prune, pruned_config, random_counterpart
from gridlab.pruning.width import width_sizes

VOCAB = 512
# family -> (preset, tiny shape). Qwen3's head_dim (16) is not hidden / heads (44 / 4); Mistral's window (8) is
# shorter than the calibration sequences (32), so it shapes every attention the tests run.
PARENTS = {
    "qwen2": ("qwen2.5-0.5b", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
                                   num_key_value_heads=2)),
    "qwen3": ("qwen3-0.6b", dict(hidden_size=44, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16)),
    "mistral": ("mistral-7b", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, sliding_window=8)),
    "llama-biases": ("micro", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
}
METHODS = [("shortgpt", {}), ("minitron-depth", {}), ("minitron-width", {}), ("llm-pruner", {}), ("wanda", {}),
           ("sparsegpt", {}), ("magnitude", {}), ("wanda", {"nm": "2:4"}),
           ("sparsegpt", {"nm": "2:4", "blocksize": 16})]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(CorpusSource(kind="stdlib", max_documents=30), SplitFractions(), VOCAB,
                           tmp_path_factory.mktemp("tok") / "tokenizer")


def declared_config(family: str, tokenizer_dir):
    preset, shape = PARENTS[family]
    return make_config(preset, VOCAB, 64, **shape, **special_token_ids(load_tokenizer(tokenizer_dir)))


def make_parent(config, seed: int = 0):
    model = init_model(config, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(5.0)  # every layer and channel matters to the scores
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            elif name.endswith("norm.weight"):  # RMSNorms, Qwen3's q_norm / k_norm among them
                p.copy_(1.0 + torch.randn(p.shape, generator=generator) * 0.3)
    return model


@pytest.fixture(scope="module")
def parents(tokenizer_dir, tmp_path_factory):
    """family -> the parent's HF folder (saved with its tokenizer)."""
    root = tmp_path_factory.mktemp("parents")
    return {family: save_model(make_parent(declared_config(family, tokenizer_dir)), root / family,
                               tokenizer=tokenizer_dir) for family in PARENTS}


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(2, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def probe():
    return torch.randint(2, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def family_type(family: str) -> str:
    return "llama" if family == "llama-biases" else family


# ---------------------------------------------------------------- loading, counting, presets

def test_the_registry_holds_the_classes_transformers_auto_classes_pick():
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3"}
    for model_type, family in FAMILIES.items():
        assert CONFIG_MAPPING[model_type] is family.config_class
        assert MODEL_FOR_CAUSAL_LM_MAPPING[family.config_class] is family.model_class



@pytest.mark.parametrize("family", PARENTS)
def test_a_parent_folder_loads_as_its_own_family_and_counts_biases_and_norms(family, parents):
    model, _ = load_model(parents[family])
    assert type(model) is FAMILIES[family_type(family)].model_class
    assert model.config.model_type == family_type(family)
    assert param_counts(model) == param_counts(model.config)  # from the tensors = from the shapes
    config = model.config
    layers, hidden, hd = config.num_hidden_layers, config.hidden_size, head_dim(config)
    heads, kv, ffn = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    weights = 2 * hidden * hd * (heads + kv) + 3 * hidden * ffn
    biases = {"qwen2": hd * (heads + 2 * kv), "qwen3": 0, "mistral": 0,
              "llama-biases": hd * (heads + 2 * kv) + hidden + 2 * ffn + hidden}[family]
    assert param_counts(model).decoder == layers * (weights + biases)
    norms = layers * (2 * hidden + (2 * hd if family == "qwen3" else 0)) + hidden
    embedding = VOCAB * hidden * (1 if config.tie_word_embeddings else 2)
    assert param_counts(model).total == layers * (weights + biases) + norms + embedding


PUBLISHED = {  # the published config.json of each preset's model (vocab_size is the tokenizer's: left to the grid)
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
        "vocab_size": 151936},
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000},
    "mistral-7b-v0.3": {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.42.0.dev0",
        "use_cache": True, "vocab_size": 32768},
}
# (total, decoder) parameters as the model cards give them: Qwen2.5-0.5B 0.49B / 0.36B non-embedding, Qwen3-0.6B
# 0.6B / 0.44B, Mistral-7B 7.24B.
PUBLISHED_SIZES = {"qwen2.5-0.5b": (0.494e9, 0.358e9), "qwen3-0.6b": (0.596e9, 0.440e9),
                   "mistral-7b": (7.24e9, 6.98e9), "mistral-7b-v0.3": (7.25e9, 6.98e9)}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_each_preset_is_its_published_architecture(preset, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[preset]))
    loaded = AutoConfig.from_pretrained(tmp_path)
    declared = make_config(preset, PUBLISHED[preset]["vocab_size"], 4096)
    assert architecture_diff(declared, loaded) == []
    check_declared_architecture(declared, loaded, str(tmp_path))  # the parent stage's check: no error
    assert type(declared) is type(loaded)
    total, decoder = PUBLISHED_SIZES[preset]
    assert param_counts(declared).total == pytest.approx(total, rel=0.01)
    assert param_counts(declared).decoder == pytest.approx(decoder, rel=0.01)
    other = copy.deepcopy(loaded)
    other.num_hidden_layers -= 1
    with pytest.raises(UserError, match="num_hidden_layers: declared"):
        check_declared_architecture(declared, other, str(tmp_path))


# ---------------------------------------------------------------- every method on every family

@pytest.mark.parametrize("method,options", METHODS, ids=[f"{m}{o.get('nm', '')}" for m, o in METHODS])
@pytest.mark.parametrize("family", PARENTS)
def test_every_method_prunes_every_family_to_its_ratio_and_its_twin_is_the_same_architecture(
        family, method, options, parents, calibration, probe, tokenizer_dir, tmp_path):
    parent, _ = load_model(parents[family])
    parent_config = copy.deepcopy(parent.config)
    parent_decoder = param_counts(parent).decoder
    result = prune(parent, method, 0.5, calibration, **options)
    model = result.model
    assert type(model) is FAMILIES[family_type(family)].model_class
    # the ratio, measured on the result with the one formula (biases in the decoder count)
    if result.granularity != "sparse":
        assert result.achieved_ratio == pytest.approx(1 - param_counts(model).decoder / parent_decoder)
    if result.granularity == "depth":
        assert result.achieved_ratio == 0.5
    elif result.granularity == "width":
        assert abs(result.achieved_ratio - 0.5) < 0.03
    else:  # exact zeros in the weights only: biases and norms are kept, so the ratio falls short by their share
        zeros = sum(int((~keep).sum()) for keep in result.mask.values())
        assert result.achieved_ratio == zeros / parent_decoder
        bias_share = 1 - sum(keep.numel() for keep in result.mask.values()) / parent_decoder
        assert 0.5 * (1 - bias_share) - 0.02 <= result.achieved_ratio <= 0.5
        assert all(name.endswith(".weight") for name in result.mask)
    # the twin: built from pruned_config of the parent's config, equal field by field, the family's extras kept
    twin = init_model(pruned_config(parent_config, method, 0.5, **options), seed=3)
    assert twin.config.to_dict() == model.config.to_dict()
    assert type(twin) is type(model)
    assert param_counts(twin) == param_counts(model) == param_counts(model.config)
    assert architecture_diff(pruned_config(declared_config(family, tokenizer_dir), method, 0.5, **options),
                             model.config) == []
    for field in ("sliding_window", "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
                  "use_sliding_window", "max_window_layers", "bos_token_id", "eos_token_id"):
        assert getattr(model.config, field, None) == getattr(parent_config, field, None)
    assert head_dim(model.config) == head_dim(parent_config)
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == model.config.num_hidden_layers
    if result.mask is not None:
        masked = random_counterpart(result, seed=3).model
        params = dict(masked.named_parameters())
        assert all(torch.equal(params[name] != 0, keep) for name, keep in result.mask.items())
    # saved with its tokenizer, it is the same model to plain transformers
    path = save_model(model, tmp_path / "pruned", mask=result.mask, tokenizer=tokenizer_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(reloaded) is type(model) and reloaded.config.model_type == parent_config.model_type
    torch.testing.assert_close(logits(reloaded, probe), logits(model, probe), rtol=0, atol=0)
    random_dir = save_model(twin, tmp_path / "random", tokenizer=tokenizer_dir)
    assert architecture(json.loads((path / "config.json").read_text())) == architecture(
        json.loads((random_dir / "config.json").read_text()))


# ---------------------------------------------------------------- equivalences

class Skip(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.mark.parametrize("method", ["shortgpt", "minitron-depth"])
@pytest.mark.parametrize("family", PARENTS)
def test_a_depth_pruned_model_is_the_parent_with_those_layers_skipped(family, method, parents, calibration, probe):
    parent, _ = load_model(parents[family])
    result = prune(copy.deepcopy(parent), method, 0.5, calibration)
    assert len(result.removed) == 2
    skipped = copy.deepcopy(parent)
    for index in result.removed:
        skipped.model.layers[index] = Skip()
    expected = logits(skipped, probe)
    torch.testing.assert_close(logits(result.model, probe), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, logits(parent, probe), atol=1e-3)
    kept = [i for i in range(4) if i not in result.removed]
    for new, old in enumerate(kept):  # the survivors keep their biases and q/k norms untouched
        assert all(torch.equal(a, b) for a, b in zip(result.model.model.layers[new].state_dict().values(),
                                                     parent.model.layers[old].state_dict().values(), strict=True))


@pytest.mark.parametrize("method", ["minitron-width", "llm-pruner"])
@pytest.mark.parametrize("family", PARENTS)
def test_a_width_pruning_that_keeps_every_channel_is_the_parent(family, method, parents, calibration, probe, tmp_path):
    parent, _ = load_model(parents[family])
    result = prune(copy.deepcopy(parent), method, 1e-3, calibration)
    for field in ("num_key_value_heads", "num_attention_heads", "intermediate_size", "hidden_size"):
        assert getattr(result.model.config, field) == getattr(parent.config, field)
    torch.testing.assert_close(logits(result.model, probe), logits(parent, probe), rtol=0, atol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(save_model(result.model, tmp_path / "kept"))
    torch.testing.assert_close(logits(reloaded, probe), logits(parent, probe), rtol=1e-6, atol=1e-6)


def zeroed_parent(parent, kept):
    """The parent with every removed KV group, FFN channel and hidden channel zeroed (biases included: an o_proj or
    down_proj bias writes into the hidden channels). Dropping hidden channels changes each hidden-wide RMSNorm's mean
    (D' instead of D): the zeroed parent matches once each such norm's weight is scaled by sqrt(D'/D) and its epsilon
    by D'/D. Qwen3's q_norm / k_norm act on head_dim, which width pruning keeps: they are left alone."""
    model = copy.deepcopy(parent)
    config = parent.config
    hd, group_size = head_dim(config), config.num_attention_heads // config.num_key_value_heads
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
            ffn_kept = torch.zeros(config.intermediate_size, dtype=torch.bool)
            ffn_kept[kept["ffn"][i]] = True
            attention, mlp = layer.self_attn, layer.mlp
            attention.o_proj.weight[:, ~head_kept] = 0
            mlp.down_proj.weight[:, ~ffn_kept] = 0
            for out in (attention.o_proj, mlp.down_proj):
                out.weight[~hidden_kept] = 0
                if out.bias is not None:
                    out.bias[~hidden_kept] = 0
    return model


@pytest.mark.parametrize("method", ["minitron-width", "llm-pruner"])
@pytest.mark.parametrize("family", PARENTS)
def test_a_width_pruned_model_is_the_parent_with_the_removed_structures_zeroed(family, method, parents, calibration,
                                                                               probe):
    parent, _ = load_model(parents[family])
    result = prune(copy.deepcopy(parent), method, 0.5, calibration)
    config = result.model.config
    assert config.num_key_value_heads < parent.config.num_key_value_heads
    assert config.intermediate_size < parent.config.intermediate_size
    assert (config.hidden_size < parent.config.hidden_size) == (method == "minitron-width")
    expected = logits(zeroed_parent(parent, result.removed), probe)
    torch.testing.assert_close(logits(result.model, probe), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, logits(parent, probe), atol=1e-2)


def test_qwen2_biases_are_cut_with_their_heads_rows(parents, calibration):
    parent, _ = load_model(parents["qwen2"])
    result = prune(copy.deepcopy(parent), "minitron-width", 0.5, calibration)
    hd, group_size = head_dim(parent.config), 3
    hidden = torch.tensor(result.removed["hidden"])
    for i, layer in enumerate(result.model.model.layers):
        groups = result.removed["kv_groups"][i]
        kv_rows = torch.tensor([g * hd + c for g in groups for c in range(hd)])
        q_rows = torch.tensor([(g * group_size + j) * hd + c for g in groups for j in range(group_size)
                               for c in range(hd)])
        source = parent.model.layers[i].self_attn
        assert torch.equal(layer.self_attn.q_proj.bias, source.q_proj.bias[q_rows])
        assert torch.equal(layer.self_attn.k_proj.bias, source.k_proj.bias[kv_rows])
        assert torch.equal(layer.self_attn.v_proj.bias, source.v_proj.bias[kv_rows])
        assert torch.equal(layer.self_attn.q_proj.weight, source.q_proj.weight[q_rows][:, hidden])
        assert layer.self_attn.o_proj.bias is None


@pytest.mark.parametrize("method", ["minitron-width", "llm-pruner"])
def test_qwen3_q_and_k_norms_stay_whole_when_heads_and_hidden_channels_leave(method, parents, calibration):
    parent, _ = load_model(parents["qwen3"])
    result = prune(copy.deepcopy(parent), method, 0.5, calibration)
    config = result.model.config
    assert config.head_dim == 16 and config.num_attention_heads < 4
    if method == "minitron-width":
        assert config.hidden_size < 44 and config.hidden_size != config.num_attention_heads * config.head_dim
    for pruned, source in zip(result.model.model.layers, parent.model.layers, strict=True):
        for name in ("q_norm", "k_norm"):
            kept, original = getattr(pruned.self_attn, name).weight, getattr(source.self_attn, name).weight
            assert kept.shape == (16,) and torch.equal(kept, original)


def test_qwen3_width_sizes_need_not_be_multiples_of_the_heads_but_llamas_are():
    qwen3 = make_config("qwen3-0.6b", 151936, 4096)
    sizes = width_sizes(qwen3, 0.5, ["heads", "ffn", "hidden"])
    heads = sizes.kv_groups * 2
    assert sizes.hidden % heads  # 713: what the balanced rule picks when any hidden size is allowed
    assert 1 - decoder_layer_params(qwen3, *sizes.__dict__.values()) / decoder_layer_params(qwen3) == pytest.approx(
        0.5, abs=1e-3)
    llama = make_config("llama-3.1-8b", 128256, 4096)
    sizes = width_sizes(llama, 0.5, ["heads", "ffn", "hidden"])
    assert sizes.hidden % (sizes.kv_groups * 4) == 0


# ---------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def foreign_parents(tmp_path_factory):
    """Folders holding the config of model types gridlab does not prune."""
    from transformers import GemmaConfig, GPT2Config

    root = tmp_path_factory.mktemp("foreign")
    folders = {}
    for name, config in (("gpt2", GPT2Config(n_layer=2, n_embd=32, n_head=2)),
                         ("gemma", GemmaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16))):
        config.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def _grid(parent: dict, tokenizer: dict, **changes):
    from runner_helpers import tiny_grid

    grid = tiny_grid(settings=[1], methods=[{"name": "shortgpt"}, {"name": "minitron-width"}, {"name": "wanda"}],
                     **changes)
    grid["parent"] = parent
    grid["tokenizer"] = tokenizer
    return grid


@pytest.mark.parametrize("model_type", ["gpt2", "gemma"])
def test_another_model_type_is_refused_in_one_line_when_planned_and_in_the_parent_stage(
        model_type, foreign_parents, parents, tokenizer_dir, tmp_path):
    from gridlab.contracts import DataPayload, LoadedParent, make_stage
    from gridlab.layout import RunPaths
    from gridlab.plan import build_plan
    from gridlab.results import write_result
    from gridlab.spec import parse_grid
    from gridlab.stages import run_stage

    folder = foreign_parents[model_type]
    with pytest.raises(UserError) as error:
        build_plan(parse_grid(_grid({"path": str(folder), "tokens": 10**6}, {"path": str(tokenizer_dir)})))
    message = str(error.value)
    assert "\n" not in message and f"model_type {model_type!r}" in message and str(folder) in message
    assert "llama, mistral, qwen2, qwen3" in message
    # The parent stage refuses it too (a plan made before the folder changed, or a hand-made stage).
    run = RunPaths(tmp_path / "run")
    plan = build_plan(parse_grid(_grid({"path": str(parents["qwen3"]), "tokens": 10**6}, {"path": str(tokenizer_dir)})))
    (data,) = [s for s in plan.stages.values() if s.kind == "data"]
    write_result(run.stage(data.id), data, DataPayload(tokenizer_dir=str(tokenizer_dir), shards={}, vocab_size=VOCAB,
                                                       corpus_fingerprint="", manifest={}))
    stage = make_stage(LoadedParent(path=str(folder), model_identity={}, tokens=1), {"data": data.id})
    with pytest.raises(UserError, match=f"model_type {model_type!r} is not a family gridlab prunes; supported"):
        run_stage(stage, run.root)


def test_a_model_of_another_family_is_refused_by_prune(calibration):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64))
    with pytest.raises(ValueError, match="supported family .llama, mistral, qwen2, qwen3"):
        prune(gpt2, "wanda", 0.5, calibration)


def test_layers_of_mixed_attention_types_are_refused_in_one_line(calibration):
    config = make_config("qwen2.5-0.5b", VOCAB, 64, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         max_window_layers=2)
    with pytest.raises(UserError, match="mix attention types .full_attention, sliding_attention.") as error:
        check_supported(config)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="mix attention types"):
        prune(init_model(config, 0), "shortgpt", 0.5, calibration)


# ---------------------------------------------------------------- grids, overrides

def test_a_grid_plans_a_loaded_parent_of_each_family_and_checks_a_declared_preset(parents, tokenizer_dir):
    from gridlab.plan import build_plan
    from gridlab.spec import parse_grid

    for family, folder in parents.items():
        plan = build_plan(parse_grid(_grid({"path": str(folder), "tokens": 10**6}, {"path": str(tokenizer_dir)})))
        inits = [s for s in plan.stages.values() if s.kind == "init" and hasattr(s.config, "architecture")]
        assert inits and {s.config.architecture["model_type"] for s in inits} == {family_type(family)}
    preset, shape = PARENTS["qwen3"]
    ids = special_token_ids(load_tokenizer(tokenizer_dir))
    declaring = {"path": str(parents["qwen3"]), "tokens": 10**6, "preset": preset,
                 "overrides": {**shape, "vocab_size": VOCAB, **ids}}
    plan = build_plan(parse_grid(_grid(declaring, {"path": str(tokenizer_dir)})))
    (parent,) = [s for s in plan.stages.values() if s.kind == "parent"]
    check_declared_architecture(parent.config.declared, AutoConfig.from_pretrained(parents["qwen3"]), "qwen3")
    wrong = {**declaring, "overrides": {**declaring["overrides"], "head_dim": 32}}
    (parent,) = [s for s in build_plan(parse_grid(_grid(wrong, {"path": str(tokenizer_dir)}))).stages.values()
                 if s.kind == "parent"]
    with pytest.raises(UserError, match="head_dim: declared 32, loaded 16"):
        check_declared_architecture(parent.config.declared, AutoConfig.from_pretrained(parents["qwen3"]), "qwen3")


@pytest.mark.parametrize("preset,key,value,message", [
    ("qwen2.5-0.5b", "head_dim", 32, "not a Qwen2Config field"),
    ("qwen2.5-0.5b", "attention_bias", True, "not a Qwen2Config field"),
    ("qwen2.5-0.5b", "sliding_window", "long", "refused by Qwen2Config"),
    ("mistral-7b", "sliding_window", 1.5, "not a whole number"),
    ("mistral-7b", "rms_norm_eps", 1, "refused by MistralConfig: Field 'rms_norm_eps' expected float"),
    ("qwen3-0.6b", "use_sliding_window", 1, "not true or false"),
    ("qwen3-0.6b", "model_type", "llama", "not a Qwen3Config field"),
    ("qwen3-0.6b", "rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "Missing required keys"),
])
def test_parent_overrides_are_checked_against_the_familys_config_class(preset, key, value, message):
    from gridlab.spec import parse_grid

    from runner_helpers import tiny_grid

    grid = tiny_grid()
    grid["parent"] = {**grid["parent"], "preset": preset, "overrides": {**grid["parent"]["overrides"], key: value}}
    with pytest.raises(UserError) as error:
        parse_grid(grid)
    assert f"parent.overrides.{key}" in str(error.value) and message in str(error.value), str(error.value)


def test_make_config_leaves_the_presets_and_the_callers_overrides_as_they_were():
    rope = {"rope_type": "default"}  # transformers fills in rope_theta
    before = copy.deepcopy(PRESETS["qwen3-0.6b"])
    config = make_config("qwen3-0.6b", VOCAB, 64, rope_parameters=rope)
    assert "rope_theta" in config.rope_parameters
    assert rope == {"rope_type": "default"} and PRESETS["qwen3-0.6b"] == before


def test_a_qwen3_preset_takes_a_hidden_size_that_is_not_a_multiple_of_its_heads():
    from gridlab.spec import parse_grid

    from runner_helpers import tiny_grid

    grid = tiny_grid()
    grid["parent"] = {**grid["parent"], "preset": "qwen3-0.6b",
                      "overrides": {"hidden_size": 30, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "head_dim": 16, "num_hidden_layers": 2, "intermediate_size": 64}}
    parse_grid(grid)
    grid["parent"]["preset"] = "micro"
    with pytest.raises(UserError, match="num_attention_heads 4 does not divide hidden_size 30"):
        parse_grid(grid)


# ---------------------------------------------------------------- layer by layer from disk

@pytest.mark.parametrize("method", ["shortgpt", "sparsegpt"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_layerwise_pruning_of_a_qwen_parent_equals_in_memory_pruning(family, method, parents, calibration, probe,
                                                                     tmp_path):
    from gridlab.layerwise import open_layerwise, save_layerwise

    expected = prune(load_model(parents[family])[0], method, 0.5, calibration, batch_size=3)
    model = open_layerwise(parents[family], "cpu", tmp_path / "spill")
    assert type(model) is FAMILIES[family].model_class
    result = prune(model, method, 0.5, calibration, batch_size=3)
    path = save_layerwise(result.model, tmp_path / "out", mask=result.mask)
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(reloaded) is type(expected.model)
    assert reloaded.config.to_dict().keys() == expected.model.config.to_dict().keys()
    assert architecture_diff(reloaded.config, expected.model.config) == []
    state = reloaded.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.model.state_dict().items())
    torch.testing.assert_close(logits(reloaded, probe), logits(expected.model, probe), rtol=0, atol=0)


# ---------------------------------------------------------------- GGUF conversion

@pytest.mark.parametrize("family,architecture_name,extra", [
    ("qwen2", "qwen2", {}),
    ("qwen3", "qwen3", {"head_dim": 128}),  # transformers reads a Qwen3 GGUF with Qwen3Config's head_dim, 128
    ("mistral", "llama", {"max_position_embeddings": 4096}),  # llama.cpp writes Mistral as "llama"
])
def test_a_gguf_file_of_each_family_converts_to_a_plain_hf_folder(family, architecture_name, extra, tokenizer_dir,
                                                                  probe, tmp_path):
    from gguf_helpers import write_gguf

    from gridlab.convert import main

    preset, shape = PARENTS[family]
    config = make_config(preset, VOCAB, 64, **{**shape, "num_hidden_layers": 2, **extra},
                         **special_token_ids(load_tokenizer(tokenizer_dir)))
    source = make_parent(config)
    gguf = write_gguf(source, load_tokenizer(tokenizer_dir), tmp_path / f"{family}.gguf", architecture_name,
                      f"tiny {family}")
    args = ["--gguf", str(gguf), "--out", str(tmp_path / "hf")] + (["--as-mistral", "8"] if family == "mistral"
                                                                    else [])
    assert main(args) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(converted) is type(source)
    # What a GGUF does not record takes the family's default: only Qwen2's inert max_window_layers (no sliding
    # window) and its unused use_mrope differ from the published preset (docs/pruning.md, "Families").
    assert architecture_diff(source.config, converted.config) == (
        ["max_window_layers: declared 24, loaded 28", "use_mrope: declared False, loaded absent"]
        if family == "qwen2" else [])
    assert converted.config.model_type == family and getattr(converted.config, "sliding_window", None) == \
        getattr(source.config, "sliding_window", None)
    torch.testing.assert_close(logits(converted, probe), logits(source, probe), rtol=1e-5, atol=1e-5)
    assert len(load_tokenizer(tmp_path / "hf")) == VOCAB
    if family == "mistral":  # without --as-mistral, the same file is the Llama llama.cpp says it is
        assert main(["--gguf", str(gguf), "--out", str(tmp_path / "llama")]) == 0
        as_llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
        assert as_llama.config.model_type == "llama"
        short = probe[:, :8]  # within the window, Llama and Mistral attend alike
        torch.testing.assert_close(logits(as_llama, short), logits(source, short), rtol=1e-5, atol=1e-5)
        assert main(["--gguf", str(gguf), "--out", str(tmp_path / "v03"), "--as-mistral", "none"]) == 0
        unwindowed = AutoModelForCausalLM.from_pretrained(tmp_path / "v03")
        assert unwindowed.config.model_type == "mistral" and unwindowed.config.sliding_window is None
        torch.testing.assert_close(logits(unwindowed, probe), logits(as_llama, probe), rtol=1e-5, atol=1e-5)
    else:
        assert main(["--gguf", str(gguf), "--out", str(tmp_path / "no"), "--as-mistral", "8"]) == 2


def test_a_qwen3_gguf_whose_head_dim_transformers_cannot_read_is_refused(tokenizer_dir, tmp_path, capsys):
    from gguf_helpers import write_gguf

    from gridlab.convert import main

    preset, shape = PARENTS["qwen3"]  # head_dim 16: not Qwen3Config's default
    source = make_parent(make_config(preset, VOCAB, 64, **{**shape, "num_hidden_layers": 2}))
    gguf = write_gguf(source, load_tokenizer(tokenizer_dir), tmp_path / "q.gguf", "qwen3", "tiny qwen3")
    assert main(["--gguf", str(gguf), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "heads are 16 wide" in err and "head_dim 128" in err
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- a grid end to end

@pytest.mark.slow
def test_a_grid_with_a_loaded_qwen3_parent_runs_end_to_end_layer_by_layer(parents, tmp_path):
    import duckdb
    from typer.testing import CliRunner

    from gridlab.cli import app
    from gridlab.layout import RunPaths

    from runner_helpers import write_grid

    grid = _grid({"path": str(parents["qwen3"]), "tokens": 10**6}, {"path": str(parents["qwen3"])},
                 name="qwen3", budgets=[1024], calibration={"sequences": 4, "layerwise": True})
    grid["methods"].append({"name": "sparsegpt"})
    result = CliRunner().invoke(app, ["submit", str(write_grid(tmp_path, grid)), "--executor", "debug"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "qwen3"
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        assert connection.execute("SELECT DISTINCT status FROM cells").fetchall() == [("done",)]
    models = {}
    for stage_file in run_dir.glob("stages/*/stage.json"):
        stage = json.loads(stage_file.read_text())
        if stage["kind"] in ("prune", "init"):
            payload = json.loads((stage_file.parent / "result.json").read_text())["payload"]
            models[stage["kind"], stage["config"].get("method")] = (payload, stage["config"])
    assert {method for kind, method in models if kind == "prune"} == {"shortgpt", "minitron-width", "wanda",
                                                                        "sparsegpt"}
    for (kind, method), (payload, config) in models.items():
        saved = json.loads((Path(payload["model_path"]) / "config.json").read_text())
        assert saved["model_type"] == "qwen3" and saved["head_dim"] == 16
        if kind == "prune":
            assert payload["layerwise"] == (method in ("shortgpt", "wanda", "sparsegpt"))
        elif "architecture" in config:  # a random twin: the architecture the plan computed is the saved one
            assert architecture_diff(config["architecture"], saved) == []


def test_the_qwen3_example_plans_a_qwen3_parent_and_qwen3_twins():
    from gridlab.plan import build_plan
    from gridlab.spec import load_grid

    from runner_helpers import REPO

    plan = build_plan(load_grid(REPO / "examples" / "qwen3-tiny.toml"))
    (parent,) = [s for s in plan.stages.values() if s.kind == "parent"]
    assert parent.config.architecture["model_type"] == "qwen3" and parent.config.architecture["head_dim"] == 16
    assert parent.config.architecture["hidden_size"] == 32  # 4 heads × 16 = 64 query channels from 32
    twins = [s.config.architecture for s in plan.stages.values() if s.kind == "init" and hasattr(s.config,
                                                                                                 "architecture")]
    assert len(twins) == 3  # depth (shared by both depth methods), minitron-width, llm-pruner
    assert all(t["model_type"] == "qwen3" and t["head_dim"] == 16 for t in twins)
