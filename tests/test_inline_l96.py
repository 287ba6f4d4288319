"""In-line coupling for real: the Fortran Lorenz-96 host under mpiexec with the Python driver.

Every MPI job runs under a timeout: a deadlock fails the test instead of hanging CI.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coupler.io.outputs import read_increment
from coupler.models.lorenz96 import Lorenz96
from tests.conftest import REPO, lodas, read_state, write_state

NML = str(REPO / "namelists" / "l96_twin.nml")
SMALL = ["l96_nml.n_cycles=12", "twin_nml.spinup_cycles=2", "twin_nml.clim_samples=300",
         "twin_nml.spinup_steps=300", "coupler_nml.write_increments=.true."]


def twin(out: Path, host_ranks: int, *extra: str, driver_ranks: int = 1):
    sets = [a for s in SMALL + [f"coupler_nml.output_dir='{out}'", f"l96_nml.final_file='{out}/final.bin'", *extra]
            for a in ("--set", s)]
    proc = lodas("twin", NML, "--host-ranks", str(host_ranks), "--coupler-ranks", str(driver_ranks), *sets, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(hosts, tmp_path_factory):
    """The same twin experiment with the host on 1, 2 and 4 ranks."""
    return {n: (twin(tmp_path_factory.mktemp(f"l96_{n}"), n)) for n in (1, 2, 4)}


def increments(summary) -> np.ndarray:
    d = Path(summary["assim"]["output_dir"]) / "increments"
    files = sorted(d.glob("inc_*.nc"))
    assert len(files) == summary["cycles"]
    return np.stack([read_increment(f, ["x"]) for f in files])


def test_increments_and_final_state_bit_identical_for_1_2_4_host_ranks(runs):
    ref_inc = increments(runs[1])
    ref_final = read_state(Path(runs[1]["output_dir"]) / "final.bin", (1, 1, 40))
    assert np.abs(ref_inc).max() > 0.05          # a real analysis happened
    for n in (2, 4):
        assert np.array_equal(increments(runs[n]), ref_inc), n
        assert np.array_equal(read_state(Path(runs[n]["output_dir"]) / "final.bin", (1, 1, 40)), ref_final), n


def test_3dvar_improves_on_the_free_run(runs):
    s = runs[2]
    assert s["ok"]
    assert s["assim"]["analysis_rmse"] < s["assim"]["background_rmse"] < 0.6 * s["free"]["background_rmse"]


def test_fortran_host_agrees_with_numpy_reference(runs):
    """Nature run (no increments): the Fortran trajectory equals the numpy one to round-off."""
    from coupler.io.outputs import read_trajectory

    out = Path(runs[2]["output_dir"])
    times, truth = read_trajectory(out / "nature" / "backgrounds.nc", ["x"])
    x = np.fromfile(out / "init_truth.bin").reshape(1, 1, 40)
    model = Lorenz96()
    for k in range(len(times)):
        x = model.step(x, 1)
        np.testing.assert_allclose(truth[k], x, rtol=0, atol=1e-11)


def test_inline_run_equals_inprocess_python_host(runs, tmp_path):
    """The Fortran host + MPI bridge and the numpy host in-process give the same increments."""
    from bridges.inprocess import InProcessHost
    from bridges.namelist import load
    from coupler.driver import file_observations, run_cycles
    from coupler.io.outputs import Grid
    from coupler.methods import make_method

    out = Path(runs[1]["output_dir"])
    cfg = load(out / "assim" / "effective.nml")
    x0 = np.fromfile(out / "init_background.bin").reshape(1, 1, 40)
    host = InProcessHost(Lorenz96().step, x0, steps_per_cycle=1, n_cycles=cfg.l96.n_cycles, dt=0.05)
    got = []

    class Recorder:
        def __init__(self, host):
            self.host = host

        def receive_background(self):
            return self.host.receive_background()

        def send_increment(self, inc, status, cycle):
            got.append(np.array(inc))
            self.host.send_increment(inc, status, cycle)

    obs = file_observations(cfg.obs.obs_dir, cfg.obs.file_template, ["x"], (1, 1, 40), Grid.from_config(cfg))
    run_cycles(Recorder(host), make_method(cfg), obs)
    np.testing.assert_allclose(np.stack(got), increments(runs[1]), rtol=0, atol=1e-9)


def test_iau_spreads_the_increment_over_the_window(hosts, tmp_path):
    s_direct = twin(tmp_path / "direct", 2, "l96_nml.steps_per_cycle=4", "twin_nml.free_run=.false.")
    s_iau = twin(tmp_path / "iau", 2, "l96_nml.steps_per_cycle=4", "bridge_nml.increment_mode='iau'",
                 "bridge_nml.iau_steps=4", "twin_nml.free_run=.false.")
    f_direct = read_state(tmp_path / "direct" / "final.bin", (1, 1, 40))
    f_iau = read_state(tmp_path / "iau" / "final.bin", (1, 1, 40))
    assert not np.array_equal(f_direct, f_iau)
    assert s_iau["assim"]["status_counts"] == {"ok": 12}
    assert s_iau["assim"]["background_rmse"] < 2.0   # IAU keeps the run close to the truth
