"""Chapters 06 and 08: a hook exercise answered through hook_attn_scores is told the TransformerLens 4 trap (issue 25),
not only that the pattern was not replaced."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.utilities import get_act_name

from utils import checks, circuits
from utils.checks import CheckFailed, engine


def _message(check, fn) -> str:
    torch.manual_seed(0)
    with pytest.raises(CheckFailed) as failure:
        check(fn)
    message = str(failure.value)
    assert "\n" not in message, message
    return message


def accuracy_with_keys_dropped(model, tokens, targets, offsets, layer=0, batch_size=2048):
    """Drops the keys by masking their scores (what works on TransformerLens 2), which TransformerLens 4 ignores."""
    n = tokens.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    dropped = torch.zeros(n, n, dtype=torch.bool)
    for d in offsets:
        dropped |= (q - k) == d

    def mask_scores(scores, hook):
        return scores.masked_fill(dropped, float("-inf"))

    return circuits.accuracy_and_loss_by_position(model, tokens, targets, [(get_act_name("attn_scores", layer),
                                                                            mask_scores)], batch_size)


def logits_attention_on_max(model, lists):
    """Scores that leave only the copies of the maximum: right on TransformerLens 2, dropped by TransformerLens 4."""
    not_max = lists != lists.max(-1, keepdim=True).values

    def only_the_maximum(scores, hook):
        scores = scores.clone()
        scores[:, :, -1] = scores[:, :, -1].masked_fill(not_max[:, None], float("-inf"))
        return scores

    return model.run_with_hooks(lists, fwd_hooks=[(get_act_name("attn_scores", 0), only_the_maximum)])[:, -1]


@pytest.mark.parametrize("check, fn", [(checks.check_accuracy_with_keys_dropped, accuracy_with_keys_dropped),
                                       (checks.check_logits_attention_on_max, logits_attention_on_max)],
                         ids=["6.2", "8.1"])
def test_a_hook_on_the_scores_is_told_the_trap(check, fn):
    message = _message(check, fn)
    assert engine.SCORES_TRAP in message, message
