"""Chapter 02's checkers name the mistakes issue 24 found misdiagnosed (fed as a learner would write them)."""

from __future__ import annotations

import pytest
import torch

from tests.exercises.test_checks import _fails


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _terms(model, tokens):
    """A learner's split of the last position's logits: (direct path with b_U, the head's output times W_U)."""
    _, cache = model.run_with_cache(tokens)
    last = tokens.shape[1] - 1
    direct = (model.W_E[tokens[:, last]] + model.W_pos[last]) @ model.W_U + model.b_U
    return direct, cache["attn_out", 0][:, -1] @ model.W_U


def boosts_from_raw_logits(model, tokens):
    """Exercise 2.4 without the centring: each term's logit for the right answer, as it is."""
    answer = tokens.max(-1).values[:, None]
    return tuple(term.gather(-1, answer).mean().item() for term in _terms(model, tokens))


def boosts_raw_for_the_direct_path_only(model, tokens):
    answer = tokens.max(-1).values[:, None]
    direct, head = _terms(model, tokens)
    return (direct.gather(-1, answer).mean().item(),
            (head.gather(-1, answer).squeeze(-1) - head.mean(-1)).mean().item())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raw_uncentred_logits_are_named_as_the_central_mistake_of_logit_attribution(seed):
    torch.manual_seed(seed)
    message = _fails("logit_boosts", boosts_from_raw_logits)
    assert "This looks like the raw logit of the right answer, not centred on the term's mean logit" in message
    assert "mean logit over" in message


def test_a_half_centred_attribution_is_not_passed():
    assert "Exercise 2.4" in _fails("logit_boosts", boosts_raw_for_the_direct_path_only)
