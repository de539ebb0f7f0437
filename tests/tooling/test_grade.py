"""utils.grade: grading submissions against the course's own chapter, and the tricks it resists."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from utils import checks
from utils.tooling import grade, notebooks

ROOT = notebooks.REPO_ROOT
CHAPTER = ROOT / "chapters" / "03_qk_ov.ipynb"
SOLUTION = ROOT / "solutions" / "03_qk_ov.ipynb"
SPECS = sorted((s for s in checks.EXERCISES.values() if s.number.startswith("3.")), key=lambda s: int(s.number[2:]))
EXERCISES = [spec.number for spec in SPECS]  # chapter 03's, from the specs
FUNCTIONS = {spec.number: spec.function for spec in SPECS}
# the arguments each function takes, as the chapter's stub writes them, without annotations
_CODE = "\n".join(c.source for c in nbformat.read(SOLUTION, as_version=4).cells if c.cell_type == "code")
ARGUMENTS = {f: ", ".join(a.split(":")[0].strip() for a in m.group(1).split(",")) for f in FUNCTIONS.values()
             if (m := re.search(rf"^def {f}\((.*?)\)", _CODE, re.MULTILINE))}
# a call of each exercise's own reference, which the grader must score 0
REFERENCES = {spec.function: (spec.references[0].__module__.removeprefix("utils."), spec.references[0].__name__)
              for spec in SPECS}
# under pytest-xdist (make test), the tests that read the graded class share one worker, so it is graded once
ONE_WORKER = pytest.mark.xdist_group("graded_class")
CALLING_REFERENCES = [FUNCTIONS[n] for n in EXERCISES[3:]]  # in the class below, these functions call their answer
CLASS_TIMEOUT = 90  # seconds per notebook in the class run below (one submission hangs)


def run_grade(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.grade", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)


def _replace_function(nb, function: str, source: str):
    """The notebook with the cell that defines `function` replaced by `source`."""
    [cell] = [c for c in nb.cells if c.cell_type == "code" and f"def {function}(" in c.source]
    cell.source = source
    return nb


def _solved():
    return nbformat.read(SOLUTION, as_version=4)


def _untouched():
    return nbformat.read(CHAPTER, as_version=4)


# ------------------------------------------------------------------ without a kernel
def test_exercises_stubs_and_functions_come_from_the_course_chapter() -> None:
    exercises, stubs = grade.course_exercises(_untouched())
    assert [e.number for e in exercises] == EXERCISES
    assert exercises[0].name == "Exercise 3.1 — the token-only QK circuit"
    assert {e.number: e.functions for e in exercises} == {n: [f] for n, f in FUNCTIONS.items()}
    assert set(stubs) == set(FUNCTIONS.values())


def test_the_chapter_is_found_by_title_or_file_name(tmp_path: Path) -> None:
    nb = _untouched()
    assert grade.identify_chapter(tmp_path / "whatever.ipynb", nb) == CHAPTER
    untitled = new_notebook(cells=[new_code_cell("x = 1")])
    assert grade.identify_chapter(tmp_path / "03_mine.ipynb", untitled) == CHAPTER
    with pytest.raises(grade.NotGradable, match="cannot tell which chapter"):
        grade.identify_chapter(tmp_path / "homework.ipynb", untitled)
    with pytest.raises(grade.NotGradable, match="cannot tell which chapter"):
        grade.identify_chapter(tmp_path / "033_x.ipynb", untitled)


def test_only_imports_and_definitions_that_run_nothing_are_taken() -> None:
    protected = grade.chapter_names(_untouched())
    assert protected["checks"] == "utils.checks" and "model" in protected
    source = "\n".join([
        "import torch",
        "import numpy as checks",  # rebinds the chapter's checks
        "from utils.circuits import full_ov as full_ov_circuit",  # the reference under the exercise's name
        "checks.check_full_ov_circuit = print",  # a top-level statement
        "%time x = 1",  # a magic
        "@staticmethod",
        "def decorated(model): return 1",
        "def sneaky(model, _=print('defined')): return 2",
        "def model(x): return x",  # rebinds the chapter's model
        "def helper(m: torch.Tensor, k: int = -1) -> torch.Tensor | None:\n    return m",
        "def full_ov_circuit(model):\n    return helper(model.W_E)",
    ])
    code, left_out = grade.learner_code(source, "Exercise 3.2", protected, set(FUNCTIONS.values()))
    assert grade._defined_functions(code) == ["helper", "full_ov_circuit"] and code.startswith("import torch")
    reasons = " | ".join(left_out)
    for fragment in ["import numpy as checks", "from utils.circuits import full_ov", "checks.check_full_ov_circuit",
                     "run_line_magic", "def decorated", "def sneaky", "def model"]:
        assert fragment in reasons, (fragment, reasons)
    assert len(left_out) == 7
    _, broken = grade.learner_code("def f(:\n  pass", "Exercise 3.2", protected, set())
    assert "syntax error" in broken[0]


def test_failure_message_keeps_the_checkers_line_or_the_error() -> None:
    checker = "\x1b[91mNotebook cell execution failed\x1b[0m\nInput:\nchecks.x(f)\n\x1b[31m✗ Exercise 3.2 (full_ov): expected 1, got 2. Hint: h\x1b[0m"
    assert grade.failure_message(checker) == "expected 1, got 2. Hint: h"
    crash = "Notebook cell execution failed\nTraceback:\n  File x\nNameError: name 'model' is not defined\n"
    assert grade.failure_message(crash) == "NameError: name 'model' is not defined"


def test_the_grader_knows_the_checkers_tampering_phrase() -> None:
    from utils import checks

    assert grade.UNTRUSTED == checks.UNTRUSTED


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("{not json", "not a valid Jupyter notebook"),
    ('{"cells": 3}', "not a valid Jupyter notebook"),
])
def test_missing_or_broken_notebooks_get_a_clear_error(tmp_path: Path, content: str | None, message: str,
                                                       capsys) -> None:
    path = tmp_path / "learner.ipynb"
    if content is not None:
        path.write_text(content)
    code, out, err = _grade_in_process(capsys, str(path))  # (in process: no kernel starts for a broken file)
    assert code == 2
    assert message in out and "Traceback" not in out + err


def test_a_notebook_of_no_chapter_gets_a_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "homework.ipynb"
    nbformat.write(new_notebook(cells=[new_markdown_cell("# My homework"), new_code_cell("1 + 1")]), path)
    code, out, err = _grade_in_process(capsys, str(path))
    assert code == 2 and "cannot tell which chapter" in out
    assert "Traceback" not in out + err


def _grade_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m utils.grade ARGS` run in this process: (exit code, stdout, stderr)."""
    try:
        code = grade.main(list(args))
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------ a class of submissions (slow)
def _submissions() -> dict[str, object]:
    """learner -> submitted chapter 03: the honest ones and every trick the grader must resist."""
    subs: dict[str, object] = {"solved": _solved(), "untouched": _untouched()}

    # one submission, four ways of changing the check cells, which the grader takes from the course: two exercises'
    # check cells deleted, two untagged, the others replaced, and a cell of its own (right after the imports) that
    # replaces every checker
    changed = _untouched()
    checks_cells = [c for c in changed.cells if "check" in c.get("metadata", {}).get("tags", [])]
    for cell in checks_cells[2:4]:
        cell.get("metadata", {}).pop("tags", None)
    for cell in checks_cells[4:]:
        cell.source = 'print("✓ all checks passed.")'
    changed.cells = [c for c in changed.cells if not any(c is d for d in checks_cells[:2])]
    changed.cells.insert(2, new_code_cell("for name in dir(checks):\n    if name.startswith('check_'):\n"
                                          "        setattr(checks, name, lambda fn: print('✓ all checks passed.'))"))
    subs["changes_the_check_cells"] = changed

    subs["rebinds_when_called"] = _replace_function(_solved(), "token_qk_circuit", (
        "from utils import checks\n\n"
        "def token_qk_circuit(model):\n"
        "    for name in ('check_full_ov_circuit', 'check_copying_score', 'check_fraction_ordered',\n"
        "                 'check_token_only_agreement', 'check_frozen_mix_gap'):\n"
        "        setattr(checks, name, lambda fn: print('✓ all checks passed.'))\n"
        "    checks.compare_tensors = lambda *args, **kwargs: None\n"
        "    return model.W_E[:, :1]\n"))

    # one submission, three things the grader leaves out of a learner's code and reports: a stray top-level
    # statement after the first exercise's function (the function kept), code that runs when the second's is
    # defined (the function dropped), and no function at all for the third; every later exercise's function calls
    # the course's own answer to it, which scores 0
    left_out = _solved()
    [cell] = [c for c in left_out.cells if "def token_qk_circuit(" in c.source]
    cell.source += "\nprint(token_qk_circuit(model).shape)\n"
    _replace_function(left_out, "full_ov_circuit", (
        "from utils import checks\n\n"
        "def full_ov_circuit(model, _=setattr(checks, 'check_full_ov_circuit', print)):\n"
        "    return model.W_E\n"))
    _replace_function(left_out, "copying_score", "# I ran out of time\n")
    for function in CALLING_REFERENCES:
        module, reference = REFERENCES[function]
        _replace_function(left_out, function, f"from utils import {module}\n\ndef {function}({ARGUMENTS[function]}):\n"
                                              f"    return {module}.{reference}({ARGUMENTS[function]})\n")
    subs["leaves_code_out_and_calls_references"] = left_out

    subs["hangs"] = _replace_function(_solved(), "full_ov_circuit",  # (asleep, so that it leaves the CPU to others)
                                      "import time\n\ndef full_ov_circuit(model):\n    while True:\n"
                                      "        time.sleep(1)\n")
    subs["kills_its_kernel"] = _replace_function(_solved(), "full_ov_circuit",
                                                 "import os\n\ndef full_ov_circuit(model):\n    os._exit(1)\n")
    return subs


@pytest.fixture(scope="session")  # (not "module": under xdist a worker may leave this module and come back to it)
def graded_class(tmp_path_factory):
    """Grade the whole class at once, three at a time (one sleeps until the timeout), into a CSV; yields (learner -> report, csv rows, result)."""
    folder = tmp_path_factory.mktemp("class")
    paths = []
    submissions = _submissions()  # the one that sleeps until the timeout first, so that the others grade meanwhile
    for learner, nb in sorted(submissions.items(), key=lambda item: item[0] != "hangs"):
        (folder / learner).mkdir()
        nbformat.write(nb, folder / learner / "03_qk_ov.ipynb")
        paths.append(str(folder / learner / "03_qk_ov.ipynb"))
    gradebook = folder / "grades.csv"
    result = run_grade(*paths, "--json", "--csv", str(gradebook), "--jobs", "3", "--timeout", str(CLASS_TIMEOUT))
    reports = {Path(r["path"]).parent.name: r for r in json.loads(result.stdout)["notebooks"]}
    with open(gradebook, newline="") as f:
        rows = {row["learner"]: row for row in csv.DictReader(f)}
    return reports, rows, result


def _verdicts(report) -> dict[str, bool]:
    return {e["number"]: e["passed"] for e in report["exercises"]}


@pytest.mark.slow
@ONE_WORKER
def test_the_class_grades_into_one_gradebook(graded_class) -> None:
    reports, rows, result = graded_class
    assert result.returncode == 1, result.stderr
    assert set(rows) == set(_submissions())
    assert list(next(iter(rows.values()))) == ["learner", "notebook", "chapter", "score", "max", *EXERCISES, "error"]
    assert rows["solved"]["score"] == rows["solved"]["max"] == str(len(EXERCISES))
    assert [rows["solved"][n] for n in EXERCISES] == ["1"] * len(EXERCISES)
    assert rows["untouched"]["score"] == "0"
    assert all(int(rows[learner]["score"]) == reports[learner]["score"] for learner in rows)


@pytest.mark.slow
@ONE_WORKER
@pytest.mark.parametrize("learner", ["untouched", "changes_the_check_cells"])
def test_changing_the_check_cells_changes_nothing(graded_class, learner) -> None:
    reports, _, _ = graded_class
    report = reports[learner]
    assert _verdicts(report) == {n: False for n in EXERCISES}
    assert all("not implemented yet" in e["message"] for e in report["exercises"]), report["exercises"]
    assert not any("left out" in note for note in report["left_out"])  # its own cell is not an exercise's


@pytest.mark.slow
@ONE_WORKER
def test_rebinding_the_checks_when_called_fails_that_exercise_and_every_later_one(graded_class) -> None:
    report = graded_class[0]["rebinds_when_called"]
    assert _verdicts(report) == {n: False for n in EXERCISES}
    first, *later = report["exercises"]
    assert grade.UNTRUSTED in first["message"] and "check_full_ov_circuit" in first["message"], first
    assert all("not trusted" in e["message"] and "Exercise 3.1" in e["message"] for e in later), later


@pytest.mark.slow
@ONE_WORKER
def test_left_out_code_is_reported_and_functions_that_call_their_reference_score_zero(graded_class) -> None:
    report = graded_class[0]["leaves_code_out_and_calls_references"]
    assert _verdicts(report) == {n: n == EXERCISES[0] for n in EXERCISES}
    notes = report["left_out"]
    assert any("print(token_qk_circuit(model).shape)" in note for note in notes)  # 3.1 kept its function
    assert any("def full_ov_circuit" in note and "run code when defined" in note for note in notes)
    assert "not done" in " ".join(notes)
    assert any("defines no function copying_score" in note for note in notes)
    calling = [e for e in report["exercises"] if FUNCTIONS[e["number"]] in CALLING_REFERENCES]
    assert len(calling) == len(CALLING_REFERENCES) >= 3
    for e in calling:
        module, reference = REFERENCES[FUNCTIONS[e["number"]]]
        assert f"calls {module}.{reference}" in e["message"], e


@pytest.mark.slow
@ONE_WORKER
def test_a_hanging_or_dying_notebook_is_scored_on_what_ran(graded_class) -> None:
    reports, rows, _ = graded_class
    for learner in ("hangs", "kills_its_kernel"):
        report = reports[learner]
        assert report["error"] is None and _verdicts(report) == {n: n == "3.1" for n in EXERCISES}, report
        assert rows[learner]["score"] == "1"
    assert any("timeout" in line for line in reports["hangs"]["other_errors"] + [reports["hangs"]["exercises"][1]["message"]])
    assert reports["hangs"]["seconds"] < CLASS_TIMEOUT + 60
    # a dead kernel is noticed at once, not after the timeout
    assert reports["kills_its_kernel"]["seconds"] < CLASS_TIMEOUT / 2, reports["kills_its_kernel"]
    assert any("died" in line for line in reports["kills_its_kernel"]["other_errors"]
               + [e["message"] for e in reports["kills_its_kernel"]["exercises"]]), reports["kills_its_kernel"]


def test_the_exit_status_says_whether_every_exercise_passed(monkeypatch, capsys) -> None:
    """0 when every exercise of every notebook passed (the solution, in the graded class, scores full marks), 1 when
    any failed, 2 when a notebook could not be graded."""
    def report(path, passed=(True, True), error=None):
        return grade.Report(str(path), exercises=[grade.Exercise(f"3.{i}", f"Exercise 3.{i}", "id", passed=p)
                                                  for i, p in enumerate(passed, start=1)], error=error)

    outcome = {}
    monkeypatch.setattr(grade, "grade_notebook", lambda path, timeout=600: outcome[Path(path).name])
    for name, graded, status in [("all.ipynb", report("all.ipynb"), 0),
                                 ("some.ipynb", report("some.ipynb", (True, False)), 1),
                                 ("broken.ipynb", report("broken.ipynb", (), "not a notebook"), 2)]:
        outcome[name] = graded
        assert _grade_in_process(capsys, name)[0] == status, name
    assert _grade_in_process(capsys, "all.ipynb", "some.ipynb")[0] == 1


def test_what_the_stub_cell_gives_is_the_chapters_and_is_not_reported() -> None:
    given = 'D_MODEL_LAST = ("embed.weight",)'
    source = 'D_MODEL_LAST = ("embed.weight",)\nD_MODEL_FIRST = ()\n\ndef rotate(state, R):\n    return state\n'
    code, left_out = grade.learner_code(source, "Exercise 0.5", {}, set(), given)
    assert code.strip().startswith("def rotate") and "D_MODEL_LAST" not in code
    assert len(left_out) == 1 and "D_MODEL_FIRST = ()" in left_out[0]  # changed or added constants are the learner's


def test_threads_grading_side_by_side_never_parse_at_once(monkeypatch) -> None:
    """grade_all grades in threads, and CPython 3.11's parser is not thread-safe ("AST constructor recursion
    depth mismatch" when two threads parse at once): every parse the grader makes goes through one lock."""
    import ast
    import threading
    import time

    inside, overlaps, real_parse = [0], [], ast.parse

    def watched_parse(*args, **kwargs):
        inside[0] += 1
        if inside[0] > 1:
            overlaps.append(threading.current_thread().name)
        time.sleep(0.001)  # widen the window two unguarded threads would share
        try:
            return real_parse(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(ast, "parse", watched_parse)
    course = nbformat.read(SOLUTION, as_version=4)
    threads = [threading.Thread(target=grade.chapter_names, args=(course,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlaps, f"parsed in two threads at once {len(overlaps)} times"
