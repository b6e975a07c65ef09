"""The arms' stages run for real on a tiny grid with a learning-rate sweep: the embeddings control's model, the
density-scaled sparse twin, and evaluations that measure the selection half apart from the reported half."""

import numpy as np
import polars as pl
import pytest
import torch

from gridlab import execute
from gridlab.contracts import EmbeddingsInit, EvalBranch, MaskInit
from gridlab.data import TokenShard
from gridlab.evaluate import document_parts, select_sequences
from gridlab.layout import RunPaths
from gridlab.measure import SELECT_METRIC
from gridlab.model import load_model
from gridlab.plan import build_plan
from gridlab.pruning.counterpart import row_scale
from gridlab.results import read_payload
from gridlab.spec import parse_grid
from gridlab.stages import execute_stage

from runner_helpers import tiny_grid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A wanda grid with all three arms and a swept random lr, its stages up to one random branch's evaluation."""
    folder = tmp_path_factory.mktemp("arms")
    grid = tiny_grid(runs_dir=str(folder), methods=[{"name": "wanda"}], inits=["pruned", "random", "embeddings"],
                     settings=[1], evaluation={"max_sequences": 64},
                     schedule={**tiny_grid()["schedule"], "random": {"lr": [1e-3, 1e-2]}},
                     splits={"pretrain": 0.4, "retrain": 0.3, "calibration": 0.1, "validation": 0.2})
    plan = build_plan(parse_grid(grid))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    stages = list(plan.stages.values())
    twin = next(s for s in stages if isinstance(s.config, MaskInit))
    control = next(s for s in stages if isinstance(s.config, EmbeddingsInit))
    train = next(s for s in stages if s.kind == "train" and s.deps["model"] == twin.id)
    evaluation = next(s for s in stages if isinstance(s.config, EvalBranch) and s.deps["train"] == train.id)
    order = [next(s for s in stages if s.kind == kind) for kind in ("data", "parent", "prune")]
    for stage in [*order, twin, control, train, evaluation]:
        assert execute_stage(run_dir, stage.id, redirect_output=False), stage.kind
    return dict(plan=plan, paths=RunPaths(run_dir), stages={s.kind: s for s in order}, twin=twin, control=control,
                evaluation=evaluation)


def _model(run, stage):
    return load_model(read_payload(run["paths"].stage(stage.id)).model_path)


def test_the_embeddings_control_is_the_twin_with_the_parents_embeddings(run):
    parent, _ = _model(run, run["stages"]["parent"])
    twin, twin_mask = _model(run, run["twin"])
    control, control_mask = _model(run, run["control"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        got = dict(control.named_parameters())[name]
        assert torch.equal(got, dict(parent.named_parameters())[name]), name
        assert not torch.equal(got, dict(twin.named_parameters())[name]), name
    parent_params, twin_params = dict(parent.named_parameters()), dict(twin.named_parameters())
    for name, param in control.named_parameters():
        if name.endswith("proj.weight") or "layernorm" in name:
            assert torch.equal(param, twin_params[name]), name          # the twin's decoder ...
            if name.endswith("proj.weight"):
                assert not torch.equal(param, parent_params[name]), name   # ... not the parent's
    # a sparse control keeps the pruned model's mask, on the twin's decoder
    pruned_mask = load_model(read_payload(run["paths"].stage(run["stages"]["prune"].id)).model_path)[1]
    assert control_mask.keys() == twin_mask.keys() == pruned_mask.keys()
    assert all(torch.equal(control_mask[n], pruned_mask[n]) for n in pruned_mask)


def test_the_sparse_twin_is_drawn_at_its_rows_density(run):
    twin, mask = _model(run, run["twin"])
    params = dict(twin.named_parameters())
    for name, keep in mask.items():
        scale = row_scale(keep)
        assert torch.equal(params[name] != 0, keep)
        kept = params[name][keep]
        # each row's surviving weights: the dense init's draw times 1/√density (|w| ≤ 2 · 0.02 / √density)
        bound = (0.04 * scale)[:, None].expand_as(keep)[keep]
        assert bool((kept.abs() <= bound * (1 + 1e-6)).all()) and kept.abs().max() > 0.04


def test_a_sweeps_evaluation_reads_the_selection_half_apart_from_the_reported_half(run):
    """val_loss/select and val_loss are measured on disjoint documents — each on its own half, fixed by the document
    key — so the choice of lr never reads a document the reported loss is measured on; the reported loss has the
    sample size of a grid without a sweep, the selection half SELECT_SHARE of it."""
    files = run["paths"].stage(run["evaluation"].id)
    payload = read_payload(files)
    metrics = {m.name: m for m in payload.metrics}
    assert {"val_loss", "val_ppl", SELECT_METRIC} <= metrics.keys()
    documents = pl.read_parquet(files.document_losses)
    report = documents.filter(pl.col("metric") == "val_loss")
    select = documents.filter(pl.col("metric") == SELECT_METRIC)
    assert report.height >= 2 and select.height >= 2
    assert not set(report["document"].to_list()) & set(select["document"].to_list())
    data = read_payload(run["paths"].stage(run["stages"]["data"].id))
    index = TokenShard.open(data.shards["validation"]).documents()
    half = dict(zip(index.keys.tolist(), document_parts(index).tolist(), strict=True))
    assert all(half[key] for key in select["document"].to_list())
    assert not any(half[key] for key in report["document"].to_list())
    for rows, name in ((report, "val_loss"), (select, SELECT_METRIC)):
        assert rows["loss_sum"].sum() / rows["tokens"].sum() == pytest.approx(metrics[name].value)
    assert select["sampled"].sum() <= select_sequences(64) < report["sampled"].sum() <= 64
    assert np.isfinite(metrics[SELECT_METRIC].stderr) and metrics[SELECT_METRIC].higher_is_better is False
