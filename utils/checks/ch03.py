"""The checkers of chapter 03: QK and OV circuits."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from utils import circuits
from utils.checks.engine import Attempt, Case, Mistake, check_case, exercise, passed
from utils.checks.fixtures import fresh_model, noisy_model


def _max_of_list_model() -> list[Case]:
    """One freshly initialised max_of_list model: the only input of the exercises on its circuits."""
    return [("on a freshly initialised max_of_list model", (fresh_model("max_of_list"),))]


check_token_qk_circuit = exercise(
    "3.1", "the token-only QK circuit", circuits.full_qk_tokens, function="token_qk_circuit",
    kind="implementation", cases=_max_of_list_model, atol=1e-4,
    hint="a query token is read by W_Q and a key token by W_K, each after its embedding; the head scales their "
         "dot product before the softmax.",
    mistakes=(
        Mistake("the map transposed (rows are key tokens)",
                "row q must hold the scores query token q gives every key token, so the query's side comes first.",
                lambda model: circuits.full_qk_tokens(model).T),
        Mistake("the score without the head's 1/sqrt(d_head) scale",
                "the head divides every query-key dot product by the square root of d_head before the softmax.",
                lambda model: circuits.full_qk_tokens(model, scale=False)),
        Mistake("W_Q and W_K without the embedding",
                "the map is from tokens to tokens, so each side starts from the token embedding.",
                lambda model: model.W_Q[0, 0] @ model.W_K[0, 0].T / model.cfg.d_head ** 0.5),
    ))


def full_ov_product(model) -> torch.Tensor:
    """The full OV circuit as the exercise asks for it: a plain tensor (circuits.full_ov gives it factored)."""
    return circuits.full_ov(model).AB


@exercise("3.2", "the full OV circuit", circuits.full_ov, kind="implementation", replacement=full_ov_product,
          hint="follow an attended token through the head: its embedding, then the value and output weights, then "
               "the unembedding; rows are attended tokens, columns output logits, and the result is a plain tensor.",
          mistakes=(
              Mistake("the map transposed (rows are output logits)",
                      "row a must be what attending to token a adds to every logit, so the embedding comes first.",
                      lambda model: (model.W_E @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U).T),
              Mistake("the unembedding on the wrong side",
                      "the residual stream is read out into logits at the end of the product, not at its start.",
                      lambda model: model.W_U.T @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_E.T),
              Mistake("W_O before W_V",
                      "the head first reads a value from the attended position, then writes it back with the output "
                      "weights: W_V acts before W_O.",
                      lambda model: model.W_E @ model.W_O[0, 0] @ model.W_V[0, 0] @ model.W_U),
              Mistake("the circuit without W_O",
                      "the value vectors live in the head's own space; the output weights write them to the "
                      "residual stream before W_U can read them.",
                      lambda model: model.W_E @ model.W_V[0, 0] @ model.W_U),
          ))
def check_full_ov_circuit(fn: Callable, ex: Attempt) -> None:
    check_case(fn, ex, (fresh_model("max_of_list"),), reference=full_ov_product, atol=1e-4)
    passed(ex)


def _copying_cases() -> list[Case]:
    # in this order each named mistake is first caught on a case where it gives its own value
    matrices = [("the identity", torch.eye(6)), ("a rotation by 90°", torch.tensor([[0.0, -1.0], [1.0, 0.0]])),
                ("minus the identity", -torch.eye(6)), ("a random 10 x 10 matrix", torch.randn(10, 10)),
                ("a random matrix plus 3 I", torch.randn(10, 10) + 3 * torch.eye(10))]
    return [(f"on {where}", (matrix,)) for where, matrix in matrices]


check_copying_score = exercise(
    "3.3", "the eigenvalue copying score", circuits.copying_score, function="copying_score",
    kind="implementation", cases=_copying_cases, atol=1e-4,
    hint="eigenvalues of a real matrix come in complex pairs: add them all up (the sum is real, it is the trace), "
         "divide by the total of their sizes, and return a Python float.",
    mistakes=(
        Mistake("the size of the sum of the eigenvalues, not its real value",
                "a head that flips every logit must score -1: keep the sign of the sum, and take sizes only in "
                "the denominator.",
                lambda m: (torch.linalg.eigvals(m).sum().abs() / torch.linalg.eigvals(m).abs().sum()).item()),
        Mistake("singular values in place of eigenvalues",
                "singular values are never negative, so they cannot tell copying from flipping or rotating; the "
                "score needs the eigenvalues, which keep direction.",
                lambda m: (torch.linalg.svdvals(m).sum() / torch.linalg.svdvals(m).sum()).item()),
        Mistake("the trace over the Frobenius norm",
                "the numerator is right (the trace is the sum of the eigenvalues), but the denominator is the sum "
                "of the eigenvalues' sizes, not a norm of the entries.",
                lambda m: (m.trace() / m.norm()).item()),
    ))


def _ordering_cases() -> list[Case]:
    # the first map rises in zigzags along its rows and unevenly down its columns: on it the reversed comparison,
    # the map read by columns, a key compared with itself and neighbours only each give a value of their own
    zigzag = torch.tensor([0.0, 2.0, 1.0, 3.0, 5.0, 4.0]) + torch.tensor([0.0, 20.0, 10.0])[:, None]
    maps = [("a map rising in zigzags along its rows", zigzag),
            ("an increasing map", torch.arange(5.0).repeat(3, 1)), ("a decreasing map", -torch.arange(5.0).repeat(3, 1)),
            ("a map with ties", torch.tensor([[0.0, 1.0, 1.0], [2.0, 0.0, 3.0]])), ("a random 7 x 9 map", torch.randn(7, 9)),
            ("the token-only QK map of a fresh model", circuits.full_qk_tokens(fresh_model("max_of_list")).detach())]
    return [(f"on {where}", (scores,)) for where, scores in maps]


check_fraction_ordered = exercise(
    "3.4", "is a larger key always preferred?", circuits.fraction_ordered, function="fraction_ordered",
    cases=_ordering_cases, atol=1e-6,
    hint="compare every pair of columns b < c within each row, count the pairs where the later column scores "
         "strictly more, and divide by the number of comparisons (rows times pairs).",
    mistakes=(
        Mistake("ties counted as ordered",
                "a key that only matches a smaller key's score is not preferred to it: count strict wins only.",
                lambda s: 1.0 - circuits.fraction_ordered(-s)),  # c >= b: every pair but those where b wins
        Mistake("each key compared with itself too",
                "a key never beats itself, so the pairs b = c only dilute the share: take b < c.",
                lambda s: circuits.fraction_ordered(s) * (s.shape[-1] - 1) / (s.shape[-1] + 1)),  # n more pairs, none won
        Mistake("the comparison reversed (counting the pairs where the smaller key wins)",
                "a row orders its keys when the larger key c scores strictly more than the smaller key b.",
                lambda s: circuits.fraction_ordered(-s)),
        Mistake("the map read by columns",
                "rows are query tokens and the comparisons run along a row, between key tokens.",
                lambda s: circuits.fraction_ordered(s.T)),
        Mistake("neighbouring keys only",
                "the question is about every pair b < c, not only c = b + 1: a row can rise step by step and "
                "still rank far-apart keys wrongly, and the other way round.",
                lambda s: (s[:, 1:] > s[:, :-1]).float().mean().item()),
    ))


def _agreement_cases() -> list[Case]:
    fresh = fresh_model("max_of_list")
    with torch.no_grad():
        fresh.W_Q.mul_(8.0)  # a sharper pattern than at initialisation, so the model's choice is not a coin toss
    lists = [torch.randint(0, 64, (600, 6)), torch.randint(0, 64, (600, 6)), torch.randint(0, 16, (600, 5))]
    return [("on a freshly initialised model", (fresh, lists[0])),
            ("on the shipped checkpoint with noise on its weights", (noisy_model("max_of_list", 0.1), lists[1])),
            ("on the noisy checkpoint, lists of 5 tokens below 16", (noisy_model("max_of_list", 0.3), lists[2]))]


def _agreement(model, lists: Tensor, qk: Tensor, query: Tensor) -> float:
    """The reference's agreement with the token-only choice made from map `qk` for query tokens `query`."""
    return circuits.same_token_share(lists, circuits.best_key(qk, query, lists), circuits.attended_key(model, lists))


check_token_only_agreement = exercise(
    "3.5", "the token-only choice against the model's", circuits.token_only_agreement,
    function="token_only_agreement", cases=_agreement_cases, atol=1e-6,
    hint="two choices per list: the key whose token the token-only map scores highest for the last position's "
         "token, and the key the model's own attention pattern weighs most from the last position; count the "
         "lists on which both hold the same token.",
    mistakes=(
        Mistake("the first position taken as the query",
                "the model predicts the maximum at the last position, so the query token is the list's last one.",
                lambda model, lists: _agreement(model, lists, circuits.full_qk_tokens(model), lists[:, :1])),
        Mistake("the token-only map read with query and key swapped",
                "rows of the map are query tokens, columns key tokens: index the row by the query.",
                lambda model, lists: _agreement(model, lists, circuits.full_qk_tokens(model).T, lists[:, -1:])),
        Mistake("the token-only choice compared with the list's maximum",
                "the question is whether the map explains the model's choice (its attention pattern), not whether "
                "it solves the task.",
                lambda model, lists: circuits.same_token_share(
                    lists, circuits.best_key(circuits.full_qk_tokens(model), lists[:, -1:], lists), lists.argmax(-1))),
        Mistake("positions compared instead of tokens",
                "the token-only map cannot tell two copies of a token apart; when a list repeats a token, either "
                "copy is the same key token.",
                lambda model, lists: (circuits.best_key(circuits.full_qk_tokens(model), lists[:, -1:], lists)
                                      == circuits.attended_key(model, lists)).float().mean().item()),
    ))


def _mix_cases() -> list[Case]:
    model = noisy_model("max_of_list", 0.1)
    a, b = torch.randint(0, 64, (64, 6)), torch.randint(0, 64, (64, 6))
    fresh = fresh_model("max_of_list")
    with torch.no_grad():
        fresh.W_pos.mul_(20.0)  # a fresh W_pos is tiny: scale it so that it shows
        fresh.W_Q.mul_(8.0)
    c, d = torch.randint(0, 64, (64, 6)), torch.randint(0, 64, (64, 6))
    return [("on a noisy checkpoint with alpha = 0.3, beta = 0.7", (model, a, b, 0.3, 0.7)),
            ("on a noisy checkpoint with alpha = 2, beta = -0.5", (model, a, b, 2.0, -0.5)),
            ("on a fresh model with alpha = 1.5, beta = 0.5", (fresh, c, d, 1.5, 0.5))]


def _mix_run_with_its_own_pattern(model, a, b, alpha, beta) -> float:
    _, combined = circuits.frozen_mix_logits(model, a, b, alpha, beta)
    mixed = circuits.logits_with_embeddings(model, a, alpha * model.W_E[a] + beta * model.W_E[b])
    return (mixed - combined).abs().max().item()


def _b_with_its_own_pattern(model, a, b, alpha, beta) -> float:
    mixed, combined = circuits.frozen_mix_logits(model, a, b, alpha, beta)
    frozen_b = circuits.logits_with_frozen_pattern(model, b, circuits.attention_pattern_of(model, a))
    return (mixed - (combined - beta * frozen_b + beta * model(b))).abs().max().item()


def _mean_gap(*args) -> float:
    mixed, combined = circuits.frozen_mix_logits(*args)
    return (mixed - combined).abs().mean().item()


check_frozen_mix_gap = exercise(
    "3.6", "affine, not linear", circuits.frozen_mix_gap, function="frozen_mix_gap", cases=_mix_cases, atol=1e-3,
    hint="three runs, all with the attention pattern of a held fixed: one on the mixed token embeddings (replace "
         "what the embedding hook gives), one on a, one on b; return the largest absolute difference between the "
         "first and the same mix of the other two.",
    mistakes=(
        Mistake("the mixed input run with its own attention pattern",
                "the claim is about the model with its pattern frozen: the run on the mix must use a's pattern too.",
                _mix_run_with_its_own_pattern),
        Mistake("b's logits taken with b's own pattern",
                "all three runs share one frozen pattern (a's); with b's own the comparison mixes two different "
                "linear maps.",
                _b_with_its_own_pattern),
        Mistake("the whole residual stream mixed (W_pos scaled by alpha + beta as well)",
                "the test is about the token embeddings: the positional embedding stays as the model adds it, "
                "once, whatever the coefficients.",
                lambda *args: circuits.frozen_mix_gap(*args, scale_pos=True)),
        Mistake("the mean deviation, not the largest",
                "a test of an identity looks for the worst entry: take the largest absolute difference over the "
                "batch, the positions and the logits.",
                _mean_gap),
    ))


