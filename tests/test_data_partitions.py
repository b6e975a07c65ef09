"""Parallel tokenization: pieces per corpus unit, any number of partitions, the same shards; crashes leave nothing
that is taken as finished."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gridlab.data import (
    SPLITS,
    CorpusSource,
    SplitFractions,
    TokenShard,
    assemble,
    assign_partitions,
    assign_split,
    build_shards,
    corpus_units,
    iter_documents,
    load_tokenizer,
    shard_manifest,
    tokenize_partition,
    train_tokenizer,
)
from gridlab.errors import UserError

from data_helpers import corpus_folder, records, write

FRACTIONS = SplitFractions(pretrain=0.4, retrain=0.3, calibration=0.15, validation=0.15, seed=3)
SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> CorpusSource:
    root = corpus_folder(tmp_path_factory.mktemp("corpus") / "c")
    return CorpusSource(kind="files", files=(str(root),))


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    return train_tokenizer(corpus, FRACTIONS, 512, tmp_path_factory.mktemp("tok") / "tokenizer")


def contents(paths: dict) -> tuple:
    """Everything a consumer can see of a set of shards: rows, split indexes, manifest."""
    rows = {split: TokenShard.open(path)[:] for split, path in paths.items()}
    indexes = {split: json.loads(Path(path).read_text()) for split, path in paths.items()}
    return rows, indexes, shard_manifest(paths["pretrain"])


def assert_same(a: tuple, b: tuple) -> None:
    for split in SPLITS:
        assert torch.equal(a[0][split], b[0][split]), split
    assert a[1] == b[1] and a[2] == b[2]


def expected_rows(source, tokenizer_dir) -> dict:
    tokenizer = load_tokenizer(tokenizer_dir)
    streams = {split: [] for split in SPLITS}
    for key, text in iter_documents(source):
        streams[assign_split(key, FRACTIONS)] += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    return {split: torch.tensor(s[: len(s) // SEQ * SEQ]).reshape(-1, SEQ) for split, s in streams.items()}


def partitioned(source, tokenizer_dir, out: Path, partitions: int) -> dict:
    for k in reversed(range(partitions)):  # any order: each task only writes its own units' pieces
        tokenize_partition(source, tokenizer_dir, FRACTIONS, k, partitions, out)
    return assemble(source, tokenizer_dir, FRACTIONS, SEQ, out)


def test_shards_do_not_depend_on_the_number_of_partitions(corpus, tokenizer_dir, tmp_path):
    one = build_shards(corpus, tokenizer_dir, FRACTIONS, SEQ, tmp_path / "k1", tasks=1)
    reference = contents(one)
    expected = expected_rows(corpus, tokenizer_dir)
    for split in SPLITS:
        assert torch.equal(reference[0][split], expected[split])  # the same stream as one sequential pass
    assert len(reference[1]["pretrain"]["pieces"]) > 1  # really several pieces
    for partitions in (2, 4, 7):
        assert_same(contents(partitioned(corpus, tokenizer_dir, tmp_path / f"p{partitions}", partitions)), reference)
    # K local processes (spawned, one tokenizer thread each) give the same bytes
    assert_same(contents(build_shards(corpus, tokenizer_dir, FRACTIONS, SEQ, tmp_path / "k3", tasks=3)), reference)


def test_every_unit_belongs_to_one_partition(corpus):
    units = corpus_units(corpus)
    assert [unit.index for unit in units] == list(range(len(units)))
    for partitions in (1, 2, 3, 16):
        owner = assign_partitions(units, partitions)
        assert len(owner) == len(units) and set(owner) <= set(range(partitions))
        assert owner == assign_partitions(units, partitions)
    assert assign_partitions(units, 3)[:6] == [0, 1, 2, 0, 1, 2]  # in reading order: tasks advance together


def test_assembling_before_every_partition_finished_is_refused(corpus, tokenizer_dir, tmp_path):
    tokenize_partition(corpus, tokenizer_dir, FRACTIONS, 0, 3, tmp_path)
    with pytest.raises(RuntimeError, match=r"shard piece\(s\) missing or unfinished .*run their partition tasks"):
        assemble(corpus, tokenizer_dir, FRACTIONS, SEQ, tmp_path)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ValueError, match="need 0 <= k < partitions"):
        tokenize_partition(corpus, tokenizer_dir, FRACTIONS, 3, 3, tmp_path)


KILLER = """
import json, os, signal, sys
from gridlab.data import CorpusSource, SplitFractions, shards, sources
args = json.loads(sys.argv[1])
real = sources.iter_unit
def dying(source, unit):
    for count, document in enumerate(real(source, unit)):
        if unit.index == args["die_in"] and count == 12:
            os.kill(os.getpid(), signal.SIGKILL)  # as a preempted or OOM-killed task: no cleanup runs
        yield document
shards.iter_unit = dying
shards._BATCH_DOCUMENTS = 4  # so the dying piece has really written tokens
shards.tokenize_partition(CorpusSource.model_validate(args["source"]), args["tokenizer"],
                          SplitFractions.model_validate(args["fractions"]), 0, 1, args["out"])
"""


def test_a_killed_partition_task_leaves_no_piece_that_is_used_and_its_rerun_completes(corpus, tokenizer_dir,
                                                                                     tmp_path):
    out = tmp_path / "shards"
    args = {"source": corpus.model_dump(mode="json"), "tokenizer": str(tokenizer_dir),
            "fractions": FRACTIONS.model_dump(), "out": str(out), "die_in": 2}
    killed = subprocess.run([sys.executable, "-c", KILLER, json.dumps(args)], env=os.environ.copy())
    assert killed.returncode == -9
    pieces = out / "pieces"
    assert sorted(p.name for p in pieces.iterdir() if not p.name.startswith(".")) == ["u000000", "u000001"]
    half = [p for p in pieces.iterdir() if p.name.startswith(".u000002.")]
    assert half and any(f.stat().st_size for f in half[0].iterdir())  # tokens were written, the piece is not
    with pytest.raises(RuntimeError, match="u000002"):
        assemble(corpus, tokenizer_dir, FRACTIONS, SEQ, out)

    stamps = {p.name: (p / "piece.json").stat().st_mtime_ns for p in pieces.iterdir() if not p.name.startswith(".")}
    outcome = tokenize_partition(corpus, tokenizer_dir, FRACTIONS, 0, 1, out)
    units = len(corpus_units(corpus))
    assert outcome == {"complete": 2, "written": units - 2}
    assert all((pieces / name / "piece.json").stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert not [p for p in pieces.iterdir() if p.name.startswith(".")]  # the killed attempt's staging is gone
    reference = build_shards(corpus, tokenizer_dir, FRACTIONS, SEQ, tmp_path / "clean", tasks=1)
    assert_same(contents(assemble(corpus, tokenizer_dir, FRACTIONS, SEQ, out)), contents(reference))


def test_a_torn_or_stale_piece_is_rebuilt_not_used(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "s"
    partitioned(corpus, tokenizer_dir, out, 1)
    reference = contents(assemble(corpus, tokenizer_dir, FRACTIONS, SEQ, out))
    torn = out / "pieces" / "u000001" / "retrain.bin"
    torn.write_bytes(torn.read_bytes()[:-2])
    with pytest.raises(RuntimeError, match="u000001"):
        assemble(corpus, tokenizer_dir, FRACTIONS, SEQ, out)
    assert tokenize_partition(corpus, tokenizer_dir, FRACTIONS, 0, 1, out)["written"] == 1
    assert_same(contents(assemble(corpus, tokenizer_dir, FRACTIONS, SEQ, out)), reference)


def test_a_file_changed_after_its_piece_was_made_is_read_again(tokenizer_dir, tmp_path):
    write(tmp_path / "c" / "a.jsonl", records(40, 1))
    write(tmp_path / "c" / "b.jsonl", records(40, 2))
    source = CorpusSource(kind="files", files=(str(tmp_path / "c"),))
    partitioned(source, tokenizer_dir, tmp_path / "s", 1)
    write(tmp_path / "c" / "b.jsonl", records(41, 5))
    with pytest.raises(RuntimeError, match=r"u000001, file:b\.jsonl"):
        assemble(source, tokenizer_dir, FRACTIONS, SEQ, tmp_path / "s")
    assert tokenize_partition(source, tokenizer_dir, FRACTIONS, 0, 1, tmp_path / "s") == {"complete": 1, "written": 1}
    for split, rows in contents(assemble(source, tokenizer_dir, FRACTIONS, SEQ, tmp_path / "s"))[0].items():
        assert torch.equal(rows, expected_rows(source, tokenizer_dir)[split])


def test_max_documents_over_files_of_unknown_length_is_exact_for_any_partitions(tokenizer_dir, tmp_path):
    for i, n in enumerate((30, 50, 20, 60, 40)):
        write(tmp_path / "c" / f"{i}.jsonl.zst", records(n, i))
    source = CorpusSource(kind="files", files=(str(tmp_path / "c"),), max_documents=95)  # falls inside file 2
    assert [unit.count for unit in corpus_units(source)] == [None] * 5
    outcome = tokenize_partition(source, tokenizer_dir, FRACTIONS, 0, 1, tmp_path / "k1")
    assert outcome == {"written": 3, "beyond": 2}  # one task in order reads nothing past the cap
    reference = contents(assemble(source, tokenizer_dir, FRACTIONS, SEQ, tmp_path / "k1"))
    assert reference[2]["n_documents"] == 95
    expected = expected_rows(source, tokenizer_dir)
    for split in SPLITS:
        assert torch.equal(reference[0][split], expected[split])
    assert_same(contents(partitioned(source, tokenizer_dir, tmp_path / "k3", 3)), reference)


def test_bad_input_in_the_middle_of_a_file_fails_the_data_stage_naming_file_and_line(tokenizer_dir, tmp_path):
    write(tmp_path / "c" / "a.jsonl", records(30))
    lines = (tmp_path / "c" / "a.jsonl").read_text().splitlines()
    lines[17] = lines[17][:-5]
    (tmp_path / "c" / "a.jsonl").write_text("\n".join(lines) + "\n")
    write(tmp_path / "c" / "b.jsonl", records(30, 2))
    source = CorpusSource(kind="files", files=(str(tmp_path / "c"),))
    with pytest.raises(UserError, match=r"a\.jsonl: line 18: not valid JSON") as error:
        build_shards(source, tokenizer_dir, FRACTIONS, SEQ, tmp_path / "cache", tasks=1)
    assert "\n" not in str(error.value)
    assert not list((tmp_path / "cache").rglob("manifest.json"))
    assert not list((tmp_path / "cache").rglob("u000000"))  # the bad file's piece was never published
