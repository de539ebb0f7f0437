"""Adding an exercise touches its chapter's check module and its notebook, nothing else.

The test adds exercise 3.7 to a scratch copy of the course the way the README's developer
section says (a spec in utils/checks/ch03.py; a heading, a stub-and-solution cell and a check
cell in solutions/03_qk_ov.ipynb; then the chapter builder), and runs there every test that
knows the list of exercises: they must pass without any other edit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell

ROOT = Path(__file__).resolve().parents[2]

SPEC = '''

check_token_qk_circuit_again = exercise(
    "3.7", "the token-only QK circuit, once more", circuits.full_qk_tokens, function="token_qk_circuit_again",
    cases=_max_of_list_model, atol=1e-4,
    hint="the same map as in exercise 3.1: a query token's embedding through W_Q against a key token's through W_K.",
    mistakes=(
        Mistake("the map transposed", "rows are query tokens.", lambda model: circuits.full_qk_tokens(model).T),
        Mistake("the score without the scale", "the head divides by the square root of d_head.",
                lambda model: circuits.full_qk_tokens(model) * model.cfg.d_head ** 0.5),
        Mistake("the map of the other head's side", "the query side comes first.",
                lambda model: circuits.full_qk_tokens(model).T * model.cfg.d_head ** 0.5),
    ))
'''

HEADING = """### Exercise 3.7 — the token-only QK circuit, once more
> Difficulty: 🔴⚪⚪ Importance: 🔵⚪⚪ · about 2 minutes

Write `token_qk_circuit_again(model)`, the map of exercise 3.1 again.

<details><summary>Hint 1</summary>

Each side starts from the token embedding.
</details>

<details><summary>Hint 2</summary>

Reuse what you wrote for exercise 3.1, in words: embed, read with the query and key weights, scale.
</details>
"""

CODE = """def token_qk_circuit_again(model) -> torch.Tensor:
    # BEGIN SOLUTION
    return model.W_E @ model.W_Q[0, 0] @ model.W_K[0, 0].T @ model.W_E.T / model.cfg.d_head**0.5
    # END SOLUTION
"""


def _scratch_copy(to: Path) -> None:
    """The course's tracked files (or, outside a git checkout, the folders that make it), copied to `to`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    names = [n for n in listed.stdout.split("\0") if n] if listed.returncode == 0 else []
    if not names:
        for folder in ("utils", "tests", "solutions", "chapters", "data", "binder"):
            shutil.copytree(ROOT / folder, to / folder)
        names = [p.name for p in ROOT.iterdir() if p.is_file()]
    for name in names:
        if (ROOT / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)


@pytest.mark.slow  # a scratch copy, the chapter builder and a pytest run there: about a minute
def test_an_exercise_is_added_by_its_check_module_and_its_notebook_alone(tmp_path):
    course = tmp_path / "course"
    _scratch_copy(course)
    with open(course / "utils" / "checks" / "ch03.py", "a") as module:
        module.write(SPEC)
    path = course / "solutions" / "03_qk_ov.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    last_check = max(i for i, cell in enumerate(nb.cells) if "check" in cell.metadata.get("tags", []))
    check = new_code_cell("token_qk_circuit_again = checks.check_token_qk_circuit_again(token_qk_circuit_again)", metadata={"tags": ["check"]})
    nb.cells[last_check + 1:last_check + 1] = [new_markdown_cell(HEADING), new_code_cell(CODE), check]
    nbformat.write(nb, str(path))

    env = dict(os.environ, PYTHONPATH=str(course), CIRCUITS_MODELS_DIR=str(ROOT / "data" / "models"))
    built = subprocess.run([sys.executable, "-m", "utils.notebooks"], cwd=course, env=env, capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "3.7 the token-only QK circuit, once more" in (course / "INSTRUCTORS.md").read_text()  # the catalogue
    chapter = (course / "chapters" / "03_qk_ov.ipynb").read_text()
    assert "Exercise 3.7" in chapter and "token_qk_circuit_again = checks.check_token_qk_circuit_again(token_qk_circuit_again)" in chapter
    tests = ["tests/exercises/test_exercises.py", "tests/exercises/test_checks.py", "tests/tooling/test_notebooks.py",
             "tests/tooling/test_grade.py"]
    ran = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "not slow", *tests,
                          "-k", "3.7 or token_qk_circuit_again or every or in_sync or catalogue or generated or "
                                "standard or exercises_stubs"],
                         cwd=course, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    about_it = [line for line in ran.stdout.splitlines() if ("3.7" in line or "token_qk_circuit_again" in line)
                and " PASSED" in line]
    assert len(about_it) >= 6, ran.stdout  # the new exercise's own tests ran there, and passed
