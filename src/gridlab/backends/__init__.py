"""Where stages run: the backend protocol, and the registry that finds backends by name.

A backend is one way of running a plan's stages: ``local`` (worker processes on this machine, and rank groups for
multi-process training), ``debug`` (in this process, one after another) and ``slurm`` (submitit job arrays) ship
with gridlab, one module each in this package. Every backend does four things (``Backend``):

- ``run`` the stages a submit selected (to completion, or until they are submitted: ``finishes``);
- ``observe`` the stages its submission records say it holds: set each one's state (pending, running, unknown, …);
- ``cancel`` the stages it holds that a `gridlab cancel` selected;
- own its resource model: ``preflight`` checks the grid's ``[resources]`` against what the backend can give before
  anything runs (a UserError for a mistake, warnings for what cannot be checked).

Submission records (``records.record_submission``, ``stages/<id>/submit.json``) name the backend that holds a
stage, and ``gridlab.state`` asks that backend about it; a record whose backend is not installed here makes its
stage ``unknown`` with the way out (``missing_backend``), never silently pending.

The registry holds gridlab's own three and every backend another package registers under the ``gridlab.backends``
entry-point group, as submitit finds its plugins — a new backend is a package of its own, not an edit of gridlab::

    # the other package's pyproject.toml
    [project.entry-points."gridlab.backends"]
    kube = "gridlab_kube:KubeBackend"        # a subclass of gridlab.backends.Backend whose name is "kube"

``--executor NAME`` (``gridlab submit``) picks one by name; its valid values are ``names()``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from gridlab.errors import UserError

if TYPE_CHECKING:   # type names only: the protocol's arguments, defined by the runner modules that use backends
    from gridlab.execute import Triage
    from gridlab.plan import Plan
    from gridlab.spec import GridSpec
    from gridlab.state import SchedulerCache, StageState

ENTRY_POINT_GROUP = "gridlab.backends"

# gridlab's own backends: name → "module:class", imported only when used (submitit and torch load on demand).
BUILT_IN: dict[str, str] = {
    "local": "gridlab.backends.local:LocalBackend",
    "debug": "gridlab.backends.debug:DebugBackend",
    "slurm": "gridlab.backends.slurm:SlurmBackend",
}


@dataclass
class CancelOutcome:
    """What a cancel did: the stages marked cancelled and what was stopped; what could not be (left as it was)."""

    cancelled: list[str] = field(default_factory=list)      # stages marked cancelled
    jobs: list[str] = field(default_factory=list)           # scheduler jobs cancelled (SLURM: scancel'led)
    pids: list[int] = field(default_factory=list)           # local worker processes stopped
    problems: list[str] = field(default_factory=list)       # what could not be cancelled (left as it was)

    def add(self, other: CancelOutcome) -> None:
        self.cancelled += other.cancelled
        self.jobs += other.jobs
        self.pids += other.pids
        self.problems += other.problems


class Backend:
    """The protocol every backend implements (gridlab's three subclass it; so does a third party's).

    ``name`` is what ``--executor`` and the submission records call it. ``finishes``: True when ``run`` returns with
    the stages finished, run by or inside the submitting process (local, debug) — `gridlab cancel` then works beside
    a running submit through the stages' records; False when it returns as soon as they are submitted (slurm)."""

    name: ClassVar[str]
    finishes: ClassVar[bool]

    def __init__(self, workers: int = 1, report: Callable[[str], None] = print):
        self.workers = workers
        self.report = report

    def preflight(self, spec: GridSpec, submitting: bool, source: str = "grid") -> list[str]:
        """The resource model's checks before anything runs: a UserError naming the grid key for what this backend
        cannot give, warnings (returned) for what it cannot check. ``submitting`` is False on a dry run."""
        return []

    def run(self, run_dir: Path, plan: Plan, triage: Triage, states: dict[str, StageState]) -> dict[str, str]:
        """Run or submit ``triage.to_run``, recording each stage's submission (``records.record_submission``) before
        its work starts; stage id → "done", "failed", "cancelled", "blocked" (below a stage that failed, was
        cancelled or is unknown) or "submitted"."""
        raise NotImplementedError

    def observe(self, run_dir: Path, held: list[tuple[StageState, dict[str, Any]]],
                cache: SchedulerCache) -> None:
        """Set the state of the stages whose records name this backend and that have no result: each is given with
        its submission record, already ``failed``/``cancelled`` when its error file is newer than the record, else
        ``pending`` with ``submitted`` True. Set ``status`` (pending, running, failed, cancelled, unknown) and
        ``error``; ``submitted = False`` when nobody holds it any more; ``lingering`` for a failed stage whose work
        still runs. Fail closed: what cannot be known is ``unknown``. ``cache`` keeps a scheduler's answers for a
        watching status (``SchedulerCache.ask``)."""
        raise NotImplementedError

    def cancel(self, run_dir: Path, states: list[StageState]) -> CancelOutcome:
        """Stop the work of these held stages and mark them cancelled (``records.record_cancel``); a stage whose
        work cannot surely be stopped is left as it was and named in ``problems``."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------------ registry

def _entry_points() -> dict[str, metadata.EntryPoint]:
    """The backends other packages register (group ``gridlab.backends``), by name; gridlab's own names are theirs."""
    found = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name not in BUILT_IN:
            found.setdefault(entry_point.name, entry_point)
    return found


def names() -> list[str]:
    """Every installed backend's name: gridlab's own first, then the registered ones, sorted."""
    return [*BUILT_IN, *sorted(_entry_points())]


def installed(name: str) -> bool:
    return name in BUILT_IN or name in _entry_points()


def backend_class(name: str) -> type[Backend]:
    """The class of the backend called ``name``; a UserError listing the installed ones when there is none."""
    if name in BUILT_IN:
        module, _, attribute = BUILT_IN[name].partition(":")
        return getattr(importlib.import_module(module), attribute)
    entry_point = _entry_points().get(name)
    if entry_point is None:
        raise UserError(f"unknown executor {name!r}; valid executors: {', '.join(names())}")
    loaded = entry_point.load()
    if not (isinstance(loaded, type) and issubclass(loaded, Backend)) or getattr(loaded, "name", None) != name:
        raise UserError(f"the backend {name!r} registered by {entry_point.value} is not a gridlab.backends.Backend "
                        f"named {name!r}; fix or uninstall the package that registers it")
    return loaded


def create(name: str, workers: int = 1, report: Callable[[str], None] = print) -> Backend:
    """A backend by name (``--executor``): ``workers`` local worker processes where it runs any."""
    return backend_class(name)(workers=workers, report=report)


def missing_backend(name: str | None, record_path: Path) -> str:
    """Why a stage held through a backend that is not installed here is unknown, and the way out."""
    return (f"its submission record names the backend {name!r}, which is not installed here (installed: "
            f"{', '.join(names())}): install the package that provides it, or, if nothing runs this stage any more, "
            f"delete {record_path} and submit again")


# ------------------------------------------------------------------------------------------------ scheduler commands

# Seconds one scheduler command (squeue, sacct, scancel …) may take before its answer counts as missing.
SCHEDULER_TIMEOUT_ENV = "GRIDLAB_SCHEDULER_TIMEOUT_S"
_DEFAULT_SCHEDULER_TIMEOUT_S = 30.0


@dataclass
class CommandResult:
    ok: bool
    stdout: str = ""
    problem: str | None = None
    stderr: str = ""
    timed_out: bool = False


def scheduler_timeout_s() -> float:
    try:
        return float(os.environ.get(SCHEDULER_TIMEOUT_ENV, _DEFAULT_SCHEDULER_TIMEOUT_S))
    except ValueError:
        return _DEFAULT_SCHEDULER_TIMEOUT_S


def run_command(command: list[str], timeout_s: float | None = None) -> CommandResult:
    """Run a scheduler command; ``ok`` only when it exited 0 within the timeout (``problem`` says what went wrong).
    A backend for any scheduler asks it through this, so a hung scheduler never hangs gridlab."""
    timeout_s = scheduler_timeout_s() if timeout_s is None else timeout_s
    try:
        # Its own process group, so a wrapper script is killed with everything it started.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   text=True, start_new_session=True)
    except FileNotFoundError:
        return CommandResult(False, problem=f"{command[0]} is not installed here")
    except OSError as error:
        return CommandResult(False, problem=f"{command[0]} could not run ({error})")
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return CommandResult(False, problem=f"{command[0]} did not answer within {timeout_s:g} s", timed_out=True)
    if process.returncode != 0:
        message = (stderr.strip().splitlines() or [""])[-1]
        return CommandResult(False, stdout, f"{command[0]} failed (exit {process.returncode}): {message}", stderr)
    return CommandResult(True, stdout, stderr=stderr)

