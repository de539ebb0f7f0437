"""Shared pytest configuration."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: executes notebooks in a Jupyter kernel (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "browser: runs notebooks in JupyterLab in headless Chromium (make test-browser)")


@pytest.fixture(autouse=True)
def _gradients_left_on():
    """A test that switches gradients off for the whole session breaks every training test after it: fail it instead."""
    import torch

    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test (or a fixture it uses) left gradients switched off; use `with torch.no_grad():`")


@pytest.fixture
def reading_only():
    """For tests that only read models (`pytestmark = pytest.mark.usefixtures("reading_only")`): no gradients,
    faster and lighter, and switched back on after every test."""
    import torch

    with torch.no_grad():
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup`, keep the tests marked with one xdist_group, and a notebook's cells, on one worker.

    pytest-xdist 3.8 marks them by appending "@group" to `item._nodeid`, but pytest 9 keeps a node's id in
    `item._id`, so the mark is lost and the group's expensive session fixture (the graded class) was built
    on both workers. This does what xdist means to.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        if item.path.suffix == ".ipynb":  # nbval: a notebook's cells run in order in one kernel, on one worker
            item.add_marker(pytest.mark.xdist_group(item.path.name))
        group = "_".join(sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                                 for m in item.iter_markers("xdist_group")}))
        if group and not item.nodeid.endswith(f"@{group}"):
            item._id = coerce_node_id(f"{item.nodeid}@{group}")
