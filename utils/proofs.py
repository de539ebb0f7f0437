"""Lower bounds on max_of_list's accuracy, proved from its circuits (chapter 08).

The model has one attention-only layer, so the logits at the last position q = n - 1 of a list
x of length n factor into circuits (circuit_pieces):

    logits = D[x_q] + sum_k p_k OV[k, x_k],    p = softmax over k <= q of S[x_q, k, x_k],

with D the direct path, OV the OV circuit at every key position and S the QK scores of the
last query. A *cell* is a set of lists sharing their last token t, their maximum m and a bound
`lo` on every other token (all non-maximum tokens <= lo = m - gap). A strategy decides, for
every cell, whether every list in it is answered right; the lists of the certified cells are
then counted (cell_count), never run. Both strategies are sound: a certified cell holds no
wrong list (tests/test_proofs.py checks it against brute force).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from utils import tasks


def circuit_pieces(model, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The last position's circuits for lists of length n: (S [t, k, y], OV [k, y, c], D [t, c]).

    S[t, k, y]: attention score from the query (token t at q = n - 1) to token y at key position k;
    OV[k, y, c]: what attending to token y at position k adds to logit c; D[t, c]: the direct path.
    """
    q = n - 1
    residual = model.W_E[None] + model.W_pos[:n, None]  # [k, y, d_model]
    queries = residual[q] @ model.W_Q[0, 0]  # [t, d_head]
    keys = residual @ model.W_K[0, 0]  # [k, y, d_head]
    scores = torch.einsum("td,kyd->tky", queries, keys) / model.cfg.d_head**0.5
    ov = residual @ model.W_V[0, 0] @ model.W_O[0, 0] @ model.W_U
    return scores, ov, residual[q] @ model.W_U


def logits_from_circuits(pieces: tuple[Tensor, Tensor, Tensor], lists: Tensor) -> Tensor:
    """The last position's logits [batch, vocab] of `lists` [batch, n], rebuilt from circuit_pieces."""
    scores, ov, direct = pieces
    n = lists.shape[1]
    k = torch.arange(n)
    pattern = scores[lists[:, -1:], k, lists].softmax(-1)  # [batch, k]
    return direct[lists[:, -1]] + torch.einsum("bk,bkc->bc", pattern, ov[k, lists])


def brute_force(model, n: int, from_circuits: bool = False, batch_size: int = 40_000) -> dict:
    """Accuracy at the last position over every list of length n, by running them all.

    Returns {"accuracy", "wrong" (the lists answered wrong, [n_wrong, n]), "runs" (lists run),
    "seconds"}. With `from_circuits`, the logits come from logits_from_circuits instead of the
    model (the same numbers, a few times faster).
    """
    start, vocab = time.perf_counter(), model.cfg.d_vocab
    pieces = circuit_pieces(model, n) if from_circuits else None
    right, wrong = 0, []
    with torch.no_grad():
        for first in torch.arange(vocab).split(max(1, batch_size // vocab ** (n - 1))):
            rest = tasks.all_lists(n - 1, vocab)
            lists = torch.cat([first.repeat_interleave(len(rest))[:, None], rest.repeat(len(first), 1)], 1)
            logits = logits_from_circuits(pieces, lists) if from_circuits else model(lists)[:, -1]
            ok = logits.argmax(-1) == lists.max(-1).values
            right += int(ok.sum())
            wrong.append(lists[~ok])
    return {"accuracy": right / vocab**n, "wrong": torch.cat(wrong), "runs": vocab**n,
            "seconds": time.perf_counter() - start}


def brute_force_accuracy(model, n: int) -> float:
    """Share of all lists of length n on which the model's last position predicts the maximum."""
    return brute_force(model, n)["accuracy"]


# ------------------------------------------------------------------ the explanation as a replacement
def logits_attention_on_max(model, lists: Tensor) -> Tensor:
    """The last position's logits [batch, vocab] of `lists` [batch, n] with its attention replaced:
    equal shares on every copy of the list's maximum, none elsewhere (a hook on the pattern)."""
    is_max = (lists == lists.max(-1, keepdim=True).values).float()
    wanted = is_max / is_max.sum(-1, keepdim=True)  # [batch, key]

    def on_max(pattern, hook):
        pattern = pattern.clone()
        pattern[:, :, -1] = wanted[:, None]
        return pattern

    return model.run_with_hooks(lists, fwd_hooks=[("blocks.0.attn.hook_pattern", on_max)])[:, -1]


def logits_with_replacements(model, lists: Tensor, attention: bool = False, ov: bool = False,
                             direct: bool = False) -> Tensor:
    """The last position's logits [batch, vocab] with parts of the model replaced by the explanation.

    `attention`: equal shares on the copies of the maximum; `ov`: each OV row keeps its own token's
    logit and puts its mean over the other logits everywhere else (it only copies); `direct`: the
    direct path replaced by its mean over query tokens (it carries no information about the list).
    """
    scores, ov_table, direct_table = circuit_pieces(model, lists.shape[1])
    if ov:
        vocab = ov_table.shape[-1]
        own = ov_table.diagonal(dim1=1, dim2=2)  # [k, y]
        rest = (ov_table.sum(-1) - own) / (vocab - 1)
        eye = torch.eye(vocab, dtype=torch.bool)
        ov_table = torch.where(eye, own[..., None], rest[..., None])
    if direct:
        direct_table = direct_table.mean(0, keepdim=True).expand_as(direct_table)
    logits = logits_from_circuits((scores, ov_table, direct_table), lists)
    if attention:
        is_max = (lists == lists.max(-1, keepdim=True).values).float()
        pattern = is_max / is_max.sum(-1, keepdim=True)
        k = torch.arange(lists.shape[1])
        logits = direct_table[lists[:, -1]] + torch.einsum("bk,bkc->bc", pattern, ov_table[k, lists])
    return logits


# ------------------------------------------------------------------ counting
def cell_count(vocab: int, n: int, t: int, m: int, lo: int) -> int:
    """How many lists of length n have last token t, maximum m and every other token <= lo (< m).

    The first n - 1 positions hold m or a token <= lo; if t != m (then t <= lo), at least one of
    them holds m. -1 for lo leaves only copies of m.
    """
    if not (lo < m < vocab) or (t != m and t > lo):
        return 0
    q = n - 1
    return (lo + 2) ** q if t == m else (lo + 2) ** q - (lo + 1) ** q


def certified_count(largest_other: Tensor, n: int) -> int:
    """Lists of length n covered by certified cells: largest_other[t, m] is the largest `lo` certified
    for last token t and maximum m (every cell with a smaller lo is then certified too), -2 for none."""
    vocab = largest_other.shape[0]
    return sum(cell_count(vocab, n, t, m, int(largest_other[t, m]))
               for t in range(vocab) for m in range(t, vocab) if largest_other[t, m] >= -1)


def enumerated_certified(largest_other: Tensor, n: int) -> Tensor:
    """The lists certified_count counts, enumerated one by one, [count, n] (for small vocabularies)."""
    lists = tasks.all_lists(n, largest_other.shape[0])
    maximum, last = lists.max(-1).values, lists[:, -1]
    others = lists.masked_fill(lists == maximum[:, None], -1).max(-1).values  # -1: only copies of the max
    return lists[others <= largest_other[last, maximum]]


def _largest_certified(ok: Tensor, t: int) -> Tensor:
    """From ok[m, lo + 1] (cell certified, lo from -1), the largest lo whose cells at and below are all
    certified, [m]; -2 where none is. For t != m only lo >= t is a cell."""
    vocab = ok.shape[0]
    los = torch.arange(-1, vocab)
    m = torch.arange(vocab)[:, None]
    real = (los[None] < m) & ((m == t) | (los[None] >= t))
    ok = ok | ~real  # cells that no list fills cannot fail
    prefix = ok.long().cumprod(-1).bool() & real
    best = torch.where(prefix, los[None].expand_as(prefix), torch.full_like(prefix, -2, dtype=torch.long))
    out = best.max(-1).values
    out[:t] = -2  # a maximum below the last token is no list
    return out


# ------------------------------------------------------------------ strategy 1: worst attention, worst margins
def _least_attention(pieces: tuple[Tensor, Tensor, Tensor], lo: int) -> Tensor:
    """Least share of the last position's attention on the maximum, [vocab (last token t), vocab (max m)].

    Over every list of the cell (t, m, lo): e^A / (e^A + sum_{k<q} e^{B_k} + [t != m] e^{S[t,q,t]}),
    with A the least score of m at any position it can hold (any k < q if t != m; the query position
    q if t = m) and B_k the largest score of a token <= lo at position k. 0 where no list fits the cell.
    """
    scores = pieces[0]
    vocab, q = scores.shape[0], scores.shape[1] - 1
    t, m = torch.arange(vocab)[:, None], torch.arange(vocab)[None, :]
    least_max = torch.where(t == m, scores[:, q].diagonal()[:, None],
                            scores[:, :q].amin(1) if q > 0 else torch.full((vocab, vocab), torch.inf))  # [t, m]
    if lo >= 0:
        others = scores[:, :q, : lo + 1].amax(-1).exp().sum(-1)[:, None]  # [t, 1]
    else:
        others = torch.zeros(vocab, 1)
    own = torch.where(t == m, 0.0, scores[:, q].diagonal().exp()[:, None])
    share = least_max.exp() / (least_max.exp() + others + own)
    fits = (m > lo) & ((t == m) | (t <= lo))
    return torch.where(fits, share, torch.zeros(()))


def _least_margin(pieces: tuple[Tensor, Tensor, Tensor], lo: int) -> Tensor:
    """Strategy 1's least logit margin of the maximum over every rival, [vocab (t), vocab (m)].

    min over c != m of D[t, m] - D[t, c] + min(p a + (1 - p) b, a), with p least_attention_on_max,
    a the least OV margin of m over c at any position m can hold, b the least OV margin over c of a
    token <= lo at a position k < q (and of t at q when t != m). Positive means the cell is
    certified; +inf where no list fits it. Sound because the margin is linear in the split p.
    """
    scores, ov, direct = pieces
    vocab, q = scores.shape[0], scores.shape[1] - 1
    tokens = torch.arange(vocab)
    lead = ov[:, :, :, None] - ov[:, :, None, :]  # [k, y, m, c]: OV margin of m over c from token y at k
    own = lead[:, tokens, tokens]  # [k, m, c]
    a_any = own[:q].amin(0) if q > 0 else torch.full((vocab, vocab), torch.inf)  # t != m: m somewhere before q
    a_last = own.amin(0)  # t = m: m at q, maybe before it too
    if lo >= 0 and q > 0:
        b_rest = lead[:q, : lo + 1].amin((0, 1))
    else:  # no other token: p is 1 and b does not count
        b_rest = torch.zeros(vocab, vocab)
    p = _least_attention(pieces, lo)
    out = torch.full((vocab, vocab), torch.inf)
    for t in range(vocab):
        a = torch.where((tokens == t)[:, None], a_last, a_any)  # [m, c]
        b = torch.where((tokens == t)[:, None], b_rest, torch.minimum(b_rest, lead[q, t]))
        d = direct[t, tokens, None] - direct[t][None, :]  # [m, c]
        margin = d + torch.minimum(p[t][:, None] * a + (1 - p[t][:, None]) * b, a)
        out[t] = margin.masked_fill(torch.eye(vocab, dtype=torch.bool), torch.inf).amin(-1)
    fits = (tokens[None] > lo) & ((tokens[:, None] == tokens[None]) | (tokens[:, None] <= lo))
    return out.masked_fill(~fits, torch.inf)


def least_attention_on_max(model, n: int, lo: int) -> Tensor:
    """Strategy 1's least attention on the maximum for lists of length n whose other tokens are <= lo,
    [vocab (last token t), vocab (maximum m)] (see _least_attention; 0 where no list fits)."""
    return _least_attention(circuit_pieces(model, n), lo)


def least_margin(model, n: int, lo: int) -> Tensor:
    """Strategy 1's least logit margin of the maximum for lists of length n whose other tokens are <= lo,
    [vocab (t), vocab (m)] (see _least_margin; +inf where no list fits)."""
    return _least_margin(circuit_pieces(model, n), lo)


def worst_case_bound(model, n: int) -> dict:
    """Strategy 1 at length n: {"accuracy" (a lower bound), "largest_other" [t, m], "seconds"}."""
    start = time.perf_counter()
    pieces = circuit_pieces(model, n)
    vocab = model.cfg.d_vocab
    ok = torch.stack([_least_margin(pieces, lo) > 0 for lo in range(-1, vocab)], -1)  # [t, m, lo + 1]
    largest = torch.stack([_largest_certified(ok[t], t) for t in range(vocab)])
    return {"accuracy": certified_count(largest, n) / vocab**n, "largest_other": largest,
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ strategy 2: each cell's exact worst case
def cell_worst_margins(pieces: tuple[Tensor, Tensor, Tensor], t: int) -> Tensor:
    """For last token t, the exact least margin weight of every cell, [vocab - t (m = t ...), vocab + 1 (lo + 1), vocab (c)].

    The margin of m over c is positive exactly when sum_k e^{S_k} (OV-margin_k + D-margin) > 0 (the
    softmax's denominator is positive), a sum with one term per position. Every position k < q
    holds m or any token <= lo independently, so the least sum over the cell is the sum of each
    position's least term, with one position forced to m when t != m. Entry > 0 for every c != m
    means every list of the cell is answered right. lo runs from -1 (only copies of m); rows start
    at m = t (a smaller maximum is no list).
    """
    scores, ov, direct = (x.double() for x in pieces)
    vocab, q = scores.shape[0], scores.shape[1] - 1
    maxima = torch.arange(t, vocab)
    weight = (scores[t] - scores[t].max()).exp()  # [k, y]
    d = direct[t, maxima][:, None] - direct[t][None, :]  # [m, c]
    lead = ov[:, :, maxima, None] - ov[:, :, None, :] + d  # [k, y, m, c]
    term = weight[:, :, None, None] * lead  # [k, y, m, c]
    on_max = term[:, maxima, torch.arange(len(maxima))]  # [k, m, c]: position k holds m
    query = term[q, t]  # [m, c]: the query position holds t
    if q == 0:
        return query[:, None, :].expand(len(maxima), vocab + 1, vocab).clone()
    inf = torch.full((q, 1, len(maxima), vocab), torch.inf, dtype=term.dtype)
    rest = torch.cat([inf, term[:q].cummin(1).values], 1)  # [k, lo + 1, m, c]: least token <= lo at k
    either = torch.minimum(on_max[:q, None], rest)  # [k, lo + 1, m, c]
    total = query[None] + either.sum(0)  # [lo + 1, m, c]
    forced = (on_max[:q, None] - either).amin(0)  # the cheapest position to force to m
    total = torch.where((maxima == t)[None, :, None], total, total + forced)
    return total.transpose(0, 1).float()


def cell_bound(model, n: int) -> dict:
    """Strategy 2 at length n: {"accuracy" (a lower bound), "largest_other" [t, m], "seconds"}."""
    start = time.perf_counter()
    pieces = circuit_pieces(model, n)
    vocab = model.cfg.d_vocab
    rows = []
    for t in range(vocab):
        eye = torch.eye(vocab, dtype=torch.bool)[t:, None, :]
        ok = torch.ones(vocab, vocab + 1, dtype=torch.bool)
        ok[t:] = (cell_worst_margins(pieces, t).masked_fill(eye, torch.inf) > 0).all(-1)  # [m, lo + 1]
        rows.append(_largest_certified(ok, t))
    largest = torch.stack(rows)
    return {"accuracy": certified_count(largest, n) / vocab**n, "largest_other": largest,
            "seconds": time.perf_counter() - start}


def uncertified_lists(largest_other: Tensor, n: int, t: int, m: int) -> Tensor:
    """The lists of length n with last token t and maximum m that the certified cells leave out, [count, n]."""
    vocab, lo = largest_other.shape[0], int(largest_other[t, m])
    heads = tasks.all_lists(n - 1, m + 1)
    lists = torch.cat([heads, torch.full((len(heads), 1), t)], 1)
    lists = lists[lists.max(-1).values == m]
    others = lists.masked_fill(lists == m, -1).max(-1).values
    return lists[others > lo]


def finish_by_brute_force(model, n: int, largest_other: Tensor) -> dict:
    """The exact accuracy at length n: the certified count, plus the uncertified lists run through the
    circuits. {"accuracy", "wrong" [n_wrong, n], "runs" (lists run), "seconds"}."""
    start, vocab = time.perf_counter(), model.cfg.d_vocab
    pieces = circuit_pieces(model, n)
    right, runs, wrong = certified_count(largest_other, n), 0, []
    for t in range(vocab):
        for m in range(t, vocab):
            lists = uncertified_lists(largest_other, n, t, m)
            if len(lists):
                ok = logits_from_circuits(pieces, lists).argmax(-1) == m
                right, runs = right + int(ok.sum()), runs + len(lists)
                wrong.append(lists[~ok])
    wrong = torch.cat(wrong) if wrong else torch.zeros(0, n, dtype=torch.long)
    return {"accuracy": right / vocab**n, "wrong": wrong, "runs": runs, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ cost
def forward_flops(model, n: int) -> int:
    """Multiply-adds of one run of the one-layer model on a list of length n (embedding lookups free)."""
    d_model, d_head, vocab = model.cfg.d_model, model.cfg.d_head, model.cfg.d_vocab
    return n * (3 * d_model * d_head + d_head * d_model) + 2 * n * n * d_head + n * d_model * vocab


def strategy_flops(model, n: int, strategy: str) -> int:
    """Multiply-adds a strategy needs at length n, counted from the tensors it builds (order of magnitude).

    "brute force": vocab^n runs of the model; "worst case": the pieces plus, for each of the vocab + 1
    values of lo, a [t, m, c] margin table; "cells": the pieces plus a [k, y, m, c] table per last token.
    """
    vocab, d = model.cfg.d_vocab, model.cfg.d_model
    pieces = n * vocab * d * (3 * d + 2 * vocab) + n * vocab * vocab * d
    if strategy == "brute force":
        return vocab**n * forward_flops(model, n)
    if strategy == "worst case":
        return pieces + (vocab + 1) * (n * vocab**3 + 4 * vocab**3)
    if strategy == "cells":
        return pieces + vocab * (4 * n * vocab**3)
    raise ValueError(f"unknown strategy {strategy!r}: 'brute force', 'worst case' or 'cells'")


def lost_by_gap(largest_other: Tensor, n: int) -> Tensor:
    """Lists of length n the certified cells leave out, by the gap between the maximum and the runner-up,
    [vocab] (a count; gap 0, a tie, is never lost: a tied maximum is in the cell with lo = -1 ... lo = m - 1)."""
    vocab = largest_other.shape[0]
    lost = torch.zeros(vocab, dtype=torch.float64)
    for t in range(vocab):
        for m in range(t, vocab):
            lo = int(largest_other[t, m])
            for r in range(max(lo, -1) + 1, m):  # runner-up exactly r: cells r and r - 1 differ by those lists
                lost[m - r] += cell_count(vocab, n, t, m, r) - cell_count(vocab, n, t, m, r - 1)
    return lost


def list_fraction_by_gap(vocab: int, n: int) -> Tensor:
    """Share of all lists of length n whose two largest values differ by g, [vocab] (g = 0: a tie)."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for m in range(vocab):
        for r in range(m):  # one copy of m, the runner-up exactly r
            counts[m - r] += n * ((r + 1) ** (n - 1) - r ** (n - 1))
        counts[0] += (m + 1) ** n - m**n - n * m ** (n - 1)  # two copies of m at least
    return (counts / vocab**n).float()

