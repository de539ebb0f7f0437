"""Chapter 06's tools: the attention ablation, the answer agreement and the neuron matching (utils/circuits.py),
and the same-spectrum null (utils/fourier.py)."""

import math

import pytest
import torch

from utils import circuits, fourier, models, tasks


pytestmark = pytest.mark.usefixtures("reading_only")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def fibonacci():
    tokens, targets = tasks.fibonacci_sequences()
    pick = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))  # not only the pairs starting at 0
    return models.load_model("fibonacci"), tokens[pick], targets[pick]


# ------------------------------------------------------------------ accuracy_with_keys_dropped
def test_dropping_nothing_is_the_model_itself(fibonacci):
    model, tokens, targets = fibonacci
    measured = circuits.accuracy_with_keys_dropped(model, tokens[:500], targets[:500], [])
    expected = models.accuracy_by_position(model, tokens[:500], targets[:500])
    assert list(measured) == list(expected)
    assert all(measured[q][0] == pytest.approx(expected[q]) for q in expected)


def test_dropping_the_previous_key_breaks_the_model(fibonacci):
    model, tokens, targets = fibonacci
    measured = circuits.accuracy_with_keys_dropped(model, tokens[:500], targets[:500], [1])
    assert all(acc < 0.2 and loss > 5 for acc, loss in measured.values())


def test_the_hook_is_gone_after_the_measurement(fibonacci):
    model, tokens, targets = fibonacci
    before = model(tokens[:8])
    circuits.accuracy_with_keys_dropped(model, tokens[:8], targets[:8], [0, 1])
    assert model(tokens[:8]).equal(before)


def test_dropping_the_earlier_keys_changes_nothing_at_position_1(fibonacci):
    model, tokens, targets = fibonacci
    clean = circuits.accuracy_with_keys_dropped(model, tokens[:300], targets[:300], [])
    operands = circuits.accuracy_with_keys_dropped(model, tokens[:300], targets[:300], [2, 3, 4])
    assert operands[1] == pytest.approx(clean[1]) and operands[4] != pytest.approx(clean[4])


def test_positions_without_targets_are_left_out(fibonacci):
    model, tokens, targets = fibonacci
    measured = circuits.accuracy_with_keys_dropped(model, tokens[:50], targets[:50], [2, 3, 4])
    assert 0 not in measured and set(measured) <= {1, 2, 3, 4}


# ------------------------------------------------------------------ answer_agreement
def test_a_model_agrees_with_itself_and_not_with_a_fresh_one(fibonacci):
    model = fibonacci[0]
    pairs = tasks.addition_pairs()[0][:1000]
    assert circuits.answer_agreement(model, model, pairs) == 1.0
    assert circuits.answer_agreement(model, models.build_model("addition", seed=3), pairs) < 0.2


# ------------------------------------------------------------------ best_match
def test_best_match_finds_a_flipped_shifted_copy():
    curves = torch.randn(60, 5)
    others = torch.cat([torch.randn(60, 7), -3 * curves[:, [2]] + 10], 1)
    matched = circuits.best_match(curves, others)
    assert matched.shape == (5,)
    assert matched[2] == pytest.approx(1.0, abs=1e-5) and (matched[[0, 1, 3, 4]] < 0.6).all()


# ------------------------------------------------------------------ phase_shifted
def test_phase_shift_keeps_the_power_and_the_mean():
    curves = torch.randn(96, 4).cumsum(0).double()
    shifted = fourier.phase_shifted(curves, 2 * math.pi * torch.rand(49, 4))
    assert fourier.frequency_power(shifted).allclose(fourier.frequency_power(curves), rtol=1e-6)
    assert shifted.mean(0).allclose(curves.mean(0)) and not shifted.allclose(curves, atol=1e-2)


def test_zero_phases_give_the_curves_back_also_for_odd_lengths():
    curves = torch.randn(95, 3).double()
    assert fourier.phase_shifted(curves, torch.zeros(48, 3)).allclose(curves)


def test_a_half_turn_at_every_frequency_turns_the_curve_upside_down_about_its_mean():
    t = torch.arange(128, dtype=torch.float64)
    wave = 2.0 + torch.cos(2 * math.pi * 3 * t / 128)[:, None]
    flipped = fourier.phase_shifted(wave, torch.full((65, 1), math.pi))
    assert flipped.allclose(4.0 - wave, atol=1e-9)
