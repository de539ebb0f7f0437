"""Chapter 01's training pieces: equal-sum weights, weighted batches, and train() with a given step and batches."""

import pytest
import torch

from utils import models, tasks, train


def test_equal_sum_weights_give_every_sum_present_the_same_total_on_any_subset():
    pairs, targets = tasks.addition_pairs()
    for subset in (pairs, tasks.split(pairs, targets)[0][0], pairs[torch.randperm(len(pairs))[:500]]):
        weights = tasks.equal_sum_weights(subset)
        sums = subset.sum(-1)
        per_sum = torch.zeros(tasks.ADDITION_MAX + 1, dtype=torch.float64).index_add_(0, sums, weights)
        present = per_sum[sums.unique()]
        assert weights.sum() == pytest.approx(1.0)
        assert torch.allclose(present, torch.full_like(present, 1 / len(present)))


def test_weighted_batches_draw_rows_in_proportion_to_their_weights():
    tokens = torch.arange(4).unsqueeze(1)
    weights = torch.tensor([0.0, 1.0, 1.0, 2.0])
    drawn = models.weighted_batches(tokens, tokens, weights)(40_000, torch.Generator().manual_seed(0))()[0].squeeze(1)
    shares = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert shares[0] == 0 and torch.allclose(shares[1:], torch.tensor([0.25, 0.25, 0.5]), atol=0.01)


@pytest.mark.parametrize("weights", [torch.tensor([1.0, -1.0]), torch.zeros(2), torch.ones(3)])
def test_weighted_batches_refuse_weights_that_are_not_a_distribution_over_the_rows(weights):
    with pytest.raises(ValueError, match="non-negative"):
        models.weighted_batches(torch.zeros(2, 2), torch.zeros(2, 2), weights)


def test_train_uses_the_step_and_the_batches_it_is_given():
    pairs, targets = tasks.addition_pairs()
    seen = []

    def counting_step(model, optimizer, tokens, batch_targets):
        seen.append(tokens.sum(-1))
        return train.train_step(model, optimizer, tokens, batch_targets)

    only_sum_7 = (pairs.sum(-1) == 7).double()
    recipe = models.Recipe(steps=3, lr=1e-3, batch_size=16, weight_decay=0.0, warmup=1)
    losses = train.train(models.build_model("addition", seed=0), "addition", recipe, progress=False, step=counting_step,
                         batches=models.weighted_batches(pairs, targets, only_sum_7))
    assert len(losses) == len(seen) == 3
    assert all((sums == 7).all() for sums in seen)
