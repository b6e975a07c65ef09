"""Unstructured and N:M sparsity: shapes stay, pruned weights become exact zeros (Wanda, SparseGPT, magnitude).

Comparison groups (each loses exactly floor(ratio · size) weights):
  wanda     each output row of each matrix (the reference's per-output comparison)
  sparsegpt each [rows × blocksize] column block of each matrix (the reference chooses the mask per block)
  magnitude each whole matrix
  nm="N:M"  for any of them: each run of M consecutive inputs in a row loses N; the ratio is then N/M.

Only the seven projection weights are pruned, in every family (gridlab.families), as in the references (they prune
the weights of linear layers): biases (Qwen2's q/k/v biases) and norms (Qwen3's q_norm / k_norm) stay dense and
unchanged, and the mask names weights only. The ratio's base, gridlab.model.param_counts(...).decoder, counts the
projections' biases too, so a family with biases reaches r less a bias share (Qwen2.5-0.5B: 0.008% of r).
A Qwen3 o_proj reads heads × head_dim inputs, which need not equal hidden_size: N:M checks that width too.
"""

from __future__ import annotations

import copy
import math

import torch

from gridlab.errors import InvalidValue
from gridlab.layerwise import each_layer, input_hooks, run_layer, select_samples, sequential_layers
from gridlab.model import DECODER_WEIGHTS, head_dim, param_counts
from gridlab.pruning.registry import Method, PruneResult, check_nsamples, register


def parse_nm(nm) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(part) for part in str(nm).split(":"))
    except ValueError:
        raise InvalidValue("nm", f"must look like '2:4' (N of every M consecutive weights zeroed); "
                                 f"got {nm!r}") from None
    if not 1 <= n < m:
        raise InvalidValue("nm", f"{nm!r} needs 1 <= N < M (N of every M consecutive weights zeroed)")
    return n, m


def check_sparse_options(options: dict) -> None:
    nm = parse_nm(options["nm"])
    if "nsamples" in options:
        check_nsamples(options)
    if "blocksize" in options:
        blocksize = options["blocksize"]
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise InvalidValue("blocksize", f"must be a positive integer; got {blocksize!r}")
        if nm and blocksize % nm[1]:
            raise InvalidValue("blocksize", f"{blocksize} must be a multiple of M={nm[1]} for nm={options['nm']!r}")
    percdamp = options.get("percdamp", 0)
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < float("inf"):
        raise InvalidValue("percdamp", f"must be a finite non-negative number; got {percdamp!r}")


def check_nm_fits(options: dict, config) -> None:
    """N:M groups runs of M consecutive inputs of every row: every input width must divide by M."""
    nm = parse_nm(options["nm"])
    if nm is None:
        return
    widths = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
              "num_attention_heads × head_dim (o_proj's input)": config.num_attention_heads * head_dim(config)}
    for name, size in widths.items():
        if size % nm[1]:
            raise InvalidValue("nm", f"{nm[0]}:{nm[1]} needs every input width divisible by {nm[1]}; the parent's "
                                     f"{name} is {size}")


def _check_nm_fits(model, nm: tuple[int, int] | None) -> None:
    if nm is not None:
        check_nm_fits({"nm": f"{nm[0]}:{nm[1]}"}, model.config)


def _linears(layer) -> dict[str, torch.nn.Linear]:
    modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    return {name: modules[name] for name in DECODER_WEIGHTS}


def keep_mask(score: torch.Tensor, ratio: float, group: str, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """True = kept. Within each comparison group the floor(ratio · size) lowest scores go (N per M-run under N:M)."""
    rows, cols = score.shape
    mask = torch.ones_like(score, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        grouped = score.reshape(rows, cols // m, m)
        lowest = torch.topk(grouped, n, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // m, m).scatter(-1, lowest, False).reshape(rows, cols)
    if group == "row":
        k = math.floor(ratio * cols)
        if k:
            mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, False)
        return mask
    if group == "matrix":
        k = math.floor(ratio * score.numel())
        if k:
            mask.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = False
        return mask
    raise ValueError(f"unknown comparison group {group!r}")


def wanda_mask(weight: torch.Tensor, input_sq_norms: torch.Tensor, ratio: float, nm=None) -> torch.Tensor:
    """S_ij = |W_ij| · ||X_j||_2, compared within each output row."""
    score = weight.float().abs() * input_sq_norms.float().sqrt().unsqueeze(0)
    return keep_mask(score, ratio, "row", nm)


def magnitude_mask(weight: torch.Tensor, ratio: float, nm=None) -> torch.Tensor:
    return keep_mask(weight.float().abs(), ratio, "matrix", nm)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, ratio: float, nm=None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's OBS pass: returns (updated weight with exact zeros, keep mask).

    hessian is X Xᵀ up to a constant factor (the update is invariant to its scale). Inputs never seen (zero
    diagonal) are treated as dead: their weights are zeroed and H_ii set to 1. After damping by
    percdamp · mean(diag H), the upper Cholesky factor U of H⁻¹ drives the column-by-column update; the mask is
    chosen per block of `blocksize` columns by w² / U_jj² (per M-run for N:M), and each block's error is pushed
    to the later blocks in one matrix product (the reference's lazy batch update).
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = W[:, start:end].clone()
        U_block = U[start:end, start:end]
        d = torch.diag(U_block)
        block_pruned = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:
            block_pruned = ~keep_mask(block ** 2 / d.unsqueeze(0) ** 2, ratio, "matrix")
        # err_j = (w_j - q_j) / U_jj, and w_j - q_j is w_j where pruned, 0 where kept.
        error_scale = block_pruned / d.unsqueeze(0)
        errors = torch.zeros_like(block)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                run = block[:, j:j + nm[1]] ** 2 / d[j:j + nm[1]].unsqueeze(0) ** 2
                block_pruned[:, j:j + nm[1]] = ~keep_mask(run, ratio, "row", nm)
                error_scale[:, j:j + nm[1]] = block_pruned[:, j:j + nm[1]] / d[j:j + nm[1]].unsqueeze(0)
            err = block[:, j] * error_scale[:, j]
            block[:, j:].addr_(err, U_block[j, j:], alpha=-1.0)
            errors[:, j] = err
        block.masked_fill_(block_pruned, 0.0)  # column j ends as q_j; make the pruned entries exactly zero
        W[:, start:end] = block
        pruned[:, start:end] = block_pruned
        W[:, end:] -= errors @ U[start:end, end:]
    return W.to(weight.dtype), ~pruned


def _result(model, method, ratio, options, mask, nm):
    zeros = sum(int((~m).sum()) for m in mask.values())
    note = None
    if nm is not None and abs(ratio - nm[0] / nm[1]) > 1e-9:
        note = f"nm={nm[0]}:{nm[1]} fixes the ratio at {nm[0] / nm[1]:g}; the requested ratio {ratio:g} was not used"
    return PruneResult(model=model, achieved_ratio=zeros / param_counts(model).decoder, removed=None, mask=mask,
                       method=method, granularity="sparse", options=options, note=note)


def _apply(layer_index: int, name: str, linear, keep: torch.Tensor, mask: dict, new_weight=None):
    with torch.no_grad():
        if new_weight is not None:
            linear.weight.copy_(new_weight)
        linear.weight.mul_(keep.to(linear.weight.dtype))
    kind = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    mask[f"model.layers.{layer_index}.{kind}.{name}.weight"] = keep.cpu()


@torch.no_grad()
def _prune_magnitude(model, ratio, calibration, options):
    nm = parse_nm(options["nm"])
    _check_nm_fits(model, nm)
    mask: dict[str, torch.Tensor] = {}
    for i, layer in each_layer(model):
        for name, linear in _linears(layer).items():
            _apply(i, name, linear, magnitude_mask(linear.weight, ratio, nm), mask)
    return _result(model, "magnitude", ratio, options, mask, nm)


@torch.no_grad()
def _prune_wanda(model, ratio, calibration, options):
    nm = parse_nm(options["nm"])
    _check_nm_fits(model, nm)
    mask: dict[str, torch.Tensor] = {}
    calibration = select_samples(calibration, options["nsamples"])
    for i, layer, inputs in sequential_layers(model, calibration, options["batch_size"]):
        linears = _linears(layer)
        sq_norms: dict[str, torch.Tensor] = {}

        def collect(name, x, sq_norms=sq_norms):
            s = x.float().reshape(-1, x.shape[-1]).pow(2).sum(dim=0)
            sq_norms[name] = sq_norms[name] + s if name in sq_norms else s

        with input_hooks(linears, collect):
            run_layer(layer, inputs)
        for name, linear in linears.items():
            _apply(i, name, linear, wanda_mask(linear.weight, sq_norms[name], ratio, nm), mask)
    return _result(model, "wanda", ratio, options, mask, nm)


@torch.no_grad()
def _prune_sparsegpt(model, ratio, calibration, options):
    nm = parse_nm(options["nm"])
    _check_nm_fits(model, nm)
    mask: dict[str, torch.Tensor] = {}
    calibration = select_samples(calibration, options["nsamples"])
    for i, layer, inputs in sequential_layers(model, calibration, options["batch_size"]):
        linears = _linears(layer)
        hessians: dict[str, torch.Tensor] = {}
        tokens: dict[str, int] = {}

        def collect(name, x, hessians=hessians, tokens=tokens):
            x = x.float().reshape(-1, x.shape[-1])
            h = x.T @ x
            hessians[name] = hessians[name] + h if name in hessians else h
            tokens[name] = tokens.get(name, 0) + x.shape[0]

        with input_hooks(linears, collect):
            run_layer(layer, inputs)
        for name, linear in linears.items():
            hessian = hessians.pop(name) * (2.0 / tokens[name])
            new_weight, keep = sparsegpt_prune(linear.weight, hessian, ratio, nm, options["blocksize"],
                                               options["percdamp"])
            _apply(i, name, linear, keep, mask, new_weight)
    return _result(model, "sparsegpt", ratio, options, mask, nm)


def _no_config_change(parent_config, ratio, options):
    return copy.deepcopy(parent_config)  # shapes stay; the pruned model keeps its parent's config


register(Method(name="magnitude", granularity="sparse", run=_prune_magnitude, config=_no_config_change,
                defaults=dict(nm=None), needs_calibration=False, check_options=check_sparse_options,
                check_shapes=check_nm_fits, layerwise=True))
register(Method(name="wanda", granularity="sparse", run=_prune_wanda, config=_no_config_change,
                defaults=dict(nm=None, nsamples=128, batch_size=8), check_options=check_sparse_options,
                check_shapes=check_nm_fits, layerwise=True))
register(Method(name="sparsegpt", granularity="sparse", run=_prune_sparsegpt, config=_no_config_change,
                defaults=dict(nm=None, nsamples=128, batch_size=8, blocksize=128, percdamp=0.01),
                check_options=check_sparse_options, check_shapes=check_nm_fits, layerwise=True))
