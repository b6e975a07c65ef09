"""GridSpec → cells and the stage DAG that produces them, with content-addressed ids.

A stage is a plain dict ``{"id", "kind", "config", "deps"}``; ``deps`` maps a role ("data", "parent", "model",
"train") to the id of the stage consumed. A stage id is the hash of the canonical JSON of its kind, config and deps
(sorted keys, numbers normalised), so identical work is planned once and an edit changes exactly the ids downstream
of it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from gridlab.spec import GridSpec, MethodSpec
from gridlab.store import STAGE_KINDS

# Measured fp32 training throughput in tokens/s of one 2-thread worker on the 2-core development machine, batch 16 ×
# seq 256 (docs/engine.md, bench/train_throughput.py): micro on an idle machine; nano and mini while the machine was
# shared with three other busy processes (idle is 2-3× faster); small from /work/shared/environment.md (a 135M model);
# pico: a 1-thread local worker of the default study (batch 16 × seq 64, two workers busy): the 12-layer parent and
# the sparse models, which keep its dense shapes, trained at 5,000-5,400 tokens/s.
# Used only for `gridlab plan`'s time estimate (see relative_step_cost for pruned models). Presets without a
# measurement fall back to _UNMEASURED_TOKENS_PER_S, and the plan says so.
MEASURED_TOKENS_PER_S: dict[str, float] = {
    "pico": 5200.0,
    "micro": 790.0,
    "nano": 220.0,
    "mini": 136.0,
    "small": 94.0,
}
_UNMEASURED_TOKENS_PER_S = 100.0


def canonical(value: Any) -> Any:
    """Normalise a config for hashing: integral floats become ints, floats keep 12 significant digits."""
    kind = type(value)
    if kind is float:
        if math.isfinite(value) and value == int(value):
            return int(value)
        return float(f"{value:.12g}")
    if kind is dict:
        return {str(k): canonical(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [canonical(v) for v in value]
    return value


def content_id(payload: dict[str, Any]) -> str:
    """The id of a canonical payload: sha256 of its sorted-keys JSON."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_stage(kind: str, config: dict[str, Any], deps: dict[str, str],
               digests: dict[str, str] | None = None) -> dict[str, Any]:
    """A stage from a config already in canonical form (build_plan canonicalises each shared piece once).

    ``digests`` maps config keys holding a large shared piece (schedule, evaluation, architecture) to that piece's
    content_id, which is hashed in its place: the same content still gives the same id, at a fraction of the cost.
    """
    hashed = {**config, **digests} if digests else config
    return {"id": content_id({"kind": kind, "config": hashed, "deps": deps}), "kind": kind, "config": config,
            "deps": deps}


@dataclass
class Plan:
    spec: GridSpec
    stages: dict[str, dict[str, Any]]            # id → stage, in dependency order
    cells: list[dict[str, Any]]
    excluded: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def train_tokens(self) -> int:
        """Tokens this plan trains, the parent's pretraining included."""
        total = 0
        for stage in self.stages.values():
            if stage["kind"] == "parent" and "preset" in stage["config"]:
                total += stage["config"]["tokens"]
            elif stage["kind"] == "train":
                total += trajectory_tokens(stage["config"]["budgets"], stage["config"]["schedule"])
        return total

    def naive_train_tokens(self) -> int:
        """One run per cell: the parent once, then every cell trains its own model from its start."""
        parent = self.spec.parent.tokens if self.spec.parent.pretrains else 0
        return parent + sum(cell["trained_tokens"] for cell in self.cells)

    def estimated_seconds(self, workers: int) -> float:
        preset = self.spec.parent.preset
        speed = MEASURED_TOKENS_PER_S.get(preset, _UNMEASURED_TOKENS_PER_S) if preset else _UNMEASURED_TOKENS_PER_S
        counts = None
        if preset:
            from gridlab.model import param_counts

            counts = param_counts(parent_config(self.spec))
        cost = {c["train_stage"]: relative_step_cost(counts, c["granularity"], c["ratio"]) for c in self.cells}
        seconds = 0.0
        for stage in self.stages.values():
            if stage["kind"] == "parent" and "preset" in stage["config"]:
                seconds += stage["config"]["tokens"] / speed
            elif stage["kind"] == "train":
                tokens = trajectory_tokens(stage["config"]["budgets"], stage["config"]["schedule"])
                seconds += tokens * cost.get(stage["id"], 1.0) / speed
        return seconds / max(1, workers)


def relative_step_cost(parent_counts, granularity: str, ratio: float) -> float:
    """A pruned model's training cost per token relative to its parent's. Depth and width models compute their
    embeddings and what is left of the decoder; sparse models keep dense shapes and cost what the parent does.
    (Measured on pico: 6 of its 12 layers train 1.7× faster; this gives 1.6×.) Unknown parent: 1."""
    if granularity == "sparse" or parent_counts is None:
        return 1.0
    dense = parent_counts.embedding + parent_counts.decoder
    return (parent_counts.embedding + (1 - ratio) * parent_counts.decoder) / dense


def trajectory_tokens(budgets: list[int], schedule: dict[str, Any]) -> int:
    """Tokens one train stage processes: WSD shares the stable trunk between branches; cosine runs each budget."""
    if schedule["kind"] == "cosine":
        return sum(budgets)
    decay = schedule["decay_fraction"]
    return round(max(budgets) * (1 - decay) + decay * sum(budgets))


def granularity(method: MethodSpec) -> str:
    from gridlab.pruning import METHODS

    return METHODS[method.method].granularity


def parent_config(spec: GridSpec):
    """The parent's LlamaConfig as the parent stage will build or load it."""
    if spec.parent.preset is not None:
        from gridlab.model import make_config

        # A loaded parent that declares its preset may declare its vocabulary too (no tokenizer download at plan time).
        overrides = dict(spec.parent.overrides)
        vocab = int(overrides.pop("vocab_size")) if "vocab_size" in overrides else vocab_size(spec)
        return make_config(spec.parent.preset, vocab, spec.seq_len, **overrides)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec.parent.path)


def vocab_size(spec: GridSpec) -> int:
    if spec.tokenizer.vocab_size is not None:
        return spec.tokenizer.vocab_size
    from gridlab.data import load_tokenizer

    return len(load_tokenizer(spec.tokenizer.path))


def pruned_architecture(spec: GridSpec, method: MethodSpec, ratio: float, parent) -> dict[str, Any] | None:
    from gridlab.pruning import pruned_config

    config = pruned_config(parent, method.method, ratio, **method.prune_options)
    if config is None:
        return None
    architecture = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        architecture.pop(volatile, None)
    return architecture


def build_plan(spec: GridSpec) -> Plan:
    schedule = canonical(spec.schedule.model_dump())
    evaluation = canonical(spec.evaluation.model_dump())
    schedule_digest, evaluation_digest = content_id(schedule), content_id(evaluation)
    data = make_stage("data", canonical({
        "corpus": spec.corpus.model_dump(), "splits": spec.splits.model_dump(),
        "tokenizer": spec.tokenizer.model_dump(), "seq_len": spec.seq_len,
    }), {})
    parent_tokens = spec.parent.tokens
    if spec.parent.pretrains:
        parent_cfg = {"preset": spec.parent.preset, "overrides": spec.parent.overrides, "tokens": parent_tokens,
                      "seed": spec.parent.seed, "vocab_size": vocab_size(spec), "seq_len": spec.seq_len,
                      "schedule": spec.parent.schedule.model_dump(), "validation_sequences": spec.evaluation.max_sequences}
    else:
        parent_cfg = {"path": spec.parent.path, "tokens": parent_tokens,
                      "validation_sequences": spec.evaluation.max_sequences}
        if spec.parent.preset is not None:  # the parent stage checks the checkpoint against this declaration
            from gridlab.model import architecture

            parent_cfg["declared"] = architecture(parent_config(spec))
    parent = make_stage("parent", canonical(parent_cfg), {"data": data["id"]})

    stages: dict[str, dict[str, Any]] = {data["id"]: data, parent["id"]: parent}
    budgets_of: dict[str, set[int]] = {}     # model stage id → budgets its train stage must reach
    seed_of: dict[str, int] = {}
    drafts: list[dict[str, Any]] = []
    excluded = 0
    parent_architecture = None
    architectures: dict[tuple, tuple[dict, str]] = {}

    for method in spec.methods:
        kind = granularity(method)
        options = canonical(method.prune_options)
        for ratio in spec.method_ratios(method):
            for seed in spec.seeds:
                prune = make_stage("prune", {
                    "method": method.method, "options": options, "ratio": canonical(float(ratio)), "seed": seed,
                    "calibration_sequences": spec.calibration.sequences, "layerwise": spec.calibration.layerwise,
                    "validation_sequences": spec.evaluation.max_sequences,
                }, {"parent": parent["id"], "data": data["id"]})
                init = None
                if "random" in spec.inits:
                    if kind == "sparse":
                        init = make_stage("init", {"seed": seed, "validation_sequences":
                                                   spec.evaluation.max_sequences},
                                          {"model": prune["id"], "data": data["id"]})
                    else:
                        arch_key = (method.method, json.dumps(canonical(method.prune_options), sort_keys=True), ratio)
                        if arch_key not in architectures:
                            if parent_architecture is None:
                                parent_architecture = parent_config(spec)
                            architecture = canonical(pruned_architecture(spec, method, ratio, parent_architecture))
                            architectures[arch_key] = (architecture, content_id(architecture))
                        architecture, digest = architectures[arch_key]
                        init = make_stage("init", {"architecture": architecture, "seed": seed,
                                                   "validation_sequences": spec.evaluation.max_sequences},
                                          {"data": data["id"]}, {"architecture": digest})
                for init_kind in spec.inits:
                    model = prune if init_kind == "pruned" else init
                    for budget in spec.budgets:
                        for setting in spec.settings:
                            trained = budget + parent_tokens if (init_kind == "random" and setting == 2) else budget
                            cell = {"method": method.key, "granularity": kind, "ratio": float(ratio),
                                    "init": init_kind, "setting": setting, "budget": budget,
                                    "budget_tokens": budget, "trained_tokens": trained, "seed": seed}
                            if any(rule.matches(cell) for rule in spec.exclude):
                                excluded += 1
                                continue
                            del cell["budget"]
                            stages.setdefault(prune["id"], prune)
                            if model is not prune:
                                stages.setdefault(model["id"], model)
                            budgets_of.setdefault(model["id"], set()).add(trained)
                            seed_of[model["id"]] = seed
                            drafts.append({**cell, "model_stage": model["id"], "prune_stage": prune["id"]})

    train_of: dict[str, dict[str, Any]] = {}
    eval_of: dict[str, dict[str, Any]] = {}
    for model_id, budgets in budgets_of.items():
        train = make_stage("train", {"budgets": sorted(budgets), "schedule": schedule, "seed": seed_of[model_id],
                                     "seq_len": spec.seq_len}, {"model": model_id, "data": data["id"]},
                           {"schedule": schedule_digest})
        evaluate = make_stage("eval", {"budgets": sorted(budgets), "evaluation": evaluation},
                              {"train": train["id"], "data": data["id"]}, {"evaluation": evaluation_digest})
        stages[train["id"]] = train
        stages[evaluate["id"]] = evaluate
        train_of[model_id] = train
        eval_of[model_id] = evaluate

    cells = []
    for draft in drafts:
        model_id = draft.pop("model_stage")
        cell = {**draft, "train_stage": train_of[model_id]["id"], "eval_stage": eval_of[model_id]["id"],
                "model_stage": model_id}
        identity = "|".join(str(canonical(cell[key])) for key in (
            "method", "ratio", "init", "setting", "budget_tokens", "trained_tokens", "seed", "eval_stage"))
        cell["cell_id"] = hashlib.sha256(identity.encode()).hexdigest()[:16]
        cells.append(cell)

    ordered = dict(sorted(stages.items(), key=lambda item: STAGE_KINDS.index(item[1]["kind"])))
    counts = {kind: 0 for kind in STAGE_KINDS}
    for stage in ordered.values():
        counts[stage["kind"]] += 1
    return Plan(spec=spec, stages=ordered, cells=cells, excluded=excluded, counts=counts)


def format_plan(plan: Plan, workers: int | None = None) -> str:
    spec = plan.spec
    workers = workers or spec.local.workers
    lines = [f"grid {spec.name}: {len(plan.cells)} cells ({plan.excluded} excluded) → {plan.spec.run_dir}"]
    parent = spec.parent
    source = f"pretrain {parent.preset} for {parent.tokens:,} tokens" if parent.pretrains else f"load {parent.path}"
    lines.append(f"  parent: {source} (parent tokens P = {parent.tokens:,})")
    lines.append("  methods: " + ", ".join(
        f"{m.key} [{granularity(m)}] ratios {'/'.join(f'{r:g}' for r in spec.method_ratios(m))}"
        for m in spec.methods))
    lines.append(f"  inits {', '.join(spec.inits)} × budgets {', '.join(f'{b:,}' for b in spec.budgets)}"
                 f" × settings {', '.join(map(str, spec.settings))} × seeds {', '.join(map(str, spec.seeds))}")
    lines.append("  stages: " + ", ".join(f"{kind} {count}" for kind, count in plan.counts.items())
                 + f" (total {len(plan.stages)})")
    planned, naive = plan.train_tokens(), plan.naive_train_tokens()
    lines.append(f"  tokens to train: {planned:,} (naive one run per cell: {naive:,}; "
                 f"{naive / max(planned, 1):.1f}× saved)")
    if not spec.resources.for_kind("train")["gpus_per_node"]:
        seconds = plan.estimated_seconds(workers)
        preset = spec.parent.preset
        basis = (f"measured {preset} throughput, {MEASURED_TOKENS_PER_S[preset]:,.0f} tokens/s per worker"
                 if preset in MEASURED_TOKENS_PER_S else
                 f"no measured throughput for this parent; assumed {_UNMEASURED_TOKENS_PER_S:,.0f} tokens/s per worker")
        lines.append(f"  estimated training time: {_duration(seconds)} on {workers} local worker(s) ({basis})")
    lines.extend(_job_lines(plan))
    return "\n".join(lines)


# The GPU-hour estimate assumes this share of an H100/H200's dense bf16 peak (PyTorch-native FSDP trainers reach it).
_ASSUMED_MFU = 0.4
_GPU_PEAK_FLOPS = 989e12


def _job_lines(plan: Plan) -> list[str]:
    """Each multi-process or GPU stage kind's job shape, and the training compute in GPU-hours."""
    spec = plan.spec
    lines = []
    for kind in ("parent", "prune", "init", "train", "eval"):
        r = spec.resources.for_kind(kind)
        if r["ranks"] > 1 or r["gpus_per_node"]:
            where = f" partition {r['partition']}" if r["partition"] else ""
            lines.append(f"  {kind} jobs: {r['nodes']} node(s) × {r['tasks_per_node']} rank(s), "
                         f"{r['gpus_per_node']} GPU(s)/node, {r['mem_gb']:g} GB/node, {r['time_min']} min{where}")
    train = spec.resources.for_kind("train")
    if train["gpus_per_node"] and (spec.parent.preset is not None or not spec.parent.pretrains):
        flops = _training_flops(plan)
        if flops is not None:
            gpu_hours = flops / (_ASSUMED_MFU * _GPU_PEAK_FLOPS) / 3600
            gpus = train["nodes"] * train["gpus_per_node"] * train["array_parallelism"]
            lines.append(f"  training compute: {flops:.2e} FLOPs (6·params·tokens) ≈ {gpu_hours:,.0f} GPU-hours at an "
                         f"assumed {_ASSUMED_MFU:.0%} MFU of {_GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s (H100 bf16); "
                         f"≈ {_duration(gpu_hours * 3600 / gpus)} with {train['array_parallelism']} train jobs at once "
                         f"({gpus} GPUs)")
    return lines


def _training_flops(plan: Plan) -> float | None:
    """6·N·tokens over the train stages, N = the parent's parameters × the kept fraction of each cell."""
    if plan.spec.parent.preset is None:
        return None
    parent_params = _param_count(parent_config(plan.spec))
    kept_fraction = {c["train_stage"]: 1 - c["ratio"] for c in plan.cells}
    flops = 0.0
    for stage in plan.stages.values():
        if stage["kind"] == "parent" and "preset" in stage["config"]:
            flops += 6 * parent_params * stage["config"]["tokens"]
        elif stage["kind"] == "train":
            tokens = trajectory_tokens(stage["config"]["budgets"], stage["config"]["schedule"])
            flops += 6 * parent_params * kept_fraction.get(stage["id"], 1.0) * tokens
    return flops


def _param_count(config) -> int:
    """A Llama's parameter count from its config alone (no weights are built)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = config.hidden_size * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    layer = attention + mlp + 2 * config.hidden_size
    embeddings = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * layer + embeddings + config.hidden_size


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 4 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"
