"""Corpora, disjoint document splits, tokenizers and memory-mapped packed token shards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from gridlab.atomic import staged_directory

SPLITS = ("pretrain", "retrain", "calibration", "validation")
SOURCE_KINDS = ("stdlib", "hf", "disk", "files")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SHARD_FORMAT_VERSION = 1
_ENCODE_BATCH_DOCUMENTS = 256


@dataclass(frozen=True)
class CorpusSource:
    """Where text comes from. The default is the running Python's standard library: no network, ~31 MB."""

    kind: Literal["stdlib", "hf", "disk", "files"] = "stdlib"
    name: str | None = None  # hf: hub name (e.g. "mlfoundations/dclm-baseline-1.0")
    config: str | None = None  # hf: dataset config
    split: str = "train"  # hf/disk: dataset split
    path: str | None = None  # disk: load_from_disk folder
    files: tuple[str, ...] = ()  # files: local .txt / .jsonl / .parquet
    text_column: str = "text"
    max_documents: int | None = None  # cap for streaming sources

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"unknown corpus kind {self.kind!r}; valid kinds: {', '.join(SOURCE_KINDS)}")
        if self.kind == "hf" and not self.name:
            raise ValueError("corpus kind 'hf' needs name (a Hugging Face dataset, e.g. 'HuggingFaceFW/fineweb-edu')")
        if self.kind == "disk" and not self.path:
            raise ValueError("corpus kind 'disk' needs path (a folder written by datasets' save_to_disk)")
        if self.kind == "files" and not self.files:
            raise ValueError("corpus kind 'files' needs files (local .txt, .jsonl or .parquet paths)")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be a positive integer or None, got {self.max_documents}")


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of documents per split; each document goes to one split by a seeded hash of its key.

    Defaults: the parent's pretraining gets most text; retraining gets half as much (budgets of pruned and scratch
    models are a fraction of the parent's); calibration needs only a few hundred sequences (Wanda/SparseGPT use
    128); validation gets enough for a low-variance loss (~0.8M tokens of the default corpus).
    """

    pretrain: float = 0.6
    retrain: float = 0.3
    calibration: float = 0.02
    validation: float = 0.08
    seed: int = 0

    def __post_init__(self):
        values = [getattr(self, split) for split in SPLITS]
        if any(not 0 < v < 1 for v in values) or abs(sum(values) - 1) > 1e-9:
            raise ValueError(
                f"split fractions must each lie in (0, 1) and sum to 1, got {dict(zip(SPLITS, values))}"
            )


DEFAULT_FRACTIONS = SplitFractions()


def assign_split(doc_key: str, fractions: SplitFractions) -> str:
    """The split of one document: a uniform draw from a hash of (seed, key), so splits are disjoint and stable."""
    digest = hashlib.blake2b(f"{fractions.seed}\0{doc_key}".encode(), digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2**64
    cumulative = 0.0
    for split in SPLITS[:-1]:
        cumulative += getattr(fractions, split)
        if draw < cumulative:
            return split
    return SPLITS[-1]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents(source: CorpusSource) -> Iterator[tuple[str, str]]:
    root = stdlib_root()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for file in sorted(files):
            if file.endswith(".py"):
                path = Path(folder) / file
                yield path.relative_to(root).as_posix(), path.read_bytes().decode("utf-8", errors="replace")


def _dataset_documents(dataset, origin: str, text_column: str) -> Iterator[tuple[str, str]]:
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"text column {text_column!r} not in {origin}; its columns: {', '.join(columns)}")
    for index, row in enumerate(dataset):
        if text_column not in row:
            raise ValueError(f"text column {text_column!r} not in {origin}; its columns: {', '.join(row)}")
        yield f"{origin}#{index}", row[text_column]


def _hf_documents(source: CorpusSource) -> Iterator[tuple[str, str]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise ValueError(
            f"cannot load Hugging Face dataset {source.name!r} (config {source.config!r}, split {source.split!r}): "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    yield from _dataset_documents(dataset, f"{source.name}/{source.config or ''}/{source.split}", source.text_column)


def _disk_documents(source: CorpusSource) -> Iterator[tuple[str, str]]:
    import datasets

    if not Path(source.path).is_dir():
        raise ValueError(f"dataset folder {source.path!r} does not exist (expected a save_to_disk folder)")
    dataset = datasets.load_from_disk(source.path)
    if isinstance(dataset, datasets.DatasetDict):
        if source.split not in dataset:
            raise ValueError(f"split {source.split!r} not in {source.path!r}; its splits: {', '.join(dataset)}")
        dataset = dataset[source.split]
    yield from _dataset_documents(dataset, Path(source.path).name, source.text_column)


def _file_documents(source: CorpusSource) -> Iterator[tuple[str, str]]:
    import datasets

    for file in source.files:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"corpus file {file!r} does not exist")
        if path.suffix == ".txt":
            yield path.name, path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix in (".jsonl", ".json", ".parquet"):
            builder = "parquet" if path.suffix == ".parquet" else "json"
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
            yield from _dataset_documents(dataset, path.name, source.text_column)
        else:
            raise ValueError(f"corpus file {file!r} has an unsupported type; valid: .txt, .jsonl, .json, .parquet")


def iter_documents(source: CorpusSource) -> Iterator[tuple[str, str]]:
    """(document key, text) pairs, streamed in a fixed order; at most source.max_documents of them."""
    documents = {
        "stdlib": _stdlib_documents,
        "hf": _hf_documents,
        "disk": _disk_documents,
        "files": _file_documents,
    }[source.kind](source)
    for count, document in enumerate(documents):
        if source.max_documents is not None and count >= source.max_documents:
            return
        yield document


def _update_fingerprint(digest, key: str, text: str) -> None:
    encoded_key, encoded_text = key.encode(), text.encode("utf-8", errors="replace")
    digest.update(len(encoded_key).to_bytes(8, "big") + encoded_key)
    digest.update(len(encoded_text).to_bytes(8, "big") + encoded_text)


def corpus_fingerprint(source: CorpusSource) -> str:
    """A hash of every (key, text) that iter_documents reads: it changes exactly when the text does."""
    digest = hashlib.blake2b(digest_size=16)
    for key, text in iter_documents(source):
        _update_fingerprint(digest, key, text)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- tokenizers


def train_tokenizer(source: CorpusSource, fractions: SplitFractions, vocab_size: int, out_dir: Path) -> Path:
    """Train a byte-level BPE on the pretrain split and save it as a PreTrainedTokenizerFast folder (atomically)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 (256 bytes + merges + special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    pretrain_texts = (text for key, text in iter_documents(source) if assign_split(key, fractions) == "pretrain")
    tokenizer.train_from_iterator(pretrain_texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    with staged_directory(Path(out_dir)) as staging:
        wrapped.save_pretrained(staging)
    return Path(out_dir)


def load_tokenizer(name_or_path: str | Path):
    """Any Hugging Face tokenizer: a local folder or a hub name (from the local cache when offline)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot load tokenizer {str(name_or_path)!r}: give a tokenizer folder or a cached hub name "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {str(name_or_path)!r} has no fast (Rust) implementation; gridlab needs one")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {str(name_or_path)!r} has no eos token; documents are joined with it")
    return tokenizer


def tokenizer_hash(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens)."""
    definition = tokenizer.backend_tokenizer.to_str() + json.dumps(
        [tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token]
    )
    return hashlib.blake2b(definition.encode(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------------- token shards


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class TokenShard:
    """Packed sequences of exactly seq_len tokens, memory-mapped read-only from `<split>.bin` (+ `<split>.json`)."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.seq_len: int = meta["seq_len"]
        self.n_sequences: int = meta["n_sequences"]
        self.n_tokens: int = self.n_sequences * self.seq_len
        self._array = np.memmap(
            self.path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(self.n_sequences, self.seq_len)
        )

    @classmethod
    def open(cls, path: Path) -> TokenShard:
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise ValueError(f"no token shard at {str(path)!r} (expected {path.name} beside {meta_path.name})")
        return cls(path, json.loads(meta_path.read_text()))

    def __len__(self) -> int:
        return self.n_sequences

    def __getitem__(self, idx) -> torch.LongTensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        return torch.from_numpy(self._array[idx].astype(np.int64))

    def __repr__(self) -> str:
        return f"TokenShard({str(self.path)!r}, n_sequences={self.n_sequences}, seq_len={self.seq_len})"


class _ShardWriter:
    """Appends token ids and writes every complete seq_len row to disk; never holds more than one batch."""

    def __init__(self, path: Path, seq_len: int, dtype: np.dtype):
        self.path, self.seq_len, self.dtype = path, seq_len, dtype
        self.file = open(path, "wb")
        self.pending = np.empty(0, dtype=dtype)
        self.n_sequences = 0
        self.n_documents = 0

    def add(self, documents_ids: list[list[int]], eos_id: int) -> None:
        pieces = [self.pending]
        for ids in documents_ids:
            pieces.append(np.asarray(ids, dtype=self.dtype))
            pieces.append(np.asarray([eos_id], dtype=self.dtype))
        tokens = np.concatenate(pieces)
        full_rows = len(tokens) // self.seq_len
        tokens[: full_rows * self.seq_len].tofile(self.file)
        self.pending = tokens[full_rows * self.seq_len :].copy()
        self.n_sequences += full_rows
        self.n_documents += len(documents_ids)

    def close(self) -> None:
        self.file.close()  # the incomplete last row is dropped: every sequence is exactly seq_len tokens


def shard_cache_key(fingerprint: str, tokenizer_digest: str, fractions: SplitFractions, seq_len: int) -> str:
    identity = json.dumps(
        [SHARD_FORMAT_VERSION, fingerprint, tokenizer_digest, asdict(fractions), seq_len], sort_keys=True
    )
    return hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()


def build_shards(
    source: CorpusSource,
    tokenizer_dir: str | Path,
    fractions: SplitFractions,
    seq_len: int,
    cache_dir: Path,
) -> dict[str, Path]:
    """Tokenize every split into a packed shard (split -> `.bin` path), once per (corpus, tokenizer, splits, seq_len).

    The cache folder `cache_dir/<key>/` appears complete or not at all; its `manifest.json` records the corpus
    fingerprint and the token counts.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    tokenizer = load_tokenizer(tokenizer_dir)
    fingerprint = corpus_fingerprint(source)
    key = shard_cache_key(fingerprint, tokenizer_hash(tokenizer), fractions, seq_len)
    cache_dir = Path(cache_dir)
    target = cache_dir / key
    if (target / "manifest.json").is_file():
        return {split: target / f"{split}.bin" for split in SPLITS}

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        manifest = _tokenize_into(staging, source, tokenizer, fractions, seq_len, fingerprint)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same cache first: theirs is identical
            if not (target / "manifest.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {split: target / f"{split}.bin" for split in SPLITS}


def _tokenize_into(folder: Path, source, tokenizer, fractions, seq_len: int, fingerprint: str) -> dict:
    dtype = _token_dtype(len(tokenizer))
    eos_id = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    writers = {split: _ShardWriter(folder / f"{split}.bin", seq_len, dtype) for split in SPLITS}
    batches: dict[str, list[str]] = {split: [] for split in SPLITS}
    digest = hashlib.blake2b(digest_size=16)

    def flush(split: str) -> None:
        encodings = backend.encode_batch(batches[split], add_special_tokens=False)
        writers[split].add([encoding.ids for encoding in encodings], eos_id)
        batches[split].clear()

    for key, text in iter_documents(source):
        _update_fingerprint(digest, key, text)
        split = assign_split(key, fractions)
        batches[split].append(text)
        if len(batches[split]) >= _ENCODE_BATCH_DOCUMENTS:
            flush(split)
    for split in SPLITS:
        flush(split)
        writers[split].close()
    if digest.hexdigest() != fingerprint:
        raise RuntimeError(f"corpus {source} changed while it was being tokenized; run again")

    too_small = [split for split in SPLITS if writers[split].n_sequences == 0]
    if too_small:
        counts = {split: writers[split].n_documents for split in SPLITS}
        raise ValueError(
            f"corpus too small: split(s) {', '.join(too_small)} got less than one sequence of {seq_len} tokens "
            f"(documents per split: {counts}); use a larger corpus, a shorter seq_len or larger fractions"
        )
    splits = {}
    for split, writer in writers.items():
        meta = {
            "split": split,
            "seq_len": seq_len,
            "n_sequences": writer.n_sequences,
            "n_documents": writer.n_documents,
            "dtype": dtype.name,
            "eos_token_id": eos_id,
            "corpus_fingerprint": fingerprint,
        }
        (folder / f"{split}.json").write_text(json.dumps(meta, indent=1))
        splits[split] = {k: meta[k] for k in ("n_sequences", "n_documents")} | {"n_tokens": writer.n_sequences * seq_len}
    return {
        "corpus_fingerprint": fingerprint,
        "source": asdict(source),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "fractions": asdict(fractions),
        "seq_len": seq_len,
        "splits": splits,
    }


def shard_manifest(shard_path: Path) -> dict:
    """The manifest of the cache folder a shard belongs to (corpus fingerprint, token counts per split)."""
    return json.loads((Path(shard_path).parent / "manifest.json").read_text())
