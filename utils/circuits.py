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
