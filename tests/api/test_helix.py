"""Chapter 05's three stories (utils/fourier.py): the cosine transform, the helix basis and its fits,
the embedding's leading pair, and the embedding replaced by a fit."""

import math

import pytest
import torch

from utils import fourier, models, tasks

N = 96
T = torch.arange(N, dtype=torch.float64)


def helix_curve(period: float, phase: float = 0.0, slope: float = 0.0, n: int = N) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64)
    return slope * t / n + torch.cos(2 * math.pi * t / period + phase)


# ------------------------------------------------------------------ the cosine transform
def test_dct_basis_is_orthonormal_and_its_power_adds_up():
    basis = fourier.dct_basis(N)
    assert torch.allclose(basis.T @ basis, torch.eye(N, dtype=torch.float64), atol=1e-10)
    values = torch.randn(N, 3, dtype=torch.float64)
    assert torch.allclose(fourier.dct_power(values).sum(0), (values ** 2).sum(0))


def test_a_dct_cosine_puts_all_its_power_at_its_index_and_a_ramp_needs_one_cosine_not_a_tail():
    cosine = torch.cos(math.pi * 4 * (T + 0.5) / N)[:, None]
    assert fourier.dct_fractions(cosine)[4].item() == pytest.approx(1.0)
    ramp = fourier.ramp(N)[:, None]
    assert fourier.dct_fractions(ramp)[1] > 0.98
    assert fourier.variance_fractions(ramp)[1] < 0.7  # the FFT spreads the same ramp over its wrap jump


def test_dct_indices_for_periods_are_the_cosines_with_those_periods():
    assert fourier.dct_indices_for_periods(96, 36, 64) == [3, 4, 5]
    assert all(36 <= 2 * 128 / j <= 64 for j in fourier.dct_indices_for_periods(128, 36, 64))


def test_a_band_shows_in_a_wave_with_a_trend_and_not_in_its_monotone_fit():
    curves = torch.stack([helix_curve(48, p, slope=1.0) for p in (0.0, 1.0, 2.0)], dim=1)
    band = fourier.dct_indices_for_periods(N, 36, 64)
    share, null = fourier.dct_fractions(curves)[band].sum(), fourier.dct_fractions(fourier.monotone_fit(curves))[band].sum()
    assert share > 3 * null


# ------------------------------------------------------------------ helix basis and fits
def test_helix_basis_fits_a_helix_exactly_and_a_polynomial_of_its_size_does_not():
    curve = helix_curve(41.5, 0.3, slope=2.0)[:, None]
    basis = fourier.helix_basis(N, [41.5])
    assert basis.shape == (N, 4)
    assert torch.allclose(fourier.fit_in_basis(curve, basis), curve, atol=1e-9)
    assert fourier.left_share(curve, fourier.fit_in_basis(curve, fourier.legendre_basis(N, 3))) > 0.05


def test_helix_periods_recover_planted_periods():
    dims = torch.stack([helix_curve(47, p, slope=s) + 0.5 * helix_curve(90, 2 * p) for p, s in
                        [(0.0, 1.0), (1.3, -2.0), (2.1, 0.5), (4.0, 0.0)]], dim=1)
    found = fourier.helix_periods(dims, 2, candidates=range(10, 130))
    assert sorted(round(p) for p in found) == [47, 90]


def test_sinusoid_trend_residual_finds_the_period_and_beats_a_polynomial_of_its_size():
    curves = torch.stack([helix_curve(50, 0.4, slope=4.0), helix_curve(70, 2.0, slope=-1.0)], dim=1)
    left, period = fourier.sinusoid_trend_residual(curves)
    assert left.max() < 1e-10 and period.tolist() == [50.0, 70.0]
    assert (fourier.polynomial_residual(curves, 4) > left + 0.01).all()


def test_polynomial_residual_is_zero_on_a_polynomial():
    cubic = ((T / 40) ** 3 - T / 40)[:, None]
    assert fourier.polynomial_residual(cubic, 3).item() < 1e-12


# ------------------------------------------------------------------ the embedding's leading pair
def helix_embedding(period: float) -> torch.Tensor:
    t = T[:, None]
    helix = torch.cat([t / 10, torch.cos(2 * math.pi * t / period), torch.sin(2 * math.pi * t / period)], dim=1)
    return helix @ torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]  # in any basis of the space


def test_leading_pair_of_a_helix_of_many_turns_is_a_circle_after_its_line():
    pair = fourier.leading_pair(helix_embedding(12))
    assert pair["radius_variation"] < 0.05 and pair["angle_fit"] > 0.99
    assert pair["turns"] == pytest.approx(95 / 12, abs=0.05)
    assert pair["plane"].shape == (N, 2) and 0 < pair["line_share"] < 1


def test_the_line_takes_part_of_a_slow_circle_with_it():
    """Over two turns the fitted line absorbs some of the sine: even a perfect helix's radius then varies
    (this is the reference the chapter sets the embedding against)."""
    slow, fast = fourier.leading_pair(helix_embedding(48)), fourier.leading_pair(helix_embedding(12))
    assert 0.1 < slow["radius_variation"] < 0.25 and slow["radius_variation"] > fast["radius_variation"]
    assert slow["angle_fit"] > 0.95


def test_leading_pair_of_smooth_monotone_curves_is_no_circle():
    curves = torch.stack([T ** 0.5, T ** 2 / N, torch.log1p(T), T], dim=1)
    pair = fourier.leading_pair(curves)
    assert pair["line_share"] > 0.8 and not (pair["radius_variation"] < 0.1 and pair["turns"] > 1)


# ------------------------------------------------------------------ the causal test
def test_accuracy_with_embedding_keeps_the_model_with_W_E_and_breaks_it_with_a_constant():
    model = models.load_model("addition")
    tokens, targets = tasks.addition_pairs()
    tokens, targets = tokens[::8], targets[::8]
    with torch.no_grad():
        assert fourier.accuracy_with_embedding(model, tokens, targets, model.W_E) == models.accuracy(model, tokens, targets)
        constant = model.W_E.mean(0, keepdim=True).expand_as(model.W_E)
        assert fourier.accuracy_with_embedding(model, tokens, targets, constant) < 0.05
        line = fourier.fit_in_basis(model.W_E, fourier.helix_basis(128, []))
        assert fourier.accuracy_with_embedding(model, tokens, targets, line, 2) > fourier.accuracy_with_embedding(model, tokens, targets, line)
