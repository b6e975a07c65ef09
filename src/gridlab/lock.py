"""Who holds what: is a process alive (on which host), and the run lock that lets one command at a time change a
run folder.

A process is named by its host, pid and start time (``/proc/<pid>/stat``), so a pid reused after the process died
is not taken for it, and a process on another host is never guessed about (``process_alive`` answers None).

The run lock (``RunPaths.lock``) is an exclusive ``flock`` on that file, held for as long as the command that took
it runs; the kernel (or the NFS server, for a lock taken over NFS) releases it when its holder dies, however it
dies. The file also says who holds it (host, pid, user, command, start time), so a second submitter is told who is
in its way, and a holder that died without removing its record is reported as stale when the next one takes over.
Readers (status, report, export, logs) never take it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridlab.errors import UserError
from gridlab.layout import RunPaths


def this_host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> int | None:
    """When the process started (clock ticks since boot, /proc/<pid>/stat field 22), or None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, host: str | None = None, start: int | None = None) -> bool | None:
    """Whether a process runs: True or False for one on this host, None for one on another host (no way to tell
    from here). A process of another user is alive (``os.kill`` answers PermissionError); a zombie is not; a
    ``start`` that does not match means the pid was reused by another process."""
    if not pid:
        return False
    if host and host != this_host():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    if state == "Z":
        return False
    return start is None or process_start(pid) in (None, start)


def holder_record(command: str, **extra: Any) -> dict[str, Any]:
    """Who this process is, as the lock file and the submission records say it."""
    pid = os.getpid()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"host": this_host(), "pid": pid, "pid_start": process_start(pid), "user": user, "command": command,
            "since": time.time(), **extra}


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not written who it is yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return (f"`gridlab {holder.get('command', '?')}` of {holder.get('user', '?')} on {holder.get('host', '?')} "
            f"(pid {holder.get('pid', '?')}, since {since})")


def read_holder(run_dir: Path) -> dict[str, Any] | None:
    """What the lock file says about its holder (the last one, if nobody holds it now); None when absent."""
    try:
        text = RunPaths(run_dir).lock.read_text()
    except OSError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def held_by(run_dir: Path) -> dict[str, Any] | None:
    """The live holder of the run lock, or None when nobody holds it (a reader's question; takes nothing)."""
    path = RunPaths(run_dir).lock
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                return read_holder(run_dir) or {}
            raise
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


class RunLocked(UserError):
    """Another command holds the run folder."""


@dataclass
class RunLock:
    run_dir: Path
    descriptor: int
    holder: dict[str, Any]
    stale: dict[str, Any] | None       # the record a dead holder left behind, when this lock took over from it

    def release(self) -> None:
        if self.descriptor < 0:
            return
        try:
            os.ftruncate(self.descriptor, 0)
        except OSError:
            pass
        fcntl.flock(self.descriptor, fcntl.LOCK_UN)
        os.close(self.descriptor)
        self.descriptor = -1


def acquire(run_dir: Path, command: str, wait: bool = False, timeout_s: float | None = None,
            report: Callable[[str], None] = print, poll_s: float = 0.5, **extra: Any) -> RunLock:
    """Take the run lock or raise RunLocked naming its holder. ``wait``: poll until it is free (for at most
    ``timeout_s`` seconds, or for ever), saying once who is being waited for."""
    path = RunPaths(run_dir).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = None if timeout_s is None else time.time() + timeout_s
    # A reader asking who holds the run (held_by) holds a shared lock for an instant: ride that out.
    patience = time.time() + 1.0
    told = False
    try:
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            holder = read_holder(run_dir)
            if holder is None and time.time() < patience:
                time.sleep(0.02)
                continue
            if not wait or (deadline is not None and time.time() >= deadline):
                raise RunLocked(f"{RunPaths(run_dir).root} is held by {describe(holder)}; wait for it to finish "
                                f"(or pass --wait-lock)")
            if not told:
                report(f"waiting for {describe(holder)}, which holds {RunPaths(run_dir).root}")
                told = True
            time.sleep(poll_s)
        # A holder empties the file when it releases the lock; a record left in it is from one that died holding it.
        stale = read_holder(run_dir)
        if stale is not None:
            report(f"taking over a stale run lock: {describe(stale)} ended without releasing it")
        holder = holder_record(command, **extra)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        os.fsync(descriptor)
        return RunLock(Path(run_dir), descriptor, holder, stale)
    except BaseException:
        os.close(descriptor)
        raise


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str, wait: bool = False, timeout_s: float | None = None,
             report: Callable[[str], None] = print, **extra: Any) -> Iterator[RunLock]:
    """``with run_lock(run_dir, "submit"): …`` holds the run for the block."""
    lock = acquire(run_dir, command, wait=wait, timeout_s=timeout_s, report=report, **extra)
    try:
        yield lock
    finally:
        lock.release()


def _main(argv: list[str]) -> int:
    """``python -m gridlab.lock RUN_DIR SECONDS``: hold a run's lock for a while (for tests and for trying it)."""
    with run_lock(Path(argv[0]), "hold"):
        print("locked", flush=True)
        time.sleep(float(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
