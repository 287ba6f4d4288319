"""In-line coupling for real: the Fortran shallow-water host under mpiexec with the Python driver.

Small runs of the main job's namelist (namelists/sw_demo.nml). Every MPI job runs under a timeout.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coupler.io.outputs import read_increment, read_trajectory
from tests.conftest import REPO, lodas, read_state

NML = str(REPO / "namelists" / "sw_demo.nml")
VARS = ["u", "v", "h"]
SHAPE = (3, 64, 64)
SMALL = ["sw_nml.n_cycles=6", "sw_nml.steps_per_cycle=6", "twin_nml.spinup_cycles=1", "twin_nml.clim_samples=60",
         "twin_nml.clim_stride=6", "obs_nml.n_stations=300", "assim_nml.method='3dvar'"]     # spin-up as the demo: 20 days, so the
# independent initial state is decorrelated from the truth (see coupler.twin.independent_state)


def twin(out: Path, host_ranks: int, *extra: str):
    sets = [a for s in SMALL + [f"coupler_nml.output_dir='{out}'", f"sw_nml.final_file='{out}/final.bin'", *extra]
            for a in ("--set", s)]
    proc = lodas("twin", NML, "--host-ranks", str(host_ranks), "--coupler-ranks", "1", *sets, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(hosts, tmp_path_factory):
    """The same twin experiment with the host on 1, 2 and 4 ranks (64 rows: 64, 32, 16 per rank)."""
    return {n: twin(tmp_path_factory.mktemp(f"sw_{n}"), n, *([] if n == 2 else ["twin_nml.free_run=.false."]))
            for n in (1, 2, 4)}


def increments(summary) -> np.ndarray:
    files = sorted((Path(summary["assim"]["output_dir"]) / "increments").glob("inc_*.nc"))
    assert len(files) == summary["cycles"]
    return np.stack([read_increment(f, VARS) for f in files])


def test_increments_and_final_state_bit_identical_for_1_2_4_host_ranks(runs):
    ref_inc = increments(runs[1])
    ref_final = read_state(Path(runs[1]["output_dir"]) / "final.bin", SHAPE)
    assert np.abs(ref_inc[:, 2]).max() > 0.5          # a real analysis of h happened (m)
    for n in (2, 4):
        assert np.array_equal(increments(runs[n]), ref_inc), n
        assert np.array_equal(read_state(Path(runs[n]["output_dir"]) / "final.bin", SHAPE), ref_final), n


def test_fortran_host_equals_numpy_reference(runs):
    """Nature run (no increments), 2 host ranks: the Fortran trajectory equals the numpy one
    bit for bit at every analysis time (the contract is round-off; bit-identity is what we get)."""
    from coupler.models.shallow_water import ShallowWater, ShallowWaterParams

    out = Path(runs[2]["output_dir"])
    times, truth = read_trajectory(out / "nature" / "backgrounds.nc", VARS)
    model = ShallowWater(ShallowWaterParams())
    x = read_state(out / "init_truth.bin", SHAPE)
    for k in range(len(times)):
        x = model.step(x, 6)
        assert times[k] == pytest.approx((k + 1) * 6 * 900.0)
        np.testing.assert_allclose(truth[k], x, rtol=0, atol=1e-10 * np.abs(x).max())
        assert np.array_equal(truth[k], x), k


def test_3dvar_improves_on_the_free_run_for_every_variable(runs):
    s = runs[2]
    assert s["ok"]
    free, a = s["free"]["background_rmse_per_variable"], s["assim"]
    for v in VARS:
        assert a["analysis_rmse_per_variable"][v] < a["background_rmse_per_variable"][v] < 0.7 * free[v], v


def test_iau_spreads_the_increment_over_the_window(hosts, tmp_path):
    extra = ("twin_nml.free_run=.false.",)
    s_direct = twin(tmp_path / "direct", 2, *extra)
    s_iau = twin(tmp_path / "iau", 2, *extra, "bridge_nml.increment_mode='iau'", "bridge_nml.iau_steps=3")
    f_direct = read_state(tmp_path / "direct" / "final.bin", SHAPE)
    f_iau = read_state(tmp_path / "iau" / "final.bin", SHAPE)
    assert not np.array_equal(f_direct, f_iau)
    assert s_iau["assim"]["status_counts"] == {"ok": 6}
    # IAU keeps the run as close to the truth as direct insertion does (within 20 %)
    assert s_iau["assim"]["background_rmse"] < 1.2 * s_direct["assim"]["background_rmse"]


def test_host_rejects_a_decomposition_it_cannot_do(hosts, tmp_path):
    """ny = 64 over 3 ranks: the host stops with a message naming the key; no hang."""
    proc = lodas("launch", NML, "--host-ranks", "3", "--coupler-ranks", "1",
                 "--set", f"coupler_nml.output_dir='{tmp_path}'", "--set", "assim_nml.method='none'")
    assert proc.returncode != 0
    assert "&sw_nml ny = 64 cannot be split over 3 host ranks" in proc.stdout + proc.stderr
