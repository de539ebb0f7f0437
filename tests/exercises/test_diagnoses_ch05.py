"""Chapter 05's checkers name the gaps issue 25 found (5.5: labels that are negative)."""

from __future__ import annotations

import pytest
import torch

from utils import checks
from utils.checks import CheckFailed


def explained_with_labels_as_indices(values, groups):
    """Right on labels 0..n, but a label is used as an index: a negative label breaks it."""
    labels, values = groups.flatten(), values.double().flatten()
    sums = torch.zeros(int(labels.max()) + 1, dtype=torch.float64).index_add_(0, labels, values)
    sizes = torch.bincount(labels).double()
    residual = values - (sums / sizes.clamp(min=1))[labels]
    return 1 - (residual.var() / values.var()).item()


def test_a_function_that_uses_labels_as_indices_fails_on_negative_labels_and_says_where():
    torch.manual_seed(0)
    with pytest.raises(CheckFailed) as failure:
        checks.check_explained_by_groups(explained_with_labels_as_indices)
    message = str(failure.value)
    assert "labels from -63 to 63" in message and "\n" not in message, message
