"""Data for every task in the course.

Every task produces a pair ``(tokens, targets)`` of integer tensors with the same
shape ``[batch, seq]``. ``targets[b, i]`` is the token the model should predict after
reading ``tokens[b, :i+1]``, or ``IGNORE`` (-1) where position ``i`` has nothing to predict.
Inputs are bare token lists: no separators, no BOS token.

- max_of_list: lists of values 0-63; at every position i >= 1 the target is max(tokens[0..i]).
- addition:    [a, b] with a + b <= 127; the target a + b sits at position 1.
- fibonacci:   any start pair x0 + x1 <= 127, run on by x[i+2] = x[i] + x[i+1] while the
               elements stay <= 127, up to 5 tokens (padded after that); at position i >= 1
               the target is x[i+1] wherever x[i+1] <= 127 (x5 lies beyond the input).
- bigram:      a walk on a Markov chain with a known transition matrix; the target at
               position i is the next state of the walk.
- induction:   12 distinct random tokens (of 64) followed by the same 12 again; at the
               positions 12-22 of the repeat the target is the next token, which the first
               copy gives away (the token after the earlier occurrence of the current one).
               The model trains on a harder mix: the repeated stretch has a random length
               and place, so that it cannot find the earlier copy by position alone.
"""

from __future__ import annotations

from utils import runtime  # noqa: F401  (one torch thread; freed memory back after every cell)
import torch
from torch import Tensor

IGNORE = -1

MAX_OF_LIST_VOCAB = 64
MAX_OF_LIST_LENGTHS = range(2, 7)
ADDITION_MAX = 127
FIBONACCI_LENGTH = 5
FIBONACCI_PAD = 0  # token after the end of a shorter sequence (its targets are IGNORE)
SPLIT_TRAIN_FRACTION = 0.8  # the generalization checkpoints train on this share of the inputs
SPLIT_SEED = 2024
BIGRAM_VOCAB = 16
BIGRAM_SEQ = 16
INDUCTION_VOCAB = 64
INDUCTION_HALF = 12
INDUCTION_SEQ = 2 * INDUCTION_HALF
INDUCTION_MIN_STRETCH = 2  # a shorter repeat has no position induction can predict


# --------------------------------------------------------------------- max of list
def max_of_list_targets(tokens: Tensor) -> Tensor:
    """Running maximum of each list, [batch, seq]; position 0 is IGNORE."""
    targets = tokens.cummax(dim=-1).values.clone()
    targets[..., 0] = IGNORE
    return targets


def max_of_list_batch(
    batch_size: int, length: int = 6, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Random lists of values 0-63 and their running maxima, each [batch, length]."""
    tokens = torch.randint(0, MAX_OF_LIST_VOCAB, (batch_size, length), generator=generator)
    return tokens, max_of_list_targets(tokens)


def all_lists(length: int, vocab: int = MAX_OF_LIST_VOCAB) -> Tensor:
    """Every list of `length` values in range(vocab), [vocab**length, length], in lexicographic order."""
    values = torch.arange(vocab)
    grids = torch.meshgrid(*([values] * length), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)


def last_token_ceiling(length: int, vocab: int = MAX_OF_LIST_VOCAB) -> float:
    """The share of all lists of `length` values that the best rule seeing only the last token answers right.

    After a last token t the answer is t when the other length - 1 tokens are all <= t, and a larger
    s when their maximum is exactly s; the best rule picks the likelier, and the shares are averaged
    over t (every last token is equally likely).
    """
    v = torch.arange(vocab, dtype=torch.float64)
    rest = length - 1
    answer_is_t = ((v + 1) / vocab) ** rest  # [t]: the others are all <= t
    answer_is_s = answer_is_t - (v / vocab) ** rest  # [s]: the others' maximum is exactly s
    best_larger = torch.tensor([answer_is_s[t + 1:].max().item() if t + 1 < vocab else 0.0 for t in range(vocab)],
                               dtype=torch.float64)
    return torch.maximum(answer_is_t, best_larger).mean().item()


# --------------------------------------------------------------------- addition
def addition_pairs(max_sum: int = ADDITION_MAX) -> tuple[Tensor, Tensor]:
    """All pairs [a, b] with a + b <= max_sum and their targets, each [n_pairs, 2].

    For max_sum = 127 that is 128 * 129 / 2 = 8,256 pairs, ordered by a then b.
    """
    a, b = torch.meshgrid(torch.arange(max_sum + 1), torch.arange(max_sum + 1), indexing="ij")
    keep = (a + b) <= max_sum
    tokens = torch.stack([a[keep], b[keep]], dim=-1)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, 1] = tokens.sum(-1)
    return tokens, targets


def equal_sum_weights(pairs: Tensor) -> Tensor:
    """Sampling weights for the rows of `pairs` [n, 2] under which every sum a + b present is equally likely, [n].

    A pair's weight is 1 / (the number of rows with its sum), divided by the number of distinct sums, so the
    weights add up to 1 and every sum gets the same total. The counts are those of `pairs`, not of every pair.
    """
    sums = pairs.sum(-1)
    _, inverse, counts = sums.unique(return_inverse=True, return_counts=True)
    return 1.0 / (counts[inverse].double() * len(counts))


# --------------------------------------------------------------------- fibonacci
def fibonacci_sequence(x0: int, x1: int, length: int) -> list[int]:
    """The sequence x0, x1, x0 + x1, ... with `length` elements."""
    seq = [x0, x1]
    while len(seq) < length:
        seq.append(seq[-1] + seq[-2])
    return seq[:length]


def fibonacci_valid_positions(tokens: Tensor) -> Tensor:
    """Which positions still belong to the Fibonacci sequence, [batch, seq] bool.

    Positions 0 and 1 always do; position j >= 2 does when tokens[j] = tokens[j-2] + tokens[j-1]
    and every earlier position does. Padding after the end of a sequence breaks the rule
    (the true next element is > the vocabulary's largest token), so it is never valid.
    """
    follows = torch.ones_like(tokens, dtype=torch.bool)
    follows[..., 2:] = tokens[..., 2:] == tokens[..., :-2] + tokens[..., 1:-1]
    return follows.cumprod(dim=-1).bool()


def fibonacci_next(tokens: Tensor) -> Tensor:
    """x[i-1] + x[i] at every position i >= 1 and 0 at position 0, [batch, seq]: the next element wherever the
    sequence goes on."""
    nxt = torch.zeros_like(tokens)
    nxt[..., 1:] = tokens[..., :-1] + tokens[..., 1:]
    return nxt


def fibonacci_targets(tokens: Tensor, max_value: int = ADDITION_MAX) -> Tensor:
    """Next Fibonacci element x[i+1] = x[i-1] + x[i] at every position i >= 1, [batch, seq].

    IGNORE at position 0, wherever the next element exceeds max_value, and at positions
    past the end of the sequence (padding; see fibonacci_valid_positions). Works for any
    length 2 .. n_ctx.
    """
    nxt = fibonacci_next(tokens)
    has_target = fibonacci_valid_positions(tokens) & (nxt <= max_value)
    has_target[..., 0] = False
    return torch.where(has_target, nxt, torch.full_like(nxt, IGNORE))


def fibonacci_start_pairs(max_value: int = ADDITION_MAX) -> Tensor:
    """Every start pair (x0, x1) with x0 + x1 <= max_value, [n_pairs, 2] ordered by x0 then x1 (8,256 for 127)."""
    return addition_pairs(max_value)[0]


def fibonacci_from_start_pairs(
    pairs: Tensor, length: int = FIBONACCI_LENGTH, max_value: int = ADDITION_MAX, pad: int = FIBONACCI_PAD
) -> tuple[Tensor, Tensor]:
    """The sequences that start with `pairs` [n, 2], run on while <= max_value, padded to `length`.

    Returns (tokens, targets), each [n, length]: elements past max_value become `pad`, and
    their positions, like position 0, get IGNORE targets.
    """
    seqs = [pairs[:, 0], pairs[:, 1]]
    while len(seqs) < length:
        seqs.append(seqs[-2] + seqs[-1])
    full = torch.stack(seqs[:length], dim=-1)  # may exceed max_value
    inside = (full <= max_value).cumprod(dim=-1).bool()
    tokens = torch.where(inside, full, torch.full_like(full, pad))
    return tokens, fibonacci_targets(tokens, max_value)


def fibonacci_sequences(
    length: int = FIBONACCI_LENGTH, max_value: int = ADDITION_MAX
) -> tuple[Tensor, Tensor]:
    """Every valid Fibonacci input, one row per start pair x0 + x1 <= max_value, and its targets.

    For length 5 and max 127: 8,256 rows and 14,400 targets (8,256, 4,160, 1,408 and 576
    at positions 1-4). A sequence shorter than `length` is padded (FIBONACCI_PAD) with
    IGNORE targets; by causality the padding changes no prediction at a valid position.
    """
    return fibonacci_from_start_pairs(fibonacci_start_pairs(max_value), length, max_value)


def split_indices(n: int, train_fraction: float = SPLIT_TRAIN_FRACTION, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """A fixed random split of range(n) into (train, held_out) index tensors, sorted.

    The seed is the split's own, not the training seed, so every model trained "on 80 %"
    sees the same 80 %.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = round(train_fraction * n)
    return order[:cut].sort().values, order[cut:].sort().values


def split(tokens: Tensor, targets: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The rows of a data set cut by split_indices: ((tokens, targets) trained on, (tokens, targets) held out).

    For addition the rows are pairs; for Fibonacci they are start pairs, so a held-out
    sequence shares no start pair with the training set.
    """
    trained_on, held_out = split_indices(len(tokens))
    return (tokens[trained_on], targets[trained_on]), (tokens[held_out], targets[held_out])


# --------------------------------------------------------------------- bigram chain
def bigram_transition_matrix(vocab: int = BIGRAM_VOCAB, seed: int = 0) -> Tensor:
    """A random Markov chain, [vocab (current), vocab (next)], rows summing to 1.

    Each state favours a few successors (softmax of scaled Gaussian logits), so the table has
    visible structure but every transition stays possible.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2.5 * torch.randn(vocab, vocab, generator=g), dim=-1)


def bigram_batch(
    transitions: Tensor, batch_size: int, seq: int = BIGRAM_SEQ, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Walks of seq + 1 steps on the chain; tokens are the first seq states, targets the next ones."""
    vocab = transitions.shape[0]
    states = torch.empty(batch_size, seq + 1, dtype=torch.long)
    states[:, 0] = torch.randint(0, vocab, (batch_size,), generator=generator)
    for i in range(seq):
        states[:, i + 1] = torch.multinomial(transitions[states[:, i]], 1, generator=generator).squeeze(-1)
    return states[:, :-1], states[:, 1:]


def stationary_distribution(transitions: Tensor) -> Tensor:
    """The chain's stationary distribution pi with pi @ T = pi, [vocab]."""
    p = torch.full((transitions.shape[0],), 1.0 / transitions.shape[0], dtype=torch.float64)
    t = transitions.double()
    for _ in range(1000):
        p = p @ t
    return (p / p.sum()).float()


def sampled_bigram_table(transitions: Tensor, steps: int, generator: torch.Generator | None = None,
                         smoothing: float = 0.5) -> Tensor:
    """The empirical log transition table of `steps` transitions drawn from the chain, [vocab, vocab].

    Each state is visited in proportion to the stationary distribution and its successors are
    counted. `smoothing` is added to every count before normalising (add-k smoothing): with the
    default 1/2 a transition never seen keeps a finite log-probability; with 0 the table is the
    plain frequencies, and a transition the sample never saw gets log-probability -inf. The same
    generator state draws the same sample whatever the smoothing.
    """
    visits = torch.multinomial(stationary_distribution(transitions), steps, replacement=True, generator=generator)
    counts = torch.stack([torch.bincount(torch.multinomial(row, int(n), replacement=True, generator=generator),
                                         minlength=len(row)) if n else torch.zeros(len(row), dtype=torch.long)
                          for row, n in zip(transitions, torch.bincount(visits, minlength=len(transitions)))])
    counts = counts.float() + smoothing
    return (counts / counts.sum(-1, keepdim=True)).log()


# --------------------------------------------------------------------- induction
def repeated_stretch_batch(
    starts: Tensor, lengths: Tensor, seq: int = INDUCTION_SEQ, vocab: int = INDUCTION_VOCAB,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Distinct random tokens in which a stretch is repeated, and the induction targets, each [batch, seq].

    Row b reads s = starts[b] tokens, a stretch S of n = lengths[b] tokens, then S again
    (cut off if it runs past the end of the context); every token outside the copy is new,
    so each token of the copy occurred exactly once before. targets[b, i] is the next token
    wherever it belongs to the copy (i in s + n .. s + 2n - 2, the last position included
    when the copy goes on beyond it), and IGNORE elsewhere: those are the positions where
    induction (find the earlier occurrence of the current token, predict what followed
    it) gives the answer.
    """
    pos = torch.arange(seq + 1)  # one position beyond the context, for the last target
    s, n = starts[:, None], lengths[:, None]  # [batch, 1]
    in_copy = (pos >= s + n) & (pos < s + 2 * n)  # [batch, seq + 1]
    fresh = torch.rand(len(starts), vocab, generator=generator).argsort(-1)[:, : seq + 1]  # distinct tokens
    full = fresh.gather(1, torch.where(in_copy, pos - n, pos))  # [batch, seq + 1]
    predictable = in_copy[:, :-1] & in_copy[:, 1:]  # [batch, seq]
    targets = torch.where(predictable, full[:, 1:], torch.full_like(full[:, 1:], IGNORE))
    return full[:, :-1], targets


def induction_batch(batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """INDUCTION_HALF distinct random tokens followed by the same tokens again, and the targets, each [batch, 2 * half].

    targets[:, i] = tokens[:, i + 1] for i in half .. 2 * half - 2 (the repeat, whose next
    token the first copy gives away) and IGNORE elsewhere.
    """
    starts = torch.zeros(batch_size, dtype=torch.long)
    lengths = torch.full((batch_size,), INDUCTION_HALF)
    return repeated_stretch_batch(starts, lengths, 2 * INDUCTION_HALF, generator=generator)


def induction_training_batch(batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The induction model's training data: repeated stretches of random length and place, each [batch, INDUCTION_SEQ].

    On induction_batch alone the model finds the earlier copy by position (attend to
    i - half + 1) and learns no induction head. Here the stretch has n = 2 .. INDUCTION_HALF
    tokens; in half the rows its copy starts anywhere in the context, in the other half the
    copy runs into the end of the context, so that every position is sometimes the token
    after an earlier occurrence and the previous-token head forms everywhere.
    """
    lengths = torch.randint(INDUCTION_MIN_STRETCH, INDUCTION_HALF + 1, (batch_size,), generator=generator)
    anywhere = lengths + (torch.rand(batch_size, generator=generator) * (INDUCTION_SEQ - lengths)).long()
    latest = torch.maximum(lengths, INDUCTION_SEQ - lengths)  # copy start from which it reaches the end
    to_end = latest + (torch.rand(batch_size, generator=generator) * (INDUCTION_SEQ - latest)).long()
    copy_starts = torch.where(torch.rand(batch_size, generator=generator) < 0.5, anywhere, to_end)  # in n .. seq - 1
    return repeated_stretch_batch(copy_starts - lengths, lengths, INDUCTION_SEQ, generator=generator)
