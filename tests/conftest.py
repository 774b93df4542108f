"""Shared fixtures: a private FLWR_HOME, no runtime dependency installation, tiny cohorts."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _private_flwr_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "flwr-home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
