"""The one way gridlab writes anything a later step trusts: complete or not at all, and durable.

A file is written to a temporary name beside its target, flushed and fsynced, renamed over the target, and the
folder holding it is fsynced, so after a crash (a node losing power, not just a killed process) the target is
either the old file or the new one, never a torn mix. A folder (an HF checkpoint, a tokenizer, a token shard set) is
staged beside its target the same way: every file in it is fsynced before the rename. Results, models, tokenizers,
shards, checkpoint pointers and the report all go through these functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data``: temp file in the same folder, fsync, rename, fsync the folder.
    ``mode``: the file's permission bits (default: what a plain ``open`` would give under the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), mode)


def write_json(path: Path, data: Any, indent: int | None = None) -> None:
    separators = None if indent is not None else (",", ":")
    write_text(path, json.dumps(data, indent=indent, separators=separators))


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (the folder itself included)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            file = os.path.join(root, name)
            if os.path.islink(file):
                continue
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(root))


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block succeeds its contents are fsynced and it
    replaces ``target`` (an old ``target`` is removed first), otherwise it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())
        fsync_tree(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a fresh path beside ``target`` for a tool that writes a file itself (DuckDB, a ``COPY … TO``); when
    the block succeeds the file is fsynced and renamed over ``target`` (then the folder is fsynced), otherwise it is
    removed and ``target`` is untouched. Anything the tool left beside it (``<path>.wal``) goes too."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        yield staging
        with open(staging, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(staging, 0o666 & ~_umask())
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    finally:
        Path(f"{staging}.wal").unlink(missing_ok=True)
    fsync_directory(target.parent)
