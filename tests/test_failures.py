"""Bad input and failing analyses: a clear message or a status, never a hang or a traceback.

Each MPI job runs under a timeout, so a deadlock fails the test.
"""
from __future__ import annotations

import json
from pathlib import Path

import netCDF4
import numpy as np
import pytest

from bridges.status import Status
from tests.conftest import REPO, lodas, write_state

NML = str(REPO / "namelists" / "l96_twin.nml")


@pytest.fixture(scope="module")
def prepared(hosts, tmp_path_factory):
    """A small twin experiment whose obs, B and initial state the failure runs reuse."""
    out = tmp_path_factory.mktemp("l96_prep")
    sets = ["l96_nml.n_cycles=6", "twin_nml.clim_samples=200", "twin_nml.spinup_steps=200",
            f"coupler_nml.output_dir='{out}'", "twin_nml.free_run=.false."]
    proc = lodas("twin", NML, *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def launch(prepared: Path, out: Path, *extra: str, env=None, timeout=120):
    sets = ["l96_nml.n_cycles=6", f"coupler_nml.output_dir='{out}'", "coupler_nml.write_increments=.true.",
            f"l96_nml.init_file='{prepared / 'init_background.bin'}'",
            f"assim_nml.b_file='{prepared / 'b_clim.nc'}'", f"obs_nml.obs_dir='{prepared / 'obs'}'",
            f"coupler_nml.truth_file='{prepared / 'nature' / 'backgrounds.nc'}'", *extra]
    return lodas("launch", NML, *[a for s in sets for a in ("--set", s)], env=env, timeout=timeout)


def statuses(out: Path) -> list[int]:
    return [json.loads(line)["status"] for line in (out / "diagnostics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("key, value, host_value", [("nx", "41", "nx = 40"), ("variables", "'u'", "['x']")])
def test_grid_mismatch_stops_both_sides_with_the_mismatch_named(prepared, tmp_path, key, value, host_value):
    proc = launch(prepared, tmp_path, f"grid_nml.{key}={value}")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "host: error:" in text and "lodas: error:" in text          # both sides said it
    assert f"&grid_nml {key} = " in text and host_value in text
    assert "Traceback" not in text


def test_driver_namelist_error_reaches_the_host(prepared, tmp_path):
    bad = tmp_path / "bad.nml"
    bad.write_text(Path(NML).read_text().replace("method = '3dvar'", "method = '3dvar'\n    b_scal = 1.0"))
    exe = REPO / "fortran_stubs" / "build" / "l96_host"
    import subprocess, sys

    proc = subprocess.run(["mpiexec", "-n", "2", str(exe), str(bad), ":", "-n", "1", sys.executable, "-m",
                           "coupler", "run", str(bad)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0
    assert proc.stderr.count("unknown key 'b_scal' (did you mean 'b_scale'?)") >= 2   # host and driver
    assert "Traceback" not in proc.stderr


def test_missing_observation_file_gives_zero_increment_and_status(prepared, tmp_path):
    obs = tmp_path / "obs"
    obs.mkdir()
    for f in (prepared / "obs").glob("*.nc"):
        if "000003" not in f.name:
            (obs / f.name).write_bytes(f.read_bytes())
    proc = launch(prepared, tmp_path / "out", f"obs_nml.obs_dir='{obs}'")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert statuses(tmp_path / "out") == [0, 0, 0, int(Status.NO_OBSERVATIONS), 0, 0]
    with netCDF4.Dataset(tmp_path / "out" / "increments" / "inc_000003.nc") as nc:
        assert np.all(nc["x_inc"][:] == 0) and nc.status == Status.NO_OBSERVATIONS
    assert "obs_000003.nc" in proc.stderr

    strict = launch(prepared, tmp_path / "strict", f"obs_nml.obs_dir='{obs}'", "obs_nml.on_missing='error'")
    assert strict.returncode != 0
    assert "obs_000003.nc" in strict.stderr and "on_missing = 'error'" in strict.stderr


def test_nan_background_skips_the_cycle_and_the_host_keeps_running(prepared, tmp_path):
    x = np.fromfile(prepared / "init_background.bin")
    x[7] = np.nan
    init = write_state(tmp_path / "nan.bin", x)
    proc = launch(prepared, tmp_path / "out", f"l96_nml.init_file='{init}'")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert statuses(tmp_path / "out") == [int(Status.BAD_BACKGROUND)] * 6   # all 6 cycles reached the driver
    assert "NaN/Inf values in the background" in proc.stderr
    assert "bad_background" in proc.stdout                                   # the host logged the status


def test_driver_exception_in_a_cycle_gives_status_and_the_run_goes_on(prepared, tmp_path):
    proc = launch(prepared, tmp_path, env={"LODAS_TEST_FAIL_CYCLES": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert statuses(tmp_path) == [0, 0, int(Status.ANALYSIS_FAILED), 0, 0, 0]
    assert "fault injected at cycle 2" in proc.stderr


def test_host_on_failure_abort_ends_the_job_with_the_message(prepared, tmp_path):
    proc = launch(prepared, tmp_path, "bridge_nml.on_failure='abort'", env={"LODAS_TEST_FAIL_CYCLES": "2"})
    assert proc.returncode != 0
    assert "host gives up" in proc.stderr and "analysis_failed" in proc.stderr


def test_driver_crash_outside_a_cycle_aborts_the_job_no_deadlock(prepared, tmp_path):
    proc = launch(prepared, tmp_path, f"coupler_nml.truth_file='{tmp_path / 'missing.nc'}'")
    assert proc.returncode != 0
    assert "aborting the job" in proc.stderr and "missing.nc" in proc.stderr
