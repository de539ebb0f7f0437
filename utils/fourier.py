"""Fourier analysis over token values: which periodic patterns a map from tokens carries.

A map whose first axis runs over the n token values (a neuron's input curve [vocab], the
token-to-neuron map [vocab, d_mlp], a logit map [vocab, ...]) is written in the real Fourier
basis over those n values: a constant, then a cosine and a sine of period n / f for every
frequency f = 1 .. n // 2. torch.fft.rfft gives the coefficients; these functions turn them
into variance per frequency, and filter a map down to chosen frequencies.
"""

from __future__ import annotations

import math
from typing import Iterable

from utils import runtime  # noqa: F401  (one torch thread; freed memory back after every cell)
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


# --------------------------------------------------------------------- smooth non-periodic nulls
# On token values 0 .. n-1 that do not wrap around, any smooth curve puts most of its variance
# in the lowest frequencies: a ramp jumps from its end back to its start when the n values are
# read as one period. So "most power in frequencies 1-4" is a property of smoothness, not of
# periodicity, until it is set against curves that are smooth and not periodic at all.
def ramp(n: int) -> Tensor:
    """The linear ramp 0, 1, .., n - 1, [n]: smooth, monotone, not periodic."""
    return torch.arange(n, dtype=torch.float64)


def relu_ramp(n: int, kink: int) -> Tensor:
    """max(0, t - kink) for t = 0 .. n - 1, [n]: flat up to `kink`, then a ramp (a ReLU neuron's curve)."""
    return (ramp(n) - kink).clamp(min=0)


def low_frequency_share(values: Tensor, freqs: Iterable[int]) -> Tensor:
    """For every column: the fraction of its variance (constant excluded) at the listed frequencies, [...]."""
    power = frequency_power(values.double())
    return power[list(freqs)].sum(0) / power[1:].sum(0)


def isotonic_fit(values: Tensor, increasing: bool = True) -> Tensor:
    """Least-squares monotone curve through every column along the first axis, [n, ...] (pool-adjacent-violators).

    Walk along the tokens keeping blocks of pooled values; whenever a block's mean falls below the
    previous block's (above it, when decreasing), merge the two and look back again.
    """
    flat = values.double().reshape(values.shape[0], -1)
    sign = 1.0 if increasing else -1.0
    fitted = torch.empty_like(flat)
    for col in range(flat.shape[1]):
        means, sizes = [], []
        for y in (sign * flat[:, col]).tolist():
            means.append(y)
            sizes.append(1)
            while len(means) > 1 and means[-2] > means[-1]:
                size = sizes[-2] + sizes[-1]
                means[-2:] = [(means[-2] * sizes[-2] + means[-1] * sizes[-1]) / size]
                sizes[-2:] = [size]
        fitted[:, col] = sign * torch.repeat_interleave(torch.tensor(means, dtype=torch.float64),
                                                        torch.tensor(sizes))
    return fitted.reshape(values.shape).to(values.dtype)


def shares_against_monotone(curves: Tensor, freqs: Iterable[int]) -> tuple[float, float]:
    """(share of the curves, share of their best monotone fits): the fraction of the whole map's variance
    (every column together, constant excluded) at `freqs`, for `curves` [n, ...] and for the null that
    replaces every column with the monotone curve closest to it (monotone_fit).

    If the two are close, a spectrum concentrated on `freqs` says the curves are smooth, not periodic.
    """
    freqs = list(freqs)
    return explained_variance(curves, freqs), explained_variance(monotone_fit(curves), freqs)


def _residual_share(values: Tensor, fitted: Tensor) -> Tensor:
    """Residual variance of `fitted` over each column's variance, [...]."""
    values, fitted = values.double(), fitted.double()
    return ((values - fitted) ** 2).sum(0) / ((values - values.mean(0)) ** 2).sum(0)


def monotone_fit(values: Tensor) -> Tensor:
    """For every column, the better (smaller residual) of the increasing and the decreasing isotonic fit, [n, ...]."""
    up, down = isotonic_fit(values, True), isotonic_fit(values, False)
    better_up = _residual_share(values, up) <= _residual_share(values, down)
    return torch.where(better_up, up, down)


def monotone_residual(values: Tensor) -> Tensor:
    """Fraction of each column's variance the best monotone curve leaves unexplained, [...]."""
    return _residual_share(values, monotone_fit(values))


def sinusoid_residual(values: Tensor, period: int | None = None, max_freq: int = 8,
                      parts: tuple[str, ...] = ("1", "cos", "sin")) -> tuple[Tensor, Tensor]:
    """The best single sinusoid (a constant, a cosine and a sine of one frequency) through every column.

    Waves of period `period` / f (default: the number of rows) for f = 1 .. max_freq are fitted by
    least squares to the rows given, which may be only the first, well-sampled tokens of a longer
    range. Returns (residual share [...], best frequency [...]): the fraction of each column's
    variance the best one-frequency fit leaves unexplained, and that frequency. `parts` names the
    basis of each wave: the constant "1", "cos" and "sin" (other choices fit other families).
    """
    t = torch.arange(values.shape[0], dtype=torch.float64)

    def wave(f: int) -> Tensor:
        angle = 2 * math.pi * f * t / (period or values.shape[0])
        columns = {"1": torch.ones_like(t), "cos": torch.cos(angle), "sin": torch.sin(angle)}
        return torch.stack([columns[part] for part in parts], dim=1)

    share, best_f = best_fit_among(values, ((f, wave(f)) for f in range(1, max_freq + 1)))
    return share.to(values.dtype), best_f.long()


def best_fit_among(values: Tensor, bases) -> tuple[Tensor, Tensor]:
    """The least-squares fit, among labelled bases (label, [n, k]), that leaves each column of `values` [n, ...]
    the least unexplained variance: (that residual share [...], its basis's label [...]), in float64."""
    flat = values.double().reshape(values.shape[0], -1)
    best = torch.full((flat.shape[1],), float("inf"), dtype=torch.float64)
    label = torch.zeros(flat.shape[1], dtype=torch.float64)
    for name, basis in bases:
        share = _residual_share(flat, fit_in_basis(flat, basis))
        better = share < best
        best, label = torch.where(better, share, best), torch.where(better, float(name), label)
    return best.reshape(values.shape[1:]), label.reshape(values.shape[1:])


def polynomial_fit(values: Tensor, degree: int) -> Tensor:
    """Least-squares polynomial of `degree` in the token value through every column, [n, ...].

    A smooth, non-periodic basis of degree + 1 functions (Legendre polynomials over the n tokens):
    the null against which keeping the constant and k frequencies (2 k + 1 functions) is compared.
    """
    return fit_in_basis(values, legendre_basis(values.shape[0], degree))


def relu_ramp_residual(values: Tensor) -> Tensor:
    """Fraction of each column's variance the best ReLU ramp leaves unexplained, [...].

    Candidates: c + s * max(0, t - k) and c + s * max(0, k - t) for every kink k, fitted by least squares.
    """
    flat = values.double().reshape(values.shape[0], -1)
    t = torch.arange(values.shape[0], dtype=torch.float64)
    best = torch.full((flat.shape[1],), float("inf"), dtype=torch.float64)
    for k in range(values.shape[0] - 1):
        for ramp_ in ((t - k).clamp(min=0), (k + 1 - t).clamp(min=0)):
            basis = torch.stack([torch.ones_like(t), ramp_], dim=1)
            best = torch.minimum(best, _residual_share(flat, basis @ torch.linalg.lstsq(basis, flat).solution))
    return best.reshape(values.shape[1:]).to(values.dtype)


def turning_points(values: Tensor, smooth: int = 5, min_swing: float = 0.1) -> Tensor:
    """Number of times each column changes direction along the first axis, [...].

    The curve is first smoothed by a moving average over `smooth` tokens; a change of direction
    counts only once the curve has moved by `min_swing` times its range since the last extreme
    (so wiggles of rounding size are not counted). A monotone curve has 0, a sinusoid of
    frequency f over whole periods about 2 f.
    """
    flat = values.double().reshape(values.shape[0], -1)
    kernel = torch.ones(1, 1, smooth, dtype=torch.float64) / smooth
    smoothed = torch.nn.functional.conv1d(flat.T[:, None], kernel)[:, 0]  # [cols, n - smooth + 1]
    counts = []
    for curve in smoothed.tolist():
        threshold = min_swing * (max(curve) - min(curve))
        turns, direction, high, low = 0, 0, curve[0], curve[0]
        for y in curve:
            high, low = max(high, y), min(low, y)
            if direction >= 0 and y < high - threshold:  # fell far enough from the last high: going down
                turns, direction, low = turns + (direction == 1), -1, y
            elif direction <= 0 and y > low + threshold:  # rose far enough from the last low: going up
                turns, direction, high = turns + (direction == -1), 1, y
        counts.append(turns)
    return torch.tensor(counts).reshape(values.shape[1:])


# --------------------------------------------------------------------- descriptions: what a value depends on
def group_means(values: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """(mean of every group [n_groups], group index of every entry [values.numel()]), groups relabelled 0 .. n_groups - 1."""
    ids = torch.unique(groups.flatten(), return_inverse=True)[1]
    sums = torch.zeros(int(ids.max()) + 1, dtype=torch.float64).index_add_(0, ids, values.double().flatten())
    sizes = torch.zeros_like(sums).index_add_(0, ids, torch.ones(ids.shape, dtype=torch.float64))
    return sums / sizes, ids


def explained_by_groups(values: Tensor, groups: Tensor) -> float:
    """Fraction of the variance of `values` explained by replacing every value with the mean of its group.

    `groups` has the shape of `values` and labels each entry (e.g. (a + b - c) mod 128): the
    result is what the best function of the label alone explains, 1 - residual / total variance.
    """
    means, ids = group_means(values, groups)
    residual = values.double().flatten() - means[ids]
    return 1 - (residual.var() / values.double().var()).item()


# --------------------------------------------------------------------- chapter 06: a null with the same spectrum
def phase_shifted(values: Tensor, phases: Tensor) -> Tensor:
    """Every column with each frequency's phase turned by `phases`, its power per frequency unchanged, [n, ...].

    `phases` [n // 2 + 1, ...] are angles in radians, one per frequency (of the real FFT along the
    first axis) and column; the constant and, for even n, the frequency n / 2 keep their phase (they
    are real). With uniformly random phases this gives smooth random curves with exactly the
    spectrum, and so the smoothness, of `values`: frequency_power is the same, the shape is not.
    """
    return spectrum_turned(values, torch.polar(torch.ones_like(phases, dtype=torch.float64), kept_real(phases, len(values))))


def kept_real(phases: Tensor, n: int) -> Tensor:
    """`phases` [n // 2 + 1, ...] with the angles of the real frequencies (the constant; n / 2 for even n) set to 0."""
    phases = phases.double().clone()
    phases[0] = 0.0
    if n % 2 == 0:
        phases[-1] = 0.0
    return phases


def spectrum_turned(values: Tensor, turn: Tensor) -> Tensor:
    """Every column's real FFT along the first axis (orthonormal) multiplied by the complex factors `turn`
    [n // 2 + 1, ...], and transformed back, [n, ...]."""
    spectrum = torch.fft.rfft(values.double(), dim=0, norm="ortho")
    return torch.fft.irfft(spectrum * turn, n=values.shape[0], dim=0, norm="ortho").to(values.dtype)


# --------------------------------------------------------------------- chapter 05: three stories (clock, smooth curve, helix)
# A clock puts every number on circles whose periods divide the 128 values and wraps 127 onto 0. A
# smooth non-periodic curve has a spectrum that falls with the frequency. A helix (Kantamneni and
# Tegmark 2025, "Language Models Use Trigonometry to Do Addition") is a line plus circles of a few
# periods, any periods: its spectrum has a band peak at those periods, and a fit in the basis
# [1, a, cos 2πa/T, sin 2πa/T, ...] describes it with few numbers. The FFT reads the interval as a
# loop and builds the jump from 127 back to 0 out of weak high frequencies; the cosine transform
# (DCT) and the helix basis do not, so the bases below are compared without that handicap.
def fit_in_basis(values: Tensor, basis: Tensor) -> Tensor:
    """Least-squares fit of every column of `values` [n, ...] by the columns of `basis` [n, k], [n, ...]."""
    flat = values.double().reshape(values.shape[0], -1)
    basis = basis.double()
    return (basis @ torch.linalg.lstsq(basis, flat).solution).reshape(values.shape).to(values.dtype)


def dct_basis(n: int, size: int | None = None) -> Tensor:
    """The first `size` (default n) orthonormal DCT-II cosines over n tokens, [n, size].

    Column j is cos(π j (t + 1/2) / n), scaled to unit length: j half-periods over the interval, a
    period of 2 n / j tokens. Column 0 is the constant, column 1 one smooth rise across the interval;
    unlike the FFT's waves the cosines need not meet at the two ends, so no jump from n - 1 to 0 is built.
    """
    t = torch.arange(n, dtype=torch.float64)
    basis = torch.stack([torch.cos(math.pi * j * (t + 0.5) / n) for j in range(size or n)], dim=1)
    return basis / basis.norm(dim=0)


def dct_power(values: Tensor) -> Tensor:
    """Sum of squares every DCT cosine carries along the first axis, [n, ...]; entry 0 is the constant.

    The entries add up to (values ** 2).sum(0), so power[1:] / power[1:].sum(0) is the fraction of each
    column's variance at j half-periods over the interval (period 2 n / j tokens).
    """
    basis = dct_basis(values.shape[0])
    flat = values.double().reshape(values.shape[0], -1)
    return ((basis.T @ flat) ** 2).reshape(values.shape)


def dct_fractions(values: Tensor) -> Tensor:
    """Fraction of the whole map's variance (all columns pooled) at every DCT index, [n]; entry 0 (the constant) is 0."""
    power = dct_power(values).reshape(values.shape[0], -1).sum(-1)
    power[0] = 0
    return power / power.sum()


def dct_indices_for_periods(n: int, shortest: float, longest: float) -> list[int]:
    """The DCT indices j whose period 2 n / j over n tokens lies between `shortest` and `longest` tokens."""
    return [j for j in range(1, n) if shortest <= 2 * n / j <= longest]


def helix_basis(n: int, periods: Iterable[float]) -> Tensor:
    """The helix basis over the tokens 0 .. n-1, [n, 2 + 2 * len(periods)]:
    a constant, a line t / n, and cos 2πt/T, sin 2πt/T for every period T (in tokens)."""
    t = torch.arange(n, dtype=torch.float64)
    columns = [torch.ones_like(t), t / n]
    for period in periods:
        columns += [torch.cos(2 * math.pi * t / period), torch.sin(2 * math.pi * t / period)]
    return torch.stack(columns, dim=1)


def legendre_basis(n: int, degree: int) -> Tensor:
    """Legendre polynomials of degree 0 .. `degree` over the n tokens mapped to [-1, 1], [n, degree + 1]."""
    x = torch.linspace(-1, 1, n, dtype=torch.float64)
    return torch.stack([torch.special.legendre_polynomial_p(x, d) for d in range(degree + 1)], dim=1)


def left_share(values: Tensor, fitted: Tensor) -> float:
    """Share of the whole map's variance (every column about its mean, pooled) that `fitted` leaves unexplained."""
    values, fitted = values.double(), fitted.double()
    return (((values - fitted) ** 2).sum() / ((values - values.mean(0)) ** 2).sum()).item()


def helix_periods(values: Tensor, count: int, candidates: Iterable[float] = range(8, 257)) -> list[float]:
    """`count` periods (tokens), chosen one at a time: each the candidate whose helix_basis, together with
    the periods already chosen, leaves the least of the map's pooled variance [n, ...] unexplained."""
    n, chosen = values.shape[0], []
    for _ in range(count):
        free = [float(p) for p in candidates if all(abs(p - c) > 1 for c in chosen)]
        chosen.append(min(free, key=lambda p: left_share(values, fit_in_basis(values, helix_basis(n, chosen + [p])))))
    return chosen


def sinusoid_trend_residual(values: Tensor, periods: Iterable[float] = torch.arange(12, 200.5, 0.5).tolist()
                            ) -> tuple[Tensor, Tensor]:
    """The best line plus one wave of a free period, a + b t + c cos 2πt/T + d sin 2πt/T, through every column.

    Five numbers per curve (a, b, c, d and T, tried over `periods`), as many as a polynomial of degree 4.
    Returns (residual share [...], best period in tokens [...]): the fraction of each column's variance
    the best fit leaves unexplained, and its period.
    """
    return best_fit_among(values, ((period, helix_basis(values.shape[0], [period])) for period in periods))


def polynomial_residual(values: Tensor, degree: int) -> Tensor:
    """Fraction of each column's variance the least-squares polynomial of `degree` leaves unexplained, [...]."""
    return _residual_share(values, polynomial_fit(values, degree)).reshape(values.shape[1:])


def leading_pair(values: Tensor) -> dict[str, Tensor | float]:
    """The two principal directions of a map [n tokens, d] once its best line in the token is taken out.

    Returns {"plane": [n, 2] coordinates of every token in the plane of the two leading principal
    directions, "angle": [n] its angle round the centre, unwrapped (radians), "radius": [n] its distance
    from the centre, "line_share": share of the map's variance the line explains, "pair_share": share of
    the map's variance the pair holds, "radius_variation": std / mean of the distance from the centre
    over the tokens (0 for a circle), "turns": how many times the angle winds round, start to end,
    "angle_fit": R² of the unwrapped angle against the token (1 for an angle that advances at a steady rate)}.
    """
    values = values.double()
    n = values.shape[0]
    line = fit_in_basis(values, helix_basis(n, []))
    total = ((values - values.mean(0)) ** 2).sum()
    rest = values - line
    u, s, _ = torch.linalg.svd(rest, full_matrices=False)
    plane = u[:, :2] * s[:2]
    radius = plane.norm(dim=1)
    angle = torch.atan2(plane[:, 1], plane[:, 0])
    steps = torch.remainder(angle.diff() + math.pi, 2 * math.pi) - math.pi  # the shorter way round at every step
    unwrapped = torch.cat([angle[:1], angle[0] + steps.cumsum(0)])
    fitted = fit_in_basis(unwrapped[:, None], helix_basis(n, []))[:, 0]
    return {"plane": plane, "angle": unwrapped, "radius": radius, "line_share": 1 - ((rest ** 2).sum() / total).item(),
            "pair_share": ((s[:2] ** 2).sum() / total).item(),
            "radius_variation": (radius.std() / radius.mean()).item(),
            "turns": abs(unwrapped[-1] - unwrapped[0]).item() / (2 * math.pi),
            "angle_fit": 1 - left_share(unwrapped[:, None], fitted[:, None])}


def accuracy_with_embedding(model, tokens: Tensor, targets: Tensor, embedding: Tensor, tolerance: int = 0) -> float:
    """Accuracy (over targets != IGNORE, within `tolerance`) when the model reads `embedding` [vocab, d_model] in place of W_E.

    A hook on the token embedding hands every position the row of `embedding` for its token; positions,
    attention, MLP and unembedding run as trained.
    """
    from utils.tasks import IGNORE

    embedding = embedding.to(model.W_E.dtype)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda act, hook: embedding[tokens])])
    keep = targets != IGNORE
    return ((logits.argmax(-1)[keep] - targets[keep]).abs() <= tolerance).float().mean().item()
