"""Fourier analysis over token values: which periodic patterns a map from tokens carries.

A map whose first axis runs over the n token values (a neuron's input curve [vocab], the
token-to-neuron map [vocab, d_mlp], a logit map [vocab, ...]) is written in the real Fourier
basis over those n values: a constant, then a cosine and a sine of period n / f for every
frequency f = 1 .. n // 2. torch.fft.rfft gives the coefficients; these functions turn them
into variance per frequency, and filter a map down to chosen frequencies.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


def frequency_power(values: Tensor) -> Tensor:
    """Sum of squares each frequency carries along the first (token) axis, [n // 2 + 1, ...].

    Entry 0 is the constant part; entry f the cosine and sine of frequency f together. The
    entries add up to (values ** 2).sum(0) (Parseval), so power[1:] / power[1:].sum(0) is the
    fraction of each column's variance that frequency f explains.
    """
    n = values.shape[0]
    power = torch.fft.rfft(values.double(), dim=0, norm="ortho").abs() ** 2
    # rfft keeps one of each pair of conjugate frequencies: count the others too
    power[1:(n + 1) // 2] *= 2
    return power.to(values.dtype)


def variance_fractions(values: Tensor) -> Tensor:
    """Fraction of the whole map's variance (all columns together) at each frequency, [n // 2 + 1]; entry 0 is 0."""
    power = frequency_power(values).reshape(values.shape[0] // 2 + 1, -1).sum(-1)
    power[0] = 0
    return power / power.sum()


def dominant_frequency(values: Tensor) -> tuple[Tensor, Tensor]:
    """For every column: the non-constant frequency with the most power and the fraction of the
    column's variance it explains, both [...] (the shape of values without its first axis)."""
    power = frequency_power(values)[1:]
    best = power.max(0)
    return best.indices + 1, best.values / power.sum(0)


def key_frequencies(values: Tensor, coverage: float = 0.9) -> list[int]:
    """The fewest frequencies, strongest first, that together explain `coverage` of the map's variance."""
    fractions = variance_fractions(values)
    order = fractions.argsort(descending=True)
    needed = int((fractions[order].cumsum(0) < coverage).sum()) + 1
    return [int(f) for f in order[:needed]]


def keep_frequencies(values: Tensor, freqs: Iterable[int], keep_constant: bool = True) -> Tensor:
    """`values` with only the listed frequencies (and the constant, unless told not) left along the first axis."""
    n = values.shape[0]
    coeffs = torch.fft.rfft(values, dim=0)
    mask = torch.zeros(n // 2 + 1, dtype=torch.bool)
    mask[list(freqs)] = True
    mask[0] = keep_constant
    shape = (n // 2 + 1,) + (1,) * (values.dim() - 1)
    return torch.fft.irfft(coeffs * mask.reshape(shape), n=n, dim=0)


def remove_frequencies(values: Tensor, freqs: Iterable[int]) -> Tensor:
    """`values` with the listed frequencies taken out along the first axis (the constant stays)."""
    freqs = set(freqs)
    return keep_frequencies(values, [f for f in range(values.shape[0] // 2 + 1) if f not in freqs])


def explained_variance(values: Tensor, freqs: Iterable[int]) -> float:
    """Fraction of the map's variance (constant part excluded) carried by the listed frequencies."""
    return variance_fractions(values)[list(freqs)].sum().item()
