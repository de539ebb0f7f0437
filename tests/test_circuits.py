"""Circuit tools on the shipped max_of_list checkpoint: each must agree with what the model computes."""

import pytest
import torch

from utils import circuits, models


@pytest.fixture(scope="module")
def model():
    return models.load_model("max_of_list")


@pytest.fixture(scope="module")
def run(model):
    tokens = torch.randint(0, 64, (16, 6), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    return tokens, cache


def test_positional_qk_reproduces_every_cached_score(model, run):
    tokens, cache = run
    for q_pos in range(6):
        for k_pos in range(q_pos + 1):
            scores = circuits.full_qk_positional(model, q_pos, k_pos)[tokens[:, q_pos], tokens[:, k_pos]]
            cached = (cache["q", 0][:, q_pos, 0] * cache["k", 0][:, k_pos, 0]).sum(-1) / model.cfg.d_head**0.5
            torch.testing.assert_close(scores, cached, atol=1e-4, rtol=1e-4)


def test_token_qk_is_the_positional_circuit_without_positions(model):
    expected = model.W_E @ model.W_Q[0, 0] @ model.W_K[0, 0].T @ model.W_E.T / model.cfg.d_head**0.5
    torch.testing.assert_close(circuits.full_qk_tokens(model), expected, atol=1e-4, rtol=1e-4)
    unscaled = circuits.full_qk_tokens(model, scale=False)
    torch.testing.assert_close(unscaled, expected * model.cfg.d_head**0.5, atol=1e-3, rtol=1e-4)


def test_full_ov_and_direct_path_shapes_and_values(model):
    ov = circuits.full_ov(model)
    assert tuple(ov.shape) == (64, 64)
    torch.testing.assert_close(ov.AB, model.W_E @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U, atol=1e-4, rtol=1e-4)
    assert tuple(circuits.direct_path(model).shape) == (64, 64)


def test_copying_score_range_and_known_answers(model):
    assert circuits.copying_score(torch.eye(8)) == pytest.approx(1.0)
    assert circuits.copying_score(-torch.eye(8)) == pytest.approx(-1.0)
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues +-i: no copying
    assert abs(circuits.copying_score(rotation)) < 1e-6
    score = circuits.copying_score(circuits.full_ov(model))
    assert -1.0 <= score <= 1.0
    assert score > 0.9  # the max_of_list head copies the token it attends to


def test_frozen_pattern_reproduces_logits_and_makes_them_linear(model, run):
    tokens, cache = run
    pattern = cache["pattern", 0]
    torch.testing.assert_close(circuits.logits_with_frozen_pattern(model, tokens, pattern), model(tokens))
    other = tokens.roll(1, dims=0)
    # with the pattern frozen, the logits are linear in the token embeddings: the logits of a
    # 50/50 mix of two inputs' embeddings are the mean of their logits
    freeze = ("blocks.0.attn.hook_pattern", lambda _, hook: pattern)
    logits_a = model.run_with_hooks(tokens, fwd_hooks=[freeze])
    logits_b = model.run_with_hooks(other, fwd_hooks=[freeze])
    mix = 0.5 * (model.W_E[tokens] + model.W_E[other])
    logits_mix = model.run_with_hooks(tokens, fwd_hooks=[freeze, ("hook_embed", lambda _, hook: mix)])
    torch.testing.assert_close(logits_mix, 0.5 * (logits_a + logits_b), atol=1e-4, rtol=1e-4)
    # without freezing, the same mix is not linear (the pattern depends on the tokens)
    free_mix = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda _, hook: mix)])
    assert (free_mix - 0.5 * (model(tokens) + model(other))).abs().max() > 1e-2


def test_fraction_ordered_known_answers():
    assert circuits.fraction_ordered(torch.arange(5.0).repeat(3, 1)) == 1.0
    assert circuits.fraction_ordered(-torch.arange(5.0).repeat(3, 1)) == 0.0
    assert circuits.fraction_ordered(torch.zeros(2, 4)) == 0.0  # ties are not "larger"


def test_positional_qk_is_ordered_for_every_useful_pair(model):
    for q in range(1, 6):
        for k in range(q + 1):
            assert circuits.fraction_ordered(circuits.full_qk_positional(model, q, k)) == 1.0, (q, k)


def test_explorer_parses_lists_and_rejects_bad_input(model):
    from utils import widgets

    assert widgets.parse_token_list("3, 41 7", 64, 6) == [3, 41, 7]
    for bad, words in [("", "at least one"), ("1 2 3 4 5 6 7", "at most 6"), ("3, x", "whole numbers"),
                       ("64", "between 0 and 63")]:
        with pytest.raises(ValueError, match=words):
            widgets.parse_token_list(bad, 64, 6)
    box = widgets.qk_explorer(model)
    text = box.children[1]
    text.value = "1, 2, 99"  # out of range: the explorer says so instead of raising
    text.value = "5, 9"
