"""The checkers of chapter 01: training."""

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

def _max_of_list_token_cases() -> list[Case]:
    """Random lists of lengths 2, 4 and 6, 16 of each."""
    return [(f"on lists of length {n}", (torch.randint(0, tasks.MAX_OF_LIST_VOCAB, (16, n)),)) for n in (2, 4, 6)]


def _whole_list_max(tokens: Tensor) -> Tensor:
    """The reference on lists whose first token is the list's maximum: every later target is the whole list's."""
    return tasks.max_of_list_targets(torch.cat([tokens.max(-1, keepdim=True).values, tokens[:, 1:]], 1))


def _running_max_before(tokens: Tensor) -> Tensor:
    """The reference's targets one position late: position i gets the maximum of tokens 0..i-1."""
    targets = tasks.max_of_list_targets(tokens)
    return torch.cat([targets[:, :1], tokens[:, :1], targets[:, 1:-1]], 1)


check_max_of_list_targets = exercise(
    "1.1", "running maximum targets", tasks.max_of_list_targets, function="max_of_list_targets",
    kind="implementation", cases=_max_of_list_token_cases,
    hint="the target at position i is the largest token among positions 0..i (a running maximum, which torch "
         "computes in one call), and position 0 has no target: it gets IGNORE (-1).",
    mistakes=(
        Mistake("the maximum of the whole list at every position",
                "position i only sees tokens 0..i (attention is causal), so its target is the maximum so far.",
                _whole_list_max),
        Mistake("the maximum of the tokens before position i, without token i itself",
                "the list at position i is tokens[0..i], the token at i included.", _running_max_before),
        Mistake("a target at position 0",
                "a list of one token is not a task; position 0 gets IGNORE.",
                lambda tokens: torch.cat([tokens[:, :1], tasks.max_of_list_targets(tokens)[:, 1:]], 1)),
    ))


def _fibonacci_check_inputs(max_value: int, length: int) -> Tensor:
    """Fibonacci inputs for checking, [n, length]: targets equal to max_value, rows that end early, random rows.

    Padding is random tokens, not FIBONACCI_PAD, so a function that reads the padding shows it.
    """
    tokens, targets = tasks.fibonacci_sequences(length, max_value)
    valid = tasks.fibonacci_valid_positions(tokens)
    tokens = torch.where(valid, tokens, torch.randint(0, max_value + 1, tokens.shape))
    edge = (targets == max_value).any(-1)
    short = ~valid.all(-1)
    pick = [torch.nonzero(rows).squeeze(-1) for rows in (edge, short, torch.ones_like(edge))]
    chosen = torch.cat([p[torch.randperm(len(p))[:n]] for p, n in zip(pick, (4, 20, 40)) if len(p)])
    return tokens[chosen]


def _targets_on_the_padding(tokens: Tensor, max_value: int) -> Tensor:
    """Every next element up to max_value from position 1 on, the sequence's end ignored."""
    nxt = tasks.fibonacci_next(tokens)
    keep = (nxt <= max_value) & (torch.arange(tokens.shape[1]) > 0)
    return torch.where(keep, nxt, IGNORE)


def _target_at_position_0(tokens: Tensor, max_value: int) -> Tensor:
    """The reference's targets with position 0 given its 'next element', 0."""
    targets = tasks.fibonacci_targets(tokens, max_value)
    targets[:, 0] = 0
    return targets


@exercise("1.2", "Fibonacci targets, for sequences of any length", tasks.fibonacci_targets,
          tasks.fibonacci_valid_positions, kind="implementation",
          hint="the target at position i >= 1 is the sum of the tokens at i - 1 and i. It is IGNORE at position 0, "
               "where that sum exceeds max_value, and on padding: every position from the first one that breaks "
               "the Fibonacci rule onwards.",
          mistakes=(
              Mistake("targets on the padding after the sequence ends",
                      "once a token is not the sum of the two before it, that position and every later one are "
                      "padding and get IGNORE, whatever their tokens sum to.",
                      _targets_on_the_padding),
              Mistake("targets above max_value",
                      "a next element above max_value is not a token the model could output: it gets IGNORE.",
                      lambda tokens, max_value: tasks.fibonacci_targets(tokens, max_value=10 ** 9)),
              Mistake("a target at position 0",
                      "position 0 has seen one number, not two, so there is nothing to add: it gets IGNORE.",
                      _target_at_position_0),
          ))
def check_fibonacci_targets(fn: Callable, ex: Attempt) -> None:
    top, n = tasks.ADDITION_MAX, tasks.FIBONACCI_LENGTH
    for max_value, length in ((top, n), (int(torch.randint(20, 60, ())), n), (top, 3), (top, 2)):
        tokens = _fibonacci_check_inputs(max_value, length)
        check_case(fn, ex.at(f"with max_value={max_value} on sequences of {length} tokens"), (tokens, max_value))
    passed(ex)


class _WithoutZeroGrad:
    """An optimizer whose zero_grad does nothing: the reference's step with it lets gradients pile up."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        self.optimizer.step()


def _step_piling_up_gradients(model, optimizer, tokens: Tensor, targets: Tensor) -> float:
    return train.train_step(model, _WithoutZeroGrad(optimizer), tokens, targets)


def _step_mean_over_every_position(model, optimizer, tokens: Tensor, targets: Tensor) -> float:
    summed = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return train.step_on_loss(optimizer, summed / targets.numel())


def _step_loss_after_update(model, optimizer, tokens: Tensor, targets: Tensor) -> float:
    train.train_step(model, optimizer, tokens, targets)
    with torch.no_grad():
        return train.loss_fn(model(tokens), targets).item()


def _train_steps(step: Callable, seed: int, batches: list, learner: Attempt | None = None) -> tuple[list, list[Tensor]]:
    """Run `step` on a fresh max_of_list model of `seed` over `batches`; (what each step returned, final weights)."""
    model = models.build_model("max_of_list", seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    returned = []
    for tokens, targets in batches:
        args = (model, optimizer, tokens.clone(), targets.clone())
        returned.append(call_learner(step, learner, *args) if learner else step(*args))
    return returned, [p.detach().clone() for p in params]


def _same_run(a: tuple[list, list[Tensor]], b: tuple[list, list[Tensor]]) -> bool:
    try:
        return (all(abs(float(torch.as_tensor(x).detach()) - float(y)) < 1e-4 for x, y in zip(a[0], b[0]))
                and all(torch.allclose(p, q, atol=1e-5) for p, q in zip(a[1], b[1])))
    except (TypeError, ValueError, RuntimeError):
        return False


@exercise("1.3", "one training step", train.train_step, train.loss_fn, kind="implementation",
          hint="compute the logits, then the cross-entropy averaged over the positions that have a target (F.cross_"
               "entropy skips a label you name with ignore_index); clear the gradients of the last step, "
               "backpropagate, let the optimizer update, and return the loss as a Python number.",
          mistakes=(
              Mistake("gradients that pile up across steps",
                      "backward adds to the gradients already stored, so each step must clear them first.",
                      _step_piling_up_gradients),
              Mistake("a mean over every position, IGNORE included",
                      "positions without a target must not count, neither in the sum nor in the number you divide by.",
                      _step_mean_over_every_position),
              Mistake("the loss measured after the update",
                      "return the loss the gradient came from, computed before the optimizer changed the weights.",
                      _step_loss_after_update),
          ))
def check_train_step(fn: Callable, ex: Attempt) -> None:
    seed = int(torch.randint(0, 10_000, ()))
    batches = []
    for _ in range(3):
        tokens, targets = tasks.max_of_list_batch(32)
        targets[torch.rand(targets.shape) < 0.2] = IGNORE  # more positions without a target than position 0
        batches.append((tokens, targets))
    got = _train_steps(fn, seed, batches, learner=ex)  # first: the reference's run does not exist yet
    expected = _train_steps(train.train_step, seed, batches)
    named = next((m for m in ex.spec.mistakes if _same_run(got, _train_steps(m.gives, seed, batches))), None)
    if named and not _same_run(got, expected):
        raise CheckFailed(f"{ex}: your steps do not train the model as the reference does. "
                          f"This looks like {named.looks_like}: {named.advice}")
    hint = ex.hint
    for step, (loss, expected_loss) in enumerate(zip(got[0], expected[0])):
        if isinstance(loss, Tensor):
            raise CheckFailed(f"{ex}: expected the loss as a Python float, got a Tensor. Hint: return the loss's value "
                              "as a Python number (a tensor keeps the whole graph alive).")
        if not isinstance(loss, float):
            raise CheckFailed(f"{ex}: expected the loss as a Python float, got {type(loss).__name__}. Hint: {hint}")
        if not math.isfinite(loss) or abs(loss - expected_loss) > 1e-4:
            raise CheckFailed(f"{ex}: at step {step + 1} expected loss {expected_loss:.5f}, got {loss:.5f}. Hint: {hint}")
    for p, q in zip(got[1], expected[1]):
        if not torch.allclose(p, q, atol=1e-5):
            raise CheckFailed(f"{ex}: after {len(batches)} steps the weights differ from the reference. Hint: {hint}")
    passed(ex)


def _loss_curve_cases() -> list[Case]:
    """Noisy decaying loss curves that cross the threshold and bounce back, some losses exactly at it."""
    cases = []
    for threshold, end in ((0.01, 1e-3), (0.05, 1e-3), (0.01, 0.02)):
        n = int(torch.randint(200, 400, ()))
        log_loss = torch.linspace(math.log(3.0), math.log(end), n) + 0.7 * torch.randn(n)
        losses = log_loss.exp().tolist()
        below = [loss < threshold for loss in losses]
        if True in below:
            first = below.index(True)
            if first > 0:
                losses[first - 1] = threshold  # not below: a learner who writes <= finds it one step early
            last_above = max(i for i, b in enumerate(below) if not b)
            if last_above > first:
                losses[last_above] = threshold
        cases.append((f"on a loss curve of {n} steps with threshold {threshold}", (losses, threshold)))
    return cases


def _counted_from_1(losses: list[float], threshold: float) -> tuple[int, int]:
    return tuple(step + 1 if step >= 0 else -1 for step in train.steps_below(losses, threshold))


def _first_for_both(losses: list[float], threshold: float) -> tuple[int, int]:
    first, _ = train.steps_below(losses, threshold)
    return first, first


check_steps_below = exercise(
    "1.4", "how many steps until the loss is small?", train.steps_below, function="steps_below",
    kind="analysis", cases=_loss_curve_cases,
    hint="walk the list of losses, whose first entry is step 0; a loss counts as below the threshold only when it "
         "is strictly smaller; the step from which it stays below is the one after the last loss that is not "
         "below; return -1 for a curve that never gets (or never stays) there.",
    mistakes=(
        Mistake("steps counted from 1",
                "the first loss in the list is the loss of step 0.",
                _counted_from_1),
        Mistake("'at or below' instead of 'below'",
                "a loss exactly equal to the threshold is not below it.",
                lambda losses, threshold: train.steps_below(losses, math.nextafter(threshold, math.inf))),
        Mistake("the first step below, given for both",
                "a noisy loss curve dips below the threshold and comes back up; the second figure is the step "
                "after which it never comes back.",
                _first_for_both),
    ))


def _two_model_cases() -> list[Case]:
    shipped, noisy = models.load_model("max_of_list"), noisy_model("max_of_list", 0.4)
    fresh = fresh_model("max_of_list")
    return [("on the shipped max_of_list model and a copy with noise in its weights",
             (shipped, noisy, torch.randint(0, tasks.MAX_OF_LIST_VOCAB, (2000, 6)))),
            ("on the noisy copy and a freshly initialised model, every list of length 2",
             (noisy, fresh, tasks.all_lists(2)))]


check_agreement_by_position = exercise(
    "1.5", "do two models compute the same function?", models.agreement_by_position,
    function="agreement_by_position", kind="analysis", cases=_two_model_cases,
    hint="take each model's predicted token (the largest logit) at every position of every list, compare the two "
         "models' predictions, and average over the lists, keeping one figure per position.",
    mistakes=(
        Mistake("the first model's accuracy against the running maximum",
                "the question is whether the two models agree with each other, right or wrong, not whether one of "
                "them is right.",
                lambda a, b, tokens: (a(tokens).argmax(-1) == tokens.cummax(-1).values).float().mean(0)),
        Mistake("a mean over the positions instead of over the lists",
                "one figure per position: average over the batch axis (the lists), not the position axis.",
                lambda a, b, tokens: (a(tokens).argmax(-1) == b(tokens).argmax(-1)).float().mean(1)),
        Mistake("the agreement at the last position only",
                "return a figure for every position; the last one is only the longest list.",
                lambda a, b, tokens: (a(tokens).argmax(-1) == b(tokens).argmax(-1)).float().mean(0)[-1]),
    ))


def _sum_prediction_cases() -> list[Case]:
    """Every pair of a max_sum in a random order, and predictions right with a probability that depends on the pair."""
    cases = []
    for max_sum in (tasks.ADDITION_MAX, int(torch.randint(8, 30, ()))):
        tokens, _ = tasks.addition_pairs(max_sum)
        tokens = tokens[torch.randperm(len(tokens))]
        sums = tokens.sum(-1)
        p_right = torch.rand(max_sum + 1)[sums] * torch.rand(max_sum + 1)[tokens[:, 0]]
        wrong = (sums + torch.randint(1, max_sum + 1, sums.shape)) % (max_sum + 1)
        predicted = torch.where(torch.rand(len(sums)) < p_right, sums, wrong)
        cases.append((f"on the {len(tokens):,} pairs with a + b <= {max_sum} and random predictions",
                      (predicted, tokens, max_sum)))
    return cases


def _per_group(right: Tensor, groups: Tensor, n: int, share: bool = True, total: int = 0) -> Tensor:
    counts = torch.zeros(n).index_add_(0, groups, right.float())
    return counts / (total or 1) if not share else counts / torch.bincount(groups, minlength=n)


check_accuracy_by_sum = exercise(
    "1.6", "which sums does the model learn first?", models.accuracy_by_sum, function="accuracy_by_sum",
    kind="analysis", cases=_sum_prediction_cases,
    hint="a pair is right when the prediction equals a + b; group the pairs by their sum (0..max_sum), and for "
         "each sum divide the number of right pairs by the number of pairs with that sum.",
    mistakes=(
        Mistake("the accuracy per first operand a, not per sum",
                "the groups are the values of a + b, the answer the model has to output.",
                lambda predicted, tokens, max_sum: _per_group(predicted == tokens.sum(-1), tokens[:, 0], max_sum + 1)),
        Mistake("the number of right pairs per sum, not the share",
                "sum s has s + 1 pairs, so counts favour large sums: divide by each sum's number of pairs.",
                lambda predicted, tokens, max_sum: _per_group(predicted == tokens.sum(-1), tokens.sum(-1),
                                                              max_sum + 1, share=False)),
        Mistake("each sum's right pairs as a share of all pairs",
                "divide by the number of pairs with that sum, not by every pair.",
                lambda predicted, tokens, max_sum: _per_group(predicted == tokens.sum(-1), tokens.sum(-1),
                                                              max_sum + 1, share=False, total=len(tokens))),
    ))




def _weighting_cases() -> list[Case]:
    """Every pair of a small max_sum, the split's 80 % of the addition pairs, and a random third of them."""
    pairs, targets = tasks.addition_pairs()
    some = pairs[torch.randperm(len(pairs))[: len(pairs) // 3]]
    return [(f"on every pair with a + b <= {m}", (tasks.addition_pairs(m)[0],)) for m in (int(torch.randint(5, 12, ())),)] + [
        (f"on the {len(tasks.split(pairs, targets)[0][0]):,} pairs addition_split trains on", (tasks.split(pairs, targets)[0][0],)),
        (f"on a random {len(some):,} of the addition pairs", (some,)),
    ]


def _normalised(weights: Tensor) -> Tensor:
    return weights / weights.sum()


check_equal_sum_weights = exercise(
    "1.7", "every sum equally often", tasks.equal_sum_weights, function="equal_sum_weights",
    kind="analysis", cases=_weighting_cases, atol=1e-8, rtol=1e-4,
    hint="count how many of the given pairs have each sum; a pair's weight is the inverse of its sum's count, and "
         "the weights are then scaled to add up to 1, so that every sum present gets the same total.",
    mistakes=(
        Mistake("weights proportional to how many pairs share the sum",
                "that is the natural frequency the experiment is meant to undo: a pair of a common sum must weigh less.",
                lambda pairs: _normalised(1.0 / tasks.equal_sum_weights(pairs))),
        Mistake("the inverse counts, not scaled to add up to 1",
                "divide by the total so that the weights are a probability for each pair.",
                lambda pairs: tasks.equal_sum_weights(pairs) * len(pairs.sum(-1).unique())),
        Mistake("s + 1 pairs assumed for every sum s",
                "that holds only for the full set of pairs; count the sums of the pairs you are given.",
                lambda pairs: _normalised(1.0 / (pairs.sum(-1).double() + 1))),
        Mistake("the same weight for every pair",
                "uniform weights reproduce the natural frequencies of the sums; weigh each pair by its sum's rarity.",
                lambda pairs: torch.full((len(pairs),), 1.0 / len(pairs), dtype=torch.float64)),
        Mistake("one weight per sum, not one per pair",
                "the batches draw pairs, so every pair needs its own weight: its sum's share divided among that sum's pairs.",
                lambda pairs: torch.bincount(pairs.sum(-1), weights=tasks.equal_sum_weights(pairs).double())),
    ))
