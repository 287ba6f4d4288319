"""Shared fixtures: the Fortran hosts are built once; MPI jobs always run under a timeout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "fortran_stubs" / "build"
MPI_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def hosts() -> Path:
    """Build the Fortran hosts (make is a no-op when they are current)."""
    subprocess.run(["make", "-s", "-C", str(REPO / "fortran_stubs")], check=True, timeout=600)
    return BUILD


def lodas(*args: str, timeout: float = MPI_TIMEOUT_S, env: dict | None = None, cwd: Path | None = None
          ) -> subprocess.CompletedProcess:
    """Run ``python -m coupler ARGS`` under a timeout (a hang fails the test with TimeoutExpired)."""
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "coupler", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd or REPO)


def read_state(path: Path, shape) -> np.ndarray:
    return np.fromfile(path, dtype=np.float64).reshape(shape)


def write_state(path: Path, state: np.ndarray) -> Path:
    np.ascontiguousarray(state, dtype=np.float64).tofile(path)
    return path
