"""The random-init twin of a pruned model: same architecture, fresh weights, and for sparse methods the same mask."""

from __future__ import annotations

import copy
import dataclasses

import torch

from gridlab.model import init_model
from gridlab.pruning.registry import PruneResult


def random_counterpart(result: PruneResult, seed: int) -> PruneResult:
    parent = result.model
    model = init_model(copy.deepcopy(parent.config), seed)
    device, dtype = next(parent.parameters()).device, next(parent.parameters()).dtype
    model.to(device=device, dtype=dtype)
    if result.mask is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, keep in result.mask.items():
                params[name].mul_(keep.to(device=device, dtype=dtype))
    return dataclasses.replace(result, model=model)
