"""Circuits read off the weights and the cache, in the order of the chapters 00-06 (chapter 07's paths
through the residual stream are in utils/paths.py): residual decompositions, attention, the full QK and
OV circuits, the positional worst case, MLP effective weights, the Fibonacci model.

Shapes follow TransformerLens: the cache holds q and k as [batch, pos, head, d_head] and
attention patterns as [batch, head, query_pos, key_pos].
"""

from __future__ import annotations

from utils import runtime  # noqa: F401  (one torch thread; freed memory back after every cell)
import torch
from torch import Tensor
from transformer_lens.utilities import get_act_name


# --------------------------------------------------------------------- chapter 00: the residual stream and attention
def residual_from_components(model, cache) -> Tensor:
    """The final residual stream rebuilt as embed + pos_embed + every attention and MLP output, [batch, pos, d_model]."""
    resid = cache["embed"] + cache["pos_embed"]
    for layer in range(model.cfg.n_layers):
        resid = resid + cache["attn_out", layer]
        if not model.cfg.attn_only:
            resid = resid + cache["mlp_out", layer]
    return resid


def attention_scores(q: Tensor, k: Tensor) -> Tensor:
    """Every query-key dot product scaled by 1/sqrt(d_head), [batch, head, query_pos, key_pos]; q, k: [batch, pos,
    head, d_head]."""
    return torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5


def mask_future(scores: Tensor) -> Tensor:
    """`scores` [..., query_pos, key_pos] with every key after its query set to -inf (weight 0 after a softmax)."""
    n = scores.shape[-1]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=scores.device), diagonal=1)
    return scores.masked_fill(future, float("-inf"))


def attention_pattern(q: Tensor, k: Tensor) -> Tensor:
    """Causal attention pattern softmax(q k^T / sqrt(d_head)), [batch, head, query_pos, key_pos].

    q, k: [batch, pos, head, d_head]. Keys after the query are masked out before the softmax.
    """
    return mask_future(attention_scores(q, k)).softmax(dim=-1)


def fraction_attending_to_max(model, lists: Tensor, layer: int = 0, head: int = 0) -> float:
    """Share of `lists` [batch, pos] whose last position puts its largest attention weight on a maximal token.

    "Maximal" compares the token at the attended key position with the list's maximum, so when
    the maximum occurs twice either copy counts.
    """
    name = get_act_name("pattern", layer)
    with torch.no_grad():
        _, cache = model.run_with_cache(lists, names_filter=name)
    last_row = cache[name][:, head, -1, :]  # [batch, key_pos]
    attended = lists.gather(1, last_row.argmax(-1, keepdim=True)).squeeze(1)
    return (attended == lists.max(-1).values).float().mean().item()


def uniform_causal_pattern(pattern: Tensor, hook=None) -> Tensor:
    """A hook's replacement for `pattern` [batch, head, query_pos, key_pos]: each query spreads its
    attention evenly over the keys it can see (key_pos <= query_pos)."""
    visible = torch.tril(torch.ones(pattern.shape[-2:], device=pattern.device))
    return (visible / visible.sum(-1, keepdim=True)).expand_as(pattern)


def logits_with_pattern_replaced(model, tokens: Tensor, replace, layer: int = 0) -> Tensor:
    """Logits [batch, pos, vocab] with layer `layer`'s attention pattern replaced by what the hook `replace`
    (pattern, hook) returns."""
    return model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("pattern", layer), replace)])


def last_position_accuracy(logits: Tensor, lists: Tensor) -> float:
    """Share of `lists` [batch, pos] whose last position's largest logit is the list's maximum."""
    return (logits[:, -1].argmax(-1) == lists.max(-1).values).float().mean().item()


def uniform_attention_accuracy(model, lists: Tensor, layer: int = 0) -> float:
    """Accuracy at the last position (the answer is each list's maximum) with layer `layer`'s attention
    pattern replaced by uniform attention over the visible positions (`uniform_causal_pattern`)."""
    with torch.no_grad():
        return last_position_accuracy(logits_with_pattern_replaced(model, lists, uniform_causal_pattern, layer), lists)


def vector_with_dot(target: Tensor, value: float, orthogonal_to: Tensor) -> Tensor:
    """A vector u [d] with target · u = `value` and v · u = 0 for every row v of `orthogonal_to` [n, d]: `target` with
    the rows' span projected out, rescaled."""
    span = torch.linalg.qr(orthogonal_to.T)[0]  # an orthonormal basis of the rows, [d, n]
    direction = target - span @ (span.T @ target)
    return value * direction / (target @ direction)


# --------------------------------------------------------------------- chapters 02-03: the direct path, the full QK and OV circuits
def direct_path(model) -> Tensor:
    """The direct path W_E W_U: logits each token writes with no attention or MLP, [vocab (input), vocab (output)]."""
    return model.W_E @ model.W_U


def direct_path_logits(model, tokens: Tensor) -> Tensor:
    """What the direct path adds to the logits at the last position, (W_E[t] + W_pos[n - 1]) W_U + b_U, [batch, vocab].

    `tokens` is [batch, n]; t is each list's last token. The unembedding bias belongs to no
    head, so it is counted here: the direct path plus the heads' outputs times W_U is the logits.
    """
    last = tokens.shape[-1] - 1
    return (model.W_E[tokens[:, last]] + model.W_pos[last]) @ model.W_U + model.b_U


def logit_boosts(model, tokens: Tensor, layer: int = 0) -> tuple[float, float]:
    """The mean boost each term gives the correct logit at the last position: (direct path, attention).

    A term's boost on a list is its logit for the list's maximum minus its mean logit over the
    vocabulary; the attention term is the layer's output (cache["attn_out", layer]) times W_U.
    Averaged over the lists of `tokens` [batch, n].
    """
    answer = tokens.max(-1).values
    return tuple(correct_logit_boost(term, answer) for term in logit_terms(model, tokens, layer))


def logit_terms(model, tokens: Tensor, layer: int = 0) -> tuple[Tensor, Tensor]:
    """The logits at the last position split in two, (direct path, the layer's attention output times W_U),
    each [batch, vocab]."""
    _, cache = model.run_with_cache(tokens)
    return direct_path_logits(model, tokens), cache["attn_out", layer][:, -1] @ model.W_U


def correct_logit_boost(logits: Tensor, answer: Tensor) -> float:
    """Mean over the lists of the logit of the right answer minus the list's mean logit; logits [batch, vocab]."""
    return (logits.gather(-1, answer[:, None]).squeeze(-1) - logits.mean(-1)).mean().item()


def logits_without_direct_path(model, tokens: Tensor, layer: int = 0) -> Tensor:
    """The logits at the last position with the direct path mean-ablated, [batch, vocab].

    A hook on the layer's residual output replaces the embeddings' share of it (W_E[t] + W_pos[i],
    which the direct path carries to the unembedding) by its mean over the batch, position by
    position. The head still reads the real embeddings, so only the direct path changes.
    """
    stored = {}

    def keep_embeddings(resid_pre: Tensor, hook) -> Tensor:
        stored["resid_pre"] = resid_pre
        return resid_pre

    def swap_for_mean(resid_post: Tensor, hook) -> Tensor:
        embeddings = stored["resid_pre"]
        return resid_post - embeddings + embeddings.mean(0, keepdim=True)

    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", keep_embeddings),
                                                     (f"blocks.{layer}.hook_resid_post", swap_for_mean)])
    return logits[:, -1]


def full_qk_tokens(model, layer: int = 0, head: int = 0, scale: bool = True) -> Tensor:
    """Token-only full QK circuit W_E W_Q W_K^T W_E^T, [vocab (query token), vocab (key token)].

    Ignores the positional embedding; divided by sqrt(d_head) when `scale`, so entries
    are attention scores.
    """
    qk = model.W_E @ model.QK[layer, head] @ model.W_E.T
    scores = qk.AB if hasattr(qk, "AB") else qk
    return scores / model.cfg.d_head**0.5 if scale else scores


def full_qk_positional(model, query_pos: int, key_pos: int, layer: int = 0, head: int = 0,
                       scale: bool = True) -> Tensor:
    """Position-aware QK circuit (W_E + W_pos[q]) W_Q W_K^T (W_E + W_pos[k])^T, [vocab (query token), vocab (key token)].

    Entry [a, b] is the attention score of query token a at `query_pos` on key token b at
    `key_pos` (biases are frozen at zero in the course's models).
    """
    queries = (model.W_E + model.W_pos[query_pos]) @ model.W_Q[layer, head]
    keys = (model.W_E + model.W_pos[key_pos]) @ model.W_K[layer, head]
    scores = queries @ keys.T
    return scores / model.cfg.d_head**0.5 if scale else scores


def full_ov(model, layer: int = 0, head: int = 0):
    """Full OV circuit W_E W_V W_O W_U as a FactoredMatrix, [vocab (attended token), vocab (output logit)]."""
    return model.W_E @ model.OV[layer, head] @ model.W_U


def copying_score(matrix) -> float:
    """Eigenvalue copying score sum(lambda) / sum(|lambda|) of a square circuit, in [-1, 1].

    Near 1 when the circuit mostly raises the logit of the token it reads (copying).
    """
    eig = matrix.eigenvalues if hasattr(matrix, "eigenvalues") else torch.linalg.eigvals(matrix)
    return (eig.sum().real / eig.abs().sum()).item()


def logits_with_frozen_pattern(model, tokens: Tensor, pattern: Tensor, layer: int = 0) -> Tensor:
    """Logits [batch, pos, vocab] with layer `layer`'s attention pattern replaced by `pattern` [batch, head, q, k].

    With the pattern frozen, a one-layer attention-only model is affine in the token embeddings (W_pos
    enters once, whatever the mix: see `frozen_mix_gap`), not linear.
    """
    def freeze(_, hook):
        return pattern

    return model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("pattern", layer), freeze)])


def fraction_ordered(scores: Tensor) -> float:
    """Fraction of (row, key b < key c) comparisons in which scores[row, c] > scores[row, b] (strictly).

    1.0 means every row ranks larger key tokens strictly higher.
    """
    n = scores.shape[-1]
    later_wins = scores[:, None, :] > scores[:, :, None]  # [row, b, c]: scores[row, c] > scores[row, b]
    pairs = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return later_wins[:, pairs].float().mean().item()


def best_key(qk: Tensor, query: Tensor, lists: Tensor) -> Tensor:
    """For each list, the key position whose token a token-to-token map `qk` [query token, key token] scores
    highest for the token `query` [batch, 1] (the first of tied positions), [batch]."""
    return qk[query, lists].argmax(-1)


def attended_key(model, lists: Tensor, layer: int = 0, head: int = 0) -> Tensor:
    """For each list, the key position the last row of the head's attention pattern weighs most, [batch]."""
    _, cache = model.run_with_cache(lists, names_filter=get_act_name("pattern", layer))
    return cache["pattern", layer][:, head, -1].argmax(-1)


def same_token_share(lists: Tensor, i: Tensor, j: Tensor) -> float:
    """Share of `lists` [batch, pos] holding the same token at positions i [batch] and j [batch]."""
    picked = lists.gather(1, torch.stack([i, j], dim=1))
    return (picked[:, 0] == picked[:, 1]).float().mean().item()


def token_only_agreement(model, lists: Tensor, layer: int = 0, head: int = 0) -> float:
    """Share of `lists` [batch, pos] on which the token-only QK map and the model pick the same key token.

    The token-only choice is the key whose token scores highest for the last position's token in
    full_qk_tokens (the first of the tied positions); the model's choice is the key position the
    last row of the head's real attention pattern weighs most. They agree when the two positions
    hold the same token (so a repeated token at another position still counts as the same key).
    """
    token_choice = best_key(full_qk_tokens(model, layer, head), lists[:, -1:], lists)
    return same_token_share(lists, token_choice, attended_key(model, lists, layer, head))


def attention_pattern_of(model, tokens: Tensor, layer: int = 0) -> Tensor:
    """Layer `layer`'s attention pattern on `tokens`, [batch, head, query_pos, key_pos]."""
    _, cache = model.run_with_cache(tokens, names_filter=get_act_name("pattern", layer))
    return cache["pattern", layer]


def logits_with_embeddings(model, tokens: Tensor, embeddings: Tensor, pattern: Tensor | None = None,
                           pos_scale: float = 1.0) -> Tensor:
    """Logits [batch, pos, vocab] of the model run with the token embeddings replaced by `embeddings` [batch, pos,
    d_model], layer 0's pattern frozen at `pattern` when given, and the positional embedding times `pos_scale`."""
    hooks = [(get_act_name("embed"), lambda embed, hook: embeddings)]
    if pattern is not None:
        hooks.append((get_act_name("pattern", 0), lambda _, hook: pattern))
    if pos_scale != 1.0:
        hooks.append((get_act_name("pos_embed"), lambda pos, hook: pos_scale * pos))
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def frozen_mix_logits(model, a: Tensor, b: Tensor, alpha: float, beta: float,
                      scale_pos: bool = False) -> tuple[Tensor, Tensor]:
    """(the logits on the mixed embeddings alpha W_E[a] + beta W_E[b], alpha logits(a) + beta logits(b)), every run
    with layer 0's pattern frozen at a's; see frozen_mix_gap."""
    pattern = attention_pattern_of(model, a)
    mix = alpha * model.W_E[a] + beta * model.W_E[b]
    mixed = logits_with_embeddings(model, a, mix, pattern, pos_scale=alpha + beta if scale_pos else 1.0)
    combined = alpha * logits_with_frozen_pattern(model, a, pattern) + beta * logits_with_frozen_pattern(model, b, pattern)
    return mixed, combined


def frozen_mix_gap(model, a: Tensor, b: Tensor, alpha: float, beta: float, scale_pos: bool = False) -> float:
    """Largest |logit| by which the frozen-pattern model misses superposition, on token lists a, b [batch, pos].

    With layer 0's attention pattern frozen at the one of `a`, the model is run on the embeddings
    alpha W_E[a] + beta W_E[b] and its logits are set against alpha logits(a) + beta logits(b)
    (both also with a's pattern). The model is affine in the token embeddings, so the gap is at
    float precision when alpha + beta = 1 and not otherwise, because W_pos (and any bias) enters
    once, not alpha + beta times; with `scale_pos` the positional embedding is scaled by
    alpha + beta as well, and the gap vanishes for any coefficients (biases are zero here).
    """
    mixed, combined = frozen_mix_logits(model, a, b, alpha, beta, scale_pos)
    return (mixed - combined).abs().max().item()


# --------------------------------------------------------------------- chapter 04: the positional QK worst case
QK_PARTS = ("const", "token", "pos")
QK_TERMS = tuple(f"{a}·{b}" for a in QK_PARTS for b in QK_PARTS)


def key_pairs_out_of_order(scores: Tensor) -> tuple[int, int]:
    """(how many (query token a, key tokens b < c) of a map [vocab (query token), vocab (key token)] do not score c
    strictly above b; how many of those a list can hold, with the larger key c at least the query token a).

    A list holds its query token, so c can be the list's maximum only if c >= a: a pair out of order in a
    row whose query token is larger than both keys never decides a list.
    """
    n = scores.shape[-1]
    pairs = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)  # [b, c]: b < c
    wrong = (scores[:, None, :] <= scores[:, :, None]) & pairs  # [query token, b, c]: c does not beat b
    held = torch.arange(n)[None, None, :] >= torch.arange(scores.shape[0])[:, None, None]  # c >= query token
    return int(wrong.sum()), int((wrong & held).sum())


def residual_parts(model, pos: int, side: str) -> dict[str, Tensor]:
    """The residual stream at `pos`, W_E + W_pos[pos], split into a shared part and what differs, each [vocab, d_model].

    "const" is what every residual stream on this side shares: the mean token embedding plus the mean
    positional embedding over the positions the side can hold ("query": 1 .. n_ctx - 1, the positions
    whose attention chooses between keys; "key": 0 .. n_ctx - 1, every position a key can sit at).
    "token" is W_E minus its mean over tokens, "pos" is W_pos[pos] minus that positional mean (the same
    in every row). The three add up to W_E + W_pos[pos]. Moving a vector from W_pos to W_E (which
    changes no logit) changes none of them.
    """
    if side not in ("query", "key"):
        raise ValueError(f"side must be 'query' or 'key', got {side!r}")
    positions = model.W_pos[1:] if side == "query" else model.W_pos
    mean_token, mean_pos = model.W_E.mean(0), positions.mean(0)
    vocab = model.cfg.d_vocab
    return {"const": (mean_token + mean_pos).expand(vocab, -1).clone(),
            "token": model.W_E - mean_token,
            "pos": (model.W_pos[pos] - mean_pos).expand(vocab, -1).clone()}


def qk_score_terms(model, query_pos: int, key_pos: int, layer: int = 0, head: int = 0) -> dict[str, Tensor]:
    """The nine terms of the position-aware QK circuit, each [vocab (query token), vocab (key token)].

    Each side's residual stream is split by residual_parts into const + token + pos; the score
    (W_E[a] + W_pos[q]) W_Q W_K^T (W_E[b] + W_pos[k])^T / sqrt(d_head) is then the sum of the nine
    products "<query part>·<key part>" (QK_TERMS order), each spread to the full [vocab, vocab] map.
    They add up to full_qk_positional(model, query_pos, key_pos). Only "·token" terms change along a
    row (they can order the keys at one position); "·pos" terms shift whole key positions; "·const"
    terms are the same for every key and cancel in the softmax.
    """
    return qk_terms_of_parts(model, residual_parts(model, query_pos, "query"), residual_parts(model, key_pos, "key"),
                             layer, head)


def qk_terms_of_parts(model, query_parts: dict[str, Tensor], key_parts: dict[str, Tensor], layer: int = 0,
                      head: int = 0) -> dict[str, Tensor]:
    """The scaled QK products "<query part>·<key part>" of two splits of the residual stream, each [vocab, vocab].

    `query_parts` and `key_parts` map names to [vocab, d_model] pieces that add up to each side's
    residual stream (residual_parts gives the course's split); the products add up to the score.
    """
    scale = model.cfg.d_head**0.5
    queries = {name: part @ model.W_Q[layer, head] for name, part in query_parts.items()}
    keys = {name: part @ model.W_K[layer, head] for name, part in key_parts.items()}
    return {f"{a}·{b}": queries[a] @ keys[b].T / scale for a in queries for b in keys}


def stored_parts(model, pos: int) -> dict[str, Tensor]:
    """The residual stream at `pos` split at the embeddings as stored: {"token": W_E, "pos": W_pos[pos]}, each
    [vocab, d_model]."""
    return {"token": model.W_E, "pos": model.W_pos[pos].expand(model.cfg.d_vocab, -1)}


def uncentred_qk_score_terms(model, query_pos: int, key_pos: int, layer: int = 0, head: int = 0) -> dict[str, Tensor]:
    """The four terms of the score split at the embeddings as stored, each [vocab (query token), vocab (key token)].

    "token·token" W_E W_Q W_K^T W_E^T, "token·pos" W_E W_Q W_K^T W_pos[k]^T, "pos·token" W_pos[q] W_Q W_K^T W_E^T
    and "pos·pos", scaled by 1 / sqrt(d_head). They add up to full_qk_positional too, but which term holds
    what every query shares depends on how training happened to divide it between W_E and W_pos.
    """
    return qk_terms_of_parts(model, stored_parts(model, query_pos), stored_parts(model, key_pos), layer, head)


def key_spread(scores: Tensor) -> float:
    """How much a map [query token, key token] moves along a row: the std over key tokens, averaged over rows.

    Zero for a term that does not depend on the key token: such a term cannot reorder the keys at one position.
    """
    return scores.std(-1).mean().item()


def ordering_by_term(model, query_pos: int, key_pos: int) -> dict[str, tuple[float, float]]:
    """For each of the nine QK terms (qk_score_terms) alone: (share of ordered key pairs, key spread).

    The share is fraction_ordered of the term (strict wins of the larger key token over every
    smaller one, within each query token's row); the spread is key_spread, the std over key tokens.
    """
    return {name: (fraction_ordered(term), key_spread(term))
            for name, term in qk_score_terms(model, query_pos, key_pos).items()}


def variance_on_first_key_axis(model, layer: int = 0, head: int = 0) -> float:
    """Share of the centred key tokens' variance, (W_E - mean W_E) W_K [vocab, d_head], on their first principal axis.

    Near 1 when the key tokens reach the attention score along one direction of key space.
    """
    s = torch.linalg.svdvals((model.W_E - model.W_E.mean(0)) @ model.W_K[layer, head])
    return (s[0] ** 2 / (s ** 2).sum()).item()


def run_without_query_part(model, tokens: Tensor, part: str | None, layer: int = 0,
                           head: int = 0) -> tuple[Tensor, Tensor]:
    """Run `tokens` [batch, pos] with one part of every query taken out: (logits [batch, pos, vocab],
    the head's pattern [batch, query_pos, key_pos]).

    `part` names a part of residual_parts(model, pos, "query"): "pos" leaves every query at the shared
    positional mean (what differs between query positions is gone), "const" takes the shared part out
    of every query; None runs the model as it is. Keys, values and the direct path are untouched.
    """
    n = tokens.shape[1]
    if part is None:
        shift = torch.zeros(n, model.cfg.d_head)
    else:
        shift = torch.stack([-residual_parts(model, pos, "query")[part][0] for pos in range(n)]) @ model.W_Q[layer, head]
    patterns = {}

    def remove(q, hook):
        q = q.clone()
        q[:, :, head] += shift
        return q

    def keep(pattern, hook):
        patterns["pattern"] = pattern[:, head]

    logits = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("q", layer), remove),
                                                     (get_act_name("pattern", layer), keep)])
    return logits, patterns["pattern"]


def accuracy_and_gap1_share(model, lists: Tensor, part: str | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """Max-of-list `lists` [batch, n_ctx] run with one part of every query taken out (run_without_query_part):
    (accuracy at every list length 2 .. n_ctx, the mean share of the attention on the maximum, all copies together,
    on the lists whose two largest values are one apart, at every list length), both keyed by the length.

    A list of length n is the first n tokens; its answer and its attention are read at position n - 1.
    """
    logits, pattern = run_without_query_part(model, lists, part)
    running_max = lists.cummax(-1).values  # [list, position]: the answer at every position
    right = (logits.argmax(-1) == running_max).float().mean(0)  # [position]
    share_on_max = (pattern * (lists[:, None, :] == running_max[:, :, None])).sum(-1)  # [list, query position]
    accuracy, gap1_share = {}, {}
    for q in range(1, lists.shape[1]):
        top_two = lists[:, : q + 1].topk(2, dim=-1).values
        accuracy[q + 1] = right[q].item()
        gap1_share[q + 1] = share_on_max[top_two[:, 0] - top_two[:, 1] == 1, q].mean().item()
    return accuracy, gap1_share


def qk_score_table(model, layer: int = 0, head: int = 0, dtype: torch.dtype = torch.float32,
                   biases: bool = False) -> Tensor:
    """Every attention score of the head, [query_pos, query token, key_pos, key token].

    Entry [q, a, k, b] is full_qk_positional(model, q, k)[a, b]; entries with k > q exist but are
    never used (the causal mask hides those keys). With `biases` the query and key biases are in
    (the course's models have none); `dtype` is the precision it is computed in (chapter 08's proof
    uses float64).
    """
    w = lambda weight: weight.detach().to(dtype) if dtype != torch.float32 else weight  # noqa: E731
    residual = w(model.W_E)[None] + w(model.W_pos)[:, None]  # [pos, vocab, d_model]
    queries = residual @ w(model.W_Q[layer, head]) + (w(model.b_Q[layer, head]) if biases else 0)  # [pos, vocab, d_head]
    keys = residual @ w(model.W_K[layer, head]) + (w(model.b_K[layer, head]) if biases else 0)
    return torch.einsum("pad,kbd->pakb", queries, keys) / model.cfg.d_head**0.5


def list_configurations(query_pos: int, same_position: bool = False):
    """Which (query token t, key positions k1 and k2, smaller key b, larger key c) a list can hold, as a function of
    broadcastable index tensors: k1 != k2 (k1 = k2 with `same_position`), the key at `query_pos` holds t itself, and
    the larger key c, which plays the list's maximum, is at least t."""
    def possible(t: Tensor, k1: Tensor, k2: Tensor, b: Tensor, c: Tensor) -> Tensor:
        positions = (k1 == k2) if same_position else (k1 != k2)
        return positions & ((k1 != query_pos) | (c == t)) & ((k2 != query_pos) | (b == t)) & (c >= t)
    return possible


def gap_margins(scores: Tensor, gap: int, possible) -> Tensor:
    """Every margin score(c at k1) - score(b at k2) of a larger key token c over b = c - gap, [t, k1, k2, b], from
    one query position's scores [t, key_pos, key token]; +inf where `possible` (see list_configurations) says
    no list holds that configuration."""
    t = torch.arange(scores.shape[0])[:, None, None, None]
    n = torch.arange(scores.shape[1])
    k1, k2 = n[None, :, None, None], n[None, None, :, None]
    c = torch.arange(gap, scores.shape[-1])
    margin = scores[:, :, None, c] - scores[:, None, :, c - gap]  # [t, k1, k2, pair]
    return margin.masked_fill(~possible(t, k1, k2, c - gap, c).expand_as(margin), float("inf"))


def worst_margin_by_gap(model, query_pos: int, same_position: bool = False, possible=None) -> Tensor:
    """Worst-case QK score margin of a larger key over a smaller one, [vocab (query token), vocab (gap)].

    Entry [t, g] is the least score(c at k1) - score(b at k2), for a query holding token t at
    `query_pos`, over every pair of key tokens with c - b = g and every pair of key positions
    k1 != k2 <= query_pos (with `same_position`, k1 = k2 instead: the within-map comparison).
    Only configurations a list can have count: the key at query_pos holds the query token t
    itself, and the larger key c is at least t (c plays the list's maximum). Entries with no such
    configuration (gap 0, query position 0, too large a gap) are +inf. Positive everywhere means
    the maximum outscores every smaller key, wherever both sit. `possible` replaces those rules
    (see list_configurations).
    """
    scores = qk_score_table(model)[query_pos, :, : query_pos + 1]  # [t, k, v]
    vocab = scores.shape[0]
    possible = possible or list_configurations(query_pos, same_position)
    out = torch.full((vocab, vocab), float("inf"))
    for gap in range(1, vocab):
        out[:, gap] = gap_margins(scores, gap, possible).flatten(1).min(-1).values
    return out


def ov_logit_table(model, layer: int = 0, head: int = 0, dtype: torch.dtype = torch.float32,
                   biases: bool = False) -> Tensor:
    """The OV circuit with positions, (W_E + W_pos[k]) W_V W_O W_U, [key_pos, vocab (attended token), vocab (logit)];
    with `biases`, (x W_V + b_V) W_O W_U, in precision `dtype` (see qk_score_table)."""
    w = lambda weight: weight.detach().to(dtype) if dtype != torch.float32 else weight  # noqa: E731
    residual = w(model.W_E)[None] + w(model.W_pos)[:, None]  # [pos, vocab, d_model]
    values = residual @ w(model.W_V[layer, head]) + (w(model.b_V[layer, head]) if biases else 0)
    return values @ w(model.W_O[layer, head]) @ w(model.W_U)


def attention_needed(model, worst_rest: bool = False, layer: int = 0, head: int = 0) -> Tensor:
    """Least share of attention the maximum needs to win, [vocab (maximum m), vocab (runner-up r)].

    With share p on the maximum m and the rest, 1 - p, on the runner-up r, the last position's
    logits are p OV_k[m] + (1 - p) OV_k'[r] + direct path (W_E[t] + W_pos[q]) W_U, where OV_k is
    ov_logit_table at key position k. Entry [m, r] is the least p for which m's logit beats every
    other token's, in the worst case over the key positions of m and r, the query position q
    (1 to n_ctx - 1) and the query token t <= m. With `worst_rest`, the rest of the attention may
    sit on any token <= r instead of r alone, which makes the need valid for every list whose
    maximum is m and whose runner-up is r. 0 where any share wins, +inf where no share does and
    where r >= m (no list has a runner-up at or above its maximum).
    """
    lead = worst_ov_lead(ov_logit_table(model, layer, head))
    return need_from_shares(shares_needed(lead, worst_direct_lead(model), worst_rest))


def worst_ov_lead(ov: Tensor) -> Tensor:
    """lead[x, m, o]: how far attended token x's OV row (ov [key_pos, x, logit]) puts logit m above logit o, at its
    worst key position."""
    return (ov[:, :, :, None] - ov[:, :, None, :]).min(0).values


def worst_direct_lead(model) -> Tensor:
    """[m, o]: how far the direct path (W_E[t] + W_pos[q]) W_U puts m above o, at its worst query position
    (1 to n_ctx - 1) and query token t <= m."""
    direct = torch.stack([(model.W_E + model.W_pos[q]) @ model.W_U for q in range(1, model.cfg.n_ctx)])  # [q, t, o]
    lead = (direct[:, :, :, None] - direct[:, :, None, :]).min(0).values  # [t, m, o]
    tokens = torch.arange(lead.shape[0])
    return lead.masked_fill(~(tokens[:, None, None] <= tokens[None, :, None]), float("inf")).min(0).values


def shares_needed(lead: Tensor, direct: Tensor, worst_rest: bool = False) -> Tensor:
    """[m, r, o]: the least share p on the maximum m (the rest on the runner-up r) for which m's logit beats
    rival o's, from the OV leads [x, m, o] and the direct path's [m, o]; -inf where every share wins (and
    for o = m), +inf where none does. With `worst_rest` the rest may sit on any token <= r."""
    vocab = lead.shape[0]
    tokens = torch.arange(vocab)
    own = lead[tokens, tokens]  # [m, o]: the maximum's own row
    rest = (lead.cummin(0).values if worst_rest else lead).transpose(0, 1)  # [m, r, o]
    a, b, d = own[:, None, :], rest, direct[:, None, :]
    # p a + (1 - p) b + d > 0  <=>  p (a - b) > -(b + d); when a <= b a larger share only hurts,
    # so every share wins if the whole of it does (a + d > 0) and none is sure to otherwise
    slope, needed = a - b, -(b + d)
    p = torch.where(slope > 0, needed / slope, torch.where(a + d > 0, -torch.inf, torch.inf))
    return p.masked_fill(torch.eye(vocab, dtype=torch.bool)[:, None, :], -torch.inf)  # o = m is no rival


def need_from_shares(shares: Tensor) -> Tensor:
    """[m, r]: the share that beats every rival (the largest of shares [m, r, o]), at least 0; +inf where r >= m."""
    tokens = torch.arange(shares.shape[0])
    return shares.max(-1).values.clamp(min=0.0).masked_fill(tokens[None, :] >= tokens[:, None], float("inf"))


def attention_on_maximum(model, lists: Tensor, batch_size: int = 10_000) -> tuple[Tensor, Tensor]:
    """(share of the last position's attention on the maximum, all copies together, [batch];
    whether the model's answer at the last position is the maximum, [batch] bool), for `lists` [batch, pos]."""
    name = get_act_name("pattern", 0)
    shares, right = [], []
    with torch.no_grad():
        for chunk in lists.split(batch_size):
            logits, cache = model.run_with_cache(chunk, names_filter=name)
            maximum = chunk.max(-1, keepdim=True).values
            shares.append((cache[name][:, 0, -1] * (chunk == maximum)).sum(-1))
            right.append(logits[:, -1].argmax(-1) == maximum[:, 0])
    return torch.cat(shares), torch.cat(right)


# --------------------------------------------------------------------- chapter 05: MLP effective weights (one-layer models)
def token_to_neuron(model, source_pos: int, layer: int = 0, head: int = 0) -> Tensor:
    """Effective weights (W_E + W_pos[source_pos]) W_V W_O W_in, [vocab (token at source_pos), d_mlp].

    Row t is what a token t at `source_pos` adds to every neuron's input (pre-activation)
    through the head when it receives all of the attention; with attention p it adds p times that.
    """
    return (model.W_E + model.W_pos[source_pos]) @ model.W_V[layer, head] @ model.W_O[layer, head] @ model.W_in[layer]


def direct_to_neuron(model, pos: int, layer: int = 0) -> Tensor:
    """Effective weights (W_E + W_pos[pos]) W_in of the skip path, [vocab (token at pos), d_mlp].

    What the query's own token adds to the neuron inputs at its position, around the head.
    """
    return (model.W_E + model.W_pos[pos]) @ model.W_in[layer]


def neuron_to_logit(model, layer: int = 0) -> Tensor:
    """Effective weights W_out W_U, [d_mlp, vocab (output logit)]: what each neuron's activation adds to each logit."""
    return model.W_out[layer] @ model.W_U


def neuron_inputs(model, tokens: Tensor, pattern: Tensor, transform=None) -> Tensor:
    """The MLP's pre-activations rebuilt from the effective weights, [batch, pos, d_mlp].

    For a one-layer model with an MLP, at query position q:
        b_in + direct_to_neuron(q)[x_q] + sum_h sum_k pattern[h, q, k] token_to_neuron(k, h)[x_k]
             + (b_V W_O + b_O) W_in
    pattern: the measured attention, [batch, head, query_pos, key_pos]. `transform`, if given,
    is applied to every [vocab, d_mlp] map first (e.g. to keep only some frequencies).
    """
    transform = transform or (lambda m: m)
    n_pos = tokens.shape[1]
    pre = model.b_in[0] + ((model.b_V[0] @ model.W_O[0]).sum(0) + model.b_O[0]) @ model.W_in[0]
    pre = pre.expand(tokens.shape[0], n_pos, -1).clone()
    for q in range(n_pos):
        pre[:, q] += transform(direct_to_neuron(model, q))[tokens[:, q]]
    for h in range(model.cfg.n_heads):
        # [batch, key_pos, d_mlp]: what each source token would add with all the attention
        per_source = torch.stack([transform(token_to_neuron(model, k, head=h))[tokens[:, k]]
                                  for k in range(n_pos)], dim=1)
        pre += torch.einsum("bqk,bkn->bqn", pattern[:, h], per_source)
    return pre


def _right_with_neuron_inputs(model, tokens: Tensor, targets: Tensor, pre: Tensor, tolerance: int) -> tuple[int, int]:
    """(right, counted) over the targets != IGNORE when the MLP's pre-activations are replaced by `pre`."""
    def replace(_, hook):
        return pre

    from utils.tasks import IGNORE

    logits = model.run_with_hooks(tokens, fwd_hooks=[(get_act_name("pre", 0), replace)])
    keep = targets != IGNORE
    right = ((logits.argmax(-1)[keep] - targets[keep]).abs() <= tolerance).sum().item()
    return right, keep.sum().item()


def accuracy_with_neuron_inputs(model, tokens: Tensor, targets: Tensor, pre: Tensor, tolerance: int = 0) -> float:
    """Accuracy (over targets != IGNORE) when the MLP's pre-activations are replaced by `pre` [batch, pos, d_mlp].

    A prediction counts as right when it is within `tolerance` of the target (0: exactly right).
    """
    right, counted = _right_with_neuron_inputs(model, tokens, targets, pre, tolerance)
    return right / counted if counted else float("nan")


@torch.no_grad()
def accuracy_with_maps_replaced(model, tokens: Tensor, targets: Tensor, transform, tolerance: int = 0) -> float:
    """Accuracy (over targets != IGNORE) when every effective map into the neurons is replaced by `transform(map)`.

    The maps are token_to_neuron at every source position and direct_to_neuron at every position,
    each [vocab, d_mlp]; the neuron inputs are rebuilt from the transformed maps with the measured
    attention (neuron_inputs) and the model runs on from there. `transform` keeps some
    frequencies, fits a polynomial or a monotone curve to every column, ...; an answer counts as
    right when it is within `tolerance` of the target.
    """
    _, cache = model.run_with_cache(tokens, names_filter=get_act_name("pattern", 0))
    pre = neuron_inputs(model, tokens, cache["pattern", 0], transform)
    return accuracy_with_neuron_inputs(model, tokens, targets, pre, tolerance)


# --------------------------------------------------------------------- chapter 06: positions in the Fibonacci model, and the addition model
def positional_qk_scores(model, layer: int = 0, head: int = 0) -> Tensor:
    """Position-only QK circuit W_pos W_Q W_K^T W_pos^T / sqrt(d_head), [query_pos, key_pos].

    The part of every attention score that depends on the two positions and not on the tokens.
    Entries above the diagonal (keys after the query) are never used.
    """
    queries = model.W_pos @ model.W_Q[layer, head]
    keys = model.W_pos @ model.W_K[layer, head]
    return queries @ keys.T / model.cfg.d_head**0.5


def attention_on_recent(pattern: Tensor, window: int = 2, head: int = 0) -> Tensor:
    """Mean attention each query position puts on itself and the window - 1 positions before it, [query_pos].

    pattern: [batch, head, query_pos, key_pos]; the mean is over the batch.
    """
    n = pattern.shape[-1]
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    recent = (k <= q) & (k > q - window)
    return (pattern[:, head] * recent).sum(-1).mean(0)


def mean_pattern_on_targets(pattern: Tensor, targets: Tensor, head: int = 0) -> Tensor:
    """Mean attention pattern of one head, [query_pos, key_pos], each query row averaged over the inputs
    that have a target at that position (padding and positions past a sequence's end left out).

    pattern: [batch, head, query_pos, key_pos]; targets: [batch, pos] with IGNORE where there is none.
    A position without any target (position 0) is averaged over every input.
    """
    from utils import tasks

    counts = (targets != tasks.IGNORE).float()  # [batch, query_pos]
    counts[:, counts.sum(0) == 0] = 1.0
    weights = counts / counts.sum(0)
    return torch.einsum("bqk,bq->qk", pattern[:, head], weights)


@torch.no_grad()
def accuracy_with_keys_dropped(model, tokens: Tensor, targets: Tensor, offsets, layer: int = 0,
                               batch_size: int = 2048) -> dict[int, tuple[float, float]]:
    """{query position: (accuracy, mean loss)} with the attention to some keys removed.

    For every query position q the attention to the keys q - d, d in `offsets` (d >= 0, keys that
    exist), is set to zero and the rest of the row is renormalised to sum to 1, in every head of
    `layer`; the model runs on from there. Both figures are taken over the targets != IGNORE at
    each position that has any. offsets = range(2, n_ctx) keeps only the keys q - 1 and q.
    Runs `batch_size` inputs at a time (all 8,256 Fibonacci inputs at once peaked some 80 MB higher).
    """
    n = tokens.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    dropped = torch.zeros(n, n, dtype=torch.bool)
    for d in offsets:
        dropped |= (q - k) == d
    return accuracy_and_loss_by_position(model, tokens, targets, [(get_act_name("pattern", layer),
                                                                   renormalised_without(dropped))], batch_size)


def renormalised_without(dropped: Tensor):
    """A hook on an attention pattern that zeroes the [query, key] entries `dropped` marks and renormalises each row."""
    def drop(pattern: Tensor, hook) -> Tensor:
        kept = pattern.masked_fill(dropped, 0.0)
        return kept / kept.sum(-1, keepdim=True)
    return drop


def accuracy_and_loss_by_position(model, tokens: Tensor, targets: Tensor, fwd_hooks: list,
                                  batch_size: int = 2048) -> dict[int, tuple[float, float]]:
    """{position: (accuracy, mean cross-entropy)} over the targets != IGNORE, the model run with `fwd_hooks`."""
    from utils.tasks import IGNORE

    n = tokens.shape[1]
    right, loss, counted = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), torch.zeros(n)
    for chunk, chunk_targets in zip(tokens.split(batch_size), targets.split(batch_size)):
        logits = model.run_with_hooks(chunk, fwd_hooks=fwd_hooks)
        for pos in range(n):
            keep = chunk_targets[:, pos] != IGNORE
            if keep.any():
                right[pos] += (logits[keep, pos].argmax(-1) == chunk_targets[keep, pos]).sum()
                loss[pos] += torch.nn.functional.cross_entropy(logits[keep, pos], chunk_targets[keep, pos],
                                                               reduction="sum").double()
                counted[pos] += keep.sum()
    return {pos: ((right[pos] / counted[pos]).item(), (loss[pos] / counted[pos]).item())
            for pos in range(n) if counted[pos] > 0}


@torch.no_grad()
def answer_agreement(model, other, pairs: Tensor, position: int = 1) -> float:
    """Share of the inputs `pairs` [batch, pos] on which two models give the same answer (argmax) at `position`."""
    return (model(pairs)[:, position].argmax(-1) == other(pairs)[:, position].argmax(-1)).float().mean().item()


def best_match(curves: Tensor, others: Tensor) -> Tensor:
    """For every column of `curves` [n, a], the largest |Pearson correlation| with any column of `others` [n, b], [a].

    Neurons of two separately trained models are not numbered alike: this pairs each neuron
    with the one of the other model whose curve (over the same n inputs) it follows best, sign aside.
    """
    return correlations(curves, others).abs().max(1).values.to(curves.dtype)


def correlations(curves: Tensor, others: Tensor) -> Tensor:
    """Pearson correlation of every column of `curves` [n, a] with every column of `others` [n, b], [a, b] (float64)."""
    def unit(x: Tensor) -> Tensor:
        x = x.double() - x.double().mean(0)
        return x / x.norm(dim=0).clamp(min=1e-12)

    return unit(curves).T @ unit(others)
