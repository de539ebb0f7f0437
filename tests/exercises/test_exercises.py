"""Every exercise against its one spec: the notebook's heading, stub and check cell, its tiered
help, the mistakes its checker names, and the chapters' exercise standard (COURSE.md).

Chapters in ``STANDARD`` are held to the whole standard; the others (still to be rewritten)
only to the spec and heading agreement.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch

from utils import checks
from utils.tooling import notebooks
from utils.checks import CheckFailed

ROOT = Path(__file__).resolve().parents[2]
STANDARD = {0: 5, 1: 5, 2: 4, 3: 5, 4: 5, 5: 5, 6: 5, 7: 5, 8: 5, 10: 6}  # chapter -> least number of exercises; at least half of them analysis
HEADING = re.compile(r"^### Exercise (\d+)\.(\d+) — (.+?)\s*$", re.MULTILINE)
FOLD = re.compile(r"<details><summary>(.*?)</summary>(.*?)</details>", re.DOTALL)


def _solutions() -> dict[int, nbformat.NotebookNode]:
    return {int(p.name[:2]): nbformat.read(str(p), as_version=4) for p in notebooks.solution_paths(ROOT)}


SOLUTIONS = _solutions()


def _exercise_cells(chapter: int) -> dict[str, tuple[str, str, str]]:
    """{number: (heading cell's source, the solved code cell's source, the check cell's source)}."""
    found, cells = {}, SOLUTIONS[chapter].cells
    for i, cell in enumerate(cells):
        if cell.cell_type != "markdown" or not (m := HEADING.search(cell.source)):
            continue
        number = f"{m.group(1)}.{m.group(2)}"
        code = next(c for c in cells[i + 1:] if c.cell_type == "code")
        after = cells[cells.index(code) + 1]
        found[number] = (cell.source, code.source, after.source if "check" in after.metadata.get("tags", []) else "")
    return found


def _solution_lines(code: str) -> list[str]:
    """The solution block's lines, without spaces, long enough to be code rather than a word."""
    block = code.split(notebooks.BEGIN_MARKER, 1)[-1].split(notebooks.END_MARKER, 1)[0]
    lines = [re.sub(r"\s+", "", line) for line in block.split("\n")]
    return [line for line in lines if len(line) >= 14 and not line.startswith("#")]


def _spec_id(spec) -> str:
    return spec.number


@pytest.mark.parametrize("spec", list(checks.EXERCISES.values()), ids=_spec_id)
def test_heading_stub_and_check_cell_agree_with_the_spec(spec):
    chapter = int(spec.number.split(".")[0])
    cells = _exercise_cells(chapter)
    assert spec.number in cells, f"no '### Exercise {spec.number} — {spec.title}' heading in chapter {chapter:02d}"
    heading, code, check = cells[spec.number]
    assert HEADING.search(heading).group(3) == spec.title, (HEADING.search(heading).group(3), spec.title)
    assert re.search(rf"^def {spec.function}\(", code, re.MULTILINE), f"the cell after the heading does not define {spec.function}"
    assert notebooks.BEGIN_MARKER in code, "the exercise's code cell has no solution block"
    # the check hands back the function the rest of the chapter uses: the learner's, or the course's stand-in
    assert check.strip() == f"{spec.function} = checks.check_{spec.function}({spec.function})", check
    assert getattr(checks, f"check_{spec.function}") is spec.check


def test_every_heading_has_a_spec():
    for chapter in SOLUTIONS:
        for number in _exercise_cells(chapter):
            assert number in checks.EXERCISES, f"chapter {chapter:02d}: Exercise {number} has no spec in utils/checks/ch{chapter:02d}.py"


@pytest.mark.parametrize("chapter", sorted(STANDARD))
def test_chapter_meets_the_exercise_standard(chapter):
    specs = [s for s in checks.EXERCISES.values() if int(s.number.split(".")[0]) == chapter]
    analysis = [s.number for s in specs if s.kind == "analysis"]
    assert len(specs) >= STANDARD[chapter], f"chapter {chapter:02d} has {len(specs)} exercises"
    assert 2 * len(analysis) >= len(specs), f"chapter {chapter:02d}: only {analysis} of {len(specs)} are analysis"
    assert all(s.kind in ("analysis", "implementation") for s in specs)
    for number, (heading, code, _) in _exercise_cells(chapter).items():
        assert re.search(r"Difficulty: [🔴⚪]{3}\s+Importance: [🔵⚪]{3}", heading), f"{number}: no rating"
        folds = {summary.strip(): body for summary, body in FOLD.findall(heading)}
        assert list(folds)[:2] == ["Hint 1", "Hint 2"], f"{number}: the folds are {list(folds)}"
        first = folds["Hint 1"]
        assert "```" not in first and not re.search(r"`[^`]*[(\[@=][^`]*`", first), f"{number}: Hint 1 holds code: {first}"
        hints = re.sub(r"\s+", "", folds["Hint 1"] + folds["Hint 2"])
        for line in _solution_lines(code):
            assert line not in hints, f"{number}: a hint spells out the solution's line {line!r}"


@pytest.mark.parametrize("chapter", sorted(STANDARD))
def test_chapter_asks_for_a_prediction_and_prints_it_beside_the_measurement(chapter):
    cells = SOLUTIONS[chapter].cells
    asked = [i for i, c in enumerate(cells) if "prediction" in c.metadata.get("tags", [])]
    assert asked, f"chapter {chapter:02d}: no cell tagged 'prediction'"
    for i in asked:
        names = re.findall(r"^(\w+)\s*=", cells[i].source, re.MULTILINE)
        assert names, f"chapter {chapter:02d}: the prediction cell assigns no variable"
        later = "\n".join(c.source for c in cells[i + 1:] if c.cell_type == "code")
        assert all(re.search(rf"against_guess\(\s*{name}\b", later) for name in names), \
            f"chapter {chapter:02d}: a guess in {names} is never printed beside its measurement"


@pytest.mark.parametrize("chapter", sorted(STANDARD))
def test_chapter_states_claims_with_the_claim_helper(chapter):
    for cell in SOLUTIONS[chapter].cells:
        if cell.cell_type == "code":
            assert not re.search(r"^assert ", cell.source, re.MULTILINE), \
                f"chapter {chapter:02d}: a bare assert in a lecture cell; use claims.claim: {cell.source[:120]}"


def _specs_with_mistakes():
    return [pytest.param(spec, m, id=f"{spec.number}-{i}") for spec in checks.EXERCISES.values()
            for i, m in enumerate(spec.mistakes)]


@pytest.mark.parametrize("spec, mistake", _specs_with_mistakes())
def test_each_named_mistake_is_diagnosed(spec, mistake):
    torch.manual_seed(0)
    with pytest.raises(CheckFailed) as failure:
        spec.check(mistake.gives)
    message = str(failure.value)
    assert f"This looks like {mistake.looks_like}:" in message, message
    assert spec.label in message and "\n" not in message and len(message) < 700, message


@pytest.mark.parametrize("chapter", sorted(STANDARD))
def test_every_exercise_of_a_rewritten_chapter_names_at_least_two_mistakes(chapter):
    for spec in checks.EXERCISES.values():
        if int(spec.number.split(".")[0]) == chapter:
            assert len(spec.mistakes) >= 2, f"Exercise {spec.number} names {len(spec.mistakes)} mistakes"
            assert spec.hint, f"Exercise {spec.number} has no hint for its messages"


@pytest.mark.parametrize("spec", list(checks.EXERCISES.values()), ids=_spec_id)
def test_no_message_spells_out_the_solution(spec):
    chapter = int(spec.number.split(".")[0])
    code = _exercise_cells(chapter)[spec.number][1]
    said = re.sub(r"\s+", "", " ".join([spec.hint] + [f"{m.looks_like} {m.advice}" for m in spec.mistakes]))
    for line in _solution_lines(code):
        assert line not in said, f"Exercise {spec.number}: a message spells out the solution's line {line!r}"


def test_the_chapters_fold_each_solution_and_the_workshop_build_leaves_them_out(tmp_path):
    chapter = nbformat.read(str(ROOT / "chapters" / "03_qk_ov.ipynb"), as_version=4)
    folds = [c for c in chapter.cells if notebooks.SOLUTION_FOLD_TAG in c.metadata.get("tags", [])]
    stubs = [c for c in chapter.cells if notebooks.has_stub(c.source)]
    assert folds and len(folds) == len(stubs)
    for fold in folds:
        after = chapter.cells[chapter.cells.index(fold) + 1]
        assert notebooks.has_stub(after.source) and "NotImplementedError" not in fold.source
    assert notebooks.main(["--no-solutions", "--out", str(tmp_path)]) == 0
    bare = nbformat.read(str(tmp_path / "03_qk_ov.ipynb"), as_version=4)
    assert not [c for c in bare.cells if notebooks.SOLUTION_FOLD_TAG in c.metadata.get("tags", [])]
    assert len(bare.cells) == len(chapter.cells) - len(folds)
    assert notebooks.main(["--no-solutions", "--out", str(ROOT / "chapters")]) == 1


def _chapter_table(text: str) -> dict[int, list[str]]:
    """The rows of a Markdown table whose first cell names a chapter ("00 Tour" or a link to it), by chapter."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and (m := re.match(r"\[?(\d\d) ", cells[0])):
            rows[int(m.group(1))] = cells
    return rows


def _minutes(text: str) -> int:
    hours = re.search(r"(\d+) h", text)
    return (int(hours.group(1)) * 60 if hours else 0) + int(re.search(r"(\d+) min", text).group(1))


def test_instructors_table_and_the_readme_map_agree_with_the_chapters_and_the_specs():
    """The figures INSTRUCTORS.md and the README repeat come from one place each: an exercise's rating from its
    heading, a chapter's time from its first cell, the count from the specs, run times from the benchmark (stated
    in both files, which must agree)."""
    instructors = _chapter_table((ROOT / "INSTRUCTORS.md").read_text())
    readme = _chapter_table((ROOT / "README.md").read_text())
    assert sorted(instructors) == sorted(readme) == sorted(SOLUTIONS)
    rating = re.compile(r"Difficulty: ([🔴⚪]{3})\s+Importance: ([🔵⚪]{3})")
    for chapter, nb in SOLUTIONS.items():
        stated = re.search(r"\*\*Time:\*\* about (\d+) minutes", nb.cells[0].source)
        _, learner, run, _, exercises = instructors[chapter]
        assert stated and learner == f"{stated.group(1)} min", (chapter, learner)
        assert readme[chapter][-2:] == [learner, run], (chapter, readme[chapter][-2:], learner, run)
        expected = []
        for number, (heading, _, _) in _exercise_cells(chapter).items():
            difficulty, importance = rating.search(heading).groups()
            expected.append(f"{number} {'🔴' * difficulty.count('🔴')} {'🔵' * importance.count('🔵')}")
        assert exercises.split(" · ") == expected, (chapter, exercises, expected)
    total = re.search(r"\| \*\*all\*\* \| \*\*(.+?)\*\* \|.*\| (\d+) exercises \|", (ROOT / "INSTRUCTORS.md").read_text())
    assert total, "no totals row in INSTRUCTORS.md"
    assert _minutes(total.group(1)) == sum(_minutes(row[1]) for row in instructors.values())
    assert int(total.group(2)) == len(checks.EXERCISES)
