"""Corpora, disjoint document splits, tokenizers and memory-mapped packed token shards.

    schema    CorpusSource, SplitFractions, TokenizerConfig (the grid's [corpus], [splits], [tokenizer])
    formats   streaming readers of .txt, .jsonl(.zst/.gz), .json(.gz), .parquet
    sources   file listings, units, documents in reading order, what `gridlab plan` says about a corpus,
              corpus_identity (what a corpus reads, by content)
    tokenizer train_tokenizer, load_tokenizer, has_tokenizer, tokenizer_hash
    shards    tokenize_partition, assemble, build_shards, shard_folder, TokenShard (+ .documents(): DocumentIndex)
"""

from gridlab.data.formats import FORMATS, check_file, format_of, read_documents
from gridlab.data.schema import (
    DEFAULT_FRACTIONS,
    DEFAULT_SAMPLE_DOCUMENTS,
    MIN_VOCAB_SIZE,
    SOURCE_KINDS,
    SPLITS,
    CorpusSource,
    SplitFractions,
    TokenizerConfig,
    assign_split,
)
from gridlab.data.shards import (
    DocumentIndex,
    TokenShard,
    assemble,
    assign_partitions,
    available_cores,
    build_shards,
    key_draws,
    shard_folder,
    shard_key,
    shard_manifest,
    token_dtype,
    tokenize_partition,
)
from gridlab.data.sources import (
    CorpusFile,
    CorpusListing,
    Unit,
    check_corpus,
    corpus_files,
    corpus_identity,
    corpus_units,
    describe_corpus,
    hub_snapshot,
    iter_documents,
    iter_unit,
    list_corpus,
    list_files,
    stdlib_root,
)
from gridlab.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    has_tokenizer,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_FRACTIONS", "DEFAULT_SAMPLE_DOCUMENTS", "EOS_TOKEN", "FORMATS", "MIN_VOCAB_SIZE", "PAD_TOKEN",
    "SOURCE_KINDS", "SPLITS", "CorpusFile", "CorpusListing", "CorpusSource", "DocumentIndex", "SplitFractions",
    "TokenShard", "TokenizerConfig", "Unit", "assemble", "assign_partitions", "assign_split", "available_cores",
    "build_shards", "check_corpus", "check_file", "corpus_files", "corpus_identity", "corpus_units",
    "describe_corpus", "format_of", "has_tokenizer", "hub_snapshot", "iter_documents", "iter_unit", "key_draws",
    "list_corpus",
    "list_files", "load_tokenizer", "read_documents", "shard_folder", "shard_key", "shard_manifest", "stdlib_root",
    "token_dtype", "tokenize_partition", "tokenizer_hash", "train_tokenizer",
]
