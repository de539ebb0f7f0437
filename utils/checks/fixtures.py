"""Inputs several chapters' checkers share: fresh and damaged models, random attention patterns."""

from __future__ import annotations

import torch
from torch import Tensor

from utils import models


def random_models() -> list:
    """Freshly initialised max_of_list (attention only) and addition (with MLP) models with non-zero biases."""
    out = []
    for name in ("max_of_list", "addition"):
        seed = int(torch.randint(0, 10_000, ()))
        state = models.build_model(name, seed=seed).state_dict()
        for key in state:
            if key.endswith("bias") and key != "unembed.bias":
                state[key] = 0.1 * torch.randn_like(state[key])
        out.append((name, models.model_from_state(dict(models.spec(name).config, seed=seed), state)))
    return out


def fresh_model(name: str):
    """A freshly initialised model for task `name` with a random seed (biases zero)."""
    return models.build_model(name, seed=int(torch.randint(0, 10_000, ())))


def noisy_model(name: str, scale: float):
    """The shipped checkpoint of task `name` with noise (`scale` times each weight's spread) on every weight."""
    return models.noised_copy(models.load_model(name), name, scale)


def noisy_addition(scale: float = 0.05):
    """The shipped addition checkpoint with noise on every weight, W_pos made large enough to matter."""
    model = noisy_model("addition", scale)
    with torch.no_grad():
        model.W_pos.mul_(5.0)
    return model


def random_causal_pattern(batch: int, heads: int, n: int) -> Tensor:
    """A random attention pattern [batch, head, query, key]: rows sum to 1, no weight on later keys."""
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return torch.randn(batch, heads, n, n).masked_fill(future, -torch.inf).softmax(-1)


def smooth_curves(n_curves: int = 6) -> Tensor:
    """Random smooth curves over 128 tokens: random walks, lightly averaged."""
    walks = torch.randn(128, n_curves).cumsum(0)
    return torch.nn.functional.avg_pool1d(walks.T[:, None], 5, 1, 2, count_include_pad=False)[:, 0].T


def changed_copy(model, task: str, key: str, change) -> object:
    """A copy of `model` (a model of `task`) with its weight `key` replaced by change(weight)."""
    state = {name: change(w) if name == key else w for name, w in model.state_dict().items()}
    return models.model_from_state(dict(models.spec(task).config), state)
