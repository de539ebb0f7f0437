"""Chapter 01's new exercise (1.7, equal-sum weights): a learner's own wrong versions get the right diagnosis."""

from __future__ import annotations

import pytest
import torch

from utils import checks
from utils.checks import CheckFailed


def _inverse_count(pairs):
    sums = pairs.sum(-1)
    return 1.0 / torch.bincount(sums)[sums].float()


def right(pairs):
    weights = _inverse_count(pairs)
    return weights / weights.sum()


def by_count(pairs):
    weights = 1.0 / _inverse_count(pairs)
    return weights / weights.sum()


def unscaled(pairs):
    return _inverse_count(pairs)


def full_set_counts(pairs):
    weights = 1.0 / (pairs.sum(-1).float() + 1)
    return weights / weights.sum()


def uniform(pairs):
    return torch.ones(len(pairs)) / len(pairs)


def per_sum(pairs):
    counts = torch.bincount(pairs.sum(-1)).float()
    return (counts > 0).float() / (counts > 0).sum()


def test_a_float32_answer_written_by_hand_passes():
    assert checks.check_equal_sum_weights(right) is right


@pytest.mark.parametrize("fn, named", [
    (by_count, "proportional to how many pairs share the sum"),
    (unscaled, "not scaled to add up to 1"),
    (full_set_counts, "s + 1 pairs assumed"),
    (uniform, "the same weight for every pair"),
    (per_sum, "one weight per sum, not one per pair"),
])
def test_each_wrong_weighting_is_named(fn, named):
    with pytest.raises(CheckFailed) as failure:
        checks.check_equal_sum_weights(fn)
    message = str(failure.value)
    assert named in message and "\n" not in message, message
