"""A linear mixed model of the per-seed paired differences, fitted by REML, with Satterthwaite degrees of freedom.

The unit of replication is the seed. Within one family (granularity, method, setting) the paired differences
d = pruned − random of one seed are correlated across the family's cells (ratio × budget): budgets are branches of
one trunk per seed, and every arm of a seed sees the same batches. The design's model is

    d(seed, ratio, budget) = μ(ratio, budget) + a(seed) + b(seed × ratio) + c_B(seed × budget) + ε_B,

μ one fixed mean per cell, a, b, c_B, ε_B independent normal effects, the seed × budget and residual variances
differing per budget (the spread grows with the budget). Seeds are independent. The covariance of one seed's vector
over the cells is linear in the variance components θ:  Σ(θ) = Σ_k θ_k Γ_k,  Γ_k = U_k U_kᵀ  (U_k: 0/1 indicator
columns, e.g. one column of ones for the seed effect).

`layout(ratio, budget)` builds Σ over any set of cells. The report fits it one budget at a time (`budget` all 0):
within a budget the model is then compound symmetric over the ratios — a seed effect shared by the budget's cells
(a + c_B) and a cell-specific one (b + ε_B), each with its own variance per budget and family — and the seed effect
may be negative (Σ need only be positive definite), so that with complete seeds the REML estimate of each cell's
variance is the unbiased mean of the per-cell variances over the budget's ratios. Budgets fitted apart ("working
independence") lose nothing for a cell's own interval: with complete seeds a cell mean uses only its own budget's
data whatever the correlation across budgets. Fitted across budgets at once (`layout` with several budgets, all
components ≥ 0) the model ties the budgets through a and b; bench/report_coverage.py shows why the report does not:
with two seeds that model's Satterthwaite intervals cover less.

A component whose Γ_k is a linear combination of the others (one ratio: seed × ratio ≡ residual) is not identifiable
and is left out.

Fit: REML by Fisher scoring for linear covariance structures (θ ← I(θ)⁻¹ q(θ), Harville 1977), components held at
their bounds by an active set, half-steps where the iteration turns back on itself. Seeds with missing cells are
handled exactly: each seed's block of V is Σ restricted to its observed cells, and seeds are grouped by their pattern
of observed cells, so every computation is on m × m matrices (m = cells), whatever the number of seeds. The cell means
are the GLS estimates β = (Σ_s A_s)⁻¹ Σ_s A_s y_s (A_s: the inverse of the seed's block, embedded in m × m); with
every seed complete they are the plain seed means.

Degrees of freedom of each cell mean: Satterthwaite, ν = 2 Var(β_i)² / (gᵀ I⁻¹ g), g_k = ∂Var(β_i)/∂θ_k
= (C K_k C)_ii with C = Cov(β), K_k = Σ_s A_s Γ_k A_s, I the REML expected information (components at a bound
included). Everything is batched over a leading axis of rows (families × budgets, or simulation replicates) that
share one cell layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ITERATIONS = 200
TOLERANCE = 1e-7  # on θ, relative to the data's scale
RE_ENTRY_STEP = 1e-3  # a component held at 0 may come back once the others have settled to within this step
RESIDUAL_FLOOR = 1e-9  # residual variances stay ≥ this × the data's variance scale (Σ stays positive definite)


@dataclass(frozen=True)
class Layout:
    """The cells of a family (one per ratio × budget present) and the model's variance components over them."""

    ratio: np.ndarray  # (m,) ratio index of each cell
    budget: np.ndarray  # (m,) budget index of each cell
    names: list[str]  # component names, e.g. "seed", "seed × budget@2", "residual@0"
    columns: np.ndarray  # (m, Q) the indicator columns U of all components side by side
    block: np.ndarray  # (Q, K) which component each column belongs to
    residual: np.ndarray  # (K,) bool: a residual variance (must stay > 0)
    signed: np.ndarray  # (K,) bool: may be negative (Σ stays positive definite); the others stay ≥ 0

    @property
    def k(self) -> int:
        return len(self.names)

    def gamma(self) -> np.ndarray:
        """(K, m, m) the pattern matrices Γ_k = U_k U_kᵀ."""
        return np.einsum("iq,jq,qk->kij", self.columns, self.columns, self.block)


def layout(ratio: np.ndarray, budget: np.ndarray) -> Layout:
    """The model's identifiable components over cells given by their ratio and budget indices. Within a single
    budget the seed effect may be negative (a compound-symmetric covariance); across budgets every component is a
    variance (≥ 0)."""
    ratio, budget = np.asarray(ratio), np.asarray(budget)
    m = len(ratio)
    candidates: list[tuple[str, np.ndarray, bool]] = []
    for b in np.unique(budget):
        cells = np.flatnonzero(budget == b)
        candidates.append((f"residual@{b}", np.eye(m)[:, cells], True))
    candidates.append(("seed", np.ones((m, 1)), False))
    for b in np.unique(budget):
        candidates.append((f"seed × budget@{b}", (budget == b)[:, None].astype(float), False))
    candidates.append(("seed × ratio", (ratio[:, None] == np.unique(ratio)[None, :]).astype(float), False))
    kept: list[tuple[str, np.ndarray, bool]] = []
    basis = np.zeros((0, m * m))
    for name, u, is_residual in candidates:
        vec = (u @ u.T).ravel()[None, :]
        trial = np.vstack([basis, vec])
        if np.linalg.matrix_rank(trial) > basis.shape[0]:
            basis = trial
            kept.append((name, u, is_residual))
    columns = np.hstack([u for _, u, _ in kept])
    block = np.zeros((columns.shape[1], len(kept)))
    start = 0
    for k, (_, u, _) in enumerate(kept):
        block[start:start + u.shape[1], k] = 1.0
        start += u.shape[1]
    residual = np.array([r for _, _, r in kept])
    single_budget = len(np.unique(budget)) == 1
    return Layout(ratio=ratio, budget=budget, names=[n for n, _, _ in kept], columns=columns, block=block,
                  residual=residual, signed=~residual & single_budget)


@dataclass(frozen=True)
class Fit:
    """Per batch row: the cell means, their variances and Satterthwaite dof, the components, and how it went."""

    mean: np.ndarray  # (R, m) GLS cell means
    variance: np.ndarray  # (R, m) Var of each cell mean
    dof: np.ndarray  # (R, m) Satterthwaite degrees of freedom
    theta: np.ndarray  # (R, K) variance components (the data's units squared)
    marginal: np.ndarray  # (R, m) Σ_ii: the between-seed variance of one seed's difference in each cell
    converged: np.ndarray  # (R,) bool
    reml_dof: np.ndarray  # (R,) observations − cells


def _patterns(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's distinct observed-cell patterns among its seeds: (R, P, m) bool, P the most any row has (padding
    patterns observe nothing and count 0); the count of seeds of each (R, P); and each seed's pattern (R, n), −1 for
    a seed without any observed cell (it is left out). With complete seeds P = 1."""
    rows, seeds, m = mask.shape
    keyed = np.concatenate([np.repeat(np.arange(rows), seeds)[:, None], mask.reshape(-1, m)], axis=1).astype(np.int64)
    distinct, inverse = np.unique(keyed, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    first_of_row = np.searchsorted(distinct[:, 0], np.arange(rows))
    local = np.arange(len(distinct)) - first_of_row[distinct[:, 0]]
    size = int(local.max()) + 1
    patterns = np.zeros((rows, size, m), bool)
    patterns[distinct[:, 0], local] = distinct[:, 1:].astype(bool)
    which = local[inverse].reshape(rows, seeds)
    which = np.where(mask.any(axis=2), which, -1)
    counts = np.zeros((rows, size))
    np.add.at(counts, (np.repeat(np.arange(rows), seeds), which.ravel()), (which >= 0).ravel().astype(float))
    return patterns, counts, which


class _Blocks:
    """The REML quantities at θ, for every row and pattern (all on m × m matrices)."""

    def __init__(self, theta: np.ndarray, gamma: np.ndarray, patterns: np.ndarray, counts: np.ndarray):
        sigma = np.einsum("rk,kij->rij", theta, gamma)  # (R, m, m)
        observed = patterns[:, :, :, None] & patterns[:, :, None, :]  # (R, P, m, m)
        missing = np.eye(sigma.shape[-1])[None, None] * (~patterns)[:, :, None, :]
        padded = np.where(observed, sigma[:, None], 0.0) + missing  # Σ on observed cells, identity elsewhere
        inverse = np.linalg.inv(padded)
        self.a = np.where(observed, inverse, 0.0)  # (R, P, m, m): A_p, the embedded inverse of each seed block
        self.h = np.einsum("rp,rpij->rij", counts, self.a)  # Σ_s A_s
        self.c = np.linalg.inv(self.h)  # Cov(β)
        self.counts = counts


def _block_sum(matrix: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Sum the (Q, Q) entries of `matrix` (…, Q, Q) within each component pair: (…, K, K)."""
    return block.T @ matrix @ block


def _information(blocks: _Blocks, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """REML expected information I_kl = ½ tr(P G_k P G_l) (R, K, K), and (C K_k C)_ii (R, m, K)."""
    u, block, n = layout.columns, layout.block, blocks.counts
    z = np.einsum("rpij,jq->rpiq", blocks.a, u)  # A_p U
    y = np.einsum("iq,rpiw->rpqw", u, z)  # Uᵀ A_p U
    cz = np.einsum("rij,rpjq->rpiq", blocks.c, z)  # C A_p U
    x = np.einsum("rpiq,rsiw->rpsqw", z, cz)  # Uᵀ A_p C A_s U
    diag = np.arange(x.shape[1])
    x_same = x[:, diag, diag]  # (R, P, Q, Q)
    term1 = np.einsum("rp,rpkl->rkl", n, _block_sum(y * y, block))
    term2 = np.einsum("rp,rpkl->rkl", n, _block_sum(x_same * y, block))
    term4 = np.einsum("rp,rs,rpskl->rkl", n, n, _block_sum(x * x, block))
    information = 0.5 * (term1 - 2.0 * term2 + term4)
    gradient = np.einsum("rp,rpiq,qk->rik", n, cz * cz, block)
    return information, gradient


def _gls_mean(blocks: _Blocks, data: np.ndarray, which: np.ndarray) -> np.ndarray:
    """β = C Σ_s A_s y_s, summing the seeds of each pattern first. (R, m)"""
    per_pattern = np.stack([np.where((which == p)[..., None], data, 0.0).sum(axis=1)
                            for p in range(blocks.a.shape[1])], axis=1)  # (R, P, m)
    return np.einsum("rij,rpjk,rpk->ri", blocks.c, blocks.a, per_pattern)


def _seed_residuals(blocks: _Blocks, data: np.ndarray, beta: np.ndarray, which: np.ndarray) -> np.ndarray:
    """A_s (y_s − β) per seed (R, n, m); zero for a seed without observations."""
    every = np.einsum("rpij,rsj->rpsi", blocks.a, data - beta[:, None, :])  # (R, P, n, m)
    index = np.maximum(which, 0)[:, None, :, None]
    chosen = np.take_along_axis(every, np.broadcast_to(index, (every.shape[0], 1, *every.shape[2:])), axis=1)[:, 0]
    return np.where((which >= 0)[..., None], chosen, 0.0)


def _restricted_solve(information: np.ndarray, q: np.ndarray, free: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """θ solving I_ff θ_f = q_f − I_fb θ_b over the free components f of each row, the others held at their `fixed`
    values θ_b (0, or a residual's floor): the Fisher-scoring update of the model restricted to the boundary."""
    k = information.shape[-1]
    both = free[:, :, None] & free[:, None, :]
    held = np.where(free, 0.0, fixed)
    system = np.where(both, information, 0.0) + np.eye(k) * (~free)[:, None, :]
    rhs = np.where(free, q - np.einsum("rkl,rl->rk", information, held), held)
    try:
        return np.linalg.solve(system, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum("rkl,rl->rk", np.linalg.pinv(system), rhs)


def _scoring_step(theta, free, step_before, data, which, gamma, patterns, counts, layout: Layout, floor):
    """One Fisher-scoring update of θ on the boundary-restricted model: (new θ, free components, whether a component
    came back, whether one hit the boundary)."""
    blocks = _Blocks(theta, gamma, patterns, counts)
    beta = _gls_mean(blocks, data, which)
    projected = _seed_residuals(blocks, data, beta, which) @ layout.columns  # Uᵀ A_s (y_s − β)
    q = 0.5 * (projected**2).sum(axis=1) @ layout.block  # ½ (y − Xβ)ᵀ V⁻¹ G_k V⁻¹ (y − Xβ)
    information, _ = _information(blocks, layout)
    # The REML score is q − I θ (Σ_l I_kl θ_l = ½ tr(P G_k)); a component held at its bound comes back when the
    # others have settled and its score says the likelihood grows with it.
    score = q - np.einsum("rkl,rl->rk", information, theta)
    settled = (step_before < RE_ENTRY_STEP)[:, None]
    entering = settled & ~free & (score > TOLERANCE * np.abs(q).max(axis=1, keepdims=True))
    free = free | entering
    new = _restricted_solve(information, q, free, np.broadcast_to(floor, free.shape))
    below = free & (new < floor)
    free = free & ~below
    new = np.where(np.isfinite(new), np.maximum(new, floor), theta)
    return new, free, entering.any(axis=1), below.any(axis=1)


def _keep_positive_definite(theta: np.ndarray, delta: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """Halve the step of each row until Σ(θ + step) is positive definite (components may be negative: Σ is a
    covariance model, not only a sum of variances)."""
    for _ in range(30):
        sigma = np.einsum("rk,kij->rij", theta + delta, gamma)
        bad = np.linalg.eigvalsh(sigma)[:, 0] <= 1e-9 * np.abs(np.einsum("rii->ri", sigma)).max(axis=1)
        if not bad.any():
            break
        delta = np.where(bad[:, None], 0.5 * delta, delta)
    return delta


def fit(y: np.ndarray, layout: Layout) -> Fit:
    """REML fit of the model to y (R rows, n seeds, m cells; NaN where a seed has no difference in a cell). Every
    cell must be observed in at least one seed of every row."""
    y = np.asarray(y, dtype=float)
    rows, _, m = y.shape
    mask = ~np.isnan(y)
    if not mask.any(axis=1).all():
        raise ValueError("every cell needs at least one observation in every row")
    filled = np.where(mask, y, 0.0)
    seeds_per_cell = mask.sum(axis=1)  # (R, m)
    cell_mean = filled.sum(axis=1) / seeds_per_cell
    centred = np.where(mask, y - cell_mean[:, None, :], 0.0)
    reml_dof = mask.sum(axis=(1, 2)) - m
    scale = np.sqrt((centred**2).sum(axis=(1, 2)) / np.maximum(reml_dof, 1))  # (R,)
    degenerate = ~(scale > 0)
    scale = np.where(degenerate, 1.0, scale)
    data = filled / scale[:, None, None]
    patterns, counts, which = _patterns(mask)
    gamma = layout.gamma()
    k = layout.k
    theta = np.full((rows, k), 1.0 / 3.0)
    theta[:, layout.residual] = 0.5
    floor = np.where(layout.residual, RESIDUAL_FLOOR, np.where(layout.signed, -np.inf, 0.0))
    converged = degenerate.copy()  # identical differences across seeds: nothing to fit (every variance is 0)
    free = np.ones((rows, k), bool)
    step_before = np.full(rows, np.inf)
    last_delta = np.zeros((rows, k))
    for _ in range(MAX_ITERATIONS):
        at = np.flatnonzero(~converged)  # only the rows still moving are computed
        if at.size == 0:
            break
        new, free[at], entering, below = _scoring_step(theta[at], free[at], step_before[at], data[at], which[at],
                                                       gamma, patterns[at], counts[at], layout, floor)
        # Fisher scoring can oscillate between components that are hard to tell apart (the seed effect and the seed ×
        # budget effects with few seeds): where a step turns back on the previous one, take half of it.
        delta = new - theta[at]
        turning = (delta * last_delta[at]).sum(axis=1) < 0
        delta = np.where(turning[:, None], 0.5 * delta, delta)
        delta = _keep_positive_definite(theta[at], delta, gamma)
        theta[at] += delta
        last_delta[at] = delta
        step_before[at] = np.abs(delta).max(axis=1)
        converged[at] = (step_before[at] < TOLERANCE) & ~below & ~entering
    blocks = _Blocks(theta, gamma, patterns, counts)
    beta = _gls_mean(blocks, data, which)
    information, gradient = _information(blocks, layout)
    variance = np.einsum("rii->ri", blocks.c)
    spread = np.einsum("rik,rkl,ril->ri", gradient, np.linalg.pinv(information), gradient)
    with np.errstate(divide="ignore", invalid="ignore"):
        dof = np.where(spread > 0, 2 * variance**2 / spread, np.inf)
    dof = np.minimum(dof, reml_dof[:, None].astype(float))
    s2 = scale[:, None] ** 2
    marginal = np.einsum("rk,kii->ri", theta, gamma) * s2
    # Data without any spread (identical differences across seeds): every variance is 0, nothing to estimate.
    variance = np.where(degenerate[:, None], 0.0, variance * s2)
    theta = np.where(degenerate[:, None], 0.0, theta * s2[:, :1])
    marginal = np.where(degenerate[:, None], 0.0, marginal)
    beta = np.where(degenerate[:, None], cell_mean, beta * scale[:, None])
    return Fit(mean=beta, variance=variance, dof=dof, theta=theta, marginal=marginal,
               converged=converged, reml_dof=reml_dof)
