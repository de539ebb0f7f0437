"""Chapter 10's mystery models: the tasks behind them (spoilers: a learner reads this only after the capstone).

Three one-layer models of rising difficulty, each trained on token lists whose rule the chapter does
not name. The chapter gives only the input format (`FORMATS`), where predictions are read, and the
checkpoints; `python -m utils.train mystery_a` (b, c) rebuilds them, and an instructor can retrain
them with another seed so that answers do not pass between cohorts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from utils.tasks import IGNORE

VOCAB_A = 64
LENGTH_A = 6
SORT_VOCAB = 50  # values 0-49; token 50 separates the list from its sorted copy
SEPARATOR = SORT_VOCAB
SORT_LENGTH = 5
VOCAB_C = 64

# what the learner is told: the input format and where the predictions are read
FORMATS = {
    "mystery_a": f"lists of {LENGTH_A} tokens from 0-{VOCAB_A - 1}; a prediction at every position from 1 on",
    "mystery_b": f"{SORT_LENGTH} distinct tokens from 0-{SORT_VOCAB - 1}, then token {SEPARATOR}, then {SORT_LENGTH - 1} "
                 f"more tokens; predictions at positions {SORT_LENGTH}-{2 * SORT_LENGTH - 1}",
    "mystery_c": f"two tokens from 0-{VOCAB_C - 1}; the prediction at position 1",
}


# --------------------------------------------------------------------- a: the token one position back
def previous_token_targets(tokens: Tensor) -> Tensor:
    targets = torch.full_like(tokens, IGNORE)
    targets[:, 1:] = tokens[:, :-1]
    return targets


def mystery_a_batch(batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    tokens = torch.randint(0, VOCAB_A, (batch_size, LENGTH_A), generator=generator)
    return tokens, previous_token_targets(tokens)


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
