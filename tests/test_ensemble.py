"""Ensemble members split over driver ranks: identical results for 1, 2 and 3 ranks, failures
reported to the root without a hang (real mpiexec, under a timeout)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coupler.ensemble import member_batches, rank_batches

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "mpi" / "ensemble_worker.py"


def _run(n, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run(["mpiexec", "-n", str(n), sys.executable, str(WORKER), str(out), *extra],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return dict(np.load(out))


def test_batches_cover_members_once_for_any_rank_count():
    assert member_batches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    for size in (1, 2, 3, 5):
        got = sorted(m for r in range(size) for b in rank_batches(7, 2, r, size) for m in b)
        assert got == list(range(7))
    with pytest.raises(ValueError, match="member_batch"):
        member_batches(4, 0)


def test_split_over_ranks_equals_serial_bitwise(tmp_path):
    ref = _run(1, tmp_path / "r1.npz")
    assert ref["serial_equal0"] and ref["serial_equal1"]
    for n in (2, 3):
        got = _run(n, tmp_path / f"r{n}.npz")
        for c in (0, 1):
            assert np.array_equal(got[f"inc{c}"], ref[f"inc{c}"]), (n, c)
            assert np.array_equal(got[f"spread{c}"], ref[f"spread{c}"]), (n, c)
            assert got[f"serial_equal{c}"]


def test_a_failing_rank_reaches_the_root_as_an_error_and_nothing_hangs(tmp_path):
    got = _run(2, tmp_path / "f.npz", "1")
    assert "inc0" in got                            # cycle 0 fine
    assert "driver rank 1: FloatingPointError: injected failure" in str(got["error1"])
