import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from gridlab.data import (
    DEFAULT_FRACTIONS,
    SPLITS,
    CorpusSource,
    SplitFractions,
    TokenShard,
    _token_dtype,
    assign_split,
    build_shards,
    corpus_fingerprint,
    iter_documents,
    load_tokenizer,
    shard_manifest,
    stdlib_root,
    train_tokenizer,
)

SMALL_STDLIB = CorpusSource(kind="stdlib", max_documents=50)
SMALL_FRACTIONS = SplitFractions(pretrain=0.4, retrain=0.2, calibration=0.2, validation=0.2)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_tokenizer(SMALL_STDLIB, SMALL_FRACTIONS, 600, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def shards(tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    return build_shards(SMALL_STDLIB, tokenizer_dir, SMALL_FRACTIONS, 64, tmp_path_factory.mktemp("cache"))


def test_splits_are_deterministic_disjoint_and_follow_the_fractions():
    keys = [f"pkg/module_{i}.py" for i in range(20000)]
    splits = [assign_split(key, DEFAULT_FRACTIONS) for key in keys]
    assert splits == [assign_split(key, DEFAULT_FRACTIONS) for key in keys]
    counts = Counter(splits)
    for split in SPLITS:
        assert counts[split] / len(keys) == pytest.approx(getattr(DEFAULT_FRACTIONS, split), abs=0.01)
    reseeded = [assign_split(key, SplitFractions(seed=1)) for key in keys]
    assert sum(a != b for a, b in zip(splits, reseeded)) > 5000


def test_split_is_not_ordered_by_key():
    # neighbouring files (same package) must not all land in one split: the hash decorrelates them
    keys = [f"email/test/test_{i}.py" for i in range(200)]
    assert len({assign_split(key, DEFAULT_FRACTIONS) for key in keys}) == len(SPLITS)


@pytest.mark.parametrize("fractions", [dict(pretrain=0.7, retrain=0.3, calibration=0.1, validation=0.1),
                                       dict(pretrain=1.0, retrain=0.0, calibration=0.0, validation=0.0)])
def test_bad_fractions_are_one_line_errors(fractions):
    with pytest.raises(ValueError, match="sum to 1") as error:
        SplitFractions(**fractions)
    assert "\n" not in str(error.value)


def test_stdlib_corpus_is_relative_python_sources_without_site_packages():
    keys = [key for key, _ in iter_documents(CorpusSource())]
    assert len(keys) > 1000 and all(key.endswith(".py") for key in keys)
    assert not any("site-packages" in key or key.startswith("/") for key in keys)
    assert "os.py" in keys and any(key.startswith("test/") for key in keys)
    assert (stdlib_root() / keys[0]).is_file()


def test_files_corpus_reads_txt_and_jsonl_and_checks_the_text_column(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(3)))
    source = CorpusSource(kind="files", files=(str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")), text_column="body")
    assert list(iter_documents(source)) == [("a.txt", "hello world"), ("b.jsonl#0", "row 0"),
                                            ("b.jsonl#1", "row 1"), ("b.jsonl#2", "row 2")]
    wrong_column = CorpusSource(kind="files", files=(str(tmp_path / "b.jsonl"),))
    with pytest.raises(ValueError, match="text column 'text' not in b.jsonl; its columns: body"):
        list(iter_documents(wrong_column))
    with pytest.raises(ValueError, match="does not exist"):
        list(iter_documents(CorpusSource(kind="files", files=(str(tmp_path / "missing.txt"),))))


def test_disk_corpus_reads_a_saved_dataset_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x", "y"]})}).save_to_disk(tmp_path / "ds")
    assert [text for _, text in iter_documents(CorpusSource(kind="disk", path=str(tmp_path / "ds")))] == ["x", "y"]
    with pytest.raises(ValueError, match="split 'test' not in"):
        list(iter_documents(CorpusSource(kind="disk", path=str(tmp_path / "ds"), split="test")))


def test_bad_sources_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown corpus kind 'web'; valid kinds: stdlib, hf, disk, files"):
        CorpusSource(kind="web")
    with pytest.raises(ValueError, match="needs name"):
        CorpusSource(kind="hf")


def test_fingerprint_follows_the_text_read(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    source = CorpusSource(kind="files", files=(str(tmp_path / "a.txt"),))
    first = corpus_fingerprint(source)
    assert corpus_fingerprint(source) == first
    (tmp_path / "a.txt").write_text("two")
    assert corpus_fingerprint(source) != first
    assert corpus_fingerprint(SMALL_STDLIB) != corpus_fingerprint(CorpusSource(kind="stdlib", max_documents=49))


def test_trained_tokenizer_is_a_plain_hf_tokenizer_folder(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == 600
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id is not None
    text = "def main():\n    return os.path.join('a', 'b')\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text and len(ids) < len(text)


def test_unknown_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load tokenizer") as error:
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
    assert manifest["corpus_fingerprint"] == corpus_fingerprint(SMALL_STDLIB)
    assert manifest["splits"]["pretrain"]["n_tokens"] == TokenShard.open(shards["pretrain"]).n_tokens


def test_shard_indexing_by_int_slice_list_and_tensor(shards):
    shard = TokenShard.open(shards["pretrain"])
    rows = shard[[2, 0]]
    assert rows.shape == (2, 64)
    assert torch.equal(rows[1], shard[0]) and torch.equal(shard[torch.tensor([2])][0], shard[2])
    assert torch.equal(shard[0:3][2], shard[2])


def test_cached_shards_are_reused_not_rebuilt(shards, tokenizer_dir):
    stamp = shards["pretrain"].stat().st_mtime_ns
    again = build_shards(SMALL_STDLIB, tokenizer_dir, SMALL_FRACTIONS, 64, shards["pretrain"].parent.parent)
    assert again == shards and shards["pretrain"].stat().st_mtime_ns == stamp
    other = build_shards(SMALL_STDLIB, tokenizer_dir, SMALL_FRACTIONS, 32, shards["pretrain"].parent.parent)
    assert other["pretrain"].parent != shards["pretrain"].parent
    assert not [p for p in shards["pretrain"].parent.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_corpus_too_small_for_the_splits_is_a_one_line_error(tokenizer_dir, tmp_path):
    tiny = CorpusSource(kind="stdlib", max_documents=3)
    with pytest.raises(ValueError, match="corpus too small") as error:
        build_shards(tiny, tokenizer_dir, SMALL_FRACTIONS, 64, tmp_path)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_token_dtype_widens_past_uint16():
    assert _token_dtype(65536) == np.uint16 and _token_dtype(65537) == np.uint32


def test_unreachable_hub_dataset_is_a_one_line_error():
    with pytest.raises(ValueError, match="cannot load Hugging Face dataset 'nobody/nothing'") as error:
        list(iter_documents(CorpusSource(kind="hf", name="nobody/nothing")))
    assert "\n" not in str(error.value)
