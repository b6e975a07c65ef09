import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from gridlab.data import (
    DEFAULT_FRACTIONS,
    SPLITS,
    CorpusSource,
    SplitFractions,
    TokenizerConfig,
    TokenShard,
    assign_split,
    build_shards,
    iter_documents,
    load_tokenizer,
    shard_manifest,
    stdlib_root,
    token_dtype,
    train_tokenizer,
)
from gridlab.errors import UserError
from gridlab.spec import parse_grid

from data_helpers import records, write
from runner_helpers import tiny_grid

SMALL_STDLIB = CorpusSource(kind="stdlib", max_documents=50)
SMALL_FRACTIONS = SplitFractions(pretrain=0.4, retrain=0.2, calibration=0.2, validation=0.2)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_tokenizer(SMALL_STDLIB, SMALL_FRACTIONS, 600, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def shards(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    return build_shards(SMALL_STDLIB, tokenizer_dir, SMALL_FRACTIONS, 64, tmp_path_factory.mktemp("cache"), tasks=1)


def test_splits_are_deterministic_disjoint_and_follow_the_fractions():
    keys = [f"pkg/module_{i}.py" for i in range(20000)]
    splits = [assign_split(key, DEFAULT_FRACTIONS) for key in keys]
    assert splits == [assign_split(key, DEFAULT_FRACTIONS) for key in keys]
    counts = Counter(splits)
    for split in SPLITS:
        assert counts[split] / len(keys) == pytest.approx(getattr(DEFAULT_FRACTIONS, split), abs=0.01)
    reseeded = [assign_split(key, SplitFractions(seed=1)) for key in keys]
    assert sum(a != b for a, b in zip(splits, reseeded, strict=True)) > 5000


def test_split_is_not_ordered_by_key():
    # neighbouring files (same package) must not all land in one split: the hash decorrelates them
    keys = [f"email/test/test_{i}.py" for i in range(200)]
    assert len({assign_split(key, DEFAULT_FRACTIONS) for key in keys}) == len(SPLITS)


SCHEMA_MISTAKES = [
    (CorpusSource, dict(kind="web"), "Input should be 'stdlib', 'hf', 'disk' or 'files'"),
    (CorpusSource, dict(kind="hf"), "a corpus of kind 'hf' needs 'name'"),
    (CorpusSource, dict(kind="disk"), "needs 'path'"),
    (CorpusSource, dict(kind="files"), "needs 'files'"),
    (CorpusSource, dict(kind="stdlib", files=["a.txt"]), "files does not apply to a corpus of kind 'stdlib'"),
    (CorpusSource, dict(kind="files", files=["a"], name="x"), "name does not apply"),
    (CorpusSource, dict(max_documents=4.5), "valid integer"),
    (CorpusSource, dict(max_documents=0), "greater than or equal to 1"),
    (CorpusSource, dict(max_documents=True), "valid integer"),
    (CorpusSource, dict(kind="files", files=[""]), "at least 1 character"),
    (CorpusSource, dict(kind="files", files=["a"], text_column=3), "valid string"),
    (CorpusSource, dict(typo=1), "Extra inputs are not permitted"),
    (SplitFractions, dict(pretrain=0.7, retrain=0.3, calibration=0.1, validation=0.1), "add up to 1.2; they must"),
    (SplitFractions, dict(pretrain=1.0, retrain=0.0), "less than 1"),
    (SplitFractions, dict(pretrain=float("inf")), "finite number"),
    (SplitFractions, dict(pretrain=float("nan")), "finite number"),
    (SplitFractions, dict(pretrain="0.6"), "valid number"),
    (SplitFractions, dict(seed=-1), "greater than or equal to 0"),
    (SplitFractions, dict(seed=1.5), "valid integer"),
    (TokenizerConfig, dict(vocab_size=300), "vocab_size must lie in 512"),
    (TokenizerConfig, dict(vocab_size=600.0), "valid integer"),
    (TokenizerConfig, dict(), "exactly one of vocab_size"),
    (TokenizerConfig, dict(vocab_size=600, path="tok"), "exactly one of vocab_size"),
    (TokenizerConfig, dict(path="tok", sample_documents=10), "sample_documents applies only"),
    (TokenizerConfig, dict(vocab_size=600, sample_documents=0), "greater than or equal to 1"),
]


@pytest.mark.parametrize("model, values, message", SCHEMA_MISTAKES)
def test_every_data_value_is_checked_at_construction_with_one_line(model, values, message):
    with pytest.raises(ValidationError) as error:
        model(**values)
    first = error.value.errors()[0]["msg"]
    assert message in first and "\n" not in first


def test_the_grid_file_uses_the_same_schema_and_reports_one_line():
    spec = parse_grid(tiny_grid(tokenizer={"vocab_size": 600, "sample_documents": 1000}))
    assert isinstance(spec.corpus, CorpusSource) and isinstance(spec.splits, SplitFractions)
    assert isinstance(spec.tokenizer, TokenizerConfig) and spec.tokenizer.sample_documents == 1000
    for changes, message in [
        (dict(tokenizer={"vocab_size": 300}), "tokenizer.vocab_size: Value error, vocab_size must lie in 512"),
        (dict(corpus={"kind": "stdlib", "files": "x"}), "corpus: files does not apply to a corpus of kind 'stdlib'"),
        (dict(splits={"pretrain": float("inf")}), "splits.pretrain: Input should be a finite number"),
        (dict(corpus={"kind": "files", "files": ["a"], "txt_column": "t"}), "corpus.txt_column: unknown key; did "
                                                                             "you mean 'text_column'?"),
    ]:
        with pytest.raises(ValueError) as error:
            parse_grid(tiny_grid(**changes))
        assert message.replace("Value error, ", "") in str(error.value) and "\n" not in str(error.value)


def test_stdlib_corpus_is_relative_python_sources_without_site_packages():
    keys = [key for key, _ in iter_documents(CorpusSource())]
    assert len(keys) > 1000 and all(key.endswith(".py") for key in keys)
    assert not any("site-packages" in key or key.startswith("/") for key in keys)
    assert "os.py" in keys and any(key.startswith("test/") for key in keys)
    assert (stdlib_root() / keys[0]).is_file()
    assert [key for key, _ in iter_documents(CorpusSource(max_documents=70))] == keys[:70]


def test_files_corpus_reads_txt_and_jsonl_and_checks_the_text_column(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(3)))
    source = CorpusSource(kind="files", files=(str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")), text_column="body")
    assert list(iter_documents(source)) == [("a.txt", "hello world"), ("b.jsonl#0", "row 0"),
                                            ("b.jsonl#1", "row 1"), ("b.jsonl#2", "row 2")]
    wrong_column = CorpusSource(kind="files", files=(str(tmp_path / "b.jsonl"),))
    with pytest.raises(UserError, match=r"b\.jsonl: line 1: no 'text' key \(its keys: body\)"):
        list(iter_documents(wrong_column))
    with pytest.raises(UserError, match="does not exist"):
        list(iter_documents(CorpusSource(kind="files", files=(str(tmp_path / "missing.txt"),))))


def test_disk_corpus_reads_a_saved_dataset_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x", "y", "z"]})}).save_to_disk(tmp_path / "ds")
    source = CorpusSource(kind="disk", path=str(tmp_path / "ds"))
    assert list(iter_documents(source)) == [("ds#0", "x"), ("ds#1", "y"), ("ds#2", "z")]
    assert [text for _, text in iter_documents(source.model_copy(update={"max_documents": 2}))] == ["x", "y"]
    with pytest.raises(UserError, match="split 'test' not in"):
        list(iter_documents(CorpusSource(kind="disk", path=str(tmp_path / "ds"), split="test")))
    with pytest.raises(UserError, match="text column 'body' not in"):
        list(iter_documents(CorpusSource(kind="disk", path=str(tmp_path / "ds"), text_column="body")))


def test_corpus_fingerprint_follows_the_text_read(tokenizer_dir, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one " * 400)
    write(tmp_path / "corpus" / "b.jsonl", records(40))
    source = CorpusSource(kind="files", files=(str(tmp_path / "corpus"),))
    fractions = SplitFractions(pretrain=0.25, retrain=0.25, calibration=0.25, validation=0.25)

    def fingerprint(cache):
        return shard_manifest(build_shards(source, tokenizer_dir, fractions, 8, tmp_path / cache)["pretrain"])[
            "corpus_fingerprint"]

    first = fingerprint("c1")
    assert fingerprint("c2") == first  # a fresh build of the same text
    (tmp_path / "corpus" / "a.txt").write_text("two " * 400)
    assert fingerprint("c3") != first
    capped = [shard_manifest(build_shards(SMALL_STDLIB.model_copy(update={"max_documents": n}), tokenizer_dir,
                                          SMALL_FRACTIONS, 16, tmp_path / f"s{n}")["pretrain"])["corpus_fingerprint"]
              for n in (49, 50)]
    assert capped[0] != capped[1]


def test_trained_tokenizer_is_a_plain_hf_tokenizer_folder(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == 600
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id is not None
    text = "def main():\n    return os.path.join('a', 'b')\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text and len(ids) < len(text)


def test_tokenizer_training_reads_a_bounded_sample_of_the_pretrain_split(tmp_path):
    write(tmp_path / "a.jsonl", records(60))
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')  # never reached with a small sample
    source = CorpusSource(kind="files", files=(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")))
    train_tokenizer(source, SMALL_FRACTIONS, 512, tmp_path / "tok", sample_documents=5)
    with pytest.raises(UserError, match=r"b\.jsonl: line 2: not valid JSON"):
        train_tokenizer(source, SMALL_FRACTIONS, 512, tmp_path / "tok2", sample_documents=10_000)
    with pytest.raises(UserError, match="at least 512"):
        train_tokenizer(source, SMALL_FRACTIONS, 300, tmp_path / "tok3")


def test_unknown_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="cannot load tokenizer") as error:
        load_tokenizer(str(tmp_path / "nowhere"))
    assert "\n" not in str(error.value)


def test_shards_pack_each_split_into_eos_joined_sequences(shards, tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    expected = {split: [] for split in SPLITS}
    for key, text in iter_documents(SMALL_STDLIB):
        expected[assign_split(key, SMALL_FRACTIONS)] += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    for split in SPLITS:
        shard = TokenShard.open(shards[split])
        assert shard.seq_len == 64 and shard.n_sequences == len(expected[split]) // 64
        assert shard[0].dtype == torch.int64 and shard[0].shape == (64,)
        assert shard[:].flatten().tolist() == expected[split][: shard.n_tokens]
    manifest = shard_manifest(shards["pretrain"])
    assert manifest["n_documents"] == 50 and manifest["n_units"] == 1
    assert manifest["splits"]["pretrain"]["n_tokens"] == TokenShard.open(shards["pretrain"]).n_tokens


def test_shard_indexing_by_int_slice_list_and_tensor(shards):
    shard = TokenShard.open(shards["pretrain"])
    rows = shard[[2, 0]]
    assert rows.shape == (2, 64)
    assert torch.equal(rows[1], shard[0]) and torch.equal(shard[torch.tensor([2])][0], shard[2])
    assert torch.equal(shard[0:3][2], shard[2])


def test_a_shard_of_many_pieces_reads_rows_across_piece_boundaries(tmp_path):
    stream = np.arange(1, 200, dtype=np.uint16)
    lengths = [5, 1, 40, 3, 0, 100, 50]  # rows of 16 straddle every boundary; one piece is shorter than a row
    pieces, start = [], 0
    for index, length in enumerate(lengths):
        stream[start:start + length].tofile(tmp_path / f"p{index}.bin")
        pieces.append([f"p{index}.bin", length])
        start += length
    (tmp_path / "s.json").write_text(json.dumps({"seq_len": 16, "n_sequences": start // 16, "dtype": "uint16",
                                                 "pieces": [p for p in pieces if p[1]]}))
    shard = TokenShard.open(tmp_path / "s.json")
    expected = torch.from_numpy(stream[: start // 16 * 16].astype(np.int64)).reshape(-1, 16)
    assert len(shard) == 12 and torch.equal(shard[:], expected)
    assert torch.equal(shard[3], expected[3]) and torch.equal(shard[-1], expected[-1])
    assert torch.equal(shard[[7, 0, 7]], expected[[7, 0, 7]]) and torch.equal(shard[1:9:3], expected[1:9:3])
    assert torch.equal(shard[torch.tensor([[1, 2], [3, 4]])], expected[torch.tensor([[1, 2], [3, 4]])])
    with pytest.raises(IndexError):
        shard[12]


def test_cached_shards_are_reused_not_rebuilt(shards, tokenizer_dir):
    stamp = shards["pretrain"].stat().st_mtime_ns
    cache = shards["pretrain"].parent.parent
    again = build_shards(SMALL_STDLIB, tokenizer_dir, SMALL_FRACTIONS, 64, cache)
    assert again == shards and shards["pretrain"].stat().st_mtime_ns == stamp
    other = build_shards(SMALL_STDLIB, tokenizer_dir, SMALL_FRACTIONS, 32, cache)
    assert other["pretrain"].parent != shards["pretrain"].parent
    assert not [p for p in cache.rglob(".*")]  # no staging folder left


def test_corpus_too_small_for_the_splits_is_a_one_line_error(tokenizer_dir, tmp_path):
    tiny = CorpusSource(kind="stdlib", max_documents=3)
    with pytest.raises(UserError, match="corpus too small") as error:
        build_shards(tiny, tokenizer_dir, SMALL_FRACTIONS, 64, tmp_path)
    assert "\n" not in str(error.value)
    assert not list(tmp_path.rglob("manifest.json"))  # nothing is taken as a finished shard


def test_token_dtype_widens_past_uint16():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_unreachable_hub_dataset_is_a_one_line_error():
    with pytest.raises(UserError, match="cannot load Hugging Face dataset 'nobody/nothing'") as error:
        list(iter_documents(CorpusSource(kind="hf", name="nobody/nothing")))
    assert "\n" not in str(error.value)
