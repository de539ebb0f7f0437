"""Lower bounds on max_of_list's accuracy, proved from its circuits (chapter 08).

The model has one attention-only layer, so the logits at the last position q = n - 1 of a list
x of length n factor into circuits (circuit_pieces, every bias included):

    logits = D[x_q] + sum_k p_k OV[k, x_k],    p = softmax over k <= q of S[x_q, k, x_k],

with D the direct path, OV the OV circuit at every key position and S the QK scores of the
last query. A *cell* is a set of lists sharing their last token t, their maximum m and a bound
`lo` on every other token (all non-maximum tokens <= lo = m - gap). A strategy decides, for
every cell, whether every list in it is answered right; the lists of the certified cells are
then counted (cell_count), never run.

What is proved is about the model as it runs: in float32, with its own order of summation. The
circuits are evaluated in float64, and a cell is certified only when its worst margin clears the
rounding allowance (rounding_allowance): a standard bound on the float32 error of every dot
product, sum and softmax in the forward pass, derived from the sizes of the terms summed. So a
certified cell holds no list that the float32 model answers wrong (tests/api/test_proofs.py checks it
against brute force, on near-tie, sharp-attention, biased and damaged models).
"""

from __future__ import annotations

import math
import time

from utils import runtime  # noqa: F401  (one torch thread; freed memory back after every cell)
import torch
from torch import Tensor

from utils import circuits, tasks

FLOAT32_UNIT = 2.0**-24  # u: the relative error of one float32 rounding (round to nearest)
FLOAT64_UNIT = 2.0**-53
EXP_ERROR = 4 * 2.0**-23  # float32 exp within 4 units in the last place (torch's vectorised exp claims 1-2)
SMALLEST_NORMAL = 2.0**-126  # below it float32 exp may return a subnormal or 0: an absolute error


def gamma(length: int, unit: float = FLOAT32_UNIT) -> float:
    """gamma_n = n u / (1 - n u): a dot product or sum of n terms computed in floating point, in any
    order (fused multiply-adds included), differs from the exact one by at most gamma_n times the sum
    of the absolute values of its terms (Higham, Accuracy and Stability of Numerical Algorithms, 3.1)."""
    return length * unit / (1 - length * unit)


def _weights(model) -> dict[str, Tensor]:
    """The one layer's weights and biases, head 0 (W_Q [d_model, d_head], ..., b_U [vocab])."""
    return {"W_E": model.W_E, "W_pos": model.W_pos, "W_Q": model.W_Q[0, 0], "W_K": model.W_K[0, 0],
            "W_V": model.W_V[0, 0], "W_O": model.W_O[0, 0], "W_U": model.W_U, "b_Q": model.b_Q[0, 0],
            "b_K": model.b_K[0, 0], "b_V": model.b_V[0, 0], "b_O": model.b_O[0], "b_U": model.b_U}


def _checked_weights(model) -> dict[str, Tensor]:
    """_weights in float64, after checking that the model is what the proof covers: one attention-only
    layer, one head, no LayerNorm."""
    cfg = model.cfg
    if cfg.n_layers != 1 or cfg.n_heads != 1 or not cfg.attn_only or cfg.normalization_type is not None:
        raise ValueError("the bounds cover one-layer, one-head, attention-only models without LayerNorm; got "
                         f"n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, attn_only={cfg.attn_only}, "
                         f"normalization_type={cfg.normalization_type}")
    return {name: w.detach().double() for name, w in _weights(model).items()}


def circuit_pieces(model, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The last position's circuits for lists of length n, in float64: (S [t, k, y], OV [k, y, c], D [t, c]).

    S[t, k, y]: attention score from the query (token t at q = n - 1) to token y at key position k,
    (x W_Q + b_Q) . (x W_K + b_K) / sqrt(d_head); OV[k, y, c]: what attending to token y at position k
    adds to logit c, (x W_V + b_V) W_O W_U (the pattern sums to 1, so b_V rides along with every key);
    D[t, c]: the direct path x W_U plus the constant b_O W_U + b_U. Every bias of the model is in them.
    """
    w = _checked_weights(model)
    q = n - 1
    scores = circuits.qk_score_table(model, dtype=torch.float64, biases=True)[q, :, :n]
    ov = circuits.ov_logit_table(model, dtype=torch.float64, biases=True)[:n]
    direct = (w["W_E"] + w["W_pos"][q]) @ w["W_U"] + w["b_O"] @ w["W_U"] + w["b_U"]
    return scores, ov, direct


def rounding_allowance(model, n: int) -> dict:
    """How far the float32 model's last-position logits can be from the circuits' exact ones, lists of length n.

    The model (TransformerLens's native attention) computes, in float32: x = W_E[y] + W_pos[k]; Q, K, V =
    x W + b; scores = Q K^T / sqrt(d_head); softmax; z = pattern V; z W_O + b_O added to x; then x W_U + b_U.
    Each dot product of length L (a bias counts as one more term) errs by at most gamma_L times the sum of
    its absolute products; the error already in its inputs is carried through by |W|. Returns
    {"score" [t, k, y]: bound on the error of each attention score, "logit" [t, c]: bound on the error of
    each logit once the scores are taken as given, "float64": the circuits' own float64 error (a scalar,
    added to every margin), "pattern": the softmax's relative error}. The float32 model then answers a list
    right whenever, with every score moved by up to its allowance against the maximum, the exact margin of
    the maximum over each rival c exceeds logit[t, m] + logit[t, c] + float64.
    """
    w = _checked_weights(model)
    absw = {name: x.abs() for name, x in w.items()}
    u, q, d_head, d_model = FLOAT32_UNIT, n - 1, model.cfg.d_head, model.cfg.d_model

    def linear(error_in: Tensor, size_in: Tensor, name: str, bias: str) -> Tensor:
        """Error of fl(x~ W + b) against x W + b, given |x~ - x| <= error_in and |x~| <= size_in."""
        return error_in @ absw[name] + gamma(absw[name].shape[0] + 1) * (size_in @ absw[name] + absw[bias])

    residual = w["W_E"][None] + w["W_pos"][:n, None]  # [k, y, d_model]
    e_x = u * residual.abs()  # one rounding: token plus position
    a_x = residual.abs() + e_x
    queries, keys = residual[q] @ w["W_Q"] + w["b_Q"], residual @ w["W_K"] + w["b_K"]
    values = residual @ w["W_V"] + w["b_V"]
    e_q, e_k, e_v = (linear(e_x[q], a_x[q], "W_Q", "b_Q"), linear(e_x, a_x, "W_K", "b_K"),
                     linear(e_x, a_x, "W_V", "b_V"))
    a_q, a_k, a_v = queries.abs() + e_q, keys.abs() + e_k, values.abs() + e_v
    # the score: a dot product of length d_head, then one scaling (a float32 reciprocal and a product)
    products = torch.einsum("td,kyd->tky", a_q, a_k)
    e_dot = (torch.einsum("td,kyd->tky", e_q, a_k) + torch.einsum("td,kyd->tky", queries.abs(), e_k)
             + gamma(d_head) * products)
    e_s = (e_dot * (1 + gamma(2)) + gamma(2) * products) / math.sqrt(d_head)
    a_s = products * (1 + gamma(d_head)) / math.sqrt(d_head) + e_s
    # softmax subtracts the row's largest score (one more rounding of the difference)
    row_largest = a_s.amax((1, 2))[:, None, None]
    score = e_s + u * (a_s + row_largest)
    score = score + 2.0**-40 * (a_s + row_largest)  # the float64 scores of circuit_pieces
    # softmax: exp (EXP_ERROR, and an absolute SMALLEST_NORMAL where it underflows), a sum of n terms,
    # a reciprocal and a product: p~ = p' (1 + theta) + eta, p' the exact softmax of the float32 scores
    theta = (1 + EXP_ERROR) * (1 + gamma(2)) / ((1 - EXP_ERROR) * (1 - gamma(n - 1))) - 1
    eta = 2 * SMALLEST_NORMAL
    # z = pattern V, a dot product of length n over the keys (the masked keys add exact zeros)
    largest_v, largest_e_v = a_v.amax((0, 1)), e_v.amax((0, 1))  # [d_head]: every key the list can hold
    mass = 1 + theta + n * eta  # at most the sum of |p~|
    e_z = largest_e_v + (theta + n * eta) * largest_v + gamma(n) * mass * largest_v
    a_z = values.abs().amax((0, 1)) + e_z
    e_o = linear(e_z, a_z, "W_O", "b_O")
    a_o = values.abs().amax((0, 1)) @ absw["W_O"] + absw["b_O"] + e_o
    e_h = e_x[q] + e_o + u * (a_x[q] + a_o)  # [t, d_model]: the residual stream plus the head's output
    a_h = residual[q].abs() + a_o + e_h
    logit = e_h @ absw["W_U"] + gamma(d_model + 1) * (a_h @ absw["W_U"] + absw["b_U"])  # [t, c]
    # circuit_pieces and the margins are float64 sums of at most a few hundred terms, each no larger than
    # the sizes above: 2^-40 of them is far more than their rounding (gamma_300 in float64 is 2^-44)
    sizes = a_h @ absw["W_U"] + absw["b_U"]
    return {"score": score, "logit": logit, "float64": 2.0**-40 * 4 * sizes.max().item(), "pattern": theta}


def logit_error_bound(model, lists: Tensor) -> Tensor:
    """How far the float32 model's last-position logits of `lists` [batch, n] can be from the circuits'
    exact ones, [batch, vocab]: rounding_allowance's logit part, plus what the scores' errors can do to the
    pattern (each p_k moves by at most a factor e^{2 delta}, delta the largest score error of the list),
    (e^{2 delta} - 1) sum_k p_k |OV[k, x_k, c] - the attention's logit c|."""
    n = lists.shape[1]
    scores, ov, direct = circuit_pieces(model, n)
    allowance = rounding_allowance(model, n)
    k, last = torch.arange(n), lists[:, -1]
    pattern = scores[last[:, None], k, lists].softmax(-1)  # [batch, k]
    rows = ov[k, lists]  # [batch, k, c]
    read = torch.einsum("bk,bkc->bc", pattern, rows)
    spread = torch.einsum("bk,bkc->bc", pattern, (rows - read[:, None]).abs())
    delta = allowance["score"][last[:, None], k, lists].amax(-1, keepdim=True)  # [batch, 1]
    return allowance["logit"][last] + torch.expm1(2 * delta) * spread + allowance["float64"]


def logits_from_circuits(pieces: tuple[Tensor, Tensor, Tensor], lists: Tensor) -> Tensor:
    """The last position's logits [batch, vocab] of `lists` [batch, n], rebuilt from circuit_pieces
    (in their dtype: float64, the exact logits of the model's weights, up to float64 rounding)."""
    scores, ov, direct = pieces
    n = lists.shape[1]
    k = torch.arange(n)
    pattern = scores[lists[:, -1:], k, lists].softmax(-1)  # [batch, k]
    return direct[lists[:, -1]] + torch.einsum("bk,bkc->bc", pattern, ov[k, lists])


def brute_force(model, n: int, from_circuits: bool = False, batch_size: int = 40_000) -> dict:
    """Accuracy at the last position over every list of length n, by running them all.

    Returns {"accuracy", "wrong" (the lists answered wrong, [n_wrong, n]), "runs" (lists run),
    "seconds"}. With `from_circuits`, the logits come from logits_from_circuits instead of the model:
    exact arithmetic on the model's weights, which can differ from the float32 model on a near tie.
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
    return logits_with_last_row(model, lists, is_max / is_max.sum(-1, keepdim=True))


def logits_with_last_row(model, lists: Tensor, row: Tensor) -> Tensor:
    """The last position's logits [batch, vocab] with the last query's attention (every head) set to `row`
    [batch, key]."""
    def replace(pattern, hook):
        pattern = pattern.clone()
        pattern[:, :, -1] = row[:, None]
        return pattern

    return model.run_with_hooks(lists, fwd_hooks=[("blocks.0.attn.hook_pattern", replace)])[:, -1]


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
        pattern = (is_max / is_max.sum(-1, keepdim=True)).to(ov_table.dtype)
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


def certified_count(largest_other: Tensor, n: int, count=None) -> int:
    """Lists of length n covered by certified cells: largest_other[t, m] is the largest `lo` certified
    for last token t and maximum m (every cell with a smaller lo is then certified too), -2 for none.
    `count(vocab, n, t, m, lo)` counts a cell's lists (cell_count by default)."""
    vocab, count = largest_other.shape[0], count or cell_count
    return sum(count(vocab, n, t, m, int(largest_other[t, m]))
               for t in range(vocab) for m in range(t, vocab) if largest_other[t, m] >= -1)


def enumerated_certified(largest_other: Tensor, n: int) -> Tensor:
    """The lists certified_count counts, enumerated one by one, [count, n] (for small vocabularies)."""
    lists = tasks.all_lists(n, largest_other.shape[0])
    maximum, last = lists.max(-1).values, lists[:, -1]
    others = lists.masked_fill(lists == maximum[:, None], -1).max(-1).values  # -1: only copies of the max
    return lists[others <= largest_other[last, maximum]]


def largest_certified(ok: Tensor) -> Tensor:
    """From ok[t, m, lo + 1] (whether the cell of last token t, maximum m and other tokens <= lo is certified, lo
    from -1), the largest lo per (t, m) whose cells at and below it are all certified, [t, m]; -2 where none is."""
    return torch.stack([_largest_certified(ok[t], t) for t in range(ok.shape[0])])


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
def least_attention_of_pieces(pieces: tuple[Tensor, Tensor, Tensor], lo: int, score_error: Tensor | None = None) -> Tensor:
    """Least share of the last position's attention on the maximum, [vocab (last token t), vocab (max m)].

    Over every list of the cell (t, m, lo). Extra copies of the maximum only raise its share, so the least
    share has one copy of m and the largest score of a token <= lo at every other position before q:
    1 / (1 + sum_{k < q, k != j} e^{B_k - A_j} + [t != m] e^{S[t, q, t] - A_j}), with B_k the largest score
    of a token <= lo at k and A_j the score of m at its position j, least over j (any j < q when t != m;
    j = q when t = m, and then every k < q holds a rival). With `score_error` [t, k, y], each score is moved
    against the maximum by up to its error (the float32 model's scores). 0 where no list fits the cell.
    """
    scores = pieces[0].double()
    error = torch.zeros_like(scores) if score_error is None else score_error
    low, high = scores - error, scores + error
    vocab, q = scores.shape[0], scores.shape[1] - 1
    t, m = torch.arange(vocab)[:, None], torch.arange(vocab)[None, :]
    if lo >= 0 and q > 0:
        rival = high[:, :q, : lo + 1].amax(-1)  # [t, k]
    else:
        rival = torch.full((vocab, max(q, 1)), -torch.inf, dtype=scores.dtype)[:, :q]
    own = high[:, q].diagonal()  # [t]: the query's own key, a rival when t != m
    # t = m: the maximum at the query, a rival at every position before it
    at_query = 1 / (1 + (rival - low[:, q].diagonal()[:, None]).exp().sum(-1))  # [t]
    if q > 0:
        # t != m: the maximum at position j < q, rivals at the other positions before q and t at q
        before = low[:, :q]  # [t, j, m]
        others = rival[:, None, :, None] - before[:, :, None, :]  # [t, j, k, m]
        others = others.masked_fill(torch.eye(q, dtype=torch.bool)[None, :, :, None], -torch.inf)
        denominator = 1 + others.exp().sum(2) + (own[:, None, None] - before).exp()  # [t, j, m]
        elsewhere = (1 / denominator).amin(1)  # [t, m]
    else:
        elsewhere = torch.zeros(vocab, vocab, dtype=scores.dtype)
    share = torch.where(t == m, at_query[:, None], elsewhere)
    fits = (m > lo) & ((t == m) | (t <= lo))
    return torch.where(fits, share, torch.zeros((), dtype=scores.dtype))


def margin_tables(pieces: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
    """The worst OV and direct-path leads strategy 1 mixes, once per length: "a" [t, m, c] (m at any k < q,
    or at any k <= q when t = m; "a_before_q": at any k < q in every case), "b" [lo + 1, m, c] (a token <= lo at a k < q; 0 for lo = -1, where it does
    not count), "lead_q" [t, m, c] (token t at q) and "d" [t, m, c] (the direct path's lead)."""
    scores, ov, direct = (x.double() for x in pieces)
    vocab, q = scores.shape[0], scores.shape[1] - 1
    tokens = torch.arange(vocab)
    lead = ov[:, :, :, None] - ov[:, :, None, :]  # [k, y, m, c]: OV margin of m over c from token y at k
    own = lead[:, tokens, tokens]  # [k, m, c]
    a_any = own[:q].amin(0) if q > 0 else torch.full((vocab, vocab), torch.inf, dtype=lead.dtype)
    none = torch.zeros(1, vocab, vocab, dtype=lead.dtype)  # no other token: p is 1 and b does not count
    b = torch.cat([none, lead[:q].amin(0).cummin(0).values if q > 0 else none.expand(vocab, -1, -1)])
    is_t = torch.eye(vocab, dtype=torch.bool)[:, :, None]  # [t, m, 1]: the list ends with its maximum
    return {"a": torch.where(is_t, own.amin(0), a_any), "a_before_q": a_any, "b": b, "lead_q": lead[q],
            "d": direct[:, :, None] - direct[:, None, :]}


def other_keys_lead(tables: dict[str, Tensor], lo: int) -> Tensor:
    """b [t, m, c]: the least OV lead of m over c from a key that is not the maximum, in cells with other tokens
    <= lo: a token <= lo at a position before the query, or (when t != m) the query's own token t at q."""
    b_rest = tables["b"][lo + 1]  # [m, c]
    is_t = torch.eye(b_rest.shape[0], dtype=torch.bool)[:, :, None]  # [t, m, 1]: the list ends with its maximum
    return torch.where(is_t, b_rest, torch.minimum(b_rest, tables["lead_q"]))


def least_margin_of_pieces(pieces: tuple[Tensor, Tensor, Tensor], lo: int, share: Tensor | None = None,
                           allowance: Tensor | None = None, tables: dict[str, Tensor] | None = None) -> Tensor:
    """Strategy 1's least logit margin of the maximum over every rival, [vocab (t), vocab (m)].

    min over c != m of D[t, m] - D[t, c] + min(p a + (1 - p) b, a), with p the least attention on the
    maximum (`share`, least_attention_of_pieces by default), a the least OV margin of m over c at any position m can
    hold, b the least OV margin over c of a token <= lo at a position k < q (and of t at q when t != m:
    other_keys_lead). With `allowance` [t, m, c], it is subtracted from the margin over c first. Positive
    means the cell is certified; +inf where no list fits it. Sound because the margin is linear in the split p.
    """
    tables = margin_tables(pieces) if tables is None else tables
    vocab = tables["d"].shape[0]
    tokens = torch.arange(vocab)
    a, b = tables["a"], other_keys_lead(tables, lo)
    p = (least_attention_of_pieces(pieces, lo) if share is None else share)[:, :, None]  # [t, m, 1]
    margin = tables["d"] + torch.minimum(p * a + (1 - p) * b, a)
    if allowance is not None:
        margin = margin - allowance
    out = margin.masked_fill(torch.eye(vocab, dtype=torch.bool), torch.inf).amin(-1)
    fits = (tokens[None] > lo) & ((tokens[:, None] == tokens[None]) | (tokens[:, None] <= lo))
    return out.masked_fill(~fits, torch.inf)


def least_attention_on_max(model, n: int, lo: int) -> Tensor:
    """Strategy 1's least attention on the maximum for lists of length n whose other tokens are <= lo,
    [vocab (last token t), vocab (maximum m)] (see least_attention_of_pieces; 0 where no list fits)."""
    return least_attention_of_pieces(circuit_pieces(model, n), lo)


def least_margin(model, n: int, lo: int) -> Tensor:
    """Strategy 1's least logit margin of the maximum for lists of length n whose other tokens are <= lo,
    [vocab (t), vocab (m)] (see least_margin_of_pieces; +inf where no list fits)."""
    return least_margin_of_pieces(circuit_pieces(model, n), lo)


def _margin_allowance(allowance: dict) -> Tensor:
    """The rounding allowance of the margin of m over c, [t, m, c]: both logits' errors, and float64's."""
    logit = allowance["logit"]
    return logit[:, :, None] + logit[:, None, :] + allowance["float64"]


def worst_case_bound(model, n: int, rounding: bool = True) -> dict:
    """Strategy 1 at length n: {"accuracy" (a lower bound), "largest_other" [t, m], "seconds"}.

    With `rounding` (the default) a cell is certified only when its least margin clears the rounding
    allowance, with the scores moved against the maximum by theirs: the bound is then about the float32
    model as it runs. Without it, it is about exact arithmetic on the model's weights.
    """
    start = time.perf_counter()
    pieces = circuit_pieces(model, n)
    vocab = model.cfg.d_vocab
    allowance = rounding_allowance(model, n) if rounding else None
    error = allowance["score"] if rounding else None
    margin_allowance = _margin_allowance(allowance) if rounding else None
    tables = margin_tables(pieces)
    ok = torch.stack([least_margin_of_pieces(pieces, lo, least_attention_of_pieces(pieces, lo, error), margin_allowance, tables) > 0
                      for lo in range(-1, vocab)], -1)  # [t, m, lo + 1]
    largest = largest_certified(ok)
    return {"accuracy": certified_count(largest, n) / vocab**n, "largest_other": largest,
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------ strategy 2: each cell's worst case
UNDERFLOW_FLOOR = 2.0**-1000  # float64 exponentials below 2^-1022 may underflow: far less than this in all
ONE_SHIFT_SPREAD = 600.0  # rows of scores spanning less than this share one shift (e^-600 is far from underflow)


def cell_worst_margins(pieces: tuple[Tensor, Tensor, Tensor], t: int, allowance: dict | None = None) -> Tensor:
    """For last token t, the least margin weight of every cell, [vocab - t (m = t ...), vocab + 1 (lo + 1), vocab (c)].

    The margin of m over c exceeds A exactly when sum_k e^{S_k} (OV-margin_k + D-margin - A) > 0 (the
    softmax's denominator is positive), a sum with one term per position. Every position k < q holds m
    or any token <= lo independently, so the least sum over the cell is the sum of each position's least
    term, with one position forced to m when t != m. With `allowance` (rounding_allowance), A is the
    margin's rounding allowance and each e^{S_k} is moved against its term by the score's allowance;
    without it, A = 0 (exact arithmetic). The sums are in float64, in units of e^{the largest score the
    cell allows} (or of the largest score of the row, when the row spans less than 600), so no term that
    matters can underflow; what could is taken off (UNDERFLOW_FLOOR). An
    entry > 0 for every c != m means every list of the cell is answered right. lo runs from -1 (only
    copies of m); rows start at m = t (a smaller maximum is no list).
    """
    scores, ov, direct = (x.double() for x in pieces)
    vocab, q = scores.shape[0], scores.shape[1] - 1
    maxima = torch.arange(t, vocab)
    index = torch.arange(len(maxima))
    d = direct[t, maxima][:, None] - direct[t][None, :]  # [m, c]
    lead = ov[:, :, maxima, None] - ov[:, :, None, :] + d  # [k, y, m, c]
    error = torch.zeros_like(scores[t])
    if allowance is not None:
        lead = lead - _margin_allowance(allowance)[t, maxima]
        error = allowance["score"][t]
    sign = lead.sign()
    if scores[t].max() - scores[t].min() + 2 * error.max() < ONE_SHIFT_SPREAD:
        # every e^{S - largest} is above e^-600, far from float64's underflow (e^-708): one shift for all cells
        weight = (scores[t] - scores[t].max())[:, :, None, None] - error[:, :, None, None] * sign
        term = weight.exp() * lead  # [k, y, m, c]
        on_max = term[:, maxima, index]  # [k, m, c]: position k holds m
        total = term[q, t][None].expand(vocab + 1, -1, -1)  # [lo + 1, m, c]: the query position holds t
        if q > 0:
            for lo in range(1, vocab):  # the least term of a token <= lo at k: a running minimum
                torch.minimum(term[:q, lo - 1], term[:q, lo], out=term[:q, lo])
            rest = torch.cat([torch.full_like(term[:q, :1], torch.inf), term[:q]], 1)  # lo = -1: no other token
            either = torch.minimum(on_max[:q, None], rest)  # [k, lo + 1, m, c]
            total = total + either.sum(0)
            forced = (on_max[:q, None] - either).amin(0)  # the cheapest position to force to m
            total = torch.where((maxima == t)[None, :, None], total, total + forced)
        return total.transpose(0, 1) - UNDERFLOW_FLOOR * (1 + lead.abs().max())
    # scores spread too far for one shift: logarithms, and a shift per cell
    # log |e^{S_k} lead_k|, each score moved by its error against its term (down if it helps, up if it hurts)
    log_term = (scores[t] - error)[:, :, None, None] + lead.abs().log()
    log_term = torch.where(sign < 0, log_term + 2 * error[:, :, None, None], log_term)
    # the largest score the cell allows, [lo + 1, m]: the query's own key, m anywhere before q, tokens <= lo
    top_m = scores[t, q, t].expand(len(maxima))
    rivals = torch.full((vocab,), -torch.inf, dtype=scores.dtype)
    if q > 0:
        top_m = torch.maximum(top_m, scores[t, :q, maxima].amax(0))
        rivals = scores[t, :q].amax(0).cummax(0).values
    shift = torch.cat([top_m[None], torch.maximum(top_m[None], rivals[:, None])])  # [lo + 1, m]
    rescale = (top_m[None] - shift).exp()[:, :, None]  # [lo + 1, m, 1], in (0, 1]
    on_max = sign[:, maxima, index] * (log_term[:, maxima, index] - top_m[:, None]).exp()  # [k, m, c]: k holds m
    query = sign[q, t] * (log_term[q, t] - top_m[:, None]).exp()  # [m, c]: the query holds t
    on_max, total = on_max[:, None] * rescale, query[None] * rescale  # [k, lo + 1, m, c], [lo + 1, m, c]
    if q > 0:
        # the least term of a token <= lo at k, as a running minimum over lo of an order-keeping code:
        # negative terms below 0 (the larger the log, the lower), zeros at 0, positive terms above 0
        base = 1 - log_term[:q].masked_fill(sign[:q] == 0, torch.inf).amin().clamp(max=0)
        code = torch.where(sign[:q] == 0, 0.0, sign[:q] * (log_term[:q] + base))  # [k, y, m, c]
        for lo in range(1, vocab):
            torch.minimum(code[:, lo - 1], code[:, lo], out=code[:, lo])
        shifted = shift[1:, :, None]  # [lo, m, 1]
        rest = code.sign() * (code.abs() - base - shifted).exp()  # [k, lo, m, c]
        rest = torch.cat([torch.full_like(rest[:, :1], torch.inf), rest], 1)  # lo = -1: no other token
        either = torch.minimum(on_max[:q], rest)  # [k, lo + 1, m, c]
        total = total + either.sum(0)
        forced = (on_max[:q] - either).amin(0)  # the cheapest position to force to m
        total = torch.where((maxima == t)[None, :, None], total, total + forced)
    floor = UNDERFLOW_FLOOR * (1 + lead.abs().max())
    return total.transpose(0, 1) - floor


def cell_bound(model, n: int, rounding: bool = True) -> dict:
    """Strategy 2 at length n: {"accuracy" (a lower bound), "largest_other" [t, m], "seconds"}.

    With `rounding` (the default) about the float32 model as it runs (see cell_worst_margins); without
    it, about exact arithmetic on the model's weights.
    """
    start = time.perf_counter()
    pieces = circuit_pieces(model, n)
    vocab = model.cfg.d_vocab
    allowance = rounding_allowance(model, n) if rounding else None
    rows = []
    for t in range(vocab):
        eye = torch.eye(vocab, dtype=torch.bool)[t:, None, :]
        ok = torch.ones(vocab, vocab + 1, dtype=torch.bool)
        margins = cell_worst_margins(pieces, t, allowance).masked_fill(eye, torch.inf)
        ok[t:] = (margins > 0).all(-1)  # [m, lo + 1]
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


def finish_by_brute_force(model, n: int, largest_other: Tensor, batch_size: int = 20_000) -> dict:
    """The exact accuracy of the float32 model at length n: the certified count, plus the uncertified lists
    run through the model. {"accuracy", "wrong" [n_wrong, n], "runs" (lists run), "seconds"}."""
    start, vocab = time.perf_counter(), model.cfg.d_vocab
    left = [uncertified_lists(largest_other, n, t, m) for t in range(vocab) for m in range(t, vocab)]
    left = torch.cat(left) if left else torch.zeros(0, n, dtype=torch.long)
    ok = torch.zeros(len(left), dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(left), batch_size):
            chunk = left[i: i + batch_size]
            ok[i: i + batch_size] = model(chunk)[:, -1].argmax(-1) == chunk.max(-1).values
    right = certified_count(largest_other, n) + int(ok.sum())
    return {"accuracy": right / vocab**n, "wrong": left[~ok], "runs": len(left), "seconds": time.perf_counter() - start}


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

