"""Exercise checkers: each compares the learner's function with the reference on fresh inputs.

A checker prints one success line, or raises CheckFailed whose message says what was
expected, what came back, and a hint. In Jupyter a CheckFailed shows as that short
message only, never as a traceback.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


class CheckFailed(Exception):
    """An exercise check failed; the message is for the learner."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"\x1b[31m✗ {self.args[0]}\x1b[0m"]


def passed(exercise: str) -> None:
    print(f"✓ {exercise}: all checks passed.")


def call_learner(fn: Callable, exercise: str, *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function, turning 'not implemented' and crashes into CheckFailed."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailed(f"{exercise}: not implemented yet. Fill in the function in the cell above, "
                          f"run that cell, then run this check again.") from None
    except CheckFailed:
        raise
    except Exception as err:  # the learner's code crashed: say where, briefly
        raise CheckFailed(f"{exercise}: your function raised {type(err).__name__}: {err}") from None


def compare_tensors(got: Any, expected: Tensor, exercise: str, hint: str, atol: float = 1e-5, rtol: float = 1e-4,
                    what: str = "result") -> None:
    """Raise CheckFailed unless `got` is a tensor matching `expected` in shape, dtype kind and values."""
    if not isinstance(got, Tensor):
        raise CheckFailed(f"{exercise}: expected the {what} to be a torch.Tensor, got {type(got).__name__}. Hint: {hint}")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{exercise}: expected the {what} to have shape {tuple(expected.shape)}, "
                          f"got {tuple(got.shape)}. Hint: {hint}")
    if expected.dtype.is_floating_point != got.dtype.is_floating_point or (expected.dtype == torch.bool) != (got.dtype == torch.bool):
        raise CheckFailed(f"{exercise}: expected the {what} to have dtype {expected.dtype}, got {got.dtype}. Hint: {hint}")
    if got.dtype.is_floating_point and torch.isnan(got).any():
        raise CheckFailed(f"{exercise}: the {what} contains NaN ({int(torch.isnan(got).sum())} entries). Hint: {hint}")
    got_cmp, exp_cmp = got.detach().to(expected.dtype), expected.detach()
    if expected.dtype.is_floating_point:
        ok = torch.allclose(got_cmp, exp_cmp, atol=atol, rtol=rtol)
    else:
        ok = torch.equal(got_cmp, exp_cmp)
    if not ok:
        wrong = ~torch.isclose(got_cmp.float(), exp_cmp.float(), atol=atol, rtol=rtol)
        idx = tuple(int(i) for i in wrong.nonzero()[0])
        raise CheckFailed(f"{exercise}: {int(wrong.sum())} of {wrong.numel()} entries differ; at index {idx} "
                          f"expected {exp_cmp[idx].item():.5g}, got {got_cmp[idx].item():.5g}. Hint: {hint}")
