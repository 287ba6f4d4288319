"""Offline replay (`lodas replay`): archives written by the in-line twin, by "other tools" (lat/lon,
descending latitude, other dimension orders and names, levels), 1 vs 2 ranks, kill and resume,
malformed archives. Every MPI job and subprocess runs under a timeout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import netCDF4
import numpy as np
import pytest

from coupler.io.outputs import read_increment
from tests.conftest import MPI_TIMEOUT_S, REPO, lodas

L96_TWIN = str(REPO / "namelists" / "l96_twin.nml")
SMALL = ["l96_nml.n_cycles=12", "twin_nml.spinup_cycles=2", "twin_nml.clim_samples=300", "twin_nml.spinup_steps=300",
         "coupler_nml.write_increments=.true.", "coupler_nml.write_backgrounds=.true."]
LO_SDA = ["assim_nml.method='lo-sda'", "assim_nml.n_members=4", "assim_nml.member_batch=2", "assim_nml.n_steps=2",
          "assim_nml.lo_iterations=2"]
TIMING = ("analysis_s", "wall_s")


def sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def twin(out: Path, *extra: str) -> Path:
    proc = lodas("twin", L96_TWIN, *sets(*SMALL, f"coupler_nml.output_dir='{out}'", *extra), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def archive_3dvar(hosts, tmp_path_factory) -> Path:
    """An in-line L96 twin with 3D-Var that kept its backgrounds: the archive to replay."""
    return twin(tmp_path_factory.mktemp("twin_3dvar"))


def replay_namelist(path: Path, twin_dir: Path, out: Path, *, method="3dvar", extra: str = "") -> Path:
    b = f"b_file = '{twin_dir / 'b_clim.nc'}'\n    b_scale = 0.02" if method == "3dvar" else ""
    path.write_text(f"""
&coupler_nml
    output_dir = '{out}'
    experiment = 'replay_test'
    seed = 1
    truth_file = '{twin_dir / 'nature' / 'backgrounds.nc'}'
/
&grid_nml
    nx = 40
    ny = 1
    variables = 'x'
    time_unit_s = 432000.0
/
&assim_nml
    method = '{method}'
    {b}
/
&obs_nml
    obs_dir = '{twin_dir / 'obs'}'
/
&twin_nml
    model = 'l96'
/
&replay_nml
    background_file = '{twin_dir / 'assim' / 'backgrounds.nc'}'
    {extra}
/
""")
    return path


def replay(nml: Path, *extra: str, ranks: int = 1, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "coupler", "replay", str(nml), "--json", "--no-progress", *extra]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=MPI_TIMEOUT_S, env=e, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    return proc, (json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {})


def increments(folder: Path, names=("x",)) -> np.ndarray:
    return np.stack([read_increment(f, list(names)) for f in sorted((folder / "increments").glob("inc_*.nc"))])


def records(folder: Path) -> dict[int, dict]:
    rows = [json.loads(p.read_text()) for p in sorted((folder / "records").glob("cycle_*.json"))]
    return {r["cycle"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


# ------------------------------------------------------------------ replay == in-line
def test_replay_of_an_inline_archive_reproduces_the_inline_increments(archive_3dvar, tmp_path):
    out = tmp_path / "out"
    proc, s = replay(replay_namelist(tmp_path / "r.nml", archive_3dvar, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s["cycles_run"] == 12 and s["status_counts"] == {"ok": 12} and s["ok"]
    inline = increments(archive_3dvar / "assim")
    assert np.abs(inline).max() > 0.05 and inline.shape == (12, 1, 1, 40)
    assert np.array_equal(increments(out), inline)                    # bit for bit
    inline_rows = [json.loads(l) for l in (archive_3dvar / "assim" / "diagnostics.jsonl").read_text().splitlines()]
    rows = records(out)
    for r in inline_rows:                                             # same O-B/O-A and RMSE against the truth
        for key in ("omb_rms", "oma_rms", "rmse_b", "rmse_a", "n_obs"):
            assert rows[r["cycle"]][key] == pytest.approx(r[key], rel=1e-12), key
    assert (out / "diagnostics.jsonl").read_text().count("\n") == 12 and (out / "diagnostics.nc").is_file()


def test_replay_of_an_inline_lo_sda_archive_reproduces_its_increments(hosts, tmp_path):
    arch = twin(tmp_path / "twin", *LO_SDA, "l96_nml.n_cycles=6", "twin_nml.free_run=.false.")
    out = tmp_path / "out"
    nml = replay_namelist(tmp_path / "r.nml", arch, out, method="lo-sda")
    proc, s = replay(nml, *sets(*LO_SDA))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s["ok"] and s["cycles_run"] == 6
    assert np.array_equal(increments(out), increments(arch / "assim"))
    with netCDF4.Dataset(out / "increments" / "inc_000003.nc") as nc:   # ensemble spread written with it
        assert np.all(nc["x_spread"][:] > 0)


# ------------------------------------------------------------------ ranks, kill and resume
def test_one_and_two_ranks_give_identical_outputs(archive_3dvar, tmp_path):
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"out{n}"
        proc, s = replay(replay_namelist(tmp_path / f"r{n}.nml", archive_3dvar, outs[n]), ranks=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert s["ranks"] == n and s["cycles_run"] == 12
    assert np.array_equal(increments(outs[1]), increments(outs[2]))
    assert records(outs[1]) == records(outs[2])
    with netCDF4.Dataset(outs[1] / "diagnostics.nc") as a, netCDF4.Dataset(outs[2] / "diagnostics.nc") as b:
        for key in ("cycle", "status", "omb_rms", "oma_rms", "rmse_a"):
            assert np.array_equal(a[key][:], b[key][:]), key


def test_killed_run_loses_no_completed_cycle_and_resume_does_none_twice(archive_3dvar, tmp_path):
    """SIGKILL in the middle, then a re-run: completed cycles are kept untouched, the others are done once."""
    ref = tmp_path / "ref"
    proc, _ = replay(replay_namelist(tmp_path / "ref.nml", archive_3dvar, ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    nml = replay_namelist(tmp_path / "r.nml", archive_3dvar, out, method="lo-sda")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "coupler", "replay", str(nml), "--no-progress", *sets(*LO_SDA)]
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + MPI_TIMEOUT_S
    try:
        while len(list((out / "records").glob("cycle_*.json"))) < 3:
            assert job.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no cycle completed in time"
            time.sleep(0.01)
        job.send_signal(signal.SIGKILL)
    finally:
        job.kill()
        job.wait(timeout=30)
    done = {p.name: p.read_bytes() for p in (out / "records").glob("cycle_*.json")}
    assert 3 <= len(done) < 12
    for name in done:                              # every recorded cycle has its complete increment file
        read_increment(out / "increments" / name.replace("cycle_", "inc_").replace(".json", ".nc"), ["x"])
    visible = [p for p in (out / "increments").glob("*") if not p.name.startswith(".")]
    assert all(p.name.startswith("inc_") and p.suffix == ".nc" for p in visible)

    proc, s = replay(nml, *sets(*LO_SDA))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s["cycles_run"] == 12 - len(done) and s["cycles_skipped_complete"] == len(done) and s["ok"]
    for name, content in done.items():             # not redone: the records are byte for byte those of the first run
        assert (out / "records" / name).read_bytes() == content
    assert not list(out.glob("**/.*.tmp-*"))
    # the result equals an uninterrupted run
    full = tmp_path / "full"
    proc, _ = replay(replay_namelist(tmp_path / "full.nml", archive_3dvar, full, method="lo-sda"), *sets(*LO_SDA))
    assert proc.returncode == 0
    assert np.array_equal(increments(out), increments(full))
    # and a third run has nothing left to do
    proc, s = replay(nml, *sets(*LO_SDA))
    assert s["cycles_run"] == 0 and s["cycles_skipped_complete"] == 12


# ------------------------------------------------------------------ archives written by other tools
T0 = datetime(2021, 3, 1, 0)
NY, NX = 12, 16


def truth_field(k: int) -> np.ndarray:
    """Two smooth fields on a global lat/lon grid (lat ascending), cycle k."""
    lat = np.linspace(-82.5, 82.5, NY)[:, None]
    lon = np.arange(NX)[None, :] * 360.0 / NX
    h = 5000 + 100 * np.cos(np.radians(lat)) * np.sin(np.radians(lon) + 0.3 * k)
    t = 280 + 20 * np.cos(np.radians(lat)) + 2 * np.cos(2 * np.radians(lon) - 0.2 * k)
    return np.stack([h, t])


def write_archive(folder: Path, *, descending: bool, order: str, names: tuple[str, str], levels: int,
                  n_cycles: int = 3) -> Path:
    """One file per cycle ``bg_%Y%m%d%H.nc``; ``order`` 'yx' or 'xy'; the second field on level 2 of
    ``levels`` (0: no level dimension)."""
    folder.mkdir(parents=True, exist_ok=True)
    lat = np.linspace(-82.5, 82.5, NY)
    for k in range(n_cycles):
        valid = T0 + timedelta(hours=6 * k)
        x = truth_field(k) + 0.5                                  # background = truth + a bias
        with netCDF4.Dataset(folder / valid.strftime("bg_%Y%m%d%H.nc"), "w") as nc:
            nc.createDimension("time", None)
            nc.createDimension("latitude", NY)
            nc.createDimension("longitude", NX)
            t = nc.createVariable("time", "f8", ("time",))
            t.units = "hours since 2021-03-01 00:00:00"
            t[:] = [6 * k]
            la = nc.createVariable("latitude", "f8", ("latitude",))
            la.units = "degrees_north"
            la[:] = lat[::-1] if descending else lat
            lo = nc.createVariable("longitude", "f4", ("longitude",))
            lo.units = "degrees_east"
            lo[:] = np.arange(NX) * 360.0 / NX
            hor = ("latitude", "longitude") if order == "yx" else ("longitude", "latitude")
            dims2 = ("time", *hor)

            def put(name, field, level_dims=()):
                f = field[::-1] if descending else field
                f = f if order == "yx" else f.T
                v = nc.createVariable(name, "f8", dims2[:1] + level_dims + dims2[1:])
                if level_dims:
                    data = np.full((levels,) + f.shape, -999.0)
                    data[1] = f
                    v[0] = data
                else:
                    v[0] = f
            put(names[0], x[0])
            if levels:
                nc.createDimension("pfull", levels)
                p = nc.createVariable("pfull", "f8", ("pfull",))
                p.units, p[:] = "hPa", np.linspace(200, 1000, levels)
                put(names[1], x[1], ("pfull",))
            else:
                put(names[1], x[1])
    return folder


def write_obs(folder: Path, *, by: str, names: tuple[str, str], n_cycles: int = 3, outside: int = 0) -> Path:
    """Observations of both variables at fixed stations: by 'index' (x, y ascending) or 'latlon'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    j, i = rng.integers(1, NY - 1, 20), rng.integers(0, NX, 20)
    lat = np.linspace(-82.5, 82.5, NY)
    for k in range(n_cycles):
        valid = T0 + timedelta(hours=6 * k)
        x_t = truth_field(k)
        var = np.repeat([0, 1], 20)
        value = np.concatenate([x_t[0, j, i], x_t[1, j, i]])
        with netCDF4.Dataset(folder / valid.strftime("obs_%Y%m%d%H.nc"), "w") as nc:
            p = 40 + outside
            nc.createDimension("obs", p)
            nc.variable_names = " ".join(names)
            nc.valid_time = valid.isoformat()
            for name, data in (("obs_value", np.concatenate([value, np.full(outside, 1.0)])),
                               ("obs_err", np.full(p, 1.0))):
                nc.createVariable(name, "f8", ("obs",))[:] = data
            nc.createVariable("var_index", "i4", ("obs",))[:] = np.concatenate([var, np.zeros(outside, int)])
            if by == "index":
                for c, d in (("x", np.concatenate([i, i]) + 0.0), ("y", np.concatenate([j, j]) + 0.0)):
                    v = nc.createVariable(c, "f8", ("obs",))
                    v.units, v[:] = "grid_index", np.concatenate([d, np.full(outside, 0.0)])
            else:
                la = nc.createVariable("lat", "f8", ("obs",))
                la[:] = np.concatenate([lat[j], lat[j], np.full(outside, 89.0)])     # beyond the last row
                lo = nc.createVariable("lon", "f8", ("obs",))
                lo[:] = np.concatenate([i * 360.0 / NX, i * 360.0 / NX, np.full(outside, 10.0)]) - 360.0
    return folder


def latlon_namelist(path: Path, bg: Path, obs: Path, out: Path, *, extra: str = "", layout="cf",
                    vmap: str = "") -> Path:
    path.write_text(f"""
&coupler_nml
    output_dir = '{out}'
    start_time = '2021-03-01T00:00:00'
/
&grid_nml
    nx = {NX}
    ny = {NY}
    variables = 'h', 't'
    time_unit_s = 3600.0
/
&assim_nml
    method = '3dvar'
    b_std = 50.0, 3.0
    b_length = 2.0
/
&obs_nml
    obs_dir = '{obs}'
    file_template = 'obs_%Y%m%d%H.nc'
/
&replay_nml
    background_file = '{bg}/bg_%Y%m%d%H.nc'
    first_time = '2021-03-01T00:00:00'
    last_time = '2021-03-01T12:00:00'
    interval_h = 6
    increment_layout = '{layout}'
    variable_map = {vmap or "'value=obs_value', 'error_std=obs_err'"}
    {extra}
/
""")
    return path


def cf_increments(out: Path, names=("h", "t"), flip=False) -> np.ndarray:
    inc = increments(out, names)
    return inc[..., ::-1, :] if flip else inc


def test_archives_of_other_tools_give_the_same_increments(tmp_path):
    """Standard layout vs descending latitude, (x, y) order, renamed variables, a level dimension,
    observations by lat/lon: the same increments, written back in each archive's own latitude order."""
    std_out, odd_out = tmp_path / "std_out", tmp_path / "odd_out"
    std = latlon_namelist(tmp_path / "std.nml", write_archive(tmp_path / "std", descending=False, order="yx",
                                                              names=("h", "t"), levels=0),
                          write_obs(tmp_path / "obs_std", by="index", names=("h", "t")), std_out)
    odd = latlon_namelist(tmp_path / "odd.nml", write_archive(tmp_path / "odd", descending=True, order="xy",
                                                              names=("zg", "temp"), levels=3),
                          write_obs(tmp_path / "obs_odd", by="latlon", names=("zg", "temp"), outside=2), odd_out,
                          vmap="'h=zg', 't=temp:2', 'value=obs_value', 'error_std=obs_err'")
    for nml in (std, odd):
        proc, s = replay(nml)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert s["cycles_run"] == 3 and s["ok"], s
    a, b = cf_increments(std_out), cf_increments(odd_out, flip=True)
    assert np.abs(a).max() > 0.1
    np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10)
    assert records(odd_out)[0]["n_obs_outside"] == 2 and records(odd_out)[0]["n_obs"] == 40
    with netCDF4.Dataset(odd_out / "increments" / "inc_000001.nc") as nc:   # the archive's coordinates and order
        assert nc["h_inc"].dimensions == ("time", "latitude", "longitude")
        assert nc["latitude"][0] > nc["latitude"][-1] and nc["latitude"].units == "degrees_north"
        assert nc.valid_time == "2021-03-01T06:00:00"
    # the analysis moves the background towards the observations (O-A < O-B)
    r = records(std_out)[2]
    assert r["oma_rms"] < 0.7 * r["omb_rms"]


def test_fv3_layout_increments(tmp_path):
    out = tmp_path / "out"
    nml = latlon_namelist(tmp_path / "r.nml", write_archive(tmp_path / "bg", descending=True, order="yx",
                                                            names=("zg", "temp"), levels=3),
                          write_obs(tmp_path / "obs", by="latlon", names=("zg", "temp")), out, layout="fv3",
                          vmap="'h=zg', 't=temp:2', 'value=obs_value', 'error_std=obs_err'")
    proc, s = replay(nml)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cf_out = tmp_path / "cf"
    proc, _ = replay(nml, *sets(f"coupler_nml.output_dir='{cf_out}'", "replay_nml.increment_layout='cf'",
                                "replay_nml.write_analysis=.true."))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with netCDF4.Dataset(cf_out / "analyses" / "ana_000002.nc") as ana, \
            netCDF4.Dataset(cf_out / "increments" / "inc_000002.nc") as inc, \
            netCDF4.Dataset(tmp_path / "bg" / "bg_2021030112.nc") as bg:   # analysis = background + increment
        np.testing.assert_allclose(ana["h"][0], bg["zg"][0] + inc["h_inc"][0], rtol=0, atol=1e-9)
        np.testing.assert_allclose(ana["t"][0], bg["temp"][0, 1] + inc["t_inc"][0], rtol=0, atol=1e-9)
    with netCDF4.Dataset(out / "increments" / "inc_000002.nc") as nc, \
            netCDF4.Dataset(cf_out / "increments" / "inc_000002.nc") as cf:
        assert nc["temp_inc"].dimensions == ("lev", "latitude", "longitude")
        assert nc["zg_inc"].dimensions == ("latitude", "longitude")
        assert "time" not in nc.dimensions and list(nc["lev"][:]) == [200.0, 600.0, 1000.0]
        temp = nc["temp_inc"][:]
        assert np.all(temp[0] == 0) and np.all(temp[2] == 0)            # levels not assimilated: zero
        np.testing.assert_array_equal(temp[1], cf["t_inc"][0])
        np.testing.assert_array_equal(nc["zg_inc"][:], cf["h_inc"][0])


def test_observations_outside_the_domain_as_errors(tmp_path):
    out = tmp_path / "out"
    nml = latlon_namelist(tmp_path / "r.nml", write_archive(tmp_path / "bg", descending=False, order="yx",
                                                            names=("h", "t"), levels=0),
                          write_obs(tmp_path / "obs", by="latlon", names=("h", "t"), outside=1), out,
                          extra="obs_outside = 'error'\n    on_bad_cycle = 'stop'")
    proc, _ = replay(nml)
    assert proc.returncode == 2
    assert "obs_20210301" in proc.stderr and "outside the domain" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ malformed archives
@pytest.fixture
def good(tmp_path):
    bg = write_archive(tmp_path / "bg", descending=False, order="yx", names=("h", "t"), levels=0)
    obs = write_obs(tmp_path / "obs", by="index", names=("h", "t"))
    return bg, obs


def expect_error(nml: Path, *words: str, code: int = 2):
    proc, _ = replay(nml)
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr[-2000:])
    return proc


def test_missing_variable_names_file_and_mapping(good, tmp_path):
    bg, obs = good
    nml = latlon_namelist(tmp_path / "r.nml", bg, obs, tmp_path / "out", vmap="'t=temperature'")
    expect_error(nml, "bg_2021030100.nc", "no variable 'temperature'", "variable_map")
    assert not (tmp_path / "out" / "increments").exists()          # nothing written before the layout is checked


def test_wrong_shape_names_dimensions_and_grid_keys(good, tmp_path):
    bg, obs = good
    nml = latlon_namelist(tmp_path / "r.nml", bg, obs, tmp_path / "out")
    nml.write_text(nml.read_text().replace(f"nx = {NX}", f"nx = {NX + 1}"))
    expect_error(nml, "latitude x longitude = 12 x 16", "&grid_nml ny, nx")


def test_unreadable_and_missing_cycle_files_are_skipped_with_a_status_and_retried(good, tmp_path):
    bg, obs = good
    (bg / "bg_2021030106.nc").write_bytes(b"not netcdf at all")
    (obs / "obs_2021030112.nc").unlink()
    out = tmp_path / "out"
    nml = latlon_namelist(tmp_path / "r.nml", bg, obs, out)
    proc, s = replay(nml)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert s["status_counts"] == {"ok": 1, "no_background": 1, "no_observations": 1}
    rows = records(out)
    assert "not a readable netCDF file" in rows[1]["message"] and "bg_2021030106.nc" in rows[1]["message"]
    assert "obs_2021030112.nc" in rows[2]["message"]
    assert np.all(cf_increments(out)[1:] == 0)                      # zero increments, never a partial file
    write_archive(tmp_path / "fixed", descending=False, order="yx", names=("h", "t"), levels=0)
    (bg / "bg_2021030106.nc").write_bytes((tmp_path / "fixed" / "bg_2021030106.nc").read_bytes())
    write_obs(obs, by="index", names=("h", "t"))
    proc, s = replay(nml)                                           # the failed cycles are retried
    assert proc.returncode == 0 and s["cycles_run"] == 2 and s["status_counts"] == {"ok": 3}


def test_missing_time_in_a_single_file_and_stop_policy(archive_3dvar, tmp_path):
    nml = replay_namelist(tmp_path / "r.nml", archive_3dvar, tmp_path / "out",
                          extra="first_time = '2000-01-01T06:00:00'\n    last_time = '2000-01-04T12:00:00'\n"
                                "    on_bad_cycle = 'stop'")
    proc = expect_error(nml, "cycle 12", "no time 2000-01-04T06:00:00", "backgrounds.nc", "on_bad_cycle = 'stop'")
    assert "12 times: 2000-01-01T06:00:00 .. 2000-01-04T00:00:00" in proc.stderr
    assert len(records(tmp_path / "out")) == 12                    # the cycles before it are complete and kept


def test_a_template_without_first_time_and_a_level_choice_are_namelist_errors(good, tmp_path):
    bg, obs = good
    nml = latlon_namelist(tmp_path / "r.nml", bg, obs, tmp_path / "out")
    nml.write_text(nml.read_text().replace("first_time = '2021-03-01T00:00:00'", "").replace(
        "last_time = '2021-03-01T12:00:00'", ""))
    expect_error(nml, "first_time", "one file per cycle")
    lev = write_archive(tmp_path / "lev", descending=False, order="yx", names=("h", "t"), levels=3)
    expect_error(latlon_namelist(tmp_path / "l.nml", lev, obs, tmp_path / "out2"),
                 "has 3 levels along 'pfull'", "'t=t:<level 1..3>'")


# ------------------------------------------------------------------ diag and plot on replay outputs
def test_diag_and_plot_of_a_replay(archive_3dvar, tmp_path):
    out = tmp_path / "out"
    proc, s = replay(replay_namelist(tmp_path / "r.nml", archive_3dvar, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = lodas("diag", str(out), "--json")
    assert d.returncode == 0, d.stderr
    figures = json.loads(d.stdout.strip().splitlines()[-1])
    rows = [json.loads(l) for l in (out / "diagnostics.jsonl").read_text().splitlines()]
    omb = np.sqrt(np.mean([r["omb_rms"] ** 2 for r in rows]))
    assert figures["stats"]["omb_rms"]["mean"] == pytest.approx(omb, rel=1e-9)
    for spec in ("3", "2000-01-02T00:00:00"):                     # cycle 3 by index and by valid time
        p = lodas("plot", str(out), "--cycle", spec, "--json")
        assert p.returncode == 0, p.stderr
        png = Path(p.stdout.strip().splitlines()[0])
        assert png.name == "cycle_000003_x.png" and png.stat().st_size > 10_000
    bad = lodas("plot", str(out), "--cycle", "99")
    assert bad.returncode == 2 and "no cycle 99" in bad.stderr and "Traceback" not in bad.stderr
    inline = lodas("plot", str(archive_3dvar / "assim"))              # an in-line run directory too
    assert inline.returncode == 0 and inline.stdout.strip().endswith("cycle_000011_x.png"), inline.stderr


def test_observation_files_named_by_valid_time_in_line_and_in_replay(hosts, tmp_path):
    """&obs_nml file_template with strftime codes: the twin writes, the in-line driver and replay read them."""
    tpl = "obs_nml.file_template='obs_%Y%m%d%H.nc'"
    arch = twin(tmp_path / "twin", tpl, "l96_nml.n_cycles=4", "twin_nml.free_run=.false.")
    names = sorted(p.name for p in (arch / "obs").glob("obs_*.nc"))
    assert names == ["obs_2000010106.nc", "obs_2000010112.nc", "obs_2000010118.nc", "obs_2000010200.nc"]
    s = json.loads((arch / "twin_summary.json").read_text())
    assert s["assim"]["status_counts"] == {"ok": 4}
    out = tmp_path / "out"
    proc, r = replay(replay_namelist(tmp_path / "r.nml", arch, out), *sets(tpl))
    assert proc.returncode == 0 and r["status_counts"] == {"ok": 4}, proc.stderr[-2000:]
    assert np.array_equal(increments(out), increments(arch / "assim"))


def test_an_output_directory_that_cannot_be_made_is_a_clear_error_on_every_rank(archive_3dvar, tmp_path):
    (tmp_path / "plain_file").write_text("not a directory")
    nml = replay_namelist(tmp_path / "r.nml", archive_3dvar, tmp_path / "plain_file" / "out")
    for ranks in (1, 2):
        proc, _ = replay(nml, ranks=ranks)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "&coupler_nml output_dir" in proc.stderr and "plain_file" in proc.stderr
