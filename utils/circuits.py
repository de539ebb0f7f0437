"""Circuits read off the weights and the cache: residual decompositions, attention, paths.

Shapes follow TransformerLens: the cache holds q and k as [batch, pos, head, d_head] and
attention patterns as [batch, head, query_pos, key_pos].
"""

from __future__ import annotations

import torch
from torch import Tensor


def residual_from_components(model, cache) -> Tensor:
    """The final residual stream rebuilt as embed + pos_embed + every attention and MLP output, [batch, pos, d_model]."""
    resid = cache["hook_embed"] + cache["hook_pos_embed"]
    for layer in range(model.cfg.n_layers):
        resid = resid + cache["attn_out", layer]
        if not model.cfg.attn_only:
            resid = resid + cache["mlp_out", layer]
    return resid


def attention_pattern(q: Tensor, k: Tensor) -> Tensor:
    """Causal attention pattern softmax(q k^T / sqrt(d_head)), [batch, head, query_pos, key_pos].

    q, k: [batch, pos, head, d_head]. Keys after the query are masked out before the softmax.
    """
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    n = q.shape[1]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


# --------------------------------------------------------------------- full circuits (one-layer models)
def direct_path(model) -> Tensor:
    """The direct path W_E W_U: logits each token writes with no attention or MLP, [vocab (input), vocab (output)]."""
    return model.W_E @ model.W_U


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

    With the pattern frozen, a one-layer attention-only model is linear in the (one-hot) tokens.
    """
    def freeze(_, hook):
        return pattern

    return model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", freeze)])


def fraction_ordered(scores: Tensor) -> float:
    """Fraction of (row, key b < key c) comparisons in which scores[row, c] > scores[row, b] (strictly).

    1.0 means every row ranks larger key tokens strictly higher.
    """
    n = scores.shape[-1]
    later_wins = scores[:, None, :] > scores[:, :, None]  # [row, b, c]: scores[row, c] > scores[row, b]
    pairs = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return later_wins[:, pairs].float().mean().item()
