"""Chapter 07: paths through the residual stream: the path expansion, the MLP split over its input's paths,
paths by length, induction heads, path patching and direct logit attribution.

Shapes follow TransformerLens: the cache holds q and k as [batch, pos, head, d_head] and
attention patterns as [batch, head, query_pos, key_pos].
"""

from __future__ import annotations

from utils import runtime  # noqa: F401  (one torch thread; freed memory back after every cell)
import torch
from torch import Tensor
from transformer_lens.utilities import get_act_name


def mlp_output(model, resid: Tensor, layer: int = 0) -> Tensor:
    """The layer's MLP applied to any residual-stream vectors: relu(resid W_in + b_in) W_out + b_out, [..., d_model]."""
    hidden = torch.relu(resid @ model.W_in[layer] + model.b_in[layer])
    return hidden @ model.W_out[layer] + model.b_out[layer]


def one_layer_path_logits(model, tokens: Tensor, pattern: Tensor) -> dict[str, Tensor]:
    """The path expansion of a one-layer attention-only model, each term [batch, pos, vocab].

    "direct": (W_E[x] + W_pos) W_U + b_U; "head h": sum_k pattern[h, q, k] (W_E[x_k] + W_pos[k]) W_V W_O W_U,
    plus the head's bias terms (b_V W_O + b_O) W_U. With `pattern` the model's own attention, the
    terms add up to the logits exactly: once the pattern is fixed, every path is linear.
    """
    embedded = model.W_E[tokens] + model.W_pos[: tokens.shape[1]]  # [batch, pos, d_model]
    terms = {"direct": embedded @ model.W_U + model.b_U}
    for h in range(model.cfg.n_heads):
        values = embedded @ model.W_V[0, h] + model.b_V[0, h]  # [batch, pos, d_head]
        mixed = torch.einsum("bqk,bkd->bqd", pattern[:, h], values)
        terms[f"head {h}"] = (mixed @ model.W_O[0, h]) @ model.W_U
    terms["direct"] = terms["direct"] + model.b_O[0] @ model.W_U
    return terms


def head_pieces(model, cache, layer: int = 0, head: int = 0) -> Tensor:
    """A head's output split by source position, [key_pos, batch, query_pos, d_model].

    Piece k is pattern[q, k] (resid_pre[k] W_V + b_V) W_O: what the head carries from position k.
    The pieces add up to the head's output (b_O aside, which is zero in the course's models).
    """
    values = cache["resid_pre", layer] @ model.W_V[layer, head] + model.b_V[layer, head]  # [batch, key, d_head]
    pattern = cache["pattern", layer][:, head]  # [batch, q, k]
    return torch.einsum("bqk,bkd->kbqd", pattern, values) @ model.W_O[layer, head]


def naive_path_logits(model, cache) -> Tensor:
    """The *wrong* "sum over paths" of a one-layer model with an MLP, [batch, pos, vocab].

    Every path is followed on its own, the MLP ones too: the skip path x, the head's piece from
    every source position, the MLP applied to x alone, and the MLP applied to each piece alone,
    all added before unembedding. That treats MLP(x + sum_k piece_k) as MLP(x) + sum_k MLP(piece_k),
    which the ReLU makes false; this function exists to measure by how much.
    """
    x = cache["embed"] + cache["pos_embed"]
    pieces = head_pieces(model, cache)
    through_mlp = mlp_output(model, x) + sum(mlp_output(model, piece) for piece in pieces)
    return (x + pieces.sum(0) + through_mlp) @ model.W_U + model.b_U


def head_output(model, cache, layer: int, head: int) -> Tensor:
    """What one head adds to the residual stream, z W_O (+ its share of b_O: none, biases are zero), [batch, pos, d_model]."""
    return cache["z", layer][:, :, head] @ model.W_O[layer, head]


def unraveled_head_terms(model, cache, layer: int, head: int) -> dict[str, Tensor]:
    """A head's output split over the components that wrote its input, with its pattern frozen.

    The head reads resid_pre = embed + pos_embed + the outputs of every earlier head (an
    attention-only model). With the measured pattern held fixed, its output is linear in that
    sum, so it splits exactly into one term per source: pattern (source W_V W_O). Returns
    {"embed": ..., "L0H1": ..., ...}, each [batch, pos, d_model]; they add up to head_output.
    The head's value bias, if any, goes with "embed".
    """
    pattern = cache["pattern", layer][:, head]  # [batch, q, k]
    sources = {"embed": cache["embed"] + cache["pos_embed"]}
    for earlier in range(layer):
        for h in range(model.cfg.n_heads):
            sources[f"L{earlier}H{h}"] = head_output(model, cache, earlier, h)
    terms = {}
    for name, source in sources.items():
        values = source @ model.W_V[layer, head] + (model.b_V[layer, head] if name == "embed" else 0)
        terms[name] = torch.einsum("bqk,bkd->bqd", pattern, values) @ model.W_O[layer, head]
    return terms


def memory_management_cosines(model, layer: int = 0) -> Tensor:
    """Cosine between each neuron's input direction W_in[:, n] and output direction W_out[n, :], [d_mlp].

    Near -1: the neuron writes the opposite of what it reads, erasing a direction from the stream.
    """
    w_in, w_out = model.W_in[layer], model.W_out[layer]  # [d_model, d_mlp], [d_mlp, d_model]
    return torch.nn.functional.cosine_similarity(w_in.T, w_out, dim=-1)


def attention_to_offset(pattern: Tensor, offset: int) -> Tensor:
    """Mean attention every head puts from query q on key q - offset (queries q >= offset), [head].

    pattern: [batch, head, query_pos, key_pos]. offset 1 measures a previous-token head.
    """
    n = pattern.shape[-1]
    q = torch.arange(offset, n)
    return pattern[:, :, q, q - offset].mean(dim=(0, 2))


def induction_attention(pattern: Tensor, half: int) -> Tensor:
    """Mean attention every head puts, on sequences repeated once (period `half`), from a query in
    the second copy to the token after its earlier occurrence (key q - half + 1), [head]."""
    q = torch.arange(half, pattern.shape[-1])
    return pattern[:, :, q, q - half + 1].mean(dim=(0, 2))


def composition_score(a: Tensor, b: Tensor) -> float:
    """Composition score ||a b||_F / (||a||_F ||b||_F) of two matrices, in [0, 1].

    With a the OV matrix of an earlier head and b what a later head reads with (its QK matrix,
    transposed for K-composition), it says how much of what one head writes the other reads.
    `model.all_composition_scores` computes it for every pair of heads.
    """
    norm = torch.linalg.matrix_norm
    return (norm(a @ b) / (norm(a) * norm(b))).item()


def split_mlp_logits(model, pieces: list[Tensor]) -> Tensor:
    """The logits of a one-layer model with an MLP when the MLP is applied to each piece of its input on its own, [batch, pos, vocab].

    `pieces` are residual-stream tensors [batch, pos, d_model] that add up to the MLP's input
    (resid_mid). The result is (sum(pieces) + sum_p MLP(p)) W_U + b_U, where the model computes
    (sum(pieces) + MLP(sum(pieces))) W_U + b_U; with a single piece the two are the same. The
    split [x, attn_out] is MLP(x) + MLP(attn); the split [x, piece_0, piece_1, ...] (head_pieces)
    is the split per source token.
    """
    total = sum(pieces)
    through_mlp = sum(mlp_output(model, piece) for piece in pieces)
    return (total + through_mlp) @ model.W_U + model.b_U


def repeat_loss_and_accuracy(logits: Tensor, targets: Tensor) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy) over the positions whose target is not IGNORE; logits [batch, pos, vocab]."""
    from utils.tasks import IGNORE

    keep = targets != IGNORE
    loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep]).item()
    return loss, (logits[keep].argmax(-1) == targets[keep]).float().mean().item()


def path_logits_by_length(model, cache) -> dict[int, Tensor]:
    """The logits of a two-layer attention-only model as a sum over paths, grouped by length, {0, 1, 2: [batch, pos, vocab]}.

    With both attention patterns frozen at the cached ones: length 0 is the direct path
    (embed + pos_embed) W_U + b_U; length 1 every layer-0 head and every layer-1 head fed by the
    embeddings; length 2 every layer-1 head fed by a layer-0 head (the virtual heads). The three
    add up to the logits.
    """
    by_length = {0: (cache["embed"] + cache["pos_embed"]) @ model.W_U + model.b_U, 1: 0.0, 2: 0.0}
    for h in range(model.cfg.n_heads):
        by_length[1] = by_length[1] + head_output(model, cache, 0, h) @ model.W_U
        for source, term in unraveled_head_terms(model, cache, 1, h).items():
            by_length[1 if source == "embed" else 2] = by_length[1 if source == "embed" else 2] + term @ model.W_U
    return by_length


def patch_key_path(model, tokens: Tensor, corrupted: Tensor, sources: list[int], targets: list[int],
                   reader: str = "k") -> Tensor:
    """Logits [batch, pos, vocab] with one path patched: layer-0 heads `sources` -> the keys of layer-1 heads `targets`.

    Only in the key input of the layer-1 heads `targets`, the outputs of the layer-0 heads
    `sources` on `tokens` are replaced by their outputs on `corrupted` (same shape); every other
    path (the queries and values of layer 1, the other layer-1 heads, the direct path to the
    logits) still sees the clean outputs. The key is linear in its input, so the patch adds
    (corrupted output - clean output) W_K to the key of each target head. `reader` "q" or "v"
    patches the same outputs into the queries or the values instead (for comparison).
    """
    change = layer0_output(model, corrupted, sources) - layer0_output(model, tokens, sources)
    return model.run_with_hooks(tokens, fwd_hooks=[path_patch_hook(model, change, targets, reader)])


def layer0_output(model, tokens: Tensor, heads: list[int]) -> Tensor:
    """What the layer-0 heads `heads` write to the residual stream on `tokens`, summed, [batch, pos, d_model]."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name == get_act_name("z", 0))
    return sum(cache["z", 0][:, :, h] @ model.W_O[0, h] for h in heads)


def path_patch_hook(model, change: Tensor, targets: list[int], reader: str = "k") -> tuple:
    """A (hook name, hook) pair that adds `change` [batch, pos, d_model] to the input of one reader of layer 1 only.

    `reader` is "q", "k" or "v": the hook adds change W_Q (or W_K, W_V) of layer 1 to the queries
    (keys, values) of the heads `targets`, which is what those heads would compute if the residual
    stream had `change` added for them alone (each reader is linear in the stream).
    """
    weights = {"q": model.W_Q, "k": model.W_K, "v": model.W_V}[reader]

    def patch(activation: Tensor, hook) -> Tensor:  # [batch, pos, head, d_head]
        patched = activation.clone()
        for h in targets:
            patched[:, :, h] = patched[:, :, h] + change @ weights[1, h]
        return patched

    return get_act_name(reader, 1), patch


def residual_components(model, cache) -> dict[str, Tensor]:
    """Every term of an attention-only model's final residual stream: embed, pos_embed and each head's output, [batch, pos, d_model] each."""
    parts = {"embed": cache["embed"], "pos_embed": cache["pos_embed"]}
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            parts[f"L{layer}H{h}"] = head_output(model, cache, layer, h)
    return parts


def correct_logit_attribution(model, tokens: Tensor, targets: Tensor) -> dict[str, float]:
    """Each component's mean direct contribution to the correct logit, {"embed", "pos_embed", "L0H0", ...: float}.

    A component's contribution at a position is its output times W_U, centred on its mean over
    the vocabulary (a constant added to every logit changes no prediction), read at the target
    token; averaged over the positions whose target is not IGNORE. The contributions add up to
    the model's centred correct logit (b_U, zero here, aside).
    """
    from utils.tasks import IGNORE

    wanted = targets[targets != IGNORE][:, None]
    return {name: (logits - logits.mean(-1, keepdim=True)).gather(-1, wanted).mean().item()
            for name, logits in component_logits(model, tokens, targets).items()}


def component_logits(model, tokens: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Each term of residual_components unembedded at the positions with a target, {name: [n, vocab]}."""
    from utils.tasks import IGNORE

    keep = targets != IGNORE
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith(("hook_embed", "hook_pos_embed",
                                                                                      "hook_z")))
    return {name: part[keep] @ model.W_U for name, part in residual_components(model, cache).items()}
