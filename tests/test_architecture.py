"""The random arm is the pruned arm's architecture exactly, for a Llama-3.1-shaped parent loaded from an HF folder.

The parent has what a small gridlab preset lacks: llama3 rope scaling, tied embeddings, grouped-query attention, an
explicit head_dim, a context longer than the grid's sequences and the tokenizer's special-token ids.
"""

import copy
import json

import pytest
import torch
from transformers import AutoConfig

from gridlab.data import CorpusSource, SplitFractions, train_tokenizer
from gridlab.model import (
    PRESETS,
    architecture,
    architecture_diff,
    init_model,
    load_model,
    make_config,
    save_model,
    special_token_ids,
)
from gridlab.pruning import prune, pruned_config, random_counterpart

STUDY_METHODS = ("shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt")
# A Llama-3.1-8B in miniature: every field of the preset but the shapes (and tying, which Llama 3.2 uses).
SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tokenizer(CorpusSource(kind="stdlib", max_documents=30), SplitFractions(), 512,
                           tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def declared(tokenizer_dir):
    """The parent's architecture as a grid declares it: preset + overrides (the tokenizer's ids among them)."""
    from gridlab.data import load_tokenizer

    return make_config("llama-3.1-8b", 512, 64, **SHAPE, **special_token_ids(load_tokenizer(tokenizer_dir)))


@pytest.fixture(scope="module")
def parent_dir(declared, tokenizer_dir, tmp_path_factory):
    model = init_model(declared, seed=0)
    with torch.no_grad():  # larger weights so every layer and channel matters to the scores
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(5.0)
    return save_model(model, tmp_path_factory.mktemp("parent") / "parent", tokenizer=tokenizer_dir)


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(2, 512, (8, 32), generator=torch.Generator().manual_seed(1))


def test_the_llama31_preset_is_the_published_architecture():
    config = make_config("llama-3.1-8b", vocab_size=128256, seq_len=4096)
    assert config.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    assert (config.max_position_embeddings, config.rms_norm_eps, config.tie_word_embeddings) == (131072, 1e-5, False)
    assert (config.head_dim, config.num_key_value_heads, config.bos_token_id, config.eos_token_id) == (128, 8, 128000,
                                                                                                        128001)


def test_make_config_keeps_the_presets_fields_and_gives_seq_len_only_where_the_preset_has_no_context():
    assert make_config("pico", 512, 64).max_position_embeddings == 64
    assert make_config("llama-3.1-8b", 512, 64).max_position_embeddings == 131072
    assert make_config("smollm2-135m", 49152, 64).tie_word_embeddings is True
    assert make_config("micro", 512, 64, max_position_embeddings=256).max_position_embeddings == 256
    assert make_config("llama-3.1-8b", 512, 64, rope_theta=1e4).rope_parameters["factor"] == 8.0
    assert make_config("llama-3.1-8b", 512, 64, rope_theta=1e4).rope_parameters["rope_theta"] == 1e4
    with pytest.raises(ValueError, match="seq_len 300 exceeds .* max_position_embeddings 256"):
        make_config("micro", 512, 300, max_position_embeddings=256)
    assert all("vocab_size" not in fields for fields in PRESETS.values())


def test_architecture_diff_names_each_differing_field_and_ignores_volatile_ones(declared, parent_dir):
    loaded = AutoConfig.from_pretrained(parent_dir)
    assert architecture_diff(declared, loaded) == []  # transformers_version, dtype, _name_or_path, architectures
    assert architecture_diff(declared, json.loads((parent_dir / "config.json").read_text())) == []
    other = copy.deepcopy(loaded)
    other.rope_parameters = {**other.rope_parameters, "factor": 4.0}
    other.tie_word_embeddings = False
    other.rms_norm_eps = float(torch.tensor(1e-5, dtype=torch.float32))  # a float32 round trip is no difference
    assert architecture_diff(declared, other) == ["rope_parameters.factor: declared 8.0, loaded 4.0",
                                                  "tie_word_embeddings: declared True, loaded False"]
    default_rope = make_config("micro", 512, 64)
    assert "rope_parameters.factor: declared absent, loaded 8.0" in architecture_diff(default_rope, declared)


@pytest.mark.parametrize("method", STUDY_METHODS)
def test_the_random_init_model_is_the_pruned_models_architecture_in_every_field(
        method, declared, parent_dir, calibration, tmp_path):
    parent, _ = load_model(parent_dir)
    parent_config = copy.deepcopy(parent.config)
    result = prune(parent, method, 0.5, calibration)
    # The random arm as the init stage builds it: from pruned_config of the parent's real config ...
    random = init_model(pruned_config(parent_config, method, 0.5), seed=3)
    assert random.config.to_dict() == result.model.config.to_dict()
    # ... and from the declared preset + overrides, which the parent stage has checked against the checkpoint.
    assert architecture_diff(pruned_config(declared, method, 0.5), result.model.config) == []
    for field in ("rope_parameters", "rms_norm_eps", "tie_word_embeddings", "head_dim", "max_position_embeddings",
                  "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"):
        assert getattr(random.config, field) == getattr(result.model.config, field) == getattr(parent_config, field)
    assert random.config.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(random.model.rotary_emb.inv_freq, result.model.model.rotary_emb.inv_freq,
                               rtol=0, atol=0)
    assert random.lm_head.weight is random.model.embed_tokens.weight
    assert result.model.lm_head.weight is result.model.model.embed_tokens.weight
    if result.mask is not None:
        twin = random_counterpart(result, seed=3)
        assert twin.model.config.to_dict() == random.config.to_dict()
        params = dict(twin.model.named_parameters())
        assert all(torch.equal(params[name] != 0, keep) for name, keep in result.mask.items())
    # Saved and reloaded, the two folders describe one architecture and one set of special tokens.
    pruned_dir = save_model(result.model, tmp_path / "pruned", mask=result.mask, tokenizer=parent_dir)
    random_dir = save_model(random, tmp_path / "random", tokenizer=parent_dir)
    configs = [json.loads((folder / "config.json").read_text()) for folder in (pruned_dir, random_dir)]
    assert architecture(configs[0]) == architecture(configs[1])
    generation = [json.loads((folder / "generation_config.json").read_text()) for folder in (pruned_dir, random_dir)]
    assert {k: generation[0].get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        k: generation[1].get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def _declaring_grid(parent_dir, **overrides):
    from runner_helpers import tiny_grid

    grid = tiny_grid(settings=[1])
    grid["parent"] = {"path": str(parent_dir), "tokens": 10**9, "preset": "llama-3.1-8b",
                      "overrides": {**SHAPE, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 0,
                                    "pad_token_id": 1, **overrides}}
    grid["tokenizer"] = {"path": str(parent_dir)}
    return grid


def test_the_parent_stage_checks_a_declared_architecture_against_the_checkpoint(parent_dir):
    from gridlab.errors import UserError
    from gridlab.model import check_declared_architecture
    from gridlab.plan import build_plan
    from gridlab.spec import parse_grid

    loaded = AutoConfig.from_pretrained(parent_dir)
    plan = build_plan(parse_grid(_declaring_grid(parent_dir)))
    (parent,) = [stage for stage in plan.stages.values() if stage.kind == "parent"]
    check_declared_architecture(parent.config.declared, loaded, str(parent_dir))  # matches: no error
    inits = [stage for stage in plan.stages.values() if stage.kind == "init" and hasattr(stage.config, "architecture")]
    assert inits and all(architecture_diff(stage.config.architecture, pruned_config(loaded, "shortgpt", 0.5)) == []
                         for stage in inits)

    wrong = build_plan(parse_grid(_declaring_grid(parent_dir, num_hidden_layers=6, rms_norm_eps=1e-6)))
    (parent,) = [stage for stage in wrong.stages.values() if stage.kind == "parent"]
    with pytest.raises(UserError) as error:
        check_declared_architecture(parent.config.declared, loaded, str(parent_dir))
    message = str(error.value)
    assert "\n" not in message and str(parent_dir) in message
    assert "num_hidden_layers: declared 6, loaded 8; rms_norm_eps: declared 1e-06, loaded 1e-05" in message
