"""tasks.last_token_ceiling (chapter 02): the best a rule seeing only the last token can do on max-of-list."""

from __future__ import annotations

import pytest
import torch

from utils import tasks


@pytest.mark.parametrize("length, vocab", [(2, 5), (3, 5), (4, 6), (3, 64)])
def test_the_ceiling_is_the_best_last_token_rule_counted_over_every_list(length, vocab):
    lists = tasks.all_lists(length, vocab)
    answers = lists.max(-1).values
    # for each last token, the rule answers the most common maximum among the lists ending in it
    right = sum(torch.bincount(answers[lists[:, -1] == t], minlength=vocab).max().item() for t in range(vocab))
    assert tasks.last_token_ceiling(length, vocab) == pytest.approx(right / len(lists), abs=1e-9)
