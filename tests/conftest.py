"""Shared fixtures: a private MOLTING_HOME (so the demo model is built fresh), the demo model, helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def molting_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every subprocess it starts) builds and reads the demo model under one temporary home."""
    home = tmp_path_factory.mktemp("molting-home")
    os.environ["MOLTING_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def demo_model(molting_home: Path) -> Path:
    from molting.demo import demo_model_dir

    return demo_model_dir()


def run_molting(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600):
    """Run ``python -m molting ARGS`` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "molting", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
