"""Pruning a parent whose decoder layers stay on disk: same result as in memory, one layer resident at a time."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from gridlab.data import TokenShard
from gridlab.evaluate import heldout_loss
from gridlab.layerwise import INDEX_FILE, open_layerwise, save_layerwise
from gridlab.model import MASK_FILE, init_model, load_model, make_config, save_model
from gridlab.pruning import prune


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    model = init_model(make_config("micro", vocab_size=256, seq_len=64), seed=0)
    with torch.no_grad():  # larger weights so every layer changes the residual stream visibly
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(5.0)
    return save_model(model, tmp_path_factory.mktemp("parent") / "model")


@pytest.fixture(scope="module")
def calibration():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


def materialized_layers(model) -> int:
    return sum(1 for layer in model.model.layers if not next(layer.parameters()).is_meta)


@pytest.mark.parametrize("method", ["shortgpt", "wanda", "sparsegpt", "magnitude"])
def test_layerwise_pruning_equals_in_memory_pruning(method, parent_dir, calibration, tmp_path):
    expected = prune(load_model(parent_dir)[0], method, 0.5, calibration, batch_size=3) \
        if method != "magnitude" else prune(load_model(parent_dir)[0], method, 0.5)

    model = open_layerwise(parent_dir, "cpu", tmp_path / "spill")
    assert materialized_layers(model) == 0
    seen = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(materialized_layers(model)))
    options = dict(batch_size=3) if method != "magnitude" else {}
    result = prune(model, method, 0.5, calibration if method != "magnitude" else None, **options)
    assert materialized_layers(result.model) == 0
    if method != "magnitude":
        assert seen and max(seen) == 1  # every layer ran alone
    assert model.layer_store.peak_resident == 1
    assert result.achieved_ratio == pytest.approx(expected.achieved_ratio)
    assert result.removed == expected.removed

    out = save_layerwise(result.model, tmp_path / "pruned", mask=result.mask)
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == expected.model.config.num_hidden_layers + 1
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers, no gridlab
    assert reloaded.config.num_hidden_layers == expected.model.config.num_hidden_layers
    want = expected.model.state_dict()
    got = reloaded.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    if expected.mask:
        _, mask = load_model(out)
        assert mask.keys() == expected.mask.keys()
        assert all(torch.equal(mask[name], expected.mask[name]) for name in mask)
    else:
        assert not (out / MASK_FILE).exists()


def test_heldout_loss_layer_by_layer_equals_the_whole_model(parent_dir, tmp_path):
    # documents of unequal lengths (windows of several widths, padded batches), scored after the eos (token 0)
    np.random.default_rng(3).integers(1, 256, size=640).astype(np.uint16).tofile(tmp_path / "v.bin")
    (tmp_path / "v.json").write_text(json.dumps({"seq_len": 64, "n_sequences": 10, "dtype": "uint16",
                                                 "eos_token_id": 0, "documents": [200, 7, 90, 64, 279]}))
    shard = TokenShard.open(tmp_path / "v.bin")
    whole = heldout_loss(load_model(parent_dir)[0], shard, batch_size=4)
    layerwise = heldout_loss(open_layerwise(parent_dir, "cpu", tmp_path / "spill"), shard, batch_size=4)
    assert layerwise.tokens == whole.tokens == 640
    assert layerwise.doc_loss == pytest.approx(whole.doc_loss, rel=1e-6)
    assert layerwise.loss == pytest.approx(whole.loss, rel=1e-6)


def test_a_method_that_needs_the_whole_model_refuses_a_layerwise_parent(parent_dir, calibration, tmp_path):
    model = open_layerwise(parent_dir, "cpu", tmp_path / "spill")
    with pytest.raises(ValueError, match="minitron-width needs the whole parent in memory; .*wanda"):
        prune(model, "minitron-width", 0.5, calibration)


def test_a_failure_inside_a_layer_leaves_no_half_pruned_layer_behind(parent_dir, calibration, tmp_path):
    from gridlab.layerwise import sequential_layers

    model = open_layerwise(parent_dir, "cpu", tmp_path / "spill")
    flow = sequential_layers(model, calibration, 4)
    with pytest.raises(RuntimeError, match="boom"):
        try:
            for index, layer, _ in flow:
                with torch.no_grad():
                    layer.mlp.down_proj.weight.zero_()
                if index == 1:
                    raise RuntimeError("boom")
        finally:
            flow.close()
    spilled = sorted(p.name for p in (tmp_path / "spill").iterdir())
    assert spilled == ["layer-00000.safetensors"]  # layer 0 finished; layer 1 failed and was not written
    assert materialized_layers(model) == 0


@pytest.mark.slow
def test_a_grid_with_layerwise_calibration_prunes_from_disk_and_trains_the_result(tmp_path):
    import duckdb
    from typer.testing import CliRunner

    from gridlab.cli import app
    from gridlab.layout import RunPaths

    from runner_helpers import tiny_grid, write_grid

    grid = tiny_grid(name="layerwise", inits=["pruned"], settings=[1], budgets=[1024],
                     calibration={"sequences": 4, "layerwise": True},
                     methods=[{"name": "wanda"}, {"name": "minitron-width"}])
    result = CliRunner().invoke(app, ["submit", str(write_grid(tmp_path, grid)), "--executor", "debug"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "layerwise"
    prunes = {}
    for stage_file in run_dir.glob("stages/*/stage.json"):
        stage = json.loads(stage_file.read_text())
        if stage["kind"] == "prune":
            prunes[stage["config"]["method"]] = json.loads((stage_file.parent / "result.json").read_text())["payload"]
    assert prunes["wanda"]["layerwise"] and not prunes["minitron-width"]["layerwise"]
    wanda_dir = Path(prunes["wanda"]["model_path"])
    assert (wanda_dir / INDEX_FILE).exists() and (wanda_dir / MASK_FILE).exists()
    assert not (wanda_dir.parent / "layer-spill").exists()
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        statuses = connection.execute("SELECT DISTINCT method, status FROM cells ORDER BY method").fetchall()
    assert statuses == [("minitron-width", "done"), ("wanda", "done")]


def test_reopening_discards_the_spill_of_an_interrupted_attempt(parent_dir, calibration, tmp_path):
    first = open_layerwise(parent_dir, "cpu", tmp_path / "spill")
    prune(first, "wanda", 0.5, calibration, batch_size=3)  # leaves pruned layers in the spill folder
    second = open_layerwise(parent_dir, "cpu", tmp_path / "spill")
    assert not any((tmp_path / "spill").iterdir())
    layer = second.model.layers[0]
    tensors = second.layer_store.layer_tensors(layer)
    parent_weight = load_model(parent_dir)[0].model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(tensors["mlp.down_proj.weight"], parent_weight)
