"""Chapter 05's smooth non-periodic nulls and per-neuron tests (utils/fourier.py), and its ablation (utils/circuits.py)."""

import math

import pytest
import torch

from utils import circuits, fourier, models, tasks

N = 128
T = torch.arange(N, dtype=torch.float64)


def wave(f: int, phase: float = 0.0, n: int = N, period: int = N) -> torch.Tensor:
    return torch.cos(2 * math.pi * f * torch.arange(n, dtype=torch.float64) / period + phase)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ the nulls' spectra
def test_a_ramp_puts_most_of_its_power_in_the_lowest_frequencies():
    assert fourier.low_frequency_share(fourier.ramp(N)[:, None], [1, 2, 3, 4]).item() == pytest.approx(0.866, abs=1e-3)


@pytest.mark.parametrize("kink", [16, 32, 64])
def test_relu_ramps_do_too(kink):
    curve = fourier.relu_ramp(N, kink)
    assert curve[:kink + 1].abs().max() == 0 and curve[-1] == N - 1 - kink
    assert fourier.low_frequency_share(curve[:, None], [1, 2, 3, 4]).item() > 0.85


def test_low_frequency_share_of_a_pure_wave():
    curves = torch.stack([wave(3), wave(20)], dim=1)
    assert fourier.low_frequency_share(curves, [3]).tolist() == pytest.approx([1.0, 0.0], abs=1e-9)


# ------------------------------------------------------------------ monotone fits
def test_isotonic_fit_is_monotone_keeps_the_mean_and_leaves_a_monotone_curve_alone():
    noisy = (T / 10 + torch.randn(N)).float()[:, None]
    fit = fourier.isotonic_fit(noisy, increasing=True)
    assert (fit[1:] >= fit[:-1] - 1e-6).all()
    assert fit.mean().item() == pytest.approx(noisy.mean().item(), abs=1e-4)
    assert torch.allclose(fourier.isotonic_fit(fit, increasing=True), fit)


def test_isotonic_fit_pools_violators_into_their_mean():
    fit = fourier.isotonic_fit(torch.tensor([[1.0], [3.0], [2.0], [4.0]]), increasing=True)
    assert fit.flatten().tolist() == pytest.approx([1.0, 2.5, 2.5, 4.0])


def test_isotonic_fit_is_the_least_squares_monotone_curve():
    """No other increasing curve tried (random monotone perturbations) comes closer."""
    y = torch.randn(20, 1, dtype=torch.float64)
    fit = fourier.isotonic_fit(y, increasing=True)
    best = ((y - fit) ** 2).sum()
    for _ in range(200):
        other = (fit + 0.05 * torch.randn_like(fit)).cummax(0).values
        assert ((y - other) ** 2).sum() >= best - 1e-12


def test_monotone_fit_chooses_the_direction_that_fits():
    curves = torch.stack([T, -T, (T - 64) ** 2], dim=1)
    fit = fourier.monotone_fit(curves)
    assert torch.allclose(fit[:, :2], curves[:, :2])
    residual = fourier.monotone_residual(curves)
    assert residual[:2].tolist() == pytest.approx([0.0, 0.0], abs=1e-12) and residual[2] > 0.3


def test_shares_against_monotone_agree_on_a_monotone_map_and_differ_on_waves():
    neurons, null = fourier.shares_against_monotone(torch.stack([T, T ** 0.5], dim=1), [1, 2])
    assert neurons == pytest.approx(null)
    neurons, null = fourier.shares_against_monotone(torch.stack([wave(3), wave(4)], dim=1), [3, 4])
    assert neurons == pytest.approx(1.0) and null < 0.5


# ------------------------------------------------------------------ one sinusoid, ReLU ramps, polynomials, turns
def test_sinusoid_residual_finds_a_shifted_wave_on_a_prefix():
    curves = torch.stack([2 + wave(3, 0.7, n=96), wave(5, -1.0, n=96)], dim=1)
    left, freq = fourier.sinusoid_residual(curves, period=128, max_freq=8)
    assert left.max() < 1e-10 and freq.tolist() == [3, 5]
    left_own_period, _ = fourier.sinusoid_residual(curves, max_freq=8)  # periods of 96 tokens do not fit
    assert left_own_period.min() > 0.01


def test_sinusoid_leaves_a_ramp_partly_unexplained():
    left, freq = fourier.sinusoid_residual(T[:, None])
    assert 0.3 < left.item() < 0.5 and freq.item() == 1


def test_relu_ramp_residual_is_zero_on_relu_ramps_either_way():
    curves = torch.stack([fourier.relu_ramp(N, 40), fourier.relu_ramp(N, 90).flip(0), wave(2)], dim=1)
    left = fourier.relu_ramp_residual(curves)
    assert left[:2].max() < 1e-10 and left[2] > 0.5


def test_polynomial_fit_is_exact_for_a_polynomial_and_smooth_for_a_wave():
    cubic = (T / 50) ** 3 - 2 * (T / 50)
    assert torch.allclose(fourier.polynomial_fit(cubic[:, None], 3)[:, 0], cubic, atol=1e-8)
    assert not torch.allclose(fourier.polynomial_fit(wave(10)[:, None], 4)[:, 0], wave(10), atol=0.1)


@pytest.mark.parametrize("f", [1, 2, 3, 4])
def test_turning_points_of_waves_ramps_and_noisy_ramps(f):
    curves = torch.stack([wave(f), T, T + 0.5 * torch.randn(N, dtype=torch.float64)], dim=1)
    assert fourier.turning_points(curves).tolist() == [2 * f - 1, 0, 0]


# ------------------------------------------------------------------ descriptions by groups
def test_explained_by_groups_is_one_for_a_function_of_the_label_and_small_for_noise():
    groups = torch.randint(0, 10, (500,))
    assert fourier.explained_by_groups(torch.randn(10)[groups] + 3, groups) == pytest.approx(1.0)
    assert fourier.explained_by_groups(torch.randn(500), groups) < 0.1


def test_group_means_weigh_every_member():
    means, ids = fourier.group_means(torch.tensor([1.0, 2.0, 3.0, 10.0]), torch.tensor([5, 5, 5, 7]))
    assert means.tolist() == [2.0, 10.0] and ids.tolist() == [0, 0, 0, 1]


# ------------------------------------------------------------------ the ablation
def test_accuracy_with_maps_replaced_keeps_the_model_with_the_identity_and_breaks_it_with_zeros():
    model = models.load_model("addition")
    tokens, targets = tasks.addition_pairs()
    tokens, targets = tokens[::8], targets[::8]
    with torch.no_grad():
        assert circuits.accuracy_with_maps_replaced(model, tokens, targets, lambda m: m) == models.accuracy(model, tokens, targets)
        assert circuits.accuracy_with_maps_replaced(model, tokens, targets, torch.zeros_like) < 0.05
        near = circuits.accuracy_with_maps_replaced(model, tokens, targets, lambda m: fourier.keep_frequencies(m, [1, 2]), 3)
        exact = circuits.accuracy_with_maps_replaced(model, tokens, targets, lambda m: fourier.keep_frequencies(m, [1, 2]))
    assert near > exact
