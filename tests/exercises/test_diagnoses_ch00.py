"""Chapter 00's checkers name the mistakes issue 24 found them misdiagnosing or leaking.

Each test feeds a learner's wrong answer, written as a learner would write it, and asserts the
diagnosis: a causal mask off by one (0.2), the rotation's fallback messages in words (0.5), a
tensor where a float is asked (0.3), and an ablation through hook_attn_scores, which
TransformerLens 4 ignores (0.4).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformer_lens.utilities import get_act_name

from utils.checks import engine

from tests.exercises.test_checks import _fails


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ 0.2: the causal mask off by one
def _pattern_hiding_the_own_key(q, k, fill=float("-inf")):
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    n = q.shape[1]
    return scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool)), fill).softmax(-1)  # diagonal=0


@pytest.mark.parametrize("fill", [float("-inf"), -1e9, torch.finfo(torch.float32).min])
def test_a_causal_mask_off_by_one_is_a_row_with_every_key_masked(fill):
    message = _fails("attention_pattern", lambda q, k: _pattern_hiding_the_own_key(q, k, fill))
    assert "a row with every key masked" in message and "own position" in message, message
    assert ("NaN" in message) == math.isinf(fill), message


# ------------------------------------------------------------------ 0.5: the fallback messages say what, not how
def _rotation_wrong_at(ending: str, wrong):
    """The right rotation, except for the entries whose key ends in `ending` (not a named mistake)."""
    def rotate_residual_stream(state, R):
        out = {}
        for key, w in state.items():
            if key.endswith(ending):
                out[key] = wrong(w, R)
            elif key.endswith(("attn.o.weight", "mlp.out.weight")):
                out[key] = R.T @ w
            elif key.endswith(("embed.weight", "q.weight", "k.weight", "v.weight", "mlp.in.weight",
                               "attn.o.bias", "mlp.out.bias")):
                out[key] = w @ R
            else:
                out[key] = w.clone()
        return out
    return rotate_residual_stream


@pytest.mark.parametrize("ending, wrong, words", [
    ("attn.q.weight", lambda w, R: w.clone(), "last axis"),
    ("attn.o.weight", lambda w, R: w.clone(), "first axis"),
    ("attn.o.bias", lambda w, R: w @ R.T, "residual vector"),
    ("attn.q.bias", lambda w, R: 2 * w, "copy it unchanged"),
])
def test_the_rotation_messages_say_what_to_reconsider_without_code(ending, wrong, words):
    message = _fails("rotate_residual_stream", _rotation_wrong_at(ending, wrong))
    assert ending in message and words in message, message
    assert not re.search(r"@|\bR\.T\b|\bW\b|\bb\b", message), f"the message spells out the solution: {message}"


# ------------------------------------------------------------------ 0.3: a float, not a tensor
def test_a_share_left_as_a_tensor_is_refused():
    def fraction_attending_to_max(model, lists):
        _, cache = model.run_with_cache(lists, names_filter=get_act_name("pattern", 0))
        attended = cache["pattern", 0][:, 0, -1].argmax(-1)
        return (lists[torch.arange(len(lists)), attended] == lists.max(-1).values).float().mean()  # no .item()

    message = _fails("fraction_attending_to_max", fraction_attending_to_max)
    assert "expected a Python float, got a tensor" in message and ".item()" in message, message


# ------------------------------------------------------------------ 0.4: the TransformerLens 4 trap
def _accuracy_through_the_scores(edit):
    def uniform_attention_accuracy(model, lists):  # the ablation ARENA teaches on TransformerLens 2
        logits = model.run_with_hooks(lists, fwd_hooks=[(get_act_name("attn_scores", 0), edit)])
        return (logits[:, -1].argmax(-1) == lists.max(-1).values).float().mean().item()
    return uniform_attention_accuracy


def _equal_scores(scores):
    n = scores.shape[-1]
    return torch.zeros_like(scores).masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))


def test_uniform_scores_returned_from_a_hook_on_hook_attn_scores_get_the_trap():
    message = _fails("uniform_attention_accuracy", _accuracy_through_the_scores(lambda s, hook: _equal_scores(s)))
    assert engine.SCORES_TRAP in message, message


def test_uniform_scores_written_in_place_get_the_trap_too():
    """An edit in place raises no warning, so the engine notices nothing; the named mistake names the trap."""
    def in_place(scores, hook):
        scores[:] = _equal_scores(scores)
        return scores

    message = _fails("uniform_attention_accuracy", _accuracy_through_the_scores(in_place))
    assert "a hook that leaves the pattern as it was" in message and "hook_attn_scores" in message, message
