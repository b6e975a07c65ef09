"""Token shards: each split is one stream of its documents, each followed by the eos token, read as rows of exactly
seq_len tokens (the incomplete last row dropped). The stream is tokenized in pieces, one per corpus unit, by any
number of partition tasks, and read through one multi-file TokenShard; the pieces and their order depend on the
corpus alone, so the shards are the same bytes whatever the number of tasks.

A shard folder (build_shards makes ``cache_dir/<key>/``):

    pieces/u000000/<split>.bin   the unit's tokens of each split                 ┐ the folder appears whole
    pieces/u000000/docs.bin      (split, tokens) of each document, in order      │ (gridlab.atomic) or not at
    pieces/u000000/piece.json    what the piece holds and was made from          ┘ all; a task rerun skips it
    <split>.json                 the split's shard: seq_len, n_sequences, dtype, its pieces in order
    manifest.json                written last: corpus fingerprint, counts — the shard is finished when it exists

    tokenize_partition(source, tokenizer_dir, fractions, k, K, out_dir)   # partition k of K: its units' pieces
    assemble(source, tokenizer_dir, fractions, seq_len, out_dir)          # all pieces present → the shards
    build_shards(source, tokenizer_dir, fractions, seq_len, cache_dir)    # both, on this machine's cores
    shard_folder(source, tokenizer_dir, fractions, seq_len, cache_dir)    # the out_dir build_shards uses
    TokenShard.open(path).documents()                                     # where each document of a split is

Document boundaries come from the ``docs.bin`` records written while tokenizing, never from searching the stream
for eos: a loaded tokenizer encodes an eos string inside a document's text (e.g. "<|endoftext|>" in web text) as
the eos id itself, so a search would cut such documents in two.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections import Counter, OrderedDict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gridlab.atomic import staged_directory, write_json
from gridlab.data.schema import SPLITS, SplitFractions, assign_split
from gridlab.data.sources import CorpusSource, Unit, corpus_identity, corpus_units, iter_unit
from gridlab.data.tokenizer import load_tokenizer, tokenizer_hash
from gridlab.errors import UserError

SHARD_FORMAT_VERSION = 2
_BATCH_DOCUMENTS = 256
_BATCH_CHARS = 8 << 20
_DOC_RECORD = np.dtype([("split", "u1"), ("tokens", "<u4")])
_SPLIT_INDEX = {split: index for index, split in enumerate(SPLITS)}
_OPEN_PIECES = 64  # memory maps a TokenShard keeps open at once


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def available_cores() -> int:
    """The cores this process may use: GRIDLAB_THREADS (set by gridlab's executors), else its CPU affinity."""
    threads = os.environ.get("GRIDLAB_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        return int(threads)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------------ reading


class TokenShard:
    """Packed sequences of exactly seq_len tokens, memory-mapped read-only: a split's ``<split>.json`` and the
    pieces it lists, or a single ``<name>.bin`` of rows with a ``<name>.json`` beside it (seq_len, n_sequences,
    dtype; optionally ``documents``, the token counts of the documents the file holds end to end, and
    ``eos_token_id``, for document-wise evaluation)."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.seq_len: int = meta["seq_len"]
        self.n_sequences: int = meta["n_sequences"]
        self.n_tokens: int = self.n_sequences * self.seq_len
        self.dtype = np.dtype(meta["dtype"])
        if "pieces" in meta:
            self._files = [self.path.parent / name for name, _ in meta["pieces"]]
            lengths = [tokens for _, tokens in meta["pieces"]]
        else:
            # a single file: its rows, or its documents' tokens when it lists them (the last row may be incomplete)
            self._files = [self.path.with_suffix(".bin")]
            lengths = [max(self.n_tokens, int(sum(meta.get("documents", ()))))]
        self._starts = np.cumsum([0, *lengths])
        if self._starts[-1] < self.n_tokens:
            raise ValueError(f"token shard {str(self.path)!r} lists fewer tokens than its {self.n_sequences} rows")
        self._lengths = lengths
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self._rows = None
        if len(self._files) == 1 and self.n_tokens:
            self._rows = self._piece(0)[: self.n_tokens].reshape(self.n_sequences, self.seq_len)

    @classmethod
    def open(cls, path: Path) -> TokenShard:
        path = Path(path)
        meta_path = path if path.suffix == ".json" else path.with_suffix(".json")
        if not meta_path.is_file():
            raise ValueError(f"no token shard at {str(path)!r} (expected {meta_path.name})")
        meta = json.loads(meta_path.read_text())
        if "pieces" not in meta and not meta_path.with_suffix(".bin").is_file():
            raise ValueError(f"no token shard at {str(path)!r} (expected {meta_path.with_suffix('.bin').name} "
                             f"beside {meta_path.name})")
        return cls(meta_path, meta)

    def __len__(self) -> int:
        return self.n_sequences

    def __getitem__(self, idx):
        import torch  # gridlab.data loads with `gridlab status` (corpus identities): torch only when shards are read

        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        if self._rows is not None:
            rows = self._rows[idx]
        elif isinstance(idx, (int, np.integer)):
            rows = self._row(int(idx))
        elif isinstance(idx, slice):
            start, stop, step = idx.indices(self.n_sequences)
            if step == 1:
                rows = self._tokens(start * self.seq_len, max(0, stop - start) * self.seq_len)
                rows = rows.reshape(-1, self.seq_len)
            else:
                rows = self._stack(range(start, stop, step), (len(range(start, stop, step)),))
        else:
            indices = np.asarray(idx)
            rows = self._stack(indices.reshape(-1).tolist(), indices.shape)
        return torch.from_numpy(np.asarray(rows).astype(np.int64))

    def _stack(self, indices: Iterable[int], shape: tuple) -> np.ndarray:
        rows = [self._row(int(i)) for i in indices]
        stacked = np.stack(rows) if rows else np.empty((0, self.seq_len), self.dtype)
        return stacked.reshape(*shape, self.seq_len)

    def _row(self, index: int) -> np.ndarray:
        if index < 0:
            index += self.n_sequences
        if not 0 <= index < self.n_sequences:
            raise IndexError(f"row {index} out of range for a shard of {self.n_sequences} rows")
        return self._tokens(index * self.seq_len, self.seq_len)

    def _tokens(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the split's stream, across pieces."""
        out = np.empty(count, self.dtype)
        piece = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < count:
            offset = start + filled - int(self._starts[piece])
            take = min(count - filled, self._lengths[piece] - offset)
            out[filled:filled + take] = self._piece(piece)[offset:offset + take]
            filled += take
            piece += 1
        return out

    @property
    def stream_tokens(self) -> int:
        """Tokens of the split's whole stream, the incomplete last row included (``stream`` reads up to here)."""
        return int(self._starts[-1])

    def stream(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the split's stream (not cut into rows), across pieces."""
        if not (0 <= start and 0 <= count and start + count <= self.stream_tokens):
            raise IndexError(f"tokens [{start}, {start + count}) out of range for a stream of {self.stream_tokens}")
        return self._tokens(start, count)

    def documents(self) -> DocumentIndex:
        """The split's documents in stream order, from the pieces' ``docs.bin`` records (a single-file shard: the
        ``documents`` list of token counts in its .json). Each document's tokens include the eos that ends it."""
        if "pieces" not in self.meta:
            lengths = self.meta.get("documents")
            if lengths is None:
                raise ValueError(f"token shard {str(self.path)!r} records no document boundaries (shards made by "
                                 f"gridlab.data.build_shards do; a single-file shard needs a 'documents' list)")
            keys = _mix64(np.full(len(lengths), _name_hash(self.path.stem), np.uint64)
                          ^ _mix64(np.arange(len(lengths), dtype=np.uint64)))
            return DocumentIndex.of(np.asarray(lengths, np.int64), keys, self.stream_tokens)
        split = _SPLIT_INDEX[self.meta["split"]]
        lengths, keys = [], []
        for name, tokens in self.meta["pieces"]:
            folder = self.path.parent / Path(name).parent
            records = np.fromfile(folder / "docs.bin", dtype=_DOC_RECORD)
            unit = json.loads((folder / "piece.json").read_text())["unit"]
            ordinal = np.flatnonzero(records["split"] == split)   # its place in the unit: the same for any split
            counts = records["tokens"][ordinal].astype(np.int64)
            kept = int(np.searchsorted(np.cumsum(counts), tokens)) + 1  # a unit cut by max_documents: its first
            if kept > len(counts) or int(counts[:kept].sum()) != tokens:
                raise ValueError(f"{folder / 'docs.bin'}: its {SPLITS[split]} documents do not add up to the "
                                 f"{tokens} tokens {self.path.name} lists; rebuild the shards")
            lengths.append(counts[:kept])
            keys.append(_mix64(np.full(kept, _name_hash(unit), np.uint64) ^ _mix64(ordinal[:kept].astype(np.uint64))))
        return DocumentIndex.of(np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
                                np.concatenate(keys) if keys else np.zeros(0, np.uint64), self.stream_tokens)

    def _piece(self, index: int) -> np.memmap:
        if index in self._maps:
            self._maps.move_to_end(index)
            return self._maps[index]
        array = np.memmap(self._files[index], dtype=self.dtype, mode="r", shape=(self._lengths[index],))
        self._maps[index] = array
        if len(self._maps) > _OPEN_PIECES:
            self._maps.popitem(last=False)
        return array

    def __repr__(self) -> str:
        return f"TokenShard({str(self.path)!r}, n_sequences={self.n_sequences}, seq_len={self.seq_len})"


@dataclass(frozen=True)
class DocumentIndex:
    """A split's documents in stream order: where each starts in the stream, how many tokens it holds (the eos
    that ends it included), and a 64-bit key from its corpus unit's name and its place in that unit — the same
    whatever the tokenizer, seq_len or number of tokenizing tasks, so a document sample drawn by key is too."""

    starts: np.ndarray    # int64
    lengths: np.ndarray   # int64
    keys: np.ndarray      # uint64

    @classmethod
    def of(cls, lengths: np.ndarray, keys: np.ndarray, stream_tokens: int) -> DocumentIndex:
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
        if int(lengths.sum()) > stream_tokens or (len(lengths) and int(lengths.min()) < 1):
            raise ValueError(f"document records ({int(lengths.sum())} tokens) do not fit a stream of "
                             f"{stream_tokens} tokens")
        return cls(starts, lengths, keys)

    def __len__(self) -> int:
        return len(self.lengths)


def _name_hash(name: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big"))


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping): a bijection whose outputs look uniform."""
    z = np.asarray(values, np.uint64).copy()
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def key_draws(keys: np.ndarray, salt: str) -> np.ndarray:
    """A uniform draw in [0, 1) per document key for one purpose (``salt``): independent across purposes."""
    mixed = _mix64(np.asarray(keys, np.uint64) ^ _name_hash(salt))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def shard_manifest(shard_path: Path) -> dict:
    """The manifest of the shard folder a split belongs to (corpus fingerprint, token counts per split)."""
    return json.loads((Path(shard_path).parent / "manifest.json").read_text())


# -------------------------------------------------------------------------------------------------- partitions


def assign_partitions(units: list[Unit], partitions: int) -> list[int]:
    """The partition of each unit: round-robin in reading order (unit i → i mod partitions). Balanced for files of
    similar size (DCLM's), and the tasks advance through the corpus together, so with max_documents at most one
    round of units past the cap is read before the finished pieces show it is reached. Only the work split depends
    on it, never the shards."""
    return [unit.index % partitions for unit in units]


@dataclass
class _Work:
    """What a process needs to tokenize units: plain data, sent once to each worker process."""

    source: CorpusSource
    units: list[Unit]
    fractions: SplitFractions
    tokenizer_json: str
    tokenizer_digest: str
    eos_id: int
    dtype: str
    pieces: Path
    prefix: list[int] = field(default_factory=lambda: [0])  # documents before unit i, as far as known yet

    def piece_key(self, unit: Unit) -> str:
        identity = [SHARD_FORMAT_VERSION, unit.name, unit.stamp, unit.limit, self.source.text_column,
                    self.fractions.model_dump(), self.tokenizer_digest]
        return hashlib.blake2b(json.dumps(identity).encode(), digest_size=12).hexdigest()

    def beyond_cap(self, index: int, cap: int) -> bool:
        """True when the units before ``index`` are known to hold at least ``cap`` documents (every earlier unit
        has a known count or a finished piece, up to where the cap is reached)."""
        while len(self.prefix) <= index and self.prefix[-1] < cap:
            unit = self.units[len(self.prefix) - 1]
            count = unit.count
            if count is None:
                piece = read_piece(self.pieces / piece_name(unit), self.piece_key(unit))
                if piece is None:
                    return False  # still being tokenized: this unit may be needed
                count = piece["documents"]
            self.prefix.append(self.prefix[-1] + count)
        return self.prefix[min(index, len(self.prefix) - 1)] >= cap


def piece_name(unit: Unit) -> str:
    return f"u{unit.index:06d}"


def read_piece(folder: Path, key: str) -> dict | None:
    """A finished piece's description, or None when it is missing, was made from other inputs, or is torn."""
    try:
        meta = json.loads((folder / "piece.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    try:
        if (folder / "docs.bin").stat().st_size != meta["documents"] * _DOC_RECORD.itemsize:
            return None
        for split in SPLITS:
            if (folder / f"{split}.bin").stat().st_size != meta["splits"][split]["tokens"] * itemsize:
                return None
    except OSError:
        return None
    return meta


def tokenize_partition(source: CorpusSource, tokenizer_dir: str | Path, fractions: SplitFractions, k: int,
                       partitions: int, out_dir: str | Path, processes: int = 1) -> dict[str, int]:
    """Tokenize partition ``k`` of ``partitions``: write the shard piece of each unit it owns under
    ``out_dir/pieces/``, with ``processes`` worker processes. A piece appears whole or not at all; a finished piece
    is kept (a rerun after a crash does only what is missing). With max_documents, units that lie wholly beyond
    the cap are skipped once that is known. Returns how many units were written, already complete, or beyond."""
    if not (isinstance(partitions, int) and partitions >= 1 and isinstance(k, int) and 0 <= k < partitions):
        raise ValueError(f"partition {k!r} of {partitions!r}: need 0 <= k < partitions")
    tokenizer = load_tokenizer(tokenizer_dir)
    units = corpus_units(source)
    owner = assign_partitions(units, partitions)
    mine = [unit.index for unit in units if owner[unit.index] == k]
    return _tokenize_units(source, tokenizer, fractions, units, mine, Path(out_dir), processes)


def _tokenize_units(source, tokenizer, fractions, units: list[Unit], indices: list[int], out_dir: Path,
                    processes: int) -> dict[str, int]:
    work = _Work(source, units, fractions, tokenizer.backend_tokenizer.to_str(), tokenizer_hash(tokenizer),
                 tokenizer.eos_token_id, token_dtype(len(tokenizer)).name, out_dir / "pieces")
    outcomes: Counter[str] = Counter()
    processes = max(1, min(processes, len(indices)))
    if processes == 1:
        backend = tokenizer.backend_tokenizer
        for index in indices:
            outcomes[_tokenize_unit(work, backend, units[index])] += 1
        return dict(outcomes)
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(work,))
    try:
        for outcome in pool.map(_worker_unit, indices):
            outcomes[outcome] += 1
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return dict(outcomes)


_WORKER: tuple[_Work, object] | None = None


def _start_worker(work: _Work) -> None:
    # One tokenizer thread per process: the processes are the parallelism (set before tokenizers starts its pool).
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer  # after the thread settings above, which it reads when it loads

    global _WORKER
    _WORKER = (work, Tokenizer.from_str(work.tokenizer_json))


def _worker_unit(index: int) -> str:
    work, backend = _WORKER
    return _tokenize_unit(work, backend, work.units[index])


def _tokenize_unit(work: _Work, backend, unit: Unit) -> str:
    folder = work.pieces / piece_name(unit)
    key = work.piece_key(unit)
    if read_piece(folder, key) is not None:
        return "complete"
    if work.source.max_documents is not None and work.beyond_cap(unit.index, work.source.max_documents):
        return "beyond"
    work.pieces.mkdir(parents=True, exist_ok=True)
    for stale in work.pieces.glob(f".{folder.name}.*"):  # the staging folder of a killed attempt
        shutil.rmtree(stale, ignore_errors=True)
    with staged_directory(folder) as staging:
        _write_piece(work, backend, unit, key, staging)
    return "written"


def _write_piece(work: _Work, backend, unit: Unit, key: str, staging: Path) -> None:
    dtype = np.dtype(work.dtype)
    outputs = [open(staging / f"{split}.bin", "wb") for split in SPLITS]
    records_file = open(staging / "docs.bin", "wb")
    tokens, documents = [0] * len(SPLITS), [0] * len(SPLITS)
    digest = hashlib.blake2b(digest_size=16)
    texts: list[str] = []
    splits: list[int] = []
    chars = 0

    def flush() -> None:
        if not texts:
            return
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        streams: list[list[int]] = [[] for _ in SPLITS]
        records = np.empty(len(texts), _DOC_RECORD)
        records["split"] = splits
        lengths = []
        for split, encoding in zip(splits, encodings, strict=True):
            ids = encoding.ids
            streams[split].extend(ids)
            streams[split].append(work.eos_id)
            lengths.append(len(ids) + 1)
            documents[split] += 1
        records["tokens"] = lengths
        for split, stream in enumerate(streams):
            if stream:
                np.asarray(stream, dtype=dtype).tofile(outputs[split])
                tokens[split] += len(stream)
        records.tofile(records_file)
        texts.clear()
        splits.clear()

    try:
        for doc_key, text in iter_unit(work.source, unit):
            _update_fingerprint(digest, doc_key, text)
            texts.append(text)
            splits.append(_SPLIT_INDEX[assign_split(doc_key, work.fractions)])
            chars += len(text)
            if len(texts) >= _BATCH_DOCUMENTS or chars >= _BATCH_CHARS:
                flush()
                chars = 0
        flush()
    finally:
        for output in (*outputs, records_file):
            output.close()
    where = unit.file.path if unit.file is not None else unit.name
    if unit.file is not None:
        stat = os.stat(unit.file.path)
        if (stat.st_size, stat.st_mtime_ns) != (unit.file.size, unit.file.mtime_ns):
            raise UserError(f"{where}: changed while it was being read; run again")
    if sum(documents) == 0:
        raise UserError(f"{where}: holds no documents")
    write_json(staging / "piece.json", {
        "format": SHARD_FORMAT_VERSION, "key": key, "unit": unit.name, "documents": sum(documents),
        "digest": digest.hexdigest(), "dtype": dtype.name,
        "splits": {split: {"tokens": tokens[i], "documents": documents[i]} for i, split in enumerate(SPLITS)},
    }, indent=1)


def _update_fingerprint(digest, key: str, text: str) -> None:
    encoded_key, encoded_text = key.encode(), text.encode("utf-8", errors="replace")
    digest.update(len(encoded_key).to_bytes(8, "big") + encoded_key)
    digest.update(len(encoded_text).to_bytes(8, "big") + encoded_text)


# ---------------------------------------------------------------------------------------------------- assembly


def assemble(source: CorpusSource, tokenizer_dir: str | Path, fractions: SplitFractions, seq_len: int,
             out_dir: str | Path) -> dict[str, Path]:
    """Make each split's shard the ordered set of its pieces (split -> ``<split>.json``) once every partition's
    pieces are in ``out_dir``, and write manifest.json last. A missing or torn piece is an error naming it."""
    _check_seq_len(seq_len)
    tokenizer = load_tokenizer(tokenizer_dir)
    return _assemble(source, tokenizer, fractions, seq_len, Path(out_dir), corpus_units(source))


def _assemble(source, tokenizer, fractions, seq_len: int, out_dir: Path, units: list[Unit]) -> dict[str, Path]:
    work = _Work(source, units, fractions, "", tokenizer_hash(tokenizer), tokenizer.eos_token_id,
                 token_dtype(len(tokenizer)).name, out_dir / "pieces")
    cap = source.max_documents
    fingerprint = hashlib.blake2b(f"gridlab corpus {SHARD_FORMAT_VERSION}\n".encode(), digest_size=16)
    pieces: dict[str, list] = {split: [] for split in SPLITS}
    tokens, documents = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    used, missing = 0, []
    for unit in units:
        if cap is not None and used >= cap:
            break
        folder = work.pieces / piece_name(unit)
        piece = read_piece(folder, work.piece_key(unit))
        if piece is None:
            missing.append(unit)
            if cap is not None:
                break  # where the cap falls depends on this piece's count
            continue
        keep = piece["documents"] if cap is None else min(piece["documents"], cap - used)
        counts = {split: (piece["splits"][split]["tokens"], piece["splits"][split]["documents"]) for split in SPLITS}
        if keep < piece["documents"]:  # the unit where max_documents falls: its first `keep` documents
            records = np.fromfile(folder / "docs.bin", dtype=_DOC_RECORD, count=keep)
            counts = {split: (int(records["tokens"][records["split"] == i].sum()),
                              int((records["split"] == i).sum())) for i, split in enumerate(SPLITS)}
        for split, (split_tokens, split_documents) in counts.items():
            if split_tokens:
                pieces[split].append([f"pieces/{folder.name}/{split}.bin", split_tokens])
            tokens[split] += split_tokens
            documents[split] += split_documents
        fingerprint.update(f"{unit.name}\0{unit.size}\0{piece['digest']}\0{keep}\n".encode())
        used += keep
    if missing:
        raise RuntimeError(f"{len(missing)} shard piece(s) missing or unfinished in {out_dir / 'pieces'} (first: "
                           f"{piece_name(missing[0])}, {missing[0].name}): run their partition tasks again")
    rows = {split: tokens[split] // seq_len for split in SPLITS}
    too_small = [split for split in SPLITS if rows[split] == 0]
    if too_small:
        raise UserError(
            f"corpus too small: split(s) {', '.join(too_small)} got less than one sequence of {seq_len} tokens "
            f"(documents per split: {documents}); use a larger corpus, a shorter seq_len or larger fractions"
        )
    corpus_fingerprint = fingerprint.hexdigest()
    for split in SPLITS:
        write_json(out_dir / f"{split}.json", {
            "format": SHARD_FORMAT_VERSION, "split": split, "seq_len": seq_len, "n_sequences": rows[split],
            "n_documents": documents[split], "dtype": work.dtype, "eos_token_id": work.eos_id,
            "corpus_fingerprint": corpus_fingerprint, "pieces": pieces[split],
        }, indent=1)
    write_json(out_dir / "manifest.json", {
        "format": SHARD_FORMAT_VERSION,
        "corpus_fingerprint": corpus_fingerprint,
        "source": source.model_dump(mode="json"),
        "tokenizer_hash": work.tokenizer_digest,
        "vocab_size": len(tokenizer),
        "fractions": fractions.model_dump(),
        "seq_len": seq_len,
        "n_units": len(units),
        "n_documents": used,
        "splits": {split: {"n_sequences": rows[split], "n_documents": documents[split],
                           "n_tokens": rows[split] * seq_len} for split in SPLITS},
    }, indent=1)
    return _split_paths(out_dir)


def _split_paths(folder: Path) -> dict[str, Path]:
    return {split: folder / f"{split}.json" for split in SPLITS}


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")


# ------------------------------------------------------------------------------------------------ one machine


def shard_key(source: CorpusSource, tokenizer_digest: str, fractions: SplitFractions, seq_len: int) -> str:
    """The shard folder's name: the corpus as listed (corpus_identity without content hashes: the stage reading it
    is already addressed by content), the tokenizer, the splits and seq_len."""
    identity = [SHARD_FORMAT_VERSION, corpus_identity(source, content=False), tokenizer_digest,
                fractions.model_dump(), seq_len]
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=12).hexdigest()


def shard_folder(source: CorpusSource, tokenizer_dir: str | Path, fractions: SplitFractions, seq_len: int,
                 cache_dir: str | Path) -> Path:
    """The shard folder build_shards makes in ``cache_dir`` (``cache_dir/<key>/``), for partition tasks
    (tokenize_partition) and assemble to work in when the tokenization is split over separate jobs."""
    return _shard_folder(source, load_tokenizer(tokenizer_dir), fractions, seq_len, cache_dir)


def _shard_folder(source, tokenizer, fractions, seq_len: int, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / shard_key(source, tokenizer_hash(tokenizer), fractions, seq_len)


def build_shards(source: CorpusSource, tokenizer_dir: str | Path, fractions: SplitFractions, seq_len: int,
                 cache_dir: str | Path, tasks: int | None = None) -> dict[str, Path]:
    """Tokenize every split into a shard (split -> ``<split>.json``), once per (corpus, tokenizer, splits, seq_len),
    in ``cache_dir/<key>/`` (shard_folder) with ``tasks`` processes (default: this process's cores). The folder is
    finished when its manifest.json exists; an interrupted build resumes from its finished pieces."""
    _check_seq_len(seq_len)
    tokenizer = load_tokenizer(tokenizer_dir)
    target = _shard_folder(source, tokenizer, fractions, seq_len, cache_dir)
    if (target / "manifest.json").is_file():
        return _split_paths(target)
    units = corpus_units(source)
    _tokenize_units(source, tokenizer, fractions, units, [unit.index for unit in units], target,
                    tasks or available_cores())
    return _assemble(source, tokenizer, fractions, seq_len, target, units)
