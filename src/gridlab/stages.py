"""The worker side: run one stage over plain data and leave its result file.

``run_stage(stage, run_dir)`` computes a stage's payload from its config and the result files of the stages it
depends on; ``execute_stage`` wraps it with the bookkeeping every executor shares (attempt count, log file, error
file, result file written last and atomically). Workers never open the DuckDB file.

    python -m gridlab.stages RUN_DIR STAGE_ID      # run one stage
    python -m gridlab.stages --serve RUN_DIR       # a local worker: stage ids on stdin, "done|failed ID" on stdout
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import torch
from transformers import AutoConfig

from gridlab import atomic, distributed, provenance
from gridlab.contracts import (
    ArchitectureInit,
    BranchResult,
    Contract,
    DataConfig,
    DataPayload,
    EmbeddingsInit,
    EvalBranch,
    EvalModel,
    EvalPayload,
    InitPayload,
    LoadedParent,
    MaskInit,
    Metric,
    ParentPayload,
    PretrainParent,
    PruneConfig,
    PrunePayload,
    ShardPayload,
    ShardTask,
    Stage,
    TokenizerPayload,
    TokenizerTask,
    TrainConfig,
    TrainPayload,
)
from gridlab.data import (
    CorpusSource,
    SplitFractions,
    TokenShard,
    assemble,
    available_cores,
    build_shards,
    has_tokenizer,
    load_tokenizer,
    shard_folder,
    shard_manifest,
    tokenize_partition,
    train_tokenizer,
)
from gridlab.evaluate import heldout_loss, lm_eval_tasks, select_sequences
from gridlab.families import check_supported, config_from_dict
from gridlab.layerwise import open_layerwise, save_layerwise
from gridlab.layout import RunPaths, StagePaths
from gridlab.measure import SELECT_METRIC
from gridlab.model import check_declared_architecture, init_model, load_model, param_counts, save_model
from gridlab.progress import Recorder
from gridlab.pruning import PruneResult, get_method, inherit_embeddings, prune, random_counterpart
from gridlab.results import read_attempts, read_json, read_payload, record_attempt, write_result
from gridlab.train import train
from gridlab.units import size

# An extra evaluation corpus is held out entirely: nearly all of its documents land in its validation split.
_EVAL_CORPUS_FRACTIONS = dict(pretrain=0.01, retrain=0.01, calibration=0.01, validation=0.97)


@dataclass(frozen=True)
class StageContext:
    """What a runner gets beside its config: where the run lives and the payloads of the stages it consumes."""

    run: RunPaths
    stage: Stage

    @property
    def out(self) -> StagePaths:
        return self.run.stage(self.stage.id)

    def upstream(self, role: str) -> Contract:
        return read_payload(self.run.stage(self.stage.deps[role]))


def run_stage(stage: Stage, run_dir: str | Path) -> Contract:
    """Compute one stage; its outputs go under runs/<grid>/stages/<id>/ (training: its trajectory folder) and the
    payload describes them."""
    context = StageContext(RunPaths(run_dir), stage)
    return _RUNNERS[stage.kind](stage.config, context)


def _tokenizer_dir(config: DataConfig | TokenizerTask | ShardTask, data: StagePaths) -> Path:
    """Where a data stage's tokenizer is: trained into its folder, or the grid's tokenizer.path."""
    return data.tokenizer_dir if config.tokenizer.vocab_size is not None else Path(config.tokenizer.path)


def _make_tokenizer(config: DataConfig | TokenizerTask, data: StagePaths) -> Path:
    """The data stage's tokenizer, trained first if it is to be trained and is not there yet."""
    tokenizer_dir = _tokenizer_dir(config, data)
    if config.tokenizer.vocab_size is not None and not has_tokenizer(tokenizer_dir):
        train_tokenizer(config.corpus, config.splits, config.tokenizer.vocab_size, tokenizer_dir,
                        config.tokenizer.sample_documents)
    return tokenizer_dir


def _run_tokenizer(config: TokenizerTask, context: StageContext) -> TokenizerPayload:
    tokenizer_dir = _make_tokenizer(config, context.run.stage(config.data_stage))
    return TokenizerPayload(tokenizer_dir=str(tokenizer_dir), vocab_size=len(load_tokenizer(tokenizer_dir)),
                            trained=config.tokenizer.vocab_size is not None)


def _run_shard(config: ShardTask, context: StageContext) -> ShardPayload:
    source, fractions = config.corpus, config.splits
    data = context.run.stage(config.data_stage)
    tokenizer_dir = _tokenizer_dir(config, data)
    folder = shard_folder(source, tokenizer_dir, fractions, config.seq_len, data.shards_dir)
    units = tokenize_partition(source, tokenizer_dir, fractions, config.partition, config.partitions, folder,
                               processes=available_cores())
    return ShardPayload(partition=config.partition, partitions=config.partitions, shard_dir=str(folder), units=units)


def _run_data(config: DataConfig, context: StageContext) -> DataPayload:
    source, fractions = config.corpus, config.splits
    shards_dir = context.out.shards_dir
    if "tokenizer" in context.stage.deps:  # its tasks made the tokenizer and every piece: assemble them
        tokenizer_dir = _tokenizer_dir(config, context.out)
        shards = assemble(source, tokenizer_dir, fractions, config.seq_len,
                          shard_folder(source, tokenizer_dir, fractions, config.seq_len, shards_dir))
    else:
        tokenizer_dir = _make_tokenizer(config, context.out)
        shards = build_shards(source, tokenizer_dir, fractions, config.seq_len, shards_dir)
    manifest = shard_manifest(shards["pretrain"])
    return DataPayload(tokenizer_dir=str(tokenizer_dir), shards={split: str(path) for split, path in shards.items()},
                       vocab_size=len(load_tokenizer(tokenizer_dir)),
                       corpus_fingerprint=manifest["corpus_fingerprint"], manifest=manifest)


def _run_parent(config: PretrainParent | LoadedParent, context: StageContext) -> ParentPayload | None:
    data: DataPayload = context.upstream("data")
    if isinstance(config, PretrainParent):
        model = init_model(config_from_dict(config.architecture), config.seed)
        shard = TokenShard.open(data.shards["pretrain"])
        result = train(model, shard, config.schedule, [config.tokens], context.out.training_dir,
                       seed=config.seed, tokenizer=data.tokenizer_dir, progress=Recorder(context.out, "parent"))
        if process_rank() != 0:
            return None
        branch = result.branches[0]
        if branch.status != "done":
            raise RuntimeError(branch.error)
        model_path, trained, metrics = str(branch.path), branch.trained_tokens, curve_metrics(branch.curve)
        model, _ = load_model(model_path)  # the plain trained model, whatever sharding train() left on `model`
    else:
        model_path, trained, metrics = config.path, config.tokens, []
        loaded = AutoConfig.from_pretrained(model_path)
        check_supported(loaded, f"parent.path {model_path}")  # a family gridlab prunes, before its weights are read
        if config.declared is not None:  # what the plan built the random-init models from must be the checkpoint
            check_declared_architecture(config.declared, loaded, model_path)
        model, _ = load_model(model_path)
    return ParentPayload(model_path=model_path, tokenizer_dir=data.tokenizer_dir, trained_tokens=trained,
                         params=param_counts(model), metrics=metrics)


def _run_prune(config: PruneConfig, context: StageContext) -> PrunePayload:
    data: DataPayload = context.upstream("data")
    parent: ParentPayload = context.upstream("parent")
    device = compute_device()
    layerwise = config.layerwise and get_method(config.method).layerwise
    spill_dir = context.out.layer_spill
    if layerwise:
        model = open_layerwise(parent.model_path, device, spill_dir)
    else:
        model = load_model(parent.model_path)[0].to(device)
    calibration_shard = TokenShard.open(data.shards["calibration"])
    count = min(config.calibration_sequences, calibration_shard.n_sequences)
    # Each seed calibrates on its own sample of the calibration split, so seeds replicate pruning too.
    sample = torch.randperm(calibration_shard.n_sequences, generator=torch.Generator().manual_seed(config.seed))
    calibration = calibration_shard[sorted(sample[:count].tolist())]
    result = prune(model, config.method, config.ratio, calibration, **config.options)
    if layerwise:
        model_path = save_layerwise(result.model, context.out.model_dir, mask=result.mask,
                                    tokenizer=data.tokenizer_dir)
        shutil.rmtree(spill_dir)
    else:
        model_path = save_model(result.model, context.out.model_dir, mask=result.mask,
                                tokenizer=data.tokenizer_dir)
    return PrunePayload(model_path=str(model_path), achieved_ratio=result.achieved_ratio,
                        granularity=result.granularity,
                        removed=result.removed if result.granularity == "depth" else None, note=result.note,
                        calibration_sequences=count, layerwise=layerwise, params=param_counts(result.model))


def _run_init(config: ArchitectureInit | MaskInit | EmbeddingsInit, context: StageContext) -> InitPayload:
    if isinstance(config, ArchitectureInit):
        model, mask = init_model(config_from_dict(config.architecture), config.seed), None
        tokenizer = context.upstream("data").tokenizer_dir  # saved beside the model, so the folder works alone
    elif isinstance(config, MaskInit):
        pruned: PrunePayload = context.upstream("model")
        pruned_model, mask = load_model(pruned.model_path)
        result = PruneResult(model=pruned_model, achieved_ratio=pruned.achieved_ratio, removed=None, mask=mask,
                             method="", granularity=pruned.granularity, options={})
        model = random_counterpart(result, config.seed, sparse=config.sparse).model
        tokenizer = pruned.model_path if has_tokenizer(pruned.model_path) else None
    else:   # the embeddings control: the random twin (its decoder, its mask) with the donor's embeddings
        twin: InitPayload = context.upstream("model")
        model, mask = load_model(twin.model_path)
        donor, _ = load_model(context.upstream("embeddings").model_path)
        inherit_embeddings(model, donor)
        tokenizer = twin.model_path if has_tokenizer(twin.model_path) else None
    model_path = save_model(model, context.out.model_dir, mask=mask, tokenizer=tokenizer)
    return InitPayload(model_path=str(model_path), params=param_counts(model))


def _run_train(config: TrainConfig, context: StageContext) -> TrainPayload | None:
    data: DataPayload = context.upstream("data")
    start = context.upstream("model")
    model, mask = load_model(start.model_path)
    shard = TokenShard.open(data.shards["retrain"])
    result = train(model, shard, config.schedule, config.budgets, context.run.trajectory(config.trajectory),
                   seed=config.seed, mask=mask, tokenizer=data.tokenizer_dir, progress=Recorder(context.out, "train"))
    if process_rank() != 0:
        return None
    return TrainPayload(trajectory=config.trajectory, branches=[
        BranchResult(budget_tokens=b.budget_tokens, trained_tokens=b.trained_tokens, status=b.status,
                     path=str(b.path) if b.path else None, error=b.error, metrics=curve_metrics(b.curve))
        for b in result.branches])


def _run_eval(config: EvalModel | EvalBranch, context: StageContext) -> EvalPayload:
    data: DataPayload = context.upstream("data")
    evaluation = config.evaluation
    if isinstance(config, EvalModel):
        model_path, tokens = context.upstream("model").model_path, config.tokens
    else:
        trained: TrainPayload = context.upstream("train")
        branch = trained.branch(config.budget)
        if branch is None:
            raise RuntimeError(f"train stage {context.stage.deps['train']} has no branch of {config.budget} tokens")
        if branch.status != "done":
            raise BranchDiverged(branch.error or f"the {config.budget}-token branch did not finish")
        model_path, tokens = branch.path, branch.trained_tokens
    validation = TokenShard.open(data.shards["validation"])
    model = load_model(model_path)[0].to(compute_device())  # lm-eval runs on the model's device too
    sample = {"max_sequences": evaluation["max_sequences"], "seed": evaluation["sample_seed"],
              "windows_per_document": evaluation["windows_per_document"]}
    if config.halves:   # a learning-rate sweep: the choice and the reported loss read disjoint documents
        held_out = {"val_loss": (validation, heldout_loss(model, validation, **sample, part="report")),
                    SELECT_METRIC: (validation, heldout_loss(model, validation, **{
                        **sample, "max_sequences": select_sequences(sample["max_sequences"])}, part="select"))}
    else:
        held_out = {"val_loss": (validation, heldout_loss(model, validation, **sample))}
    for corpus in evaluation["corpora"]:
        source = _corpus({key: value for key, value in corpus.items() if key != "label"})
        shards = build_shards(source, data.tokenizer_dir, _fractions({**_EVAL_CORPUS_FRACTIONS, "seed": 0}),
                              validation.seq_len, context.run.eval_corpus_cache)
        shard = TokenShard.open(shards["validation"])
        held_out[f"eval/{corpus['label']}/loss"] = (shard, heldout_loss(model, shard, **sample))
    metrics = []
    for name, (_, loss) in held_out.items():
        metrics.append(Metric(name=name, value=loss.loss, stderr=loss.stderr, tokens=tokens, higher_is_better=False))
        if name == "val_loss":
            metrics.append(Metric(name="val_ppl", value=loss.ppl, stderr=loss.ppl_stderr, tokens=tokens,
                                  higher_is_better=False))
    if evaluation["lm_eval_tasks"]:
        for record in lm_eval_tasks(model, load_tokenizer(data.tokenizer_dir), evaluation["lm_eval_tasks"],
                                    limit=evaluation["limit"], num_fewshot=evaluation["num_fewshot"],
                                    trained_tokens=tokens):
            metrics.append(Metric(**record))
    if isinstance(config, EvalModel) and config.floors:
        reported = {name: entry for name, entry in held_out.items() if name != SELECT_METRIC}
        floors, floor_losses = floor_metrics(data, reported, evaluation)
        metrics += floors
        held_out.update(floor_losses)
    path = write_document_losses(context.out.document_losses, {name: loss for name, (_, loss) in held_out.items()})
    return EvalPayload(model_path=str(model_path), tokens=tokens, metrics=metrics, document_losses=str(path))


def floor_metrics(data: DataPayload, held_out: dict, evaluation: dict[str, Any]) -> tuple[list[Metric], dict]:
    """The references a score is read against (docs/engine.md, "Floors"): ``floor/uniform_loss`` (ln V, exact),
    ``floor/unigram_loss`` and ``floor/eval/<label>/unigram_loss`` (the retrain split's add-one smoothed unigram
    distribution scored on each held-out sample, with its stderr), ``lm_eval/<task>/chance`` (a uniform
    guess's accuracy on each multiple-choice task). Each at tokens 0, direction None: references, not scores.
    Returns them and the unigram losses ({name: (shard, HeldOut)}) whose per-document values are kept too."""
    from gridlab.data import TokenShard
    from gridlab.evaluate import task_chance, uniform_loss, unigram_log_probs, unigram_loss

    metrics = [Metric(name="floor/uniform_loss", value=uniform_loss(data.vocab_size), stderr=0.0, tokens=0)]
    log_probs = unigram_log_probs(TokenShard.open(data.shards["retrain"]), data.vocab_size)
    losses = {}
    for name, (shard, loss) in held_out.items():
        floor = "floor/unigram_loss" if name == "val_loss" else f"floor/{name.removesuffix('/loss')}/unigram_loss"
        losses[floor] = (shard, unigram_loss(log_probs, shard, loss))
        metrics.append(Metric(name=floor, value=losses[floor][1].loss, stderr=losses[floor][1].stderr, tokens=0))
    if evaluation["lm_eval_tasks"]:
        for task, chance in task_chance(evaluation["lm_eval_tasks"], evaluation["limit"]).items():
            metrics.append(Metric(name=f"lm_eval/{task}/chance", value=chance, tokens=0))
    return metrics, losses


def write_document_losses(path: Path, held_out: dict) -> Path:
    """Each held-out loss's documents as one Parquet file: metric, document (its 64-bit key, the same across the
    grid's eval stages, so two models pair by it), tokens and loss_sum (the document's sampled windows' predicted
    tokens and summed loss in nats, each times windows / sampled: the estimates whose ratio over the documents is
    the loss, gridlab.measure), windows (the document's windows of seq_len) and sampled (how many were scored)."""
    import numpy as np
    import polars as pl

    from gridlab.measure import DOCUMENT_LOSS_SCHEMA

    losses = list(held_out.values())
    frame = pl.DataFrame({
        "metric": [name for name, loss in held_out.items() for _ in range(loss.documents)],
        "document": np.concatenate([loss.keys for loss in losses]),
        "tokens": np.concatenate([loss.doc_tokens for loss in losses]),
        "loss_sum": np.concatenate([loss.doc_loss for loss in losses]),
        "windows": np.concatenate([loss.sample.windows for loss in losses]),
        "sampled": np.concatenate([loss.sample.sampled for loss in losses]),
    }, schema=DOCUMENT_LOSS_SCHEMA)
    with atomic.staged_file(path) as staging:
        frame.write_parquet(staging)
    return path


_RUNNERS = {"tokenizer": _run_tokenizer, "shard": _run_shard, "data": _run_data, "parent": _run_parent,
            "prune": _run_prune, "init": _run_init, "train": _run_train, "eval": _run_eval}


class BranchDiverged(RuntimeError):
    """The budget branch an eval stage should score diverged during training; its cells fail with that error."""


def curve_metrics(curve: list[dict]) -> list[Metric]:
    """A training curve ({tokens, loss, lr} points) as metric records: train_loss (a score) and lr (not one)."""
    return ([Metric(name="train_loss", value=p["loss"], tokens=p["tokens"], higher_is_better=False) for p in curve]
            + [Metric(name="lr", value=p["lr"], tokens=p["tokens"]) for p in curve])


def _corpus(config: dict[str, Any]):
    return CorpusSource(**{**config, "files": tuple(config.get("files", ()))})


def _fractions(config: dict[str, Any]):
    return SplitFractions(**config)


def compute_device() -> str:
    """Where single-process stages (pruning, init, eval) compute: the job's GPU if it has one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ worker wrapper

def process_rank() -> int:
    """This process's global rank in its stage's job: RANK (torchrun, the local executor's rank groups), else
    submitit's JobEnvironment inside a submitit job, else 0."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SUBMITIT_EXECUTOR" in os.environ:
        return submitit.JobEnvironment().global_rank
    return 0


@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send this process's stdout/stderr (file descriptors 1 and 2, so C libraries too) to the stage log."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def execute_stage(run_dir: Path, stage_id: str, redirect_output: bool = True) -> bool:
    """Run a stage with its bookkeeping; True when it ran without error (rank 0: its result file was written).

    Every rank of a multi-process stage runs this; only rank 0 counts the attempt and writes the result, and the
    process group training joined is torn down before returning. Any rank that fails writes the error file.
    """
    run = RunPaths(run_dir)
    files = run.stage(stage_id)
    stage = Stage.model_validate_json(files.stage.read_bytes())
    rank = process_rank()
    if rank == 0:
        record_attempt(files)
    threads = os.environ.get("GRIDLAB_THREADS")
    redirect = _output_to(files.log) if redirect_output else contextlib.nullcontext()
    with redirect:
        print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage.kind} stage {stage_id} "
              f"(pid {os.getpid()}, rank {rank}, threads {threads or 'default'})", flush=True)
        try:
            _check_upstream(run, stage)
            if threads:
                torch.set_num_threads(int(threads))
            try:
                payload = run_stage(stage, run_dir)
            finally:
                _leave_process_group()
            if rank == 0:
                attempts = read_attempts(files)
                started = attempts.latest
                write_result(files, stage, payload, job_id=_job_id(), attempts=attempts.count, started=started,
                             resources=_resources_used(), provenance=provenance.collect())
                print(f"== done in {time.time() - started:.1f} s", flush=True)
            return True
        except Exception as error:
            lines = traceback.format_exc().splitlines()
            with contextlib.suppress(OSError):   # the log may be on the disk that is full
                print("\n".join(lines), flush=True)
            first_line = str(error).splitlines()[0] if str(error) else ""
            message = f"{type(error).__name__}: {first_line}"
            message = disk_full(run, stage.kind, error, message) or message
            try:
                atomic.write_json(files.error, {"error": message, "traceback": lines[-20:], "finished": time.time()})
            except OSError as unwritable:   # a full disk: the stage is not done, the next submit runs it again
                with contextlib.suppress(OSError):
                    print(f"could not write {files.error}: {unwritable}", flush=True)
            return False


# Free bytes under which a failure is taken for a full disk whatever the exception says (a writer that reports a short
# write, "349186 requested and 315392 written", sets no errno).
DISK_FULL_BYTES = 1 << 20


def disk_full(run: RunPaths, kind: str, error: BaseException, message: str) -> str | None:
    """The error line of a stage that failed because the disk under the run folder is full (ENOSPC anywhere in the
    exception's chain, or almost no space left): how much is free, what the stage needs by the plan's disk estimate
    (RunPaths.disk_estimate), what to do; None when the disk is not full."""
    try:
        free = shutil.disk_usage(run.root).free
    except OSError:
        return None
    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    no_space = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
    short_write = any(isinstance(e, OSError) and " requested and " in str(e) and " written" in str(e) for e in chain)
    if not (no_space or short_write or free < DISK_FULL_BYTES):
        return None
    need = (read_json(run.disk_estimate) or {}).get(kind)
    needs = (f"this {kind} stage needs about {size(need)} (the plan's disk estimate)" if isinstance(need, int)
             else f"what this {kind} stage needs is unknown before the corpus is read (its token shards take 2 "
                  f"bytes a token, 4 above a 65,536-token vocabulary)")
    return (f"the disk under {run.root} is full: {size(free)} free, {needs}; free space (`gridlab clean` removes "
            f"what the run no longer needs) and rerun with `gridlab submit --retry-failed` ({message})")


def _resources_used() -> dict[str, int]:
    """What this stage computed on, recorded beside its runtime in the result (the GPU- and CPU-hours that `gridlab
    reset` and `clean` say would be lost): its ranks, each rank's torch threads, and GPUs (one per rank when it used
    CUDA)."""
    ranks = int(os.environ.get("WORLD_SIZE") or 1)
    threads = torch.get_num_threads()
    gpus = ranks if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    return {"ranks": ranks, "threads": threads, "gpus": gpus}


def _check_upstream(run: RunPaths, stage: Stage) -> None:
    for role, dep in stage.deps.items():
        if not run.stage(dep).result.exists():
            raise UpstreamMissing(f"upstream {role} stage {dep} has no result (it failed or was cancelled)")


def _leave_process_group() -> None:
    distributed.teardown()


class UpstreamMissing(RuntimeError):
    """A stage was started before the stages it consumes finished (SLURM afterany after a failure)."""


def _job_id() -> str:
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", str(os.getpid()))


def serve(run_dir: Path) -> None:
    """Run the stage ids read from stdin one at a time, answering "done ID" or "failed ID" on stdout."""
    for line in sys.stdin:
        stage_id = line.strip()
        torch.manual_seed(0)  # a stage's numbers must not depend on what this worker ran before
        ok = execute_stage(run_dir, stage_id)
        sys.stdout.write(f"{'done' if ok else 'failed'} {stage_id}\n")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--serve":
        serve(Path(argv[1]))
        return 0
    if len(argv) != 2:
        print("usage: python -m gridlab.stages RUN_DIR STAGE_ID | --serve RUN_DIR", file=sys.stderr)
        return 2
    return 0 if execute_stage(Path(argv[0]), argv[1]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
