"""Observation and covariance files, and the synthetic observing networks."""
from __future__ import annotations

import datetime as dt

import netCDF4
import numpy as np
import pytest

from coupler.assim.base import Observations
from coupler.assim.covariance import SpectralCovariance
from coupler.assim.networks import (Network, combine_networks, make_network, network_from_config, synthesize,
                                    synthesize_cycle)
from coupler.assim.obs_operator import observation_operator
from coupler.io.covfiles import read_covariance, write_covariance
from coupler.io.obsfiles import read_obs_attributes, read_obs_file, write_obs_file

SW = (3, 64, 64)
NAMES = ["u", "v", "h"]


def some_obs(rng, p=25):
    return Observations(rng.standard_normal(p), rng.uniform(0.1, 1.0, p),
                        rng.integers(0, 3, p), rng.uniform(0, 64, p), rng.uniform(0, 64, p))


def assert_obs_equal(a, b):
    for f in ("value", "error_std", "var_index", "x", "y", "footprint"):
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


def mixed_obs():
    """Stations (fractional and grid points) and footprints (odd, even, wrapping) in one cycle."""
    return Observations(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([0.5, 0.5, 1.0, 2.0, 0.25]),
                        np.array([0, 2, 2, 1, 0]), np.array([1.25, 7.0, 3.5, 0.0, 12.0]),
                        np.array([3.5, 2.0, 5.5, 63.0, 12.0]), np.array([0.0, 0.0, 8.0, 3.0, 1.0]))


def test_mixed_points_and_footprints_round_trip(tmp_path):
    obs = mixed_obs()
    path = write_obs_file(tmp_path / "mixed.nc", obs, NAMES, 0, "2000-01-01T06:00:00")
    back = read_obs_file(path, NAMES, shape=SW)
    assert_obs_equal(back, obs)
    assert back.footprint.dtype == np.float64
    with netCDF4.Dataset(path) as ds:
        assert ds.variables["footprint"].units == "grid_points"


def test_file_without_footprint_reads_as_points(tmp_path):
    """Files written before footprints existed have no 'footprint' variable: all points."""
    obs = some_obs(np.random.default_rng(5), p=6)
    path = tmp_path / "old.nc"
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("obs", 6)
        for f, t in (("value", "f8"), ("error_std", "f8"), ("var_index", "i4"), ("x", "f8"), ("y", "f8")):
            v = ds.createVariable(f, t, ("obs",))
            if f in ("x", "y"):
                v.units = "grid_index"
            v[:] = getattr(obs, f)
        ds.variable_names = "u v h"
        ds.cycle = 0
        ds.valid_time = "2000-01-01T00:00:00"
    back = read_obs_file(path, NAMES, shape=SW)
    assert back.footprint.tolist() == [0.0] * 6
    assert_obs_equal(back, obs)


def test_bad_footprints_are_refused(tmp_path):
    obs = mixed_obs()
    with pytest.raises(ValueError, match="footprint: .*not an integer >= 0"):
        Observations(obs.value, obs.error_std, obs.var_index, obs.x, obs.y, np.array([0, 0, 2.5, 0, 0]))
    bad = Observations(obs.value, obs.error_std, obs.var_index, obs.x, obs.y, np.array([0, 0, 3.0, 0, 0]))
    path = write_obs_file(tmp_path / "bad.nc", bad, NAMES, 0, "2000-01-01")   # x = 3.5 with w = 3
    assert len(read_obs_file(path, NAMES)) == 5                  # without the grid: not checkable
    with pytest.raises(ValueError, match=r"bad.nc: Observations.x: .*not aligned.*obs 2: x=3.5 with footprint=3"):
        read_obs_file(path, NAMES, shape=SW)
    wide = Observations(np.zeros(1), np.ones(1), np.zeros(1, int), np.array([2.0]), np.array([2.0]), np.array([5.0]))
    path = write_obs_file(tmp_path / "wide.nc", wide, NAMES, 0, "2000-01-01")
    with pytest.raises(ValueError, match=r"wide.nc: .*wider than the grid \(nx = 4\)"):
        read_obs_file(path, NAMES, shape=(3, 8, 4))


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
def xyz(net):
    return net.var_index, net.x, net.y


def test_every_k_counts():
    vi, x, y = xyz(make_network("every_k", SW, [0, 2], every_k=2))
    assert vi.size == 2 * 32 * 32 and set(vi.tolist()) == {0, 2}
    assert np.all(x % 2 == 0) and np.all(y % 2 == 0)
    vi, x, y = xyz(make_network("every_k", (1, 1, 40), [0], every_k=2))   # every other L96 variable
    assert x.tolist() == list(range(0, 40, 2)) and np.all(y == 0)
    vi, x, y = xyz(make_network("every_k", (1, 1, 40), [0], every_k=3))
    assert vi.size == 14
    assert len(make_network("all", SW, [0, 1, 2])) == 3 * 64 * 64


def test_stations_distinct_same_for_every_variable_and_reproducible():
    vi, x, y = xyz(make_network("stations", SW, [0, 1, 2], n_stations=400, rng=np.random.default_rng(7)))
    assert vi.size == 1200
    pts = [set(zip(x[vi == v].tolist(), y[vi == v].tolist())) for v in range(3)]
    assert len(pts[0]) == 400 and pts[0] == pts[1] == pts[2]
    again = make_network("stations", SW, [0, 1, 2], n_stations=400, rng=np.random.default_rng(7))
    for a, b in zip((vi, x, y), xyz(again)):
        np.testing.assert_array_equal(a, b)
    other = make_network("stations", SW, [0, 1, 2], n_stations=400, rng=np.random.default_rng(8))
    assert not np.array_equal(x, other.x)


def test_fraction_independent_per_variable():
    vi, x, y = xyz(make_network("fraction", SW, [0, 1], fraction=0.1, rng=3))
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
    (dict(kind="footprints", footprint=5), r"footprint: 5 grid points per box side does not divide nx = 64"),
    (dict(kind="footprints", footprint=0), r"footprint: must be a positive int"),
    (dict(kind="all", error_std=[1.0, 2.0]), r"error_std: expected a scalar or 1 finite values"),
    (dict(kind="footprints", error_std=-1.0), r"error_std: "),
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


# ------------------------------------------------------------------ footprints, several kinds
def test_footprints_network_tiles_the_grid():
    net = make_network("footprints", (3, 16, 24), [2, 0], footprint=8, error_std=[1.0, 0.5])
    assert isinstance(net, Network) and len(net) == 2 * 2 * 3
    assert net.var_index.tolist() == [2] * 6 + [0] * 6
    assert net.x[:6].tolist() == [3.5, 11.5, 19.5] * 2 and net.y[:6].tolist() == [3.5] * 3 + [11.5] * 3
    assert np.all(net.footprint == 8) and net.error_std.tolist() == [1.0] * 6 + [0.5] * 6
    H = observation_operator(net.locations(), (3, 16, 24))
    np.testing.assert_allclose(np.asarray(H[:6].sum(axis=0)).reshape(3, 16, 24)[2], 1 / 64)  # a tiling
    # footprint 3 (odd): centres on grid points; 1: the "all" network
    odd = make_network("footprints", (1, 6, 6), [0], footprint=3)
    assert odd.x.tolist() == [1.0, 4.0, 1.0, 4.0] and odd.error_std is None
    one, every = make_network("footprints", SW, [1], footprint=1), make_network("all", SW, [1])
    assert (observation_operator(one.locations(), SW) != observation_operator(every.locations(), SW)).nnz == 0


def test_footprints_on_a_ring_are_segments():
    net = make_network("footprints", (1, 1, 40), [0], footprint=4)
    assert len(net) == 10 and net.x.tolist() == [1.5 + 4 * k for k in range(10)] and np.all(net.y == 0)
    with pytest.raises(ValueError, match="does not divide nx = 40"):
        make_network("footprints", (1, 1, 40), [0], footprint=3)


def test_point_networks_carry_zero_footprints_and_error_std():
    net = make_network("stations", SW, [0, 2], n_stations=5, error_std=[0.2, 1.0], rng=1)
    assert np.all(net.footprint == 0) and net.var_index.dtype == np.int64
    assert net.error_std.tolist() == [0.2] * 5 + [1.0] * 5
    assert make_network("all", SW, [1], error_std=0.3).error_std.tolist() == [0.3] * 64 * 64


def test_combine_networks():
    a = make_network("stations", SW, [0, 1], n_stations=7, error_std=0.5, rng=0)
    b = make_network("footprints", SW, [2], footprint=16, error_std=2.0)
    c = combine_networks(a, b)
    assert len(c) == len(a) + len(b) == 14 + 16
    for f in ("var_index", "x", "y", "footprint", "error_std"):
        np.testing.assert_array_equal(getattr(c, f), np.concatenate([getattr(a, f), getattr(b, f)]))
    assert combine_networks(make_network("all", SW, [0]), make_network("every_k", SW, [1])).error_std is None
    with pytest.raises(ValueError, match=r"networks \[1\] carry no error_std"):
        combine_networks(a, make_network("all", SW, [0]))
    with pytest.raises(ValueError, match="at least one"):
        combine_networks()
    with pytest.raises(ValueError, match="argument 0 is a tuple"):
        combine_networks((a.var_index, a.x, a.y))


def test_synthesize_points_and_footprints_with_per_kind_errors():
    rng = np.random.default_rng(11)
    truth = rng.standard_normal(SW)
    net = combine_networks(make_network("all", SW, [2], error_std=0.5),
                           make_network("footprints", SW, [2, 0], footprint=2, error_std=[0.1, 0.2]))
    obs = synthesize(truth, net, rng=np.random.default_rng(3))
    assert len(obs) == 64 * 64 + 2 * 32 * 32
    np.testing.assert_array_equal(obs.footprint, net.footprint)
    np.testing.assert_array_equal(obs.error_std, net.error_std)
    boxes = truth.reshape(3, 32, 2, 32, 2).mean(axis=(2, 4))           # exact 2x2 box means
    err_pts = obs.value[:4096] - truth[2].ravel()
    err_h = obs.value[4096:5120] - boxes[2].ravel()
    err_u = obs.value[5120:] - boxes[0].ravel()
    assert np.std(err_pts) == pytest.approx(0.5, rel=0.05)
    assert np.std(err_h) == pytest.approx(0.1, rel=0.08) and np.std(err_u) == pytest.approx(0.2, rel=0.08)
    # the errors are sigma * z with z ONE draw of p standard normals, in network order
    z = np.random.default_rng(3).standard_normal(len(net))
    np.testing.assert_allclose(np.concatenate([err_pts, err_h, err_u]), net.error_std * z, atol=1e-12)
    # an explicit per-state-variable sigma overrides the network's; legacy tuples still work
    over = synthesize(truth, net, [1.0, 1.0, 3.0], np.random.default_rng(3))
    assert set(over.error_std.tolist()) == {1.0, 3.0}
    legacy = synthesize(truth, (net.var_index[:4096], net.x[:4096], net.y[:4096]), 0.5, np.random.default_rng(3))
    np.testing.assert_array_equal(legacy.value, obs.value[:4096])
    with pytest.raises(ValueError, match="carries no error_std"):
        synthesize(truth, make_network("all", SW, [0]), rng=0)


NML = """
&coupler_nml
    seed = 4
/
&grid_nml
    nx = 16, ny = 8
    variables = 'u', 'v', 'h'
/
&obs_nml
    network = {network}
    n_stations = 20
    variables = 'h', 'u'
    error_std = 2.0, 0.5
    footprint = 4
    footprint_variables = 'v'
    footprint_error_std = 0.3
/
"""


def test_network_from_config_streams_and_per_kind_errors(tmp_path):
    from bridges.namelist import load

    def cfg(network):
        (tmp_path / "n.nml").write_text(NML.format(network=network))
        return load(tmp_path / "n.nml")

    both = cfg("'stations', 'footprints'")
    assert both.obs.network == ["stations", "footprints"]
    net = network_from_config(both)                                  # seed 4 from &coupler_nml
    shape = (3, 8, 16)
    # stations draw from default_rng([seed, 1]) exactly as a single-kind network always did
    st = make_network("stations", shape, [2, 0], n_stations=20, rng=np.random.default_rng([4, 1]))
    assert len(net) == 40 + 2 * 4
    np.testing.assert_array_equal(net.var_index[:40], st.var_index)
    np.testing.assert_array_equal(net.x[:40], st.x)
    np.testing.assert_array_equal(net.y[:40], st.y)
    assert net.error_std[:40].tolist() == [2.0] * 20 + [0.5] * 20          # h: 2.0, u: 0.5
    assert net.var_index[40:].tolist() == [1] * 8 and np.all(net.footprint[40:] == 4)
    assert net.error_std[40:].tolist() == [0.3] * 8
    only_stations = network_from_config(cfg("'stations'"))
    np.testing.assert_array_equal(only_stations.x, net.x[:40])            # adding a kind after: unchanged
    np.testing.assert_array_equal(network_from_config(both, seed=9).x, network_from_config(both, 9).x)
    assert not np.array_equal(network_from_config(both, seed=9).x[:40], net.x[:40])
    truth = np.random.default_rng(0).standard_normal(shape)
    o1, o2 = (synthesize_cycle(truth, net, seed=4, cycle=c) for c in (1, 2))
    again = synthesize_cycle(truth, net, seed=4, cycle=1)
    np.testing.assert_array_equal(o1.value, again.value)
    assert not np.array_equal(o1.value, o2.value)
    ref = synthesize(truth, net, None, np.random.default_rng([4, 2, 1]))
    np.testing.assert_array_equal(o1.value, ref.value)
    # the old call with Config.error_std_per_variable (per *state* variable) agrees for the point kind
    old = synthesize(truth, only_stations, both.error_std_per_variable(), np.random.default_rng([4, 2, 1]))
    np.testing.assert_array_equal(old.error_std, only_stations.error_std)
