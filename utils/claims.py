"""The chapters' claims, checked where they are made, and the learner's predictions set beside them.

A chapter that states a figure computes it and calls ``claim``. A claim that does not hold
raises at once, naming the claim and the measurement (so nbval and ``make test-seeds`` fail
that cell). Claims that hold stay quiet while the cell runs; when it ends, the cell shows one
line, "✓ the 3 claims of the text made here hold", with the claims and their measurements
folded under it. Outside a notebook (a script, a test) each claim prints its own line.
``against_guess`` prints a measurement next to the guess the learner wrote before the experiment.
"""

from __future__ import annotations

import html
from typing import Any


class ClaimFailed(AssertionError):
    """A figure the chapter's prose states does not hold for the model at hand."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"\x1b[31m✗ {self.args[0]}\x1b[0m"]


_held: list[tuple[str, str]] = []  # (statement, measured) of the claims that held in the cell running now


def claim(statement: str, holds: Any, measured: str = "") -> None:
    """Record "<statement>" as holding when `holds` is true; raise ClaimFailed saying what was measured otherwise.

    `statement` is the claim as the prose makes it ("the head attends to a maximum in more than
    99 % of lists"); `measured` is the figure behind it, as the cell computed it ("99.7 %").
    """
    shown = f" (measured: {measured})" if measured else ""
    if not bool(holds):
        raise ClaimFailed(f"The chapter claims that {statement}, but here it does not hold{shown}. If you changed "
                          "the model or its checkpoint, restart the kernel and run the chapter again; otherwise "
                          "the text no longer matches the model: please report it.")
    if _shell() is None:
        print(f"✓ {statement}{shown}")
    else:
        _held.append((statement, measured))


def summary_line(held: list[tuple[str, str]]) -> str:
    """The one line a cell shows for the claims that held in it."""
    return "✓ the claim of the text made here holds" if len(held) == 1 else \
        f"✓ the {len(held)} claims of the text made here hold"


def show_claims_of_the_cell(*_) -> None:
    """Show one line for the claims that held in the cell that just ran, the claims folded under it."""
    if not _held:
        return
    held = list(_held)
    _held.clear()
    from IPython.display import display

    items = "".join(f"<li>{html.escape(s)}" + (f" <i>(measured: {html.escape(m)})</i>" if m else "") + "</li>"
                    for s, m in held)
    plain = summary_line(held)
    display({"text/plain": plain,
             "text/html": f"<details style='color:#2a7a2a'><summary>{html.escape(plain)}</summary><ul>{items}</ul>"
                          "</details>"}, raw=True)


def _shell():
    try:
        from IPython import get_ipython
    except ImportError:  # no IPython, no notebook
        return None
    return get_ipython()


def against_guess(guess: Any, measured: str) -> str:
    """'measured: 97.1 %  ·  your guess: 0.5', or a nudge when the guess was left empty."""
    said = "you left the guess empty (write one next time: it is the point)" if guess is None else f"your guess: {guess}"
    return f"measured: {measured}  ·  {said}"


if _shell() is not None:
    _callbacks = _shell().events.callbacks["post_run_cell"]
    if not any(getattr(cb, "__qualname__", None) == show_claims_of_the_cell.__qualname__ for cb in _callbacks):
        _shell().events.register("post_run_cell", show_claims_of_the_cell)
