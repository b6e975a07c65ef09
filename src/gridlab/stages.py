"""The worker side: run one stage over plain data and leave its result file.

``run_stage(stage, run_dir)`` computes a stage's payload from its config and the result files of the stages it
depends on; ``execute_stage`` wraps it with the bookkeeping every executor shares (attempt count, log file, error
file, result file written last and atomically). Workers never open the DuckDB file.

    python -m gridlab.stages RUN_DIR STAGE_ID      # run one stage
    python -m gridlab.stages --serve RUN_DIR       # a local worker: stage ids on stdin, "done|failed ID" on stdout
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gridlab import store

# An extra evaluation corpus is held out entirely: nearly all of its documents land in its validation split.
_EVAL_CORPUS_FRACTIONS = dict(pretrain=0.01, retrain=0.01, calibration=0.01, validation=0.97)


def stage_dir(run_dir: Path, stage_id: str) -> Path:
    return Path(run_dir) / "stages" / stage_id


def upstream(run_dir: Path, stage: dict[str, Any], role: str) -> dict[str, Any]:
    dep = stage["deps"][role]
    return store.read_result(stage_dir(run_dir, dep), dep)["payload"]


def run_stage(stage: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Compute one stage; outputs go under runs/<grid>/stages/<id>/ and the payload describes them."""
    run_dir = Path(run_dir)
    out = stage_dir(run_dir, stage["id"])
    return _RUNNERS[stage["kind"]](stage["config"], stage, run_dir, out)


def _run_data(config, stage, run_dir, out) -> dict[str, Any]:
    from gridlab.data import build_shards, load_tokenizer, shard_manifest, train_tokenizer

    source = _corpus(config["corpus"])
    fractions = _fractions(config["splits"])
    tokenizer_config = config["tokenizer"]
    if tokenizer_config["vocab_size"] is not None:
        tokenizer_dir = out / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").exists():
            train_tokenizer(source, fractions, tokenizer_config["vocab_size"], tokenizer_dir)
    else:
        tokenizer_dir = Path(tokenizer_config["path"])
    shards = build_shards(source, tokenizer_dir, fractions, config["seq_len"], out / "shards")
    manifest = shard_manifest(shards["pretrain"])
    return {"tokenizer_dir": str(tokenizer_dir), "shards": {split: str(path) for split, path in shards.items()},
            "vocab_size": len(load_tokenizer(tokenizer_dir)), "corpus_fingerprint": manifest["corpus_fingerprint"],
            "manifest": manifest}


def _run_parent(config, stage, run_dir, out) -> dict[str, Any]:
    from gridlab.data import TokenShard
    from gridlab.model import init_model, load_model, make_config, param_counts
    from gridlab.train import train

    data = upstream(run_dir, stage, "data")
    if "preset" in config:
        model = init_model(make_config(config["preset"], config["vocab_size"], config["seq_len"],
                                       **config["overrides"]), config["seed"])
        result = train(model, TokenShard.open(data["shards"]["pretrain"]),
                       _train_config(config["schedule"], config["seq_len"], config["seed"]),
                       [config["tokens"]], out / "train")
        if process_rank() != 0:
            return {}
        branch = result.branches[0]
        model_path, curve, trained = str(branch.path), branch.curve, branch.trained_tokens
        model, _ = load_model(model_path)  # the plain trained model, whatever sharding train() left on `model`
    else:
        model_path, curve, trained = config["path"], [], config["tokens"]
        if "declared" in config:  # the architecture the plan built the random-init models from
            from transformers import AutoConfig

            from gridlab.model import check_declared_architecture

            check_declared_architecture(config["declared"], AutoConfig.from_pretrained(model_path), model_path)
        model, _ = load_model(model_path)
    model.to(compute_device())
    return {"model_path": model_path, "trained_tokens": trained, "curve": curve,
            "params": param_counts(model).__dict__, **_validation(model, data, config["validation_sequences"])}


def _run_prune(config, stage, run_dir, out) -> dict[str, Any]:
    import torch

    from gridlab.data import TokenShard
    from gridlab.model import load_model, param_counts, save_model
    from gridlab.pruning import get_method, prune
    from gridlab.pruning.offload import open_layerwise, save_layerwise

    data = upstream(run_dir, stage, "data")
    parent = upstream(run_dir, stage, "parent")
    device = compute_device()
    layerwise = config["layerwise"] and get_method(config["method"]).layerwise
    spill_dir = out / "layer-spill"
    if layerwise:
        model = open_layerwise(parent["model_path"], device, spill_dir)
    else:
        model = load_model(parent["model_path"])[0].to(device)
    calibration_shard = TokenShard.open(data["shards"]["calibration"])
    count = min(config["calibration_sequences"], calibration_shard.n_sequences)
    # Each seed calibrates on its own sample of the calibration split, so seeds replicate pruning too.
    sample = torch.randperm(calibration_shard.n_sequences, generator=torch.Generator().manual_seed(config["seed"]))
    calibration = calibration_shard[sorted(sample[:count].tolist())]
    result = prune(model, config["method"], config["ratio"], calibration, **config["options"])
    validation = _validation(result.model, data, config["validation_sequences"])
    if layerwise:
        model_path = save_layerwise(result.model, out / "model", mask=result.mask)
        shutil.rmtree(spill_dir)
    else:
        model_path = save_model(result.model, out / "model", mask=result.mask, tokenizer=data["tokenizer_dir"])
    return {"model_path": str(model_path), "achieved_ratio": result.achieved_ratio,
            "granularity": result.granularity, "removed": result.removed if result.granularity == "depth" else None,
            "note": result.note, "calibration_sequences": count, "layerwise": layerwise,
            "params": param_counts(result.model).__dict__, **validation}


def _run_init(config, stage, run_dir, out) -> dict[str, Any]:
    from gridlab.model import init_model, load_model, param_counts, save_model
    from gridlab.pruning import PruneResult, random_counterpart

    data = upstream(run_dir, stage, "data")
    if "architecture" in config:
        from transformers import LlamaConfig

        model, mask = init_model(LlamaConfig.from_dict(config["architecture"]), config["seed"]), None
    else:
        pruned = upstream(run_dir, stage, "model")
        pruned_model, mask = load_model(pruned["model_path"])
        result = PruneResult(model=pruned_model, achieved_ratio=pruned["achieved_ratio"], removed=None, mask=mask,
                             method="", granularity=pruned["granularity"], options={})
        model = random_counterpart(result, config["seed"]).model
    model_path = save_model(model, out / "model", mask=mask, tokenizer=data["tokenizer_dir"])
    model.to(compute_device())
    return {"model_path": str(model_path), "params": param_counts(model).__dict__,
            **_validation(model, data, config["validation_sequences"])}


def _run_train(config, stage, run_dir, out) -> dict[str, Any]:
    from gridlab.data import TokenShard
    from gridlab.model import load_model
    from gridlab.train import train

    data = upstream(run_dir, stage, "data")
    start = upstream(run_dir, stage, "model")
    model, mask = load_model(start["model_path"])
    result = train(model, TokenShard.open(data["shards"]["retrain"]),
                   _train_config(config["schedule"], config["seq_len"], config["seed"]),
                   config["budgets"], out / "train", mask=mask)
    if process_rank() != 0:
        return {}
    return {"branches": [{"budget_tokens": b.budget_tokens, "trained_tokens": b.trained_tokens, "path": str(b.path),
                          "curve": b.curve} for b in result.branches], "curve": result.curve}


def _run_eval(config, stage, run_dir, out) -> dict[str, Any]:
    from gridlab.data import TokenShard, build_shards, load_tokenizer
    from gridlab.evaluate import heldout_loss, lm_eval_tasks
    from gridlab.model import load_model

    data = upstream(run_dir, stage, "data")
    trained = upstream(run_dir, stage, "train")
    evaluation = config["evaluation"]
    extra = {}
    for corpus in evaluation["corpora"]:
        source = _corpus({key: value for key, value in corpus.items() if key != "label"})
        shards = build_shards(source, data["tokenizer_dir"], _fractions({**_EVAL_CORPUS_FRACTIONS, "seed": 0}),
                              TokenShard.open(data["shards"]["validation"]).seq_len, run_dir / "cache" / "eval")
        extra[corpus["label"]] = TokenShard.open(shards["validation"])
    tokenizer = load_tokenizer(data["tokenizer_dir"]) if evaluation["lm_eval_tasks"] else None
    branches = []
    for branch in trained["branches"]:
        model = load_model(branch["path"])[0].to(compute_device())  # lm-eval runs on the model's device too
        held_out = _validation(model, data, evaluation["max_sequences"])
        metrics = [{"name": "val_loss", "value": held_out["val_loss"], "higher_is_better": False},
                   {"name": "val_ppl", "value": held_out["val_ppl"], "higher_is_better": False}]
        for label, shard in extra.items():
            loss = heldout_loss(model, shard, max_sequences=evaluation["max_sequences"])
            metrics.append({"name": f"eval/{label}/loss", "value": loss["loss"], "higher_is_better": False})
        if evaluation["lm_eval_tasks"]:
            for record in lm_eval_tasks(model, tokenizer, evaluation["lm_eval_tasks"], limit=evaluation["limit"],
                                        num_fewshot=evaluation["num_fewshot"]):
                name = record["name"] if record["name"].startswith("lm_eval/") else f"lm_eval/{record['name']}"
                metrics.append({"name": name, "value": record["value"], "stderr": record.get("stderr"),
                                "higher_is_better": record["higher_is_better"]})
        branches.append({"budget_tokens": branch["budget_tokens"], "trained_tokens": branch["trained_tokens"],
                         "path": branch["path"], "metrics": metrics})
    return {"branches": branches}


_RUNNERS = {"data": _run_data, "parent": _run_parent, "prune": _run_prune, "init": _run_init, "train": _run_train,
            "eval": _run_eval}


def _corpus(config: dict[str, Any]):
    from gridlab.data import CorpusSource

    return CorpusSource(**{**config, "files": tuple(config.get("files", ()))})


def _fractions(config: dict[str, Any]):
    from gridlab.data import SplitFractions

    return SplitFractions(**config)


def _train_config(schedule: dict[str, Any], seq_len: int, seed: int):
    from gridlab.train import TrainConfig

    fields = {key: value for key, value in schedule.items() if key != "kind"}
    return TrainConfig(schedule=schedule["kind"], seq_len=seq_len, seed=seed, **fields)


def compute_device() -> str:
    """Where single-process stages (parent validation, pruning, init, eval) compute: the job's GPU if it has one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _validation(model, data: dict[str, Any], max_sequences: int | None) -> dict[str, float]:
    from gridlab.data import TokenShard
    from gridlab.evaluate import heldout_loss

    result = heldout_loss(model, TokenShard.open(data["shards"]["validation"]), max_sequences=max_sequences)
    return {"val_loss": result["loss"], "val_ppl": result["ppl"]}


# ------------------------------------------------------------------------------------------------ worker wrapper

def process_rank() -> int:
    """This process's global rank in its stage's job: RANK (torchrun, the local executor's rank groups), else
    submitit's JobEnvironment inside a submitit job, else 0."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SUBMITIT_EXECUTOR" in os.environ:
        import submitit

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
    run_dir = Path(run_dir)
    folder = stage_dir(run_dir, stage_id)
    stage = json.loads((folder / store.STAGE).read_text())
    rank = process_rank()
    if rank == 0:
        with open(folder / store.ATTEMPTS, "a") as attempts:
            attempts.write(f"{time.time()}\n")
    threads = os.environ.get("GRIDLAB_THREADS")
    redirect = _output_to(folder / store.LOG) if redirect_output else contextlib.nullcontext()
    with redirect:
        print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage['kind']} stage {stage_id} "
              f"(pid {os.getpid()}, rank {rank}, threads {threads or 'default'})", flush=True)
        try:
            _check_upstream(run_dir, stage)
            if threads:
                import torch

                torch.set_num_threads(int(threads))
            try:
                payload = run_stage(stage, run_dir)
            finally:
                _leave_process_group()
            if rank == 0:
                store.write_result(folder, stage, payload, job_id=_job_id(), attempts=_attempts(folder),
                                   started=_started(folder))
                print(f"== done in {time.time() - _started(folder):.1f} s", flush=True)
            return True
        except Exception as error:
            lines = traceback.format_exc().splitlines()
            print("\n".join(lines), flush=True)
            first_line = str(error).splitlines()[0] if str(error) else ""
            store.write_json_atomic(folder / store.ERROR, {
                "error": f"{type(error).__name__}: {first_line}", "traceback": lines[-20:],
                "finished": time.time()})
            return False


def _check_upstream(run_dir: Path, stage: dict[str, Any]) -> None:
    for role, dep in stage["deps"].items():
        if not (stage_dir(run_dir, dep) / store.RESULT).exists():
            raise UpstreamMissing(f"upstream {role} stage {dep} has no result (it failed or was cancelled)")


def _leave_process_group() -> None:
    if "torch" in sys.modules:
        from gridlab import distributed

        distributed.teardown()


class UpstreamMissing(RuntimeError):
    """A stage was started before the stages it consumes finished (SLURM afterany after a failure)."""


def _started(folder: Path) -> float:
    return float((folder / store.ATTEMPTS).read_text().split()[-1])


def _attempts(folder: Path) -> int:
    return len((folder / store.ATTEMPTS).read_text().split())


def _job_id() -> str:
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", str(os.getpid()))


def serve(run_dir: Path) -> None:
    """Run the stage ids read from stdin one at a time, answering "done ID" or "failed ID" on stdout."""
    import torch

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
