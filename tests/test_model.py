import pytest
import torch
from transformers import AutoModelForCausalLM

from gridlab.model import (
    PRESETS,
    decoder_layer_params,
    head_dim,
    init_model,
    load_model,
    make_config,
    param_counts,
    save_model,
)


def test_micro_preset_has_the_documented_size_and_grouped_query_attention():
    config = make_config("micro", vocab_size=4096, seq_len=256)
    counts = param_counts(config)
    assert counts.total == pytest.approx(2.0e6, rel=0.03)
    assert config.num_key_value_heads < config.num_attention_heads


@pytest.mark.parametrize("preset", ["pico", "micro", "nano"])
def test_small_presets_have_enough_layers_for_distinct_depth_ratios(preset):
    layers = make_config(preset, 4096, 256).num_hidden_layers
    assert layers >= 12
    assert len({round(layers * (1 - ratio)) for ratio in (0.5, 0.6, 0.7, 0.8)}) == 4


def test_llama_8b_preset_counts_eight_billion_parameters():
    counts = param_counts(make_config("llama-3.1-8b", vocab_size=128256, seq_len=8192))
    assert counts.total == pytest.approx(8.03e9, rel=0.01)
    assert counts.decoder == pytest.approx(6.98e9, rel=0.01)


@pytest.mark.parametrize("preset", ["pico", "micro", "nano"])
def test_config_counts_match_the_built_model(preset):
    config = make_config(preset, vocab_size=512, seq_len=64)
    assert param_counts(config) == param_counts(init_model(config, 0))


def test_head_dim_and_layer_count_follow_the_config_and_replaced_widths():
    config = make_config("micro", vocab_size=512, seq_len=64)
    assert head_dim(config) == config.hidden_size // config.num_attention_heads
    model = init_model(config, 0)
    layer = model.model.layers[0]
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert decoder_layer_params(config) == weights
    # one KV group fewer (and its query heads), half the FFN: what a width-pruned layer holds
    groups = config.num_attention_heads // config.num_key_value_heads
    expected = 2 * config.hidden_size * head_dim(config) * (config.num_attention_heads - groups
                                                            + config.num_key_value_heads - 1)
    expected += 3 * config.hidden_size * config.intermediate_size // 2
    assert decoder_layer_params(config, kv_groups=config.num_key_value_heads - 1,
                                ffn=config.intermediate_size // 2) == expected


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown model preset 'tiny'; valid presets: pico, micro, nano") as error:
        make_config("tiny", 512, 64)
    assert "\n" not in str(error.value)


def test_overrides_replace_preset_fields():
    config = make_config("micro", 512, 64, num_hidden_layers=3)
    assert config.num_hidden_layers == 3 and config.hidden_size == PRESETS["micro"]["hidden_size"]


def test_init_is_seeded_and_truncated():
    config = make_config("micro", 512, 64, num_hidden_layers=2)
    a, b, c = init_model(config, 1), init_model(config, 1), init_model(config, 2)
    weight = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])
    values = a.state_dict()[weight]
    assert values.abs().max() <= 0.04 and values.std().item() == pytest.approx(0.0176, rel=0.05)


def test_saved_model_loads_without_gridlab_and_keeps_its_mask(tmp_path):
    config = make_config("micro", 512, 64, num_hidden_layers=2)
    model = init_model(config, 0)
    name = "model.layers.1.self_attn.q_proj.weight"
    mask = {name: torch.rand(dict(model.named_parameters())[name].shape) > 0.5}
    path = save_model(model, tmp_path / "model", mask=mask)
    plain = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    loaded, loaded_mask = load_model(path)
    assert torch.equal(loaded_mask[name], mask[name])
    save_model(init_model(config, 1), tmp_path / "model")  # replaces the old folder whole: the mask goes too
    assert load_model(tmp_path / "model")[1] is None
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_save_that_fails_midway_leaves_neither_a_folder_nor_debris(tmp_path):
    model = init_model(make_config("micro", 512, 64, num_hidden_layers=2), 0)
    save_model(model, tmp_path / "ckpt")
    bad_mask = {"model.layers.0.mlp.up_proj.weight": "not a tensor"}
    with pytest.raises(AttributeError):
        save_model(model, tmp_path / "ckpt", mask=bad_mask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the old checkpoint stays whole
    reloaded, mask = load_model(tmp_path / "ckpt")
    assert mask is None


PIPELINE_SCRIPT = """
import json, sys
sys.modules["gridlab"] = None  # no gridlab code: importing it from here would fail
from transformers import pipeline
generate = pipeline("text-generation", model=sys.argv[1], device="cpu")
out = generate("def main", max_new_tokens=8, do_sample=False)
print(json.dumps({"text": out[0]["generated_text"], "eos": generate.model.generation_config.eos_token_id,
                  "pad": generate.model.generation_config.pad_token_id, "tok_eos": generate.tokenizer.eos_token}))
"""


def test_a_saved_model_with_its_tokenizer_generates_through_a_plain_transformers_pipeline(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from gridlab.data import CorpusSource, SplitFractions, load_tokenizer, train_tokenizer

    tokenizer_dir = train_tokenizer(CorpusSource(kind="stdlib", max_documents=30), SplitFractions(), 512,
                                    tmp_path / "tokenizer")
    model = init_model(make_config("micro", 512, 64, num_hidden_layers=2), 0)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (2, None)  # LlamaConfig's defaults
    folder = save_model(model, tmp_path / "model", tokenizer=tokenizer_dir)
    tokenizer = load_tokenizer(folder)  # the tokenizer travels with the weights
    assert (tokenizer.convert_ids_to_tokens(0), tokenizer.convert_ids_to_tokens(1)) == ("<|endoftext|>", "<|pad|>")
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    for saved in (config, generation):
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (0, 0, 1)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(folder)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["text"].startswith("def main") and len(result["text"]) > len("def main")
    assert (result["eos"], result["pad"], result["tok_eos"]) == (0, 1, "<|endoftext|>")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    from gridlab.data import CorpusSource, SplitFractions, train_tokenizer

    tokenizer_dir = train_tokenizer(CorpusSource(kind="stdlib", max_documents=30), SplitFractions(), 512,
                                    tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="512 tokens but the model's vocabulary holds 256"):
        save_model(init_model(make_config("micro", 256, 64, num_hidden_layers=1), 0), tmp_path / "m",
                   tokenizer=tokenizer_dir)
    assert not (tmp_path / "m").exists()


def test_a_saved_checkpoint_is_readable_by_others_under_the_umask(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        folder = save_model(init_model(make_config("micro", 256, 32, num_hidden_layers=1), 0), tmp_path / "m")
    finally:
        os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
