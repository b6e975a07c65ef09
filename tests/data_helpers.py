"""Small corpora in every format for the data tests."""

import gzip
import json
from pathlib import Path

import zstandard

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def return import class self value index").split()


def records(n: int, seed: int = 0, column: str = "text") -> list[dict]:
    """n JSON records with texts of varied length (deterministic)."""
    out = []
    for i in range(n):
        length = 5 + (i * 7 + seed * 13) % 40
        words = [WORDS[(i * 3 + j * 5 + seed) % len(WORDS)] for j in range(length)]
        out.append({"id": f"{seed}-{i}", column: f"doc {seed}-{i}: " + " ".join(words)})
    return out


def jsonl_bytes(rows: list[dict]) -> bytes:
    return ("\n".join(json.dumps(row) for row in rows) + "\n").encode()


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the file name says (.jsonl, .jsonl.zst, .jsonl.gz, .json, .json.gz, .parquet)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    elif name.endswith(".jsonl.zst"):
        path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(jsonl_bytes(rows)))
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(jsonl_bytes(rows)))
    elif name.endswith(".json.gz"):
        path.write_bytes(gzip.compress(json.dumps(rows, indent=2).encode()))
    elif name.endswith(".jsonl"):
        path.write_bytes(jsonl_bytes(rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=2))
    else:
        raise ValueError(name)
    return path


def corpus_folder(root: Path, files: int = 6, per_file: int = 30) -> Path:
    """A folder of mixed-format files of unequal sizes (the units of a files corpus)."""
    formats = (".jsonl.zst", ".jsonl", ".jsonl.gz", ".json", ".parquet", ".json.gz")
    for i in range(files):
        write(root / f"part{i // 3}" / f"shard_{i:02d}{formats[i % len(formats)]}", records(per_file * (1 + i % 3), i))
    (root / "part0" / "notes.txt").write_text("a plain text document " * 20)
    (root / "README.md").write_text("not a corpus file")
    return root
