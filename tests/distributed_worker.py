"""One rank of a multi-process training run, launched by tests/test_distributed.py through torchrun or SLURM.

argv[1] is a JSON object: data (shard path), out (run folder), budgets (in steps), strategy, masked, delay (seconds
slept before each forward, so a test can kill the job mid-run) and result (where rank 0 writes the curves).
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from gridlab import distributed  # noqa: E402
from gridlab.data import TokenShard  # noqa: E402
from gridlab.train import train  # noqa: E402

from test_train import STEP, tiny_config, tiny_model  # noqa: E402


def checkerboard_mask(model) -> dict[str, torch.Tensor]:
    """Half of every decoder weight masked, in a pattern that does not line up with any row sharding."""
    mask = {}
    for name, param in model.named_parameters():
        if name.endswith("proj.weight"):
            rows, cols = torch.meshgrid(torch.arange(param.shape[0]), torch.arange(param.shape[1]), indexing="ij")
            mask[name] = (rows + cols) % 2 == 0
    return mask


def main() -> None:
    args = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    model = tiny_model()
    mask = checkerboard_mask(model) if args.get("masked") else None
    if args.get("delay"):
        forward = model.forward

        def slow_forward(*a, **k):
            time.sleep(args["delay"])
            return forward(*a, **k)

        model.forward = slow_forward
    config = tiny_config(strategy=args["strategy"])
    budgets = [steps * STEP for steps in args["budgets"]]
    result = train(model, TokenShard.open(args["data"]), config, budgets, Path(args["out"]), seed=0, mask=mask)
    topology = distributed.setup()
    if topology.is_main:
        record = {
            "world_size": topology.world_size,
            "curve": result.curve,
            "branches": [{"budget": b.budget_tokens, "path": str(b.path), "curve": b.curve} for b in result.branches],
        }
        Path(args["result"]).write_text(json.dumps(record))
    distributed.teardown()


if __name__ == "__main__":
    main()
