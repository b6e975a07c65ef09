"""The data configs, one definition each: the grid file's `[corpus]`, `[splits]` and `[tokenizer]` tables
(gridlab.spec composes these classes) and the data stage's arguments are the same objects.

Every value is checked when the object is built: types are exact (an integer key takes an integer, not 4.5 or
"4"), floats are finite, unknown keys and keys that do not apply to a corpus kind are refused, each with a one-line
message. Building one from a grid file reports the first problem as ``key path: message`` (gridlab.spec).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

SPLITS = ("pretrain", "retrain", "calibration", "validation")
SOURCE_KINDS = ("stdlib", "hf", "disk", "files")
# 256 byte tokens + 2 special tokens leave a BPE below 512 almost no merges; the tokenizer trainer enforces the same.
MIN_VOCAB_SIZE = 512
MAX_VOCAB_SIZE = 2**20
# Documents of the pretrain split a trained tokenizer sees: enough for a stable BPE, bounded at any corpus size.
DEFAULT_SAMPLE_DOCUMENTS = 100_000

Int = Annotated[int, Strict()]
Fraction = Annotated[float, Strict(), Field(gt=0, lt=1)]   # Strict float takes ints too, never bools or strings
Name = Annotated[str, Strict(), Field(min_length=1)]
Count = Annotated[int, Strict(), Field(ge=1)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The keys each corpus kind reads; any other key given a non-default value is a mistake.
_KIND_KEYS = {
    "stdlib": ("max_documents",),
    "hf": ("name", "config", "split", "text_column", "max_documents"),
    "disk": ("path", "split", "text_column", "max_documents"),
    "files": ("files", "text_column", "max_documents"),
}
_KIND_NEEDS = {"hf": ("name", "a Hugging Face dataset name, e.g. 'mlfoundations/dclm-baseline-1.0', or a local "
                              "snapshot folder"),
               "disk": ("path", "a folder written by datasets' save_to_disk"),
               "files": ("files", "paths, folders or glob patterns of .txt, .jsonl, .json, .jsonl.zst, .jsonl.gz, "
                                  ".json.gz or .parquet files")}


class CorpusSource(_Config):
    """Where text comes from. The default is the running Python's standard library: no network, ~31 MB.

    - ``stdlib``: every ``.py`` file of the standard library (one document each).
    - ``files``: local files, folders (every corpus file under them) or glob patterns (``**`` spans folders);
      ``.txt`` is one document per file, the JSON formats and ``.parquet`` one document per record/row.
    - ``hf``: a Hugging Face hub dataset, read from its local snapshot when the hub cache holds one (or ``name`` is
      a snapshot folder), else streamed from the hub.
    - ``disk``: a ``datasets.save_to_disk`` folder.
    ``max_documents`` keeps the first documents in reading order.
    """

    kind: Literal["stdlib", "hf", "disk", "files"] = "stdlib"
    name: Name | None = None
    config: Name | None = None
    split: Name = "train"
    path: Name | None = None
    files: tuple[Name, ...] = ()
    text_column: Name = "text"
    max_documents: Count | None = None

    @field_validator("files", mode="before")
    @classmethod
    def _files_as_tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _keys_of_kind(self) -> CorpusSource:
        needed = _KIND_NEEDS.get(self.kind)
        if needed and not getattr(self, needed[0]):
            raise ValueError(f"a corpus of kind {self.kind!r} needs {needed[0]!r} ({needed[1]})")
        for key, field in CorpusSource.model_fields.items():
            if key != "kind" and key not in _KIND_KEYS[self.kind] and getattr(self, key) != field.default:
                raise ValueError(f"{key} does not apply to a corpus of kind {self.kind!r} (its keys: "
                                 f"{', '.join(_KIND_KEYS[self.kind])})")
        return self


class SplitFractions(_Config):
    """Fractions of documents per split; each document goes to one split by a seeded hash of its key.

    Defaults: the parent's pretraining gets most text; retraining gets half as much (budgets of pruned and scratch
    models are a fraction of the parent's); calibration needs only a few hundred sequences (Wanda/SparseGPT use
    128); validation gets enough for a low-variance loss (~0.8M tokens of the default corpus).
    """

    pretrain: Fraction = 0.6
    retrain: Fraction = 0.3
    calibration: Fraction = 0.02
    validation: Fraction = 0.08
    seed: Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)] = 0  # as every seed of the grid (DuckDB INTEGER)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = sum(getattr(self, split) for split in SPLITS)
        if abs(total - 1) > 1e-9:
            raise ValueError(f"split fractions add up to {total:g}; they must add up to 1 "
                             f"({' + '.join(f'{split} {getattr(self, split):g}' for split in SPLITS)})")
        return self


DEFAULT_FRACTIONS = SplitFractions()


class TokenizerConfig(_Config):
    """Train a byte-level BPE of ``vocab_size`` on (at most ``sample_documents`` of) the pretrain split, or load
    ``path`` (a tokenizer folder or a cached hub name)."""

    vocab_size: Int | None = None
    path: Name | None = None
    sample_documents: Count = DEFAULT_SAMPLE_DOCUMENTS

    @field_validator("vocab_size")
    @classmethod
    def _vocab_in_range(cls, value: int | None) -> int | None:
        if value is not None and not MIN_VOCAB_SIZE <= value <= MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must lie in {MIN_VOCAB_SIZE} … {MAX_VOCAB_SIZE} (a BPE needs 256 byte "
                             f"tokens, 2 special tokens and room for merges)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if (self.vocab_size is None) == (self.path is None):
            raise ValueError("give exactly one of vocab_size (train a BPE) or path (a tokenizer folder or hub name)")
        if self.path is not None and self.sample_documents != DEFAULT_SAMPLE_DOCUMENTS:
            raise ValueError("sample_documents applies only to a trained tokenizer (vocab_size), not to path")
        return self


def document_draw(doc_key: str, seed: int) -> float:
    """A document's uniform draw in [0, 1) from a hash of (seed, key): what assigns its split."""
    digest = hashlib.blake2b(f"{seed}\0{doc_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_split(doc_key: str, fractions: SplitFractions) -> str:
    """The split of one document: disjoint, stable when documents are added, not ordered by key."""
    draw = document_draw(doc_key, fractions.seed)
    cumulative = 0.0
    for split in SPLITS[:-1]:
        cumulative += getattr(fractions, split)
        if draw < cumulative:
            return split
    return SPLITS[-1]
