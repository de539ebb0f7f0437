"""The checkers of chapter 04: positions in QK."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from utils import circuits
from utils.checks.engine import Case, Mistake, exercise
from utils.checks.fixtures import changed_copy, fresh_model, noisy_model


def _positional_cases() -> list[Case]:
    noisy, fresh = noisy_model("max_of_list", 0.1), fresh_model("max_of_list")
    return [("on a noisy checkpoint at query position 5, key position 2", (noisy, 5, 2)),
            ("on a noisy checkpoint at query position 4, key position 0", (noisy, 4, 0)),
            ("on a fresh model at query position 3, key position 3", (fresh, 3, 3))]


check_positional_qk_circuit = exercise(
    "4.1", "the position-aware QK circuit", circuits.full_qk_positional, function="positional_qk_circuit",
    kind="implementation", cases=_positional_cases, atol=1e-4,
    hint="the residual stream at a position is the token's embedding plus that position's embedding; the query side "
         "uses the query's position, the key side the key's, and the head scales the dot product.",
    mistakes=(
        Mistake("the token-only map (the positional embeddings left out)",
                "each side of the score starts from the residual stream at its own position, token plus position.",
                lambda model, q, k: circuits.full_qk_tokens(model)),
        Mistake("the query's position added on the key side too",
                "the key sits at key_pos, so its residual stream carries the key position's embedding.",
                lambda model, q, k: circuits.full_qk_positional(model, q, q)),
        Mistake("the score without the head's 1/sqrt(d_head) scale",
                "the head divides every query-key dot product by the square root of d_head before the softmax.",
                lambda model, q, k: circuits.full_qk_positional(model, q, k, scale=False)),
        Mistake("the two positions swapped",
                "rows are query tokens at query_pos, columns key tokens at key_pos.",
                lambda model, q, k: circuits.full_qk_positional(model, k, q)),
    ))


def _terms(model, q: int, k: int, query: dict | None = None, key: dict | None = None) -> dict[str, Tensor]:
    """The nine terms of the reference, with one side's split replaced."""
    return circuits.qk_terms_of_parts(model, query or circuits.residual_parts(model, q, "query"),
                                      key or circuits.residual_parts(model, k, "key"))


def _uncentred(model, pos: int) -> dict[str, Tensor]:
    """The embeddings as stored, with an empty shared part."""
    return {"const": torch.zeros_like(model.W_E), **circuits.stored_parts(model, pos)}


def _tokens_uncentred(model, pos: int, side: str) -> dict[str, Tensor]:
    """The course's split with the mean token embedding moved from the shared part back into the tokens'."""
    parts, mean_token = circuits.residual_parts(model, pos, side), model.W_E.mean(0)
    return {"const": parts["const"] - mean_token, "token": parts["token"] + mean_token, "pos": parts["pos"]}


check_qk_terms = exercise(
    "4.2", "the nine terms of the score", circuits.qk_score_terms, function="qk_terms",
    kind="implementation", cases=_positional_cases, atol=1e-4,
    hint="split each side into a shared part (the token mean plus that side's positional mean) and the token's and "
         "the position's differences from it; the nine products, scaled as the head scales, add up to the score.",
    mistakes=(
        Mistake("the terms without the head's 1/sqrt(d_head) scale",
                "the nine terms must add up to the scaled score of Exercise 4.1, so each carries the scale.",
                lambda model, q, k: {name: term * model.cfg.d_head ** 0.5
                                     for name, term in circuits.qk_score_terms(model, q, k).items()}),
        Mistake("the embeddings split as stored, with no shared part taken out",
                "a vector every query shares can sit in W_E or in W_pos without changing the model; take the means "
                "out of both into the shared part, so the token and position parts hold only what differs.",
                lambda model, q, k: _terms(model, q, k, _uncentred(model, q), _uncentred(model, k))),
        Mistake("the token embeddings left uncentred",
                "the mean token embedding is shared by every query and every key as much as the positions' mean "
                "is: it belongs in the shared part.",
                lambda model, q, k: _terms(model, q, k, _tokens_uncentred(model, q, "query"),
                                           _tokens_uncentred(model, k, "key"))),
        Mistake("the query side's positional mean taken over position 0 too",
                "a query at position 0 sees only itself and chooses nothing: the query side's mean runs over the "
                "positions whose attention chooses between keys.",
                lambda model, q, k: _terms(model, q, k, query=circuits.residual_parts(model, q, "key"))),
        Mistake("the key side's positional mean taken over the query positions only",
                "a key can sit at any position a list holds, position 0 included.",
                lambda model, q, k: _terms(model, q, k, key=circuits.residual_parts(model, k, "query"))),
        Mistake("the key position's embedding on the query side",
                "the query sits at query_pos: its position part comes from that position's embedding.",
                lambda model, q, k: _terms(model, q, k, query=circuits.residual_parts(model, k, "query"))),
    ))


def _term_table(model, q: int, k: int, share: Callable = circuits.fraction_ordered,
                spread: Callable = circuits.key_spread) -> dict[str, tuple[float, float]]:
    """ordering_by_term with another share of ordered pairs or another spread."""
    return {name: (share(term), spread(term)) for name, term in circuits.qk_score_terms(model, q, k).items()}


def _term_cases() -> list[Case]:
    noisy = noisy_model("max_of_list", 0.1)
    return [("on a noisy checkpoint at query position 5, key position 2", (noisy, 5, 2)),
            ("on a noisy checkpoint at query position 2, key position 0", (noisy, 2, 0)),
            ("on a fresh model at query position 4, key position 1", (fresh_model("max_of_list"), 4, 1))]


check_ordering_by_term = exercise(
    "4.3", "which term orders the keys?", circuits.ordering_by_term, function="ordering_by_term",
    cases=_term_cases, atol=1e-3,
    hint="for each term alone, count the strict wins of a larger key token over a smaller one within each query "
         "token's row, and measure how far the term moves along a row (the sample standard deviation over key "
         "tokens), averaged over the rows.",
    mistakes=(
        Mistake("ties counted as ordered",
                "a term that gives every key token the same score prefers none of them: count strict wins only.",
                lambda model, q, k: _term_table(model, q, k, share=lambda term: 1.0 - circuits.fraction_ordered(-term))),
        Mistake("the spread taken down a column (over query tokens)",
                "the question is how a term moves the keys against each other, so the spread runs over key tokens, "
                "along a row.",
                lambda model, q, k: _term_table(model, q, k, spread=lambda term: term.std(0).mean().item())),
        Mistake("the spread of the whole map, not along each row",
                "a term that only changes from row to row moves no key against another; take the spread within "
                "each row, then average.",
                lambda model, q, k: _term_table(model, q, k, spread=lambda term: term.std().item())),
        Mistake("the population standard deviation (dividing by the number of key tokens)",
                "the spread asked for is the sample standard deviation, torch's default, which divides by one fewer "
                "than the number of key tokens.",
                lambda model, q, k: _term_table(model, q, k,
                                                spread=lambda term: term.std(-1, correction=0).mean().item())),
        Mistake("terms without the head's 1/sqrt(d_head) scale",
                "the spreads are in units of attention score, which the head scales before the softmax.",
                lambda model, q, k: {name: (share, spread * model.cfg.d_head ** 0.5)
                                     for name, (share, spread) in circuits.ordering_by_term(model, q, k).items()}),
    ))


def _margins(model, q: int, rules: Callable) -> Tensor:
    """worst_margin_by_gap over the configurations `rules(t, k1, k2, b, c)` allows (k1 != k2 always)."""
    return circuits.worst_margin_by_gap(model, q, possible=lambda t, k1, k2, b, c: (k1 != k2) & rules(t, k1, k2, b, c))


def _mean_margin(model, q: int) -> Tensor:
    """The reference's margins by gap (circuits.gap_margins) averaged over what a list can hold, not the least."""
    scores, vocab = circuits.qk_score_table(model)[q, :, : q + 1], model.cfg.d_vocab
    out = torch.full((vocab, vocab), torch.inf)
    for gap in range(1, vocab):
        margins = circuits.gap_margins(scores, gap, circuits.list_configurations(q)).flatten(1)
        held = margins.isfinite()
        out[:, gap] = torch.where(held.any(-1), margins.where(held, 0.0).sum(-1) / held.sum(-1).clamp(min=1), torch.inf)
    return out


def _margin_cases() -> list[Case]:
    noisy = noisy_model("max_of_list", 0.1)
    return [("on a noisy checkpoint at query position 5", (noisy, 5)),
            ("on a noisy checkpoint at query position 1", (noisy, 1)),
            ("on a fresh model at query position 3", (fresh_model("max_of_list"), 3))]


check_worst_margin_by_gap = exercise(
    "4.4", "the worst case across key positions", circuits.worst_margin_by_gap, function="worst_margin_by_gap",
    cases=_margin_cases, atol=1e-4,
    hint="for each query token and gap, go over every pair of distinct key positions up to the query's own and "
         "every pair of key tokens that far apart, keep only what a list can hold (the key at the query's "
         "position is the query token, the larger key is not below it) and take the least margin; +inf where "
         "nothing is left.",
    mistakes=(
        Mistake("both keys at one position (the within-map comparison)",
                "the maximum competes with keys at other positions: the two keys of a pair sit at different "
                "positions.",
                lambda model, q: circuits.worst_margin_by_gap(model, q, same_position=True)),
        Mistake("the query's own position left out of the keys",
                "a query attends to itself too: key positions run up to and including the query's.",
                lambda model, q: _margins(model, q, lambda t, k1, k2, b, c: (k1 < q) & (k2 < q) & (c >= t))),
        Mistake("any token allowed at the query's position",
                "the key at the query's own position holds the query token, whatever the rest of the list holds.",
                lambda model, q: _margins(model, q, lambda t, k1, k2, b, c: c >= t)),
        Mistake("a larger key below the query token allowed",
                "the larger key plays the list's maximum, and the query token is in the list, so it cannot be "
                "larger than that key.",
                lambda model, q: _margins(model, q, lambda t, k1, k2, b, c: ((k1 != q) | (c == t))
                                          & ((k2 != q) | (b == t)))),
        Mistake("the mean margin, not the worst",
                "a failure happens on the worst configuration, not on the average one: take the least margin.",
                _mean_margin),
    ))


def _need(model, lead: Tensor | None = None, direct: Tensor | None = None, runner_up_only: bool = False) -> Tensor:
    """attention_needed from its pieces, with the OV leads or the direct path's replaced, or one rival only."""
    lead = circuits.worst_ov_lead(circuits.ov_logit_table(model)) if lead is None else lead
    shares = circuits.shares_needed(lead, circuits.worst_direct_lead(model) if direct is None else direct)
    if runner_up_only:
        shares = shares.masked_fill(~torch.eye(shares.shape[0], dtype=torch.bool)[None], -torch.inf)
    return circuits.need_from_shares(shares)


def _mean_ov_lead(model) -> Tensor:
    """worst_ov_lead over one key position only: the mean of the OV table over key positions."""
    return circuits.worst_ov_lead(circuits.ov_logit_table(model).mean(0, keepdim=True))


def _unclipped(model) -> Tensor:
    """attention_needed without the clip at 0: where every share wins, the largest of the rivals' shares (below 0)."""
    lead, direct = circuits.worst_ov_lead(circuits.ov_logit_table(model)), circuits.worst_direct_lead(model)
    need = circuits.attention_needed(model)
    return torch.where(need == 0, circuits.shares_needed(lead, direct).max(-1).values, need)


def _runner_up_as_maximum(model):
    """A copy of `model` whose token 62 has token 63's embedding: attending to the runner-up 62 writes what attending
    to the maximum 63 writes, so every share wins for (63, 62), and the need there is the clip at 0."""
    def copy_row(w: Tensor) -> Tensor:
        w = w.clone()
        w[62] = w[63]
        return w
    return changed_copy(model, "max_of_list", "embed.weight", copy_row)


def _need_cases() -> list[Case]:
    return [("on the shipped checkpoint with noise on its weights", (noisy_model("max_of_list", 0.1),)),
            ("on the shipped checkpoint with more noise", (noisy_model("max_of_list", 0.3),)),
            ("on a noisy checkpoint whose token 62 has token 63's embedding (every share wins for 63 over 62)",
             (_runner_up_as_maximum(noisy_model("max_of_list", 0.1)),))]


check_attention_needed = exercise(
    "4.5", "the attention the maximum needs", circuits.attention_needed, function="attention_needed",
    cases=_need_cases, atol=1e-4,
    hint="with share p on the maximum and the rest on the runner-up, each rival's logit gap is a straight line in p "
         "made of the maximum's OV row, the runner-up's and the direct path, each at its worst position (and the "
         "direct path at its worst query token); solve each line for the least p, take the largest over the "
         "rivals, and clip at zero.",
    mistakes=(
        Mistake("the direct path left out",
                "the query's own embedding reaches the logits around the head, so it adds its own (worst) gap to "
                "every line.",
                lambda model: _need(model, direct=torch.zeros(model.cfg.d_vocab, model.cfg.d_vocab))),
        Mistake("the positional embeddings left out",
                "a key's value is read from token plus position, and so is the direct path: take the worst "
                "position, not none.",
                lambda model: circuits.attention_needed(changed_copy(model, "max_of_list", "pos_embed.weight",
                                                                           torch.zeros_like))),
        Mistake("only the runner-up as a rival",
                "the maximum must beat every other token's logit, not only the runner-up's.",
                lambda model: _need(model, runner_up_only=True)),
        Mistake("key positions averaged, not the worst",
                "the maximum can sit at any position; a need that holds wherever it sits takes the worst one.",
                lambda model: _need(model, lead=_mean_ov_lead(model))),
        Mistake("the need not clipped at 0",
                "where the maximum wins whatever share it gets, every rival's line is positive already at share 0 "
                "(or never needs more): the least share it needs is 0, not a negative number or -inf.",
                _unclipped),
    ))


