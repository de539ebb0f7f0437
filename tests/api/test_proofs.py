"""Chapter 08's accuracy bounds: sound for the float32 model as it runs, and counted right.

A bound that exceeds the true accuracy proves nothing. Each strategy in utils.proofs is held
against the float32 model's exact accuracy (every list run) at lengths 2 and 3, on the shipped
model, on the retrained seeds (if present), on damaged copies (noise on every weight), on near-tie
copies (two logits that tie in float32 although exact arithmetic ranks them: an allowance-free check
certifies wrong lists there), on sharp-attention copies and on copies with non-zero biases. A
certified cell must hold no list the float32 model gets wrong; the cell bound must never fall below
the worst-case bound; and the counting of the certified lists must agree with enumerating them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from utils import models, proofs, tasks

SEEDS = Path("/work/main/.seeds")
STRATEGIES = {"worst case": proofs.worst_case_bound, "cells": proofs.cell_bound}
CONFIG = dict(models.spec("max_of_list").config)


pytestmark = pytest.mark.usefixtures("reading_only")


@pytest.fixture(scope="module")
def shipped():
    return models.load_model("max_of_list")


def _edited(model, **edits):
    """A copy of `model` with edits[key](weight) in place of each named weight (dots in keys written as __)."""
    state = {key: w.clone() for key, w in model.state_dict().items()}
    for key, edit in edits.items():
        state[key.replace("__", ".")] = edit(state[key.replace("__", ".")])
    return models.model_from_state(CONFIG, state)


def _damaged(model, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    state = {k: w + scale * (w.std() if w.numel() > 1 else 1.0) * torch.randn(w.shape, generator=g)
             for k, w in model.state_dict().items()}
    return models.model_from_state(CONFIG, state)


# ------------------------------------------------------------------ near ties: logits c and m equal in float32
def _tie_by_bias(model, m: int, c: int):
    """Row c of the unembedding a copy of row m, and b_U[c] below b_U[m] by less than half a float32 step of a
    logit: exact arithmetic ranks m first on every list, float32 rounds the two logits to a tie (argmax: c < m)."""
    def unembed(w):
        w[c] = w[m]
        return w
    return _edited(model, unembed__weight=unembed, unembed__bias=lambda b: b.index_fill(0, torch.tensor([c]), float(b[m]) - 1e-7))


def _tie_by_one_step(model, m: int, c: int):
    """Row c of the unembedding a copy of row m with its largest entry one float32 step nearer to zero."""
    def unembed(w):
        i = int(w[m].abs().argmax())
        w[c] = w[m]
        w[c, i] = torch.nextafter(w[m, i], torch.zeros(()))
        return w
    return _edited(model, unembed__weight=unembed)


NEAR_TIES = {"bias 40/39": (_tie_by_bias, 40, 39), "bias 63/0": (_tie_by_bias, 63, 0),
             "one step 40/39": (_tie_by_one_step, 40, 39), "one step 20/5": (_tie_by_one_step, 20, 5),
             "one step 63/62": (_tie_by_one_step, 63, 62)}


def _covered(result: dict, lists: torch.Tensor) -> torch.Tensor:
    """Which of `lists` [count, n] the certified cells of `result` hold, [count] bool."""
    maximum, last = lists.max(-1).values, lists[:, -1]
    others = lists.masked_fill(lists == maximum[:, None], -1).max(-1).values
    return others <= result["largest_other"][last, maximum]


def _assert_sound(model, n: int) -> dict:
    """Both bounds at length n against the float32 model run on every list; returns the accuracies."""
    truth = proofs.brute_force(model, n)
    found = {}
    for name, strategy in STRATEGIES.items():
        result = strategy(model, n)
        assert result["accuracy"] <= truth["accuracy"], (name, n, result["accuracy"], truth["accuracy"])
        covered = _covered(result, truth["wrong"])
        assert not covered.any(), f"{name} certifies a list the float32 model gets wrong: {truth['wrong'][covered][:3].tolist()}"
        found[name] = result
    assert (found["cells"]["largest_other"] >= found["worst case"]["largest_other"]).all(), "a cell the worst case certifies is lost"
    return {"truth": truth["accuracy"], **{name: r["accuracy"] for name, r in found.items()}}


def test_circuit_logits_are_the_model_within_the_allowance(shipped):
    biased = _edited(shipped, **{f"blocks__0__attn__{x}__bias": (lambda b: b + 0.5 * torch.randn(b.shape, generator=torch.Generator().manual_seed(1)))
                                 for x in "qkvo"}, unembed__bias=lambda b: b.index_fill(0, torch.tensor([0]), 5.0))
    sharp = _edited(shipped, blocks__0__attn__q__weight=lambda w: 20 * w)
    g = torch.Generator().manual_seed(0)
    for model in (shipped, biased, sharp):
        for lists in (tasks.all_lists(2, 64), torch.randint(0, 64, (5000, 6), generator=g)):
            run = model(lists)[:, -1].double()
            rebuilt = proofs.logits_from_circuits(proofs.circuit_pieces(model, lists.shape[1]), lists)
            gap = (run - rebuilt).abs()
            assert (gap <= proofs.logit_error_bound(model, lists)).all()
            assert gap.max() < 1e-3  # every bias is in the pieces (b_U[0] = 5 alone would be off by 5)


def test_the_allowance_grows_with_the_sizes_of_the_terms(shipped):
    small, big = proofs.rounding_allowance(shipped, 4), proofs.rounding_allowance(_edited(shipped, unembed__weight=lambda w: 4 * w), 4)
    assert torch.allclose(big["logit"], 4 * small["logit"], rtol=1e-6) and torch.equal(big["score"], small["score"])
    sharp = proofs.rounding_allowance(_edited(shipped, blocks__0__attn__q__weight=lambda w: 2 * w), 4)
    assert (sharp["score"] > 1.9 * small["score"]).all()
    assert 0 < small["logit"].max() < 0.01 and 0 < small["score"].max() < 0.01


def test_a_model_outside_the_architecture_is_refused(shipped):
    two_layers = models.model_from_state(dict(CONFIG, n_layers=2), {
        **shipped.state_dict(), **{k.replace("blocks.0.", "blocks.1."): w for k, w in shipped.state_dict().items() if "blocks.0." in k}})
    with pytest.raises(ValueError, match="one-layer"):
        proofs.cell_bound(two_layers, 2)


def test_the_least_attention_is_the_least_over_the_cell(shipped):
    """Exercise 8.3's table against every list of a few cells at length 4: equal to the least share (no phantom rival)."""
    n = 4
    scores = proofs.circuit_pieces(shipped, n)[0]
    for t, m, lo in [(5, 30, 29), (20, 20, 19), (3, 60, 12), (0, 63, 0), (41, 41, -1)]:
        values = torch.cat([torch.arange(lo + 1), torch.tensor([m])])
        heads = values[tasks.all_lists(n - 1, len(values))]
        cell = torch.cat([heads, torch.full((len(heads), 1), t)], 1)
        cell = cell[cell.max(-1).values == m]
        share = scores[t, torch.arange(n), cell].softmax(-1).masked_fill(cell != m, 0).sum(-1)
        least = proofs.least_attention_on_max(shipped, n, lo)[t, m]
        assert torch.isclose(least, share.min(), rtol=1e-9), (t, m, lo, least.item(), share.min().item())


@pytest.mark.parametrize("n", [2, 3])
def test_bounds_are_sound_on_the_shipped_model(shipped, n):
    found = _assert_sound(shipped, n)
    assert found["worst case"] > 0.95 and found["cells"] == found["truth"] == 1.0  # and not vacuous


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bounds_are_sound_on_retrained_seeds(seed):
    path = SEEDS / str(seed)
    if not (path / "max_of_list.safetensors").exists():
        pytest.skip(f"no retrained checkpoint in {path}")
    model = models.load_model("max_of_list", models_dir=path)
    for n in (2, 3):
        _assert_sound(model, n)


@pytest.mark.parametrize("scale,seed", [(0.1, 0), (0.3, 1), (1.0, 2)])
def test_bounds_are_sound_on_damaged_models(shipped, scale, seed):
    model = _damaged(shipped, scale, seed)
    for n in (2, 3):
        found = _assert_sound(model, n)
        if scale == 1.0:
            assert found["truth"] < 0.9 and found["worst case"] < 0.5  # loose: far below a broken model's accuracy


@pytest.mark.parametrize("name", list(NEAR_TIES))
def test_bounds_are_sound_on_near_ties(shipped, name):
    build, m, c = NEAR_TIES[name]
    model = build(shipped, m, c)
    wrong = proofs.brute_force(model, 2)["wrong"]
    unsound = proofs.cell_bound(model, 2, rounding=False)
    assert _covered(unsound, wrong).any(), "the near tie should fool a check without a rounding allowance"
    for n in (2, 3):
        _assert_sound(model, n)


@pytest.mark.parametrize("edits", [{"blocks__0__attn__q__weight": lambda w: 20 * w},
                                   {"blocks__0__attn__q__weight": lambda w: 8 * w, "blocks__0__attn__k__weight": lambda w: 8 * w}],
                         ids=["W_Q x20", "W_Q and W_K x8"])
def test_bounds_are_sound_on_sharp_attention(shipped, edits):
    model = _edited(shipped, **edits)
    for n in (2, 3):
        found = _assert_sound(model, n)
        assert found["cells"] > 0.99  # no underflow: the scores span thousands here
    assert proofs.cell_bound(model, 5)["accuracy"] >= proofs.worst_case_bound(model, 5)["accuracy"]


@pytest.mark.parametrize("edits", [
    {"unembed__bias": lambda b: b.index_fill(0, torch.tensor([0]), 5.0)},
    {f"blocks__0__attn__{x}__bias": (lambda b, s=s: b + s * torch.randn(b.shape, generator=torch.Generator().manual_seed(2)))
     for x, s in zip("qkvo", (1.0, 1.0, 0.5, 0.5))}], ids=["b_U[0] = 5", "b_Q, b_K, b_V, b_O"])
def test_bounds_are_sound_on_models_with_biases(shipped, edits):
    model = _edited(shipped, **edits)
    for n in (2, 3):
        found = _assert_sound(model, n)
    assert found["truth"] < 1.0  # the biases cost lists, and the bounds see it


def test_one_shift_and_a_shift_per_cell_certify_the_same_cells(shipped, monkeypatch):
    one = proofs.cell_bound(shipped, 5)
    monkeypatch.setattr(proofs, "ONE_SHIFT_SPREAD", 0.0)  # every row through the logarithms
    assert torch.equal(proofs.cell_bound(shipped, 5)["largest_other"], one["largest_other"])


def test_the_cell_bound_is_tighter_than_the_worst_case(shipped):
    for n in (4, 6):
        assert proofs.cell_bound(shipped, n)["accuracy"] >= proofs.worst_case_bound(shipped, n)["accuracy"]


def test_finishing_by_brute_force_gives_the_exact_accuracy(shipped):
    damaged = _damaged(shipped, 0.1, 3)
    exact = proofs.brute_force(damaged, 3)
    finished = proofs.finish_by_brute_force(damaged, 3, proofs.cell_bound(damaged, 3)["largest_other"])
    assert finished["accuracy"] == exact["accuracy"] < 1.0
    assert sorted(map(tuple, finished["wrong"].tolist())) == sorted(map(tuple, exact["wrong"].tolist()))
    assert finished["runs"] < exact["runs"] / 10


@pytest.mark.parametrize("n", [2, 3, 4])
def test_certified_counts_equal_the_enumerated_lists(n):
    vocab = 6
    g = torch.Generator().manual_seed(n)
    largest = torch.randint(-2, vocab, (vocab, vocab), generator=g)
    m, t = torch.arange(vocab)[None], torch.arange(vocab)[:, None]
    largest = torch.where(largest < m, largest, m - 1)  # lo below the maximum
    largest = torch.where((t != m) & (largest < t), torch.full_like(largest, -2), largest)  # t <= lo or no cell
    assert proofs.certified_count(largest, n) == len(proofs.enumerated_certified(largest, n))
    everything = torch.where(m >= t, m - 1, torch.full_like(largest, -2))
    assert proofs.certified_count(everything, n) == vocab**n  # all cells certified: every list, once


def test_cell_count_by_enumeration():
    lists = tasks.all_lists(3, 5)
    for t, m, lo in [(4, 4, 2), (1, 4, 2), (0, 3, -1), (3, 3, -1), (2, 2, 1)]:
        maximum = lists.max(-1).values
        others = lists.masked_fill(lists == maximum[:, None], -1).max(-1).values
        expected = int(((lists[:, -1] == t) & (maximum == m) & (others <= lo)).sum())
        assert proofs.cell_count(5, 3, t, m, lo) == expected, (t, m, lo)


def test_list_fraction_by_gap_sums_to_one_and_matches_enumeration():
    lists = tasks.all_lists(3, 6)
    top = lists.topk(2, -1).values
    gaps = torch.bincount(top[:, 0] - top[:, 1], minlength=6).float() / len(lists)
    assert torch.allclose(proofs.list_fraction_by_gap(6, 3), gaps)
