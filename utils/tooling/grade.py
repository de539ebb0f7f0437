"""Grade learners' chapter notebooks against the course's own chapter, one line per exercise.

    python -m utils.grade NOTEBOOK... [--csv GRADES.csv] [--jobs N] [--timeout SECONDS] [--json]

The tests come from the course, not from the submission (the model nbgrader uses):

1. The chapter is identified by the submission's title cell ("# Chapter 03 — ..."), else by its
   file name (03_qk_ov.ipynb, 03_anything.ipynb).
2. The course's chapter in chapters/ is run as it stands: its text, its check cells, every cell
   but the exercise stubs (the cells that raise NotImplementedError).
3. In place of each stub goes the learner's code for that exercise: the imports and function
   definitions of the submission's cell that defines the exercise's function (the last such
   cell). Everything else is left out and listed in the report: other top-level statements,
   definitions that would run code when defined (decorators, computed defaults), and names
   that would rebind the chapter's own (``checks``, ``model``, ...).
4. That notebook runs top to bottom in a fresh kernel under nbval (``pytest --nbval-lax``) with
   strict checks (a failed check fails its cell), in a subprocess stopped at the per-notebook
   timeout; a notebook that hangs or kills its kernel is scored on what ran.

The checkers themselves fail an exercise whose function calls the course's reference for it,
and fail it, and every later one, when they find the course's code replaced.

Report: each exercise passed or failed with the checker's message, the score, what was left
out. ``--csv`` writes a gradebook: one row per submission (the learner is its folder's name),
score, maximum, one column per exercise. ``--jobs`` grades that many notebooks at once. Exit
status: 0 when every exercise of every notebook passed, 1 when any failed, 2 when a notebook
could not be graded (missing, not a notebook, chapter unknown).
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from utils.tooling import REPO_ROOT

CHECK_TAG = "check"
CHAPTERS = REPO_ROOT / "chapters"
RESULTS_ENV = "CIRCUITS_GRADE_RESULTS"  # where the nbval run writes each cell's outcome
UNTRUSTED = "cannot be trusted"  # utils.checks.UNTRUSTED, kept here so the grader does not import torch
_EXERCISE_HEADING = re.compile(r"^#+\s*(Exercise\s+(\d+\.\d+)\b.*?)\s*$", re.MULTILINE)
_CHAPTER_TITLE = re.compile(r"^#\s*Chapter\s+(\d+)\b", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CHECKER_PREFIX = re.compile(r"^Exercise \d+\.\d+ \([^)]*\):\s*")


class NotGradable(ValueError):
    """The submission cannot be graded: missing, not a notebook, or of no chapter the course has."""


@dataclass
class Exercise:
    number: str  # "3.2"
    name: str  # "Exercise 3.2 — the full OV circuit"
    cell_id: str  # the course chapter's check cell
    functions: list[str] = field(default_factory=list)  # what the learner writes: ["full_ov_circuit"]
    passed: bool = False
    message: str = "not run"


@dataclass
class Report:
    path: str
    learner: str = ""
    chapter: str = ""
    exercises: list[Exercise] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # what of the submission was not graded, and why
    other_errors: list[str] = field(default_factory=list)  # failing cells that are not checks
    error: str | None = None  # the notebook could not be graded at all
    seconds: float = 0.0

    @property
    def score(self) -> int:
        return sum(e.passed for e in self.exercises)

    @property
    def ok(self) -> bool:
        return self.error is None and self.score == len(self.exercises)


# ------------------------------------------------------------------ reading notebooks
def read_notebook(path: Path):
    """The notebook at `path` as an nbformat node, or NotGradable saying what is wrong."""
    import nbformat

    if not path.exists():
        raise NotGradable(f"{path}: no such file")
    if path.is_dir():
        raise NotGradable(f"{path}: is a folder; pass the notebooks in it (e.g. {path}/*.ipynb)")
    try:
        nb = nbformat.read(str(path), as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # JSON, Unicode and schema errors all mean "not a notebook we can run"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise NotGradable(f"{path}: not a valid Jupyter notebook ({first_line[:200]})") from None
    return nb


def identify_chapter(path: Path, nb) -> Path:
    """The course chapter a submission belongs to: by its title cell, else by its file name."""
    chapters = {p.name[:2]: p for p in sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb"))}
    for cell in nb.cells:
        if cell.cell_type == "markdown" and (title := _CHAPTER_TITLE.search(cell.source)):
            number = f"{int(title.group(1)):02d}"
            if number in chapters:
                return chapters[number]
            break
    if path.name[:2] in chapters and not path.name[2:3].isdigit():
        return chapters[path.name[:2]]
    raise NotGradable(f"{path}: cannot tell which chapter this is: its title cell does not name one of chapters "
                      f"{', '.join(sorted(chapters))} (\"# Chapter 03 — ...\"), and neither does its file name "
                      "(\"03_qk_ov.ipynb\"). Keep the chapter's title cell, or name the file like the chapter.")


# CPython 3.11's parser keeps its recursion count per interpreter, not per thread: two threads parsing at
# once (grade_all grades submissions in threads) fail with "AST constructor recursion depth mismatch".
_PARSING = threading.Lock()


def _parse(source: str) -> ast.Module:
    with _PARSING:
        return ast.parse(source)


def _python(source: str) -> str:
    """A cell's source as plain Python: IPython's magics and shell escapes become function calls."""
    from IPython.core.inputtransformer2 import TransformerManager

    with _PARSING:
        return TransformerManager().transform_cell(source)


def _defined_functions(source: str) -> list[str]:
    try:
        return [node.name for node in _parse(_python(source)).body if isinstance(node, ast.FunctionDef)]
    except SyntaxError:
        return re.findall(r"^def\s+(\w+)\s*\(", source, flags=re.MULTILINE)


def course_exercises(nb) -> tuple[list[Exercise], dict[str, int]]:
    """The chapter's exercises (one per check cell, named by the heading above it) and its stub cells.

    Returns the exercises and {function name: index of the stub cell that defines it}.
    """
    exercises, stubs, heading, pending = [], {}, None, []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            found = _EXERCISE_HEADING.findall(cell.source)
            heading = found[-1] if found else heading
        elif "NotImplementedError" in cell.source:
            names = _defined_functions(cell.source)
            stubs.update({name: index for name in names})
            pending += names
        elif CHECK_TAG in cell.get("metadata", {}).get("tags", []):
            name, number = heading if heading else (f"check in cell {index}", f"cell {index}")
            exercises.append(Exercise(number=number, name=name, cell_id=cell.get("id", str(index)), functions=pending))
            heading, pending = None, []
    return exercises, stubs


# ------------------------------------------------------------------ the learner's code
def _inert(node: ast.AST | None) -> bool:
    """An expression that runs no code of the learner's when evaluated: a constant, a name, a type."""
    if node is None or isinstance(node, (ast.Constant, ast.Name)):
        return True
    if isinstance(node, ast.Attribute):
        return _inert(node.value)
    if isinstance(node, ast.Subscript):
        return _inert(node.value) and _inert(node.slice)
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(map(_inert, node.elts))
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.USub, ast.UAdd)) and _inert(node.operand)
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, ast.BitOr) and _inert(node.left) and _inert(node.right)
    return False


def _runs_code_when_defined(fn: ast.FunctionDef) -> bool:
    a = fn.args
    parameters = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p]
    return bool(fn.decorator_list) or not all(map(_inert, [*a.defaults, *a.kw_defaults, fn.returns,
                                                         *(p.annotation for p in parameters)]))


def _import_targets(node: ast.Import | ast.ImportFrom) -> dict[str, str]:
    """{name bound: what it is bound to}, e.g. `from utils import checks` -> {"checks": "utils.checks"}."""
    if isinstance(node, ast.Import):
        return {(a.asname or a.name.split(".")[0]): (a.name if a.asname else a.name.split(".")[0]) for a in node.names}
    module = "." * node.level + (node.module or "")
    return {(a.asname or a.name): f"{module}.{a.name}" for a in node.names}


def chapter_names(nb) -> dict[str, str | None]:
    """The names the course chapter binds at top level: {name: its import target, or None}.

    The exercise functions are the learner's, though the check cells rebind them
    (``fn = checks.check_fn(fn)`` hands the rest of the chapter the function it goes on with).
    """
    names: dict[str, str | None] = {}
    exercise_functions: set[str] = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = _parse(_python(cell.source))
        except SyntaxError:
            continue
        for node in tree.body:
            if "NotImplementedError" in cell.source and isinstance(node, ast.FunctionDef):
                exercise_functions.add(node.name)  # an exercise stub: the learner's to define
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update(_import_targets(node))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names[node.name] = None
            else:
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        names.setdefault(sub.id, None)
    return {name: target for name, target in names.items() if name not in exercise_functions}


def learner_code(source: str, exercise: str, protected: dict[str, str | None], own: set[str],
                 given: str = "") -> tuple[str, list[str]]:
    """The imports and function definitions of a learner's cell, and what was left out of it and why.

    `protected` are the chapter's own names (an import may bind one only to what the chapter
    binds it to; a definition not at all); `own` are the exercise functions, which no import may
    bind; `given` is the code the chapter's stub cell provides, which is left out without a note.
    """
    provided = {ast.dump(node) for node in _parse(given).body}
    python = _python(source)
    try:
        tree = _parse(python)
    except SyntaxError as err:
        return "", [f"{exercise}: the cell has a syntax error (line {err.lineno}: {err.msg}), so none of it was graded"]
    kept, futures, left_out = [], [], []

    def leave_out(node: ast.stmt, why: str) -> None:
        text = (ast.get_source_segment(python, node) or "").strip().splitlines()[0]
        left_out.append(f"{exercise}: left out line {node.lineno} `{text[:70]}` ({why})")

    for node in tree.body:
        segment = ast.get_source_segment(python, node, padded=True)
        if ast.dump(node) in provided:
            continue  # the chapter runs its own copy of it
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound = _import_targets(node)
            if bad := sorted(n for n, target in bound.items() if n in own or (n in protected and protected[n] != target)):
                leave_out(node, f"it would rebind {', '.join(bad)}")
            elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
                futures.append(segment)
            else:
                kept.append(segment)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name in protected:
                leave_out(node, f"it would rebind the chapter's {node.name!r}")
            elif _runs_code_when_defined(node):
                leave_out(node, "decorators and computed default values or annotations run code when defined")
            else:
                kept.append(segment)
        else:
            leave_out(node, "only imports and function definitions are graded")
    return "\n\n".join(futures + kept), left_out


def graded_notebook(course_nb, exercises: list[Exercise], stubs: dict[str, int], submission_nb,
                    report: Report) -> object:
    """The course's chapter with each exercise stub replaced by the learner's code for it."""
    nb = copy.deepcopy(course_nb)
    protected = chapter_names(course_nb)
    own = set(stubs)
    sources: dict[int, list[str]] = {}
    number_of = {fn: e.number for e in exercises for fn in e.functions}
    cells = [c for c in submission_nb.cells if c.cell_type == "code"]
    for function, stub_index in stubs.items():
        defining = [c for c in cells if function in _defined_functions(c.source)]
        label = f"Exercise {number_of.get(function, '?')}"
        if not defining:
            report.left_out.append(f"{label}: the submission defines no function {function}, so it is graded as not done")
            continue
        given = _given_code(course_nb.cells[stub_index].source)
        code, left_out = learner_code(defining[-1].source, label, protected, own, given)
        if function not in _defined_functions(code):
            report.left_out.extend(left_out)
            report.left_out.append(f"{label}: no gradable definition of {function} was found, so it is graded as not done")
            continue
        if code not in sources.setdefault(stub_index, []):
            sources[stub_index].append(code)
            report.left_out.extend(left_out)
    for stub_index, codes in sources.items():
        nb.cells[stub_index].source = "\n\n".join([_given_code(course_nb.cells[stub_index].source), *codes]).strip()
    return nb


def _given_code(stub_source: str) -> str:
    """What a stub cell gives the learner besides the stubs (constants, imports), as the chapter has it."""
    tree = _parse(stub_source)
    return "\n\n".join(ast.get_source_segment(stub_source, node, padded=True) for node in tree.body
                        if not isinstance(node, ast.FunctionDef))


# ------------------------------------------------------------------ running under nbval
def failure_message(text: str) -> str:
    """The one line a learner needs from nbval's failure report: the checker's ✗ line, else the error line."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("✗"):  # a checker's message; the exercise is named already
            return _CHECKER_PREFIX.sub("", line.lstrip("✗ ").strip(), count=1)
    for line in lines:  # a checker's message raised as something else (its exception class was replaced)
        if UNTRUSTED in line:
            return _CHECKER_PREFIX.sub("", line.split(": ", 1)[-1], count=1)
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt|Exit|Timeout)\b", line) or "timed out" in line.lower():
            return line
    return lines[-1] if lines else "failed"


# The nbval run's own plugin, written next to the graded notebook as its conftest.py: a file of
# its own, so that pytest's process does not import utils (and torch) just to note outcomes.
_RESULTS_PLUGIN = f"""# written by utils.grade: note every nbval cell's outcome, one JSON line each
import json, os, time
from queue import Empty

_CELL_OF = {{}}  # nbval item -> the id of its cell


def pytest_configure(config):
    # nbval waits out the whole cell timeout for a reply even when the kernel has died (a learner's os._exit, the
    # memory killer): poll it every second instead, and fail the cell as soon as the kernel is gone
    from nbval.kernel import RunningKernel

    wait = RunningKernel.await_reply

    def await_reply(self, msg_id, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                return wait(self, msg_id, timeout=step)
            except Empty:
                if not self.is_alive():
                    raise RuntimeError("Kernel died while running this cell") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    RunningKernel.await_reply = await_reply


def pytest_collection_modifyitems(items):
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is not None:
            _CELL_OF[item.nodeid] = cell.get("id", item.nodeid)


def pytest_runtest_logreport(report):
    if report.nodeid not in _CELL_OF or (report.when != "call" and not report.failed):
        return
    with open(os.environ["{RESULTS_ENV}"], "a", encoding="utf-8") as out:
        out.write(json.dumps({{"cell": _CELL_OF[report.nodeid], "passed": not report.failed,
                              "text": report.longreprtext if report.failed else ""}}) + "\\n")
"""


def _kill_tree(process: subprocess.Popen) -> None:
    import psutil

    try:
        parent = psutil.Process(process.pid)
        family = parent.children(recursive=True) + [parent]  # the kernel runs in a session of its own
    except psutil.Error:
        family = []
    for proc in family:
        try:
            proc.kill()
        except psutil.Error:
            pass
    process.wait()


def run_graded(nb, timeout: int) -> tuple[dict[str, tuple[bool, str]], str | None]:
    """Run a graded notebook under nbval in a subprocess; {cell id: (passed, message)} and why it stopped early."""
    import nbformat

    with tempfile.TemporaryDirectory(prefix="grade-") as folder:
        notebook, results = Path(folder) / "graded.ipynb", Path(folder) / "results.jsonl"
        nbformat.write(nb, str(notebook))
        (Path(folder) / "conftest.py").write_text(_RESULTS_PLUGIN, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in ("JPY_SESSION_NAME", "PYTEST_ADDOPTS")}
        env.update({RESULTS_ENV: str(results), "CIRCUITS_STRICT_CHECKS": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        # -c os.devnull: no configuration file, so no course's or class folder's pytest settings apply
        command = [sys.executable, "-m", "pytest", str(notebook), "--nbval-lax", f"--nbval-cell-timeout={timeout}",
                   "-q", "--tb=short", "-p", "no:cacheprovider", "--rootdir", folder,
                   "-c", os.devnull]
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        stopped = None
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            output, stopped = "", f"stopped at the {timeout} s timeout"
        outcomes: dict[str, tuple[bool, str]] = {}
        if results.exists():
            for line in results.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if row["cell"] not in outcomes or not row["passed"]:
                    outcomes[row["cell"]] = (row["passed"], failure_message(row["text"]) if row["text"] else "")
        if not outcomes and stopped is None:
            tail = " ".join(output.strip().splitlines()[-3:])
            stopped = f"nbval ran no cell (pytest exit code {process.returncode}: {tail[:300]})"
        elif "Kernel died" in output or "DeadKernelError" in output:
            stopped = "the kernel died"
        return outcomes, stopped


def grade_notebook(path: Path, timeout: int = 600) -> Report:
    """Grade one submission against its course chapter; never raises for a learner's mistake."""
    start = time.perf_counter()
    path = Path(path)
    report = Report(path=str(path), learner=path.resolve().parent.name)
    try:
        submission = read_notebook(path)
        chapter = identify_chapter(path, submission)
    except NotGradable as err:
        report.error = str(err)
        return report
    report.chapter = chapter.stem
    course = read_notebook(chapter)
    report.exercises, stubs = course_exercises(course)
    outcomes, stopped = run_graded(graded_notebook(course, report.exercises, stubs, submission, report), timeout)
    if not outcomes and stopped:
        report.error = f"{path}: {stopped}"
    untrusted_after = None
    for exercise in report.exercises:
        passed, message = outcomes.get(exercise.cell_id, (False, f"not run ({stopped})" if stopped else "not run"))
        if untrusted_after:
            passed, message = False, f"not trusted: the course's code was changed in {untrusted_after}"
        elif UNTRUSTED in message:
            untrusted_after = f"Exercise {exercise.number}"
        exercise.passed, exercise.message = passed, message
    check_ids = {e.cell_id for e in report.exercises}
    for index, cell in enumerate(course.cells):
        passed, message = outcomes.get(cell.get("id", ""), (True, ""))
        if cell.get("id") not in check_ids and not passed:
            first = (cell.source.strip().splitlines() or [""])[0]
            report.other_errors.append(f"cell {index} ({first[:60]}): {message}")
    if stopped and outcomes:
        report.other_errors.append(f"the run was {stopped}; exercises after that point were not run")
    report.seconds = time.perf_counter() - start
    return report


def grade_all(paths: list[Path], jobs: int = 1, timeout: int = 600, progress=None) -> list[Report]:
    """Grade every submission, `jobs` at a time; reports in the order of `paths`.

    `progress(done, path, report)` is called as each one finishes.
    """
    done = 0

    def grade(path: Path) -> Report:
        nonlocal done
        report = grade_notebook(path, timeout)
        done += 1
        if progress:
            progress(done, path, report)
        return report

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(grade, paths))


# ------------------------------------------------------------------ reports
def format_report(reports: list[Report]) -> str:
    lines = []
    for r in reports:
        lines.append(f"{r.path}" + (f"  ({r.learner}, chapter {r.chapter})" if r.chapter else ""))
        if r.error:
            lines.append(f"  error: {r.error}")
            continue
        for e in r.exercises:
            lines.append(f"  {'✓' if e.passed else '✗'} {e.name}" + ("" if e.passed else f": {e.message}"))
        for note in r.left_out:
            lines.append(f"  - {note}")
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


def write_gradebook(reports: list[Report], path: Path) -> None:
    """One row per submission: learner, notebook, chapter, score, maximum, one 0/1 column per exercise, error."""
    numbers = sorted({e.number for r in reports for e in r.exercises},
                     key=lambda n: [int(part) if part.isdigit() else part for part in re.split(r"[. ]", n)])
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["learner", "notebook", "chapter", "score", "max", *numbers, "error"])
        for r in reports:
            passed = {e.number: int(e.passed) for e in r.exercises}
            writer.writerow([r.learner, r.path, r.chapter, r.score, len(r.exercises),
                             *(passed.get(n, "") for n in numbers), r.error or ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.grade", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, metavar="NOTEBOOK")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write a gradebook: one row per submission")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="grade N notebooks at once (default 1)")
    parser.add_argument("--timeout", type=int, default=600, metavar="SECONDS",
                        help="stop a notebook after this long and score what ran (default 600)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.timeout < 1:
        parser.error("--jobs and --timeout must be at least 1")

    def progress(done: int, path: Path, report: Report) -> None:
        verdict = report.error.split(": ", 1)[-1][:60] if report.error else f"{report.score}/{len(report.exercises)}"
        print(f"[{done}/{len(args.notebooks)}] {path}: {verdict}", file=sys.stderr, flush=True)

    reports = grade_all(args.notebooks, jobs=args.jobs, timeout=args.timeout, progress=progress)
    print(to_json(reports) if args.json else format_report(reports), flush=True)
    if args.csv:
        try:
            write_gradebook(reports, args.csv)
        except OSError as err:
            print(f"error: cannot write the gradebook {args.csv}: {err.strerror or err}", file=sys.stderr)
            return 2
        print(f"gradebook: {args.csv} ({len(reports)} rows)", file=sys.stderr)
    if any(r.error for r in reports):
        return 2
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
