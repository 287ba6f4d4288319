"""Unit tests of the numpy shallow-water testbed (coupler/models/shallow_water.py).

The last tests build ``fortran_stubs/sw_selftest.f90`` with ``mpif90 -fcheck=bounds`` and
check that the Fortran dynamics are bit-identical to numpy for 1 and 2 ranks. The long-run
behaviour (chaos, error doubling, bounded energy) is measured by ``benchmarks/sw_testbed.py``.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from coupler.models.shallow_water import (
    INITIAL_AMPLITUDE_M,
    ShallowWater,
    ShallowWaterParams,
    sin_2pi_frac,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> ShallowWater:
    return ShallowWater(ShallowWaterParams())


def _smooth_state(p: ShallowWaterParams, eta: float = 5.0, uamp: float = 0.5, vamp: float = 0.3):
    """A smooth, non-trivial state (u, v, h) built from low-wavenumber sines."""
    j, i = np.mgrid[0:p.ny, 0:p.nx].astype(float)
    x, y = (i + 0.5) / p.nx, (j + 0.5) / p.ny
    s = np.empty((3, p.ny, p.nx))
    s[0] = uamp * np.sin(2 * np.pi * (2 * y + 0.1))
    s[1] = vamp * np.cos(2 * np.pi * (3 * x + 0.2))
    s[2] = p.h0_m + eta * np.sin(2 * np.pi * (x + 0.3)) * np.cos(2 * np.pi * (2 * y))
    return s


# ---------------------------------------------------------------------------- set-up
def test_default_parameters_are_physical():
    p = ShallowWaterParams()
    assert (p.nx, p.ny) == (64, 64)
    assert p.dx_m == pytest.approx(50e3) and p.dy_m == pytest.approx(50e3)
    assert 3 <= p.deformation_radius_m / p.dx_m <= 10      # Ld several grid lengths
    assert p.courant_number < 0.8                           # RK4 C-grid limit ~1.0
    assert 0 < p.drag and 0 < p.viscosity and 0 < p.forcing_amp


def test_params_validation():
    with pytest.raises(ValueError):
        ShallowWaterParams(h0_m=0.0)
    with pytest.raises(ValueError):
        ShallowWaterParams(drag=-1.0)


def test_sin_2pi_frac_accuracy_and_exact_symmetries():
    n = 1000
    m = np.arange(-3 * n, 3 * n + 1)
    s = sin_2pi_frac(m, n)
    exact = np.array([math.sin(2 * math.pi * (k % n) / n) for k in m])
    assert np.abs(s - exact).max() < 1e-15
    assert np.all(s[m % (n // 2) == 0] == 0.0)              # sin(k pi) is exactly 0
    assert np.array_equal(sin_2pi_frac(-m, n), -s)          # odd, exactly
    assert np.array_equal(sin_2pi_frac(m + 7 * n, n), s)    # periodic, exactly


def test_forcing_profile(model):
    p = model.params
    fu = model.forcing_u
    assert fu.shape == (p.ny, 1)
    y = (np.arange(p.ny) + 0.5) * p.dy_m
    np.testing.assert_allclose(fu[:, 0], p.forcing_amp * np.sin(2 * np.pi * p.forcing_wavenumber * y / p.ly_m),
                               rtol=0, atol=1e-15 * p.forcing_amp * 10)
    assert abs(fu.sum()) < 1e-12 * p.forcing_amp


def test_default_initial_state(model):
    p = model.params
    s = model.default_initial_state()
    assert s.shape == (3, p.ny, p.nx) and s.dtype == np.float64 and s.flags.c_contiguous
    assert np.array_equal(s, model.default_initial_state())             # deterministic
    assert np.all(s[0] == 0) and np.all(s[1] == 0)
    eta = s[2] - p.h0_m
    assert abs(eta.mean()) < 1e-12                                       # zero-mean bump
    assert 0.5 * INITIAL_AMPLITUDE_M < np.abs(eta).max() < 3 * INITIAL_AMPLITUDE_M
    # not symmetric under x -> -x or y -> -y (so the instability has something to grow from)
    assert not np.allclose(eta, eta[:, ::-1]) and not np.allclose(eta, eta[::-1, :])


# ----------------------------------------------------------------------- dynamics
def test_rest_state_has_zero_tendency():
    p = ShallowWaterParams(forcing_amp=0.0)
    m = ShallowWater(p)
    s = np.zeros((3, p.ny, p.nx))
    s[2] = p.h0_m
    assert np.all(m.tendency(s) == 0.0)
    assert np.array_equal(m.step(s, 3), s)


def test_forcing_only_acts_on_u_at_rest(model):
    p = model.params
    s = np.zeros((3, p.ny, p.nx))
    s[2] = p.h0_m
    t = model.tendency(s)
    np.testing.assert_array_equal(t[0], np.broadcast_to(model.forcing_u, (p.ny, p.nx)))
    assert np.all(t[1] == 0) and np.all(t[2] == 0)


def test_geostrophic_balance_sign():
    """A discretely geostrophic zonal jet (f u = -g dh/dy) has a small v tendency.

    A wrong Coriolis sign or a mis-staggered pressure gradient makes dv/dt ~ 2 f u instead.
    """
    p = ShallowWaterParams(forcing_amp=0.0, drag=0.0, viscosity=0.0)
    m = ShallowWater(p)
    j = np.arange(p.ny)
    eta = 2.0 * np.sin(2 * np.pi * 2 * (j + 0.5) / p.ny)          # h rows, m
    # v rows sit between h rows j-1 and j: geostrophic u at h rows from centred dh/dy
    dhdy = (np.roll(eta, -1) - np.roll(eta, 1)) / (2 * p.dy_m)
    s = np.zeros((3, p.ny, p.nx))
    s[0] = (-p.g / p.f0 * dhdy)[:, None]
    s[2] = p.h0_m + eta[:, None]
    t = m.tendency(s)
    coriolis_scale = p.f0 * np.abs(s[0]).max()
    assert np.abs(t[0]).max() < 1e-12 * coriolis_scale            # nothing drives u
    assert np.abs(t[2]).max() == 0.0                               # no divergence
    assert np.abs(t[1]).max() < 0.05 * coriolis_scale             # balanced to truncation error


def _mirror(s: np.ndarray, axis: str) -> np.ndarray:
    """Reflect a C-grid state x -> lx - x (axis "x") or y -> ly - y (axis "y").

    h and the tangential velocity move from cell index k to n-1-k; the normal velocity
    lives on faces (face k at k*d) and moves to face (n-k) mod n, changing sign.
    """
    out = np.empty_like(s)
    if axis == "x":
        n = s.shape[-1]
        flip = np.arange(n)[::-1]
        face = (n - np.arange(n)) % n
        out[0] = -s[0][:, face]
        out[1] = s[1][:, flip]
        out[2] = s[2][:, flip]
    else:
        n = s.shape[-2]
        flip = np.arange(n)[::-1]
        face = (n - np.arange(n)) % n
        out[0] = s[0][flip, :]
        out[1] = -s[1][face, :]
        out[2] = s[2][flip, :]
    return out


@pytest.mark.parametrize("axis", ["x", "y"])
def test_mirror_equivariance(axis):
    """A mirror image evolves as the mirror image, with f -> -f (catches staggering slips).

    Uses a non-square grid with dx != dy so that swapped indices or spacings show up.
    """
    p = ShallowWaterParams(nx=24, ny=16, lx_m=1.2e6, ly_m=0.64e6, forcing_amp=0.0)
    m, m_neg = ShallowWater(p), ShallowWater(dataclasses.replace(p, f0=-p.f0))
    rng = np.random.default_rng(2)
    s = _smooth_state(p) + 0.05 * rng.standard_normal((3, p.ny, p.nx))
    t = m.tendency(s)
    t_mirror = m_neg.tendency(_mirror(s, axis))
    np.testing.assert_allclose(t_mirror, _mirror(t, axis), rtol=0, atol=1e-13 * np.abs(t).max())


def test_flux_form_conserves_mass_to_roundoff(model):
    rng = np.random.default_rng(0)
    p = model.params
    s = _smooth_state(p) + 0.1 * rng.standard_normal((3, p.ny, p.nx))
    dh = model.tendency(s)[2]
    assert abs(dh.mean()) < 1e-14 * np.abs(dh).max()
    s1 = model.step(s, 96)                                          # one day
    assert abs(model.mean_depth(s1) - model.mean_depth(s)) < 1e-12 * p.h0_m


def test_inviscid_unforced_energy_is_conserved():
    """Sadourny's scheme conserves energy semi-discretely: the only drift is RK4's O(dt^5).

    Over one day the relative drift is ~6e-6 at dt = 900 s and ~32x smaller at dt/2; a
    wrong sign or staggering in the Coriolis, pressure or Bernoulli terms gives an O(dt^0)
    drift that does not shrink with dt.
    """
    drift = []
    for dt in (900.0, 450.0):
        p = ShallowWaterParams(forcing_amp=0.0, drag=0.0, viscosity=0.0, dt_s=dt)
        m = ShallowWater(p)
        s = _smooth_state(p)
        e0 = m.energy(s)
        s1 = m.step(s, int(round(86400 / dt)))
        assert not np.allclose(s1, s)                               # something happened
        drift.append(abs(m.energy(s1) - e0) / e0)
    assert drift[0] < 3e-5
    assert drift[1] < drift[0] / 16


def test_drag_and_viscosity_dissipate_energy():
    p = ShallowWaterParams(forcing_amp=0.0)
    m = ShallowWater(p)
    s = _smooth_state(p)
    energies = [m.energy(s)]
    for _ in range(4):
        s = m.step(s, 24)
        energies.append(m.energy(s))
    assert np.all(np.diff(energies) < 0)


def test_batch_step_equals_member_steps(model):
    p = model.params
    base = model.step(model.default_initial_state(), 48)
    rng = np.random.default_rng(1)
    ens = base + 1e-3 * rng.standard_normal((2, 3, 3, p.ny, p.nx))   # two batch axes
    out = model.step(ens, 5)
    assert out.shape == ens.shape
    for a in range(2):
        for b in range(3):
            assert np.array_equal(out[a, b], model.step(ens[a, b], 5))
    assert np.array_equal(model.tendency(ens)[1, 2], model.tendency(ens[1, 2]))


def test_step_does_not_modify_input_and_checks_shape(model):
    s = model.default_initial_state()
    keep = s.copy()
    out = model.step(s, 2)
    assert np.array_equal(s, keep) and out is not s
    assert np.array_equal(model.step(s, 0), s)
    with pytest.raises(ValueError):
        model.tendency(np.zeros((3, 64, 32)))


def test_spin_up_stays_finite_and_develops_flow(model):
    """15 model days from the default state: finite, positive h, jets/eddies of O(1) m/s."""
    p = model.params
    s = model.step(model.default_initial_state(), int(15 * p.steps_per_day))
    assert np.all(np.isfinite(s))
    d = model.diagnostics(s)
    assert 0.3 < d["rms_speed"] < 4.0
    assert 1.0 < d["rms_h_anomaly"] < 50.0
    assert d["min_h"] > 0.8 * p.h0_m
    assert d["max_rossby"] < 3.0
    assert abs(d["mean_h"] - p.h0_m) < 1e-10
    # the jets have broken up: the flow varies along x, not just a zonal Kolmogorov flow
    u = s[0]
    assert np.sqrt(((u - u.mean(axis=1, keepdims=True)) ** 2).mean()) > 0.2 * d["rms_speed"]


# ------------------------------------------------------------ Fortran twin (MPI)
_MPIF90 = shutil.which("mpif90")
_MPIEXEC = shutil.which("mpiexec")


@pytest.fixture(scope="module")
def selftest_exe(tmp_path_factory) -> Path:
    assert _MPIF90 and _MPIEXEC, "mpif90/mpiexec not found: run `make setup`"
    build = tmp_path_factory.mktemp("sw_build")
    exe = build / "sw_selftest"
    flags = ["-O2", "-g", "-fimplicit-none", "-Wall", "-fcheck=bounds"]
    if platform.machine() not in ("x86_64", "AMD64"):
        flags.append("-ffp-contract=off")        # no FMA contraction: keep bit-identity
    src = [REPO / "fortran_stubs" / "sw_dynamics.f90", REPO / "fortran_stubs" / "sw_selftest.f90"]
    subprocess.run([_MPIF90, *flags, "-J", str(build), "-o", str(exe), *map(str, src)],
                   check=True, cwd=build, timeout=120)
    return exe


def _run_selftest(exe: Path, nranks: int, nsteps: int, out: Path, extra=()):
    subprocess.run([_MPIEXEC, "-n", str(nranks), str(exe), str(nsteps), str(out), *map(str, extra)],
                   check=True, timeout=120, capture_output=True)


@pytest.mark.parametrize("nranks", [1, 2])
def test_fortran_bit_identical_to_numpy(selftest_exe, tmp_path, nranks):
    nsteps = 200
    out = tmp_path / f"sw_{nranks}.bin"
    _run_selftest(selftest_exe, nranks, nsteps, out)
    m = ShallowWater(ShallowWaterParams())
    p = m.params
    a = np.fromfile(out, dtype="<f8").reshape(2, 3, p.ny, p.nx)
    s0 = m.default_initial_state()
    assert np.array_equal(a[0], s0)
    s1 = m.step(s0, nsteps)
    assert np.abs(a[1] - s1).max() <= 1e-10 * np.abs(s1).max()      # the contract
    assert np.array_equal(a[1], s1)                                   # what we actually get


def test_fortran_nonsquare_grid_bit_identical(selftest_exe, tmp_path):
    """nx != ny and dx != dy catch any i/j or dx/dy mix-up; 1 and 2 ranks agree exactly."""
    nx, ny, lx, ly = 24, 16, 1.2e6, 0.64e6
    outs = []
    for nranks in (1, 2):
        out = tmp_path / f"ns_{nranks}.bin"
        _run_selftest(selftest_exe, nranks, 100, out, (nx, ny, lx, ly))
        outs.append(np.fromfile(out, dtype="<f8").reshape(2, 3, ny, nx))
    assert np.array_equal(outs[0], outs[1])
    m = ShallowWater(dataclasses.replace(ShallowWaterParams(), nx=nx, ny=ny, lx_m=lx, ly_m=ly))
    s0 = m.default_initial_state()
    assert np.array_equal(outs[0][0], s0)
    assert np.array_equal(outs[0][1], m.step(s0, 100))
