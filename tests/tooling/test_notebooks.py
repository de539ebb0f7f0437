"""Tests of the notebook pipeline (utils/notebooks.py) and of the generated chapters.

The reference notebooks themselves are run separately with nbval:
    python -m pytest --nbval-lax --nbval-cell-timeout=600 solutions/
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from utils.tooling import notebooks as nbs

from tests.exercises.test_learners_view import LEARNERS_VIEW, _used_names

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STUB = ["    # YOUR CODE HERE", '    raise NotImplementedError("not implemented yet")']


def make_nb(*cells: NotebookNode) -> NotebookNode:
    return new_notebook(cells=list(cells))


def code(source: str, tags: tuple[str, ...] = (), cell_id: str | None = None) -> NotebookNode:
    cell = new_code_cell(source, metadata={"tags": list(tags)} if tags else {})
    if cell_id:
        cell.id = cell_id
    return cell


EXERCISE = "\n".join([
    "def add(a, b):",
    '    """Add two numbers."""',
    "    # BEGIN SOLUTION",
    "    total = a + b",
    "    return total",
    "    # END SOLUTION",
])


# ---------------------------------------------------------------- the repository itself

def test_repo_notebooks_in_sync() -> None:
    """Same as `python -m utils.notebooks --check`: chapters up to date, no outputs, python3 kernel."""
    problems = nbs.find_problems(nbs.REPO_ROOT)
    assert not problems, "run `python -m utils.notebooks`:\n" + "\n".join(problems)


# ---------------------------------------------------------------- the transformation

def test_marker_block_becomes_stub_at_its_indentation() -> None:
    assert nbs.replace_solution_blocks(EXERCISE).split("\n") == [
        "def add(a, b):", '    """Add two numbers."""', *STUB]


def test_nested_indentation_and_code_around_blocks_kept() -> None:
    source = "\n".join([
        "class Model:",
        "    def forward(self, x):",
        "        y = x * 2",
        "        # BEGIN SOLUTION",
        "        if y > 0:",
        "",
        "            return y",
        "        # END SOLUTION",
        "",
        "    def other(self):",
        "\t# BEGIN SOLUTION",
        "\treturn 1",
        "\t# END SOLUTION",
        "print('done')",
        "",
    ])
    assert nbs.replace_solution_blocks(source).split("\n") == [
        "class Model:",
        "    def forward(self, x):",
        "        y = x * 2",
        "        # YOUR CODE HERE",
        '        raise NotImplementedError("not implemented yet")',
        "",
        "    def other(self):",
        "\t# YOUR CODE HERE",
        '\traise NotImplementedError("not implemented yet")',
        "print('done')",
        "",
    ]


def test_build_chapter_drops_solution_only_cells_and_keeps_the_rest() -> None:
    source = make_nb(
        new_markdown_cell("See [the answer](../solutions/01_x.ipynb) in `solutions/`."),
        code(EXERCISE, cell_id="exercise"),
        code("assert add(1, 2) == 3", tags=("solution-only",), cell_id="secret"),
        code("check_add(add)", tags=("check",), cell_id="check"),
    )
    chapter = nbs.build_chapter(source, "solutions/01_x.ipynb", solutions=False)
    assert [c.id for c in chapter.cells] == [source.cells[0].id, "exercise", "check"]
    assert chapter.cells[0].source == source.cells[0].source
    assert chapter.cells[1].source.split("\n")[2:] == STUB
    assert chapter.cells[2].metadata.tags == ["check"]
    assert nbs.has_stub(chapter.cells[1].source) and not nbs.has_stub(source.cells[1].source)
    assert "BEGIN SOLUTION" in source.cells[1].source  # the input is not modified
    folded = nbs.build_chapter(source, "solutions/01_x.ipynb")  # by default the solution is folded away
    fold = folded.cells[1]
    assert [c.id for c in folded.cells] == [source.cells[0].id, fold.id, "exercise", "check"]
    assert fold.cell_type == "markdown" and fold.metadata.tags == [nbs.SOLUTION_FOLD_TAG]
    assert "<details>" in fold.source and "    total = a + b\n    return total" in fold.source
    assert "SOLUTION" not in fold.source.replace(nbs.SOLUTION_SUMMARY, "")


def test_outputs_cleared_and_metadata_set() -> None:
    cell = code("print(1)")
    cell.outputs = [new_output("stream", name="stdout", text="1\n")]
    cell.execution_count = 7
    cell.metadata["execution"] = {"iopub.status.busy": "2024-01-01T00:00:00Z"}
    source = make_nb(cell)
    source.metadata = {"kernelspec": {"name": "other", "display_name": "x"}, "language_info": {"version": "3.11"}}
    for nb in (nbs.clean(source), nbs.build_chapter(source)):
        assert nb.cells[0].outputs == [] and nb.cells[0].execution_count is None
        assert "execution" not in nb.cells[0].metadata
        assert nb.metadata.kernelspec == nbs.KERNELSPEC
        assert nb.metadata.language_info == {"name": "python"}
    text = nbs.to_text(nbs.build_chapter(source))
    assert text.endswith("}\n") and text.startswith('{\n "cells": [\n  {\n')


def test_transformation_is_idempotent() -> None:
    source = make_nb(code(EXERCISE), code("x = 1", tags=("solution-only",)))
    chapter = nbs.build_chapter(source)
    assert nbs.to_text(nbs.build_chapter(chapter)) == nbs.to_text(chapter)
    assert nbs.to_text(nbs.build_chapter(source)) == nbs.to_text(chapter)


@pytest.mark.parametrize(("source", "message"), [
    ("def f():\n    pass\n# BEGIN SOLUTION\nx = 1\n# END SOLUTION", "indentation 0"),
    ("def f():\n    # BEGIN SOLUTION\n    return 1", "without a matching '# END SOLUTION'"),
    ("def f():\n    return 1\n    # END SOLUTION", "without a matching '# BEGIN SOLUTION'"),
    ("def f():\n    # BEGIN SOLUTION\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n    # END SOLUTION",
     "nested"),
    ("def f():\n    # BEGIN SOLUTION\n    return 1\n  # END SOLUTION", "not at the indentation"),
    ("def f():\n    # BEGIN SOLUTION\n    x = 1\nreturn 1\n    # END SOLUTION", "indented less"),
    ("def f():\n    #BEGIN SOLUTION\n    return 1\n    # END SOLUTION", "misspelt"),
])
def test_bad_markers_are_errors_naming_notebook_and_cell(source: str, message: str) -> None:
    nb = make_nb(new_markdown_cell("# Title"), code(source, cell_id="bad-cell"))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        nbs.build_chapter(nb, "solutions/03_broken.ipynb")
    assert "solutions/03_broken.ipynb, cell 1 (id 'bad-cell')" in str(info.value)


def test_markers_in_solution_only_cells_and_markdown_are_ignored() -> None:
    nb = make_nb(new_markdown_cell("# BEGIN SOLUTION"), code("# BEGIN SOLUTION", tags=("solution-only",)))
    assert [c.cell_type for c in nbs.build_chapter(nb).cells] == ["markdown"]


# ---------------------------------------------------------------- sync and check on a tmp tree

def write_source_tree(root: Path) -> None:
    (root / "solutions").mkdir()
    nb = make_nb(new_markdown_cell("# Chapter 1"), code(EXERCISE), code("check(add)", tags=("check",)),
                 code("print('reference only')", tags=("solution-only",)))
    nb.cells[1].outputs = [new_output("stream", name="stdout", text="stale output\n")]
    nb.cells[1].execution_count = 3
    nbformat.write(nb, root / "solutions" / "01_first.ipynb")
    nbformat.write(make_nb(code("x = 1")), root / "solutions" / "02_second.ipynb")


def test_sync_then_check_passes_and_is_deterministic(tmp_path: Path) -> None:
    write_source_tree(tmp_path)
    assert nbs.find_problems(tmp_path)  # outputs in solutions, chapters missing
    assert nbs.sync(tmp_path)
    assert nbs.find_problems(tmp_path) == []
    files = sorted(tmp_path.rglob("*.ipynb"))
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "chapters/01_first.ipynb", "chapters/02_second.ipynb", "solutions/01_first.ipynb", "solutions/02_second.ipynb"]
    before = {p: p.read_bytes() for p in files}
    assert nbs.sync(tmp_path) == []
    assert {p: p.read_bytes() for p in files} == before
    chapter = nbformat.read(tmp_path / "chapters" / "01_first.ipynb", as_version=4)
    assert len(chapter.cells) == 4 and nbs.has_stub(chapter.cells[2].source)
    assert chapter.cells[2].id == nbformat.read(tmp_path / "solutions" / "01_first.ipynb", as_version=4).cells[1].id


def test_check_reports_drift_outputs_kernelspec_and_stale_chapters(tmp_path: Path) -> None:
    write_source_tree(tmp_path)
    nbs.sync(tmp_path)
    chapter_path = tmp_path / "chapters" / "01_first.ipynb"
    chapter = nbformat.read(chapter_path, as_version=4)
    chapter.cells[2].source = chapter.cells[2].source.replace("# YOUR CODE HERE", "return a + b")
    nbformat.write(chapter, chapter_path)
    solution_path = tmp_path / "solutions" / "02_second.ipynb"
    solution = nbformat.read(solution_path, as_version=4)
    solution.cells[0].outputs = [new_output("execute_result", data={"text/plain": "1"}, execution_count=1)]
    del solution.metadata["kernelspec"]
    nbformat.write(solution, solution_path)
    nbformat.write(make_nb(code("y = 2")), tmp_path / "chapters" / "09_orphan.ipynb")

    problems = "\n".join(nbs.find_problems(tmp_path))
    assert "chapters/01_first.ipynb: differs from what solutions/01_first.ipynb generates" in problems
    assert "solutions/02_second.ipynb: outputs stored in cells [0]" in problems
    assert "solutions/02_second.ipynb: kernelspec is not 'python3'" in problems
    assert "chapters/09_orphan.ipynb: stale" in problems
    assert "chapters/02_second.ipynb" not in problems  # unaffected by outputs in its source

    nbs.sync(tmp_path)
    assert nbs.find_problems(tmp_path) == []
    assert not (tmp_path / "chapters" / "09_orphan.ipynb").exists()


def test_sync_writes_nothing_when_a_notebook_is_broken(tmp_path: Path) -> None:
    write_source_tree(tmp_path)
    nbformat.write(make_nb(code("# BEGIN SOLUTION\nx = 1\n# END SOLUTION")), tmp_path / "solutions" / "03_bad.ipynb")
    with pytest.raises(ValueError, match=r"solutions/03_bad\.ipynb, cell 0"):
        nbs.sync(tmp_path)
    assert not (tmp_path / "chapters").exists()
    assert any("03_bad" in p for p in nbs.find_problems(tmp_path))


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_source_tree(tmp_path)
    failed = subprocess.run([sys.executable, "-m", "utils.notebooks", "--check", "--root", str(tmp_path)],
                            capture_output=True, text=True, cwd=nbs.REPO_ROOT)
    assert failed.returncode == 1 and "chapters/01_first.ipynb: missing" in failed.stderr
    assert nbs.main(["--root", str(tmp_path)]) == 0
    assert "wrote chapters/01_first.ipynb" in capsys.readouterr().out
    assert nbs.main(["--check", "--root", str(tmp_path)]) == 0
    nbformat.write(make_nb(code("# BEGIN SOLUTION")), tmp_path / "solutions" / "03_bad.ipynb")
    assert nbs.main(["--root", str(tmp_path)]) == 1
    assert "solutions/03_bad.ipynb, cell 0" in capsys.readouterr().err


# ---------------------------------------------------------------- executing the chapters



SOLUTION_PATHS = nbs.solution_paths(nbs.REPO_ROOT)
REPORT = "# which function each exercise's name holds after its check, and how often later cells called it"
STRICT_CHECK = "strict-check"  # the tag of the appended cells that check the unsolved half's solutions


def half_solved(nb: NotebookNode, chapter: int) -> tuple[NotebookNode, dict[str, bool]]:
    """A learner's chapter `chapter` with every other exercise solved (the solutions notebook's code) and the
    others left as stubs, instrumented: before each check cell the learner's function is noted; after it, which
    function the check handed back (the learner's or the course's stand-in), wrapped so that calls are counted.
    Returns it and {exercise function: solved}."""
    from utils import checks

    specs = [s for s in checks.EXERCISES.values() if int(s.number.split(".")[0]) == chapter]
    solved = {s.function: (i + chapter) % 2 == 1 for i, s in enumerate(specs)}
    numbers = {s.function: s.number for s in specs}
    cells = [code("import functools as _functools\n_noted, _bound, _calls = {}, {}, {}\n\n"
                  "def _counted(fn, name):\n    @_functools.wraps(fn)\n    def counted(*args, **kwargs):\n"
                  "        _calls[name] = _calls.get(name, 0) + 1\n        return fn(*args, **kwargs)\n    return counted")]
    for index, cell in enumerate(nb.cells):
        if nbs.SOLUTION_ONLY_TAG in cell.metadata.get("tags", []):
            continue
        cell = nbformat.from_dict(dict(cell))
        if cell.cell_type == "code" and nbs.BEGIN_MARKER in cell.source:
            defined = re.findall(r"^def (\w+)\(", cell.source, re.MULTILINE)
            if not any(solved.get(name) for name in defined):
                cell.source = nbs.replace_solution_blocks(cell.source, f"chapter {chapter:02d}, cell {index}")
        tags = cell.metadata.get("tags", [])
        checked = [name for name in solved if "check" in tags and f"check_{name}(" in cell.source]
        for name in checked:
            cells.append(code(f"_noted[{name!r}] = {name}"))
        cells.append(cell)
        for name in checked:
            cells.append(code(f"_bound[{name!r}] = ('theirs' if {name} is _noted[{name!r}] else 'stand-in' if {name} "
                              f"is checks.EXERCISES[{numbers[name]!r}].stand_in else repr({name}))\n"
                              f"{name} = _counted({name}, {name!r})"))
    cells.append(code(f"{REPORT}\nimport json as _json\nprint(_json.dumps({{'bound': _bound, 'calls': _calls}}))"))
    # then the other half's solutions, each checked as nbval and the grader check it (a failed check fails its cell):
    # with the first half's checks above, every exercise's solution passes its check on these models
    cells.append(code("import os as _os\n_os.environ['CIRCUITS_STRICT_CHECKS'] = '1'"))
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and nbs.BEGIN_MARKER in cell.source:
            defined = re.findall(r"^def (\w+)\(", cell.source, re.MULTILINE)
            unsolved = [name for name in defined if solved.get(name) is False]
            if unsolved:
                cells.append(code(cell.source))
                cells += [code(f"{name} = checks.check_{name}({name})", tags=[STRICT_CHECK]) for name in unsolved]
    return make_nb(*cells), solved


@pytest.mark.slow
@pytest.mark.parametrize("path", SOLUTION_PATHS, ids=lambda p: p.name)
def test_a_learner_who_solved_every_other_exercise_runs_to_the_end_on_their_own_functions(path, monkeypatch):
    """Run All as a learner in JupyterLab would (a failed check prints and goes on), with every other exercise
    solved: no cell fails (so every claim of the chapter holds); each solved exercise's check hands back the learner's
    function, each unsolved one's the course's stand-in ("not implemented yet"); and the later cells that use the
    name really call what was handed back (the calls are counted). Then the unsolved half's solutions, checked as
    nbval and the grader do: with the first half, every exercise's solution passes its check."""
    from nbclient import NotebookClient

    chapter = int(path.name[:2])
    nb, solved = half_solved(nbformat.read(path, as_version=4), chapter)
    monkeypatch.setenv("CIRCUITS_STRICT_CHECKS", "0")  # the kernel runs as under JupyterLab
    # 150 s: the slowest cell (chapter 01's training run) takes under a minute
    NotebookClient(nb, kernel_name="python3", allow_errors=True, timeout=150,
                   resources={"metadata": {"path": str(path.parent)}}).execute()

    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            assert out.output_type != "error", (f"{path.name}: cell {index} raised {out.ename}: {out.evalue}\n"
                                                + ANSI.sub("", "\n".join(out.traceback))[-2000:] + f"\n{cell.source}")
    printed = {i: ANSI.sub("", "".join(o.get("text", "") for o in c.get("outputs", []))) for i, c in enumerate(nb.cells)}
    [reported] = [i for i, c in enumerate(nb.cells) if c.source.startswith(REPORT)]
    report = json.loads(printed[reported])
    later_uses = {}
    for name, is_solved in solved.items():
        [at] = [i for i, c in enumerate(nb.cells) if "check" in c.metadata.get("tags", []) and f"check_{name}(" in c.source]
        if is_solved:
            assert "all checks passed" in printed[at], f"{path.name}: the solved {name} failed its check: {printed[at]}"
        else:
            assert "not implemented yet" in printed[at] and "in place of yours" in printed[at], printed[at]
        assert report["bound"][name] == ("theirs" if is_solved else "stand-in"), (name, report["bound"])
        uses = [c.source for c in nb.cells[at + 2:reported] if c.cell_type == "code" and name in _used_names([c.source])
                and "check" not in c.metadata.get("tags", [])]
        later_uses[name] = bool(uses)
        if uses:
            assert report["calls"].get(name, 0) > 0, f"{path.name}: later cells name {name} but never call it"
    if chapter in LEARNERS_VIEW:
        assert 2 * sum(later_uses.values()) >= len(later_uses), f"{path.name}: later cells use {later_uses}"
    strict = {i for i, c in enumerate(nb.cells) if STRICT_CHECK in c.metadata.get("tags", [])}
    checked = {name for name, is_solved in solved.items() if not is_solved
               if any(f"check_{name}(" in nb.cells[i].source and "all checks passed" in printed[i] for i in strict)}
    assert checked == {name for name, is_solved in solved.items() if not is_solved}, (path.name, checked)
