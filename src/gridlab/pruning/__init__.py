"""Pruning behind one API: prune(model, method, ratio, calibration, **options) -> PruneResult.

Each method family lives in its own module and registers its methods on import; every module of this package is
imported below, so adding a method is adding one file.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil

import torch

from gridlab.layerwise import layer_store
from gridlab.model import architecture_diff
from gridlab.pruning.counterpart import inherit_embeddings, random_counterpart
from gridlab.pruning.registry import (
    METHODS,
    Method,
    PruneResult,
    check_calibration,
    check_model,
    check_ratio,
    get_method,
    resolve_options,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "PruneResult", "inherit_embeddings", "prune", "pruned_config", "random_counterpart"]


def prune(model, method: str, ratio: float, calibration: torch.Tensor | None = None, **options) -> PruneResult:
    """Prune `model` to `ratio` (fraction of decoder-layer parameters removed). The input model may be consumed.

    All arguments are checked before the model is touched; bad ones raise a one-line ValueError.
    """
    spec = get_method(method)
    ratio = check_ratio(ratio)
    resolved = resolve_options(spec, options)
    check_model(model)
    if layer_store(model) is not None and not spec.layerwise:
        layerwise = ", ".join(name for name, m in METHODS.items() if m.layerwise)
        raise ValueError(f"{method} needs the whole parent in memory; methods that prune a parent layer by layer "
                         f"from disk: {layerwise}")
    if spec.needs_calibration or calibration is not None:
        calibration = check_calibration(calibration, model.config)
    expected = spec.config(copy.deepcopy(model.config), ratio, resolved)
    was_training = model.training
    model.eval()
    try:
        result = spec.run(model, ratio, calibration, resolved)
    finally:
        model.train(was_training)
    result.model.train(was_training)
    differences = architecture_diff(expected, result.model.config)
    if differences:  # a bug: every method builds its model's config through its `config` function
        raise RuntimeError(f"{method} built a model whose config is not pruned_config(parent): "
                           + "; ".join(differences))
    return result


def pruned_config(parent_config, method: str, ratio: float, **options):
    """The config of the model `method` gives at `ratio`, known before pruning: a new object, equal to the pruned
    model's config in every field (`prune` checks it). Sparse methods keep the parent's architecture. Random-init
    counterparts are built from it (`init_model(pruned_config(...), seed)`), so they are the pruned architecture
    exactly: rope parameters, eps, tying, head_dim, context, special-token ids and all."""
    spec = get_method(method)
    return spec.config(copy.deepcopy(parent_config), check_ratio(ratio), resolve_options(spec, options))
