"""Adaptive studies on a tiny grid with fake execution (tests/adaptive_helpers.py: every stage's payload is a fake
one, the held-out losses carry planted gaps): the planner's hook for added cells, rounds that add the right cells,
the record surviving a crash between rounds, a second `submit --adaptive` going on where the first stopped, the caps,
SLURM advancing one round per call, what status, the database and the report show."""

import json
import math
import re

import duckdb
import pytest
from adaptive_helpers import fake_execution, planted, upstream_loss_writer
from typer.testing import CliRunner

from gridlab import api, rounds
from gridlab.cells import CellKey as ExtraCell
from gridlab.cells import fits
from gridlab.cli import app, format_status
from gridlab.errors import UserError
from gridlab.layout import RunPaths
from gridlab.plan import build_plan
from gridlab.plantext import format_plan
from gridlab.spec import parse_grid

from runner_helpers import FakeSlurm, tiny_grid, write_grid

BUDGETS = [1024, 4096]


def _grid(tmp_path, adaptive=None, **changes):
    """The tiny grid, 2 ratios × 2 budgets, setting 1, seeds 0 and 1; `adaptive` keys over max_seeds 5 and margin
    0.05 (None leaves a key out)."""
    table = {"max_seeds": 5, "margin": 0.05, **(adaptive or {})}
    grid = tiny_grid(name="a", runs_dir=str(tmp_path / "runs"), seeds=[0, 1], budgets=BUDGETS, settings=[1],
                     ratios=[0.25, 0.5], adaptive={k: v for k, v in table.items() if v is not None})
    grid.update(changes)
    return grid


def _submit(path, **options):
    lines = []
    outcome = api.submit(path, executor="debug", adaptive=True, report=lines.append, **options)
    return outcome, lines


def _record(tmp_path):
    return rounds.read_record(tmp_path / "runs" / "a")


# Planted gaps pruned − random (val_loss: negative = pruning better), sd of the seed and cell effects 0.02.
def decided_and_open(method, ratio, tokens):
    """Ratio 0.25: −1 nat, decided at the first look; ratio 0.5: −0.06, open with 2 and 3 seeds, decided with 4."""
    return -1.0 if ratio < 0.4 else -0.06


def crossing(method, ratio, tokens):
    """−0.5 at 1,024 tokens, +0.5 at 4,096: a crossover at 2,048 that both ends decide at the first look."""
    return -0.5 + 0.5 * math.log2(tokens / 1024)


# ------------------------------------------------------------------------------------------------ the planner's hook


def test_a_seed_added_plans_the_stages_of_that_seed_in_a_fixed_grid(tmp_path):
    spec = parse_grid(_grid(tmp_path))
    fixed = build_plan(parse_grid(_grid(tmp_path, seeds=[0, 1, 2])))
    extra = [ExtraCell(method="shortgpt", ratio=r, seed=2, budget=b, setting=1) for r in (0.25, 0.5) for b in BUDGETS]
    added = build_plan(spec, extra_cells=extra)
    assert set(added.stages) == set(fixed.stages)                 # the same ids: what is computed
    fixed_cells = {c.cell_id for c in fixed.cells}
    assert {c.cell_id for c in added.cells} <= fixed_cells
    missing = [c for c in fixed.cells if c.cell_id not in {a.cell_id for a in added.cells}]
    assert missing == []    # seed 2's cells, its reference points (budget 0) included: a replicate has them
    seed_2 = [c for c in added.cells if c.seed == 2]
    assert added.added == len(seed_2) == 12 and build_plan(spec).added == 0
    assert "12 added by adaptive rounds" in format_plan(added)


def test_a_budget_added_is_one_more_branch_of_the_same_trajectory(tmp_path):
    spec = parse_grid(_grid(tmp_path))
    before = build_plan(spec)
    extra = [ExtraCell(method="shortgpt", ratio=0.5, seed=s, budget=2048, setting=1) for s in (0, 1)]
    after = build_plan(spec, extra_cells=extra)
    old = {c.cell_id: c.eval_stage for c in before.cells}
    assert all(old[c.cell_id] == c.eval_stage for c in after.cells if c.cell_id in old)   # every branch eval stays
    new = [c for c in after.cells if c.cell_id not in old]
    assert {(c.ratio, c.budget_tokens, c.init) for c in new} == {(0.5, 2048, "pruned"), (0.5, 2048, "random")}
    trains = {s.config.trajectory: s.config.budgets for s in after.train_stages()}
    assert sorted(trains[t] for t in trains if 2048 in trains[t]) == [[1024, 2048, 4096]] * 4
    assert {s.config.trajectory for s in before.train_stages()} == set(trains)      # no new trajectory
    ignored = [ExtraCell(method="wanda", ratio=0.5, seed=0, budget=2048, setting=1),
               ExtraCell(method="shortgpt", ratio=0.3, seed=0, budget=2048, setting=1),
               ExtraCell(method="shortgpt", ratio=0.5, seed=0, budget=2048, setting=2)]
    fitting = [cell for cell in ignored if fits(spec, cell)]   # gridlab.rounds.extra_cells keeps only these
    assert fitting == [] and set(build_plan(spec, extra_cells=fitting).stages) == set(before.stages)


# ------------------------------------------------------------------------------------------------ the loop


def test_rounds_add_the_next_seed_where_a_verdict_is_open_and_stop_when_every_verdict_is_decided(tmp_path,
                                                                                                monkeypatch):
    fake_execution(monkeypatch, planted(decided_and_open, sd=0.02))
    path = write_grid(tmp_path, _grid(tmp_path))
    outcome, lines = _submit(path)
    assert outcome.exit_code == 0
    record = _record(tmp_path)
    assert record.rounds, lines
    first = record.rounds[0]
    assert not first.budgets
    assert {(a.ratio, a.budget, a.seed) for a in first.seeds} == {(0.5, b, 2) for b in BUDGETS}   # the open cells
    assert all("inconclusive with 2 seed(s)" in a.why for a in first.seeds)
    for later in record.rounds[1:]:   # each round the next seed of what is still open, never a decided cell
        assert all(a.ratio == 0.5 and a.seed == later.round + 1 for a in later.seeds)
    assert record.stopped.reason == "decided" and "every verdict is decided" in record.stopped.line
    assert record.stopped.verdicts["prune"] == 4
    assert outcome.adaptive.status == "stopped" and any("adaptive: round 1:" in line for line in lines)
    # the added cells are ordinary cells: the database, status, the report
    database = RunPaths(tmp_path / "runs" / "a").database
    with duckdb.connect(str(database), read_only=True) as con:
        seeds = con.execute("select ratio, max(seed) from cells where status = 'done' and budget_tokens > 0 "
                        "group by ratio order by ratio").fetchall()
        assert seeds == [(0.25, 1), (0.5, len(record.rounds) + 1)]
        assert con.execute("select count(*) from adaptive_rounds").fetchone()[0] == len(record.rounds)
        assert con.execute("select count(*) from adaptive_additions where round = 1").fetchone()[0] == 2
        assert con.execute("select stopped, rounds from adaptive").fetchone() == ("decided", len(record.rounds))
    status = api.status(path)
    assert status["cells"]["done"] == status["cells"]["done"] and status["cells"]["pending"] == 0
    text = format_status(status)
    assert "adaptive study: looks at 2–5 seeds per cell, Pocock-type alpha spending, margin 0.05" in text
    assert "round 1: the next seed of 2 cell(s) whose verdict is inconclusive" in text
    assert "stopped (decided)" in text
    files = api.report(path, out=tmp_path / "report")
    summary = files["summary"].read_text()
    assert "## How the design was reached" in summary and "repeated confidence interval" in summary
    html = files["html"].read_text()
    assert 'id="design"' in html and "Sequential verdicts." in html
    again, lines = _submit(path)      # nothing left to do: the same look, the same reason
    assert again.adaptive.status == "stopped" and len(_record(tmp_path).rounds) == len(record.rounds)


def test_a_bracketed_crossover_gets_the_budget_that_halves_it(tmp_path, monkeypatch):
    fake_execution(monkeypatch, planted(crossing, sd=0.005))
    path = write_grid(tmp_path, _grid(tmp_path))
    _submit(path)
    record = _record(tmp_path)
    first = record.rounds[0]
    assert not first.seeds
    assert {(a.ratio, a.budget, tuple(a.seeds)) for a in first.budgets} == {(r, 2048, (0, 1)) for r in (0.25, 0.5)}
    assert all("crossover between 1,024 and 4,096 tokens" in a.why for a in first.budgets)
    cells = api.plan(path).cells
    assert {c.budget_tokens for c in cells if c.budget_tokens} == {1024, 2048, 4096}
    assert record.stopped is not None


def test_caps_stop_the_study_and_say_which(tmp_path, monkeypatch):
    fake_execution(monkeypatch, planted(decided_and_open, sd=0.02))
    path = write_grid(tmp_path, _grid(tmp_path, adaptive={"max_tokens": 100}))
    outcome, _ = _submit(path)
    record = _record(tmp_path)
    assert not record.rounds and record.stopped.reason == "cap"
    assert "cap reached: round 1 (2 seed(s), 0 budget(s)) would train" in record.stopped.line
    assert "max_tokens 100" in outcome.adaptive.line
    # max_seeds at the grid's own seeds: the open cells can get nothing more
    other = tmp_path / "other"
    other.mkdir()
    path = write_grid(other, _grid(other, adaptive={"max_seeds": 2}))
    _submit(path)
    stopped = rounds.read_record(other / "runs" / "a").stopped
    assert stopped.reason == "exhausted" and "of the 2 inconclusive cell(s), 2 have max_seeds = 2 seeds" in stopped.line


def test_a_cell_even_max_seeds_would_hardly_decide_gets_no_seed(tmp_path, monkeypatch):
    """Futility: a gap at the margin against a spread ten times larger — max_seeds would decide it with a chance
    under [adaptive] futility, so no seed is spent on it; with futility = 0 it gets its seeds."""
    fake_execution(monkeypatch, planted(lambda method, ratio, tokens: -1.0 if ratio < 0.4 else -0.05, sd=0.3))
    path = write_grid(tmp_path, _grid(tmp_path, adaptive={"futility": 0.5}))
    _submit(path)
    record = _record(tmp_path)
    assert all(a.ratio == 0.25 for r in record.rounds for a in r.seeds)        # never the hopeless ratio 0.5
    assert record.stopped.reason == "exhausted"
    assert "would be decided with less than a 50% chance even with max_seeds (futility)" in record.stopped.line
    other = tmp_path / "other"
    other.mkdir()
    _submit(write_grid(other, _grid(other, adaptive={"futility": 0})))
    assert any(a.ratio == 0.5 for r in rounds.read_record(other / "runs" / "a").rounds for a in r.seeds)


def test_the_sequential_design_cannot_change_after_a_look(tmp_path, monkeypatch):
    """max_seeds and the margin are the design the verdicts were made with: changing them is refused in one line
    (a cap — below — may change)."""
    fake_execution(monkeypatch, planted(decided_and_open, sd=0.02))
    path = write_grid(tmp_path, _grid(tmp_path, adaptive={"max_seeds": 3}))
    _submit(path)
    first = _record(tmp_path)
    assert len(first.rounds) == 1 and first.stopped.reason == "exhausted"
    write_grid(tmp_path, _grid(tmp_path, adaptive={"max_seeds": 5}))
    with pytest.raises(UserError, match=r"another sequential design \(max_seeds 3 → 5\)"):
        _submit(path)
    write_grid(tmp_path, _grid(tmp_path, adaptive={"max_seeds": 3}, report={"margin": 0.1}))
    with pytest.raises(UserError, match="adaptive.margin"):
        _submit(path)


def test_a_second_submit_goes_on_where_the_first_stopped(tmp_path, monkeypatch):
    """Stopped by max_tokens; the cap raised in the grid file, the next `submit --adaptive` adds the rounds."""
    fake_execution(monkeypatch, planted(decided_and_open, sd=0.02))
    path = write_grid(tmp_path, _grid(tmp_path, adaptive={"max_tokens": 100}))
    _submit(path)
    assert _record(tmp_path).stopped.reason == "cap" and not _record(tmp_path).rounds
    write_grid(tmp_path, _grid(tmp_path, adaptive={"max_tokens": 10_000_000}))
    outcome, _ = _submit(path)
    record = _record(tmp_path)
    assert record.rounds and record.stopped.reason == "decided"
    assert record.rounds[0].seeds[0].seed == 2


def test_the_record_survives_a_crash_between_rounds(tmp_path, monkeypatch):
    """The process dies right after round 1 is recorded, before any of its stages ran: the next call plans the
    recorded cells, runs them and goes on to the same end as a run without the crash."""
    from gridlab import adaptive

    fake_execution(monkeypatch, planted(decided_and_open, sd=0.02))
    real = adaptive.write_record

    def dies_after_writing(run_dir, record):
        real(run_dir, record)
        if record.rounds and record.stopped is None:
            raise KeyboardInterrupt

    monkeypatch.setattr(adaptive, "write_record", dies_after_writing)
    path = write_grid(tmp_path, _grid(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        _submit(path)
    crashed = _record(tmp_path)
    assert len(crashed.rounds) == 1 and crashed.stopped is None
    assert api.status(path)["held_by"] is None                       # the lock went with the process
    study = api.status(path)["adaptive"]
    assert len(study["rounds"]) == 1 and study["stopped"] is None      # status shows the round, going on
    monkeypatch.setattr(adaptive, "write_record", real)
    outcome, _ = _submit(path)
    assert outcome.exit_code == 0
    resumed = _record(tmp_path)
    assert resumed.rounds[0] == crashed.rounds[0]
    clean = tmp_path / "clean"
    clean.mkdir()
    _submit(write_grid(clean, _grid(clean)))
    uninterrupted = rounds.read_record(clean / "runs" / "a")
    strip = lambda r: [(e.model_dump(exclude={"looked_at"})) for e in r.rounds]  # noqa: E731
    assert strip(resumed) == strip(uninterrupted) and resumed.stopped.reason == uninterrupted.stopped.reason


def test_mistakes_are_one_line_before_anything_runs(tmp_path, monkeypatch):
    fake_execution(monkeypatch, planted(decided_and_open))
    plain = _grid(tmp_path)
    del plain["adaptive"]
    path = write_grid(tmp_path, plain)
    with pytest.raises(UserError, match=r"--adaptive needs an \[adaptive\] table"):
        _submit(path)
    path = write_grid(tmp_path, _grid(tmp_path))
    with pytest.raises(UserError, match="--where selects a sub-grid"):
        _submit(path, where=["ratio=0.5"])
    path = write_grid(tmp_path, _grid(tmp_path, adaptive={"max_gpu_hours": 10}))
    with pytest.raises(UserError, match="adaptive.max_gpu_hours: this grid has no GPU-hour estimate"):
        _submit(path)
    assert not (tmp_path / "runs" / "a").exists()
    result = CliRunner().invoke(app, ["submit", str(write_grid(tmp_path, plain)), "--adaptive"])
    assert result.exit_code == 2 and "[adaptive]" in result.output


# ------------------------------------------------------------------------------------------------ SLURM


def test_slurm_advances_the_study_one_round_per_call(tmp_path, monkeypatch):
    slurm = FakeSlurm(tmp_path / "slurm", monkeypatch, timeout_s=1.0)
    finish = upstream_loss_writer(planted(decided_and_open, sd=0.02))
    path = write_grid(tmp_path, _grid(tmp_path))
    run_dir = tmp_path / "runs" / "a"

    def call():
        lines = []
        outcome = api.submit(path, executor="slurm", adaptive=True, report=lines.append)
        assert outcome.exit_code == 0, lines
        return outcome, lines

    _, lines = call()                                   # the grid's cells go out; nothing to look at yet
    jobs = len(slurm.calls("sbatch"))
    assert jobs and not _record(tmp_path).rounds
    assert any("the grid's cells submitted" in line for line in lines)
    call()                                              # still queued: no look, nothing submitted twice
    assert len(slurm.calls("sbatch")) == jobs and not _record(tmp_path).rounds
    finish(run_dir, api.plan(path))                      # the jobs ran
    _, lines = call()                                   # a look, round 1 recorded and submitted
    record = _record(tmp_path)
    assert len(record.rounds) == 1 and record.stopped is None
    assert len(slurm.calls("sbatch")) > jobs
    assert any("round 1 submitted" in line for line in lines)
    submitted = [json.loads(RunPaths(run_dir).stage(s.id).submit.read_text())
                 for s in api.plan(path).stages.values() if s.kind == "prune" and s.config.seed == 2]
    assert submitted and all(r["backend"] == "slurm" and r["job_id"] for r in submitted)
    call()                                              # round 1 still queued: no second round
    assert len(_record(tmp_path).rounds) == 1
    finish(run_dir, api.plan(path))
    call()
    record = _record(tmp_path)
    assert len(record.rounds) == 2 or record.stopped is not None


def test_slurm_with_wait_runs_the_rounds_to_the_end(tmp_path, monkeypatch):
    """`--wait` on SLURM: each round is submitted, waited for and looked at, until the study stops."""
    from gridlab import execute

    FakeSlurm(tmp_path / "slurm", monkeypatch, timeout_s=1.0)
    finish = upstream_loss_writer(planted(decided_and_open, sd=0.02))
    path = write_grid(tmp_path, _grid(tmp_path))
    run_dir = tmp_path / "runs" / "a"
    waited = []

    def jobs_run(run_dir_, stages, report=print, poll_s=5.0):  # the cluster runs every submitted job
        waited.append(len(stages))
        finish(run_dir_, api.plan(path))
        return {}

    monkeypatch.setattr(execute, "wait_for", jobs_run)
    outcome = api.submit(path, executor="slurm", adaptive=True, wait=True, report=lambda line: None)
    record = rounds.read_record(run_dir)
    assert outcome.exit_code == 0 and outcome.adaptive.status == "stopped"
    assert record.stopped.reason == "decided" and len(waited) == len(record.rounds) + 1


# ------------------------------------------------------------------------------------------------ the grid file


def test_one_margin_for_the_report_and_the_rounds(tmp_path):
    spec = parse_grid(_grid(tmp_path))                        # only [adaptive] margin: it becomes the report's
    assert spec.report.margin == 0.05 == spec.adaptive.margin
    spec = parse_grid(_grid(tmp_path, adaptive={"margin": None}, report={"margin": 0.03}))
    assert spec.report.margin == 0.03 and spec.adaptive.margin is None
    spec = parse_grid(_grid(tmp_path, report={"margin": 0.05}))       # the same value in both
    assert spec.report.margin == 0.05
    spec = parse_grid(_grid(tmp_path, adaptive={"metric": "eval/x/loss"}, report={"margins": {"eval/x/loss": 0.05}}))
    assert spec.report.margin == 0.02                          # the metric's own entry is the one compared
    for adaptive, changes, message in [
        ({}, dict(report={"margin": 0.02}), "adaptive.margin: 0.05 differs from report.margin = 0.02"),
        ({"metric": "eval/x/loss"}, dict(report={"margins": {"eval/x/loss": 0.1}}),
         "differs from report.margins.eval/x/loss = 0.1"),
        ({"max_seeds": 1}, {}, "adaptive.max_seeds"),
        ({"max_seeds": 2}, dict(seeds=[0, 1, 2]), "adaptive.max_seeds: 2 is fewer than the grid's 3 seeds"),
        ({"max_budget": 2000}, {}, "adaptive.max_budget: 2000 is below the grid's largest budget 4096"),
        ({"spending": "haybittle"}, {}, "adaptive.spending"),
        ({"max_sedes": 3}, {}, "did you mean 'max_seeds'"),
        ({"futility": 1.0}, {}, "adaptive.futility"),
        ({}, dict(schedule={**_grid(tmp_path)["schedule"], "lr": [1e-3, 3e-3]}),
         "adaptive: a grid that sweeps learning rates (an lr list) cannot run adaptively"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            parse_grid(_grid(tmp_path, adaptive=adaptive, **changes))


def test_every_verb_sees_the_added_cells(tmp_path, monkeypatch):
    """After an adaptive study: clean keeps every trajectory the rounds trained, export has the added cells, the
    report's verdicts are the last look's, reset --where seed=… takes only that seed's own work."""
    fake_execution(monkeypatch, planted(decided_and_open, sd=0.02))
    path = write_grid(tmp_path, _grid(tmp_path))
    _submit(path)
    record = _record(tmp_path)
    removal = api.clean(path, dry_run=True, report=lambda line: None)
    assert not removal.stages and not removal.loses_finished_work
    written = api.export(path, tmp_path / "cells.csv")
    cells = duckdb.connect().execute(f"select distinct seed from read_csv('{written['path']}')").fetchall()
    assert {s for (s,) in cells} == set(range(len(record.rounds) + 2))
    files = api.report(path, out=tmp_path / "report")
    verdicts = duckdb.connect().execute(f"select verdict, count(*) from read_csv('{files['verdicts']}') "
                                        f"group by verdict").fetchall()
    assert dict(verdicts) == {k: v for k, v in record.stopped.verdicts.items() if v}
    removal = api.reset(path, where=["seed=3"], dry_run=True, report=lambda line: None)
    assert removal.stages and all(s in {st.id for st in api.plan(path).stages.values()} for s in removal.stages)


def test_a_record_that_is_not_one_is_one_line(tmp_path):
    path = write_grid(tmp_path, _grid(tmp_path))
    record = RunPaths(tmp_path / "runs" / "a").adaptive
    record.parent.mkdir(parents=True)
    record.write_text('{"version": 1, "rounds": [{"round": "first"}]}')
    with pytest.raises(UserError, match="adaptive.json: not an adaptive study's record"):
        api.plan(path)
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2 and "not an adaptive study's record" in result.output
