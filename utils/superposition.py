"""Chapter 09: bandwidth and superposition.

How many dimensions a circuit really uses (the OV circuit of max_of_list cut to its best rank r),
what a narrower residual stream costs (max_of_list at several widths), the toy models of
superposition of Elhage et al. 2022 (``ReLU(W^T W x + b)``), and how aligned activations are
with a basis (excess kurtosis along the basis against random rotations of the same space).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from utils import circuits, tasks


# --------------------------------------------------------------------- 64 tokens through 32 dimensions
def best_rank_r(matrix: Tensor, r: int) -> Tensor:
    """The best rank-`r` approximation of `matrix` (Eckart-Young: its `r` largest singular directions)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def accuracy_with_ov(model, lists: Tensor, ov: Tensor, scored: slice = slice(1, None)) -> float:
    """Running-max accuracy (on the positions `scored`: 1 on, as every position after the first is a task) of a one-layer attention-only max_of_list model whose token-to-logit
    OV circuit (`circuits.full_ov`, [vocab, vocab]) is replaced by `ov`.

    Exact: the pattern does not depend on the OV circuit, and each attended token adds its OV row to the logits
    with its attention weight, so the replacement adds pattern @ (ov - OV)[tokens] to the model's logits.
    """
    with torch.no_grad():
        logits, cache = model.run_with_cache(lists, names_filter="blocks.0.attn.hook_pattern")
        change = (ov - circuits.full_ov(model).AB)[lists]  # [batch, key, vocab]
        logits = logits + cache["blocks.0.attn.hook_pattern"][:, 0] @ change
    targets = tasks.max_of_list_targets(lists)
    return (logits.argmax(-1) == targets)[:, scored].float().mean().item()


def accuracy_with_rank_r_ov(model, lists: Tensor, r: int) -> float:
    """Accuracy of the model with its full OV circuit replaced by the best rank-`r` approximation of it."""
    return accuracy_with_ov(model, lists, best_rank_r(circuits.full_ov(model).AB.detach(), r))


def random_rank_r_ov(model, r: int, generator: torch.Generator) -> Tensor:
    """The null for a rank-`r` OV circuit: the head's own output read through a random `r`-dimensional subspace of
    the residual stream (W_E W_V W_O Q Q^T W_U for a random orthonormal Q [d_model, r])."""
    Q, _ = torch.linalg.qr(torch.randn(model.cfg.d_model, r, generator=generator))
    with torch.no_grad():
        return model.W_E @ model.OV[0, 0].AB @ Q @ Q.T @ model.W_U


def rank_for_share(singular_values: Tensor, share: float = 0.99) -> int:
    """The fewest singular directions that hold `share` of a matrix's squared norm (sum of squared singular values)."""
    energy = singular_values.pow(2).cumsum(0) / singular_values.pow(2).sum()
    return int((energy < share).sum()) + 1


# --------------------------------------------------------------------- width as a budget
def embedding_plane(W_E: Tensor) -> tuple[Tensor, float]:
    """The token embeddings [vocab, d_model] centred and projected onto their two leading principal directions:
    (coordinates [vocab, 2], the share of the centred embeddings' variance those two directions hold)."""
    centred = W_E - W_E.mean(0)
    _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ Vh[:2].T, (S[:2].pow(2).sum() / S.pow(2).sum()).item()


def angular_span(points: Tensor) -> float:
    """The angle (radians) of the smallest arc, seen from the origin, that holds every point of `points` [k, 2]."""
    angles = torch.atan2(points[:, 1], points[:, 0]).sort().values
    gaps = torch.cat([angles.diff(), (angles[0] + 2 * torch.pi - angles[-1])[None]])
    return 2 * torch.pi - gaps.max().item()


# --------------------------------------------------------------------- toy models of superposition
IMPORTANCE_DECAY = 0.9  # feature i matters IMPORTANCE_DECAY ** i as much as feature 0


def toy_model_output(W: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """The toy model's reconstruction ReLU(W^T W x + b) of features x [batch, n] through W [m, n]: [batch, n]."""
    return torch.relu(x @ W.T @ W + b)


def sparse_features(shape: tuple[int, ...], density: Tensor, generator: torch.Generator) -> Tensor:
    """Features uniform in [0, 1], each present with probability `density` (broadcast against `shape`), else 0."""
    return torch.rand(shape, generator=generator) * (torch.rand(shape, generator=generator) < density)


def train_toy_models(sparsities: list[float], n_features: int, d_hidden: int,
                     forward: Callable[[Tensor, Tensor, Tensor], Tensor] = toy_model_output, instances: int = 4,
                     steps: int = 2000, batch_size: int = 256, lr: float = 1e-2, seed: int = 0,
                     progress: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Train `instances` toy models per sparsity at once (feature i weighted IMPORTANCE_DECAY ** i in the squared
    error), with `forward(W, b, x)` as the model; keep each sparsity's instance with the lowest final loss.

    Returns W [len(sparsities), d_hidden, n_features], b [len(sparsities), n_features] and the kept losses.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    k = len(sparsities) * instances
    W = (torch.randn(k, d_hidden, n_features, generator=generator) * (2 / (d_hidden + n_features)) ** 0.5)
    W.requires_grad_(True)
    b = torch.zeros(k, n_features, requires_grad=True)
    density = (1 - torch.tensor(sparsities, dtype=torch.float32)).repeat_interleave(instances)[:, None, None]
    importance = IMPORTANCE_DECAY ** torch.arange(n_features, dtype=torch.float32)
    optimizer = torch.optim.Adam([W, b], lr=lr)
    batched = torch.vmap(forward)
    for _ in tqdm(range(steps), desc="toy models", disable=not progress, leave=False):
        x = sparse_features((k, batch_size, n_features), density, generator)
        loss = (importance * (x - batched(W, b, x)) ** 2).mean(dim=(1, 2))
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    with torch.no_grad():  # the final loss of every instance, on one large batch
        x = sparse_features((k, 4096, n_features), density, generator)
        final = (importance * (x - batched(W, b, x)) ** 2).mean(dim=(1, 2)).view(len(sparsities), instances)
    best = final.argmin(1) + instances * torch.arange(len(sparsities))
    return W.detach()[best], b.detach()[best], final.min(1).values


def feature_dimensionality(W: Tensor) -> Tensor:
    """Each feature's share of a dimension, D_i = |W_i|^2 / sum_j (W_i_hat . W_j)^2 over the columns W_j of W [m, n]:
    1 for a feature with a dimension of its own, 1/2 for one of an antipodal pair, 0 for one not represented."""
    norms = W.norm(dim=0)
    unit = W / norms.clamp_min(1e-8)
    overlaps = (unit.T @ W).pow(2).sum(1)  # sum_j (W_i_hat . W_j)^2, the j = i term included
    return norms.pow(2) / overlaps.clamp_min(1e-8)


def features_represented(W: Tensor, threshold: float = 0.5) -> int:
    """How many features have a column of W [m, n] longer than `threshold` (a represented feature's is near 1)."""
    return int((W.norm(dim=0) > threshold).sum())


# --------------------------------------------------------------------- privileged bases, measured
def excess_kurtosis(acts: Tensor) -> Tensor:
    """Excess kurtosis of each column of `acts` [samples, directions]; NaN for a column that never varies."""
    centred = acts - acts.mean(0)
    variance = centred.pow(2).mean(0)
    kurtosis = centred.pow(4).mean(0) / variance.pow(2) - 3
    return kurtosis.where(variance > 1e-12, torch.nan)


def basis_alignment(acts: Tensor) -> float:
    """How heavy-tailed activations [samples, directions] are along the basis: the median over directions of the
    excess kurtosis along each (directions that never vary left out). About 0 for Gaussian activations."""
    return excess_kurtosis(acts).nanmedian().item()


def random_rotation(d: int, generator: torch.Generator) -> Tensor:
    """A uniformly random d x d rotation (Haar measure)."""
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=generator))
    return Q * torch.sign(torch.diagonal(R))


def rotated_alignments(acts: Tensor, measure: Callable[[Tensor], float], rotations: int = 20,
                       seed: int = 0) -> list[float]:
    """`measure` of the same activations read along `rotations` random bases of their space: the null for a basis."""
    generator = torch.Generator().manual_seed(seed)
    return [measure(acts @ random_rotation(acts.shape[1], generator)) for _ in range(rotations)]
