"""Grid files and helpers shared by the runner's tests (spec, plan, store, execute, slurm, cli)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "examples" / "smoke.toml"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def to_toml(grid: dict) -> str:
    """A small TOML writer for test grids: scalars first, then tables, then arrays of tables."""
    lines, tables = [], []
    for key, value in grid.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        else:
            lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    for key, value in tables:
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        else:
            for item in value:
                lines.append(f"[[{key}]]")
                lines.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


def tiny_grid(name: str = "tiny", **changes) -> dict:
    """A grid small enough for real end-to-end runs in a test (seconds per stage on one core)."""
    grid = {
        "name": name, "runs_dir": "runs", "seq_len": 32,
        "ratios": [0.5], "inits": ["pruned", "random"], "budgets": [2048], "settings": [1, 2], "seeds": [0],
        "parent": {"preset": "micro", "tokens": 4096,
                   "overrides": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 2, "num_key_value_heads": 1},
                   "schedule": {"warmup_tokens": 512, "batch_size": 4, "checkpoint_every_tokens": 1024}},
        "corpus": {"kind": "stdlib", "max_documents": 80},
        "splits": {"pretrain": 0.5, "retrain": 0.3, "calibration": 0.1, "validation": 0.1},
        "tokenizer": {"vocab_size": 512},
        "calibration": {"sequences": 4},
        "schedule": {"warmup_tokens": 256, "batch_size": 4, "log_every_steps": 2, "checkpoint_every_tokens": 512},
        "evaluation": {"max_sequences": 8},
        "resources": {"default": {"cpus": 1, "mem_gb": 1, "time_min": 10}},
        "local": {"workers": 2},
        "methods": [{"name": "shortgpt"}],
    }
    grid.update(changes)
    return grid


def write_grid(folder: Path, grid: dict, filename: str = "grid.toml") -> Path:
    path = Path(folder) / filename
    path.write_text(to_toml(grid))
    return path


def slurm_available() -> bool:
    if shutil.which("sinfo") is None:
        return False
    local_conf = REPO / ".slurm" / "slurm.conf"
    if "SLURM_CONF" not in os.environ and local_conf.exists():
        os.environ["SLURM_CONF"] = str(local_conf)
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def fake_payload(stage, curve_points: int = 5):
    """A typed result payload shaped like the real stage's (see gridlab.stages), without running anything."""
    from gridlab.contracts import (
        BranchResult,
        DataPayload,
        EvalPayload,
        InitPayload,
        Metric,
        ParentPayload,
        PrunePayload,
        ShardPayload,
        TokenizerPayload,
        TrainPayload,
    )

    kind, config = stage.kind, stage.config
    params = {"decoder": 100, "embedding": 10, "total": 111}
    if kind == "tokenizer":
        return TokenizerPayload(tokenizer_dir="tok", vocab_size=512, trained=True)
    if kind == "shard":
        return ShardPayload(partition=config.partition, partitions=config.partitions, shard_dir="shards",
                            units={"written": 1})
    if kind == "data":
        return DataPayload(tokenizer_dir="tok", shards={}, vocab_size=512, corpus_fingerprint="f00d", manifest={})
    if kind == "parent":
        return ParentPayload(model_path=f"m/{stage.id}", tokenizer_dir="tok", trained_tokens=config.tokens,
                             params=params)
    if kind == "init":
        return InitPayload(model_path=f"m/{stage.id}", params=params)
    if kind == "prune":
        return PrunePayload(model_path=f"m/{stage.id}", achieved_ratio=config.ratio + 0.01, granularity="depth",
                            calibration_sequences=4, layerwise=False, params=params)
    if kind == "train":
        branches = []
        for budget in config.budgets:
            metrics = []
            for i in range(curve_points):
                tokens = budget * (i + 1) // curve_points
                metrics += [Metric(name="train_loss", value=5.0 - i * 0.1, tokens=tokens, higher_is_better=False),
                            Metric(name="lr", value=1e-3, tokens=tokens)]
            branches.append(BranchResult(budget_tokens=budget, trained_tokens=budget, path=f"b/{budget}",
                                         metrics=metrics))
        return TrainPayload(trajectory=config.trajectory, branches=branches)
    if kind == "eval":
        tokens = config.tokens if config.source == "model" else config.budget
        value = 4.0 if tokens else 6.0
        metrics = [Metric(name="val_loss", value=value, stderr=0.05, tokens=tokens, higher_is_better=False),
                   Metric(name="val_ppl", value=2.718281828 ** value, stderr=0.05 * 2.718281828 ** value,
                          tokens=tokens, higher_is_better=False)]
        if getattr(config, "floors", False):   # the parent's evaluation: the floors too
            metrics += [Metric(name="floor/uniform_loss", value=6.238, stderr=0.0, tokens=0),
                        Metric(name="floor/unigram_loss", value=5.5, stderr=0.04, tokens=0)]
        return EvalPayload(model_path="m", tokens=tokens, metrics=metrics)
    raise ValueError(kind)


def finish_stage(run_dir: Path, stage) -> None:
    """Leave a stage's result file as a worker would, with a fake payload."""
    from gridlab.layout import RunPaths
    from gridlab.results import write_result

    write_result(RunPaths(run_dir).stage(stage.id), stage, fake_payload(stage))


def wait_until_settled(run_dir: Path, timeout_s: float = 900):
    """Poll until no stage of the run is held any more (queued, running or unknown); return the stage states."""
    from gridlab.planfile import read_plan_record
    from gridlab.state import stage_states

    record = read_plan_record(run_dir)
    deadline = time.time() + timeout_s
    while True:
        states = stage_states(run_dir, record.stages)
        if not any(s.held for s in states.values()):
            return states
        assert time.time() < deadline, "SLURM jobs did not finish in time"
        time.sleep(2)


class FakeSlurm:
    """A fake SLURM on PATH (tests/fake_slurm.py as sbatch, squeue, sacct, scancel, scontrol, srun) whose jobs a
    test sets to any state, and whose commands it makes fail or hang."""

    COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol", "srun", "sinfo", "sacctmgr")

    def __init__(self, folder: Path, monkeypatch, timeout_s: float = 2.0):
        import sys

        self.dir = Path(folder)
        bin_dir = self.dir / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        script = REPO / "tests" / "fake_slurm.py"
        for command in self.COMMANDS:
            path = bin_dir / command
            path.write_text(f"#!{sys.executable}\nimport os, runpy\nos.environ['FAKE_SLURM_AS'] = {command!r}\n"
                            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
            path.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_SLURM_DIR", str(self.dir))
        monkeypatch.setenv("GRIDLAB_SCHEDULER_TIMEOUT_S", str(timeout_s))
        monkeypatch.delenv("SLURM_CONF", raising=False)

    def names(self, partitions: list[str] = (), accounts: list[str] = ()) -> None:
        """The partitions sinfo lists and the accounts sacctmgr lists for this user (by default none: a real
        cluster's answers never leak into a test)."""
        for command, values in (("sinfo", partitions), ("sacctmgr", accounts)):
            (self.dir / f"{command}.names").write_text("\n".join(values) + "\n")

    @property
    def jobs(self) -> dict:
        path = self.dir / "jobs.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _update(self, job: str, change) -> None:
        jobs = self.jobs
        job_id, _, task = job.partition("_")
        change(jobs[job_id], task)
        (self.dir / "jobs.json").write_text(json.dumps(jobs))

    def add_job(self, name: str, tasks: int | None = None, state: str = "PENDING") -> str:
        """Register a job as if sbatch had run (e.g. before a crash); its id."""
        jobs = self.jobs
        job_id = str(max([int(j) for j in jobs] + [1000]) + 1)
        keys = [""] if tasks is None else [str(i) for i in range(tasks)]
        jobs[job_id] = {"name": name, "tasks": tasks, "queue": {k: f"{state}|None" for k in keys}, "accounting": {}}
        (self.dir / "jobs.json").write_text(json.dumps(jobs))
        return job_id

    def queue(self, job: str, state: str, reason: str = "None") -> None:
        """squeue shows ``job`` ("123" or "123_4") in ``state``."""
        def change(entry, task):
            entry["queue"][task] = f"{state}|{reason}"
        self._update(job, change)

    def finish(self, job: str, state: str, exit_code: str = "0:0") -> None:
        """``job`` leaves the queue; sacct then reports ``state`` ("OUT_OF_MEMORY", "CANCELLED by 0" …)."""
        def change(entry, task):
            entry["queue"].pop(task, None)
            entry["accounting"][task] = f"{state}|{exit_code}"
        self._update(job, change)

    def forget(self, job: str) -> None:
        """``job`` is known neither to squeue nor to sacct."""
        def change(entry, task):
            entry["queue"].pop(task, None)
            entry["accounting"].pop(task, None)
        self._update(job, change)

    def fail(self, command: str, message: str = "slurm_load_jobs error: Unable to contact slurm controller") -> None:
        (self.dir / f"{command}.fail").write_text(message)

    def hang(self, command: str) -> None:
        (self.dir / f"{command}.hang").write_text("")

    def heal(self, command: str) -> None:
        for suffix in ("fail", "hang"):
            (self.dir / f"{command}.{suffix}").unlink(missing_ok=True)

    def calls(self, command: str) -> list[list[str]]:
        path = self.dir / "calls.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [call[1:] for call in map(json.loads, lines) if call[0] == command]

    def scripts(self) -> dict[str, str]:
        """job id → the sbatch script it was submitted with."""
        return {p.stem.split("-")[1]: p.read_text() for p in self.dir.glob("sbatch-*.sh")}
