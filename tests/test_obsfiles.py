"""Observation and covariance files, and the synthetic observing networks."""
from __future__ import annotations

import datetime as dt

import netCDF4
import numpy as np
import pytest

from coupler.assim.base import Observations
from coupler.assim.covariance import SpectralCovariance
from coupler.assim.networks import make_network, synthesize
from coupler.io.covfiles import read_covariance, write_covariance
from coupler.io.obsfiles import read_obs_attributes, read_obs_file, write_obs_file

SW = (3, 64, 64)
NAMES = ["u", "v", "h"]


def some_obs(rng, p=25):
    return Observations(rng.standard_normal(p), rng.uniform(0.1, 1.0, p),
                        rng.integers(0, 3, p), rng.uniform(0, 64, p), rng.uniform(0, 64, p))


def assert_obs_equal(a, b):
    for f in ("value", "error_std", "var_index", "x", "y"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


# ------------------------------------------------------------------ observation files
def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    obs = some_obs(rng)
    path = write_obs_file(tmp_path / "obs_0003.nc", obs, NAMES, 3, dt.datetime(2000, 1, 1, 6))
    back = read_obs_file(path, NAMES, shape=SW)
    assert_obs_equal(back, obs)
    assert back.var_index.dtype == np.int64
    back, valid = read_obs_file(path, NAMES, with_valid_time=True)
    assert valid == "2000-01-01T06:00:00"
    assert_obs_equal(back, obs)
    meta = read_obs_attributes(path)
    assert meta == {"cycle": 3, "valid_time": "2000-01-01T06:00:00", "variable_names": NAMES,
                    "n_obs": 25}
    with netCDF4.Dataset(path) as ds:
        assert ds.variables["x"].units == "grid_index" and ds.variables["y"].units == "grid_index"
    assert not list(tmp_path.glob(".*tmp*"))           # atomic write left no temporary


def test_empty_round_trip(tmp_path):
    path = write_obs_file(tmp_path / "e.nc", Observations.empty(), ["x"], 0, "2000-01-01")
    back, valid = read_obs_file(path, ["x"], with_valid_time=True)
    assert len(back) == 0 and valid == "2000-01-01T00:00:00"   # normalised ISO 8601


def test_subset_file_is_mapped_onto_run_variables(tmp_path):
    """A file observing only h (var_index 0 in its own list) maps to the run's index 2."""
    obs = Observations(np.array([1.0, 2.0]), np.array([0.5, 0.5]), np.array([0, 0]),
                       np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    path = write_obs_file(tmp_path / "h.nc", obs, ["h"], 0, "2000-01-01T00:00:00")
    assert read_obs_file(path, NAMES).var_index.tolist() == [2, 2]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "obs_0007.nc"
    with pytest.raises(FileNotFoundError, match="obs_0007.nc"):
        read_obs_file(path, NAMES)


def test_mismatching_variable_names(tmp_path):
    rng = np.random.default_rng(1)
    path = write_obs_file(tmp_path / "o.nc", some_obs(rng), ["u", "v", "eta"], 0, "2000-01-01")
    with pytest.raises(ValueError, match=r"o\.nc.*variable_names.*(?s:.*)eta"):
        read_obs_file(path, NAMES)


def test_non_finite_values(tmp_path):
    rng = np.random.default_rng(2)
    path = write_obs_file(tmp_path / "o.nc", some_obs(rng), NAMES, 0, "2000-01-01")
    with netCDF4.Dataset(path, "a") as ds:
        ds.variables["value"][4] = np.inf
    with pytest.raises(ValueError, match=r"o\.nc.*'value'.*non-finite.*obs 4"):
        read_obs_file(path, NAMES)
    with pytest.raises(ValueError, match="non-finite"):
        bad = some_obs(rng)
        bad.value[0] = np.nan
        write_obs_file(tmp_path / "p.nc", bad, NAMES, 0, "2000-01-01")


def test_missing_variable_and_off_grid(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "o.nc"
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("obs", 2)
        ds.createVariable("value", "f8", ("obs",))[:] = [1.0, 2.0]
        ds.variable_names = "u v h"
    with pytest.raises(ValueError, match=r"o\.nc.*missing variable.*error_std"):
        read_obs_file(path, NAMES)
    obs = some_obs(rng)
    path = write_obs_file(tmp_path / "q.nc", obs, NAMES, 0, "2000-01-01")
    with pytest.raises(ValueError, match=r"q\.nc.*'x' coordinate.*outside the grid \[0, 32\)"):
        read_obs_file(path, NAMES, shape=(3, 64, 32))
    (tmp_path / "junk.nc").write_text("not netcdf")
    with pytest.raises(ValueError, match="junk.nc.*not a readable netCDF"):
        read_obs_file(tmp_path / "junk.nc", NAMES)


# ------------------------------------------------------------------ covariance files
def test_covariance_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    B = SpectralCovariance.from_climatology(rng.standard_normal((12, 3, 4, 5)))
    path = write_covariance(tmp_path / "B.nc", B, NAMES)
    B2, names = read_covariance(path)
    assert names == NAMES and B2.shape == B.shape
    np.testing.assert_array_equal(B2.spectrum, B.spectrum)
    with pytest.raises(FileNotFoundError, match="missing_B.nc"):
        read_covariance(tmp_path / "missing_B.nc")


# ------------------------------------------------------------------ networks
def test_every_k_counts():
    vi, x, y = make_network("every_k", SW, [0, 2], every_k=2)
    assert vi.size == 2 * 32 * 32 and set(vi.tolist()) == {0, 2}
    assert np.all(x % 2 == 0) and np.all(y % 2 == 0)
    vi, x, y = make_network("every_k", (1, 1, 40), [0], every_k=2)   # every other L96 variable
    assert x.tolist() == list(range(0, 40, 2)) and np.all(y == 0)
    vi, x, y = make_network("every_k", (1, 1, 40), [0], every_k=3)
    assert vi.size == 14
    assert make_network("all", SW, [0, 1, 2])[0].size == 3 * 64 * 64


def test_stations_distinct_same_for_every_variable_and_reproducible():
    vi, x, y = make_network("stations", SW, [0, 1, 2], n_stations=400, rng=np.random.default_rng(7))
    assert vi.size == 1200
    pts = [set(zip(x[vi == v].tolist(), y[vi == v].tolist())) for v in range(3)]
    assert len(pts[0]) == 400 and pts[0] == pts[1] == pts[2]
    again = make_network("stations", SW, [0, 1, 2], n_stations=400, rng=np.random.default_rng(7))
    for a, b in zip((vi, x, y), again):
        np.testing.assert_array_equal(a, b)
    other = make_network("stations", SW, [0, 1, 2], n_stations=400, rng=np.random.default_rng(8))
    assert not np.array_equal(x, other[1])


def test_fraction_independent_per_variable():
    vi, x, y = make_network("fraction", SW, [0, 1], fraction=0.1, rng=3)
    n0, n1 = (vi == 0).sum(), (vi == 1).sum()
    assert n0 == n1 == round(0.1 * 64 * 64)
    assert set(zip(x[vi == 0], y[vi == 0])) != set(zip(x[vi == 1], y[vi == 1]))
    assert len(set(zip(x[vi == 0], y[vi == 0]))) == n0


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="grid"), "kind"),
    (dict(kind="every_k", every_k=0), "every_k"),
    (dict(kind="stations", n_stations=64 * 64 + 1, rng=0), "n_stations"),
    (dict(kind="stations", n_stations=10), "rng"),
    (dict(kind="fraction", fraction=1.5, rng=0), "fraction"),
    (dict(kind="all", var_indices=[3]), "var_indices"),
    (dict(kind="all", var_indices=[0, 0]), "var_indices"),
])
def test_network_bad_arguments(kwargs, match):
    args = dict(kind="all", shape=SW, var_indices=[0]) | kwargs
    with pytest.raises(ValueError, match=match):
        make_network(args.pop("kind"), args.pop("shape"), args.pop("var_indices"), **args)


def test_synthesize():
    rng = np.random.default_rng(9)
    truth = rng.standard_normal(SW)
    net = make_network("all", SW, [0, 2])
    obs = synthesize(truth, net, [0.5, 1.0, 2.0], np.random.default_rng(10))
    err = obs.value - truth[obs.var_index, obs.y.astype(int), obs.x.astype(int)]
    assert np.std(err[obs.var_index == 0]) == pytest.approx(0.5, rel=0.05)
    assert np.std(err[obs.var_index == 2]) == pytest.approx(2.0, rel=0.05)
    assert set(obs.error_std.tolist()) == {0.5, 2.0}
    again = synthesize(truth, net, [0.5, 1.0, 2.0], np.random.default_rng(10))
    np.testing.assert_array_equal(obs.value, again.value)
    with pytest.raises(ValueError, match="error_std_per_var"):
        synthesize(truth, net, [0.5, 1.0], rng)
