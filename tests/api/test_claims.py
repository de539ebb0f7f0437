"""claims: a claim that holds stays quiet until its cell ends, then the cell shows one line; one that fails says
which and what was measured."""

from __future__ import annotations

import pytest

from utils import claims


def test_a_failing_claim_names_the_claim_and_the_measurement():
    with pytest.raises(claims.ClaimFailed, match=r"claims that the head copies, but here it does not hold "
                                                 r"\(measured: 0\.31\)"):
        claims.claim("the head copies", False, "0.31")


def test_outside_a_notebook_each_claim_prints_its_line(capsys):
    claims.claim("the head copies", True, "0.999")
    assert capsys.readouterr().out == "✓ the head copies (measured: 0.999)\n"


def test_in_a_notebook_a_cells_claims_show_as_one_line_with_the_details_folded(monkeypatch, capsys):
    shown = []
    monkeypatch.setattr(claims, "_shell", lambda: object())  # as if a kernel were running
    monkeypatch.setattr("IPython.display.display", lambda data, raw=False: shown.append(data))
    for n in range(3):
        claims.claim(f"claim {n} < 5", n < 5, f"{n}")
    assert capsys.readouterr().out == ""  # quiet while the cell runs
    claims.show_claims_of_the_cell()
    [data] = shown
    assert data["text/plain"] == "✓ the 3 claims of the text made here hold"
    assert data["text/html"].count("<li>") == 3 and "claim 2 &lt; 5" in data["text/html"] and "<details" in data["text/html"]
    claims.show_claims_of_the_cell()  # the next cell, without claims: nothing
    assert len(shown) == 1
    claims.claim("one more", True)
    claims.show_claims_of_the_cell()
    assert shown[-1]["text/plain"] == "✓ the claim of the text made here holds"


def test_a_kernel_shows_the_claims_after_each_cell():
    """Importing claims in a kernel registers the end-of-cell summary once."""
    from IPython.core.interactiveshell import InteractiveShell
    import importlib

    shell = InteractiveShell.instance()
    try:
        importlib.reload(claims)
        importlib.reload(claims)
        registered = [cb for cb in shell.events.callbacks["post_run_cell"]
                      if getattr(cb, "__qualname__", "") == "show_claims_of_the_cell"]
        assert len(registered) == 1
    finally:
        InteractiveShell.clear_instance()
        importlib.reload(claims)
