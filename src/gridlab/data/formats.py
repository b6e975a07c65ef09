"""Streaming readers for corpus files: each yields (document key, text) and holds one chunk and one record at a time.

| suffix | documents | read with |
|---|---|---|
| `.txt` | the whole file is one document | one read (files above MAX_TXT_BYTES are refused) |
| `.jsonl`, `.jsonl.zst`, `.jsonl.gz` | one JSON object per line | zstd / zlib stream decompression, json per line |
| `.json`, `.json.gz` | JSON Lines, concatenated objects, or one top-level array of objects | an incremental decoder |
| `.parquet` | one row each | pyarrow row batches of the text column only |

A document's key is the file's key (its path relative to the pattern that matched it) for `.txt`, and
``<file key>#<record number>`` (from 0) otherwise. Every problem with a file — unreadable, corrupt or truncated
compression, a line that is not JSON, a record without the text column — is a UserError naming the file (and the
line or row).
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from gridlab.errors import UserError

FORMATS = (".jsonl.zst", ".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".txt")
MAX_TXT_BYTES = 256 * 2**20  # a .txt file is one document; larger ones belong in a JSON Lines file
MAX_RECORD_CHARS = 256 * 2**20  # a JSON record larger than this is refused (the reader's memory bound)
_CHUNK = 1 << 18  # compressed bytes read at a time
_PARQUET_BATCH = 1024
_NON_SPACE = re.compile(r"\S")


def format_of(path: str | Path) -> str | None:
    """The corpus format of a file name (its suffix in FORMATS), or None."""
    name = Path(path).name.lower()
    return next((suffix for suffix in FORMATS if name.endswith(suffix)), None)


def read_documents(path: Path, key: str, text_column: str) -> Iterator[tuple[str, str]]:
    """Stream the documents of one corpus file."""
    fmt = format_of(path)
    if fmt == ".txt":
        yield key, _read_bytes(path).decode("utf-8", errors="replace")
        return
    if fmt == ".parquet":
        texts = _parquet_texts(path, text_column)
    elif fmt is None:
        raise UserError(f"{path}: not a corpus file; valid types: {', '.join(FORMATS)}")
    else:
        chunks = _raw_chunks(path)
        if fmt.endswith(".zst"):
            chunks = _zstd_chunks(chunks, path)
        elif fmt.endswith(".gz"):
            chunks = _gzip_chunks(chunks, path)
        values = _json_lines(chunks, path) if fmt.startswith(".jsonl") else _json_values(chunks, path)
        texts = (_text_of(record, text_column, path, line) for line, record in values)
    for index, text in enumerate(texts):
        yield f"{key}#{index}", text


def check_file(path: Path, text_column: str) -> None:
    """Read the first document of a file (cheap): a UserError if it cannot be read or holds no document."""
    if format_of(path) == ".txt":  # the whole file is the document: reading its first bytes is the check
        next(_raw_chunks(path), None)
        return
    documents = read_documents(path, "", text_column)
    try:
        next(documents)
    except StopIteration:
        raise UserError(f"{path}: holds no documents") from None
    finally:
        documents.close()


# ------------------------------------------------------------------------------------------------------ bytes


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None


def _raw_chunks(path: Path) -> Iterator[bytes]:
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    with handle:
        while True:
            try:
                chunk = handle.read(_CHUNK)
            except OSError as error:
                raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
            if not chunk:
                return
            yield chunk


def _zstd_chunks(raw: Iterator[bytes], path: Path) -> Iterator[bytes]:
    """Decompress every zstd frame of a stream; a stream that ends inside a frame is an error (zstandard's own
    stream reader returns the partial data silently)."""
    context = zstandard.ZstdDecompressor()
    frame = None
    for chunk in raw:
        while chunk:
            if frame is None:
                frame = context.decompressobj()
            try:
                out = frame.decompress(chunk)
            except zstandard.ZstdError as error:
                raise UserError(f"{path}: corrupt zstd data ({error})") from None
            if out:
                yield out
            if frame.eof:
                chunk, frame = frame.unused_data, None
            else:
                chunk = b""
    if frame is not None:
        raise UserError(f"{path}: truncated zstd data (the file ends inside a frame)")


def _gzip_chunks(raw: Iterator[bytes], path: Path) -> Iterator[bytes]:
    """Decompress every gzip member of a stream; a stream that ends inside a member is an error."""
    member = None
    for chunk in raw:
        while chunk:
            if member is None:
                member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            try:
                out = member.decompress(chunk)
            except zlib.error as error:
                raise UserError(f"{path}: corrupt gzip data ({error})") from None
            if out:
                yield out
            if member.eof:
                chunk, member = member.unused_data, None
            else:
                chunk = b""
    if member is not None:
        raise UserError(f"{path}: truncated gzip data (the file ends inside a member)")


# ------------------------------------------------------------------------------------------------------- JSON


def _json_lines(chunks: Iterator[bytes], path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-blank line."""
    line_number = 0
    for line in _lines(chunks):
        line_number += 1
        if not line.strip():
            continue
        try:
            yield line_number, json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: line {line_number}: not valid JSON ({error.msg} at column {error.colno})") \
                from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: line {line_number}: not UTF-8 text") from None


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    pending: list[bytes] = []
    for chunk in chunks:
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        lines = chunk.split(b"\n")
        if pending:
            lines[0] = b"".join([*pending, lines[0]])
            pending = []
        tail = lines.pop()
        if tail:
            pending.append(tail)
        yield from lines
    if pending:
        yield b"".join(pending)


class _TextCursor:
    """A window over a decoded text stream: values are decoded one at a time and the consumed text is dropped."""

    def __init__(self, chunks: Iterator[bytes], path: Path):
        self.chunks, self.path = chunks, path
        self.utf8 = codecs.getincrementaldecoder("utf-8-sig")()  # a leading byte-order mark is not text
        self.buffer, self.pos = "", 0
        self.line, self.counted = 1, 0  # line number at buffer[counted]
        self.eof = False

    def current_line(self) -> int:
        self.line += self.buffer.count("\n", self.counted, self.pos)
        self.counted = self.pos
        return self.line

    def fill(self) -> bool:
        if self.eof:
            return False
        chunk = next(self.chunks, None)
        try:
            text = self.utf8.decode(chunk or b"", final=chunk is None)
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: near line {self.current_line()}: not UTF-8 text") from None
        self.eof = chunk is None
        self.current_line()
        self.buffer, self.pos, self.counted = self.buffer[self.pos:] + text, 0, 0
        return True

    def peek(self) -> str | None:
        """The next non-space character (not consumed), None at the end."""
        while True:
            match = _NON_SPACE.search(self.buffer, self.pos)
            if match:
                self.pos = match.start()
                return self.buffer[self.pos]
            self.pos = len(self.buffer)
            if not self.fill():
                return None

    def value(self, decoder: json.JSONDecoder) -> Any:
        if self.peek() is None:
            raise UserError(f"{self.path}: line {self.current_line()}: the file ends where a record should be")
        while True:
            try:
                value, end = decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as error:
                pending = len(self.buffer) - self.pos
                if pending > MAX_RECORD_CHARS:
                    raise UserError(f"{self.path}: line {self.current_line()}: a record larger than "
                                    f"{MAX_RECORD_CHARS // 2**20} MB or not valid JSON") from None
                grown = False
                while not self.eof and len(self.buffer) - self.pos < 2 * pending + 1:
                    grown = self.fill() or grown  # read as much again before retrying: linear in the record size
                if grown:
                    continue
                line = self.current_line() + self.buffer.count("\n", self.pos, error.pos)
                raise UserError(f"{self.path}: line {line}: not valid JSON ({error.msg})") from None
            self.pos = end
            return value


def _json_values(chunks: Iterator[bytes], path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of a `.json` file: JSON Lines / concatenated values, or one top-level array."""
    cursor, decoder = _TextCursor(chunks, path), json.JSONDecoder()
    first = cursor.peek()
    if first != "[":
        while cursor.peek() is not None:
            line = cursor.current_line()
            yield line, cursor.value(decoder)
        return
    cursor.pos += 1
    if cursor.peek() == "]":
        cursor.pos += 1
    else:
        while True:
            cursor.peek()
            line = cursor.current_line()
            yield line, cursor.value(decoder)
            separator = cursor.peek()
            cursor.pos += 1
            if separator == "]":
                break
            if separator != ",":
                raise UserError(f"{path}: line {cursor.current_line()}: expected ',' or ']' after a record of the "
                                f"top-level array")
    if cursor.peek() is not None:
        raise UserError(f"{path}: line {cursor.current_line()}: text after the top-level array")


def _text_of(record: Any, text_column: str, path: Path, line: int) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{path}: line {line}: a record must be a JSON object with a {text_column!r} key, "
                        f"got {type(record).__name__}")
    try:
        text = record[text_column]
    except KeyError:
        keys = ", ".join(list(record)[:12]) or "none"
        raise UserError(f"{path}: line {line}: no {text_column!r} key (its keys: {keys})") from None
    if not isinstance(text, str):
        raise UserError(f"{path}: line {line}: {text_column!r} is {type(text).__name__}, not a string")
    return text


# ---------------------------------------------------------------------------------------------------- Parquet


def parquet_rows(path: Path, text_column: str) -> int:
    """A Parquet file's row count from its footer, after checking its text column (cheap)."""
    return _open_parquet(path, text_column).metadata.num_rows


def _open_parquet(path: Path, text_column: str):
    # pyarrow takes a third of a second to load, and gridlab.data loads with `gridlab status`: .parquet files only
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({_first_line(error)})") from None
    schema = parquet.schema_arrow
    if text_column not in schema.names:
        raise UserError(f"{path}: no column {text_column!r} (its columns: {', '.join(schema.names[:12])})")
    column_type = schema.field(text_column).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
            or getattr(pa.types, "is_string_view", lambda _: False)(column_type)):
        raise UserError(f"{path}: column {text_column!r} holds {column_type}, not strings")
    return parquet


def _parquet_texts(path: Path, text_column: str) -> Iterator[str]:
    import pyarrow as pa  # as in _open_parquet

    parquet = _open_parquet(path, text_column)
    row = 0
    batches = parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=[text_column])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as error:
            raise UserError(f"{path}: row {row}: cannot read ({_first_line(error)})") from None
        for text in batch.column(0).to_pylist():
            if text is None:
                raise UserError(f"{path}: row {row}: {text_column!r} is null")
            yield text
            row += 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
