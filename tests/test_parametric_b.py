"""Parametric B (``&assim_nml b_std, b_length, b_length_unit``): Gaussian correlation, PSD for every L."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bridges.namelist import load
from coupler.assim.base import Observations
from coupler.assim.covariance import SpectralCovariance
from coupler.assim.threedvar import ThreeDVar
from coupler.methods import make_method


def min_image(n: int) -> np.ndarray:
    d = np.arange(n)
    return np.minimum(d, n - d)


@pytest.mark.parametrize("shape, lx, ly", [((3, 6, 10), 2.0, 1.5), ((1, 1, 40), 4.0, 0.0),
                                           ((2, 5, 7), 0.3, 50.0), ((2, 4, 4), 0.0, 0.0),
                                           ((1, 1, 1), 3.0, 3.0)])
def test_pointwise_variance_is_std_squared(shape, lx, ly):
    std = np.array([0.5, 2.0, 7.0])[: shape[0]]
    B = SpectralCovariance.parametric(shape, std, lx, ly)
    np.testing.assert_allclose(B.variance(), std ** 2, rtol=1e-13)
    np.testing.assert_allclose(np.diag(B.dense()), np.repeat(std ** 2, shape[1] * shape[2]), rtol=1e-13)


def test_correlation_is_gaussian_with_length_per_axis():
    nvar, ny, nx, lx, ly = 2, 48, 64, 4.0, 3.0
    B = SpectralCovariance.parametric((nvar, ny, nx), [1.5, 0.2], lx, ly)
    c = B.covariance_function()
    corr = c[1, 1] / c[1, 1, 0, 0]
    assert corr[0, int(lx)] == pytest.approx(np.exp(-0.5), abs=1e-12)
    assert corr[int(ly), 0] == pytest.approx(np.exp(-0.5), abs=1e-12)
    # the whole function is the minimum-image Gaussian for L << domain (images < 1e-20)
    dy, dx = min_image(ny)[:, None], min_image(nx)[None, :]
    np.testing.assert_allclose(corr, np.exp(-(dx ** 2 / (2 * lx ** 2) + dy ** 2 / (2 * ly ** 2))), atol=1e-12)
    # variables uncorrelated
    assert np.all(c[0, 1] == 0) and np.all(c[1, 0] == 0)


def test_ring_correlation_and_apply_match_dense():
    B = SpectralCovariance.parametric((1, 1, 40), [1.0], 3.0, 123.0)   # Ly is irrelevant with ny = 1
    corr = B.covariance_function()[0, 0, 0]
    assert corr[3] == pytest.approx(np.exp(-0.5), abs=1e-12) and corr[-3] == pytest.approx(np.exp(-0.5), abs=1e-12)
    x = np.random.default_rng(0).standard_normal((1, 1, 40))
    np.testing.assert_allclose(B.apply(x).ravel(), B.dense() @ x.ravel(), atol=1e-12)


def naive_min_eig(n: int, L: float) -> float:
    """Smallest eigenvalue of the sampled minimum-image Gaussian on a ring (NOT a covariance)."""
    return float(np.fft.fft(np.exp(-min_image(n) ** 2 / (2 * L ** 2))).real.min())


@pytest.mark.parametrize("shape", [(1, 1, 40), (2, 6, 8), (1, 9, 5)])
@pytest.mark.parametrize("L", [0.0, 0.2, 0.5, 1.0, 3.0, 10.0, 20.0, 40.0, 1e3, 1e9])
def test_psd_for_every_length(shape, L):
    std = [3.0, 0.1][: shape[0]]
    B = SpectralCovariance.parametric(shape, std, L, 0.7 * L)
    D = B.dense()
    np.testing.assert_allclose(D, D.T, atol=1e-14 * max(std) ** 2)
    scale = max(std) ** 2
    assert np.linalg.eigvalsh(D).min() >= -1e-10 * scale
    assert B.spectrum.real.min() >= 0.0
    if L == 0.0:   # delta correlation: the diagonal B (to FFT round-off)
        np.testing.assert_allclose(D, np.diag(np.repeat(np.square(std), shape[1] * shape[2])),
                                   rtol=1e-14, atol=1e-14 * scale)


def test_naive_minimum_image_gaussian_is_not_psd():
    """What the PSD test guards against: the sampled minimum-image Gaussian (the DFT of
    ``exp(-d^2/2L^2)``, d the periodic distance) has negative eigenvalues for L ~ domain."""
    assert naive_min_eig(40, 20.0) < -1e-3 * 40 and naive_min_eig(8, 4.0) < -1e-3 * 8
    for n, L in ((40, 20.0), (8, 4.0)):
        B = SpectralCovariance.parametric((1, 1, n), [1.0], L, 0.0)
        assert np.linalg.eigvalsh(B.dense()).min() >= -1e-10


def test_large_length_tends_to_constant_correlation():
    B = SpectralCovariance.parametric((1, 4, 6), [2.0], 1e9, 1e9)
    np.testing.assert_allclose(B.dense(), np.full((24, 24), 4.0), rtol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=(2, 3, 4), std=[1.0], length_x=1.0, length_y=1.0), "std: expected 2 values"),
    (dict(shape=(1, 3, 4), std=[0.0], length_x=1.0, length_y=1.0), "std: expected finite values > 0"),
    (dict(shape=(1, 3, 4), std=[1.0], length_x=-1.0, length_y=1.0), "length_x: expected a finite length >= 0"),
    (dict(shape=(1, 3, 4), std=[1.0], length_x=1.0, length_y=np.inf), "length_y: expected a finite length >= 0"),
    (dict(shape=(1, 0, 4), std=[1.0], length_x=1.0, length_y=1.0), "shape: expected"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpectralCovariance.parametric(**kwargs)


@pytest.mark.parametrize("shape, L, loc", [((1, 1, 64), 5.0, (0, 17.0)), ((2, 32, 32), 3.0, (7, 10.0))])
def test_single_observation_increment_is_the_gaussian(shape, L, loc):
    """x_a - x_b = B H^T d / (sigma_b^2 + sigma_o^2): the observed variable's Gaussian, scaled."""
    nvar, ny, nx = shape
    sb, so, v = 2.0, 1.5, nvar - 1
    std = [0.3, sb][-nvar:]
    B = SpectralCovariance.parametric(shape, std, L, L)
    x_b = np.random.default_rng(3).standard_normal(shape)
    j0, i0 = loc
    i0 = int(i0)
    y_obs = x_b[v, j0, i0] + 1.7
    obs = Observations(value=np.array([y_obs]), error_std=np.array([so]), var_index=np.array([v]),
                       x=np.array([float(i0)]), y=np.array([float(j0)]))
    dx = ThreeDVar(B, cg_tol=1e-13).analyse(x_b, obs, cycle=0).increment
    peak = sb ** 2 / (sb ** 2 + so ** 2) * 1.7
    assert dx[v, j0, i0] == pytest.approx(peak, rel=1e-10)
    k = np.arange(-8, 9)   # the nearest other image is >= 24 points away: < 1e-13
    np.testing.assert_allclose(dx[v, j0, (i0 + k) % nx], peak * np.exp(-k ** 2 / (2 * L ** 2)), atol=1e-10)
    if ny > 1:
        ky = np.arange(-8, 9)
        np.testing.assert_allclose(dx[v, (j0 + ky) % ny, i0], peak * np.exp(-ky ** 2 / (2 * L ** 2)), atol=1e-10)
    if nvar > 1:   # uncorrelated variables: the unobserved one is untouched
        assert np.all(dx[0] == 0)


# ---------------------------------------------------------------- namelist -> make_method

def write_nml(tmp_path: Path, grid: str, assim: str) -> Path:
    p = tmp_path / "b.nml"
    p.write_text(f"&grid_nml\n{grid}\n/\n&assim_nml\n    method = '3dvar'\n{assim}\n/\n")
    return p


def test_make_method_builds_parametric_b_and_it_wins_over_a_given_covariance(tmp_path):
    cfg = load(write_nml(tmp_path, "nx = 40, ny = 1, variables = 'x'",
                         "b_std = 2.0, b_length = 3.0, b_scale = 0.5"))
    expected = SpectralCovariance.parametric((1, 1, 40), [2.0], 3.0, 3.0).scaled(0.5)
    other = SpectralCovariance.parametric((1, 1, 40), [9.0], 0.0, 0.0)
    for given in (None, other):
        m = make_method(cfg, covariance=given)
        assert isinstance(m, ThreeDVar)
        np.testing.assert_allclose(m.B.spectrum, expected.spectrum, rtol=1e-13, atol=1e-13)
        assert m.B.variance() == pytest.approx([2.0])   # 0.5 * 2^2
    # without b_std the given covariance is used (bench's climatological B)
    cfg2 = load(write_nml(tmp_path, "nx = 40, ny = 1, variables = 'x'", "b_scale = 0.5"))
    np.testing.assert_allclose(make_method(cfg2, covariance=other).B.variance(), [40.5])


def test_km_lengths_equal_the_grid_lengths(tmp_path):
    grid = "nx = 16, ny = 8, variables = 'u', 'h', dx_m = 2000.0, dy_m = 500.0"
    km = load(write_nml(tmp_path, grid, "b_std = 1.0, 3.0, b_length = 6.0, b_length_unit = 'km'"))
    B_km = make_method(km).B
    B_grid = SpectralCovariance.parametric((2, 8, 16), [1.0, 3.0], 3.0, 12.0)   # 6 km / 2 km, 6 km / 0.5 km
    np.testing.assert_allclose(B_km.spectrum, B_grid.spectrum, rtol=1e-13, atol=1e-12)
    # and the grid unit takes b_length as grid points on both axes (so km differs here)
    g = load(write_nml(tmp_path, grid, "b_std = 1.0, 3.0, b_length = 6.0, b_length_unit = 'grid'"))
    np.testing.assert_allclose(make_method(g).B.spectrum,
                               SpectralCovariance.parametric((2, 8, 16), [1.0, 3.0], 6.0, 6.0).spectrum,
                               rtol=1e-13, atol=1e-12)
    assert not np.allclose(make_method(g).B.spectrum, B_km.spectrum)


def test_default_length_gives_diagonal_b(tmp_path):
    cfg = load(write_nml(tmp_path, "nx = 5, ny = 3, variables = 'a', 'b'", "b_std = 1.0, 2.0"))
    np.testing.assert_allclose(make_method(cfg).B.dense(), np.diag(np.repeat([1.0, 4.0], 15)),
                               rtol=1e-14, atol=1e-14)


def test_missing_b_error_names_file_group_and_both_keys(tmp_path):
    path = write_nml(tmp_path, "nx = 40, ny = 1, variables = 'x'", "")
    with pytest.raises(ValueError) as info:
        make_method(load(path))
    msg = str(info.value)
    assert str(path) in msg and "&assim_nml" in msg and "b_file" in msg and "b_std" in msg
    assert "expected" in msg
