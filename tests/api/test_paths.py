"""Chapter 07's tools: the MLP split over its input's paths, paths by length, the key-path patch and
direct logit attribution, each checked against what the model itself computes."""

from __future__ import annotations

import pytest
import torch

from utils import circuits, models, residual_paths, tasks


@pytest.fixture(scope="module")
def induction():
    return models.load_model("induction")


@pytest.fixture(scope="module")
def batch():
    return tasks.induction_batch(128, generator=torch.Generator().manual_seed(3))


def test_split_with_one_piece_or_a_zero_piece_is_the_model():
    model = models.load_model("addition")
    pairs, sums = tasks.addition_pairs()
    pairs = pairs[::16]
    with torch.no_grad():
        logits, cache = model.run_with_cache(pairs)
        x, attn = cache["embed"] + cache["pos_embed"], cache["attn_out", 0]
        whole = residual_paths.split_mlp_logits(model, [x + attn])
        with_zero = residual_paths.split_mlp_logits(model, [x + attn, torch.zeros_like(x)])  # MLP(0) = 0: biases are zero
        split = residual_paths.split_mlp_logits(model, [x, attn])
    assert (whole - logits).abs().max() < 1e-3
    assert (with_zero - logits).abs().max() < 1e-3
    assert (split - logits).abs().max() > 1.0  # the ReLU makes the split wrong


def test_paths_by_length_add_up_to_the_logits_and_length_one_carries_induction(induction, batch):
    tokens, targets = batch
    with torch.no_grad():
        logits, cache = induction.run_with_cache(tokens)
        by_length = residual_paths.path_logits_by_length(induction, cache)
    assert set(by_length) == {0, 1, 2}
    assert (sum(by_length.values()) - logits).abs().max() < 1e-3
    assert residual_paths.repeat_loss_and_accuracy(by_length[0] + by_length[2], targets)[0] > 1.0
    assert residual_paths.repeat_loss_and_accuracy(by_length[0] + by_length[1], targets)[1] > 0.99


def test_patching_with_the_clean_tokens_changes_nothing(induction, batch):
    tokens, _ = batch
    with torch.no_grad():
        for reader in "qkv":
            patched = residual_paths.patch_key_path(induction, tokens, tokens, [0, 1], [0, 1], reader=reader)
            assert (patched - induction(tokens)).abs().max() < 1e-4


def test_the_key_path_carries_induction_and_the_query_path_does_not(induction, batch):
    tokens, targets = batch
    corrupted, _ = tasks.induction_batch(128, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        keys = residual_paths.repeat_loss_and_accuracy(residual_paths.patch_key_path(induction, tokens, corrupted, [0, 1], [0, 1]),
                                                 targets)
        queries = residual_paths.repeat_loss_and_accuracy(
            residual_paths.patch_key_path(induction, tokens, corrupted, [0, 1], [0, 1], reader="q"), targets)
    assert keys[0] > 2.0 and keys[1] < 0.5
    assert queries[0] < 0.05 and queries[1] > 0.99


def test_a_patch_touches_only_its_target_heads(induction, batch):
    tokens, _ = batch
    change = torch.randn(tokens.shape[0], tokens.shape[1], induction.cfg.d_model)
    with torch.no_grad():
        _, clean = induction.run_with_cache(tokens, names_filter="blocks.1.attn.hook_k")
        saved = {}
        hook = residual_paths.path_patch_hook(induction, change, [1], "k")
        induction.run_with_hooks(tokens, fwd_hooks=[hook, ("blocks.1.attn.hook_k", lambda k, hook: saved.update(k=k))])
    assert torch.allclose(saved["k"][:, :, 0], clean["k", 1][:, :, 0], atol=1e-5)
    assert torch.allclose(saved["k"][:, :, 1], clean["k", 1][:, :, 1] + change @ induction.W_K[1, 1], atol=1e-4)


def test_attributions_add_up_to_the_centred_correct_logit(induction, batch):
    tokens, targets = batch
    with torch.no_grad():
        attribution = residual_paths.correct_logit_attribution(induction, tokens, targets)
        logits = induction(tokens)
    keep = targets != tasks.IGNORE
    centred = logits[keep] - logits[keep].mean(-1, keepdim=True)
    assert list(attribution) == ["embed", "pos_embed", "L0H0", "L0H1", "L1H0", "L1H1"]
    assert abs(sum(attribution.values()) - centred.gather(-1, targets[keep][:, None]).mean().item()) < 1e-3


def test_residual_components_add_up_to_the_final_stream(induction, batch):
    tokens, _ = batch
    with torch.no_grad():
        _, cache = induction.run_with_cache(tokens)
    parts = residual_paths.residual_components(induction, cache)
    assert (sum(parts.values()) - cache["resid_post", 1]).abs().max() < 1e-4


def test_repeat_loss_and_accuracy_counts_only_the_targets():
    targets = torch.tensor([[tasks.IGNORE, 2, 1]])
    logits = torch.full((1, 3, 4), -20.0)
    logits[0, 1, 2] = logits[0, 2, 1] = 20.0
    logits[0, 0, 3] = 20.0  # wrong, but at a position without a target
    loss, accuracy = residual_paths.repeat_loss_and_accuracy(logits, targets)
    assert loss < 1e-6 and accuracy == 1.0
    logits[0, 2] = logits[0, 2].flip(0)
    assert residual_paths.repeat_loss_and_accuracy(logits, targets)[1] == 0.5
