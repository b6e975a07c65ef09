"""Result files and their ingest into DuckDB: complete rows, corrupt files rejected, idempotent, concurrent writers."""

import multiprocessing
import subprocess
import sys

import duckdb
import pytest

from gridlab import db, execute
from gridlab.layout import RunPaths
from gridlab.plan import build_plan
from gridlab.spec import parse_grid
from gridlab.state import stage_states

from runner_helpers import finish_stage, tiny_grid

SIX = [{"name": n} for n in ("shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt")]


def _prepared(tmp_path, **changes):
    plan = build_plan(parse_grid(tiny_grid(runs_dir=str(tmp_path), **changes)))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    return plan, run_dir


def _finish(run_dir, stage):
    finish_stage(run_dir, stage)


def _ingest(run_dir, plan):
    return db.ingest(run_dir, stage_states(run_dir, list(plan.stages.values()), verify=True))


def _query(run_dir, sql):
    with duckdb.connect(str(RunPaths(run_dir).database), read_only=True) as connection:
        return connection.execute(sql).fetchall()


def test_ingest_fills_every_table(tmp_path):
    plan, run_dir = _prepared(tmp_path, budgets=[2048, 4096])
    for stage in plan.stages.values():
        _finish(run_dir, stage)
    counts = _ingest(run_dir, plan)
    # 2 inits × budgets {0 (the reference point), 2048, 4096} × 2 settings
    assert counts["cells"] == len(plan.cells) == 12
    assert _query(run_dir, "SELECT DISTINCT status FROM cells") == [("done",)]
    assert _query(run_dir, "SELECT count(*) FROM stages WHERE status = 'done'") == [(len(plan.stages),)]
    # trained cells: 5 curve points × (train_loss, lr) + val_loss/val_ppl at the branch end and at 0 tokens;
    # budget-0 cells that train nothing: val_loss/val_ppl at 0 tokens
    per_cell = _query(run_dir, "SELECT c.trained_tokens, count(*) FROM metrics m JOIN cells c USING (cell_id) "
                               "GROUP BY c.cell_id, c.trained_tokens ORDER BY ALL")
    assert per_cell == [(0, 2)] * 3 + [(2048, 14)] * 3 + [(4096, 14)] * 4 + [(4096 + 2048, 14), (4096 + 4096, 14)]
    random_setting_2 = _query(run_dir, "SELECT trained_tokens FROM cells WHERE init = 'random' AND setting = 2 "
                                       "ORDER BY trained_tokens")
    assert random_setting_2 == [(4096,), (4096 + 2048,), (4096 + 4096,)]
    assert _query(run_dir, "SELECT name, parent_tokens, corpus_fingerprint FROM grid") == [("tiny", 4096, "f00d")]
    # the parent's size, from its stage's payload (the report's tokens per parameter)
    assert _query(run_dir, "SELECT parent_params FROM grid") == [(111,)]  # fake_payload: params.total
    assert _query(run_dir, "SELECT DISTINCT achieved_ratio FROM cells") == [(0.51,)]
    # the trained model's parameters (runner_helpers' payloads count 111) and the parent's: tokens per parameter
    assert _query(run_dir, "SELECT DISTINCT params FROM cells") == [(111,)]
    assert _query(run_dir, "SELECT DISTINCT higher_is_better FROM metrics WHERE name = 'val_loss'") == [(False,)]
    assert _query(run_dir, "SELECT DISTINCT higher_is_better FROM metrics WHERE name = 'lr'") == [(None,)]
    assert _query(run_dir, "SELECT DISTINCT stderr FROM metrics WHERE name = 'val_loss'") == [(0.05,)]
    # the parent's evaluation: its own loss, and the floors (references: tokens 0, no direction)
    assert _query(run_dir, "SELECT name, tokens, stderr, higher_is_better FROM parent_metrics ORDER BY name") == [
        ("floor/uniform_loss", 0, 0.0, None), ("floor/unigram_loss", 0, 0.04, None),
        ("val_loss", 4096, 0.05, False), ("val_ppl", 4096, 0.05 * 2.718281828 ** 4.0, False)]


def test_corrupt_or_foreign_result_is_a_failed_stage_never_ingested(tmp_path):
    plan, run_dir = _prepared(tmp_path)
    for stage in plan.stages.values():
        _finish(run_dir, stage)
    run = RunPaths(run_dir)
    train = next(s for s in plan.stages.values() if s.kind == "train")
    result_file = run.stage(train.id).result
    result_file.write_text(result_file.read_text()[:-40])                       # truncated
    evaluation = next(s for s in plan.stages.values()
                      if s.kind == "eval" and s.deps.get("train") not in (None, train.id))
    edited = run.stage(evaluation.id).result
    edited.write_text(edited.read_text().replace('"value":4.0', '"value":0.0', 1))  # checksum no longer matches
    _ingest(run_dir, plan)
    failed = dict(_query(run_dir, "SELECT stage_id, error FROM stages WHERE status = 'failed'"))
    assert set(failed) == {train.id, evaluation.id}
    assert "incomplete" in failed[train.id] and "checksum" in failed[evaluation.id]
    # the cells below the truncated train stage and those of the edited branch fail; the others are untouched
    expected = {c.cell_id: "failed" if train.id == c.train_stage or evaluation.id == c.eval_stage else "done"
                for c in plan.cells}
    assert dict(_query(run_dir, "SELECT cell_id, status FROM cells")) == expected
    assert set(expected.values()) == {"failed", "done"}
    assert _query(run_dir, "SELECT count(*) FROM metrics WHERE name = 'val_loss' AND value = 0.0") == [(0,)]


def test_reingest_is_idempotent(tmp_path):
    plan, run_dir = _prepared(tmp_path)
    for stage in plan.stages.values():
        _finish(run_dir, stage)
    _ingest(run_dir, plan)
    first = [_query(run_dir, f"SELECT * FROM {table} ORDER BY ALL") for table in ("cells", "metrics", "stages")]
    _ingest(run_dir, plan)
    second = [_query(run_dir, f"SELECT * FROM {table} ORDER BY ALL") for table in ("cells", "metrics", "stages")]
    assert first == second


def _write_results(args):
    run_dir, stages = args
    for stage in stages:
        _finish(run_dir, stage)
    return len(stages)


def test_64_concurrent_writers_every_row_once(tmp_path):
    plan, run_dir = _prepared(tmp_path, methods=SIX, ratios=[0.5, 0.75], seeds=list(range(4)), budgets=[2048, 4096])
    stages = list(plan.stages.values())
    assert len(stages) >= 64
    chunks = [(run_dir, stages[i::64]) for i in range(64)]
    with multiprocessing.get_context("fork").Pool(64) as pool:
        pending = pool.map_async(_write_results, chunks)
        while not pending.ready():          # the one writer ingests while the workers write
            _ingest(run_dir, plan)
        assert sum(pending.get()) == len(stages)
    _ingest(run_dir, plan)
    assert _query(run_dir, "SELECT count(*), count(DISTINCT cell_id) FROM cells") == [(len(plan.cells),) * 2]
    assert _query(run_dir, "SELECT count(*) FROM cells WHERE status = 'done'") == [(len(plan.cells),)]
    assert _query(run_dir, "SELECT count(*), count(DISTINCT stage_id) FROM stages") == [(len(stages),) * 2]
    duplicates = _query(run_dir, "SELECT cell_id, tokens, name, count(*) FROM metrics GROUP BY ALL HAVING count(*) > 1")
    assert duplicates == []


def test_workers_cannot_reach_the_database():
    """The worker side (gridlab.stages and what it imports) never loads the database module or DuckDB. (polars is
    allowed: an eval stage writes its per-document losses as Parquet with it, a file, not the database.)"""
    code = ("import sys, gridlab.stages, gridlab.execute; "
            "print(sorted(m for m in sys.modules if m in ('duckdb', 'gridlab.db')))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_a_sparse_models_parameters_leave_out_its_masks_zeros():
    from gridlab.contracts import InitPayload, PrunePayload

    params = {"decoder": 1000, "embedding": 100, "total": 1110}
    sparse = PrunePayload(model_path="m", achieved_ratio=0.5, granularity="sparse", calibration_sequences=4,
                          layerwise=False, params=params)
    depth = PrunePayload(model_path="m", achieved_ratio=0.5, granularity="depth", calibration_sequences=4,
                         layerwise=False, params=params)
    assert db._nonzero_params(sparse, sparse) == 610
    assert db._nonzero_params(InitPayload(model_path="m", params=params), sparse) == 610  # the twin has the mask
    assert db._nonzero_params(depth, depth) == 1110
    assert db._nonzero_params(None, sparse) is None


def test_document_losses_are_ingested_and_read_per_cell(tmp_path):
    """Each eval stage's document_losses.parquet lands in the document_losses table; the report's reader gives
    them per cell, and two arms' rows give their paired gap exactly."""
    import numpy as np
    import polars as pl

    from gridlab.measure import DOCUMENT_LOSS_SCHEMA, paired_gap
    from gridlab.report.read import document_losses
    from gridlab.results import read_payload, write_result

    plan, run_dir = _prepared(tmp_path)
    run = RunPaths(run_dir)
    keys = np.array([11, 22, 33], np.uint64)
    evals = [stage for stage in plan.stages.values() if stage.kind == "eval"]
    for number, stage in enumerate(evals):
        _finish(run_dir, stage)
        if stage is evals[-1]:
            continue                     # a result without the file (written before eval version 2): no rows
        path = run.stage(stage.id).document_losses
        pl.DataFrame({"metric": "val_loss", "document": keys, "tokens": [10.0, 20.0, 30.0],
                      "loss_sum": [40.0 + number, 80.0, 120.0 - number], "windows": [1, 2, 3],
                      "sampled": [1, 2, 3]}, schema=DOCUMENT_LOSS_SCHEMA).write_parquet(path)
        payload = read_payload(run.stage(stage.id)).model_copy(update={"document_losses": str(path)})
        write_result(run.stage(stage.id), stage, payload)
    for stage in plan.stages.values():
        if stage.kind != "eval":
            _finish(run_dir, stage)
    run.stage(evals[0].id).document_losses.unlink()     # a file gone: its rows are missing, the ingest goes on
    assert _ingest(run_dir, plan)["document_losses"] == 3 * (len(evals) - 2)
    pl.DataFrame({"metric": "val_loss", "document": keys, "tokens": [10.0, 20.0, 30.0], "loss_sum": [40.0, 80.0, 120.0],
                  "windows": [1, 2, 3], "sampled": [1, 2, 3]},
                 schema=DOCUMENT_LOSS_SCHEMA).write_parquet(run.stage(evals[0].id).document_losses)
    counts = _ingest(run_dir, plan)
    assert counts["document_losses"] == 3 * (len(evals) - 1)
    assert _query(run_dir, "SELECT count(DISTINCT eval_stage), sum(tokens) FROM document_losses") == [
        (len(evals) - 1, 60.0 * (len(evals) - 1))]
    # the metrics and the other tables are untouched by it
    assert _query(run_dir, "SELECT DISTINCT stderr FROM metrics WHERE name = 'val_loss'") == [(0.05,)]
    rows = document_losses(run.database)
    cells = {c.cell_id: c for c in plan.cells}
    assert set(rows["cell_id"]) == {c.cell_id for c in plan.cells if c.eval_stage != evals[-1].id}
    assert rows.filter(pl.col("cell_id") == rows["cell_id"][0]).height == 3
    assert all(cells[cell].eval_stage == stage for cell, stage in rows.select("cell_id", "eval_stage").iter_rows())
    assert document_losses(run.database, metric="eval/other/loss").height == 0
    first, second = (rows.filter(pl.col("cell_id") == cell) for cell in rows["cell_id"].unique(maintain_order=True)[:2])
    gap = paired_gap(first, second)
    assert gap.value == pytest.approx(first["loss_sum"].sum() / 60 - second["loss_sum"].sum() / 60)
    with duckdb.connect(str(run.database), read_only=True) as connection:      # an open connection works too
        assert document_losses(connection).equals(rows)
