"""What a corpus holds: the files it matched, the units it is read in, and its documents in reading order.

A corpus is read as an ordered list of **units**, fixed by the corpus alone (never by how many tasks read it): one
per matched file, groups of 64 standard-library files, ranges of 50,000 rows of a saved dataset, or the whole
stream of a hub dataset that has no local snapshot. Partition tasks share out units; the reading order of the
documents is units in order, then documents within a unit.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from gridlab.data.formats import FORMATS, MAX_TXT_BYTES, check_file, format_of, parquet_rows, read_documents
from gridlab.data.schema import CorpusSource
from gridlab.errors import UserError
from gridlab.inputs import (
    UNRESOLVED,
    file_fingerprint,
    files_under,
    folder_fingerprint,
    snapshot_revision,
    stamp_fingerprint,
)

STDLIB_UNIT_FILES = 64
DISK_UNIT_ROWS = 50_000
_DISK_BATCH_ROWS = 1_000


@dataclass(frozen=True)
class CorpusFile:
    path: str       # where it is read from (absolute, links not resolved)
    key: str        # its path relative to the folder of the pattern that matched it: the documents' key prefix
    size: int
    mtime_ns: int

    @property
    def format(self) -> str:
        return format_of(self.path)


@dataclass(frozen=True)
class Unit:
    """A piece of a corpus read by one task in one go. ``name`` and ``size`` describe its content for the corpus
    fingerprint; ``stamp`` changes whenever it may have changed (then its shard piece is rebuilt)."""

    index: int
    name: str
    size: int                       # bytes, for sharing units out evenly
    stamp: str
    count: int | None = None        # documents in it, when known without reading it
    limit: int | None = None        # read only the first `limit` documents (the max_documents cut)
    file: CorpusFile | None = None  # files / hub snapshot: the file
    stdlib: tuple[str, ...] = ()    # stdlib: the relative paths of its files
    rows: tuple[int, int] | None = None  # disk: the row range


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# ------------------------------------------------------------------------------------------------ file listing


def list_files(patterns: Sequence[str], where: str = "corpus.files", root: str | None = None) -> list[CorpusFile]:
    """The files of a list of paths, folders and glob patterns, in order (each pattern's matches sorted; a file
    matched twice is listed once). Folders and globs take the corpus files among their matches; a pattern that
    matches none, an explicit file of another type, an empty file or an oversized .txt is a UserError.
    ``root``: patterns are relative to it and keys are relative to it (a hub snapshot)."""
    listed: dict[str, CorpusFile] = {}
    for index, pattern in enumerate(patterns):
        label = f"{where}[{index}] {pattern!r}"
        full = os.path.join(root, pattern) if root else os.path.expanduser(pattern)
        matches = _matches(full, label, root)
        if not matches:
            raise UserError(f"{label} matches no corpus file ({', '.join(FORMATS)})")
        for path, key in matches:
            if path not in listed:
                listed[path] = _stat(path, key)
    return list(listed.values())


def _matches(pattern: str, label: str, root: str | None) -> list[tuple[str, str]]:
    if glob.has_magic(pattern):
        base = root or _glob_base(pattern)
        found = []
        for match in sorted(glob.glob(pattern, recursive=True)):
            if os.path.isdir(match):
                found.extend(_walk(match, base))
            elif format_of(match):
                found.append((os.path.abspath(match), os.path.relpath(match, base)))
        if not found and not glob.glob(pattern, recursive=True):
            raise UserError(f"{label} matches nothing")
        return found
    if os.path.isdir(pattern):
        return _walk(pattern, root or pattern)
    if os.path.isfile(pattern):
        if not format_of(pattern):
            raise UserError(f"{label} is not a corpus file; valid types: {', '.join(FORMATS)}")
        return [(os.path.abspath(pattern), os.path.relpath(pattern, root) if root else os.path.basename(pattern))]
    raise UserError(f"{label} does not exist")


def _glob_base(pattern: str) -> str:
    """The folder part of a pattern before its first wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _walk(folder: str, base: str) -> list[tuple[str, str]]:
    """Corpus files under a folder, sorted, hidden files and folders skipped."""
    found = []
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and format_of(name):
                path = os.path.join(current, name)
                found.append((os.path.abspath(path), os.path.relpath(path, base)))
    return found


def _stat(path: str, key: str) -> CorpusFile:
    try:
        stat = os.stat(path)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    if stat.st_size == 0:
        raise UserError(f"{path}: empty file")
    if format_of(path) == ".txt" and stat.st_size > MAX_TXT_BYTES:
        raise UserError(f"{path}: a .txt file is one document and this one has {stat.st_size / 2**20:,.0f} MB (at "
                        f"most {MAX_TXT_BYTES // 2**20} MB); store large text as JSON Lines, one document per line")
    return CorpusFile(path, Path(key).as_posix(), stat.st_size, stat.st_mtime_ns)


# ------------------------------------------------------------------------------------------------ hub snapshots


def hub_snapshot(name: str) -> Path | None:
    """The local snapshot folder of a hub dataset: ``name`` itself when it is a folder, else the hub cache's
    snapshot of its main revision (no network); None when there is none."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download  # gridlab.data loads with `gridlab status`: hub corpora only

        return Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except Exception:  # not cached, or not a valid repository name: the caller streams from the hub
        return None


def snapshot_files(root: Path, source: CorpusSource) -> list[CorpusFile]:
    """The files of one config and split of a dataset snapshot, from the `configs` section of its README (as the
    hub defines them); a snapshot without one holds one split, "train": all its corpus files."""
    configs = _readme_configs(root)
    where = f"corpus {source.name!r}"
    if not configs:
        if source.split != "train":
            raise UserError(f"{where}: the snapshot at {root} declares no configs, so it has only split 'train' "
                            f"(got split {source.split!r})")
        return list_files(["."], where=where, root=str(root))
    names = [config.get("config_name", "default") for config in configs]
    if source.config is not None:
        if source.config not in names:
            raise UserError(f"{where}: no config {source.config!r}; its configs: {', '.join(names)}")
        chosen = configs[names.index(source.config)]
    else:
        chosen = next((c for c in configs if c.get("default")), None) or next(
            (c for c in configs if c.get("config_name", "default") == "default"), configs[0])
    splits = _data_files_by_split(chosen.get("data_files", []))
    if source.split not in splits:
        raise UserError(f"{where}: no split {source.split!r}; its splits: {', '.join(splits)}")
    patterns = splits[source.split]
    return list_files([patterns] if isinstance(patterns, str) else list(patterns), where=where, root=str(root))


def _data_files_by_split(data_files) -> dict:
    """A config's data_files in the hub's forms: a pattern or list of patterns (split "train"), a list of
    {split, path} entries, or a {split: pattern(s)} mapping."""
    if isinstance(data_files, dict):
        return dict(data_files)
    if isinstance(data_files, list) and data_files and all(isinstance(entry, dict) for entry in data_files):
        return {entry.get("split", "train"): entry.get("path", []) for entry in data_files}
    return {"train": data_files}


def _readme_configs(root: Path) -> list[dict]:
    readme = root / "README.md"
    if not readme.is_file():
        return []
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return []
    end = text.find("\n---", 3)
    try:
        header = yaml.safe_load(text[3:end if end > 0 else None]) or {}
    except yaml.YAMLError:
        return []
    configs = header.get("configs") if isinstance(header, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


# ------------------------------------------------------------------------------------------------------- units


def corpus_files(source: CorpusSource) -> list[CorpusFile] | None:
    """The local files a corpus reads (files kind; hf kind with a local snapshot); None for other corpora."""
    if source.kind == "files":
        return list_files(source.files)
    if source.kind == "hf":
        snapshot = hub_snapshot(source.name)
        return snapshot_files(snapshot, source) if snapshot is not None else None
    return None


def corpus_units(source: CorpusSource) -> list[Unit]:
    """The units of a corpus in reading order, already cut at max_documents where document counts are known
    (.txt files, Parquet footers, the standard library, saved datasets)."""
    files = corpus_files(source)
    if files is not None:
        units = [_file_unit(index, file, source.text_column) for index, file in enumerate(files)]
    elif source.kind == "stdlib":
        units = _stdlib_units()
    elif source.kind == "disk":
        units = _disk_units(source)
    else:  # a hub dataset without a local snapshot: one stream
        units = [Unit(0, f"hf:{source.name}/{source.config or ''}/{source.split}", 0, "stream")]
    return _cut(units, source.max_documents)


def _file_unit(index: int, file: CorpusFile, text_column: str) -> Unit:
    count = 1 if file.format == ".txt" else parquet_rows(Path(file.path), text_column) \
        if file.format == ".parquet" else None
    return Unit(index, f"file:{file.key}", file.size, f"{file.size}:{file.mtime_ns}", count, file=file)


def _stdlib_listing() -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every .py file of the standard library, in reading order."""
    root = stdlib_root()
    listing = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for file in sorted(files):
            if file.endswith(".py"):
                path = Path(folder) / file
                stat = path.stat()
                listing.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return listing


def _stdlib_units() -> list[Unit]:
    listing = _stdlib_listing()
    units = []
    for start in range(0, len(listing), STDLIB_UNIT_FILES):
        group = listing[start:start + STDLIB_UNIT_FILES]
        stamp = f"{sys.version}|" + "|".join(f"{p}:{s}:{m}" for p, s, m in group)
        units.append(Unit(len(units), f"stdlib:{group[0][0]}", sum(s for _, s, _ in group), stamp, len(group),
                          stdlib=tuple(p for p, _, _ in group)))
    return units


def _open_disk(source: CorpusSource):
    import datasets  # a second to load, and gridlab.data loads with `gridlab status`: disk and hub corpora only

    if not Path(source.path).is_dir():
        raise UserError(f"corpus.path {source.path!r} does not exist (expected a datasets save_to_disk folder)")
    try:
        dataset = datasets.load_from_disk(source.path)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"corpus.path {source.path!r} is not a datasets save_to_disk folder "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if source.split not in dataset:
            raise UserError(f"split {source.split!r} not in {source.path!r}; its splits: {', '.join(dataset)}")
        dataset = dataset[source.split]
    if source.text_column not in dataset.column_names:
        raise UserError(f"text column {source.text_column!r} not in {source.path!r}; its columns: "
                        f"{', '.join(dataset.column_names)}")
    return dataset


def _disk_units(source: CorpusSource) -> list[Unit]:
    dataset = _open_disk(source)
    name, rows = Path(source.path).name, len(dataset)
    arrow = [(f["filename"], os.stat(f["filename"])) for f in dataset.cache_files]
    stamp = "|".join(f"{file}:{stat.st_size}:{stat.st_mtime_ns}" for file, stat in arrow)
    row_bytes = sum(stat.st_size for _, stat in arrow) / max(1, rows)
    units = []
    for start in range(0, rows, DISK_UNIT_ROWS):
        stop = min(start + DISK_UNIT_ROWS, rows)
        units.append(Unit(len(units), f"disk:{name}#{start}", round(row_bytes * (stop - start)), stamp, stop - start,
                          rows=(start, stop)))
    return units


def _cut(units: list[Unit], cap: int | None) -> list[Unit]:
    """Apply max_documents to units whose counts are known; from the first unit of unknown count on, every unit
    stays (partition tasks skip those that turn out to lie beyond the cap, assembly cuts the one that crosses it)."""
    if cap is None:
        return units
    kept, prior = [], 0
    for unit in units:
        if prior is not None and prior >= cap:
            break
        if prior is not None and unit.count is not None:
            take = min(unit.count, cap - prior)
            kept.append(replace(unit, count=take, limit=take) if take < unit.count else unit)
            prior += take
        else:
            kept.append(unit)
            prior = None
    return kept


# ------------------------------------------------------------------------------------------------- documents


def iter_unit(source: CorpusSource, unit: Unit) -> Iterator[tuple[str, str]]:
    """(document key, text) of one unit, in order."""
    if unit.file is not None:
        documents = read_documents(Path(unit.file.path), unit.file.key, source.text_column)
    elif source.kind == "stdlib":
        documents = _stdlib_documents(unit.stdlib)
    elif source.kind == "disk":
        documents = _disk_documents(source, unit.rows)
    else:
        documents = _hub_stream(source)
    for count, document in enumerate(documents):
        if unit.limit is not None and count >= unit.limit:
            return
        yield document


def iter_documents(source: CorpusSource) -> Iterator[tuple[str, str]]:
    """(document key, text) pairs of a corpus in reading order; at most source.max_documents of them."""
    count = 0
    for unit in corpus_units(source):
        for document in iter_unit(source, unit):
            if source.max_documents is not None and count >= source.max_documents:
                return
            count += 1
            yield document


def _stdlib_documents(paths: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    root = stdlib_root()
    for relative in paths:
        yield relative, (root / relative).read_bytes().decode("utf-8", errors="replace")


def _disk_documents(source: CorpusSource, rows: tuple[int, int]) -> Iterator[tuple[str, str]]:
    dataset = _open_disk(source)
    name = Path(source.path).name
    for start in range(rows[0], rows[1], _DISK_BATCH_ROWS):
        texts = dataset[start:min(start + _DISK_BATCH_ROWS, rows[1])][source.text_column]
        for offset, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"{source.path}: row {start + offset}: {source.text_column!r} is "
                                f"{type(text).__name__}, not a string")
            yield f"{name}#{start + offset}", text


def _hub_stream(source: CorpusSource) -> Iterator[tuple[str, str]]:
    import datasets  # as in _open_disk

    origin = f"{source.name}/{source.config or ''}/{source.split}"
    try:
        dataset = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise UserError(
            f"cannot load Hugging Face dataset {source.name!r} (config {source.config!r}, split {source.split!r}): "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    columns = dataset.column_names
    if columns is not None and source.text_column not in columns:
        raise UserError(f"text column {source.text_column!r} not in {origin}; its columns: {', '.join(columns)}")
    for index, row in enumerate(dataset):
        text = row.get(source.text_column)
        if not isinstance(text, str):
            raise UserError(f"{origin}: row {index}: {source.text_column!r} is {type(text).__name__}, not a string")
        yield f"{origin}#{index}", text


# ------------------------------------------------------------------------------------- what plan says about it


@dataclass(frozen=True)
class CorpusListing:
    """What a corpus matched, for `gridlab plan`: ``files`` is None for corpora that are not local files."""

    source: CorpusSource
    files: list[CorpusFile] | None
    where: str

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files or ())

    def summary(self) -> str:
        if self.files is None:
            return self.where
        formats: dict[str, int] = {}
        for file in self.files:
            formats[file.format] = formats.get(file.format, 0) + 1
        kinds = ", ".join(f"{count:,} {suffix}" for suffix, count in formats.items())
        names = f": {', '.join(file.key for file in self.files)}" if len(self.files) <= 3 else ""
        return f"{self.where}: {len(self.files):,} file(s), {_size(self.total_bytes)} ({kinds}){names}"


def list_corpus(source: CorpusSource) -> CorpusListing:
    """The files a corpus matches (with existence and size checks), or a description of where else it reads."""
    files = corpus_files(source)
    if source.kind == "files":
        where = "files"
    elif source.kind == "hf":
        where = (f"hub dataset {source.name!r} from its local snapshot" if files is not None else
                 f"hub dataset {source.name!r}: no local snapshot, streamed from the hub by one task")
    elif source.kind == "disk":
        where = f"saved dataset {source.path}"
    else:
        listing = _stdlib_listing()
        where = (f"Python {sys.version.split()[0]} standard library: {len(listing):,} .py files, "
                 f"{_size(sum(size for _, size, _ in listing))} ({stdlib_root()})")
    return CorpusListing(source, files, where)


def check_corpus(source: CorpusSource, listing: CorpusListing | None = None) -> CorpusListing:
    """Cheap checks that can be made before anything runs: the files exist and are non-empty, and each file's first
    document can be read and has the text column (a saved dataset: its split and column). A UserError otherwise."""
    listing = listing or list_corpus(source)
    if listing.files:
        with ThreadPoolExecutor(max_workers=min(8, len(listing.files))) as pool:
            for _ in pool.map(lambda file: check_file(Path(file.path), source.text_column), listing.files):
                pass
    elif source.kind == "disk":
        _open_disk(source)
    return listing


def describe_corpus(source: CorpusSource, label: str = "corpus") -> str:
    """One line for `gridlab plan` (what the corpus matched: count, bytes), after check_corpus."""
    return f"{label}: {check_corpus(source).summary()}"


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------------------------------ identity


def corpus_identity(source: CorpusSource, content: bool = True) -> dict[str, Any]:
    """What a corpus reads, without where it is read from: the keys that change its documents plus, for local
    files, each matched file's key (its path relative to its pattern, which names its documents) and content
    fingerprint; for a saved dataset its folder's fingerprint; for a hub dataset its resolved revision (or
    "unresolved"); for the standard library the Python version and a fingerprint of its file listing.
    ``content=False`` puts (size, mtime) in place of content hashes: no file is read."""
    identity: dict[str, Any] = {"kind": source.kind, "max_documents": source.max_documents}
    if source.kind == "stdlib":
        listing = hashlib.blake2b(digest_size=16)
        for relative, size, _mtime in _stdlib_listing():
            listing.update(f"{relative}\0{size}\n".encode())
        return identity | {"python": sys.version, "listing": listing.hexdigest()}
    identity["text_column"] = source.text_column
    if source.kind == "disk":
        folder = Path(source.path)
        if not folder.is_dir():
            raise UserError(f"corpus.path {source.path!r} does not exist (expected a datasets save_to_disk folder)")
        files = files_under(folder)
        value = folder_fingerprint(folder, files) if content else stamp_fingerprint(files, folder)
        return identity | {"split": source.split, "folder": value}
    files = corpus_files(source)
    if source.kind == "hf":
        identity |= {"name": source.name, "config": source.config, "split": source.split}
        snapshot = hub_snapshot(source.name)
        identity["revision"] = snapshot_revision(snapshot) if snapshot is not None else UNRESOLVED
        if files is None:
            return identity
    listed = [Path(file.path) for file in files]
    if content:
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(listed)))) as pool:
            values = list(pool.map(file_fingerprint, listed))
    else:
        values = [f"{file.size}:{file.mtime_ns}" for file in files]
    return identity | {"files": [[file.key, file.size, value] for file, value in zip(files, values, strict=True)]}
