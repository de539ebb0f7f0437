"""The checkers of chapter 00: tour."""

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

def _without(model, cache, *hooks: str, layers: range | None = None) -> Tensor:
    """The reference's stream less the named outputs of `layers` (all layers by default) or of the embeddings."""
    resid = circuits.residual_from_components(model, cache)
    for name in hooks:
        for layer in (layers if layers is not None else range(model.cfg.n_layers)) if name != "pos_embed" else [None]:
            if layer is None:
                resid = resid - cache[name]
            elif name != "mlp_out" or not model.cfg.attn_only:
                resid = resid - cache[name, layer]
    return resid


def _cached_runs() -> list[Case]:
    """A fresh attention-only model and a fresh model with an MLP (non-zero biases), each with a cache of random tokens."""
    out = []
    for name, model in random_models():
        _, cache = model.run_with_cache(torch.randint(0, model.cfg.d_vocab, (4, model.cfg.n_ctx)))
        out.append((f"on a fresh {name} model", (model, cache)))
    return out


check_residual_from_components = exercise(
    "0.1", "the residual stream is a sum", circuits.residual_from_components, function="residual_from_components",
    kind="analysis", cases=_cached_runs, atol=1e-4,
    hint="the stream starts as the token embedding plus the positional embedding, and every attention layer and "
         "every MLP adds its output to it; nothing else touches it.",
    mistakes=(
        Mistake("the sum without the positional embedding",
                "the stream starts as the token embedding plus the positional embedding of its position.",
                lambda model, cache: _without(model, cache, "pos_embed")),
        Mistake("the sum without the MLP outputs",
                "in a model with MLPs, each MLP adds its output to the stream too (the check uses the addition model).",
                lambda model, cache: _without(model, cache, "mlp_out")),
        Mistake("the stream before the last layer (resid_pre)",
                "the last layer's outputs belong in the final stream as well.",
                lambda model, cache: _without(model, cache, "attn_out", "mlp_out",
                                              layers=range(model.cfg.n_layers - 1, model.cfg.n_layers))),
    ))


def _own_key_masked_too(q: Tensor, k: Tensor, fill: float = float("-inf")) -> Tensor:
    """The reference's pattern with each query's own key hidden as well as the later ones (the mask off by one).

    The first query then has every key masked: a softmax over nothing is NaN with a `fill` of -inf, and an even
    spread over every key (the future ones included) with a large finite `fill`; the other rows keep their rows.
    """
    scores = circuits.mask_future(circuits.attention_scores(q, k))
    own = torch.eye(scores.shape[-1], dtype=torch.bool)
    pattern = scores.masked_fill(own, float("-inf")).softmax(-1)
    return pattern if math.isinf(fill) else pattern.nan_to_num(1 / scores.shape[-1])


def _queries_and_keys() -> list[Case]:
    return [(f"on random q, k of shape {shape}", (torch.randn(*shape), torch.randn(*shape)))
            for shape in [(3, 6, 1, 32), (2, 5, 3, 8)]]


check_attention_pattern = exercise(
    "0.2", "an attention pattern from queries and keys", circuits.attention_pattern, function="attention_pattern",
    kind="implementation", cases=_queries_and_keys, atol=1e-5,
    hint="score every (query, key) pair by a dot product over d_head, scale it, hide the keys after the query, "
         "and normalise each query's row over the keys.",
    mistakes=(
        Mistake("the scores without the 1/sqrt(d_head) scale",
                "the head divides every query-key dot product by the square root of d_head before the softmax.",
                lambda q, k: circuits.attention_pattern(q * q.shape[-1] ** 0.5, k)),
        Mistake("a pattern without the causal mask",
                "a query may not look at keys after it: those must get weight exactly 0.",
                lambda q, k: circuits.attention_scores(q, k).softmax(-1)),
        Mistake("a softmax over the query axis",
                "each query's weights over the keys must sum to 1, so normalise along the key axis.",
                lambda q, k: circuits.mask_future(circuits.attention_scores(q, k)).softmax(-2)),
        Mistake("a causal mask off by one, which leaves a row with every key masked",
                "a query may look at its own position; hide only the keys after it. Hiding its own key too leaves "
                "the first query nothing to look at, and a softmax over nothing is NaN.",
                _own_key_masked_too),
        Mistake("a causal mask off by one (filled with a large negative number), which leaves a row with every key "
                "masked",
                "a query may look at its own position; hide only the keys after it. Hiding its own key too leaves "
                "the first query with every key masked, so its weight spreads over keys it may not see.",
                lambda q, k: _own_key_masked_too(q, k, fill=-1e9)),
    ))


def _max_of_list_runs(two_layers: bool = False) -> list[Case]:
    """The shipped max_of_list model with noise on its weights (and, with `two_layers`, a two-layer model whose
    blocks are both noisy copies of the trained one), each with 2,000 fresh random lists."""
    trained, config = models.load_model("max_of_list"), models.spec("max_of_list").config
    noised = noisy_model("max_of_list", 0.05)
    lists = torch.randint(0, trained.cfg.d_vocab, (2000, trained.cfg.n_ctx))
    cases = [("on the shipped max_of_list model with noise on its weights", (noised, lists))]
    if two_layers:
        state = dict(noised.state_dict())
        state.update({key.replace("blocks.0.", "blocks.1."): w + 0.02 * torch.randn_like(w)
                      for key, w in trained.state_dict().items() if key.startswith("blocks.0.")})
        deeper = models.model_from_state(dict(config, n_layers=2), state)
        cases.append(("on a two-layer model made of two noisy copies of the trained block", (deeper, lists)))
    return cases


def _last_row(model, lists: Tensor) -> Tensor:
    _, cache = model.run_with_cache(lists, names_filter="blocks.0.attn.hook_pattern")
    return cache["blocks.0.attn.hook_pattern"][:, 0, -1, :]


def _share(hits: Tensor) -> float:
    return hits.float().mean().item()


check_fraction_attending_to_max = exercise(
    "0.3", "how often does the head attend to the maximum?", circuits.fraction_attending_to_max,
    function="fraction_attending_to_max", kind="analysis", cases=lambda: _max_of_list_runs(), atol=1e-6,
    hint="read the last query's row of the pattern from a cache, find the key position it weights most, and ask "
         "whether the token sitting there equals the list's maximum; return the share of lists as a float.",
    mistakes=(
        Mistake("the argmax over the query axis",
                "a row of the pattern is one query; its entries are the keys it looks at, so pick among the keys.",
                lambda model, lists: _share(lists[:, -1] == lists.max(-1).values)),
        Mistake("the attended position compared with the maximum",
                "the argmax gives a position; the question is about the token at that position.",
                lambda model, lists: _share(_last_row(model, lists).argmax(-1) == lists.max(-1).values)),
        Mistake("the first position's row instead of the last",
                "the first position sees only itself; the last one sees the whole list.",
                lambda model, lists: _share(lists[:, 0] == lists.max(-1).values)),
    ))


def _every_position_accuracy(model, lists: Tensor) -> float:
    logits = circuits.logits_with_pattern_replaced(model, lists, circuits.uniform_causal_pattern)
    return _share(logits[:, 1:].argmax(-1) == lists.cummax(-1).values[:, 1:])


check_uniform_attention_accuracy = exercise(
    "0.4", "ablate the attention pattern", circuits.uniform_attention_accuracy, circuits.uniform_causal_pattern,
    function="uniform_attention_accuracy", kind="analysis", cases=lambda: _max_of_list_runs(two_layers=True),
    atol=1e-6,
    hint="hook layer 0's attention pattern and return a replacement in which every query weighs the positions it "
         "can see equally; then score the last position's prediction against each list's maximum.",
    mistakes=(
        Mistake("uniform attention over all positions, future ones included",
                "a query may only see keys at or before it: the future ones must keep weight 0 (in a one-layer "
                "model only the earlier rows change, which the second model of the check reads).",
                lambda model, lists: circuits.last_position_accuracy(circuits.logits_with_pattern_replaced(
                    model, lists, lambda p, hook: torch.full_like(p, 1 / p.shape[-1])), lists)),
        Mistake("the accuracy over every position instead of the last",
                "the question is the last position, which has seen the whole list.",
                _every_position_accuracy),
        Mistake("a hook that leaves the pattern as it was",
                "the run goes on with what a hook returns, and TransformerLens 4 drops every edit to "
                "hook_attn_scores: hook the pattern and return the new one.",
                lambda model, lists: circuits.last_position_accuracy(model(lists), lists)),
    ))


def _rotated_but(state: dict, R: Tensor, which: Callable[[str], bool], instead: Callable) -> dict:
    """The reference's rotation, except that the entries `which` picks get `instead(w, R)` from the original."""
    rotated = models.rotate_residual_stream(state, R)
    return {key: instead(state[key], R) if which(key) else w for key, w in rotated.items()}


_ROTATE_MISTAKES = (
    Mistake("R where R.T belongs on the weights whose first axis is d_model",
            "those weights write x into the stream, and the stream's new coordinates are x times R, so they need the "
            "transpose that undoes it on their other side.",
            lambda state, R: _rotated_but(state, R, lambda key: key.endswith(models._D_MODEL_FIRST),
                                          lambda w, R: R @ w)),
    Mistake("the stream biases left unrotated",
            "attn.o.bias and mlp.out.bias are added to the stream, so they are residual vectors and rotate like one.",
            lambda state, R: _rotated_but(state, R, lambda key: key.endswith(models._STREAM_BIASES),
                                          lambda w, R: w.clone())),
    Mistake("the embeddings left unrotated",
            "the embeddings write the stream's first vector (they are not readers), and that vector must come out "
            "rotated too.",
            lambda state, R: _rotated_but(state, R, lambda key: key in ("embed.weight", "pos_embed.weight")
                                          or key.endswith((".embed.weight", ".pos_embed.weight")),
                                          lambda w, R: w.clone())),
)


@exercise("0.5", "rotate the residual stream", models.rotate_residual_stream, kind="implementation",
          hint="find the d_model axis of each weight that touches the stream and rotate along it, so that what "
               "a writer puts into the stream comes out rotated and a reader meets the rotated stream with the "
               "same rotation; the stream biases are residual vectors; whatever does not touch the stream is "
               "copied.", mistakes=_ROTATE_MISTAKES)
def check_rotate_residual_stream(fn: Callable, ex: Attempt) -> None:
    for name, model in random_models():
        state = {k: v.clone() for k, v in model.state_dict().items()}
        R = torch.linalg.qr(torch.randn(model.cfg.d_model, model.cfg.d_model))[0]
        on = ex.at(f"on the {name} model")
        got = call_learner(fn, on, *copies((state, R)))
        if not isinstance(got, dict) or set(got) != set(state):
            got_keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            raise CheckFailed(f"{on}: expected a dict with the same keys as the state dict ({len(state)} keys), "
                              f"got {got_keys}. Hint: return a new entry for every key, rotated or copied.")
        expected = models.rotate_residual_stream(*copies((state, R)))
        for key in state:
            if key.endswith(models._D_MODEL_FIRST):
                hint = (f"{key} writes to the stream with d_model as its first axis: each vector it writes must come "
                        "out rotated like a residual vector, so rotate along that axis, and mind on which side the "
                        "rotation stands and whether it needs its transpose there.")
            elif key.endswith(models._STREAM_BIASES):
                hint = f"{key} is added to the stream, so it is a residual vector and rotates like one."
            elif key.endswith(models._D_MODEL_LAST):
                hint = (f"{key} has d_model as its last axis: each of its rows lives in the stream, so it rotates "
                        "the way a residual vector does.")
            else:
                hint = f"{key} does not touch the residual stream: copy it unchanged."
            if matches(got[key], expected[key]):
                continue
            named = diagnosis({k: got[k] for k in state}, on, (state, R), 1e-5, 1e-4)
            if named:
                raise CheckFailed(f"{on}: entry {key!r} is not what the rotation gives. {named}")
            compare_tensors(got[key], expected[key], on.at("", advice=hint), atol=1e-5, what=f"entry {key!r}")
    passed(ex)


