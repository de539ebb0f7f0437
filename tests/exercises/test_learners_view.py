"""The learner's view (COURSE.md's exercise standard, issue 24): what a newcomer reads and runs.

Chapters in ``LEARNERS_VIEW`` are held to it: Hint 2 in words, statements about the task and
not the checker, prediction prompts without a value near the answer, no markdown cell over 300
words, no seed talk or leftovers of earlier versions, at least four figures, claims that print
at most one line per cell, and check cells that hand the learner's function to the rest of
the chapter, which uses it. (That the later cells really call it is shown by running the
chapters: tests/tooling/test_notebooks.py.)
"""

from __future__ import annotations

import ast
import re

import pytest

from utils import checks

from tests.exercises.test_exercises import FOLD, HEADING, SOLUTIONS

LEARNERS_VIEW: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)  # chapters rewritten to this standard (00-04: issue 24; 05-08: issue 25)
MOST_WORDS = 300
LEFTOVERS = re.compile(r"\b(old (chapter|text|version|sentence)|earlier version|previous version|the source post|"
                       r"used to (say|claim))\b", re.IGNORECASE)
SEED = re.compile(r"\bseeds?\b", re.IGNORECASE)
CODE_SPAN = re.compile(r"`([^`]+)`")
# a code expression: a call, indexing, an operator between operands, an einsum string, a method or attribute chain
EXPRESSION = re.compile(r"\w\s*\(|\w\s*\[|\s[-+*/@%<>=]=?\s|->|\*\*|\.\w+\(|\.T\b|\w\.\w+\.\w+\.\w+|\w=\w")
CHECKER_TALK = re.compile(r"\b(the checker|checkers?\b (names?|accepts?|rejects?|looks?|tests?|compares?)|"
                          r"the check (names|accepts|rejects|looks|tests|compares))", re.IGNORECASE)
FIGURE_CALL = re.compile(r"\b(plots\.\w+|px\.\w+|go\.Figure|make_subplots)\s*\(")
NUMBER_EXAMPLE = re.compile(r"\be\.g\.,?\s*[-+]?\d", re.IGNORECASE)


def _markdown(chapter: int) -> list[str]:
    return [c.source for c in SOLUTIONS[chapter].cells if c.cell_type == "markdown"]


def _code(chapter: int) -> list[str]:
    return [c.source for c in SOLUTIONS[chapter].cells if c.cell_type == "code"]


def _hint_2s(chapter: int) -> dict[str, str]:
    found = {}
    for source in _markdown(chapter):
        if m := HEADING.search(source):
            for summary, body in FOLD.findall(source):
                if summary.strip().lower() == "hint 2":
                    found[f"{m.group(1)}.{m.group(2)}"] = body
    return found


@pytest.mark.parametrize("chapter", LEARNERS_VIEW)
def test_hint_2_gives_the_approach_in_words(chapter):
    hints = _hint_2s(chapter)
    assert hints, f"chapter {chapter:02d}: no Hint 2 found"
    coded = {number: spans for number, body in hints.items()
             if (spans := [s for s in CODE_SPAN.findall(body) if EXPRESSION.search(s)])}
    assert not coded, f"chapter {chapter:02d}: Hint 2 holds code expressions (the code belongs in the solution " \
                      f"fold; name quantities and steps in words): {coded}"


def _statement(source: str) -> str:
    """An exercise cell's statement: its text before the first fold."""
    return source.split("<details>", 1)[0]


@pytest.mark.parametrize("chapter", LEARNERS_VIEW)
def test_exercise_statements_say_what_to_compute_not_what_the_checker_does(chapter):
    talk = [HEADING.search(s).group(0) for s in _markdown(chapter)
            if HEADING.search(s) and CHECKER_TALK.search(_statement(s))]
    assert not talk, f"chapter {chapter:02d}: exercise statements about the checker: {talk}"


@pytest.mark.parametrize("chapter", LEARNERS_VIEW)
def test_prose_is_short_current_and_free_of_seed_talk(chapter):
    long = [(len(s.split()), s[:60]) for s in _markdown(chapter) if len(s.split()) > MOST_WORDS]
    assert not long, f"chapter {chapter:02d}: markdown cells over {MOST_WORDS} words: {long}"
    text = "\n".join(_markdown(chapter) + [line for s in _code(chapter) for line in s.splitlines()
                                           if "#" in line or "print(" in line or "claim(" in line])
    assert not LEFTOVERS.findall(text), f"chapter {chapter:02d}: text about earlier versions: {LEFTOVERS.findall(text)}"
    seeds = [line.strip()[:100] for line in "\n".join(_markdown(chapter)).splitlines() if SEED.search(line)]
    assert len(seeds) <= 1, f"chapter {chapter:02d}: {len(seeds)} seed remarks in the prose: {seeds}"


@pytest.mark.parametrize("chapter", LEARNERS_VIEW)
def test_prediction_prompts_give_the_format_not_a_value(chapter):
    prompts = [c.source for c in SOLUTIONS[chapter].cells if "prediction" in c.metadata.get("tags", [])]
    leaking = [p for p in prompts if NUMBER_EXAMPLE.search(p)]
    assert not leaking, f"chapter {chapter:02d}: a prediction prompt suggests a value: {leaking}"


@pytest.mark.parametrize("chapter", LEARNERS_VIEW)
def test_at_least_four_figures(chapter):
    figures = sum(len(FIGURE_CALL.findall(s)) for s in _code(chapter))
    assert figures >= 4, f"chapter {chapter:02d}: {figures} figure calls; a chapter shows at least four"


@pytest.mark.parametrize("chapter", LEARNERS_VIEW)
def test_claims_print_no_lines_of_their_own(chapter):
    printing = [s[:80] for s in _code(chapter) if re.search(r"print\([^)]*✓", s)]
    assert not printing, f"chapter {chapter:02d}: cells print ✓ lines of their own (use claims.claim): {printing}"


def _used_names(sources: list[str]) -> set[str]:
    names = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:  # IPython syntax (%magic): not a cell that uses exercise functions
            continue
        names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return names


@pytest.mark.parametrize("chapter", LEARNERS_VIEW)
def test_later_cells_use_at_least_half_of_the_exercise_functions(chapter):
    cells = SOLUTIONS[chapter].cells
    specs = [s for s in checks.EXERCISES.values() if int(s.number.split(".")[0]) == chapter]
    used = []
    for spec in specs:
        [at] = [i for i, c in enumerate(cells) if "check" in c.metadata.get("tags", [])
                and f"check_{spec.function}(" in c.source]
        later = [c.source for c in cells[at + 1:] if c.cell_type == "code" and "check" not in c.metadata.get("tags", [])]
        if spec.function in _used_names(later):
            used.append(spec.number)
    assert 2 * len(used) >= len(specs), \
        f"chapter {chapter:02d}: later cells use only {used} of {len(specs)} exercise functions under the learner's name"
