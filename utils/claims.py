"""The chapters' claims, checked where they are made, and the learner's predictions set beside them.

A chapter that states a figure computes it and calls ``claim``: the cell prints "✓" and the
claim in words when it holds, and fails loudly, naming the claim and the measurement, when it
does not (so nbval and ``make test-seeds`` fail that cell). ``against_guess`` prints a
measurement next to the guess the learner wrote before the experiment.
"""

from __future__ import annotations

from typing import Any


class ClaimFailed(AssertionError):
    """A figure the chapter's prose states does not hold for the model at hand."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"\x1b[31m✗ {self.args[0]}\x1b[0m"]


def claim(statement: str, holds: Any, measured: str = "") -> None:
    """Print "✓ <statement>" when `holds` is true; raise ClaimFailed saying what was measured otherwise.

    `statement` is the claim as the prose makes it ("the head attends to a maximum in more than
    99 % of lists"); `measured` is the figure behind it, as the cell computed it ("99.7 %").
    """
    shown = f" (measured: {measured})" if measured else ""
    if not bool(holds):
        raise ClaimFailed(f"The chapter claims that {statement}, but here it does not hold{shown}. If you changed "
                          "the model or its checkpoint, restart the kernel and run the chapter again; otherwise "
                          "the text no longer matches the model: please report it.")
    print(f"✓ {statement}{shown}")


def against_guess(guess: Any, measured: str) -> str:
    """'measured: 97.1 %  ·  your guess: 0.5', or a nudge when the guess was left empty."""
    said = "you left the guess empty (write one next time: it is the point)" if guess is None else f"your guess: {guess}"
    return f"measured: {measured}  ·  {said}"
