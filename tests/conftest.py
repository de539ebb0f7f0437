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
