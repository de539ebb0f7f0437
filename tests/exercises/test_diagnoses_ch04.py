"""Chapter 04's checkers name the mistakes issue 24 found them missing or misreading."""

from __future__ import annotations

import pytest
import torch

from utils import checks
from utils.checks import CheckFailed
from utils.checks import ch04

from tests.exercises.test_checks import circuits


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _message(check, fn) -> str:
    with pytest.raises(CheckFailed) as failure:
        check(fn)
    message = str(failure.value)
    assert "\n" not in message and len(message) < 700, message
    return message


def test_the_right_nine_terms_in_another_order_are_told_so():
    def reversed_terms(model, q, k):
        return dict(reversed(list(circuits.qk_score_terms(model, q, k).items())))

    message = _message(checks.check_qk_terms, reversed_terms)
    assert "same keys in another order" in message and "['pos·pos', 'pos·token'" in message, message


def test_the_population_standard_deviation_is_named():
    def population_spread(model, q, k):
        return {name: (circuits.fraction_ordered(term), term.std(-1, correction=0).mean().item())
                for name, term in circuits.qk_score_terms(model, q, k).items()}

    message = _message(checks.check_ordering_by_term, population_spread)
    assert "This looks like the population standard deviation" in message, message


def test_exercise_4_3_says_which_standard_deviation_it_wants():
    from tests.exercises.test_exercises import _exercise_cells

    statement = _exercise_cells(4)["4.3"][0].split("<details>")[0]
    assert "sample standard deviation" in statement, statement


def test_the_clip_at_zero_matters_on_a_case_and_leaving_it_out_is_named():
    def unclipped(model):
        lead, direct = circuits.worst_ov_lead(circuits.ov_logit_table(model)), circuits.worst_direct_lead(model)
        shares = circuits.shares_needed(lead, direct).max(-1).values
        tokens = torch.arange(shares.shape[0])
        return shares.masked_fill(tokens[None, :] >= tokens[:, None], float("inf"))

    [case] = [args for where, args in ch04._need_cases() if "token 62" in where]
    assert unclipped(*case)[63, 62] < 0 and circuits.attention_needed(*case)[63, 62] == 0
    message = _message(checks.check_attention_needed, unclipped)
    assert "This looks like the need not clipped at 0" in message, message
