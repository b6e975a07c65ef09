"""What a stage's inputs are by content, so a stage id changes when its inputs do and only then.

- ``fingerprint(path)``: a local file's or folder's content hash. Cheap to recompute: a file's hash is cached by
  its real path and (size, mtime, inode), so only new or changed files are read; a folder's is the hash of its
  files' relative names and hashes. Moving or renaming a file keeps its fingerprint; touching it recomputes the
  same one.
- ``file_fingerprint`` / ``folder_fingerprint`` / ``stamp_fingerprint`` / ``snapshot_revision``: the pieces
  ``gridlab.data.corpus_identity`` builds a corpus's identity from.
- ``model_identity(name_or_path)`` / ``tokenizer_identity(name_or_path)``: a local folder's fingerprint, or a hub
  repository's resolved revision from the local hub cache (``"unresolved"`` when the cache has none).

The cache lives in ``$GRIDLAB_CACHE`` (default ``~/.cache/gridlab``), ``fingerprints/``; losing it costs one
re-read. Hashes are BLAKE2b (128 bits) of the raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gridlab.atomic import write_json
from gridlab.errors import UserError

UNRESOLVED = "unresolved"
_READ = 1 << 22
# The files that define a tokenizer inside a model folder (the weights beside them do not).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")


def cache_root() -> Path:
    return Path(os.environ.get("GRIDLAB_CACHE") or Path.home() / ".cache" / "gridlab")


def fingerprint(path: str | Path) -> str:
    """The content fingerprint of a local file or folder (``b2:<hex>``)."""
    path = Path(path)
    if path.is_dir():
        return folder_fingerprint(path, files_under(path))
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder")
    return file_fingerprint(path)


def files_under(folder: Path) -> list[Path]:
    """Every file under a folder, sorted; hidden entries (.git, .cache) skipped."""
    found = []
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(current) / name for name in sorted(files) if not name.startswith("."))
    return found


def folder_fingerprint(folder: Path, files: list[Path]) -> str:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:  # hashlib releases the GIL
        hashes = list(pool.map(file_fingerprint, files))
    digest = hashlib.blake2b(digest_size=16)
    for file, file_hash in zip(files, hashes, strict=True):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{file_hash}\n".encode())
    return f"b2:{digest.hexdigest()}"


def file_fingerprint(path: Path) -> str:
    real = os.path.realpath(path)
    try:
        stat = os.stat(real)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    entry = cache_root() / "fingerprints" / f"{hashlib.blake2b(real.encode(), digest_size=16).hexdigest()}.json"
    try:
        cached = json.loads(entry.read_text())
        if cached["path"] == real and cached["stamp"] == stamp:
            return cached["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = f"b2:{hash_file(real)}"
    try:
        write_json(entry, {"path": real, "stamp": stamp, "fingerprint": value})
    except OSError:  # a read-only cache only costs the next call a re-read
        pass
    return value


def hash_file(path: str | Path) -> str:
    """BLAKE2b-128 of a file's bytes (the full read behind a cached fingerprint)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_READ):
                digest.update(chunk)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    return digest.hexdigest()


def stamp_fingerprint(files: list[Path], folder: Path) -> str:
    """A hash of relative names, sizes and mtimes: what changes whenever the content may have (no reads)."""
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"stat:{digest.hexdigest()}"


def snapshot_revision(snapshot: Path) -> str:
    """The commit of a hub-cache snapshot folder (``…/snapshots/<commit>``); a plain local folder has none."""
    return snapshot.name if snapshot.parent.name == "snapshots" else "local folder"


# ------------------------------------------------------------------------------------------ models, tokenizers


def model_identity(name_or_path: str | Path) -> dict[str, str]:
    """A local model folder (or file) by content, or a hub model by its resolved revision."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return {"fingerprint": fingerprint(path)}
    return {"hub": str(name_or_path), "revision": hub_revision(str(name_or_path))}


def tokenizer_identity(name_or_path: str | Path) -> dict[str, str]:
    """A local tokenizer by the content of its tokenizer files (not the model weights beside them), or a hub
    tokenizer by its resolved revision."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        return {"fingerprint": folder_fingerprint(path, files) if files else fingerprint(path)}
    if path.exists():
        return {"fingerprint": fingerprint(path)}
    return {"hub": str(name_or_path), "revision": hub_revision(str(name_or_path))}


def hub_revision(name: str, repo_type: str = "model") -> str:
    """The commit the local hub cache resolves ``name``'s main revision to (no network), else "unresolved"."""
    try:
        from huggingface_hub import snapshot_download  # `gridlab status` loads this module; hub names are rare

        return Path(snapshot_download(name, repo_type=repo_type, local_files_only=True)).name
    except Exception:  # not cached, not a valid name, or no hub library: the id says so plainly
        return UNRESOLVED
