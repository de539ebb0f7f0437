"""The checkers of chapter 05: MLP effective weights."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from utils import circuits, fourier, models, proofs, tasks, train
from utils.checks.engine import (Attempt, Case, CheckFailed, Mistake, call_learner, check_case, compare,
                                 compare_float, compare_tensors, copies, diagnosis, exercise, matches, passed)
from utils.checks.fixtures import (changed_copy, fresh_model, noisy_addition, noisy_model, random_causal_pattern,
                                   random_models, smooth_curves)
from utils.tasks import IGNORE

def _addition_model_cases() -> list[Case]:
    model = noisy_addition()
    return [(f"on a noisy addition checkpoint at source position {pos}", (model, pos)) for pos in (0, 1)]


check_token_to_neuron = exercise(
    "5.1", "tokens to neuron inputs", circuits.token_to_neuron, function="token_to_neuron", kind="implementation",
    cases=_addition_model_cases, atol=1e-3, rtol=1e-3,
    hint="follow a token at the source position through the head and stop at the MLP's input weights: its "
         "embedding plus that position's embedding, then the value and output weights; rows are tokens, columns "
         "neurons.",
    mistakes=(
        Mistake("the positional embedding left out",
                "a token at a source position enters the head as its embedding plus that position's embedding.",
                lambda model, pos: circuits.token_to_neuron(model, pos)
                - model.W_pos[pos] @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_in[0]),
        Mistake("the other position's embedding",
                "the positional embedding to add is the one of the source position the argument names.",
                lambda model, pos: circuits.token_to_neuron(model, 1 - pos)),
        Mistake("the skip path, not the head",
                "the map asked for goes through the head (value, then output weights) before the MLP reads it.",
                lambda model, pos: circuits.direct_to_neuron(model, pos)),
        Mistake("W_O before W_V",
                "the head first reads a value from the source token, then writes it to the residual stream.",
                lambda model, pos: (model.W_E + model.W_pos[pos]) @ model.W_O[0, 0] @ model.W_V[0, 0] @ model.W_in[0]),
    ))


def _power_cases() -> list[Case]:
    x = torch.arange(128.0)
    inputs = [torch.cos(2 * torch.pi * 3 * x / 128)[:, None], torch.randn(128, 5), torch.randn(9, 3), torch.randn(10)]
    return [(f"on a {tuple(v.shape)} input", (v,)) for v in inputs]


def _mirrored(values: Tensor) -> Tensor:
    """Which entries of frequency_power stand for a pair of frequencies (f and n - f), as a column [n // 2 + 1, 1...]."""
    n = values.shape[0]
    pairs = torch.zeros(n // 2 + 1, dtype=torch.bool)
    pairs[1:(n + 1) // 2] = True
    return pairs.reshape(-1, *[1] * (values.dim() - 1))


def _nyquist_doubled(values: Tensor) -> Tensor:
    """The reference with every frequency above 0 doubled: for even n, n / 2 as well."""
    above_0 = (torch.arange(values.shape[0] // 2 + 1) > 0).reshape(_mirrored(values).shape)
    return fourier.frequency_power(values) * torch.where(above_0 & ~_mirrored(values), 2.0, 1.0)


check_frequency_power = exercise(
    "5.2", "power per frequency", fourier.frequency_power, function="frequency_power", kind="implementation",
    cases=_power_cases, atol=1e-3, rtol=1e-3,
    hint="the real FFT along the token axis gives one coefficient per frequency 0 .. n // 2; with the orthonormal "
         "scaling their squared sizes add up to the sum of squares once each frequency that stands for a pair "
         "(itself and n - f) is counted twice.",
    mistakes=(
        Mistake("the power without counting mirror frequencies twice",
                "rfft keeps one of each pair of frequencies f and n - f; the entries must add up to the sum of squares.",
                lambda values: fourier.frequency_power(values) / torch.where(_mirrored(values), 2.0, 1.0)),
        Mistake("the constant or the n / 2 frequency doubled too",
                "only the frequencies 1 .. (n - 1) // 2 stand for a pair; the constant and, for even n, n / 2 have "
                "no mirror.",
                _nyquist_doubled),
        Mistake("the FFT without its orthonormal scaling",
                "the default FFT grows with n: scale it so that the entries add up to the sum of squares.",
                lambda values: fourier.frequency_power(values) * values.shape[0]),
        Mistake("sizes of the coefficients, not their squares",
                "power is a sum of squares: square the size of each coefficient.",
                lambda values: fourier.frequency_power(values).sqrt() * torch.where(_mirrored(values), 2 ** 0.5, 1.0)),
    ))


def _null_cases() -> list[Case]:
    t = torch.arange(128.0)
    mixed = torch.stack([torch.cos(2 * torch.pi * 3 * t / 128), t / 64, (t - 40).clamp(min=0) / 40,
                         torch.sin(2 * torch.pi * t / 128) + t / 128, -(t / 128) ** 2], dim=1) + 1.0
    neurons = circuits.token_to_neuron(noisy_addition(), 0)[:, :24]
    return [("on random smooth curves, frequencies 1-4", (smooth_curves(), [1, 2, 3, 4])),
            ("on waves, ramps and a bend, frequencies 1-3", (mixed, [1, 2, 3])),
            ("on neurons of a noisy addition checkpoint, frequencies 1-5", (neurons, [1, 2, 3, 4, 5]))]


def _pooled_power(values: Tensor) -> Tensor:
    """The whole map's power per frequency (every column's frequency_power added), the constant included."""
    return fourier.frequency_power(values.double()).flatten(1).sum(-1)


check_shares_against_monotone = exercise(
    "5.3", "the spectrum against a smooth null", fourier.shares_against_monotone, function="shares_against_monotone",
    cases=_null_cases, atol=1e-4,
    hint="two numbers from the same recipe: the share of the whole map's variance (every column together, the "
         "constant left out) at the listed frequencies, once for the curves and once for the best monotone curve "
         "through each of them, increasing or decreasing, whichever fits better.",
    mistakes=(
        Mistake("increasing fits only",
                "a neuron that falls with the token is just as monotone: fit both ways and keep the better fit.",
                lambda curves, freqs: (fourier.explained_variance(curves, list(freqs)),
                                       fourier.explained_variance(fourier.isotonic_fit(curves, True), list(freqs)))),
        Mistake("the median of per-curve shares, not the whole map's",
                "pool the power of every column before dividing, as variance_fractions does, so that large "
                "curves count in proportion.",
                lambda curves, freqs: (fourier.low_frequency_share(curves, freqs).median().item(),
                                       fourier.low_frequency_share(fourier.monotone_fit(curves), freqs).median().item())),
        Mistake("the constant counted in the variance",
                "the constant part is not variance: leave frequency 0 out of the denominator.",
                lambda curves, freqs: tuple((power[list(freqs)].sum() / power.sum()).item() for power in (
                    _pooled_power(curves), _pooled_power(fourier.monotone_fit(curves))))),
        Mistake("the fits' power divided by the curves' variance",
                "the null's share is a fraction of the null's own variance: divide the fitted curves' power by "
                "the fitted curves' total.",
                lambda curves, freqs: (fourier.explained_variance(curves, list(freqs)),
                                       (_pooled_power(fourier.monotone_fit(curves))[list(freqs)].sum()
                                        / _pooled_power(curves)[1:].sum()).item())),
    ))


def _sinusoid_cases() -> list[Case]:
    t = torch.arange(96.0)
    waves = torch.stack([3 + torch.cos(2 * torch.pi * 2 * t / 128 + 1.0), torch.sin(2 * torch.pi * 5 * t / 128),
                         t / 20, 2 + torch.cos(2 * torch.pi * t / 128) + 0.3 * torch.randn(96)], dim=1)
    neurons = circuits.token_to_neuron(noisy_addition(), 0)[:96, :20]
    return [("on waves and a ramp over tokens 0-95, periods of 128 tokens", (waves, 128, 6)),
            ("on noisy neurons over tokens 0-95, periods of 128 tokens", (neurons, 128, 8)),
            ("on random smooth curves, periods of their own 128 tokens", (smooth_curves(8), None, 4))]


def _over_the_sum_of_squares(curves: Tensor, period, max_freq: int) -> tuple[Tensor, Tensor]:
    """The reference's residual share measured against each column's sum of squares instead of its variance."""
    share, best = fourier.sinusoid_residual(curves, period, max_freq)
    flat = curves.double()
    return (share * ((flat - flat.mean(0)) ** 2).sum(0) / (flat ** 2).sum(0)).to(curves.dtype), best


check_sinusoid_residual = exercise(
    "5.4", "one wave per neuron", fourier.sinusoid_residual, function="sinusoid_residual", cases=_sinusoid_cases,
    atol=1e-4, rtol=1e-3,
    hint="for every frequency up to max_freq fit a constant, a cosine and a sine of that period to each column by "
         "least squares, keep the frequency with the smallest residual, and return the residual as a fraction "
         "of the column's variance, with the frequency.",
    mistakes=(
        Mistake("a cosine without its sine",
                "a wave can start anywhere in its cycle: the sine and the cosine together give it any phase.",
                lambda curves, period, max_freq: fourier.sinusoid_residual(curves, period, max_freq, ("1", "cos"))),
        Mistake("waves without a constant",
                "a neuron's curve has an offset; without a constant the fit spends its wave on it.",
                lambda curves, period, max_freq: fourier.sinusoid_residual(curves, period, max_freq, ("cos", "sin"))),
        Mistake("periods counted over the tokens given, not over `period`",
                "the curves may be only the first, well-sampled tokens of 128: a frequency f means a period of "
                "period / f tokens.",
                lambda curves, period, max_freq: fourier.sinusoid_residual(curves, None, max_freq)),
        Mistake("the residual over the sum of squares, not the variance",
                "divide by each column's variance around its mean, so that the offset does not count as explained.",
                _over_the_sum_of_squares),
    ))


def _group_cases() -> list[Case]:
    groups = torch.randint(0, 12, (40, 30))
    values = 5.0 + torch.randn(12)[groups] + 0.7 * torch.randn(40, 30)
    uneven = torch.cat([torch.zeros(200, dtype=torch.long), torch.arange(1, 21)])
    skewed = 2.0 + uneven.float() / 5 + torch.randn(220)
    diffs = torch.arange(64)[:, None] - torch.arange(64)[None, :]
    wave = 1.0 + torch.cos(2 * torch.pi * diffs / 64) + 0.02 * diffs + 0.2 * torch.randn(64, 64)
    return [("on 12 random groups", (values, groups)), ("on one large group and 20 single ones", (skewed, uneven)),
            ("on a wave of a - b grouped mod 64", (wave, diffs % 64)),
            ("on the same wave grouped by a - b itself, labels from -63 to 63 (the chapter's a + b - c labels are "
             "negative too)", (wave, diffs))]


check_explained_by_groups = exercise(
    "5.5", "what the logits depend on", fourier.explained_by_groups, function="explained_by_groups",
    cases=_group_cases, atol=1e-4,
    hint="replace every value by the mean of the values that share its label, and return one minus the variance "
         "left over as a fraction of the variance of the values.",
    mistakes=(
        Mistake("the share left unexplained",
                "the question is how much the label explains: one minus the residual share.",
                lambda values, groups: 1.0 - fourier.explained_by_groups(values, groups)),
        Mistake("each group's mean counted once, whatever its size",
                "every value is replaced by its group's mean, so a group weighs as many times as it has members.",
                lambda values, groups: (fourier.group_means(values, groups)[0].var() / values.double().var()).item()),
        Mistake("squares about zero, not about the mean",
                "variance is measured around the mean; an offset shared by every value explains nothing.",
                lambda values, groups: 1 - ((values.double().flatten() - fourier.group_means(values, groups)[0][
                    fourier.group_means(values, groups)[1]]) ** 2).mean().item() / (values.double() ** 2).mean().item()),
    ))


def _ablation_cases() -> list[Case]:
    model = noisy_model("addition", 0.02)
    with torch.no_grad():
        model.W_E.mul_(3.0)  # the skip path is small next to the head's maps: enlarge it so that it counts
        model.W_O.div_(3.0)
    tokens, targets = tasks.addition_pairs()
    pick = torch.randperm(len(tokens))[:1500]
    tokens, targets = tokens[pick], targets[pick]
    return [("with every map's sign flipped, exactly", (model, tokens, targets, lambda m: -m, 0)),
            ("keeping frequencies 1-8, within 1", (model, tokens, targets,
                                                   lambda m: fourier.keep_frequencies(m, range(1, 9)), 1)),
            ("with a degree-12 polynomial fit, within 2", (model, tokens, targets,
                                                           lambda m: fourier.polynomial_fit(m, 12), 2))]


def _skip_path_kept(model, tokens, targets, transform, tolerance) -> float:
    """The reference's neuron inputs with each position's own map put back as it was."""
    pre = circuits.neuron_inputs(model, tokens, circuits.attention_pattern_of(model, tokens), transform)
    for q in range(tokens.shape[1]):
        direct = circuits.direct_to_neuron(model, q)
        pre[:, q] += (direct - transform(direct))[tokens[:, q]]
    return circuits.accuracy_with_neuron_inputs(model, tokens, targets, pre, tolerance)


def _half_and_half(model, tokens, targets, transform, tolerance) -> float:
    """The inputs rebuilt with an idealised pattern: the first position on itself, the second half on each."""
    pattern = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).expand_as(circuits.attention_pattern_of(model, tokens))
    return circuits.accuracy_with_neuron_inputs(model, tokens, targets,
                                                circuits.neuron_inputs(model, tokens, pattern, transform), tolerance)


def _every_position(model, tokens, targets, transform, tolerance) -> float:
    """The reference's accuracy over every position: one without a target is never right."""
    share = (targets != IGNORE).float().mean().item()
    return circuits.accuracy_with_maps_replaced(model, tokens, targets, transform, tolerance) * share


check_accuracy_with_maps_replaced = exercise(
    "5.6", "ablate the maps, and the null", circuits.accuracy_with_maps_replaced,
    function="accuracy_with_maps_replaced", cases=_ablation_cases, atol=1e-6,
    hint="transform every map that feeds the neurons (through the head from each source position, and the skip "
         "path at each position), rebuild the neurons' inputs with the attention the model actually computes, put "
         "them in place of the MLP's pre-activations, and count the answers within the tolerance at the "
         "positions that have a target.",
    mistakes=(
        Mistake("the skip path left as it was",
                "each position's own token also reaches the neurons around the head; its map is replaced too.",
                _skip_path_kept),
        Mistake("attention taken as half and half",
                "rebuild the inputs with the pattern the model computes on each pair, not an idealised one.",
                _half_and_half),
        Mistake("the tolerance ignored",
                "an answer within `tolerance` of the target counts as right.",
                lambda model, tokens, targets, transform, tolerance: circuits.accuracy_with_maps_replaced(
                    model, tokens, targets, transform, 0)),
        Mistake("position 0 counted as a wrong answer",
                "position 0 has no target (it is IGNORE): count only the positions that have one.",
                _every_position),
    ))


