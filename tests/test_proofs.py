"""Chapter 08's accuracy bounds: sound against brute force, and counted right.

A bound that exceeds the true accuracy proves nothing. Each strategy in utils.proofs is held
against the exact accuracy (every list run) at lengths 2 and 3, on the shipped model, on the
retrained seeds (if present) and on damaged copies (noise on every weight, where the bounds get
loose or vacuous); a certified cell must hold no wrong list at all; and the counting of the
certified lists must agree with enumerating them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from utils import models, proofs, tasks

SEEDS = Path("/work/main/.seeds")
STRATEGIES = {"worst case": proofs.worst_case_bound, "cells": proofs.cell_bound}


pytestmark = pytest.mark.usefixtures("reading_only")


@pytest.fixture(scope="module")
def shipped():
    return models.load_model("max_of_list")


def _damaged(model, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    state = {k: w + scale * (w.std() if w.numel() > 1 else 1.0) * torch.randn(w.shape, generator=g)
             for k, w in model.state_dict().items()}
    return models.model_from_state(dict(models.spec("max_of_list").config), state)


def _assert_sound(model, n: int) -> dict:
    truth = proofs.brute_force(model, n, from_circuits=True)
    wrong = truth["wrong"]
    maximum, last = wrong.max(-1).values, wrong[:, -1]
    others = wrong.masked_fill(wrong == maximum[:, None], -1).max(-1).values
    found = {}
    for name, strategy in STRATEGIES.items():
        result = strategy(model, n)
        assert result["accuracy"] <= truth["accuracy"] + 1e-12, (name, n, result["accuracy"], truth["accuracy"])
        covered = others <= result["largest_other"][last, maximum]
        assert not covered.any(), f"{name} certifies a wrong list: {wrong[covered][:3].tolist()}"
        found[name] = result["accuracy"]
    return {"truth": truth["accuracy"], **found}


def test_circuit_logits_equal_the_model(shipped):
    lists = torch.randint(0, 64, (500, 5), generator=torch.Generator().manual_seed(0))
    rebuilt = proofs.logits_from_circuits(proofs.circuit_pieces(shipped, 5), lists)
    assert torch.allclose(rebuilt, shipped(lists)[:, -1], atol=1e-4)


def test_brute_force_from_circuits_agrees_with_running_the_model(shipped):
    damaged = _damaged(shipped, 0.3, 1)
    run, rebuilt = proofs.brute_force(damaged, 2), proofs.brute_force(damaged, 2, from_circuits=True)
    assert run["accuracy"] == rebuilt["accuracy"] < 1.0
    assert torch.equal(run["wrong"], rebuilt["wrong"])


@pytest.mark.parametrize("n", [2, 3])
def test_bounds_are_sound_on_the_shipped_model(shipped, n):
    found = _assert_sound(shipped, n)
    assert found["worst case"] > 0.9 and found["cells"] > 0.99  # and not vacuous


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


def test_the_cell_bound_is_tighter_than_the_worst_case(shipped):
    for n in (4, 6):
        assert proofs.cell_bound(shipped, n)["accuracy"] >= proofs.worst_case_bound(shipped, n)["accuracy"]


def test_finishing_by_brute_force_gives_the_exact_accuracy(shipped):
    damaged = _damaged(shipped, 0.1, 3)
    exact = proofs.brute_force(damaged, 3, from_circuits=True)
    finished = proofs.finish_by_brute_force(damaged, 3, proofs.cell_bound(damaged, 3)["largest_other"])
    assert finished["accuracy"] == exact["accuracy"]
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
