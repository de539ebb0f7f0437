"""Build the learner notebooks in chapters/ from the reference notebooks in solutions/.

solutions/NN_name.ipynb is the single source; chapters/NN_name.ipynb is generated from it
and never edited by hand. A chapter has the same cells, with the same ids, except:

- in a code cell, every block between a line ``# BEGIN SOLUTION`` and a line
  ``# END SOLUTION`` (same indentation, inside a function body) becomes the two lines
  ``# YOUR CODE HERE`` and ``raise NotImplementedError("not implemented yet")``;
- cells tagged ``solution-only`` are left out;
- before every code cell that holds a solution block goes a markdown cell of its own that folds
  the solved cell away (``<details><summary>Solution</summary>``), unless the chapters are built
  with ``--no-solutions`` (for graded workshops).

Both trees are stored without outputs or execution counts, with the python3 kernelspec.

Usage (from the repository root)::

    python -m utils.notebooks          # strip solutions/ in place, regenerate chapters/
    python -m utils.notebooks --check  # list problems and exit 1 if anything is out of date
    python -m utils.notebooks --no-solutions --out DIR  # chapters without the solution folds, into DIR
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import nbformat
from nbformat import NotebookNode

from utils.tooling import REPO_ROOT
SOLUTIONS = "solutions"
CHAPTERS = "chapters"
NAME_PATTERN = re.compile(r"^\d{2}_[A-Za-z0-9_-]+\.ipynb$")

BEGIN_MARKER = "# BEGIN SOLUTION"
END_MARKER = "# END SOLUTION"
STUB_LINES = ("# YOUR CODE HERE", 'raise NotImplementedError("not implemented yet")')
SOLUTION_ONLY_TAG = "solution-only"
SOLUTION_FOLD_TAG = "solution-fold"
SOLUTION_SUMMARY = "Solution (try the hints first)"
# Anything that looks like a marker but is not spelled exactly like one is an error, not code.
_MARKER_LIKE = re.compile(r"^\s*#\s*(BEGIN|END)[\s_-]*SOLUTION", re.IGNORECASE)

# INSTRUCTORS.md's table of the mistakes each checker names is generated from the exercise specs
CATALOGUE_FILE = "INSTRUCTORS.md"
_CATALOGUE = re.compile(r"(<!-- mistakes catalogue: generated[^\n]*-->\n)(.*?)(<!-- end of the mistakes catalogue -->)",
                        re.DOTALL)

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
LANGUAGE_INFO = {"name": "python"}
# Per-cell metadata that records a run rather than content (nbclient/JupyterLab timing).
_RUN_METADATA = ("execution", "ExecuteTime")


class NotebookError(ValueError):
    """A notebook in solutions/ breaks the conventions (bad solution markers, invalid JSON...)."""


def replace_solution_blocks(source: str, where: str = "cell") -> str:
    """Replace each ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block of `source` with the stub.

    The two stub lines get the markers' indentation. `where` names the cell in error
    messages. Raises NotebookError for a marker at indentation 0, an unmatched or nested
    marker, markers at different indentations, a misspelt marker, or a block line
    indented less than its markers.
    """
    lines = source.split("\n")
    out: list[str] = []
    indent: str | None = None  # indentation of the open BEGIN marker, None outside a block
    begin_line = 0
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        lead = line[: len(line) - len(line.lstrip())]
        if stripped == BEGIN_MARKER:
            if indent is not None:
                raise NotebookError(f"{where}, line {number}: nested {BEGIN_MARKER!r} "
                                    f"(the block opened on line {begin_line} is not closed)")
            if not lead:
                raise NotebookError(f"{where}, line {number}: {BEGIN_MARKER!r} at indentation 0; "
                                    "solution markers must sit inside a function body")
            indent, begin_line = lead, number
        elif stripped == END_MARKER:
            if indent is None:
                raise NotebookError(f"{where}, line {number}: {END_MARKER!r} without a matching {BEGIN_MARKER!r}")
            if lead != indent:
                raise NotebookError(f"{where}, line {number}: {END_MARKER!r} is not at the indentation of "
                                    f"the {BEGIN_MARKER!r} on line {begin_line}")
            out.extend(indent + stub for stub in STUB_LINES)
            indent = None
        elif _MARKER_LIKE.match(line):
            raise NotebookError(f"{where}, line {number}: misspelt solution marker {stripped!r}; "
                                f"write exactly {BEGIN_MARKER!r} or {END_MARKER!r}")
        elif indent is None:
            out.append(line)
        elif stripped and not line.startswith(indent):
            raise NotebookError(f"{where}, line {number}: line inside the solution block opened on line "
                                f"{begin_line} is indented less than its markers")
    if indent is not None:
        raise NotebookError(f"{where}, line {begin_line}: {BEGIN_MARKER!r} without a matching {END_MARKER!r}")
    return "\n".join(out)


def has_stub(source: str) -> bool:
    """True if a code cell's source contains the generated stub (an unfilled exercise)."""
    lines = [line.strip() for line in source.split("\n")]
    return any(lines[i:i + 2] == list(STUB_LINES) for i in range(len(lines) - 1))


def _tags(cell: NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _fallback_id(name: str, index: int) -> str:
    """A deterministic cell id for notebooks saved before cell ids existed (nbformat < 4.5)."""
    return hashlib.sha1(f"{name}:{index}".encode()).hexdigest()[:8]


def clean(nb: NotebookNode, name: str = "<notebook>") -> NotebookNode:
    """Return a copy of `nb` as stored in the repo: no outputs, no execution counts, cell ids
    present, python3 kernelspec and language_info set. Does not touch solution markers."""
    nb = copy.deepcopy(nb)
    if nb.get("nbformat") != 4:
        raise NotebookError(f"{name}: expected nbformat 4, got {nb.get('nbformat')}")
    if nb.get("nbformat_minor", 0) < 5:
        nb.nbformat_minor = 5
    seen: set[str] = set()
    for index, cell in enumerate(nb.cells):
        if not cell.get("id") or cell.id in seen:
            cell.id = _fallback_id(name, index)
        seen.add(cell.id)
        for key in _RUN_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = dict(LANGUAGE_INFO)
    return nb


def solution_fold(cell: NotebookNode) -> NotebookNode:
    """The markdown cell that folds away the solved code cell `cell` (its id derives from the cell's)."""
    code = "\n".join(line for line in cell.source.split("\n") if line.strip() not in (BEGIN_MARKER, END_MARKER))
    fold = nbformat.v4.new_markdown_cell(f"<details><summary>{SOLUTION_SUMMARY}</summary>\n\n```python\n{code}\n```\n"
                                         "</details>")
    fold.id = hashlib.sha1(f"{cell.id}:solution".encode()).hexdigest()[:8]
    fold.metadata["tags"] = [SOLUTION_FOLD_TAG]
    return fold


def build_chapter(nb: NotebookNode, name: str = "<notebook>", solutions: bool = True) -> NotebookNode:
    """Return the learner chapter for the solutions notebook `nb` (which is not modified).

    Solution blocks become stubs, ``solution-only`` cells are dropped, everything else
    (markdown, cell ids, tags) is kept; the result is cleaned like the source. With
    `solutions`, each solved cell's code goes, folded, into a markdown cell just before its stub.
    Raises NotebookError naming `name` and the cell index for malformed markers.
    """
    nb = clean(nb, name)
    cells = []
    for index, cell in enumerate(nb.cells):
        if SOLUTION_ONLY_TAG in _tags(cell):
            continue
        if cell.cell_type == "code":
            solved = cell.source
            cell.source = replace_solution_blocks(solved, f"{name}, cell {index} (id {cell.id!r})")
            if solutions and cell.source != solved:
                cells.append(solution_fold(nbformat.from_dict({"id": cell.id, "source": solved})))
        cells.append(cell)
    nb.cells = cells
    return nb


def to_text(nb: NotebookNode) -> str:
    """Serialise `nb` exactly as nbformat.write does (indent=1, sorted keys, final newline)."""
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as err:
        raise NotebookError(f"invalid notebook: {err.message}") from None
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def _read(path: Path, root: Path) -> NotebookNode:
    try:
        return nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
    except Exception as err:  # unreadable JSON or notebook structure
        raise NotebookError(f"{_rel(path, root)}: cannot read notebook: {err}") from None


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def solution_paths(root: Path = REPO_ROOT) -> list[Path]:
    """The notebooks in root/solutions, sorted by name."""
    return sorted((root / SOLUTIONS).glob("*.ipynb"))


def chapter_paths(root: Path = REPO_ROOT) -> list[Path]:
    """The notebooks currently in root/chapters, sorted by name."""
    return sorted((root / CHAPTERS).glob("*.ipynb"))


def generated_files(root: Path = REPO_ROOT) -> tuple[dict[Path, str], dict[Path, str]]:
    """Return (cleaned solutions, generated chapters), each a map from path to file text.

    Raises NotebookError (one message per broken notebook) if any solutions notebook is broken.
    """
    solutions: dict[Path, str] = {}
    chapters: dict[Path, str] = {}
    errors: list[str] = []
    for path in solution_paths(root):
        name = _rel(path, root)
        try:
            nb = _read(path, root)
            solutions[path] = to_text(clean(nb, name))
            chapters[root / CHAPTERS / path.name] = to_text(build_chapter(nb, name))
        except NotebookError as err:
            errors.append(str(err) if str(err).startswith(name) else f"{name}: {err}")
    if errors:
        raise NotebookError("\n".join(errors))
    return solutions, chapters


def generated_chapters(root: Path = REPO_ROOT) -> dict[Path, str]:
    """Map each chapters/ path to the text that root/solutions generates for it."""
    return generated_files(root)[1]


def _stored_state_problems(path: Path, root: Path) -> list[str]:
    """Outputs, execution counts, kernelspec and cell-id problems of one stored notebook."""
    name = _rel(path, root)
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"{name}: cannot read notebook: {err}"]
    problems = []
    cells = raw.get("cells", [])
    with_outputs = [i for i, c in enumerate(cells) if c.get("outputs")]
    with_counts = [i for i, c in enumerate(cells) if c.get("execution_count") is not None]
    if with_outputs:
        problems.append(f"{name}: outputs stored in cells {with_outputs}")
    if with_counts:
        problems.append(f"{name}: execution counts stored in cells {with_counts}")
    if raw.get("metadata", {}).get("kernelspec", {}).get("name") != KERNELSPEC["name"]:
        problems.append(f"{name}: kernelspec is not {KERNELSPEC['name']!r}")
    ids = [c.get("id") for c in cells]
    if None in ids or len(set(ids)) != len(ids):
        problems.append(f"{name}: cell ids missing or duplicated")
    return problems


def _first_difference(actual: str, expected: str) -> int:
    """1-based number of the first line where two texts differ."""
    for number, (a, e) in enumerate(zip(actual.split("\n"), expected.split("\n")), start=1):
        if a != e:
            return number
    return min(actual.count("\n"), expected.count("\n")) + 1


def find_problems(root: Path = REPO_ROOT) -> list[str]:
    """Everything `--check` complains about in root/solutions and root/chapters ([] if all is well)."""
    problems: list[str] = []
    for path in solution_paths(root):
        if not NAME_PATTERN.match(path.name):
            problems.append(f"{_rel(path, root)}: name should look like NN_name.ipynb")
        problems += _stored_state_problems(path, root)
    try:
        expected = generated_chapters(root)
    except NotebookError as err:
        return problems + str(err).split("\n")
    for path in chapter_paths(root):
        problems += _stored_state_problems(path, root)
        if path not in expected:
            problems.append(f"{_rel(path, root)}: stale, there is no {SOLUTIONS}/{path.name}")
    catalogue = catalogue_file(root)
    if catalogue and catalogue[0].read_text(encoding="utf-8") != catalogue[1]:
        problems.append(f"{CATALOGUE_FILE}: the mistakes catalogue differs from what the exercise specs generate")
    for path, text in expected.items():
        if not path.exists():
            problems.append(f"{_rel(path, root)}: missing (generated from {SOLUTIONS}/{path.name})")
            continue
        actual = path.read_text(encoding="utf-8")
        if actual != text:
            problems.append(f"{_rel(path, root)}: differs from what {SOLUTIONS}/{path.name} generates "
                            f"(first at line {_first_difference(actual, text)})")
    return problems


def catalogue_file(root: Path) -> tuple[Path, str] | None:
    """(INSTRUCTORS.md, its text with the mistakes catalogue regenerated), or None without one."""
    path = root / CATALOGUE_FILE
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if not _CATALOGUE.search(text):
        return None
    from utils.checks import mistakes_catalogue  # imports torch: only where the catalogue exists

    return path, _CATALOGUE.sub(lambda m: m.group(1) + mistakes_catalogue() + m.group(3), text, count=1)


def _write_if_changed(path: Path, text: str) -> bool:
    data = text.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def sync(root: Path = REPO_ROOT) -> list[str]:
    """Strip root/solutions in place and regenerate root/chapters; return what changed.

    Nothing is written if any solutions notebook is broken (NotebookError). Files whose
    content is already right are not rewritten; chapters without a source are deleted.
    """
    solutions, chapters = generated_files(root)
    changed = [f"cleaned {_rel(p, root)}" for p, text in solutions.items() if _write_if_changed(p, text)]
    changed += [f"wrote {_rel(p, root)}" for p, text in chapters.items() if _write_if_changed(p, text)]
    catalogue = catalogue_file(root)
    if catalogue and _write_if_changed(*catalogue):
        changed.append(f"wrote the mistakes catalogue in {CATALOGUE_FILE}")
    for path in chapter_paths(root):
        if path not in chapters:
            path.unlink()
            changed.append(f"deleted stale {_rel(path, root)}")
    return changed


def write_without_solutions(root: Path, out: Path) -> int:
    """Write every chapter without its solution folds into `out`; return the exit status."""
    if out in ((root / CHAPTERS).resolve(), (root / SOLUTIONS).resolve()):
        print(f"error: --out must not be {_rel(out, root)}/, which the course keeps in sync", file=sys.stderr)
        return 1
    try:
        built = {out / path.name: to_text(build_chapter(_read(path, root), _rel(path, root), solutions=False))
                 for path in solution_paths(root)}
    except NotebookError as err:
        print(f"error, nothing written:\n{err}", file=sys.stderr)
        return 1
    for path, text in built.items():
        _write_if_changed(path, text)
    print(f"wrote {len(built)} chapters without solution folds to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m utils.notebooks", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 listing problems if chapters/ is out of date "
                             "or a notebook stores outputs or lacks the python3 kernelspec")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: %(default)s)")
    parser.add_argument("--no-solutions", action="store_true",
                        help="build the chapters without their solution folds (for graded workshops) into --out, "
                             "leaving chapters/ as it is")
    parser.add_argument("--out", type=Path, default=None,
                        help="with --no-solutions: the folder to write them to (default: <root>/build/chapters)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.no_solutions:
        return write_without_solutions(root, (args.out or root / "build" / CHAPTERS).resolve())
    if args.check:
        problems = find_problems(root)
        if problems:
            print("Notebook problems (run `python -m utils.notebooks` to fix generated files):", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
            return 1
        print(f"notebooks OK: {len(solution_paths(root))} in {SOLUTIONS}/, {len(chapter_paths(root))} in {CHAPTERS}/")
        return 0
    try:
        changed = sync(root)
    except NotebookError as err:
        print(f"error, nothing written:\n{err}", file=sys.stderr)
        return 1
    for line in changed:
        print(line)
    print(f"notebooks up to date ({len(changed)} file(s) changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
