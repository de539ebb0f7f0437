"""Chapter 10's mystery models: the tasks behind them (spoilers: a learner reads this only after the capstone).

Three one-layer models of rising difficulty, each trained on token lists whose rule the chapter does
not name. The chapter gives only the input format (`FORMATS`), where predictions are read, and the
checkpoints; `python -m utils.train mystery_a` (b, c) rebuilds them, and an instructor can retrain
them with another seed so that answers do not pass between cohorts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from utils import explanations
from utils.tasks import IGNORE

VOCAB_A = 64
LENGTH_A = 6  # five values, then a pointer 0-4
SORT_VOCAB = 50  # values 0-49; token 50 separates the list from its sorted copy
SEPARATOR = SORT_VOCAB
SORT_LENGTH = 5
VOCAB_C = 64

# what the learner is told: the input format and where the predictions are read
FORMATS = {
    "mystery_a": f"{LENGTH_A - 1} tokens from 0-{VOCAB_A - 1}, then a token from 0-{LENGTH_A - 2}; the prediction at "
                 f"the last position",
    "mystery_b": f"{SORT_LENGTH} distinct tokens from 0-{SORT_VOCAB - 1}, then token {SEPARATOR}, then {SORT_LENGTH - 1} "
                 f"more tokens; predictions at positions {SORT_LENGTH}-{2 * SORT_LENGTH - 1}",
    "mystery_c": f"two tokens from 0-{VOCAB_C - 1}; the prediction at position 1",
}


# --------------------------------------------------------------------- a: the token the last one points at
def pointer_targets(tokens: Tensor) -> Tensor:
    """The target at the last position: the token at the position the last token names."""
    targets = torch.full_like(tokens, IGNORE)
    targets[:, -1] = tokens.gather(1, tokens[:, -1:]).squeeze(1)
    return targets


def mystery_a_batch(batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    values = torch.randint(0, VOCAB_A, (batch_size, LENGTH_A - 1), generator=generator)
    pointers = torch.randint(0, LENGTH_A - 1, (batch_size, 1), generator=generator)
    tokens = torch.cat([values, pointers], 1)
    return tokens, pointer_targets(tokens)


# --------------------------------------------------------------------- b: sorting
def sorting_sequences(lists: Tensor) -> tuple[Tensor, Tensor]:
    """[list, SEPARATOR, the sorted list but its last value] and the targets: the sorted list, read from the separator on."""
    ordered = lists.sort(-1).values
    n = lists.shape[1]
    tokens = torch.cat([lists, torch.full((len(lists), 1), SEPARATOR), ordered[:, :-1]], 1)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, n:] = ordered
    return tokens, targets


def mystery_b_batch(batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    lists = torch.rand(batch_size, SORT_VOCAB, generator=generator).argsort(-1)[:, :SORT_LENGTH]  # distinct values
    return sorting_sequences(lists)


# --------------------------------------------------------------------- c: the distance between two tokens
def mystery_c_data() -> tuple[Tensor, Tensor]:
    """Every pair [a, b] of tokens 0-63 and its target |a - b| at position 1: 4,096 rows."""
    values = torch.arange(VOCAB_C)
    pairs = torch.cartesian_prod(values, values)
    targets = torch.full_like(pairs, IGNORE)
    targets[:, 1] = (pairs[:, 0] - pairs[:, 1]).abs()
    return pairs, targets


# --------------------------------------------------------------------- what the chapter reads, and fresh inputs
READ = {"mystery_a": slice(LENGTH_A - 1, LENGTH_A), "mystery_b": slice(SORT_LENGTH, 2 * SORT_LENGTH),
        "mystery_c": slice(1, 2)}  # the positions each model's predictions are read at


def fresh_inputs(name: str, count: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """`count` inputs of mystery `name` drawn anew, and their targets (IGNORE where nothing is read).

    Mystery c's domain is small: it gives all 4,096 pairs, whatever `count` is.
    """
    if name == "mystery_a":
        return mystery_a_batch(count, generator)
    if name == "mystery_b":
        return mystery_b_batch(count, generator)
    if name == "mystery_c":
        return mystery_c_data()
    raise ValueError(f"no mystery model called {name!r}: the chapter's are {', '.join(READ)}")


def sample_inputs(name: str, count: int, generator: torch.Generator | None = None) -> Tensor:
    """`count` inputs of mystery `name` without their targets (all 4,096 pairs for mystery c)."""
    return fresh_inputs(name, count, generator)[0]


# --------------------------------------------------------------------- the answers (the capstone's solutions)
def pointed_token(tokens: Tensor) -> Tensor:
    """Mystery a's rule: the token at the position the last token names [batch]."""
    return tokens.gather(1, tokens[:, -1:]).squeeze(1)


def sorted_values(tokens: Tensor) -> Tensor:
    """Mystery b's rule: the list before the separator, sorted [batch, SORT_LENGTH]."""
    return tokens[:, :SORT_LENGTH].sort(-1).values


def distance(tokens: Tensor) -> Tensor:
    """Mystery c's rule: |a - b| [batch]."""
    return (tokens[:, 0] - tokens[:, 1]).abs()


def pointer_pattern(tokens: Tensor) -> Tensor:
    """Mystery a's mechanism: the last position attends to the position its token names."""
    return explanations.one_hot_rows(tokens, READ["mystery_a"], tokens[:, -1:])


def sorting_pattern(tokens: Tensor) -> Tensor:
    """Mystery b's mechanism: each position from the separator on attends to where, in the list, the next value up sits."""
    order = tokens[:, :SORT_LENGTH].argsort(-1)  # the input position of the k-th smallest value
    return explanations.one_hot_rows(tokens, READ["mystery_b"], order)
