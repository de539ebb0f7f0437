"""Binder: the launch links in the README and binder/requirements.txt, both generated.

    python -m utils.binder          # rewrite binder/requirements.txt and the README's launch links
    python -m utils.binder --check  # list what is out of date and exit 1 (a test runs this)

The repository's address lives in one place, ``[project.urls] Repository`` in pyproject.toml;
every Binder link in the README is built from it. binder/requirements.txt is requirements.txt
with one change: torch comes from PyTorch's CPU wheel index, pinned with the ``+cpu`` local
version, so Binder installs no CUDA packages (and the course package itself is installed by
binder/postBuild).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path
from urllib.parse import quote

from utils.tooling import REPO_ROOT
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BADGE_IMAGE = "https://mybinder.org/badge_logo.svg"
# generated README blocks sit between these markers
_BLOCK = re.compile(r"(<!-- binder:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /binder:(?P=name) -->)", re.DOTALL)


def repository(root: Path = REPO_ROOT) -> str:
    """The repository's address from pyproject.toml, e.g. https://github.com/OWNER/NAME."""
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    url = meta["project"]["urls"]["Repository"].rstrip("/")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"pyproject.toml: [project.urls] Repository must be https://github.com/OWNER/NAME, got {url!r}")
    return url


def launch_url(path: str = "README.md", root: Path = REPO_ROOT) -> str:
    """The mybinder.org address that builds the repository and opens `path` in JupyterLab."""
    owner_name = repository(root).removeprefix("https://github.com/")
    return f"https://mybinder.org/v2/gh/{owner_name}/HEAD?urlpath={quote('lab/tree/' + path, safe='')}"


def binder_requirements(requirements: str) -> str:
    """binder/requirements.txt from requirements.txt: torch from the CPU index as +cpu, no `-e .`, no tests-only
    section (the block whose comment starts "# tests only", up to the next blank line)."""
    out = ["# Generated from ../requirements.txt by `python -m utils.binder`: do not edit by hand.",
           "# Same pins, except torch: the CPU-only build from PyTorch's own index (no CUDA packages).",
           f"--extra-index-url {CPU_INDEX}"]
    found_torch = tests_only = False
    for line in requirements.splitlines():
        stripped = line.strip()
        tests_only = stripped.startswith("# tests only") or (tests_only and stripped != "")
        if tests_only:
            continue
        if stripped.startswith("-e ") or stripped == "-e.":
            continue  # binder/postBuild installs the course package
        match = re.fullmatch(r"torch==([\w.]+)", stripped)
        if match:
            line, found_torch = f"torch=={match.group(1).split('+')[0]}+cpu", True
        out.append(line)
    if not found_torch:
        raise ValueError("requirements.txt has no exact `torch==VERSION` pin")
    return "\n".join(out).rstrip("\n") + "\n"


def chapter_title(path: Path) -> str:
    """The notebook's first Markdown heading ("Chapter 05 — ..."), or its file name."""
    import json

    for cell in json.loads(path.read_text()).get("cells", []):
        source = "".join(cell.get("source", []))
        if cell.get("cell_type") == "markdown" and source.startswith("# "):
            return source.splitlines()[0][2:].strip()
    return path.stem


def readme_blocks(root: Path = REPO_ROOT) -> dict[str, str]:
    """The generated README blocks: the launch badge, and one launch link per chapter."""
    chapters = sorted((root / "chapters").glob("[0-9][0-9]_*.ipynb"))
    links = [f"- [{chapter_title(p)}]({launch_url('chapters/' + p.name, root)})" for p in chapters]
    return {
        "badge": f"[![Launch on Binder]({BADGE_IMAGE})]({launch_url(root=root)})\n",
        "chapters": "\n".join(links) + "\n",
    }


def render_readme(text: str, root: Path = REPO_ROOT) -> str:
    """`text` (the README) with every generated block filled in; unknown block names are errors."""
    blocks = readme_blocks(root)

    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in blocks:
            raise ValueError(f"README.md: unknown generated block 'binder:{name}' (known: {sorted(blocks)})")
        return match.group(1) + blocks[name] + match.group(4)

    return _BLOCK.sub(fill, text)


def find_problems(root: Path = REPO_ROOT) -> list[str]:
    """What is out of date: binder/requirements.txt, the README's launch links."""
    problems = []
    expected = binder_requirements((root / "requirements.txt").read_text())
    path = root / "binder" / "requirements.txt"
    if not path.exists() or path.read_text() != expected:
        problems.append("binder/requirements.txt: does not match requirements.txt")
    readme = (root / "README.md").read_text()
    found = {m.group("name") for m in _BLOCK.finditer(readme)}
    for name in sorted(set(readme_blocks(root)) - found):
        problems.append(f"README.md: the generated block 'binder:{name}' is missing")
    if render_readme(readme, root) != readme:
        problems.append("README.md: the Binder links are out of date")
    return problems


def sync(root: Path = REPO_ROOT) -> list[str]:
    """Write binder/requirements.txt and the README's blocks; returns the files that changed."""
    changed = []
    targets = [(root / "binder" / "requirements.txt", binder_requirements((root / "requirements.txt").read_text())),
               (root / "README.md", render_readme((root / "README.md").read_text(), root))]
    for path, text in targets:
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path.relative_to(root).as_posix())
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.binder", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report what is out of date, change nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = find_problems()
            for problem in problems:
                print(problem, file=sys.stderr)
            print("Binder files up to date" if not problems else "run `python -m utils.binder` to regenerate")
            return 1 if problems else 0
        for name in sync():
            print(f"wrote {name}")
    except (ValueError, KeyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
