"""What a stage ran on: gridlab's version and the git commit of its code, the library versions, CUDA/NCCL, the GPU,
the host and the SLURM job. A worker calls ``collect()`` when it writes a result (gridlab.results, header key
``provenance``); ingest turns it into columns of the DuckDB ``stages`` table (gridlab.db), and the ``environments``
view lists each distinct environment the results came from.

Nothing here imports torch: versions come from the installed distributions' metadata, and CUDA facts only from a
torch the worker has already imported.
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import gridlab

# (column, DuckDB type) in the stages table, in order; collect() returns exactly these keys.
PROVENANCE_COLUMNS = (
    ("gridlab_version", "VARCHAR"), ("git_commit", "VARCHAR"), ("git_dirty", "BOOLEAN"),
    ("python_version", "VARCHAR"), ("torch_version", "VARCHAR"), ("transformers_version", "VARCHAR"),
    ("lm_eval_version", "VARCHAR"), ("cuda_version", "VARCHAR"), ("nccl_version", "VARCHAR"), ("gpu", "VARCHAR"),
    ("host", "VARCHAR"), ("slurm_job_id", "VARCHAR"),
)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_state(folder: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout gridlab's code is imported from; (None, None) when it is not in one (a
    wheel install) or git is missing. Dirty: tracked files differ from the commit."""
    folder = Path(folder or Path(gridlab.__file__).resolve().parent)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20)

    try:
        inside = git("rev-parse", "--is-inside-work-tree")
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return None, None
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return None, None
        status = git("status", "--porcelain", "--untracked-files=no")
        return commit.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)
    except (OSError, subprocess.TimeoutExpired):
        return None, None


def _cuda() -> tuple[str | None, str | None, str | None]:
    """(CUDA version, NCCL version, GPU model) from a torch already imported by the worker; Nones otherwise."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None, None, None
    cuda = getattr(torch.version, "cuda", None)
    nccl = gpu = None
    try:
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(torch.cuda.current_device())
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception:  # noqa: BLE001 - a broken driver must not lose the stage's result
        pass
    return cuda, nccl, gpu


def slurm_job_id() -> str | None:
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def collect() -> dict[str, Any]:
    """This process's provenance, as the stages table's columns (PROVENANCE_COLUMNS)."""
    commit, dirty = git_state()
    cuda, nccl, gpu = _cuda()
    return {
        "gridlab_version": gridlab.__version__, "git_commit": commit, "git_dirty": dirty,
        "python_version": platform.python_version(), "torch_version": _version("torch"),
        "transformers_version": _version("transformers"), "lm_eval_version": _version("lm_eval"),
        "cuda_version": cuda, "nccl_version": nccl, "gpu": gpu, "host": socket.gethostname(),
        "slurm_job_id": slurm_job_id(),
    }
