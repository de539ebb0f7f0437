"""Fourier analysis over token values (utils/fourier.py) on synthetic signals with known answers."""

import math

import pytest
import torch

from utils import fourier

N = 128
X = torch.arange(N, dtype=torch.float64)


def cos(f: int, n: int = N) -> torch.Tensor:
    return torch.cos(2 * math.pi * f * torch.arange(n, dtype=torch.float64) / n)


def sin(f: int, n: int = N) -> torch.Tensor:
    return torch.sin(2 * math.pi * f * torch.arange(n, dtype=torch.float64) / n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ frequency_power
@pytest.mark.parametrize("f", [1, 5, 17, 63])
@pytest.mark.parametrize("wave", [cos, sin])
def test_pure_wave_puts_all_power_at_its_frequency(wave, f):
    values = 3.0 * wave(f)
    power = fourier.frequency_power(values)
    assert power.shape == (N // 2 + 1,)
    total = (values**2).sum()
    assert power[f].item() == pytest.approx(total.item(), rel=1e-9)
    assert total.item() == pytest.approx(9 * N / 2)
    others = torch.cat([power[:f], power[f + 1:]])
    assert others.abs().max().item() < 1e-9


def test_cosine_and_sine_of_one_frequency_add_up():
    values = 2.0 * cos(9) + 5.0 * sin(9)  # a shifted wave: still one frequency
    power = fourier.frequency_power(values)
    assert power[9].item() == pytest.approx((4 + 25) * N / 2, rel=1e-9)
    assert power.sum().item() == pytest.approx(power[9].item(), rel=1e-9)


@pytest.mark.parametrize("shape", [(128,), (127,), (10,), (9,), (128, 5), (127, 3), (12, 4, 2), (2,), (3,)])
def test_parseval(shape):
    values = torch.randn(*shape, dtype=torch.float64)
    power = fourier.frequency_power(values)
    assert power.shape == (shape[0] // 2 + 1,) + shape[1:]
    assert (power >= 0).all()
    torch.testing.assert_close(power.sum(0), (values**2).sum(0), rtol=1e-10, atol=1e-10)


def test_parseval_in_float32_keeps_dtype():
    values = torch.randn(128, 6)
    power = fourier.frequency_power(values)
    assert power.dtype == torch.float32
    torch.testing.assert_close(power.sum(0), (values**2).sum(0), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n", [128, 9])
def test_constant_goes_to_entry_zero(n):
    values = torch.full((n,), 2.5, dtype=torch.float64)
    power = fourier.frequency_power(values)
    assert power[0].item() == pytest.approx(2.5**2 * n)
    assert power[1:].abs().max().item() < 1e-9


def test_nyquist_frequency_is_not_doubled():
    values = (-1.0) ** X  # frequency n / 2: one real basis vector, no sine partner
    power = fourier.frequency_power(values)
    assert power[N // 2].item() == pytest.approx(N)  # = (values ** 2).sum(), not 2 N
    assert power[:N // 2].abs().max().item() < 1e-9


def test_highest_frequency_of_odd_length_is_doubled():
    n = 9  # no Nyquist term: the top frequency 4 is a cosine-sine pair like the others
    values = cos(4, n)
    power = fourier.frequency_power(values)
    assert power.shape == (5,)
    assert power[4].item() == pytest.approx((values**2).sum().item())
    assert power[4].item() == pytest.approx(n / 2)


def test_columns_are_analysed_independently():
    values = torch.stack([cos(3), sin(20), torch.ones(N, dtype=torch.float64)], dim=1)
    power = fourier.frequency_power(values)
    assert power.shape == (N // 2 + 1, 3)
    assert power.argmax(0).tolist() == [3, 20, 0]


# ------------------------------------------------------------------ variance_fractions, dominant_frequency
@pytest.mark.parametrize("shape", [(128,), (127, 4), (16, 3, 2)])
def test_variance_fractions_sum_to_one_without_constant(shape):
    values = torch.randn(*shape, dtype=torch.float64) + 7.0  # a large constant that must not count
    fractions = fourier.variance_fractions(values)
    assert fractions.shape == (shape[0] // 2 + 1,)
    assert fractions[0].item() == 0
    assert fractions.sum().item() == pytest.approx(1.0)
    assert (fractions >= 0).all()


def test_variance_fractions_pool_all_columns():
    values = torch.stack([2.0 * cos(4), 1.0 * sin(10)], dim=1) + 1.0
    fractions = fourier.variance_fractions(values)
    assert fractions[4].item() == pytest.approx(4 / 5)
    assert fractions[10].item() == pytest.approx(1 / 5)


def test_dominant_frequency_per_column():
    values = torch.stack([3 * cos(5) + 1 * sin(11),  # 9 : 1
                          2 * sin(30) + 4.0,  # constant does not count
                          1 * cos(2) + 2 * cos(40)], dim=1)  # 1 : 4
    freq, fraction = fourier.dominant_frequency(values)
    assert freq.tolist() == [5, 30, 40]
    torch.testing.assert_close(fraction, torch.tensor([0.9, 1.0, 0.8], dtype=torch.float64))


def test_dominant_frequency_of_one_curve_is_a_scalar():
    freq, fraction = fourier.dominant_frequency(3 * cos(5) + 1 * sin(11))
    assert freq.shape == () and int(freq) == 5
    assert fraction.item() == pytest.approx(0.9)


def test_dominant_frequency_never_picks_the_constant():
    freq, fraction = fourier.dominant_frequency(100.0 + 0.1 * cos(7))
    assert int(freq) == 7
    assert fraction.item() == pytest.approx(1.0)


# ------------------------------------------------------------------ key_frequencies
def _three_waves():
    # amplitudes 4, 2, 1 at frequencies 7, 3, 20: fractions 16/21, 4/21, 1/21
    return torch.stack([4 * cos(7) + 2 * sin(3), 1 * cos(20) + 0.5], dim=1)


@pytest.mark.parametrize("coverage, expected", [(0.5, [7]), (0.9, [7, 3]), (0.99, [7, 3, 20])])
def test_key_frequencies_fewest_strongest_first(coverage, expected):
    values = _three_waves()
    fractions = fourier.variance_fractions(values)
    torch.testing.assert_close(fractions[[7, 3, 20]], torch.tensor([16, 4, 1], dtype=torch.float64) / 21)
    assert fourier.key_frequencies(values, coverage=coverage) == expected


def test_key_frequencies_default_coverage_and_return_type():
    got = fourier.key_frequencies(_three_waves())
    assert got == [7, 3]
    assert all(type(f) is int for f in got)


def test_key_frequencies_of_float32_input():
    assert fourier.key_frequencies(_three_waves().float(), coverage=0.9) == [7, 3]


# ------------------------------------------------------------------ keep / remove frequencies
def _mix(n: int = N):
    return torch.stack([1.5 + 3 * cos(5, n) + 2 * sin(11, n) + 0.5 * cos(2, n),
                        -2.0 + 1 * sin(5, n) + 4 * cos(3, n)], dim=1)


def test_keep_frequencies_keeps_listed_and_constant():
    got = fourier.keep_frequencies(_mix(), [5])
    expected = torch.stack([1.5 + 3 * cos(5), -2.0 + 1 * sin(5)], dim=1)
    assert got.shape == (N, 2)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_keep_frequencies_without_constant_removes_the_mean():
    got = fourier.keep_frequencies(_mix(), [5, 11], keep_constant=False)
    expected = torch.stack([3 * cos(5) + 2 * sin(11), 1 * sin(5)], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)
    assert got.mean(0).abs().max().item() < 1e-9


def test_keep_nothing_leaves_the_mean():
    values = _mix()
    got = fourier.keep_frequencies(values, [])
    torch.testing.assert_close(got, values.mean(0, keepdim=True).expand_as(values), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("n", [128, 127, 10, 9])
def test_keep_every_frequency_is_the_identity(n):
    values = torch.randn(n, 3, dtype=torch.float64)
    got = fourier.keep_frequencies(values, range(1, n // 2 + 1))
    assert got.shape == values.shape
    torch.testing.assert_close(got, values, atol=1e-10, rtol=1e-10)


def test_keep_nyquist_frequency():
    values = 2.0 * (-1.0) ** X + cos(1)
    torch.testing.assert_close(fourier.keep_frequencies(values, [N // 2]), 2.0 * (-1.0) ** X, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("n", [128, 127])
@pytest.mark.parametrize("freqs", [[1, 2, 3, 4], [7], [], [2, 5, 31]])
def test_remove_plus_keep_without_constant_is_the_whole_map(n, freqs):
    values = torch.randn(n, 4, dtype=torch.float64) + 3.0
    removed = fourier.remove_frequencies(values, freqs)
    kept = fourier.keep_frequencies(values, freqs, keep_constant=False)
    assert removed.shape == kept.shape == values.shape
    torch.testing.assert_close(removed + kept, values, atol=1e-10, rtol=1e-10)
    # removing keeps the constant: same column means as the input
    torch.testing.assert_close(removed.mean(0), values.mean(0), atol=1e-10, rtol=1e-10)
    # the removed frequencies carry no power afterwards
    if freqs:
        assert fourier.frequency_power(removed)[freqs].abs().max().item() < 1e-12


def test_remove_frequencies_known_answer():
    got = fourier.remove_frequencies(_mix(), [5, 3])
    expected = torch.stack([1.5 + 2 * sin(11) + 0.5 * cos(2), -2.0 + 0 * X], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-9, rtol=1e-9)


def test_keep_frequencies_works_in_float32_and_3d():
    values = torch.randn(64, 3, 2)
    got = fourier.keep_frequencies(values, [1, 2])
    assert got.shape == values.shape and got.dtype == torch.float32
    expected = torch.stack([fourier.keep_frequencies(values[:, i, j], [1, 2])
                            for i in range(3) for j in range(2)], dim=-1).reshape(64, 3, 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ explained_variance
def test_explained_variance_known_answers():
    values = _three_waves()
    assert fourier.explained_variance(values, [7]) == pytest.approx(16 / 21)
    assert fourier.explained_variance(values, [7, 3]) == pytest.approx(20 / 21)
    assert fourier.explained_variance(values, [7, 3, 20]) == pytest.approx(1.0)
    assert fourier.explained_variance(values, [1, 2]) == pytest.approx(0.0, abs=1e-12)
    assert fourier.explained_variance(values, [0]) == 0.0  # the constant never counts
    assert isinstance(fourier.explained_variance(values, [7]), float)


def test_explained_variance_matches_variance_of_the_kept_map():
    values = torch.randn(128, 5, dtype=torch.float64)
    freqs = [1, 2, 9]
    kept = fourier.keep_frequencies(values, freqs, keep_constant=False)
    centred = values - values.mean(0)
    expected = (kept**2).sum() / (centred**2).sum()
    assert fourier.explained_variance(values, freqs) == pytest.approx(expected.item(), rel=1e-9)
    assert fourier.explained_variance(values, freqs) == pytest.approx(
        fourier.variance_fractions(values)[freqs].sum().item())
