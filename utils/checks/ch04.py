"""The checkers of chapter 04: positions in QK."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from utils import circuits, fourier, models, proofs, tasks, train
from utils.checks.engine import (Attempt, Case, CheckFailed, Mistake, call_learner, check_case, compare,
                                 compare_float, compare_tensors, copies, diagnosis, exercise, matches, passed)
from utils.checks.fixtures import (fresh_model, noisy_addition, noisy_model, random_causal_pattern,
                                   random_models, smooth_curves)
from utils.tasks import IGNORE
from utils.checks.ch03 import _token_qk

def _positional_cases() -> list[Case]:
    noisy, fresh = noisy_model("max_of_list", 0.1), fresh_model("max_of_list")
    return [("on a noisy checkpoint at query position 5, key position 2", (noisy, 5, 2)),
            ("on a noisy checkpoint at query position 4, key position 0", (noisy, 4, 0)),
            ("on a fresh model at query position 3, key position 3", (fresh, 3, 3))]


def _pos_qk(model, q: int, k: int, key_side: int | None = None, scale: bool = True) -> Tensor:
    queries = (model.W_E + model.W_pos[q]) @ model.W_Q[0, 0]
    keys = (model.W_E + model.W_pos[k if key_side is None else key_side]) @ model.W_K[0, 0]
    return queries @ keys.T / (model.cfg.d_head ** 0.5 if scale else 1.0)


check_positional_qk_circuit = exercise(
    "4.1", "the position-aware QK circuit", circuits.full_qk_positional, function="positional_qk_circuit",
    kind="implementation", cases=_positional_cases, atol=1e-4,
    hint="the residual stream at a position is the token's embedding plus that position's embedding; the query side "
         "uses the query's position, the key side the key's, and the head scales the dot product.",
    mistakes=(
        Mistake("the token-only map (the positional embeddings left out)",
                "each side of the score starts from the residual stream at its own position, token plus position.",
                lambda model, q, k: _token_qk(model)),
        Mistake("the query's position added on the key side too",
                "the key sits at key_pos, so its residual stream carries the key position's embedding.",
                lambda model, q, k: _pos_qk(model, q, k, key_side=q)),
        Mistake("the score without the head's 1/sqrt(d_head) scale",
                "the head divides every query-key dot product by the square root of d_head before the softmax.",
                lambda model, q, k: _pos_qk(model, q, k, scale=False)),
        Mistake("the two positions swapped",
                "rows are query tokens at query_pos, columns key tokens at key_pos.",
                lambda model, q, k: _pos_qk(model, k, q)),
    ))


def _terms(model, q: int, k: int, scale: bool = True, query_means: str = "query", key_means: str = "key",
           centre_tokens: bool = True, centre: bool = True, key_pos_on_query: bool = False) -> dict[str, Tensor]:
    """The nine QK terms as a learner might build them, with one slip or none.

    `query_means` / `key_means` name the positions a side's positional mean runs over ("query": 1 .. n_ctx - 1,
    "key" or "all": every position); without `centre` the embeddings are split as stored (no shared part).
    """
    s = model.cfg.d_head ** 0.5 if scale else 1.0
    n = model.cfg.d_vocab

    def parts(pos: int, means: str) -> dict[str, Tensor]:
        if not centre:
            zero = torch.zeros_like(model.W_E)
            return {"const": zero, "token": model.W_E, "pos": model.W_pos[pos].expand(n, -1)}
        mean_pos = (model.W_pos[1:] if means == "query" else model.W_pos).mean(0)
        mean_token = model.W_E.mean(0) if centre_tokens else torch.zeros_like(mean_pos)
        return {"const": (mean_token + mean_pos).expand(n, -1), "token": model.W_E - mean_token,
                "pos": (model.W_pos[pos] - mean_pos).expand(n, -1)}

    queries = {a: v @ model.W_Q[0, 0] for a, v in parts(k if key_pos_on_query else q, query_means).items()}
    keys = {b: v @ model.W_K[0, 0] for b, v in parts(k, key_means).items()}
    return {f"{a}·{b}": (queries[a] @ keys[b].T / s).clone() for a in queries for b in keys}


check_qk_terms = exercise(
    "4.2", "the nine terms of the score", circuits.qk_score_terms, function="qk_terms",
    kind="implementation", cases=_positional_cases, atol=1e-4,
    hint="each side of the score is a shared part (the mean token embedding plus the mean positional embedding over "
         "the positions that side can hold) plus the token's and the position's differences from those means; "
         "multiply the sum out into nine products, scale each as the head does, and spread each to a full map.",
    mistakes=(
        Mistake("the terms without the head's 1/sqrt(d_head) scale",
                "the nine terms must add up to the scaled score of Exercise 4.1, so each carries the scale.",
                lambda model, q, k: _terms(model, q, k, scale=False)),
        Mistake("the embeddings split as stored, with no shared part taken out",
                "a vector every query shares can sit in W_E or in W_pos without changing the model; take the means "
                "out of both into the shared part, so the token and position parts hold only what differs.",
                lambda model, q, k: _terms(model, q, k, centre=False)),
        Mistake("the token embeddings left uncentred",
                "the mean token embedding is shared by every query and every key as much as the positions' mean "
                "is: it belongs in the shared part.",
                lambda model, q, k: _terms(model, q, k, centre_tokens=False)),
        Mistake("the query side's positional mean taken over position 0 too",
                "a query at position 0 sees only itself and chooses nothing: the query side's mean runs over the "
                "positions whose attention chooses between keys.",
                lambda model, q, k: _terms(model, q, k, query_means="all")),
        Mistake("the key side's positional mean taken over the query positions only",
                "a key can sit at any position a list holds, position 0 included.",
                lambda model, q, k: _terms(model, q, k, key_means="query")),
        Mistake("the key position's embedding on the query side",
                "the query sits at query_pos: its position part comes from that position's embedding.",
                lambda model, q, k: _terms(model, q, k, key_pos_on_query=True)),
    ))


def _term_table(model, q: int, k: int, strict_wins: bool = True, along: int = -1, scale: bool = True,
                whole_map: bool = False) -> dict[str, tuple[float, float]]:
    out = {}
    for name, term in _terms(model, q, k, scale=scale).items():
        n = term.shape[-1]
        wins = term[:, None, :] > term[:, :, None] if strict_wins else term[:, None, :] >= term[:, :, None]
        share = wins[:, torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)].float().mean().item()
        spread = term.std().item() if whole_map else term.std(along).mean().item()
        out[name] = (share, spread)
    return out


def _term_cases() -> list[Case]:
    noisy = noisy_model("max_of_list", 0.1)
    return [("on a noisy checkpoint at query position 5, key position 2", (noisy, 5, 2)),
            ("on a noisy checkpoint at query position 2, key position 0", (noisy, 2, 0)),
            ("on a fresh model at query position 4, key position 1", (fresh_model("max_of_list"), 4, 1))]


check_ordering_by_term = exercise(
    "4.3", "which term orders the keys?", circuits.ordering_by_term, function="ordering_by_term",
    cases=_term_cases, atol=1e-3,
    hint="for each term alone, count the strict wins of a larger key token over a smaller one within each query "
         "token's row, and measure how far the term moves along a row (over key tokens), averaged over the rows.",
    mistakes=(
        Mistake("ties counted as ordered",
                "a term that gives every key token the same score prefers none of them: count strict wins only.",
                lambda model, q, k: _term_table(model, q, k, strict_wins=False)),
        Mistake("the spread taken down a column (over query tokens)",
                "the question is how a term moves the keys against each other, so the spread runs over key tokens, "
                "along a row.",
                lambda model, q, k: _term_table(model, q, k, along=0)),
        Mistake("the spread of the whole map, not along each row",
                "a term that only changes from row to row moves no key against another; take the spread within "
                "each row, then average.",
                lambda model, q, k: _term_table(model, q, k, whole_map=True)),
        Mistake("terms without the head's 1/sqrt(d_head) scale",
                "the spreads are in units of attention score, which the head scales before the softmax.",
                lambda model, q, k: _term_table(model, q, k, scale=False)),
    ))


def _margins(model, q: int, same_position: bool = False, own_key: bool = True, pin_query_key: bool = True,
             floor: bool = True, reduce: str = "min") -> Tensor:
    """Worst (or mean) margin by gap, [query token, gap], with one of a learner's slips or none."""
    scores = torch.stack([_pos_qk(model, q, k) for k in range(q + 1)], dim=1)  # [t, k, v]
    vocab, n = scores.shape[0], q + 1
    t = torch.arange(vocab)[:, None, None, None]
    k1, k2 = torch.arange(n)[None, :, None, None], torch.arange(n)[None, None, :, None]
    out = torch.full((vocab, vocab), float("inf"))
    for gap in range(1, vocab):
        c = torch.arange(gap, vocab)
        b = c - gap
        margin = scores[:, :, None, c] - scores[:, None, :, b]
        ok = (k1 == k2) if same_position else (k1 != k2)
        if not own_key:
            ok = ok & (k1 < q) & (k2 < q)
        if pin_query_key:
            ok = ok & ((k1 != q) | (c == t)) & ((k2 != q) | (b == t))
        if floor:
            ok = ok & (c >= t)
        ok = ok.expand_as(margin)
        if reduce == "min":
            out[:, gap] = margin.masked_fill(~ok, float("inf")).flatten(1).min(-1).values
        else:
            count = ok.flatten(1).sum(-1)
            mean = (margin * ok).flatten(1).sum(-1) / count.clamp(min=1)
            out[:, gap] = torch.where(count > 0, mean, torch.tensor(float("inf")))
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
                lambda model, q: _margins(model, q, same_position=True)),
        Mistake("the query's own position left out of the keys",
                "a query attends to itself too: key positions run up to and including the query's.",
                lambda model, q: _margins(model, q, own_key=False)),
        Mistake("any token allowed at the query's position",
                "the key at the query's own position holds the query token, whatever the rest of the list holds.",
                lambda model, q: _margins(model, q, pin_query_key=False)),
        Mistake("a larger key below the query token allowed",
                "the larger key plays the list's maximum, and the query token is in the list, so it cannot be "
                "larger than that key.",
                lambda model, q: _margins(model, q, floor=False)),
        Mistake("the mean margin, not the worst",
                "a failure happens on the worst configuration, not on the average one: take the least margin.",
                lambda model, q: _margins(model, q, reduce="mean")),
    ))


def _need(model, direct: bool = True, positions: bool = True, every_rival: bool = True,
          over_positions: str = "min") -> Tensor:
    """attention_needed as a learner might compute it, with one slip or none."""
    vocab, n = model.cfg.d_vocab, model.cfg.n_ctx
    pos = model.W_pos if positions else torch.zeros_like(model.W_pos)
    ov = (model.W_E[None] + pos[:, None]) @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U  # [k, x, o]
    diff = ov[:, :, :, None] - ov[:, :, None, :]  # [k, x, m, o]
    lead = diff.min(0).values if over_positions == "min" else diff.mean(0)
    tokens = torch.arange(vocab)
    a, b = lead[tokens, tokens][:, None, :], lead.transpose(0, 1)  # [m, 1, o], [m, r, o]
    if direct:
        d_all = torch.stack([(model.W_E + pos[q]) @ model.W_U for q in range(1, n)])
        d_lead = (d_all[:, :, :, None] - d_all[:, :, None, :]).min(0).values  # [t, m, o]
        d_lead = d_lead.masked_fill(~(tokens[:, None, None] <= tokens[None, :, None]), float("inf"))
        d = d_lead.min(0).values[:, None, :]
    else:
        d = torch.zeros(vocab, 1, vocab)
    slope, needed = a - b, -(b + d)
    p = torch.where(slope > 0, needed / slope, torch.where(a + d > 0, -torch.inf, torch.inf))
    p = p.masked_fill(torch.eye(vocab, dtype=torch.bool)[:, None, :], -torch.inf)
    if not every_rival:
        p = p.masked_fill(~torch.eye(vocab, dtype=torch.bool)[None, :, :], -torch.inf)  # only o = r
    need = p.max(-1).values.clamp(min=0.0)
    return need.masked_fill(tokens[None, :] >= tokens[:, None], float("inf"))


def _need_cases() -> list[Case]:
    return [("on the shipped checkpoint with noise on its weights", (noisy_model("max_of_list", 0.1),)),
            ("on the shipped checkpoint with more noise", (noisy_model("max_of_list", 0.3),))]


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
                lambda model: _need(model, direct=False)),
        Mistake("the positional embeddings left out",
                "a key's value is read from token plus position, and so is the direct path: take the worst "
                "position, not none.",
                lambda model: _need(model, positions=False)),
        Mistake("only the runner-up as a rival",
                "the maximum must beat every other token's logit, not only the runner-up's.",
                lambda model: _need(model, every_rival=False)),
        Mistake("key positions averaged, not the worst",
                "the maximum can sit at any position; a need that holds wherever it sits takes the worst one.",
                lambda model: _need(model, over_positions="mean")),
    ))


