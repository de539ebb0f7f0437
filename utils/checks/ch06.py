"""The checkers of chapter 06: fibonacci."""

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

def _position_only_cases() -> list[Case]:
    cases = []
    for _ in range(2):
        model = fresh_model("fibonacci")
        with torch.no_grad():
            model.W_pos.mul_(10)  # a fresh W_pos is tiny; scale it so mistakes stand far above the tolerance
        cases.append(("on a fresh fibonacci model", (model,)))
    return cases


check_positional_qk_scores = exercise(
    "6.1", "the position-only QK circuit", circuits.positional_qk_scores, function="positional_qk_scores",
    kind="implementation", cases=_position_only_cases, atol=1e-4, rtol=1e-3,
    hint="only the positions: each position's embedding through the query weights, against each position's "
         "embedding through the key weights, scaled as the model scales its scores; rows are query positions, "
         "columns key positions, no token embeddings.",
    mistakes=(
        Mistake("the scores without the 1 / sqrt(d_head) scale",
                "the model divides every attention score by the square root of the head dimension.",
                lambda model: circuits.positional_qk_scores(model) * model.cfg.d_head ** 0.5),
        Mistake("rows and columns swapped",
                "rows are query positions (through W_Q), columns key positions (through W_K).",
                lambda model: circuits.positional_qk_scores(model).T),
        Mistake("the mean token embedding added to every position",
                "the question is what the positions alone contribute: leave the token embeddings out.",
                lambda model: circuits.positional_qk_scores(changed_copy(model, "fibonacci", "pos_embed.weight",
                                                                         lambda w: w + model.W_E.mean(0)))),
    ))


def _dropped_cases() -> list[Case]:
    model = noisy_model("fibonacci", 0.15)
    tokens, targets = tasks.fibonacci_sequences()
    pick = torch.randperm(len(tokens))[:1200]
    tokens, targets = tokens[pick], targets[pick]
    return [("with the keys before q - 1 dropped, on a noisy fibonacci checkpoint", (model, tokens, targets, [2, 3, 4])),
            ("with the key q - 1 dropped", (model, tokens, targets, [1])),
            ("with the query's own key dropped", (model, tokens, targets, [0]))]


def _not_renormalised(model, tokens, targets, offsets) -> dict:
    n = tokens.shape[1]
    dropped = sum(torch.arange(n)[:, None] - torch.arange(n)[None, :] == d for d in offsets).bool()
    hook = ("blocks.0.attn.hook_pattern", lambda pattern, hook: pattern.masked_fill(dropped, 0.0))
    return circuits.accuracy_and_loss_by_position(model, tokens, targets, [hook])


def _positions_dropped(model, tokens, targets, offsets) -> dict:
    n = tokens.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    dropped = sum((k == d) & (k <= q) for d in offsets).bool()
    hook = ("blocks.0.attn.hook_pattern", circuits.renormalised_without(dropped))
    return circuits.accuracy_and_loss_by_position(model, tokens, targets, [hook])


def _every_row_counted(model, tokens, targets, offsets) -> dict:
    """The reference's accuracy over every row: a row without a target is never right."""
    with_target = (targets != IGNORE).float().mean(0)
    return {pos: (accuracy * with_target[pos].item(), loss)
            for pos, (accuracy, loss) in circuits.accuracy_with_keys_dropped(model, tokens, targets, offsets).items()}


check_accuracy_with_keys_dropped = exercise(
    "6.2", "attend only to the operands", circuits.accuracy_with_keys_dropped, function="accuracy_with_keys_dropped",
    cases=_dropped_cases, atol=1e-4, rtol=1e-3,
    hint="hook the attention pattern; at every query position set the weight on the keys the given distances "
         "back to zero, let the rest of the row add up to one again, and measure accuracy and cross-entropy "
         "at each position over the rows that have a target there.",
    mistakes=(
        Mistake("the weights zeroed but the rows not renormalised",
                "a row of attention must still add up to one, or the head writes a shrunken mix: divide by "
                "what is left.",
                _not_renormalised),
        Mistake("key positions dropped, not distances back from the query",
                "an offset d names the key q - d of each query position q, a different key at every position.",
                _positions_dropped),
        Mistake("the padded rows counted as wrong answers",
                "a sequence that has ended has no target at that position: count only the rows whose target "
                "is not IGNORE.",
                _every_row_counted),
    ))


def _agreement_pairs() -> list[Case]:
    fib, add = noisy_model("fibonacci", 0.3), noisy_model("addition", 0.3)
    pairs = tasks.addition_pairs()[0]
    pairs = pairs[torch.randperm(len(pairs))[:2000]]
    return [("on 2,000 pairs, noisy fibonacci against noisy addition", (fib, add, pairs)),
            ("the other way round", (add, fib, pairs))]


check_answer_agreement = exercise(
    "6.3", "the two models, output for output", circuits.answer_agreement, function="answer_agreement",
    cases=_agreement_pairs, atol=1e-6,
    hint="run both models on the same pairs, take each model's answer (the most likely token) at the position "
         "that predicts the sum, and count how often the two answers are the same.",
    mistakes=(
        Mistake("the answers at position 0 compared",
                "position 0 has seen only the first number; the sum is predicted at position 1.",
                lambda model, other, pairs: circuits.answer_agreement(model, other, pairs, position=0)),
        Mistake("the share where both are right",
                "two models can agree on the same wrong answer: compare them with each other, not with the sum.",
                lambda model, other, pairs: (torch.stack([each(pairs)[:, 1].argmax(-1) for each in (model, other)])
                                             == pairs.sum(-1)).all(0).float().mean().item()),
        Mistake("the share of disagreement",
                "the question is how often they agree.",
                lambda model, other, pairs: 1.0 - circuits.answer_agreement(model, other, pairs)),
    ))


def _match_cases() -> list[Case]:
    fib = circuits.token_to_neuron(noisy_model("fibonacci", 0.15), 0)[:96, :40]
    add = circuits.token_to_neuron(noisy_addition(), 0)[:96, :50]
    smooth = smooth_curves(12) + 3.0 * torch.randn(12)
    return [("on noisy fibonacci neurons against noisy addition neurons", (fib, add)),
            ("on smooth curves with offsets against their negatives and others", (smooth, torch.cat(
                [-smooth[:, :4] + 0.5 * torch.randn(128, 4), smooth_curves(9) + 5.0], 1)))]


check_best_match = exercise(
    "6.4", "neuron for neuron", circuits.best_match, function="best_match", cases=_match_cases, atol=1e-4,
    hint="correlate every column of the first map with every column of the second (each centred on its mean and "
         "scaled to length one), and keep, for each column of the first, the largest correlation in size.",
    mistakes=(
        Mistake("the signed correlation",
                "a neuron whose curve is another's upside down reads the same feature; its output weights can "
                "flip the sign: take the size of the correlation.",
                lambda curves, others: circuits.correlations(curves, others).max(1).values.to(curves.dtype)),
        Mistake("curves not centred (a cosine similarity)",
                "a correlation is measured around each curve's mean; an offset shared by two curves is no match.",
                lambda curves, others: (F.normalize(curves.double(), dim=0).T @ F.normalize(others.double(), dim=0))
                .abs().max(1).values.to(curves.dtype)),
        Mistake("the mean correlation, not the best",
                "each neuron is paired with the one other neuron it follows best.",
                lambda curves, others: circuits.correlations(curves, others).abs().mean(1).to(curves.dtype)),
    ))


def _phase_cases() -> list[Case]:
    neurons = circuits.token_to_neuron(noisy_addition(), 0)[:, :16]
    odd = smooth_curves(6)[:127] + 2.0
    return [("on 16 noisy addition neurons", (neurons, 2 * torch.pi * torch.rand(65, 16))),
            ("on smooth curves over 127 tokens", (odd, 2 * torch.pi * torch.rand(64, 6)))]


def _given_the_angle(values: Tensor, phases: Tensor) -> Tensor:
    """Each coefficient set to its size times the angle: turned by the angle less its own."""
    own = torch.fft.rfft(values.double(), dim=0, norm="ortho").angle()
    return fourier.spectrum_turned(values, torch.polar(torch.ones_like(own), fourier.kept_real(phases, len(values)) - own))


check_phase_shifted = exercise(
    "6.5", "a null with the same spectrum", fourier.phase_shifted, function="phase_shifted", kind="implementation",
    cases=_phase_cases, atol=1e-4, rtol=1e-3,
    hint="go to the frequencies with the real FFT along the tokens, turn every coefficient by its angle (a "
         "complex number of size one), leave the constant (and the n / 2 frequency of an even n) alone, and "
         "come back with the inverse FFT at the same length and the same scaling.",
    mistakes=(
        Mistake("the constant (or the n / 2 frequency) turned too",
                "the constant is a real number; turning it changes the mean and throws part of it away.",
                lambda values, phases: fourier.spectrum_turned(values, torch.polar(torch.ones_like(phases.double()),
                                                                                  phases.double()))),
        Mistake("each coefficient given the angle, not turned by it",
                "turn each coefficient by its angle, so that the angle 0 gives the curve back.",
                _given_the_angle),
        Mistake("the forward and inverse FFT with different scalings",
                "use the same normalisation both ways, or the curve comes back scaled.",
                lambda values, phases: fourier.phase_shifted(values, phases) / len(values) ** 0.5),
    ))


