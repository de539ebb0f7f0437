"""The checkers of chapter 07: paths through the residual stream."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from utils import circuits, fourier, models, proofs, residual_paths, tasks, train
from utils.checks.engine import (Attempt, Case, CheckFailed, Mistake, call_learner, check_case, compare,
                                 compare_float, compare_tensors, copies, diagnosis, exercise, matches, passed)
from utils.checks.fixtures import (changed_copy, fresh_model, noisy_addition, noisy_model, random_causal_pattern,
                                   random_models, smooth_curves)
from utils.tasks import IGNORE

def _one_layer_cases() -> list[Case]:
    fresh = fresh_model("max_of_list")
    with torch.no_grad():
        fresh.W_pos.mul_(20.0)  # a fresh W_pos is tiny: scale it so that forgetting it shows
    n = fresh.cfg.n_ctx
    return [("on a fresh max_of_list model and a random pattern",
             (fresh, torch.randint(0, 64, (5, n)), random_causal_pattern(5, 1, n))),
            ("on the noisy checkpoint and a random pattern",
             (noisy_model("max_of_list", 0.1), torch.randint(0, 64, (7, n)), random_causal_pattern(7, 1, n)))]


def _direct_and_head(model, tokens: Tensor, pattern: Tensor) -> tuple[Tensor, Tensor]:
    paths = residual_paths.one_layer_path_logits(model, tokens, pattern)
    return paths["direct"], paths["head 0"]


@exercise("7.1", "the path expansion of a one-layer model", residual_paths.one_layer_path_logits, kind="implementation",
          replacement=_direct_and_head,  # the course's paths as the exercise returns them: a tuple, not a dict
          hint="each path starts from the residual stream's input at every position (token and position); the head "
               "mixes the value vectors of the key positions with the pattern's rows, then writes and unembeds; "
               "return the two paths as a tuple, direct first.",
          mistakes=(
              Mistake("W_pos left out", "the residual stream starts as the token embedding plus the positional "
                      "embedding, and both paths carry both.", lambda m, t, p: _direct_and_head(
                          changed_copy(m, "max_of_list", "pos_embed.weight", torch.zeros_like), t, p)),
              Mistake("the pattern read with queries and keys swapped",
                      "pattern[b, h, q, k] is how much query q takes from key k: sum over the last axis.",
                      lambda m, t, p: _direct_and_head(m, t, p.transpose(-1, -2))),
              Mistake("the two paths added into one tensor",
                      "the exercise asks for each path on its own, as a tuple (direct, head): their sum is the "
                      "logits, which the model already gives.", lambda m, t, p: sum(_direct_and_head(m, t, p))),
          ))
def check_one_layer_path_logits(fn: Callable, ex: Attempt) -> None:
    # the reference returns a dict of named paths, the learner a tuple (direct, head)
    for where, args in _one_layer_cases():
        check_case(fn, ex.at(where), args, reference=_direct_and_head, atol=1e-3, rtol=1e-3)
    passed(ex)


def _split_cases() -> list[Case]:
    noisy = noisy_model("addition", 0.05)
    fresh = fresh_model("addition")
    with torch.no_grad():
        fresh.W_in.mul_(3.0)
    pairs = torch.randint(0, 64, (48, 2))
    cases = []
    for where, model in (("on a noisy addition checkpoint", noisy), ("on a fresh addition model", fresh)):
        with torch.no_grad():
            _, cache = model.run_with_cache(pairs)
        x, attn = cache["embed"] + cache["pos_embed"], cache["attn_out", 0]
        cases.append((f"{where}, pieces [x, attn_out]", (model, [x, attn])))
        cases.append((f"{where}, pieces per source token", (model, [x, *residual_paths.head_pieces(model, cache)])))
    return cases


check_split_mlp_logits = exercise(
    "7.2", "the MLP split over its input's paths", residual_paths.split_mlp_logits, function="split_mlp_logits",
    cases=_split_cases, atol=1e-3, rtol=1e-3,
    hint="the skip path carries every piece untouched; the MLP (ReLU included) runs once per piece, on that piece "
         "alone, and its outputs are added; the total is unembedded.",
    mistakes=(
        Mistake("the MLP applied once, to the whole input (the exact model, not the split)",
                "the question is what goes wrong when the MLP sees each piece separately: call it once per piece.",
                lambda model, pieces: (sum(pieces) + residual_paths.mlp_output(model, sum(pieces))) @ model.W_U + model.b_U),
        Mistake("the skip path left out",
                "the residual stream still carries the pieces themselves past the MLP, and the unembedding reads "
                "them too.",
                lambda model, pieces: sum(residual_paths.mlp_output(model, p) for p in pieces) @ model.W_U + model.b_U),
        Mistake("the MLP without its ReLU",
                "without the non-linearity the split would be exact; the MLP is relu(x W_in + b_in) W_out + b_out.",
                lambda model, pieces: (sum(pieces) + sum(p @ model.W_in[0] @ model.W_out[0] for p in pieces))
                @ model.W_U + model.b_U),
    ))


def _induction_attention_cases() -> list[Case]:
    return [(f"on a random pattern with half = {half}", (random_causal_pattern(batch, heads, 2 * half), half))
            for batch, heads, half in [(6, 2, 4), (3, 3, 5)]]


check_induction_attention = exercise(
    "7.3", "induction attention", residual_paths.induction_attention, function="induction_attention",
    kind="implementation", cases=_induction_attention_cases, atol=1e-6,
    hint="only the queries of the second copy count; each looks at the position just after its own token's earlier "
         "occurrence, half positions back plus one; average over the batch and those queries, one number per head.",
    mistakes=(
        Mistake("the previous position (a previous-token head's key)",
                "an induction head looks at what came after the earlier copy of the current token, not at the "
                "position just before the query.",
                lambda p, half: residual_paths.attention_to_offset(p[:, :, half - 1:, half - 1:], 1)),
        Mistake("the earlier occurrence of the same token",
                "the head copies the token that followed the earlier occurrence, one position later.",
                lambda p, half: residual_paths.attention_to_offset(p, half)),
        Mistake("the last query of the first copy counted too",
                "only queries in the second copy (from position half on) have an earlier occurrence to look back to.",
                lambda p, half: residual_paths.attention_to_offset(p, half - 1)),
    ))


def _patch_cases() -> list[Case]:
    noisy = noisy_model("induction", 0.05)
    tokens, _ = tasks.induction_batch(32)
    corrupted, _ = tasks.induction_batch(32)
    return [("from both layer-0 heads into both layer-1 heads", (noisy, tokens, corrupted, [0, 1], [0, 1])),
            ("from layer-0 head 1 into layer-1 head 0 only", (noisy, tokens, corrupted, [1], [0])),
            ("from layer-0 head 0 into layer-1 head 1 only", (noisy, tokens, corrupted, [0], [1]))]


def _patched_everywhere(model, tokens, corrupted, sources, targets) -> Tensor:
    """The change the path patch makes, added to the whole layer-1 input instead of the target heads' keys."""
    change = residual_paths.layer0_output(model, corrupted, sources) - residual_paths.layer0_output(model, tokens, sources)
    return model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda resid, hook: resid + change)])


def _zero_ablated(model, tokens, corrupted, sources, targets) -> Tensor:
    """The target heads' keys with the sources' clean output taken away, not replaced."""
    change = -residual_paths.layer0_output(model, tokens, sources)
    return model.run_with_hooks(tokens, fwd_hooks=[residual_paths.path_patch_hook(model, change, targets)])


check_patch_key_path = exercise(
    "7.4", "patch one path: into the induction head's keys", residual_paths.patch_key_path, function="patch_key_path",
    cases=_patch_cases, atol=1e-3, rtol=1e-3,
    hint="the layer-1 key is a linear function of the residual stream, which is a sum: swapping one term of that "
         "sum changes the key by the difference of the two versions of the term, passed through the key weights of "
         "the target heads only; the queries, the values and the other heads keep the clean stream.",
    mistakes=(
        Mistake("the patch put into the queries",
                "the path under test ends in the keys of the layer-1 heads: the query reads the current token, the "
                "key reads what the previous-token head wrote.",
                lambda *args: residual_paths.patch_key_path(*args, reader="q")),
        Mistake("the layer-0 output replaced on every path into layer 1 (queries and values too)",
                "patch one path only: the layer-1 input stays clean for the queries, the values and the logits.",
                _patched_everywhere),
        Mistake("every layer-1 head patched, not only the target heads",
                "the other layer-1 heads keep their clean keys: the path ends in the target heads.",
                lambda model, tokens, corrupted, sources, targets: residual_paths.patch_key_path(
                    model, tokens, corrupted, sources, list(range(model.cfg.n_heads)))),
        Mistake("the change the wrong way round (clean minus corrupted)",
                "the patch replaces the clean output by the corrupted one, so the key changes by the corrupted "
                "output minus the clean one; the other order moves the key as far the other way.",
                lambda model, tokens, corrupted, sources, targets: model.run_with_hooks(tokens, fwd_hooks=[
                    residual_paths.path_patch_hook(model, residual_paths.layer0_output(model, tokens, sources)
                                                   - residual_paths.layer0_output(model, corrupted, sources), targets)])),
        Mistake("the layer-0 output removed from the keys (zero-ablated) instead of replaced",
                "a patch swaps the clean output for the output on the corrupted tokens, so the key still gets a "
                "previous-token signal of the usual size, only the wrong one.",
                _zero_ablated),
    ))


def _attribution_cases() -> list[Case]:
    noisy = noisy_model("induction", 0.1)
    tokens, targets = tasks.induction_batch(24)
    starts, lengths = torch.randint(0, 6, (24,)), torch.randint(3, 9, (24,))
    moved, moved_targets = tasks.repeated_stretch_batch(starts, lengths)
    return [("on a noisy induction checkpoint", (noisy, tokens, targets)),
            ("on repeats of 3-8 tokens placed anywhere", (noisy, moved, moved_targets))]


def _raw_logits(model, tokens: Tensor, targets: Tensor) -> dict:
    wanted = targets[targets != IGNORE][:, None]
    return {name: logits.gather(-1, wanted).mean().item()
            for name, logits in residual_paths.component_logits(model, tokens, targets).items()}


def _current_token(model, tokens: Tensor, targets: Tensor) -> dict:
    """The reference read at the token each position holds: its targets replaced by the tokens."""
    return residual_paths.correct_logit_attribution(model, tokens, torch.where(targets != IGNORE, tokens, IGNORE))


def _norms(model, tokens: Tensor, targets: Tensor) -> dict:
    _, cache = model.run_with_cache(tokens)
    keep = targets != IGNORE
    return {name: part[keep].norm(dim=-1).mean().item()
            for name, part in residual_paths.residual_components(model, cache).items()}


check_correct_logit_attribution = exercise(
    "7.5", "who writes the answer?", residual_paths.correct_logit_attribution, function="correct_logit_attribution",
    cases=_attribution_cases, atol=1e-3, rtol=1e-3,
    hint="split the final residual stream into its terms (the two embeddings and every head's output); unembed "
         "each term, subtract its mean over the vocabulary, read it at the target token, and average over the "
         "positions that have a target.",
    mistakes=(
        Mistake("the logit not centred on its mean over the vocabulary",
                "adding the same amount to every logit changes no prediction: a term helps the answer only by what "
                "it gives the target more than the average token.",
                _raw_logits),
        Mistake("the current token's logit, not the target's",
                "the model predicts the next token: read each position's logits at its target, not at the token "
                "it holds.", _current_token),
        Mistake("each term's norm, not its logit",
                "a large vector can write nothing the unembedding reads: measure what each term adds to the correct "
                "logit, not how long it is.", _norms),
    ))


