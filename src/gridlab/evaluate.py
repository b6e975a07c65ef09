"""Held-out loss over whole documents with a bootstrap stderr, the floors a loss or a task is read against, and
zero/few-shot tasks through lm-eval (offline).

Held-out loss. A split's documents (``TokenShard.documents()``: boundaries recorded while tokenizing) are sampled by
a seeded hash of their keys, whole, until ``max_tokens`` tokens' worth (``sample_documents``); every model of a grid
gets the same sample, so their losses pair document by document. Each document is scored whole: its input is the
eos token (the separator every document follows in training) and then its tokens, cut into consecutive windows of
seq_len tokens that overlap by one (``document_windows``), so every token of the document — the eos that ends it
included — is predicted exactly once, from the document's own earlier tokens only (at most seq_len − 1 of them). The
loss is the token-weighted mean over the sampled documents; its stderr is the standard deviation of that mean over
``BOOTSTRAP_RESAMPLES`` seeded resamples of the documents (``bootstrap_stderr``). Why whole documents, how large a
sample and what its stderr is worth: docs/engine.md ("Evaluation"), measured by bench/heldout_eval.py.

Floors (``uniform_loss``, ``unigram_loss``, ``task_chance``): the references a loss or a task score is read against.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from gridlab.data import DocumentIndex, TokenShard, key_draws
from gridlab.layerwise import final_hidden_states, layer_store
from gridlab.tasks import TASKS_DIR

Part = Literal["all", "select", "report"]
PARTS: tuple[str, ...] = ("all", "select", "report")
BOOTSTRAP_RESAMPLES = 1000
# Tokens per forward pass when no batch size is given: 128 windows at seq_len 64, 4 at 2048 (the logits of a batch,
# tokens × vocabulary floats, are what bounds it).
BATCH_TOKENS = 8192
# Estimating the unigram distribution reads at most this many tokens of the training split (its start).
UNIGRAM_MAX_TOKENS = 100_000_000
_PART_SALT = "gridlab held-out part"


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ the sample

def document_parts(index: DocumentIndex) -> np.ndarray:
    """Each document's half of the split, fixed by a hash of its key alone (no seed): True for the "select" half
    (e.g. for choosing learning rates), False for the "report" half (the loss that is reported)."""
    return key_draws(index.keys, _PART_SALT) < 0.5


def sample_documents(index: DocumentIndex, max_tokens: int | None, seed: int = 0, part: Part = "all") -> np.ndarray:
    """The sampled documents' positions in ``index``, in stream order: the documents of ``part`` ("all", or one of
    the two disjoint halves "select" / "report") ordered by a seeded hash of their keys and taken whole until they
    hold ``max_tokens`` tokens (the document that reaches it included); all of them when ``max_tokens`` is None or
    they hold no more. The same index and arguments give the same sample, whatever the model."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens}")
    candidates = np.arange(len(index))
    if part != "all":
        select = document_parts(index)
        candidates = candidates[select if part == "select" else ~select]
    if max_tokens is None or int(index.lengths[candidates].sum()) <= max_tokens:
        return candidates
    order = candidates[np.argsort(key_draws(index.keys[candidates], f"gridlab held-out sample {seed}"),
                                  kind="stable")]
    taken = int(np.searchsorted(np.cumsum(index.lengths[order]), max_tokens)) + 1
    return np.sort(order[:taken])


def document_windows(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows that score documents of ``lengths`` tokens whole: (document, offset, size) per window, where a
    document's input is [eos] + its tokens and window j is input[o : o + size], o = j·(seq_len − 1), predicting
    input[o + 1 : o + size]. Consecutive windows overlap by one token, so each token is predicted exactly once."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    lengths = np.asarray(lengths, np.int64)
    stride = seq_len - 1
    per_document = -(-lengths // stride)
    document = np.repeat(np.arange(len(lengths)), per_document)
    first = np.concatenate([[0], np.cumsum(per_document)[:-1]]) if len(lengths) else per_document
    offset = (np.arange(len(document)) - np.repeat(first, per_document)) * stride
    size = np.minimum(seq_len, lengths[document] + 1 - offset)
    return document, offset, size


def document_tokens(data: TokenShard, index: DocumentIndex, chosen: np.ndarray) -> np.ndarray:
    """The chosen documents' tokens, concatenated in the order of ``chosen``."""
    parts = [data.stream(int(index.starts[i]), int(index.lengths[i])) for i in chosen]
    return np.concatenate(parts) if parts else np.zeros(0, data.dtype)


# --------------------------------------------------------------------------------------------- scoring a model

@dataclass(frozen=True)
class HeldOut:
    """A held-out loss over documents: the token-weighted mean, its bootstrap stderr (None for fewer than two
    documents), and what a paired analysis needs: each document's key, tokens scored and summed loss (nats)."""

    loss: float
    stderr: float | None
    keys: np.ndarray          # uint64, the documents' keys (DocumentIndex.keys)
    doc_tokens: np.ndarray    # int64, tokens predicted in each document
    doc_loss: np.ndarray      # float64, summed next-token loss of each document

    @classmethod
    def of(cls, keys: np.ndarray, doc_tokens: np.ndarray, doc_loss: np.ndarray, seed: int = 0) -> HeldOut:
        doc_tokens, doc_loss = np.asarray(doc_tokens, np.int64), np.asarray(doc_loss, np.float64)
        if int(doc_tokens.sum()) < 1:
            raise ValueError("a held-out loss needs at least one scored token")
        return cls(loss=float(doc_loss.sum() / doc_tokens.sum()), stderr=bootstrap_stderr(doc_loss, doc_tokens, seed),
                   keys=np.asarray(keys, np.uint64), doc_tokens=doc_tokens, doc_loss=doc_loss)

    @property
    def tokens(self) -> int:
        return int(self.doc_tokens.sum())

    @property
    def documents(self) -> int:
        return len(self.doc_tokens)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def ppl_stderr(self) -> float | None:
        """The perplexity's stderr by the delta method (d exp(L) = exp(L) dL)."""
        return None if self.stderr is None else self.ppl * self.stderr


def bootstrap_stderr(doc_loss: np.ndarray, doc_tokens: np.ndarray, seed: int = 0,
                     resamples: int = BOOTSTRAP_RESAMPLES) -> float | None:
    """The standard error of the token-weighted mean loss sum(doc_loss) / sum(doc_tokens), from ``resamples``
    resamples of the n documents with replacement (seeded): the standard deviation of the resampled means, times
    sqrt(n / (n − 1)) (the bootstrap's plug-in variance is (n − 1)/n of the unbiased one: for equal token counts
    this is the textbook sd / sqrt(n)). None for fewer than two documents (one says nothing about the spread).
    A paired difference of two models on the same documents is the same computation on the difference of their
    doc_loss. Few documents make it optimistic (docs/engine.md, "Evaluation": measured coverage)."""
    doc_loss, doc_tokens = np.asarray(doc_loss, np.float64), np.asarray(doc_tokens, np.float64)
    n = len(doc_loss)
    if n < 2:
        return None
    rng = np.random.default_rng([seed, n])
    means = np.empty(resamples)
    chunk = max(1, min(resamples, 4_000_000 // n))
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        means[start:start + len(draws)] = doc_loss[draws].sum(axis=1) / doc_tokens[draws].sum(axis=1)
    return float(means.std(ddof=1) * math.sqrt(n / (n - 1)))


def _window_batches(windows, flat: np.ndarray, base: np.ndarray, batch_size: int):
    """(window positions, input ids, valid-target mask) per batch: windows longest first, each batch padded to
    its longest window (on the right: a causal model's real positions never see the padding)."""
    document, offset, size = windows
    order = np.argsort(-size, kind="stable")
    for begin in range(0, len(order), batch_size):
        rows = order[begin:begin + batch_size]
        width = int(size[rows].max())
        columns = np.arange(width)
        positions = (base[document[rows]] + offset[rows])[:, None] + columns[None, :]
        valid = columns[None, :] < size[rows][:, None]
        ids = flat[np.where(valid, positions, 0)].astype(np.int64)
        yield rows, torch.from_numpy(ids), torch.from_numpy(valid[:, 1:])


@torch.no_grad()
def window_losses(model, data: TokenShard, index: DocumentIndex, chosen: np.ndarray,
                  batch_size: int | None = None) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Score the chosen documents whole: their windows (``document_windows``; document = position in ``chosen``)
    and each window's summed next-token loss. ``batch_size``: windows per forward pass (default BATCH_TOKENS //
    seq_len); windows go longest first, each batch padded to its longest."""
    seq_len = data.seq_len
    batch_size = batch_size or max(1, BATCH_TOKENS // seq_len)
    eos = data.meta.get("eos_token_id")
    if eos is None:
        raise ValueError(f"token shard {str(data.path)!r} names no eos_token_id; documents are scored after it")
    lengths = index.lengths[chosen]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    # Each document's input, [eos] + its tokens, laid end to end.
    flat = np.insert(document_tokens(data, index, chosen), starts, eos) if len(chosen) else np.zeros(0, np.int64)
    windows = document_windows(lengths, seq_len)
    loss = np.zeros(len(windows[0]), np.float64)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = list(_window_batches(windows, flat, starts + np.arange(len(chosen)), batch_size))
    for (rows, ids, valid), logits in zip(batches, _logits(model, [ids for _, ids, _ in batches], batch_size, device)):
        targets = ids[:, 1:].to(device)
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
        loss[rows] = (token_loss.view(targets.shape).double() * valid.to(device)).sum(1).cpu().numpy()
    model.train(was_training)
    return windows, loss


def document_losses(model, data: TokenShard, index: DocumentIndex, chosen: np.ndarray,
                    batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Score the chosen documents whole: (summed next-token loss, tokens predicted) per document of ``chosen``."""
    windows, loss = window_losses(model, data, index, chosen, batch_size)
    return np.bincount(windows[0], weights=loss, minlength=len(chosen)), index.lengths[chosen].astype(np.int64)


def _logits(model, id_batches: list[torch.Tensor], batch_size: int, device: torch.device):
    """The logits of each batch of input ids; a model whose decoder layers stay on disk runs all batches layer by
    layer (one layer in memory at a time), padded to one width."""
    if layer_store(model) is not None:
        width = max(ids.shape[1] for ids in id_batches)
        sequences = torch.cat([F.pad(ids, (0, width - ids.shape[1])) for ids in id_batches])
        for ids, hidden in zip(id_batches, final_hidden_states(model, sequences, batch_size)):
            yield model.lm_head(model.model.norm(hidden))[:, :ids.shape[1]]
        return
    for ids in id_batches:
        with _autocast(device):
            yield model(input_ids=ids.to(device)).logits


def heldout_loss(model, data: TokenShard, max_sequences: int | None = None, seed: int = 0, part: Part = "all",
                 batch_size: int | None = None) -> HeldOut:
    """The held-out loss of ``model`` on a seeded sample of whole documents of ``data`` worth ``max_sequences``
    sequences of seq_len tokens (None, or a split that holds no more: every document of ``part``)."""
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be a positive integer or None, got {max_sequences}")
    index = data.documents()
    chosen = sample_documents(index, None if max_sequences is None else max_sequences * data.seq_len, seed, part)
    doc_loss, doc_tokens = document_losses(model, data, index, chosen, batch_size)
    return HeldOut.of(index.keys[chosen], doc_tokens, doc_loss, seed)


# ----------------------------------------------------------------------------------------------------- floors

def uniform_loss(vocab_size: int) -> float:
    """The loss of a model that spreads its probability evenly over the vocabulary: ln V."""
    return math.log(vocab_size)


def unigram_log_probs(train: TokenShard, vocab_size: int, max_tokens: int = UNIGRAM_MAX_TOKENS) -> np.ndarray:
    """log p(token) of the unigram distribution of ``train``'s stream (its first ``max_tokens`` tokens), add-one
    smoothed so that a token unseen in training costs a finite loss."""
    counts = np.ones(vocab_size, np.float64)
    total = min(train.stream_tokens, max_tokens)
    for start in range(0, total, 1 << 24):
        chunk = train.stream(start, min(1 << 24, total - start))
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    return np.log(counts / counts.sum())


def unigram_loss(log_probs: np.ndarray, data: TokenShard, held_out: HeldOut, seed: int = 0) -> HeldOut:
    """The unigram model's loss on the documents ``held_out`` scored (the same tokens, the same bootstrap)."""
    index = data.documents()
    position = {int(key): i for i, key in enumerate(index.keys)}
    chosen = np.array([position[int(key)] for key in held_out.keys], np.int64)
    tokens = document_tokens(data, index, chosen)
    cost = -log_probs[tokens]
    starts = np.concatenate([[0], np.cumsum(held_out.doc_tokens)[:-1]])
    doc_loss = np.add.reduceat(cost, starts) if len(cost) else np.zeros(0)
    return HeldOut.of(held_out.keys, held_out.doc_tokens, doc_loss, seed)


def task_chance(tasks: list[str], limit: int | None = None) -> dict[str, float]:
    """The chance level of each multiple-choice task (lm-eval's and gridlab's): the mean over its first ``limit``
    items of 1 / (number of choices) — the accuracy of a uniform guess. Tasks of another kind (and groups) have
    none and are left out."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    check_tasks(tasks)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(tasks) <= own_tasks())
    chance = {}
    for name, task in manager.load(list(tasks))["tasks"].items():   # every leaf task, groups expanded
        if task.OUTPUT_TYPE != "multiple_choice":
            continue
        choices = [len(task.doc_to_choice(doc)) for _, doc in task.doc_iterator(limit=limit)]
        if choices:
            chance[name] = float(np.mean([1.0 / n for n in choices]))
    return chance


def own_tasks() -> set[str]:
    """gridlab's own offline tasks: gridlab_<stem> for every gridlab/tasks/<stem>.yaml."""
    return {f"gridlab_{path.stem}" for path in TASKS_DIR.glob("*.yaml")}


def registry_tasks() -> set[str]:
    """Every task name lm-eval knows (its registry and gridlab's tasks), offline. Indexing the registry takes ~30 s,
    so the names are cached per lm-eval version under $GRIDLAB_CACHE."""
    import json
    from importlib.metadata import version

    from gridlab.inputs import cache_root

    path = cache_root() / f"lm-eval-{version('lm_eval')}-tasks.json"
    try:
        return set(json.loads(path.read_text())) | own_tasks()
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    from gridlab import atomic

    names = sorted(TaskManager(include_path=str(TASKS_DIR)).all_tasks)
    try:
        atomic.write_json(path, names)
    except OSError:
        pass  # an unwritable cache only costs the next check its 30 s
    return set(names) | own_tasks()


def check_tasks(tasks: list[str]) -> None:
    """A one-line error (gridlab.errors.InvalidValue, keyed by the task's index) for a task name lm-eval lacks."""
    from gridlab.errors import InvalidValue

    if set(tasks) <= own_tasks():
        return
    known = registry_tasks()
    for index, task in enumerate(tasks):
        if task not in known:
            import difflib

            hint = difflib.get_close_matches(task, sorted(known), n=1)
            did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
            raise InvalidValue(f"[{index}]", f"{task!r} is not an lm-eval task; {did_you_mean}gridlab's own: "
                                             f"{', '.join(sorted(own_tasks()))} (or any task of lm-eval's registry "
                                             f"whose data is cached locally)")


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    num_fewshot: int = 0,
    trained_tokens: int | None = None,
    batch_size: int = 16,
) -> list[dict]:
    """Run lm-eval tasks (its registry plus gridlab/tasks/*.yaml) on an in-memory model, offline.

    Returns metric records {name: "lm_eval/<task>/<metric>", value, stderr, tokens} where tokens is
    `trained_tokens` (the training tokens of the evaluated model, as the metrics table stores it).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_tasks(tasks)
    # Indexing lm-eval's thousands of built-in task files takes ~30 s; skip it when only gridlab's tasks are asked.
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(tasks) <= own_tasks())
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
        verbosity="ERROR",
    )
    model.train(was_training)
    return _records(output["results"], output.get("higher_is_better", {}), trained_tokens)


def _records(results: dict, directions: dict, trained_tokens: int | None) -> list[dict]:
    """One record per metric; its direction is what the task declares (lm-eval's higher_is_better)."""
    records = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            declared = directions.get(task, {}).get(metric)
            records.append(
                {
                    "name": f"lm_eval/{task}/{name}",
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "tokens": trained_tokens,
                    "higher_is_better": bool(declared) if declared is not None else None,
                }
            )
    return records
