"""Held-out loss/perplexity on token shards, and zero/few-shot tasks through lm-eval (offline)."""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
from importlib.metadata import version

import torch
import torch.nn.functional as F

from gridlab import atomic
from gridlab.data import TokenShard
from gridlab.errors import InvalidValue
from gridlab.inputs import cache_root
from gridlab.layerwise import batches, final_hidden_states, layer_store
from gridlab.tasks import TASKS_DIR


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batch_logits(model, data: TokenShard, n_sequences: int, batch_size: int, device: torch.device):
    """(token batch, logits) pairs over the first n_sequences sequences."""
    if layer_store(model) is not None:  # decoder layers on disk: run the sequences layer by layer
        sequences = data[slice(0, n_sequences)]
        hidden = final_hidden_states(model, sequences, batch_size)
        for batch, h in zip(batches(sequences, batch_size), hidden):
            yield batch.to(device), model.lm_head(model.model.norm(h))
        return
    for start in range(0, n_sequences, batch_size):
        batch = data[slice(start, min(start + batch_size, n_sequences))].to(device)
        with _autocast(device):
            logits = model(input_ids=batch).logits
        yield batch, logits


@torch.no_grad()
def heldout_loss(model, data: TokenShard, max_sequences: int | None = None, batch_size: int = 16) -> dict:
    """Mean next-token loss over the first `max_sequences` sequences: {loss, ppl, tokens} (tokens = predictions)."""
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be a positive integer or None, got {max_sequences}")
    n_sequences = data.n_sequences if max_sequences is None else min(max_sequences, data.n_sequences)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    for batch, logits in _batch_logits(model, data, n_sequences, batch_size, device):
        total_loss += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        ).double()
    model.train(was_training)
    tokens = n_sequences * (data.seq_len - 1)
    loss = total_loss.item() / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}


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
