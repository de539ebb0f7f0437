"""Shared pytest configuration."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: executes notebooks in a Jupyter kernel (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "browser: runs notebooks in JupyterLab in headless Chromium (make test-browser)")
