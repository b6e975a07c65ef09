"""Is the micro parent capacity-limited? Its architecture and a half-depth one, trained from scratch on the same tokens.

    python bench/micro_capacity.py [--run-dir runs/study] [--budgets 100k 200k 400k 800k 1.6M]

Setting 2 gives a random-init model the whole pipeline's tokens (P + B). A pruned model can only win there if the
parent knows more than the small architecture can learn from P tokens, i.e. if the parent is limited by its
capacity rather than by its data. This trains the default grid's parent architecture (pico, 12 layers) and the same
model with 6 layers (the depth-0.5 architecture) from scratch with the grid's parent schedule, one WSD trajectory
each with a branch per budget, and prints the validation loss of both at each budget and the difference
(baseline: the 12-layer model). While the difference is ≤ 0 the small model learns at least as much per token and
the micro scale is data-limited. Uses the shards of a finished default run (`gridlab submit grid.toml`); the two
trainings run in parallel processes, one thread each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from gridlab.config import Schedule  # noqa: E402
from gridlab.data import TokenShard  # noqa: E402
from gridlab.evaluate import heldout_loss  # noqa: E402
from gridlab.model import init_model, load_model, make_config  # noqa: E402
from gridlab.spec import EvaluationSpec, load_grid, parse_tokens  # noqa: E402
from gridlab.train import train  # noqa: E402


def data_stage_result(run_dir: Path) -> dict:
    for stage_file in run_dir.glob("stages/*/stage.json"):
        if json.loads(stage_file.read_text())["kind"] == "data":
            return json.loads((stage_file.parent / "result.json").read_text())["payload"]
    raise SystemExit(f"no finished data stage under {run_dir}; run `gridlab submit grid.toml` first")


def train_and_score(args) -> list[float]:
    layers, architecture, shards, schedule, budgets, out_dir, validation_sequences = args
    torch.set_num_threads(1)
    pretrain = TokenShard.open(Path(shards["pretrain"]))
    validation = TokenShard.open(Path(shards["validation"]))
    model = init_model(make_config(**architecture, seq_len=pretrain.seq_len, num_hidden_layers=layers), seed=0)
    result = train(model, pretrain, Schedule.model_validate(schedule), budgets, out_dir / f"{layers}", seed=0)
    return [heldout_loss(load_model(branch.path)[0], validation, validation_sequences,
                         EvaluationSpec().windows_per_document).loss for branch in result.branches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=Path("grid.toml"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/study"))
    parser.add_argument("--budgets", nargs="+", default=["100k", "200k", "400k", "800k", "1.6M"])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gridlab-micro-capacity"))
    args = parser.parse_args()

    spec = load_grid(args.grid)
    schedule = {**spec.parent.schedule.model_dump(), "checkpoint_every_tokens": 10**12}
    budgets = sorted(parse_tokens(b) for b in args.budgets)
    data = data_stage_result(args.run_dir)
    architecture = dict(preset=spec.parent.preset, vocab_size=data["vocab_size"], **spec.parent.overrides)
    layers = make_config(**architecture, seq_len=spec.seq_len).num_hidden_layers
    jobs = [(n, architecture, data["shards"], schedule, budgets, args.work_dir, spec.evaluation.max_sequences)
            for n in (layers, layers // 2)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        deep, shallow = pool.map(train_and_score, jobs)
    print(f"{'tokens':>10} {f'{layers} layers':>10} {f'{layers // 2} layers':>10} {'difference':>10}")
    for budget, loss_deep, loss_shallow in zip(budgets, deep, shallow):
        print(f"{budget:>10,} {loss_deep:>10.3f} {loss_shallow:>10.3f} {loss_shallow - loss_deep:>+10.3f}")


if __name__ == "__main__":
    main()
