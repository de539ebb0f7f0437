"""Behaviour of the course helpers: task data, models and checkpoints, circuits, training."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformer_lens import TransformerBridge, TransformerBridgeConfig

from utils import runtime
from utils import circuits, models, tasks, train

IGNORE = tasks.IGNORE
NAMES = list(models.SPECS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _with_random_biases(name: str, seed: int = 0) -> TransformerBridge:
    """A freshly initialised model for `name` whose biases (frozen at zero by build_model) are non-zero."""
    g = torch.Generator().manual_seed(seed + 100)
    state = models.build_model(name, seed=seed).state_dict()
    for key in state:
        if key.endswith("bias") or key == "pos_embed.weight":
            state[key] = 0.1 * torch.randn(state[key].shape, generator=g)
    return models.model_from_state(dict(models.spec(name).config, seed=seed), state)


def _tokens(name: str, batch: int = 16) -> torch.Tensor:
    cfg = models.spec(name).config
    return torch.randint(0, cfg["d_vocab"], (batch, cfg["n_ctx"]))


# ====================================================================== tasks
class TestMaxOfList:
    def test_batch_shapes_and_targets(self):
        g = torch.Generator().manual_seed(0)
        for length in tasks.MAX_OF_LIST_LENGTHS:
            tokens, targets = tasks.max_of_list_batch(32, length, generator=g)
            assert tokens.shape == targets.shape == (32, length)
            assert tokens.dtype == targets.dtype == torch.long
            assert 0 <= tokens.min() and tokens.max() < tasks.MAX_OF_LIST_VOCAB
            assert (targets[:, 0] == IGNORE).all()
            for i in range(1, length):
                assert torch.equal(targets[:, i], tokens[:, : i + 1].max(-1).values)

    def test_batch_is_reproducible_from_a_generator(self):
        a = tasks.max_of_list_batch(8, generator=torch.Generator().manual_seed(5))
        b = tasks.max_of_list_batch(8, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    def test_targets_do_not_modify_tokens(self):
        tokens = torch.randint(0, 64, (4, 6))
        before = tokens.clone()
        tasks.max_of_list_targets(tokens)
        assert torch.equal(tokens, before)

    def test_all_lists(self):
        lists = tasks.all_lists(2)
        assert lists.shape == (64**2, 2)
        assert lists[0].tolist() == [0, 0] and lists[1].tolist() == [0, 1] and lists[-1].tolist() == [63, 63]
        assert torch.equal(lists[:, 0] * 64 + lists[:, 1], torch.arange(64**2))  # lexicographic, no repeats
        three = tasks.all_lists(3, vocab=5)
        assert three.shape == (125, 3) and three[-1].tolist() == [4, 4, 4]
        assert len({tuple(r) for r in three.tolist()}) == 125


class TestAddition:
    def test_pairs(self):
        tokens, targets = tasks.addition_pairs()
        assert tokens.shape == targets.shape == (8256, 2) == (128 * 129 // 2, 2)
        a, b = tokens[:, 0], tokens[:, 1]
        assert (a >= 0).all() and (b >= 0).all() and ((a + b) <= 127).all()
        assert len({tuple(r) for r in tokens.tolist()}) == 8256  # every pair once
        key = a * 128 + b
        assert (key[1:] > key[:-1]).all()  # ordered by a then b
        assert tokens[0].tolist() == [0, 0] and tokens[-1].tolist() == [127, 0]
        assert (targets[:, 0] == IGNORE).all()
        assert torch.equal(targets[:, 1], a + b)

    @pytest.mark.parametrize("max_sum", [0, 1, 5])
    def test_small_max_sum(self, max_sum):
        tokens, _ = tasks.addition_pairs(max_sum)
        expected = [[a, b] for a in range(max_sum + 1) for b in range(max_sum + 1) if a + b <= max_sum]
        assert tokens.tolist() == expected


class TestFibonacci:
    def test_sequence(self):
        assert tasks.fibonacci_sequence(1, 1, 7) == [1, 1, 2, 3, 5, 8, 13]
        assert tasks.fibonacci_sequence(3, 0, 2) == [3, 0]

    def test_sequences_cover_every_start_pair(self):
        tokens, targets = tasks.fibonacci_sequences()
        assert tokens.shape == targets.shape == (8256, tasks.FIBONACCI_LENGTH)
        assert (tokens >= 0).all() and (tokens <= 127).all()
        pairs = {tuple(r) for r in tokens[:, :2].tolist()}
        assert pairs == {(x0, x1) for x0 in range(128) for x1 in range(128) if x0 + x1 <= 127}
        # 14,400 targets: 8,256, 4,160, 1,408 and 576 at positions 1-4
        assert (targets != IGNORE).sum(0).tolist() == [0, 8256, 4160, 1408, 576]

    def test_every_target_is_the_next_element_of_the_true_sequence(self):
        tokens, targets = tasks.fibonacci_sequences()
        for row in torch.randperm(len(tokens))[:300].tolist():
            x0, x1 = tokens[row, :2].tolist()
            true = tasks.fibonacci_sequence(x0, x1, 6)
            for i in range(5):
                want = true[i + 1] if i >= 1 and true[i + 1] <= 127 else IGNORE
                assert targets[row, i].item() == want, (true, targets[row].tolist())
                if true[i] <= 127:
                    assert tokens[row, i].item() == true[i]

    def test_padding_is_not_a_valid_position(self):
        tokens, _ = tasks.fibonacci_sequences()
        valid = tasks.fibonacci_valid_positions(tokens)
        assert valid[:, :2].all() and valid.sum().item() == 8256 * 2 + 8256 + 4160 + 1408
        assert tokens[~valid].eq(tasks.FIBONACCI_PAD).all()
        # [100, 20, 120] ends there: 140 is no token
        assert tasks.fibonacci_targets(torch.tensor([[100, 20, 120, 0, 0]])).tolist() == [[IGNORE, 120, IGNORE, IGNORE, IGNORE]]

    def test_targets_of_short_sequences(self):
        assert tasks.fibonacci_targets(torch.tensor([[100, 20], [127, 1]])).tolist() == [[IGNORE, 120], [IGNORE, IGNORE]]
        assert tasks.fibonacci_targets(torch.tensor([[1, 2, 3]])).tolist() == [[IGNORE, 3, 5]]

    def test_targets_with_a_smaller_max_value(self):
        tokens = torch.tensor([[1, 2, 3, 5, 8], [10, 20, 30, 50, 80]])
        assert tasks.fibonacci_targets(tokens, max_value=30).tolist() == [
            [IGNORE, 3, 5, 8, 13], [IGNORE, 30, IGNORE, IGNORE, IGNORE]]

    def test_split_is_fixed_and_disjoint(self):
        train_rows, held_rows = tasks.split_indices(8256)
        again = tasks.split_indices(8256)
        assert torch.equal(train_rows, again[0]) and torch.equal(held_rows, again[1])
        assert len(train_rows) == 6605 and len(held_rows) == 1651
        assert sorted(train_rows.tolist() + held_rows.tolist()) == list(range(8256))


class TestBigram:
    def test_transition_matrix(self):
        T = tasks.bigram_transition_matrix()
        assert T.shape == (tasks.BIGRAM_VOCAB, tasks.BIGRAM_VOCAB)
        assert (T > 0).all()
        torch.testing.assert_close(T.sum(-1), torch.ones(tasks.BIGRAM_VOCAB))
        assert torch.equal(T, tasks.bigram_transition_matrix())  # fixed by its seed
        assert not torch.equal(T, tasks.bigram_transition_matrix(seed=1))

    def test_batch_targets_are_next_states(self):
        T = tasks.bigram_transition_matrix()
        tokens, targets = tasks.bigram_batch(T, 2000, generator=torch.Generator().manual_seed(0))
        assert tokens.shape == targets.shape == (2000, tasks.BIGRAM_SEQ)
        assert torch.equal(tokens[:, 1:], targets[:, :-1])
        assert 0 <= min(tokens.min(), targets.min()) and max(tokens.max(), targets.max()) < tasks.BIGRAM_VOCAB
        # the walk follows the chain: empirical transition frequencies match T
        counts = torch.zeros(tasks.BIGRAM_VOCAB, tasks.BIGRAM_VOCAB)
        counts.index_put_((tokens.flatten(), targets.flatten()), torch.ones(tokens.numel()), accumulate=True)
        empirical = counts / counts.sum(-1, keepdim=True)
        assert (empirical - T).abs().max() < 0.06

    def test_stationary_distribution(self):
        T = tasks.bigram_transition_matrix()
        pi = tasks.stationary_distribution(T)
        assert pi.shape == (tasks.BIGRAM_VOCAB,) and (pi > 0).all()
        torch.testing.assert_close(pi.sum(), torch.tensor(1.0))
        torch.testing.assert_close(pi @ T, pi, atol=1e-6, rtol=0)

    def test_sampled_bigram_table_and_kl_to_chain(self):
        T = tasks.bigram_transition_matrix()
        pi = tasks.stationary_distribution(T)
        table = tasks.sampled_bigram_table(T, 200_000, torch.Generator().manual_seed(0))
        assert table.shape == T.shape and torch.isfinite(table).all()
        torch.testing.assert_close(table.exp().sum(-1), torch.ones(len(T)))
        assert models.kl_to_chain(T.log(), T, pi).abs() < 1e-6  # the chain is at distance 0 from itself
        assert 0 < models.kl_to_chain(table, T, pi) < 0.01  # a large sample is close
        uniform = torch.full_like(T, 1 / len(T)).log()
        assert models.kl_to_chain(uniform, T, pi) > 100 * models.kl_to_chain(table, T, pi)

    def test_sampled_bigram_table_smoothing(self):
        T = tasks.bigram_transition_matrix()
        steps = 20_000  # small enough that some transitions go unseen
        plain = tasks.sampled_bigram_table(T, steps, torch.Generator().manual_seed(0), smoothing=0.0)
        smoothed = tasks.sampled_bigram_table(T, steps, torch.Generator().manual_seed(0))
        unseen = torch.isinf(plain)
        assert unseen.any() and torch.isfinite(smoothed).all()
        torch.testing.assert_close(plain.exp().sum(-1), torch.ones(len(T)))
        # the same sample: an unseen transition is the least likely of its row once smoothed
        row_min = smoothed.min(-1, keepdim=True).values.expand_as(smoothed)
        assert torch.equal(smoothed[unseen], row_min[unseen])
        # and the smoothed seen cells keep the plain frequencies' order
        for a in range(len(T)):
            seen = ~unseen[a]
            assert torch.equal(plain[a, seen].argsort(stable=True), smoothed[a, seen].argsort(stable=True))


def _induction_oracle_targets(tokens: torch.Tensor) -> torch.Tensor:
    """Next token wherever the current token occurred exactly once before and the one after it is in view, else IGNORE.

    Slow and obvious, for checking the vectorised data functions. Leaves the last position
    IGNORE (its next token is outside `tokens`).
    """
    targets = torch.full_like(tokens, IGNORE)
    for b, row in enumerate(tokens.tolist()):
        for i in range(len(row) - 1):
            earlier = [j for j in range(i) if row[j] == row[i]]
            if len(earlier) == 1 and row[earlier[0] + 1] == row[i + 1]:
                targets[b, i] = row[i + 1]
    return targets


class TestInduction:
    def test_batch_repeats_the_first_half(self):
        half = tasks.INDUCTION_HALF
        tokens, targets = tasks.induction_batch(64, generator=torch.Generator().manual_seed(0))
        assert tokens.shape == targets.shape == (64, 2 * half) == (64, tasks.INDUCTION_SEQ)
        assert tokens.dtype == targets.dtype == torch.long
        assert 0 <= tokens.min() and tokens.max() < tasks.INDUCTION_VOCAB
        assert torch.equal(tokens[:, half:], tokens[:, :half])
        assert all(len(set(row)) == half for row in tokens[:, :half].tolist())  # distinct: nothing ambiguous
        assert len({tuple(row) for row in tokens.tolist()}) == 64

    def test_batch_targets_exactly_where_induction_predicts(self):
        half = tasks.INDUCTION_HALF
        tokens, targets = tasks.induction_batch(64, generator=torch.Generator().manual_seed(1))
        assert torch.equal(targets[:, half:-1], tokens[:, half + 1:])
        assert (targets[:, :half] == IGNORE).all() and (targets[:, -1] == IGNORE).all()
        assert torch.equal(targets, _induction_oracle_targets(tokens))

    def test_batch_is_reproducible_from_a_generator(self):
        a = tasks.induction_batch(8, generator=torch.Generator().manual_seed(5))
        b = tasks.induction_batch(8, generator=torch.Generator().manual_seed(5))
        c = tasks.induction_batch(8, generator=torch.Generator().manual_seed(6))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])
        d = tasks.induction_training_batch(8, generator=torch.Generator().manual_seed(5))
        e = tasks.induction_training_batch(8, generator=torch.Generator().manual_seed(5))
        assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])

    def test_repeated_stretch_layout(self):
        starts, lengths = torch.tensor([0, 3, 21, 18]), torch.tensor([12, 4, 2, 5])
        tokens, targets = tasks.repeated_stretch_batch(starts, lengths, seq=24, generator=torch.Generator().manual_seed(0))
        assert torch.equal(tokens[1, 7:11], tokens[1, 3:7])
        assert targets[1].tolist() == [IGNORE] * 7 + tokens[1, 8:11].tolist() + [IGNORE] * 14
        # a copy cut off by the end of the context: the last position's target lies beyond it
        assert tokens[2, 23] == tokens[2, 21] and targets[2].tolist() == [IGNORE] * 23 + [tokens[2, 22].item()]
        assert torch.equal(tokens[3, 23:], tokens[3, 18:19])
        assert targets[3].tolist() == [IGNORE] * 23 + [tokens[3, 19].item()]
        # outside the copy every token is new
        for b, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            outside = tokens[b, : s + n].tolist() + tokens[b, s + 2 * n:].tolist()
            assert len(set(outside)) == len(outside)

    def test_training_batch_varies_the_stretch(self):
        tokens, targets = tasks.induction_training_batch(2000, generator=torch.Generator().manual_seed(0))
        assert tokens.shape == targets.shape == (2000, tasks.INDUCTION_SEQ)
        assert 0 <= tokens.min() and tokens.max() < tasks.INDUCTION_VOCAB
        keep = targets != IGNORE
        assert keep.any(-1).all()  # every row has something to predict
        # targets sit exactly where induction predicts (the last position is checked by hand above)
        oracle = _induction_oracle_targets(tokens[:200])
        assert torch.equal(targets[:200, :-1], oracle[:, :-1])
        # the earlier copy is at every distance 2..half and the targets reach every position half..seq-1,
        # so no fixed positional offset can stand in for induction
        first = keep.float().argmax(-1)  # first predicted position = start of the copy
        distances = {int((tokens[b, : first[b]] == tokens[b, first[b]]).nonzero()[0, 0].item() - first[b]) for b in range(200)}
        assert {-d for d in distances} == set(range(tasks.INDUCTION_MIN_STRETCH, tasks.INDUCTION_HALF + 1))
        assert keep[:, 2:].any(0).all()
        assert (targets[:, -1] != IGNORE).any()


# ====================================================================== models
@pytest.mark.parametrize("name", NAMES)
def test_build_model_freezes_biases_at_zero(name):
    model = models.build_model(name)
    biases = [(k, p) for k, p in model.named_parameters() if k.endswith("bias")]
    if models.spec(name).config["n_layers"] > 0:
        assert biases, "expected bias parameters to freeze"
    for key, p in biases:
        assert not p.requires_grad, key
        assert (p == 0).all(), key
    for key, value in model.state_dict().items():
        if key.endswith("bias"):
            assert (value == 0).all(), key
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(k.endswith("bias") for k in trainable)


def test_bigram_positional_embedding_frozen_at_zero():
    model = models.build_model("bigram")
    pos = dict(model.named_parameters())["pos._original_component.weight"]
    assert not pos.requires_grad and (pos == 0).all()
    assert (model.W_pos == 0).all() and (model.state_dict()["pos_embed.weight"] == 0).all()
    # so the logits are the same table W_E W_U at every position
    tokens = torch.randint(0, tasks.BIGRAM_VOCAB, (4, tasks.BIGRAM_SEQ))
    with torch.no_grad():
        logits = model(tokens)
    torch.testing.assert_close(logits, (model.W_E @ model.W_U)[tokens], atol=1e-5, rtol=0)


def test_other_models_train_their_positional_embedding():
    model = models.build_model("max_of_list")
    pos = dict(model.named_parameters())["pos._original_component.weight"]
    assert pos.requires_grad and pos.abs().sum() > 0


def test_build_model_is_seeded():
    a, b, c = (models.build_model("max_of_list", seed=s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


def test_evaluate_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown model"):
        models.evaluate(models.build_model("bigram"), "nonsense")


def test_bigram_kl_is_zero_for_the_true_table():
    T = tasks.bigram_transition_matrix()
    model = models.build_model("bigram")
    with torch.no_grad():  # W_E = log T, W_U = I: the model's table is exactly log T
        d = model.cfg.d_model
        model.W_E.zero_()
        model.W_E[:, : tasks.BIGRAM_VOCAB] = T.log()
        model.W_U.copy_(torch.eye(d, tasks.BIGRAM_VOCAB))
    assert abs(models.bigram_kl(model, T)) < 1e-5
    assert models.meets_target("bigram", models.evaluate(model, "bigram"))


class _InductionOracle(torch.nn.Module):
    """Logits that put 20 nats on the token after the earlier occurrence of the current token (0 when there is none)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[-1]
        earlier = (tokens[:, :, None] == tokens[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril(-1)
        after = (earlier.float().argmax(-1) + 1).clamp(max=seq - 1)  # [batch, seq]
        prediction = torch.where(earlier.any(-1), tokens.gather(1, after), torch.zeros_like(tokens))
        return 20.0 * torch.nn.functional.one_hot(prediction, tasks.INDUCTION_VOCAB).float()


def test_induction_report():
    perfect = models.evaluate(_InductionOracle(), "induction")
    assert perfect["accuracy"] == 1.0 and perfect["induction_loss"] < 1e-6
    assert perfect["chance_loss"] == pytest.approx(math.log(tasks.INDUCTION_VOCAB))
    assert models.meets_target("induction", perfect)
    untrained = models.evaluate(models.build_model("induction"), "induction")
    assert untrained["induction_loss"] == pytest.approx(untrained["chance_loss"], abs=0.2)
    assert untrained["accuracy"] < 0.1 and not models.meets_target("induction", untrained)
    # the report is over a fixed evaluation set
    assert models.evaluate(_InductionOracle(), "induction") == perfect


# ---------------------------------------------------------------------- checkpoints
@pytest.fixture
def saved(tmp_path):
    """A max_of_list checkpoint with non-zero weights in a temporary directory."""
    model = _with_random_biases("max_of_list", seed=7)
    config = dict(models.spec("max_of_list").config, seed=7)
    models.save_checkpoint(model, "max_of_list", config, {"seed": 7}, tmp_path)
    return model, tmp_path


def test_save_and_load_round_trip(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["max_of_list.json", "max_of_list.safetensors"]
    loaded = models.load_model("max_of_list", directory)
    assert not loaded.training
    tokens = _tokens("max_of_list", 64)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_json_config_restores_with_boot_native(saved):
    model, directory = saved
    meta = json.loads((directory / "max_of_list.json").read_text())
    assert set(meta) == {"config", "training"} and meta["training"] == {"seed": 7}
    restored = TransformerBridge.boot_native(TransformerBridgeConfig(**meta["config"]))
    restored.load_state_dict(load_file(str(directory / "max_of_list.safetensors")), strict=True)
    restored.eval()
    tokens = _tokens("max_of_list", 64)
    with torch.no_grad():
        assert torch.equal(restored(tokens), model(tokens))


def _break_json(directory, change):
    path = directory / "max_of_list.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


BREAKAGES = {
    "json_missing": ("json", lambda d: (d / "max_of_list.json").unlink()),
    "safetensors_missing": ("safetensors", lambda d: (d / "max_of_list.safetensors").unlink()),
    "safetensors_garbage": ("safetensors", lambda d: (d / "max_of_list.safetensors").write_bytes(b"\x00garbage" * 50)),
    "safetensors_empty": ("safetensors", lambda d: (d / "max_of_list.safetensors").write_bytes(b"")),
    "safetensors_truncated": ("safetensors", lambda d: (d / "max_of_list.safetensors").write_bytes(
        (d / "max_of_list.safetensors").read_bytes()[:5000])),
    "json_garbage": ("json", lambda d: (d / "max_of_list.json").write_text("{not json")),
    "json_without_config": ("json", lambda d: _break_json(d, lambda m: m.pop("config"))),
    "d_model_changed": ("safetensors", lambda d: _break_json(d, lambda m: m["config"].update(d_model=64, d_head=64))),
    "d_vocab_changed": ("safetensors", lambda d: _break_json(d, lambda m: m["config"].update(d_vocab=65))),
    "n_layers_changed": ("safetensors", lambda d: _break_json(d, lambda m: m["config"].update(n_layers=2))),
    "mlp_added": ("safetensors", lambda d: _break_json(d, lambda m: m["config"].update(attn_only=False, d_mlp=32))),
    "unknown_config_key": ("json", lambda d: _break_json(d, lambda m: m["config"].update(not_a_field=1))),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_load_model_reports_broken_checkpoints(saved, breakage):
    _, directory = saved
    named_file, breaker = BREAKAGES[breakage]
    breaker(directory)
    with pytest.raises(models.CheckpointError) as excinfo:
        models.load_model("max_of_list", directory)
    message = str(excinfo.value)
    assert str(directory / f"max_of_list.{named_file}") in message, message
    assert "python -m utils.train max_of_list" in message, message
    assert "\n" not in message, message


def test_load_model_reports_a_binary_json(saved):
    _, directory = saved
    (directory / "max_of_list.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(models.CheckpointError, match="python -m utils.train max_of_list"):
        models.load_model("max_of_list", directory)


def test_checkpoint_error_is_a_runtime_error():
    assert issubclass(models.CheckpointError, RuntimeError)
    assert models.rebuild_command("addition") == "python -m utils.train addition"


# ---------------------------------------------------------------------- basis changes
@pytest.mark.parametrize("name", NAMES)
def test_rotate_residual_stream_keeps_logits(name):
    model = _with_random_biases(name, seed=1)
    state = model.state_dict()
    d = model.cfg.d_model
    R = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].float()
    rotated_state = models.rotate_residual_stream(state, R)
    assert set(rotated_state) == set(state)
    assert not torch.allclose(rotated_state["embed.weight"], state["embed.weight"])
    rotated = models.model_from_state(dict(models.spec(name).config, seed=1), rotated_state)
    tokens = _tokens(name, 64)
    with torch.no_grad():
        torch.testing.assert_close(rotated(tokens), model(tokens), atol=1e-4, rtol=0)
    assert torch.equal(state["embed.weight"], model.state_dict()["embed.weight"])  # input untouched


def _addition_state_with_mlp_bias():
    return _with_random_biases("addition", seed=2).state_dict()


def test_rotate_neurons_changes_logits():
    state = _addition_state_with_mlp_bias()
    config = dict(models.spec("addition").config, seed=2)
    model = models.model_from_state(config, state)
    d_mlp = models.spec("addition").config["d_mlp"]
    R = torch.linalg.qr(torch.randn(d_mlp, d_mlp, dtype=torch.float64))[0].float()
    rotated = models.model_from_state(config, models.rotate_neurons(state, R))
    tokens, _ = tasks.addition_pairs()
    with torch.no_grad():
        assert (rotated(tokens) - model(tokens)).abs().max() > 1e-2


def test_rotate_neurons_by_a_permutation_keeps_logits():
    """ReLU commutes with permutations, so permuting the neurons (a special rotation) changes nothing."""
    state = _addition_state_with_mlp_bias()
    config = dict(models.spec("addition").config, seed=2)
    model = models.model_from_state(config, state)
    d_mlp = models.spec("addition").config["d_mlp"]
    P = torch.eye(d_mlp)[torch.randperm(d_mlp)]
    permuted = models.model_from_state(config, models.rotate_neurons(state, P))
    tokens, _ = tasks.addition_pairs()
    with torch.no_grad():
        torch.testing.assert_close(permuted(tokens), model(tokens), atol=1e-4, rtol=0)


# ====================================================================== circuits
@pytest.mark.parametrize("name", ["max_of_list", "addition", "fibonacci"])
def test_residual_from_components_matches_cache(name):
    model = _with_random_biases(name, seed=3)
    _, cache = model.run_with_cache(_tokens(name, 8))
    torch.testing.assert_close(circuits.residual_from_components(model, cache), cache["resid_post", -1],
                               atol=1e-5, rtol=1e-5)


def _two_layer_two_head_model():
    cfg = TransformerBridgeConfig(d_model=16, d_head=8, n_heads=2, n_layers=2, n_ctx=5, d_vocab=11,
                                  normalization_type=None, attn_only=True, seed=3)
    return TransformerBridge.boot_native(cfg).eval()


def test_residual_from_components_two_layers():
    model = _two_layer_two_head_model()
    _, cache = model.run_with_cache(torch.randint(0, 11, (4, 5)))
    torch.testing.assert_close(circuits.residual_from_components(model, cache), cache["resid_post", -1],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["max_of_list", "addition"])
def test_attention_pattern_matches_cache(name):
    model = _with_random_biases(name, seed=4)
    _, cache = model.run_with_cache(_tokens(name, 8))
    torch.testing.assert_close(circuits.attention_pattern(cache["q", 0], cache["k", 0]), cache["pattern", 0],
                               atol=1e-5, rtol=1e-5)


def test_attention_pattern_several_heads_and_layers():
    model = _two_layer_two_head_model()
    _, cache = model.run_with_cache(torch.randint(0, 11, (4, 5)))
    for layer in range(2):
        pattern = circuits.attention_pattern(cache["q", layer], cache["k", layer])
        assert pattern.shape == (4, 2, 5, 5)
        torch.testing.assert_close(pattern, cache["pattern", layer], atol=1e-5, rtol=1e-5)


def test_attention_pattern_is_causal_and_normalised():
    q, k = torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4)
    pattern = circuits.attention_pattern(q, k)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 3, 6))
    assert (pattern.triu(diagonal=1) == 0).all()
    assert (pattern[..., 0, 0] == 1).all()


# ====================================================================== training
def test_loss_fn_ignores_ignored_positions():
    logits = torch.randn(4, 6, 64)
    targets = torch.randint(0, 64, (4, 6))
    targets[:, 0] = IGNORE
    targets[1, 3] = IGNORE
    loss = train.loss_fn(logits, targets)
    changed = logits.clone()
    changed[:, 0] = 100 * torch.randn(4, 64)
    changed[1, 3] = 100 * torch.randn(64)
    assert torch.equal(train.loss_fn(changed, targets), loss)
    # it is the mean over the positions that have a target
    keep = targets != IGNORE
    manual = -logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, manual)
    # and changing a kept position does change it
    changed[0, 1] += 5 * torch.randn(64)
    assert not torch.equal(train.loss_fn(changed, targets), loss)


def test_lr_at_warms_up_then_decays():
    recipe = models.Recipe(steps=100, lr=1.0, batch_size=8, warmup=10)
    lrs = [train.lr_at(step, recipe) for step in range(recipe.steps)]
    warm, decay = lrs[:10], lrs[10:]
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert warm[0] == pytest.approx(0.1) and warm[-1] == pytest.approx(1.0)
    assert decay[0] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(decay, decay[1:])) and decay[-1] < 0.06
    assert min(lrs) >= 0.05 * recipe.lr - 1e-12
    assert train.lr_at(recipe.steps, recipe) == pytest.approx(0.05)
    no_warmup = models.Recipe(steps=10, lr=0.5, batch_size=8)
    assert train.lr_at(0, no_warmup) == pytest.approx(0.5)


def test_training_on_length_groups_gives_the_gradient_of_the_padded_batch():
    """Fibonacci trains on each length's rows cut after their last target: same loss, same gradient."""
    tokens, targets = tasks.fibonacci_sequences()
    rows = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))[:200]
    tokens, targets = tokens[rows], targets[rows]
    groups = train.length_groups(tokens, targets)
    assert len(groups) > 1 and sum(len(t) for t, _ in groups) == 200
    assert all((y[:, -1] != IGNORE).all() for _, y in groups)  # each group ends at a target
    grads, losses = [], []
    for step in (train.train_step, train.train_step_on_groups):
        model = models.build_model("fibonacci", seed=4)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        losses.append(step(model, optimizer, tokens, targets))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_lr_holds_at_its_floor_after_the_schedule():
    recipe = models.Recipe(steps=100, lr=1.0, batch_size=8, warmup=10)
    assert train.lr_at(recipe.steps + 250, recipe) == pytest.approx(0.05)


def test_train_stops_at_the_first_check_that_meets_the_target():
    recipe = models.Recipe(steps=600, lr=1e-2, batch_size=256, check_every=20)
    model = models.build_model("bigram", seed=3)
    losses = train.train(model, "bigram", recipe, seed=3, progress=False, stop_at_target=True)
    assert len(losses) < recipe.steps and len(losses) % recipe.check_every == 0
    assert models.meets_target("bigram", models.evaluate(model, "bigram"))
    # the same run without stopping, checked at the same steps: the first success is where it stopped
    again, successes = models.build_model("bigram", seed=3), []

    def check(step, loss):
        if (step + 1) % recipe.check_every == 0 and models.meets_target("bigram", models.evaluate(again, "bigram")):
            successes.append(step + 1)
    train.train(again, "bigram", recipe, seed=3, progress=False, on_step=check)
    assert successes[0] == len(losses)


def test_extra_steps_run_only_while_the_target_is_missed():
    recipe = models.Recipe(steps=20, lr=1e-2, batch_size=256, check_every=20, extra_steps=2000)
    model = models.build_model("bigram", seed=3)
    assert len(train.train(model, "bigram", recipe, seed=3, progress=False)) == 20  # without stop_at_target: steps
    model = models.build_model("bigram", seed=3)
    losses = train.train(model, "bigram", recipe, seed=3, progress=False, stop_at_target=True)
    assert 20 < len(losses) < 2020 and models.meets_target("bigram", models.evaluate(model, "bigram"))


def test_train_lowers_the_loss_and_keeps_biases_zero():
    model = models.build_model("max_of_list", seed=0)
    tokens, targets = tasks.max_of_list_batch(1024, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        before = train.loss_fn(model(tokens), targets).item()
    seen = []
    recipe = models.Recipe(steps=30, lr=1e-2, batch_size=128, warmup=3)
    losses = train.train(model, "max_of_list", recipe, seed=0, progress=False, on_step=lambda s, l: seen.append((s, l)))
    assert len(losses) == 30 and all(math.isfinite(l) for l in losses)
    assert [s for s, _ in seen] == list(range(30)) and [l for _, l in seen] == losses
    assert not model.training
    with torch.no_grad():
        after = train.loss_fn(model(tokens), targets).item()
    assert after < before - 0.3, (before, after)
    assert sum(losses[-5:]) / 5 < losses[0]
    for key, value in model.state_dict().items():
        if key.endswith("bias"):
            assert (value == 0).all(), key


def test_train_is_deterministic():
    recipe = models.Recipe(steps=4, lr=1e-2, batch_size=64)
    a, b = models.build_model("addition", seed=1), models.build_model("addition", seed=1)
    la = train.train(a, "addition", recipe, seed=5, progress=False)
    lb = train.train(b, "addition", recipe, seed=5, progress=False)
    assert la == lb
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name, batch_size", [("addition", 0), ("fibonacci", 0), ("addition", 16), ("bigram", 8),
                                              ("induction", 16), ("fibonacci", 16)])
def test_batches(name, batch_size):
    sample = models.spec(name).batches(batch_size, torch.Generator().manual_seed(0))
    tokens, targets = sample()
    if batch_size:
        assert len(tokens) == batch_size
    else:
        full = tasks.addition_pairs() if name == "addition" else tasks.fibonacci_sequences()
        assert torch.equal(tokens, full[0]) and torch.equal(targets, full[1])
    assert tokens.shape == targets.shape and tokens.shape[1] == models.spec(name).config["n_ctx"]


@pytest.mark.parametrize("name, data", [("addition_split", tasks.addition_pairs), ("fibonacci_split", tasks.fibonacci_sequences)])
def test_split_models_train_only_on_their_80_percent(name, data):
    trained_on, held_out = tasks.split(*data())
    seen = {tuple(row) for row in trained_on[0].tolist()}
    sample = models.spec(name).batches(4096, torch.Generator().manual_seed(0))
    drawn = {tuple(row) for _ in range(5) for row in sample()[0].tolist()}
    assert drawn <= seen and not drawn & {tuple(row) for row in held_out[0].tolist()}
    assert len(trained_on[0]) == round(0.8 * len(data()[0]))


def test_train_command_writes_a_checkpoint(tmp_path, monkeypatch, capsys):
    """`python -m utils.train bigram --out DIR --seed 3`, in process, with a tiny recipe (the real one takes minutes)."""
    tiny = models.Recipe(steps=5, lr=1e-2, batch_size=16)
    monkeypatch.setitem(models.SPECS, "bigram", dataclasses.replace(models.spec("bigram"), recipe=tiny))
    code = train.main(["bigram", "--out", str(tmp_path), "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 1 and "MISSES" in out and "bigram: {'kl':" in out  # 5 steps do not reach the target
    assert str(tmp_path / "bigram.safetensors") in out

    meta = json.loads((tmp_path / "bigram.json").read_text())
    assert meta["config"] == dict(models.spec("bigram").config, seed=3)
    training = meta["training"]
    assert training["seed"] == 3 and training["recipe"] == dataclasses.asdict(tiny)
    assert training["meets_target"] is False and training["report"]["kl"] > models.BIGRAM_KL_TARGET
    assert isinstance(training["seconds"], (int, float)) and training["seconds"] >= 0
    assert set(training["versions"]) >= {"python", "torch", "transformer_lens"}
    assert training["versions"]["torch"] == torch.__version__

    model = models.load_model("bigram", tmp_path)
    assert models.evaluate(model, "bigram")["kl"] == pytest.approx(training["report"]["kl"], rel=1e-5)
    assert (model.W_pos == 0).all() and (model.state_dict()["unembed.bias"] == 0).all()


def test_train_command_rejects_unknown_names():
    with pytest.raises(SystemExit):
        train.main(["nonsense"])


def test_versions_match_the_pinned_environment():
    """A checkpoint records the versions it was trained with: those of requirements.txt in this venv."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)\s*$", (models.ROOT / "requirements.txt").read_text(), re.M))
    versions = train.versions()
    assert set(versions) == {"python", "torch", "transformer_lens"}
    assert versions["transformer_lens"] == pins["transformer-lens"]
    assert versions["torch"].split("+")[0] == pins["torch"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))


def test_models_dir_follows_the_environment(tmp_path):
    """make test-seeds points utils.models at retrained checkpoints with CIRCUITS_MODELS_DIR."""
    import os

    assert models.models_dir({"CIRCUITS_MODELS_DIR": str(tmp_path)}) == tmp_path
    assert models.models_dir({"CIRCUITS_MODELS_DIR": ""}) == models.models_dir({}) == models.ROOT / "data" / "models"
    assert models.MODELS_DIR == models.models_dir(os.environ)  # read once, when the course is imported


def test_reuse_skips_only_a_current_checkpoint(tmp_path, monkeypatch, capsys):
    tiny = models.Recipe(steps=300, lr=1e-2, batch_size=256)
    monkeypatch.setitem(models.SPECS, "bigram", dataclasses.replace(models.spec("bigram"), recipe=tiny))
    assert not train.is_current("bigram", 5, tmp_path)
    assert train.main(["bigram", "--seed", "5", "--out", str(tmp_path), "--reuse"]) == 0
    assert train.is_current("bigram", 5, tmp_path)
    assert not train.is_current("bigram", 6, tmp_path)  # another seed
    capsys.readouterr()
    assert train.main(["bigram", "--seed", "5", "--out", str(tmp_path), "--reuse"]) == 0
    assert "is current" in capsys.readouterr().out
    changed = dataclasses.replace(tiny, steps=301)  # another recipe: retrain
    monkeypatch.setitem(models.SPECS, "bigram", dataclasses.replace(models.spec("bigram"), recipe=changed))
    assert not train.is_current("bigram", 5, tmp_path)


# --------------------------------------------------------------------- memory in a notebook kernel
def _fake_shell() -> SimpleNamespace:
    """Just enough of an IPython shell: its event callbacks."""
    from IPython.core.events import EventManager, available_events

    return SimpleNamespace(events=EventManager(None, available_events))


_HEAP_HOLES = """
import json, psutil, torch
from utils import runtime
rss = lambda: psutil.Process().memory_info().rss
torch.ones(2**18)  # freeing one 1 MB block makes glibc serve the next ones from its heap
kept, freed = [], []
for i in range(256):
    (kept if i % 2 else freed).append(torch.ones(2**18))  # 1 MB each, touched, alternately kept
del freed  # 128 MB of holes between live blocks: nothing at the heap's top to give back
before = rss()
released = runtime.release_freed_memory()
print(json.dumps({"released": released, "drop": before - rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap behaviour")
def test_release_freed_memory_gives_the_freed_heap_back():
    """glibc keeps freed MB-sized blocks in the heap (a chapter's kernel grew with every big
    computation); release_freed_memory hands them back. In a fresh interpreter: the test
    needs a heap in a known state."""
    import subprocess

    pytest.importorskip("psutil")
    out = subprocess.run([sys.executable, "-c", _HEAP_HOLES], capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if not found["released"]:
        pytest.skip("this C library has no malloc_trim")
    assert found["drop"] > 96 * 2**20


def test_memory_is_released_after_every_notebook_cell_once(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    shell = _fake_shell()
    runtime.release_memory_after_every_cell(shell)
    runtime.release_memory_after_every_cell(shell)  # importing utils again registers nothing more
    shell.events.trigger("post_run_cell", None)
    assert calls == [0]


class _LibcWithoutTrim:
    """A C library without malloc_trim (macOS, musl): looking the symbol up fails, as in ctypes."""

    def __getattr__(self, name):
        raise AttributeError(name)


def test_memory_release_does_nothing_without_malloc_trim(monkeypatch):
    import ctypes

    monkeypatch.setattr(ctypes, "CDLL", lambda *_: _LibcWithoutTrim())
    assert runtime._find_malloc_trim() is None
    monkeypatch.setattr(runtime, "_malloc_trim", None)
    assert runtime.release_freed_memory() is False
    shell = _fake_shell()
    runtime.release_memory_after_every_cell(shell)
    assert shell.events.callbacks["post_run_cell"] == []


def test_the_tools_and_the_package_start_without_torch():
    """Importing utils or a tool that runs no model (the chapter builder, the grader, Binder) loads no torch (the
    benchmark does: it times the models); the thread and memory settings come with the torch modules."""
    import subprocess

    code = ("import sys, utils, utils.tooling.notebooks, utils.tooling.grade, utils.tooling.binder; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
    code = "import torch; from utils import circuits; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in __import__("os").environ.items() if k != "CIRCUITS_TORCH_THREADS"})
    assert out.stdout.strip() == "1"
