"""Tokenizers: a byte-level BPE trained on a bounded sample of the pretrain split, or any fast HF tokenizer."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

from gridlab.atomic import staged_directory
from gridlab.data.schema import DEFAULT_SAMPLE_DOCUMENTS, MIN_VOCAB_SIZE, SplitFractions, assign_split
from gridlab.data.sources import CorpusSource, iter_documents
from gridlab.errors import UserError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(source: CorpusSource, fractions: SplitFractions, vocab_size: int, out_dir: Path,
                    sample_documents: int = DEFAULT_SAMPLE_DOCUMENTS) -> Path:
    """Train a byte-level BPE on the first ``sample_documents`` documents of the pretrain split (in reading order)
    and save it as a PreTrainedTokenizerFast folder (atomically)."""
    # transformers takes seconds to load, and gridlab.data loads with `gridlab status`: only what tokenizes does.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + merges + special tokens), "
                        f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    pretrain = (text for key, text in iter_documents(source) if assign_split(key, fractions) == "pretrain")
    tokenizer.train_from_iterator(itertools.islice(pretrain, sample_documents), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    with staged_directory(Path(out_dir)) as staging:
        wrapped.save_pretrained(staging)
    return Path(out_dir)


def has_tokenizer(folder: str | Path) -> bool:
    """A tokenizer was saved in ``folder`` (by train_tokenizer, or beside a model by gridlab.model.save_model)."""
    return (Path(folder) / "tokenizer_config.json").is_file()


def load_tokenizer(name_or_path: str | Path):
    """Any Hugging Face tokenizer: a local folder or a hub name (from the local cache when offline)."""
    from transformers import AutoTokenizer  # as in train_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load tokenizer {str(name_or_path)!r}: give a tokenizer folder or a cached hub name "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"tokenizer {str(name_or_path)!r} has no fast (Rust) implementation; gridlab needs one")
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {str(name_or_path)!r} has no eos token; documents are joined with it")
    return tokenizer


def tokenizer_hash(tokenizer) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens)."""
    definition = tokenizer.backend_tokenizer.to_str() + json.dumps(
        [tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token]
    )
    return hashlib.blake2b(definition.encode(), digest_size=16).hexdigest()
