"""The random-init twin of a pruned model: same architecture, fresh weights, and for sparse methods the same mask;
and the embeddings control, the twin given a trained model's token embeddings, final norm and lm_head."""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import torch

from gridlab.model import init_model
from gridlab.pruning.registry import PruneResult


def random_counterpart(result: PruneResult, seed: int, sparse: Literal["scaled", "dense"] = "scaled") -> PruneResult:
    """``result``'s architecture with fresh weights (gridlab.model.init_model: trunc_normal(0, 0.02)); for a sparse
    result the same mask. ``sparse="scaled"`` (the default) draws each masked row's surviving weights at std
    0.02/√(density of the row), so a unit's fan-in variance is what the dense init gives a dense layer (the same
    draw, rescaled row by row: a row of density d is the dense draw × 1/√d); ``"dense"`` keeps the dense draw,
    masked (at 80 % sparsity each unit's fan-in variance is then a fifth of the dense init's). A row the mask
    empties stays zero."""
    if sparse not in ("scaled", "dense"):
        raise ValueError(f"sparse must be 'scaled' or 'dense', got {sparse!r}")
    parent = result.model
    model = init_model(copy.deepcopy(parent.config), seed)
    device, dtype = next(parent.parameters()).device, next(parent.parameters()).dtype
    model.to(device=device, dtype=dtype)
    if result.mask is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, keep in result.mask.items():
                factor = keep.to(device=device, dtype=dtype)
                if sparse == "scaled":
                    factor = factor * row_scale(keep).to(device=device, dtype=dtype)[:, None]
                params[name].mul_(factor)
    return dataclasses.replace(result, model=model)


def row_scale(keep: torch.Tensor) -> torch.Tensor:
    """Per output row of a [out, in] mask: 1/√(density), density = kept / in (0 for an empty row)."""
    density = keep.to(torch.float64).mean(dim=1)
    return torch.where(density > 0, density.clamp(min=1e-12).rsqrt(), torch.zeros_like(density)).float()


# What the embeddings control inherits: the token embeddings, the final norm and the lm_head (one tensor when tied).
def inherited_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters a model's embeddings control takes from a trained model, by name: input embeddings, the final
    norm's weight, and the output embeddings when they are not tied to the input ones."""
    named: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        named.setdefault(id(p), name)   # tied embeddings: the input embeddings' name
    chosen = [model.get_input_embeddings().weight, model.model.norm.weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not chosen[0]:
        chosen.append(output.weight)
    return {named[id(p)]: p for p in chosen}


def inherit_embeddings(model, donor) -> list[str]:
    """Copy ``donor``'s token embeddings, final norm and lm_head into ``model`` (in place; everything else stays, a
    sparse mask too: none of these is masked). Tied embeddings are one tensor and stay tied. Returns the names
    copied; a ValueError when the shapes differ (the donor must have the model's vocabulary and hidden size)."""
    if bool(model.config.tie_word_embeddings) != bool(donor.config.tie_word_embeddings):
        raise ValueError("the model and the donor of its embeddings differ in tie_word_embeddings")
    targets, sources = inherited_parameters(model), inherited_parameters(donor)
    if set(targets) != set(sources):
        raise ValueError(f"the donor's embedding parameters ({', '.join(sources)}) are not the model's "
                         f"({', '.join(targets)})")
    with torch.no_grad():
        for name, target in targets.items():
            source = sources[name]
            if source.shape != target.shape:
                raise ValueError(f"{name}: the donor's shape {tuple(source.shape)} is not the model's "
                                 f"{tuple(target.shape)}")
            target.copy_(source.to(device=target.device, dtype=target.dtype))
    return list(targets)
