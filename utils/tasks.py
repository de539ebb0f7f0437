"""Data for every task in the course.

Every task produces a pair ``(tokens, targets)`` of integer tensors with the same
shape ``[batch, seq]``. ``targets[b, i]`` is the token the model should predict after
reading ``tokens[b, :i+1]``, or ``IGNORE`` (-1) where position ``i`` has nothing to predict.
Inputs are bare token lists: no separators, no BOS token.

- max_of_list: lists of values 0-63; at every position i >= 1 the target is max(tokens[0..i]).
- addition:    [a, b] with a + b <= 127; the target a + b sits at position 1.
- fibonacci:   x0..x4 with x[i+2] = x[i] + x[i+1]; at position i >= 1 the target is
               x[i+1] wherever x[i+1] <= 127 (x5 lies beyond the input).
- bigram:      a walk on a Markov chain with a known transition matrix; the target at
               position i is the next state of the walk.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -1

MAX_OF_LIST_VOCAB = 64
MAX_OF_LIST_LENGTHS = range(2, 7)
ADDITION_MAX = 127
FIBONACCI_LENGTH = 5
BIGRAM_VOCAB = 16
BIGRAM_SEQ = 16


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


# --------------------------------------------------------------------- fibonacci
def fibonacci_sequence(x0: int, x1: int, length: int) -> list[int]:
    """The sequence x0, x1, x0 + x1, ... with `length` elements."""
    seq = [x0, x1]
    while len(seq) < length:
        seq.append(seq[-1] + seq[-2])
    return seq[:length]


def fibonacci_targets(tokens: Tensor, max_value: int = ADDITION_MAX) -> Tensor:
    """Next Fibonacci element at every position i >= 1 where it is <= max_value, else IGNORE."""
    nxt = torch.empty_like(tokens)
    nxt[..., :-1] = tokens[..., 1:]
    nxt[..., -1] = tokens[..., -1] + tokens[..., -2]
    targets = torch.where(nxt <= max_value, nxt, torch.full_like(nxt, IGNORE))
    targets[..., 0] = IGNORE
    return targets


def fibonacci_sequences(
    length: int = FIBONACCI_LENGTH, max_value: int = ADDITION_MAX
) -> tuple[Tensor, Tensor]:
    """Every valid sequence (all `length` elements <= max_value) and its targets.

    A sequence is fixed by its first two elements; for length 5 and max 127 the last
    element 2*x0 + 3*x1 must be <= 127.
    """
    seqs = [
        fibonacci_sequence(x0, x1, length)
        for x0 in range(max_value + 1)
        for x1 in range(max_value + 1)
        if fibonacci_sequence(x0, x1, length)[-1] <= max_value
    ]
    tokens = torch.tensor(seqs)
    return tokens, fibonacci_targets(tokens, max_value)


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
