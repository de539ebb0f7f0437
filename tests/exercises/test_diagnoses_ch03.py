"""Chapter 03's checkers tell apart the mistakes issue 24 found confused, and refuse a tensor where a float is asked."""

from __future__ import annotations

import pytest
import torch

from tests.exercises.test_checks import _fails


def _ordered(scores, later_wins):
    """A learner's 3.4: the share of (row, b < c) pairs on which later_wins(score of c, score of b) holds."""
    n = scores.shape[-1]
    wins = later_wins(scores[:, None, :], scores[:, :, None])  # [row, b, c]
    pairs = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return wins[:, pairs].float().mean().item()


def ordered_reversed(scores):
    return _ordered(scores, lambda c, b: c < b)


def ordered_by_columns(scores):
    return _ordered(scores.T, lambda c, b: c > b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_reversed_comparison_and_the_map_read_by_columns_are_told_apart(seed):
    torch.manual_seed(seed)
    reversed_message = _fails("fraction_ordered", ordered_reversed)
    assert "This looks like the comparison reversed" in reversed_message
    assert "by columns" not in reversed_message
    columns_message = _fails("fraction_ordered", ordered_by_columns)
    assert "This looks like the map read by columns" in columns_message
    assert "reversed" not in columns_message


@pytest.mark.parametrize("as_tensor", [
    lambda ratio: ratio,  # a 0-dimensional tensor
    lambda ratio: ratio.reshape(1),  # a one-element tensor
], ids=["0-d", "1-element"])
def test_a_copying_score_returned_as_a_tensor_is_refused(as_tensor):
    def score_as_tensor(matrix):
        eig = torch.linalg.eigvals(matrix)
        return as_tensor(eig.sum().real / eig.abs().sum())

    message = _fails("copying_score", score_as_tensor)
    assert "expected a Python float, got a tensor" in message
