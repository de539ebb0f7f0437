"""The checkers of chapter 09: bandwidth and superposition."""

from __future__ import annotations

import torch

from utils import circuits, superposition
from utils.checks.engine import Case, Mistake, exercise
from utils.checks.fixtures import fresh_model, noisy_model


def _spectrum_cases() -> list[Case]:
    # a flat spectrum, a steep one, one with a long tail, and the untrained OV circuit's
    steep = 2.0 ** -torch.arange(12.0)
    tail = torch.cat([torch.tensor([10.0, 6.0, 3.0]), torch.full((30,), 0.3)])
    untrained = torch.linalg.svdvals(circuits.full_ov(fresh_model("max_of_list")).AB.detach())
    return [("on 10 equal singular values, share 0.95", (torch.ones(10), 0.95)),
            ("on singular values halving at every step, share 0.9", (steep, 0.9)),
            ("on three large singular values and a tail of 30 small ones, share 0.99", (tail, 0.99)),
            ("on three large singular values and a tail, share 0.5", (tail, 0.5)),
            ("on an untrained max_of_list OV circuit, share 0.99", (untrained, 0.99))]


check_rank_for_share = exercise(
    "9.1", "how many directions a map uses", superposition.rank_for_share, function="rank_for_share",
    kind="implementation", cases=_spectrum_cases, atol=0,
    hint="a matrix's squared norm is the sum of its squared singular values; count the largest ones until their "
         "running total first reaches the share.",
    mistakes=(
        Mistake("singular values added up without squaring them",
                "the squared norm, the matrix's 'energy', is the sum of the squared singular values; the plain sum "
                "weighs the small directions too much.",
                lambda s, share: superposition.rank_for_share(s.sqrt(), share)),
        Mistake("one direction too few (the count stops just before the share is reached)",
                "the answer is the number of directions it takes to reach the share, so the direction that crosses "
                "it counts too.",
                lambda s, share: superposition.rank_for_share(s, share) - 1),
        Mistake("the share counted from the smallest singular values up",
                "the question is how few directions suffice, so take the largest first (torch returns them sorted "
                "largest first).",
                lambda s, share: superposition.rank_for_share(s.flip(0), share)),
    ))


def _replacement_cases() -> list[Case]:
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ())))
    model = noisy_model("max_of_list", 0.1)
    ov = circuits.full_ov(model).AB.detach()
    lists = torch.randint(0, 64, (3000, 6), generator=g)
    short = torch.randint(0, 64, (3000, 4), generator=g)
    return [("on the shipped model with noise, its OV circuit cut to rank 4", (model, lists, superposition.best_rank_r(ov, 4))),
            ("on the same model, a random OV circuit of the same size",
             (model, lists, torch.randn(64, 64, generator=g) * ov.std())),
            ("on the same model and lists of length 4, its OV circuit cut to rank 6",
             (model, short, superposition.best_rank_r(ov, 6)))]


check_accuracy_with_ov_replaced = exercise(
    "9.2", "a different OV circuit in the model's place", superposition.accuracy_with_ov, superposition.accuracy_with_rank_r_ov,
    function="accuracy_with_ov_replaced", cases=_replacement_cases, atol=2e-3,
    hint="the head adds each attended token's row of the OV circuit to the logits, weighted by its attention; swap "
         "those rows for the new map's, keep everything else the model computes, and score positions 1 on.",
    mistakes=(
        Mistake("position 0 scored too (its target is IGNORE, so it is always 'wrong')",
                "position 0 has no task, so the accuracy is over positions 1 to the end.",
                lambda model, lists, ov: superposition.accuracy_with_ov(model, lists, ov) * (lists.shape[1] - 1)
                / lists.shape[1]),
        Mistake("the new OV rows added on top of the old ones, not in their place",
                "the new map replaces the head's token-to-logit contribution: take the old rows away as you add the "
                "new ones.",
                lambda model, lists, ov: superposition.accuracy_with_ov(model, lists, ov + circuits.full_ov(model).AB)),
        Mistake("only the last position scored",
                "every position after the first asks for the running maximum of the list so far: score them all.",
                lambda model, lists, ov: superposition.accuracy_with_ov(model, lists, ov, scored=slice(-1, None))),
    ))


def _toy_cases() -> list[Case]:
    cases = []
    for where, m, n in (("2 hidden dimensions, 5 features", 2, 5), ("5 hidden dimensions, 20 features", 5, 20),
                        ("3 hidden dimensions, 4 features", 3, 4)):
        x = torch.rand(64, n) * (torch.rand(64, n) < 0.4)
        cases.append((f"on {where}", (torch.randn(m, n), torch.randn(n) * 0.3 - 0.2, x)))
    return cases


check_toy_model_output = exercise(
    "9.3", "the toy model of superposition", superposition.toy_model_output, function="toy_model_output",
    kind="implementation", cases=_toy_cases, atol=1e-5,
    hint="each row of x is squeezed into m numbers by W, read back out by W's transpose, shifted by b and rectified.",
    mistakes=(
        Mistake("the ReLU left out",
                "the model rectifies its output: negative values (interference between features) are cut to 0, "
                "which is what lets it pack more features than dimensions.",
                lambda W, b, x: x @ W.T @ W + b),
        Mistake("the bias left out",
                "b is added before the ReLU; a negative bias is how the model silences small interference.",
                lambda W, b, x: superposition.toy_model_output(W, torch.zeros_like(b), x)),
        Mistake("the bias added after the ReLU",
                "b shifts the value the ReLU sees, so it goes inside it.",
                lambda W, b, x: superposition.toy_model_output(W, torch.zeros_like(b), x) + b),
    ))


def _dimensionality_cases() -> list[Case]:
    pentagon = torch.stack([torch.cos(torch.arange(5) * 2 * torch.pi / 5), torch.sin(torch.arange(5) * 2 * torch.pi / 5)])
    return [("on two orthogonal features and one left out", (torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]),)),
            ("on an antipodal pair and a feature of its own", (torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]),)),
            ("on five features in a pentagon, two dimensions", (pentagon,)),
            ("on a random 5 x 20 map", (torch.randn(5, 20),))]


check_feature_dimensionality = exercise(
    "9.4", "how much of a dimension each feature gets", superposition.feature_dimensionality,
    function="feature_dimensionality", cases=_dimensionality_cases, atol=1e-4, rtol=1e-3,
    hint="a feature's dimensionality is its own squared length over how much of it all the features together "
         "(itself included) put along its direction, each of them squared.",
    mistakes=(
        Mistake("overlaps with the other features' full vectors, not along the feature's unit direction",
                "project every feature onto the unit vector of feature i; with unnormalised dot products the answer "
                "scales with the feature's length.",
                lambda W: superposition.feature_dimensionality(W) / W.norm(dim=0).pow(2).clamp_min(1e-8)),
        Mistake("the feature itself left out of the sum",
                "the denominator counts feature i too, so that a feature with a dimension of its own gets 1.",
                lambda W: (lambda d: d / (1 - d).clamp_min(1e-8))(superposition.feature_dimensionality(W))),
        Mistake("the overlaps not squared",
                "features on opposite sides of a direction share it as much as features on the same side: square "
                "each projection.",
                lambda W: W.norm(dim=0).pow(2) / ((W / W.norm(dim=0).clamp_min(1e-8)).T @ W).abs().sum(1)),
    ))


def _activation_cases() -> list[Case]:
    heavy = torch.randn(4000, 8) * torch.rand(4000, 8).pow(3)  # heavy-tailed along the basis
    relu = torch.relu(torch.randn(4000, 12) - 1.0)
    relu[:, 3] = 0.0  # a direction that never varies
    return [("on Gaussian activations", (torch.randn(4000, 6),)), ("on heavy-tailed activations", (heavy,)),
            ("on rectified activations with one dead direction", (relu,)),
            ("on activations with an offset", (torch.randn(4000, 5) * 2 + 3,))]


check_basis_alignment = exercise(
    "9.5", "is the basis special?", superposition.basis_alignment, function="basis_alignment",
    cases=_activation_cases, atol=1e-3, rtol=1e-3,
    hint="for each direction (column), the fourth moment of the centred activations over their squared variance, "
         "minus the Gaussian's 3; then the median over the directions that vary.",
    mistakes=(
        Mistake("the kurtosis without subtracting 3",
                "excess kurtosis is 0 for a Gaussian: subtract the Gaussian's 3 so that 'heavier-tailed than "
                "Gaussian' reads as positive.",
                lambda acts: superposition.basis_alignment(acts) + 3),
        Mistake("the mean over directions, not the median",
                "a few dead or nearly dead directions have enormous kurtosis (or none at all) and would decide a "
                "mean; the median is what most directions look like.",
                lambda acts: superposition.excess_kurtosis(acts).nanmean().item()),
        Mistake("kurtosis over the directions of each sample (rows), not over the samples of each direction",
                "the question is about each basis direction: take the statistics down a column, over samples.",
                lambda acts: superposition.basis_alignment(acts.T)),
        Mistake("the activations not centred",
                "kurtosis is about spread around the mean: subtract each direction's mean first.",
                lambda acts: (acts.pow(4).mean(0) / acts.pow(2).mean(0).pow(2) - 3).nanmedian().item()),
    ))
