"""Grade filled-in chapter notebooks, one line per exercise, on top of nbval.

    python -m utils.grade NOTEBOOK... [--json] [--timeout SECONDS]

Each notebook runs top to bottom in a fresh kernel under nbval (``pytest --nbval-lax``), the
way ``make test`` runs the solutions. Every cell tagged ``check`` is one exercise, named by the
"### Exercise N.M — title" heading above it. The report lists each exercise as passed or
failed with the checker's own message, then the score. Cells outside the checks that fail are
listed too (a learner's edit can break a later cell). Exit status: 0 when every exercise of
every notebook passed, 1 when any failed, 2 when a notebook is missing or not a notebook.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHECK_TAG = "check"
_EXERCISE_HEADING = re.compile(r"^#+\s*(Exercise\s+\d+\.\d+\b.*?)\s*$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CHECKER_PREFIX = re.compile(r"^Exercise \d+\.\d+ \([^)]*\):\s*")


class NotebookUnreadable(ValueError):
    """The path is missing, or is not a notebook (invalid JSON, wrong format)."""


@dataclass
class Exercise:
    name: str  # "Exercise 3.1 — the token-only QK circuit"
    cell_id: str
    passed: bool = False
    message: str = "not run"


@dataclass
class Report:
    path: str
    exercises: list[Exercise] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)  # failing cells that are not checks
    error: str | None = None  # the notebook could not be graded at all

    @property
    def score(self) -> int:
        return sum(e.passed for e in self.exercises)

    @property
    def ok(self) -> bool:
        return self.error is None and self.score == len(self.exercises)


def read_notebook(path: Path):
    """The notebook at `path` as an nbformat node, or NotebookUnreadable saying what is wrong."""
    import nbformat

    if not path.exists():
        raise NotebookUnreadable(f"{path}: no such file")
    if path.is_dir():
        raise NotebookUnreadable(f"{path}: is a folder; pass the notebooks in it (e.g. {path}/*.ipynb)")
    try:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # JSON, Unicode and schema errors all mean "not a notebook we can run"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise NotebookUnreadable(f"{path}: not a valid Jupyter notebook ({first_line[:200]})") from None
    return nb


def exercises_in(nb) -> list[Exercise]:
    """One Exercise per check cell, named by the nearest exercise heading above it."""
    found, heading = [], None
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            headings = _EXERCISE_HEADING.findall(cell.source)
            heading = headings[-1] if headings else heading
        elif CHECK_TAG in cell.get("metadata", {}).get("tags", []):
            name = heading or f"check in cell {index}"
            found.append(Exercise(name=name, cell_id=cell.get("id", str(index))))
            heading = None  # a second check without a heading of its own gets its cell number
    return found


def failure_message(text: str) -> str:
    """The one line a learner needs from nbval's failure report: the checker's ✗ line, else the error line."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("✗"):  # a checker's message; the exercise is named already
            return _CHECKER_PREFIX.sub("", line.lstrip("✗ ").strip(), count=1)
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt|Exit|Timeout)\b", line) or "timed out" in line.lower():
            return line
    return lines[-1] if lines else "failed"


class _Collector:
    """pytest plugin: remembers which nbval item is which cell, and every cell's outcome."""

    def __init__(self) -> None:
        self.cell_of: dict[str, tuple[str, str]] = {}  # nodeid -> (cell id, first source line)
        self.outcomes: dict[str, tuple[bool, str]] = {}  # cell id -> (passed, message)

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            cell = getattr(item, "cell", None)
            if cell is not None:
                first = (cell.source.strip().splitlines() or [""])[0]
                self.cell_of[item.nodeid] = (cell.get("id", item.nodeid), first)

    def pytest_runtest_logreport(self, report) -> None:
        if report.nodeid not in self.cell_of or (report.when != "call" and not report.failed):
            return
        cell_id, _ = self.cell_of[report.nodeid]
        if report.failed:
            self.outcomes[cell_id] = (False, failure_message(report.longreprtext))
        else:
            self.outcomes.setdefault(cell_id, (True, ""))


def grade_notebook(path: Path, timeout: int = 300) -> Report:
    """Run one notebook under nbval and report every exercise."""
    import pytest

    report = Report(path=str(path))
    try:
        nb = read_notebook(path)
    except NotebookUnreadable as err:
        report.error = str(err)
        return report
    report.exercises = exercises_in(nb)
    collector = _Collector()
    args = [str(path), "--nbval-lax", f"--nbval-cell-timeout={timeout}", "-q", "--tb=short",
            "-p", "no:cacheprovider", "--rootdir", str(path.parent.resolve()), "-c", os.devnull]
    # -c os.devnull: no configuration file, so a course's or a class folder's own pytest settings
    # (testpaths, addopts) cannot change how the notebook runs. pytest's own report is kept out
    # of the way; this module prints the per-exercise one.
    pytest_output = io.StringIO()
    with contextlib.redirect_stdout(pytest_output):
        exit_code = pytest.main(args, plugins=[collector])
    if not collector.outcomes:
        tail = " ".join(pytest_output.getvalue().strip().splitlines()[-3:])
        report.error = f"{path}: nbval ran no cell (pytest exit code {int(exit_code)}: {tail[:300]})"
        return report
    check_ids = {e.cell_id for e in report.exercises}
    for exercise in report.exercises:
        exercise.passed, exercise.message = collector.outcomes.get(exercise.cell_id, (False, "not run"))
    for cell_id, first_line in collector.cell_of.values():
        passed, message = collector.outcomes.get(cell_id, (True, ""))
        if cell_id not in check_ids and not passed:
            report.other_errors.append(f"cell {cell_id} ({first_line[:60]}): {message}")
    return report


def format_report(reports: list[Report]) -> str:
    lines = []
    for r in reports:
        lines.append(r.path)
        if r.error:
            lines.append(f"  error: {r.error}")
            continue
        if not r.exercises:
            lines.append("  (no exercises: no cell is tagged 'check')")
        for e in r.exercises:
            lines.append(f"  {'✓' if e.passed else '✗'} {e.name}" + ("" if e.passed else f": {e.message}"))
        for other in r.other_errors:
            lines.append(f"  ! not an exercise, but failed: {other}")
        lines.append(f"  score {r.score}/{len(r.exercises)}")
    graded = [r for r in reports if not r.error]
    if len(reports) > 1:
        total = sum(len(r.exercises) for r in graded)
        lines.append(f"total {sum(r.score for r in graded)}/{total} exercises in {len(graded)} notebook(s)"
                     + (f"; {len(reports) - len(graded)} could not be graded" if len(graded) < len(reports) else ""))
    return "\n".join(lines)


def to_json(reports: list[Report]) -> str:
    return json.dumps({"notebooks": [dict(asdict(r), score=r.score, total=len(r.exercises)) for r in reports],
                       "score": sum(r.score for r in reports),
                       "total": sum(len(r.exercises) for r in reports)}, indent=2, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.grade", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.add_argument("--timeout", type=int, default=300, metavar="SECONDS", help="per-cell timeout (default 300)")
    args = parser.parse_args(argv)

    reports = []
    for path in args.notebooks:
        print(f"grading {path} ...", file=sys.stderr, flush=True)
        reports.append(grade_notebook(path, args.timeout))
    print(to_json(reports) if args.json else format_report(reports), flush=True)
    if any(r.error for r in reports):
        return 2
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
