"""Result files and their ingest into DuckDB: complete rows, corrupt files rejected, idempotent, concurrent writers."""

import multiprocessing

import duckdb

from gridlab import execute, store
from gridlab.plan import build_plan
from gridlab.spec import parse_grid
from runner_helpers import fake_payload, tiny_grid

SIX = [{"name": n} for n in ("shortgpt", "minitron-depth", "minitron-width", "llm-pruner", "wanda", "sparsegpt")]


def _prepared(tmp_path, **changes):
    plan = build_plan(parse_grid(tiny_grid(runs_dir=str(tmp_path), **changes)))
    run_dir = plan.spec.run_dir
    execute.prepare(plan, run_dir)
    return plan, run_dir


def _finish(run_dir, stage):
    store.write_result(run_dir / "stages" / stage["id"], stage, fake_payload(stage))


def _query(run_dir, sql):
    with duckdb.connect(str(run_dir / store.DATABASE), read_only=True) as connection:
        return connection.execute(sql).fetchall()


def test_ingest_fills_every_table(tmp_path):
    plan, run_dir = _prepared(tmp_path, budgets=[2048, 4096])
    for stage in plan.stages.values():
        _finish(run_dir, stage)
    counts = store.ingest(run_dir)
    assert counts["cells"] == len(plan.cells) == 8
    assert _query(run_dir, "SELECT DISTINCT status FROM cells") == [("done",)]
    assert _query(run_dir, "SELECT count(*) FROM stages WHERE status = 'done'") == [(len(plan.stages),)]
    # 5 curve points × (train_loss, lr) + val_loss/val_ppl at the branch end + val_loss/val_ppl at 0 tokens
    assert _query(run_dir, "SELECT count(*) FROM metrics GROUP BY cell_id") == [(14,)] * 8
    random_setting_2 = _query(run_dir, "SELECT trained_tokens FROM cells WHERE init = 'random' AND setting = 2 "
                                       "ORDER BY trained_tokens")
    assert random_setting_2 == [(4096 + 2048,), (4096 + 4096,)]
    assert _query(run_dir, "SELECT name, parent_tokens, corpus_fingerprint FROM grid") == [("tiny", 4096, "f00d")]
    assert _query(run_dir, "SELECT DISTINCT achieved_ratio FROM cells") == [(0.51,)]


def test_corrupt_or_foreign_result_is_a_failed_stage_never_ingested(tmp_path):
    plan, run_dir = _prepared(tmp_path)
    for stage in plan.stages.values():
        _finish(run_dir, stage)
    train = next(s for s in plan.stages.values() if s["kind"] == "train")
    result_file = run_dir / "stages" / train["id"] / store.RESULT
    result_file.write_text(result_file.read_text()[:-40])                       # truncated
    evaluation = next(s for s in plan.stages.values() if s["kind"] == "eval" and s["deps"]["train"] != train["id"])
    edited = run_dir / "stages" / evaluation["id"] / store.RESULT
    edited.write_text(edited.read_text().replace('"value":4.0', '"value":0.0', 1))  # checksum no longer matches
    store.ingest(run_dir)
    failed = dict(_query(run_dir, "SELECT stage_id, error FROM stages WHERE status = 'failed'"))
    assert set(failed) == {train["id"], evaluation["id"]}
    assert "incomplete" in failed[train["id"]] and "checksum" in failed[evaluation["id"]]
    assert _query(run_dir, "SELECT DISTINCT status FROM cells") == [("failed",)]   # each cell sits below one
    assert _query(run_dir, "SELECT count(*) FROM metrics WHERE name = 'val_loss' AND value = 0.0") == [(0,)]


def test_reingest_is_idempotent(tmp_path):
    plan, run_dir = _prepared(tmp_path)
    for stage in plan.stages.values():
        _finish(run_dir, stage)
    store.ingest(run_dir)
    first = [_query(run_dir, f"SELECT * FROM {table} ORDER BY ALL") for table in ("cells", "metrics", "stages")]
    store.ingest(run_dir)
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
            store.ingest(run_dir)
        assert sum(pending.get()) == len(stages)
    store.ingest(run_dir)
    assert _query(run_dir, "SELECT count(*), count(DISTINCT cell_id) FROM cells") == [(len(plan.cells),) * 2]
    assert _query(run_dir, "SELECT count(*) FROM cells WHERE status = 'done'") == [(len(plan.cells),)]
    assert _query(run_dir, "SELECT count(*), count(DISTINCT stage_id) FROM stages") == [(len(stages),) * 2]
    duplicates = _query(run_dir, "SELECT cell_id, tokens, name, count(*) FROM metrics GROUP BY ALL HAVING count(*) > 1")
    assert duplicates == []
