"""Corpus files as they are stored: every format, globs and folders, and bad input named by file and line."""

import gzip
import json
from pathlib import Path

import pytest
import zstandard

from gridlab.data import (
    CorpusSource,
    check_corpus,
    describe_corpus,
    formats,
    iter_documents,
    list_files,
    read_documents,
)
from gridlab.errors import UserError

from data_helpers import jsonl_bytes, records, write

FORMATS = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_format_streams_the_same_documents(tmp_path, suffix):
    rows = records(25)
    path = write(tmp_path / f"c{suffix}", rows)
    documents = list(read_documents(path, f"c{suffix}", "text"))
    assert documents == [(f"c{suffix}#{i}", row["text"]) for i, row in enumerate(rows)]


@pytest.mark.parametrize("suffix", FORMATS)
def test_readers_are_exact_across_chunk_boundaries(tmp_path, suffix, monkeypatch):
    # 7-byte reads cut every record, line, multi-byte character and compressed frame somewhere
    rows = records(12) + [{"text": "unicode: é ü 漢字 — 🙂\nsecond line"}]
    path = write(tmp_path / f"c{suffix}", rows)
    monkeypatch.setattr(formats, "_CHUNK", 7)
    assert [text for _, text in read_documents(path, "c", "text")] == [row["text"] for row in rows]


def test_txt_is_one_document_and_json_files_may_be_json_lines_or_concatenated(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nsecond line")
    assert list(read_documents(tmp_path / "a.txt", "a.txt", "text")) == [("a.txt", "hello world\nsecond line")]
    (tmp_path / "lines.json").write_bytes(jsonl_bytes(records(3)))
    (tmp_path / "pretty.json").write_text("\n".join(json.dumps(r, indent=1) for r in records(3)))
    (tmp_path / "empty_array.json").write_text(" [ ] ")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(records(3)).encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(records(3)))
    expected = [r["text"] for r in records(3)]
    assert [t for _, t in read_documents(tmp_path / "lines.json", "k", "text")] == expected
    assert [t for _, t in read_documents(tmp_path / "pretty.json", "k", "text")] == expected
    assert list(read_documents(tmp_path / "empty_array.json", "k", "text")) == []
    for name in ("bom.json", "bom.jsonl"):  # a UTF-8 byte-order mark, as some Windows tools write
        assert [t for _, t in read_documents(tmp_path / name, "k", "text")] == expected


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path):
    first, second = records(4, 1), records(5, 2)
    (tmp_path / "m.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(first))
                                           + zstandard.ZstdCompressor().compress(jsonl_bytes(second)))
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(first)) + gzip.compress(jsonl_bytes(second)))
    for name in ("m.jsonl.zst", "m.jsonl.gz"):
        assert [t for _, t in read_documents(tmp_path / name, name, "text")] == [r["text"] for r in first + second]


def test_globs_folders_and_files_list_corpus_files_in_order_with_relative_keys(tmp_path):
    write(tmp_path / "dclm" / "g1" / "s1" / "a.jsonl.zst", records(2))
    write(tmp_path / "dclm" / "g1" / "s2" / "a.jsonl.zst", records(2))
    write(tmp_path / "dclm" / "g2" / "b.parquet", records(2))
    (tmp_path / "dclm" / "g1" / "README.md").write_text("skip me")
    (tmp_path / "dclm" / ".cache").mkdir()
    write(tmp_path / "dclm" / ".cache" / "hidden.jsonl", records(1))
    (tmp_path / "one.txt").write_text("x")

    by_glob = list_files([str(tmp_path / "dclm" / "**" / "*.jsonl.zst")])
    assert [f.key for f in by_glob] == ["g1/s1/a.jsonl.zst", "g1/s2/a.jsonl.zst"]
    by_folder = list_files([str(tmp_path / "dclm")])
    assert [f.key for f in by_folder] == ["g1/s1/a.jsonl.zst", "g1/s2/a.jsonl.zst", "g2/b.parquet"]
    assert by_folder[0].size == (tmp_path / "dclm/g1/s1/a.jsonl.zst").stat().st_size
    mixed = list_files([str(tmp_path / "one.txt"), str(tmp_path / "dclm" / "g*"), str(tmp_path / "dclm")])
    assert [f.key for f in mixed] == ["one.txt", "g1/s1/a.jsonl.zst", "g1/s2/a.jsonl.zst", "g2/b.parquet"]  # once each

    source = CorpusSource(kind="files", files=(str(tmp_path / "dclm"),))
    keys = [key for key, _ in iter_documents(source)]
    assert keys == ["g1/s1/a.jsonl.zst#0", "g1/s1/a.jsonl.zst#1", "g1/s2/a.jsonl.zst#0", "g1/s2/a.jsonl.zst#1",
                    "g2/b.parquet#0", "g2/b.parquet#1"]


def test_listing_mistakes_are_one_line_user_errors(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("x")
    cases = [
        ([str(tmp_path / "*.jsonl.zst")], r"corpus\.files\[0\] .* matches nothing"),
        ([str(tmp_path / "missing.jsonl")], "does not exist"),
        ([str(tmp_path / "notes.md")], "is not a corpus file; valid types: .jsonl.zst"),
        ([str(tmp_path / "docs")], "matches no corpus file"),
        ([str(tmp_path / "empty.jsonl")], "empty.jsonl: empty file"),
    ]
    for patterns, message in cases:
        with pytest.raises(UserError, match=message) as error:
            list_files(patterns)
        assert "\n" not in str(error.value)


def _corrupt_zst(path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(jsonl_bytes(records(50)))
    path.write_bytes(b"garbage!" + data)


def _truncated_zst(path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(jsonl_bytes(records(400)))
    path.write_bytes(data[: len(data) // 2])


def _truncated_gz(path: Path) -> None:
    data = gzip.compress(jsonl_bytes(records(400)))
    path.write_bytes(data[: len(data) // 2])


def _truncated_line(path: Path) -> None:
    path.write_bytes(jsonl_bytes(records(3))[:-20])


def _missing_column(path: Path) -> None:
    rows = records(3)
    rows[1] = {"body": "no text here", "id": 1}
    path.write_bytes(jsonl_bytes(rows))


def _null_in_parquet(path: Path) -> None:
    write(path, [{"text": "fine"}, {"text": None}])


def _array_without_comma(path: Path) -> None:
    path.write_text('[{"text": "a"}\n {"text": "b"}]')


def _not_objects(path: Path) -> None:
    path.write_text('["a", "b"]\n')


BAD_INPUTS = [
    ("corrupt.jsonl.zst", _corrupt_zst, r"corrupt\.jsonl\.zst: corrupt zstd data"),
    ("cut.jsonl.zst", _truncated_zst, r"cut\.jsonl\.zst: truncated zstd data \(the file ends inside a frame\)"),
    ("cut.jsonl.gz", _truncated_gz, r"cut\.jsonl\.gz: truncated gzip data"),
    ("cut.jsonl", _truncated_line, r"cut\.jsonl: line 3: not valid JSON"),
    ("column.jsonl", _missing_column, r"column\.jsonl: line 2: no 'text' key \(its keys: body, id\)"),
    ("null.parquet", _null_in_parquet, r"null\.parquet: row 1: 'text' is null"),
    ("comma.json", _array_without_comma, r"comma\.json: line 2: expected ',' or ']'"),
    ("strings.jsonl", _not_objects, r"strings\.jsonl: line 1: a record must be a JSON object"),
]


@pytest.mark.parametrize("name, make, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path, name, make, message):
    make(tmp_path / name)
    with pytest.raises(UserError, match=message) as error:
        list(read_documents(tmp_path / name, name, "text"))
    assert "\n" not in str(error.value) and str(tmp_path / name) in str(error.value)


def test_plan_time_check_reads_only_each_files_first_record(tmp_path):
    write(tmp_path / "good.jsonl.zst", records(10))
    source = CorpusSource(kind="files", files=(str(tmp_path / "*.jsonl*"),))
    line = describe_corpus(source)
    assert line.startswith("corpus: files: 1 file(s), ") and "(1 .jsonl.zst): good.jsonl.zst" in line
    # a bad first record, a corrupt header and a missing column are seen at plan time …
    for name, make in (("b.jsonl.zst", _corrupt_zst), ("c.jsonl", _missing_column)):
        make(tmp_path / name)
    (tmp_path / "c.jsonl").write_bytes(jsonl_bytes([{"body": "x"}]))
    with pytest.raises(UserError, match=r"b\.jsonl\.zst: corrupt zstd data"):
        check_corpus(source)
    (tmp_path / "b.jsonl.zst").unlink()
    with pytest.raises(UserError, match=r"c\.jsonl: line 1: no 'text' key"):
        check_corpus(source)
    # … a truncated tail is not (the data stage reports it)
    (tmp_path / "c.jsonl").unlink()
    _truncated_line(tmp_path / "d.jsonl")
    check_corpus(source)


def test_gridlab_plan_lists_the_corpus_and_stops_on_a_pattern_that_matches_nothing(tmp_path):
    from gridlab.plan import build_plan
    from gridlab.plantext import format_plan
    from gridlab.spec import parse_grid

    from runner_helpers import tiny_grid

    write(tmp_path / "c" / "a.jsonl.zst", records(30))
    write(tmp_path / "c" / "b.parquet", records(30, 1))
    eval_corpus = {"label": "heldout", "kind": "files", "files": [str(tmp_path / "c" / "*.parquet")]}
    grid = tiny_grid(corpus={"kind": "files", "files": [str(tmp_path / "c")]},
                     evaluation={"max_sequences": 8, "corpora": [eval_corpus]})
    text = format_plan(build_plan(parse_grid(grid)))
    size = sum(f.stat().st_size for f in (tmp_path / "c").iterdir())
    listed = f"  corpus: files: 2 file(s), {size / 1e3:,.1f} kB (1 .jsonl.zst, 1 .parquet): a.jsonl.zst, b.parquet"
    assert listed in text
    assert "  eval corpus heldout: files: 1 file(s)" in text
    missing = tiny_grid(corpus={"kind": "files", "files": [str(tmp_path / "nowhere" / "*.jsonl.zst")]})
    with pytest.raises(UserError, match=r"corpus\.files\[0\] .*nowhere/\*\.jsonl\.zst' matches nothing") as error:
        format_plan(build_plan(parse_grid(missing)))
    assert "\n" not in str(error.value)
