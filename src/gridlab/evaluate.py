"""Held-out loss over a seeded two-stage sample of documents and their windows with its stderr, the floors a loss or
a task is read against, and zero/few-shot tasks through lm-eval (offline).

Held-out loss. A split's documents (``TokenShard.documents()``: boundaries recorded while tokenizing) are cut into
windows: a document's input is the eos token (the separator every document follows in training) and then its
tokens, in consecutive windows of seq_len tokens that overlap by one (``document_windows``), so every token of the
document — the eos that ends it included — is predicted once, from the document's own earlier tokens only (at most
seq_len − 1 of them). The sample (``sample_windows``) takes the documents in a seeded hash order of their keys and
from each at most ``windows_per_document`` of its windows, drawn by a hash of (seed, document key, window place),
until ``max_sequences`` windows; every model of a grid gets the same windows, so their losses pair document by
document. Each sampled window counts N_d / m_d times (its document's windows over those sampled from it), and the
loss is the ratio estimator over documents of the whole split's token-weighted mean loss, with its linearised stderr
(gridlab.measure). Why this design, how large a sample, and what its stderr is worth: docs/engine.md
("Evaluation"), measured by bench/heldout_eval.py and tests/test_measure.py.

Floors (``uniform_loss``, ``unigram_loss``, ``task_chance``): the references a loss or a task score is read against.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
from dataclasses import dataclass
from importlib.metadata import version
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from gridlab import atomic
from gridlab.data import DocumentIndex, TokenShard, key_draws
from gridlab.errors import InvalidValue
from gridlab.inputs import cache_root
from gridlab.layerwise import final_hidden_states, layer_store
from gridlab.measure import ratio_stderr
from gridlab.tasks import TASKS_DIR

Part = Literal["all", "select", "report"]
PARTS: tuple[str, ...] = ("all", "select", "report")
# The selection half is scored on this share of ``max_sequences`` windows; the report half on all of them, so the
# reported loss keeps the sample size a grid without a sweep gives it. Choosing between learning rates compares
# models on the same windows (paired), which needs fewer windows than a gap's verdict: docs/engine.md, "Evaluation".
SELECT_SHARE = 0.5
# Tokens per forward pass when no batch size is given: 128 windows at seq_len 64, 4 at 2048 (the logits of a batch,
# tokens × vocabulary floats, are what bounds it).
BATCH_TOKENS = 8192
# Estimating the unigram distribution reads at most this many tokens of the training split (its start).
UNIGRAM_MAX_TOKENS = 100_000_000
_PART_SALT = "gridlab held-out part"
# Spreads a window's place in its document over 64 bits before it is mixed with the document's key (splitmix64's
# increment).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ the sample

def select_sequences(max_sequences: int | None) -> int | None:
    """The windows the selection half is scored on: SELECT_SHARE of ``max_sequences`` (at least 1; None: all)."""
    return None if max_sequences is None else max(1, round(max_sequences * SELECT_SHARE))


def document_parts(index: DocumentIndex) -> np.ndarray:
    """Each document's half of the split, fixed by a hash of its key alone (no seed): True for the "select" half
    (e.g. for choosing learning rates), False for the "report" half (the loss that is reported)."""
    return key_draws(index.keys, _PART_SALT) < 0.5


def _document_order(index: DocumentIndex, seed: int, part: Part) -> np.ndarray:
    """The documents of ``part`` ("all", or one of the two disjoint halves "select" / "report"), ordered by a
    seeded hash of their keys: the order in which a sample takes them, whatever the model."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    candidates = np.arange(len(index))
    if part != "all":
        select = document_parts(index)
        candidates = candidates[select if part == "select" else ~select]
    return candidates[np.argsort(key_draws(index.keys[candidates], f"gridlab held-out sample {seed}"), kind="stable")]


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


@dataclass(frozen=True)
class WindowSample:
    """A held-out sample: some documents of a split and, of each, some of its windows (``document_windows``).

    Per document (stream order): its position in the DocumentIndex, its key, how many windows it has (N_d) and how
    many are sampled (m_d); each sampled window then counts N_d / m_d times (``weights``), so the weighted sums
    estimate what scoring every window of the document would give. Per sampled window: its document (position in
    ``documents``), offset and size, as ``document_windows`` defines them — a window sampled is scored exactly as
    in whole-document scoring."""

    documents: np.ndarray        # int64, positions in the DocumentIndex
    keys: np.ndarray             # uint64, the documents' keys
    windows: np.ndarray          # int64, N_d
    sampled: np.ndarray          # int64, m_d (1 ≤ m_d ≤ N_d)
    window_document: np.ndarray  # int64, per sampled window: its document's position in ``documents``
    window_offset: np.ndarray    # int64
    window_size: np.ndarray      # int64 (tokens predicted: size − 1)

    @property
    def weights(self) -> np.ndarray:
        """Per document: N_d / m_d, what each of its sampled windows counts for."""
        return self.windows / self.sampled

    @property
    def n_windows(self) -> int:
        return len(self.window_document)

    def window_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.window_document, self.window_offset, self.window_size

    def per_document(self, window_values: np.ndarray) -> np.ndarray:
        """Per document: the weighted sum N_d / m_d · Σ (its sampled windows' values)."""
        sums = np.bincount(self.window_document, weights=window_values, minlength=len(self.documents))
        return sums * self.weights


def _spread(windows: np.ndarray, total: int) -> np.ndarray:
    """``total`` windows spread over every document (fewer windows than documents × the cap would give): each
    document gives the same number k, or all of its windows when it has fewer, k the largest that fits, and what
    is left goes one more each to the documents with more, in their order (hash order)."""
    low, high = 1, int(windows.max())           # Σ min(N_d, 1) ≤ total < Σ N_d here
    while low < high:                           # the largest k with Σ min(N_d, k) ≤ total
        middle = (low + high + 1) // 2
        low, high = (middle, high) if int(np.minimum(windows, middle).sum()) <= total else (low, middle - 1)
    taken = np.minimum(windows, low)
    extra = np.flatnonzero(windows > low)[:total - int(taken.sum())]
    taken[extra] += 1
    return taken


def sample_windows(index: DocumentIndex, seq_len: int, max_windows: int | None, windows_per_document: int | None,
                   seed: int = 0, part: Part = "all") -> WindowSample:
    """The held-out sample: ``max_windows`` windows of seq_len tokens (``document_windows``) from documents of
    ``part`` taken in the seeded hash order, at most ``windows_per_document`` of each (all of a document with no
    more), drawn without replacement by a hash of (seed, the document's key, the window's place), so every model
    of a grid gets the same windows. The last document taken gives only what reaches ``max_windows``. When the
    documents run out first, the windows are spread over every document (``_spread``); when the split holds no
    more than ``max_windows`` windows (or it is None), every window of every document.
    ``windows_per_document`` None: whole documents, until they hold ``max_windows`` windows (the last one whole).
    A larger ``max_windows`` extends a smaller one."""
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows}")
    if windows_per_document is not None and windows_per_document < 1:
        raise ValueError(f"windows_per_document must be a positive integer or None, got {windows_per_document}")
    order = _document_order(index, seed, part)
    if not len(order):
        where = "the split" if part == "all" else f"the {part!r} half of the split (a learning-rate sweep's)"
        raise ValueError(f"{where} holds no documents of the {len(index)} in all: nothing to score; give the "
                         f"validation split more documents ([splits] validation, or the corpus)")
    windows = document_windows(index.lengths[order], seq_len)[0]
    count = np.bincount(windows, minlength=len(order)).astype(np.int64)     # N_d, in the hash order
    if max_windows is None or int(count.sum()) <= max_windows:
        taken = count.copy()
    elif windows_per_document is None:                                      # whole documents
        last = int(np.searchsorted(np.cumsum(count), max_windows))
        taken = np.where(np.arange(len(order)) <= last, count, 0)
    elif int(np.minimum(count, windows_per_document).sum()) >= max_windows:
        each = np.minimum(count, windows_per_document)
        taken = np.clip(max_windows - (np.cumsum(each) - each), 0, each)
    else:                                                                   # the documents run out first
        taken = _spread(count, max_windows)
    keep = taken > 0
    stream = np.argsort(order[keep], kind="stable")                         # the kept documents in stream order
    documents, windows, sampled = order[keep][stream], count[keep][stream], taken[keep][stream]
    document, offset, size = document_windows(index.lengths[documents], seq_len)
    place = offset // (seq_len - 1)
    with np.errstate(over="ignore"):
        window_keys = index.keys[documents][document] ^ (place.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    draw = key_draws(window_keys, f"gridlab held-out windows {seed}")
    by_draw = np.lexsort((draw, document))                                  # within each document, by its draw
    first = np.concatenate([[0], np.cumsum(windows)[:-1]])
    rank = np.empty(len(document), np.int64)
    rank[by_draw] = np.arange(len(document)) - np.repeat(first, windows)
    chosen = np.flatnonzero(rank < sampled[document])                        # in stream order
    return WindowSample(documents=documents.astype(np.int64), keys=index.keys[documents], windows=windows,
                        sampled=sampled, window_document=document[chosen], window_offset=offset[chosen],
                        window_size=size[chosen])


def document_tokens(data: TokenShard, index: DocumentIndex, chosen: np.ndarray) -> np.ndarray:
    """The chosen documents' tokens, concatenated in the order of ``chosen``."""
    parts = [data.stream(int(index.starts[i]), int(index.lengths[i])) for i in chosen]
    return np.concatenate(parts) if parts else np.zeros(0, data.dtype)


# --------------------------------------------------------------------------------------------- scoring a model

@dataclass(frozen=True)
class HeldOut:
    """A held-out loss: the ratio estimator over the sample's documents, Σ loss_sum / Σ tokens
    (gridlab.measure), its linearised stderr (None for fewer than two documents), and what a paired analysis needs:
    the sample, and per document its weighted token count and weighted loss sum (nats) — its sampled windows'
    predicted tokens and summed losses, times N_d / m_d."""

    loss: float
    stderr: float | None
    sample: WindowSample
    doc_tokens: np.ndarray    # float64, X_d: the document's estimated predicted tokens
    doc_loss: np.ndarray      # float64, Y_d: the document's estimated summed next-token loss

    @classmethod
    def of(cls, sample: WindowSample, window_loss: np.ndarray) -> HeldOut:
        """From each sampled window's summed loss (in the sample's window order)."""
        doc_tokens = sample.per_document((sample.window_size - 1).astype(np.float64))
        doc_loss = sample.per_document(np.asarray(window_loss, np.float64))
        if doc_tokens.sum() <= 0:
            raise ValueError("a held-out loss needs at least one scored token")
        return cls(loss=float(doc_loss.sum() / doc_tokens.sum()), stderr=ratio_stderr(doc_loss, doc_tokens),
                   sample=sample, doc_tokens=doc_tokens, doc_loss=doc_loss)

    @property
    def keys(self) -> np.ndarray:
        return self.sample.keys

    @property
    def tokens(self) -> int:
        """Tokens scored (predicted in the sampled windows)."""
        return int((self.sample.window_size - 1).sum())

    @property
    def documents(self) -> int:
        return len(self.sample.documents)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def ppl_stderr(self) -> float | None:
        """The perplexity's stderr by the delta method (d exp(L) = exp(L) dL)."""
        return None if self.stderr is None else self.ppl * self.stderr


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
def window_losses(model, data: TokenShard, index: DocumentIndex, sample: WindowSample,
                  batch_size: int | None = None) -> np.ndarray:
    """Score the sample's windows: each window's summed next-token loss, in the sample's window order. A window's
    input is its slice of [eos] + its document's tokens, nothing else. ``batch_size``: windows per forward pass
    (default BATCH_TOKENS // seq_len); windows go longest first, each batch padded to its longest."""
    seq_len = data.seq_len
    batch_size = batch_size or max(1, BATCH_TOKENS // seq_len)
    eos = data.meta.get("eos_token_id")
    if eos is None:
        raise ValueError(f"token shard {str(data.path)!r} names no eos_token_id; documents are scored after it")
    chosen = sample.documents
    lengths = index.lengths[chosen]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    # Each document's input, [eos] + its tokens, laid end to end.
    flat = np.insert(document_tokens(data, index, chosen), starts, eos) if len(chosen) else np.zeros(0, np.int64)
    loss = np.zeros(sample.n_windows, np.float64)
    if not sample.n_windows:
        return loss
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = list(_window_batches(sample.window_tuple(), flat, starts + np.arange(len(chosen)), batch_size))
    for (rows, ids, valid), logits in zip(batches, _logits(model, [ids for _, ids, _ in batches], batch_size, device)):
        targets = ids[:, 1:].to(device)
        token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
        loss[rows] = (token_loss.view(targets.shape).double() * valid.to(device)).sum(1).cpu().numpy()
    model.train(was_training)
    return loss


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


def heldout_loss(model, data: TokenShard, max_sequences: int | None = None,
                 windows_per_document: int | None = None, seed: int = 0, part: Part = "all",
                 batch_size: int | None = None) -> HeldOut:
    """The held-out loss of ``model`` on the seeded sample ``sample_windows`` draws from ``data``: ``max_sequences``
    windows of seq_len tokens, at most ``windows_per_document`` of each document (None: whole documents; the grid's
    default is EvaluationSpec's); None, or a split that holds no more: every window of every document of ``part``."""
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be a positive integer or None, got {max_sequences}")
    index = data.documents()
    sample = sample_windows(index, data.seq_len, max_sequences, windows_per_document, seed, part)
    return HeldOut.of(sample, window_losses(model, data, index, sample, batch_size))


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


def unigram_loss(log_probs: np.ndarray, data: TokenShard, held_out: HeldOut) -> HeldOut:
    """The unigram model's loss on the windows ``held_out`` scored: the same tokens, the same weights."""
    sample = held_out.sample
    index = data.documents()
    cost = -log_probs[document_tokens(data, index, sample.documents)]
    cumulative = np.concatenate([[0.0], np.cumsum(cost)])
    base = np.concatenate([[0], np.cumsum(index.lengths[sample.documents])[:-1]]).astype(np.int64)
    # window (offset o, size s) of [eos] + document predicts the document's tokens [o, o + s − 1)
    first = base[sample.window_document] + sample.window_offset
    return HeldOut.of(sample, cumulative[first + sample.window_size - 1] - cumulative[first])


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
    path = cache_root() / f"lm-eval-{version('lm_eval')}-tasks.json"
    try:
        return set(json.loads(path.read_text())) | own_tasks()
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager  # lm-eval loads in seconds: only when its registry must be indexed

    names = sorted(TaskManager(include_path=str(TASKS_DIR)).all_tasks)
    try:
        atomic.write_json(path, names)
    except OSError:
        pass  # an unwritable cache only costs the next check its 30 s
    return set(names) | own_tasks()


def check_tasks(tasks: list[str]) -> None:
    """A one-line error (gridlab.errors.InvalidValue, keyed by the task's index) for a task name lm-eval lacks."""
    if set(tasks) <= own_tasks():
        return
    known = registry_tasks()
    for index, task in enumerate(tasks):
        if task not in known:
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
    # lm-eval loads in seconds, and every plan imports this module (spec checks task names): only grids with
    # lm_eval_tasks pay for it.
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
