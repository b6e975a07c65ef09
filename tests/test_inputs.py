"""Input identity by content: fingerprints of local files and folders, corpora, models, tokenizers, hub revisions."""

import os
from pathlib import Path

import pytest

from gridlab import inputs
from gridlab.data import (
    CorpusSource,
    SplitFractions,
    TokenShard,
    build_shards,
    corpus_identity,
    describe_corpus,
    iter_documents,
)
from gridlab.errors import UserError

from data_helpers import records, write


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GRIDLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def reads(monkeypatch) -> list:
    """The files whose bytes were hashed (a cache miss), in order."""
    hashed = []
    real = inputs.hash_file

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(inputs, "hash_file", counting)
    return hashed


def test_file_fingerprint_is_content_cached_by_size_and_mtime(tmp_path, reads):
    path = tmp_path / "a.jsonl"
    path.write_text("one\n")
    first = inputs.fingerprint(path)
    assert inputs.fingerprint(path) == first and reads == ["a.jsonl"]  # the second call reads nothing
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert inputs.fingerprint(path) == first and reads == ["a.jsonl", "a.jsonl"]  # touched: recomputed, same
    path.write_text("two\n")
    assert inputs.fingerprint(path) != first
    path.rename(tmp_path / "renamed.jsonl")
    (tmp_path / "renamed.jsonl").write_text("one\n")
    assert inputs.fingerprint(tmp_path / "renamed.jsonl") == first  # content, not path
    with pytest.raises(UserError, match="no such file or folder"):
        inputs.fingerprint(tmp_path / "missing")


def test_folder_fingerprint_is_its_files_relative_names_and_contents(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(b"\0" * 100)
    first = inputs.fingerprint(folder)
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("x")  # hidden entries do not count
    assert inputs.fingerprint(folder) == first
    folder.rename(tmp_path / "moved")
    assert inputs.fingerprint(tmp_path / "moved") == first
    (tmp_path / "moved" / "sub" / "w.bin").write_bytes(b"\1" * 100)
    assert inputs.fingerprint(tmp_path / "moved") != first


def test_corpus_identity_follows_file_contents_not_their_location(tmp_path, reads):
    write(tmp_path / "a" / "x" / "0.jsonl.zst", records(5))
    write(tmp_path / "a" / "x" / "1.parquet", records(5, 1))
    source = CorpusSource(kind="files", files=(str(tmp_path / "a" / "**" / "*.*"),), max_documents=8)
    identity = corpus_identity(source)
    assert identity["kind"] == "files" and [key for key, _, _ in identity["files"]] == ["x/0.jsonl.zst", "x/1.parquet"]
    assert str(tmp_path) not in repr(identity)
    (tmp_path / "a").rename(tmp_path / "b")  # the corpus moved to another file system
    moved = CorpusSource(kind="files", files=(str(tmp_path / "b" / "**" / "*.*"),), max_documents=8)
    assert corpus_identity(moved) == identity
    write(tmp_path / "b" / "x" / "1.parquet", records(5, 2))  # an edited file
    assert corpus_identity(moved) != identity
    assert corpus_identity(moved.model_copy(update={"max_documents": 9}))["max_documents"] == 9
    reads.clear()
    cheap = corpus_identity(moved, content=False)
    assert reads == [] and len(cheap["files"]) == 2  # sizes and mtimes only: nothing is read


def test_disk_and_stdlib_identities(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(tmp_path / "ds")
    disk = corpus_identity(CorpusSource(kind="disk", path=str(tmp_path / "ds")))
    assert disk["folder"].startswith("b2:")
    datasets.Dataset.from_dict({"text": ["a", "c"]}).save_to_disk(tmp_path / "ds2")
    assert corpus_identity(CorpusSource(kind="disk", path=str(tmp_path / "ds2")))["folder"] != disk["folder"]
    stdlib = corpus_identity(CorpusSource())
    assert stdlib["python"] and len(stdlib["listing"]) == 32 and stdlib == corpus_identity(CorpusSource())


def test_hub_names_are_pinned_to_the_cached_revision_or_say_unresolved(tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    snapshot = hub / "datasets--org--toy" / "snapshots" / "0123abcd"
    write(snapshot / "data" / "train-00.jsonl.zst", records(20))
    write(snapshot / "data" / "train-01.jsonl.zst", records(20, 1))
    write(snapshot / "data" / "test-00.jsonl", records(30, 2))
    (snapshot / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                        "    path: data/train-*\n  - split: test\n    path: data/test-*\n---\n# Toy\n")
    (hub / "datasets--org--toy" / "refs").mkdir()
    (hub / "datasets--org--toy" / "refs" / "main").write_text("0123abcd")
    model = hub / "models--org--lm" / "snapshots" / "feedbeef"
    model.mkdir(parents=True)
    (hub / "models--org--lm" / "refs").mkdir()
    (hub / "models--org--lm" / "refs" / "main").write_text("feedbeef")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))

    toy = CorpusSource(kind="hf", name="org/toy")
    identity = corpus_identity(toy)
    assert identity["revision"] == "0123abcd"
    assert [key for key, _, _ in identity["files"]] == ["data/train-00.jsonl.zst", "data/train-01.jsonl.zst"]
    assert [key for key, _ in iter_documents(toy)][:2] == ["data/train-00.jsonl.zst#0", "data/train-00.jsonl.zst#1"]
    assert len(list(iter_documents(toy.model_copy(update={"split": "test"})))) == 30
    assert "from its local snapshot: 2 file(s)" in describe_corpus(toy)
    with pytest.raises(UserError, match="no split 'validation'; its splits: train, test"):
        describe_corpus(toy.model_copy(update={"split": "validation"}))
    assert corpus_identity(CorpusSource(kind="hf", name="nobody/nothing"))["revision"] == "unresolved"
    assert "streamed from the hub by one task" in describe_corpus(CorpusSource(kind="hf", name="nobody/nothing"))

    assert inputs.model_identity("org/lm") == {"hub": "org/lm", "revision": "feedbeef"}
    assert inputs.model_identity("nobody/nothing") == {"hub": "nobody/nothing", "revision": "unresolved"}
    assert inputs.tokenizer_identity("org/lm")["revision"] == "feedbeef"


def test_a_snapshot_folder_can_be_named_directly_and_tokenized(tmp_path):
    from gridlab.data import train_tokenizer

    write(tmp_path / "snap" / "a.jsonl.gz", records(60))
    source = CorpusSource(kind="hf", name=str(tmp_path / "snap"))
    fractions = SplitFractions(pretrain=0.25, retrain=0.25, calibration=0.25, validation=0.25)
    tokenizer = train_tokenizer(source, fractions, 512, tmp_path / "tok")
    shards = build_shards(source, tokenizer, fractions, 8, tmp_path / "cache", tasks=1)
    assert TokenShard.open(shards["retrain"]).n_sequences > 0
    assert corpus_identity(source)["revision"] == "local folder"


def test_local_model_and_tokenizer_identities_are_by_content(tmp_path):
    folder = tmp_path / "parent"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(b"weights-1")
    (folder / "tokenizer.json").write_text('{"model": "bpe"}')
    model, tokenizer = inputs.model_identity(folder), inputs.tokenizer_identity(folder)
    (folder / "model.safetensors").write_bytes(b"weights-2")
    assert inputs.model_identity(folder) != model
    assert inputs.tokenizer_identity(folder) == tokenizer  # the weights do not define the tokenizer
    (folder / "tokenizer.json").write_text('{"model": "bpe", "added": 1}')
    assert inputs.tokenizer_identity(folder) != tokenizer
