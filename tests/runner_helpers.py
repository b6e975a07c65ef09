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


def fake_payload(stage: dict, curve_points: int = 5) -> dict:
    """A result payload shaped like the real stage's (see gridlab.stages), without running anything."""
    kind, config = stage["kind"], stage["config"]
    if kind == "data":
        return {"tokenizer_dir": "tok", "shards": {}, "vocab_size": 512, "corpus_fingerprint": "f00d", "manifest": {}}
    if kind in ("parent", "init"):
        return {"model_path": f"m/{stage['id']}", "val_loss": 5.0, "val_ppl": 148.4, "params": {}}
    if kind == "prune":
        return {"model_path": f"m/{stage['id']}", "achieved_ratio": config["ratio"] + 0.01, "granularity": "depth",
                "removed": None, "note": None, "val_loss": 6.0, "val_ppl": 403.4, "params": {}}
    if kind == "train":
        branches = []
        for budget in config["budgets"]:
            curve = [{"tokens": budget * (i + 1) // curve_points, "loss": 5.0 - i * 0.1, "lr": 1e-3}
                     for i in range(curve_points)]
            branches.append({"budget_tokens": budget, "trained_tokens": budget, "path": f"b/{budget}",
                             "curve": curve})
        return {"branches": branches, "curve": []}
    if kind == "eval":
        return {"branches": [{"budget_tokens": b, "trained_tokens": b, "path": f"b/{b}",
                              "metrics": [{"name": "val_loss", "value": 4.0}, {"name": "val_ppl", "value": 54.6}]}
                             for b in config["budgets"]]}
    raise ValueError(kind)


def wait_until_settled(run_dir: Path, timeout_s: float = 900):
    """Poll until no submitted stage of the run is still active; return the stage states."""
    from gridlab import execute, store

    plan = store.read_plan(run_dir)
    deadline = time.time() + timeout_s
    while True:
        states = execute.stage_states(run_dir, plan["stages"])
        if not any(s.status in execute.ACTIVE and s.submitted for s in states.values()):
            return states
        assert time.time() < deadline, "SLURM jobs did not finish in time"
        time.sleep(2)
