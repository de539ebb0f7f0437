"""binder/ agrees with requirements.txt (same pins, CPU-only torch), postBuild stops on error,
and every Binder link in the README is generated from the one repository address."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from utils.tooling import binder

ROOT = binder.REPO_ROOT


def pins(text: str) -> dict[str, str]:
    """{package: version} of every exact pin in a requirements file."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def test_binder_files_are_up_to_date() -> None:
    """Same as `python -m utils.binder --check`."""
    assert binder.find_problems(ROOT) == [], "run `python -m utils.binder`"


def _tests_only_section(requirements: str) -> str:
    """The block of requirements.txt whose comment starts "# tests only", up to the next blank line."""
    return requirements.split("# tests only", 1)[1].split("\n\n", 1)[0]


def test_binder_pins_match_requirements_with_cpu_torch() -> None:
    ours = pins((ROOT / "requirements.txt").read_text())
    theirs = pins((ROOT / "binder" / "requirements.txt").read_text())
    assert "torch" in ours and theirs["torch"] == ours["torch"] + "+cpu"
    tests_only = pins(_tests_only_section((ROOT / "requirements.txt").read_text()))
    assert {"playwright", "pytest-xdist"} <= set(tests_only) and not set(tests_only) & set(theirs)
    assert {k: v for k, v in theirs.items() if k != "torch"} == {k: v for k, v in ours.items()
                                                                 if k != "torch" and k not in tests_only}
    text = (ROOT / "binder" / "requirements.txt").read_text()
    assert f"--extra-index-url {binder.CPU_INDEX}" in text.splitlines()
    assert not any(name.startswith(("nvidia", "cuda", "triton")) for name in theirs), "CUDA packages on Binder"


def test_binder_python_matches_the_project() -> None:
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    assert runtime == "python-3.11"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert ">=3.11" in requires


def test_post_build_stops_at_the_first_failing_step(tmp_path: Path) -> None:
    post_build = ROOT / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK) and post_build.read_text().startswith("#!/usr/bin/env bash")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    log = tmp_path / "calls.log"
    fake = fake_bin / "python"
    fake.write_text(f'#!/bin/sh\necho "python $*" >> {log}\nexit 3\n')  # every python call fails
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(post_build)], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
    assert result.returncode != 0
    assert log.read_text().splitlines() == ["python -m pip install --no-deps -e ."], "ran on after a failure"


def test_post_build_installs_the_package_and_lab_settings(tmp_path: Path) -> None:
    text = (ROOT / "binder" / "postBuild").read_text()
    assert "pip install --no-deps -e ." in text and "overrides.json" in text
    import json

    overrides = json.loads((ROOT / "binder" / "overrides.json").read_text())
    assert overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]["markdown"] == "Markdown Preview"


def test_binder_shuts_down_closed_and_idle_kernels() -> None:
    """Several open chapters must fit in Binder's memory: a closed tab's kernel stops, idle ones are culled."""
    import json

    from jupyter_server.services.kernels.kernelmanager import MappingKernelManager

    overrides = json.loads((ROOT / "binder" / "overrides.json").read_text())
    tracker = overrides["@jupyterlab/notebook-extension:tracker"]
    assert tracker == {"kernelShutdown": True}
    schema = Path(sys.prefix, "share/jupyter/lab/schemas/@jupyterlab/notebook-extension/tracker.json")
    assert set(tracker) <= set(json.loads(schema.read_text())["properties"]), "not a JupyterLab setting"

    server = json.loads((ROOT / "binder" / "jupyter_server_config.json").read_text())["MappingKernelManager"]
    assert set(server) <= set(MappingKernelManager.class_trait_names()), "not a kernel manager setting"
    assert 0 < server["cull_idle_timeout"] <= 1800 and server["cull_connected"] is True and server["cull_interval"] > 0
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert 'cp binder/jupyter_server_config.json "$config/jupyter_server_config.json"' in post_build


def test_the_kernel_culling_config_is_what_jupyter_server_loads(tmp_path: Path) -> None:
    """postBuild puts the file in the user's Jupyter config folder; a server started there culls kernels."""
    shutil.copy(ROOT / "binder" / "jupyter_server_config.json", tmp_path / "jupyter_server_config.json")
    code = ("from jupyter_server.serverapp import ServerApp\n"
            "app = ServerApp(); app.initialize(argv=['--no-browser', '--port=0'])\n"
            "km = app.kernel_manager; print(km.cull_idle_timeout, km.cull_connected, km.cull_interval)")
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.split() == ["600", "True", "60"], out.stderr[-500:]


def test_every_binder_link_in_the_readme_is_generated() -> None:
    readme = (ROOT / "README.md").read_text()
    outside = binder._BLOCK.sub("", readme)
    assert "mybinder.org/v2" not in outside, "a hand-written Binder link: put it in a generated block"
    owner_name = binder.repository(ROOT).removeprefix("https://github.com/")
    links = re.findall(r"https://mybinder\.org/v2/gh/([^/]+/[^/]+)/HEAD\?urlpath=([^)\s]+)", readme)
    chapters = sorted(p.name for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
    assert {repo for repo, _ in links} == {owner_name}
    assert sorted(u for _, u in links if "chapters" in u) == [f"lab%2Ftree%2Fchapters%2F{c}" for c in chapters]
    assert ("lab%2Ftree%2FREADME.md" in {u for _, u in links})


def _tree(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "binder", tmp_path / "binder")
    shutil.copytree(ROOT / "chapters", tmp_path / "chapters")
    return tmp_path


def test_changing_the_address_or_a_pin_is_caught_then_fixed_by_sync(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("circuits-by-example/circuits-by-example", "someone/fork"))
    requirements = root / "requirements.txt"
    requirements.write_text(requirements.read_text().replace("plotly==7.1.0", "plotly==7.1.1"))
    problems = binder.find_problems(root)
    assert problems == ["binder/requirements.txt: does not match requirements.txt",
                        "README.md: the Binder links are out of date"]
    assert sorted(binder.sync(root)) == ["README.md", "binder/requirements.txt"]
    assert binder.find_problems(root) == []
    assert "mybinder.org/v2/gh/someone/fork/HEAD" in (root / "README.md").read_text()
    assert "plotly==7.1.1" in (root / "binder" / "requirements.txt").read_text()


@pytest.mark.parametrize("address", ["git@github.com:a/b.git", "https://gitlab.com/a/b", "https://github.com/a"])
def test_a_bad_repository_address_is_a_clear_error(tmp_path: Path, address: str) -> None:
    root = _tree(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(re.sub(r'Repository = ".*"', f'Repository = "{address}"', pyproject.read_text()))
    with pytest.raises(ValueError, match="must be https://github.com/OWNER/NAME"):
        binder.find_problems(root)
