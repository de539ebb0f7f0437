"""utils.grade: per-exercise grading of learner notebooks on top of nbval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from utils import grade, notebooks

ROOT = notebooks.REPO_ROOT
CHAPTER = ROOT / "chapters" / "03_qk_ov.ipynb"
SOLUTION = ROOT / "solutions" / "03_qk_ov.ipynb"
EXERCISES = ["Exercise 3.1", "Exercise 3.2", "Exercise 3.3"]


def run_grade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.grade", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)


# ------------------------------------------------------------------ without a kernel
def test_exercises_are_named_by_the_heading_above_each_check() -> None:
    nb = nbformat.read(CHAPTER, as_version=4)
    names = [e.name for e in grade.exercises_in(nb)]
    assert [n.split(" —")[0] for n in names] == EXERCISES
    assert names[0] == "Exercise 3.1 — the token-only QK circuit"


def test_a_check_without_heading_is_named_by_its_cell() -> None:
    nb = new_notebook(cells=[new_markdown_cell("### Exercise 9.1 — first"), new_code_cell("f()", metadata={"tags": ["check"]}),
                             new_code_cell("g()", metadata={"tags": ["check"]}), new_code_cell("h()")])
    assert [e.name for e in grade.exercises_in(nb)] == ["Exercise 9.1 — first", "check in cell 2"]


def test_failure_message_keeps_the_checkers_line_or_the_error() -> None:
    checker = "\x1b[91mNotebook cell execution failed\x1b[0m\nInput:\nchecks.x(f)\n\x1b[31m✗ Exercise 3.2 (full_ov): expected 1, got 2. Hint: h\x1b[0m"
    assert grade.failure_message(checker) == "expected 1, got 2. Hint: h"
    crash = "Notebook cell execution failed\nTraceback:\n  File x\nNameError: name 'model' is not defined\n"
    assert grade.failure_message(crash) == "NameError: name 'model' is not defined"


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("{not json", "not a valid Jupyter notebook"),
    ('{"cells": 3}', "not a valid Jupyter notebook"),
])
def test_missing_or_broken_notebooks_get_a_clear_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "learner.ipynb"
    if content is not None:
        path.write_text(content)
    result = run_grade(str(path))
    assert result.returncode == 2
    assert message in result.stdout and "Traceback" not in result.stdout + result.stderr


# ------------------------------------------------------------------ running notebooks (slow)
@pytest.mark.slow
def test_unfilled_chapter_scores_zero_and_lists_every_exercise() -> None:
    result = run_grade(str(CHAPTER))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for exercise in EXERCISES:
        [line] = [line for line in lines if exercise in line]
        assert line.strip().startswith("✗") and "not implemented yet" in line
    assert "score 0/3" in result.stdout and "not an exercise" not in result.stdout


@pytest.mark.slow
def test_solution_scores_full_marks_and_json_agrees() -> None:
    result = run_grade(str(SOLUTION), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    [notebook] = report["notebooks"]
    assert (notebook["score"], notebook["total"]) == (3, 3) and notebook["other_errors"] == []
    assert all(e["passed"] for e in notebook["exercises"])


@pytest.mark.slow
def test_one_wrong_answer_fails_exactly_that_exercise(tmp_path: Path) -> None:
    nb = nbformat.read(SOLUTION, as_version=4)
    [cell] = [c for c in nb.cells if c.cell_type == "code" and "def full_ov_circuit" in c.source]
    assert "model.W_U" in cell.source
    cell.source = cell.source.replace("model.W_U", "model.W_U.flip(-1)")  # a learner's wrong answer
    wrong = tmp_path / "03_qk_ov.ipynb"
    nbformat.write(nb, wrong)
    result = run_grade(str(wrong))
    assert result.returncode == 1
    verdicts = {ex: next(line.strip()[0] for line in result.stdout.splitlines() if ex in line) for ex in EXERCISES}
    assert verdicts == {"Exercise 3.1": "✓", "Exercise 3.2": "✗", "Exercise 3.3": "✓"}, result.stdout
    assert "Hint:" in result.stdout and "score 2/3" in result.stdout
