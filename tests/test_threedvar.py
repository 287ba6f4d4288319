"""3D-Var (PSAS) against the closed-form BLUE, and the homogeneous spectral B."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft as sfft

from coupler.assim.base import Observations
from coupler.assim.covariance import SpectralCovariance
from coupler.assim.obs_operator import observation_operator
from coupler.assim.threedvar import ThreeDVar

SHAPES = [(2, 4, 6), (1, 1, 9), (3, 5, 4), (1, 1, 40)]


def climatology(shape, T, rng):
    """Random states with spatial correlation (spectral smoothing) and cross-variable
    correlation (a random mixing of the variables)."""
    nvar, ny, nx = shape
    z = rng.standard_normal((T, nvar, ny, nx))
    ky = sfft.fftfreq(ny)[:, None]
    kx = sfft.rfftfreq(nx)[None, :]
    filt = np.exp(-8.0 * (kx ** 2 + ky ** 2)) + 0.2
    z = sfft.irfft2(sfft.rfft2(z, axes=(-2, -1)) * filt, s=(ny, nx), axes=(-2, -1))
    mix = rng.standard_normal((nvar, nvar)) + 2 * np.eye(nvar)
    return np.einsum("ab,tbji->taji", mix, z) + rng.standard_normal((nvar, 1, 1))


def stations(shape, p, rng):
    nvar, ny, nx = shape
    return Observations(value=rng.standard_normal(p) * 2,
                        error_std=rng.uniform(0.2, 1.5, p),
                        var_index=rng.integers(0, nvar, p),
                        x=rng.uniform(0, nx, p),
                        y=rng.uniform(0, ny, p) if ny > 1 else np.zeros(p))


@pytest.mark.parametrize("explicit_max", [0, 10**9], ids=["matrix-free", "explicit"])
@pytest.mark.parametrize("shape", SHAPES)
def test_3dvar_equals_blue(shape, explicit_max):
    rng = np.random.default_rng(42)
    n = int(np.prod(shape))
    B = SpectralCovariance.from_climatology(climatology(shape, 3 * n, rng))
    obs = stations(shape, max(3, n // 3), rng)
    x_b = rng.standard_normal(shape)

    Bd = B.dense()
    H = observation_operator(obs, shape).toarray()
    R = np.diag(obs.error_std ** 2)
    d = obs.value - H @ x_b.ravel()
    dx_blue = Bd @ H.T @ np.linalg.solve(H @ Bd @ H.T + R, d)

    an = ThreeDVar(B, cg_tol=1e-13, explicit_max=explicit_max).analyse(x_b, obs, cycle=0)
    assert an.increment.shape == shape and an.spread is None
    err = np.linalg.norm(an.increment.ravel() - dx_blue) / np.linalg.norm(dx_blue)
    assert err < 1e-9, err

    # diagnostics
    info = an.info
    oma = obs.value - H @ (x_b.ravel() + dx_blue)
    assert info["n_obs"] == len(obs) and info["cg_iterations"] >= 1
    assert info["omb_mean"] == pytest.approx(d.mean(), rel=1e-12, abs=1e-12)
    assert info["omb_rms"] == pytest.approx(np.sqrt(np.mean(d ** 2)), rel=1e-12)
    assert info["oma_mean"] == pytest.approx(oma.mean(), rel=1e-8, abs=1e-10)
    assert info["oma_rms"] == pytest.approx(np.sqrt(np.mean(oma ** 2)), rel=1e-8)
    Rinv = np.diag(1 / obs.error_std ** 2)
    assert info["cost_initial"] == pytest.approx(0.5 * d @ Rinv @ d, rel=1e-12)
    # J(x_a) with an explicit B^{-1} (B is full rank: T = 3n samples)
    J_b = 0.5 * dx_blue @ np.linalg.solve(Bd, dx_blue)
    J_o = 0.5 * oma @ Rinv @ oma
    assert info["cost_final"] == pytest.approx(J_b + J_o, rel=1e-7)
    assert info["cost_final"] < info["cost_initial"]
    assert info["oma_rms"] < info["omb_rms"]


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_dense_is_symmetric_psd_and_matches_apply(shape):
    rng = np.random.default_rng(1)
    n = int(np.prod(shape))
    B = SpectralCovariance.from_climatology(climatology(shape, 7, rng))  # rank-deficient
    Bd = B.dense()
    assert Bd.shape == (n, n)
    np.testing.assert_allclose(Bd, Bd.T, rtol=0, atol=1e-14 * np.abs(Bd).max())
    assert np.linalg.eigvalsh(Bd).min() > -1e-12 * np.abs(Bd).max()
    cols = B.apply(np.eye(n).reshape((n,) + shape)).reshape(n, n).T   # column j = B e_j
    np.testing.assert_allclose(cols, Bd, rtol=0, atol=1e-13 * np.abs(Bd).max())
    # variance() is diag(B), constant per variable
    np.testing.assert_allclose(np.diag(Bd).reshape(shape),
                               np.broadcast_to(B.variance()[:, None, None], shape), rtol=1e-12)
    # scaled
    np.testing.assert_allclose(B.scaled(2.5).dense(), 2.5 * Bd, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_square_root_squares_to_b_and_samples_have_covariance_b(shape):
    rng = np.random.default_rng(4)
    n = int(np.prod(shape))
    B = SpectralCovariance.from_climatology(climatology(shape, 7, rng))  # rank-deficient: PSD, not PD
    R = B.sqrt().dense()
    np.testing.assert_allclose(R, R.T, rtol=0, atol=1e-13 * np.abs(R).max())
    np.testing.assert_allclose(R @ R, B.dense(), rtol=0, atol=1e-12 * np.abs(B.dense()).max())
    z = B.sample(np.random.default_rng(5), 4000).reshape(4000, n)
    assert z.shape == (4000, n)
    C = z.T @ z / 4000
    scale = np.abs(B.dense()).max()
    assert np.abs(C - B.dense()).max() < 0.15 * scale          # 4000 draws: ~sqrt(2/4000) = 2% per entry


def test_from_climatology_is_translation_averaged_sample_covariance():
    rng = np.random.default_rng(3)
    shape = (2, 3, 5)
    nvar, ny, nx = shape
    X = climatology(shape, 11, rng)
    A = X - X.mean(axis=0)
    T = X.shape[0]
    # explicit: c_ab[m] = 1/(T-1) sum_t 1/(ny nx) sum_q a_t,a[q+m] a_t,b[q]
    c = np.zeros((nvar, nvar, ny, nx))
    for mj in range(ny):
        for mi in range(nx):
            shifted = np.roll(A, shift=(-mj, -mi), axis=(-2, -1))     # a[q + m]
            c[:, :, mj, mi] = np.einsum("taji,tbji->ab", shifted, A) / ((T - 1) * ny * nx)
    B = SpectralCovariance.from_climatology(X)
    np.testing.assert_allclose(B.covariance_function(), c, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(SpectralCovariance.from_covariance_function(c).dense(), B.dense(),
                               rtol=1e-12, atol=1e-14)
    # the translation-averaged pointwise variance equals the pooled sample variance
    np.testing.assert_allclose(B.variance(), A.var(axis=(0, 2, 3)) * T / (T - 1), rtol=1e-12)


def test_arrays_round_trip_and_validation():
    rng = np.random.default_rng(4)
    B = SpectralCovariance.from_climatology(climatology((3, 4, 5), 20, rng))
    B2 = SpectralCovariance.from_arrays(B.to_arrays())
    assert B2.shape == B.shape
    np.testing.assert_array_equal(B2.spectrum, B.spectrum)
    bad = B.to_arrays()
    bad["spectrum_re"] = -bad["spectrum_re"]          # negative definite
    with pytest.raises(ValueError, match="positive semi-definite"):
        SpectralCovariance.from_arrays(bad)
    with pytest.raises(ValueError, match="factor"):
        B.scaled(-1.0)
    with pytest.raises(ValueError, match="x: expected shape"):
        B.apply(np.zeros((3, 4, 4)))


def test_empty_observations_and_nonconvergence():
    rng = np.random.default_rng(5)
    shape = (1, 1, 40)
    B = SpectralCovariance.from_climatology(climatology(shape, 100, rng))
    x_b = rng.standard_normal(shape)
    an = ThreeDVar(B).analyse(x_b, Observations.empty(), cycle=3)
    assert np.all(an.increment == 0) and an.increment.shape == shape
    assert an.info["n_obs"] == 0 and an.info["cg_iterations"] == 0

    obs = stations(shape, 30, rng)
    for explicit_max in (0, 10**9):
        with pytest.raises(RuntimeError, match="did not converge.*residual"):
            ThreeDVar(B, cg_tol=1e-14, cg_max_iter=2,
                      explicit_max=explicit_max).analyse(x_b, obs, cycle=0)
    with pytest.raises(ValueError, match="background"):
        ThreeDVar(B).analyse(np.zeros((1, 1, 39)), obs, cycle=0)


def test_l96_every_other_variable_observed():
    """All-grid-point observations at y = x_b give a zero increment; observing every other
    variable of L96 with the truth pulls the analysis towards it."""
    from coupler.assim.networks import make_network, synthesize

    rng = np.random.default_rng(6)
    shape = (1, 1, 40)
    B = SpectralCovariance.from_climatology(climatology(shape, 400, rng))
    truth = climatology(shape, 1, rng)[0]
    x_b = truth + B.apply(rng.standard_normal(shape)) * 0.3
    net = make_network("every_k", shape, [0], every_k=2)
    obs = synthesize(truth, net, 0.1, rng)
    an = ThreeDVar(B).analyse(x_b, obs, cycle=0)
    assert an.info["n_obs"] == 20
    assert np.sqrt(np.mean((x_b + an.increment - truth) ** 2)) < np.sqrt(np.mean((x_b - truth) ** 2))
    perfect = Observations(x_b[0, 0, ::2].copy(), np.ones(20), np.zeros(20, dtype=int),
                           np.arange(0, 40, 2.0), np.zeros(20))
    assert np.all(ThreeDVar(B).analyse(x_b, perfect, cycle=0).increment == 0)
