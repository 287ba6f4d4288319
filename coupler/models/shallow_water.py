"""Forced, dissipative, doubly periodic 2-D rotating shallow water (numpy reference).

This is the numpy twin of the Fortran module ``fortran_stubs/sw_dynamics.f90``. The two
evaluate every grid-point value with the same floating-point operations in the same
order, so they agree bit for bit (only IEEE ``+ - * /``; the few sines needed are computed
by the shared Taylor-series routine :func:`sin_2pi_frac`, not by a libm or SIMD ``sin``).
Change one, change the other.

Equations (reduced-gravity layer on an f-plane, vector-invariant momentum, flux-form mass)::

    du/dt =  q * (h v)  - dB/dx - r u - nu4 lap(lap(u)) + F_u(y)
    dv/dt = -q * (h u)  - dB/dy - r v - nu4 lap(lap(v))
    dh/dt = -d(h u)/dx - d(h v)/dy

    q = (f0 + zeta) / h      potential vorticity, 1/(m s);  zeta = dv/dx - du/dy, 1/s
    B = g h + (u^2 + v^2)/2  Bernoulli function, m^2/s^2
    F_u(y) = F0 sin(2 pi k y / Ly)   steady Kolmogorov body force, m/s^2

``u, v`` in m/s, ``h`` (layer thickness) in m, ``g`` the (reduced) gravity in m/s^2,
``r`` linear drag in 1/s, ``nu4`` biharmonic viscosity in m^4/s, ``F0`` in m/s^2.

Grid (Arakawa C, doubly periodic, ``dx = lx/nx``, ``dy = ly/ny``). Python arrays are
``a[j, i]`` (0-based; ``j`` is y, ``i`` is x, x fastest); Fortran arrays are ``a(I, J)``
with ``I = i + 1``, ``J = j + 1``:

==========  ======================================  ======================================
quantity    position of Python ``[j, i]``           Fortran ``(I, J)`` in cell units
==========  ======================================  ======================================
``h``       ``x=(i+1/2)dx, y=(j+1/2)dy``  (centre)  ``(I, J)``
``u``       ``x=i dx,      y=(j+1/2)dy``  (west)    ``(I-1/2, J)``
``v``       ``x=(i+1/2)dx, y=j dy``       (south)   ``(I, J-1/2)``
``q, zeta`` ``x=i dx,      y=j dy``       (SW corner) ``(I-1/2, J-1/2)``
==========  ======================================  ======================================

Discretisation (``[j, i]`` indices are periodic; every formula below is evaluated in
exactly this order, with this parenthesisation, in both languages)::

    hu[j,i]  = 0.5*(h[j,i-1] + h[j,i])            U = hu*u      (u points, m^2/s)
    hv[j,i]  = 0.5*(h[j-1,i] + h[j,i])            V = hv*v      (v points, m^2/s)
    dh       = -((U[j,i+1] - U[j,i])*rdx + (V[j+1,i] - V[j,i])*rdy)
    zeta     = (v[j,i] - v[j,i-1])*rdx - (u[j,i] - u[j-1,i])*rdy
    hq       = 0.25*((h[j,i] + h[j,i-1]) + (h[j-1,i] + h[j-1,i-1]))
    q        = (f0 + zeta)/hq
    ke       = 0.25*((u[j,i]*u[j,i] + u[j,i+1]*u[j,i+1]) + (v[j,i]*v[j,i] + v[j+1,i]*v[j+1,i]))
    B        = g*h + ke
    qV       = q * (0.5*(V[j,i-1] + V[j,i]))      (corners)
    qU       = q * (0.5*(U[j-1,i] + U[j,i]))      (corners)
    lap(a)   = ((a[j,i+1] + a[j,i-1]) - 2*a)*rdx2 + ((a[j+1,i] + a[j-1,i]) - 2*a)*rdy2
    du       = ((( 0.5*(qV[j,i] + qV[j+1,i]) - (B[j,i] - B[j,i-1])*rdx) - r*u) - nu4*lap(lap(u))) + Fu[j]
    dv       = (((-0.5*(qU[j,i] + qU[j,i+1])) - (B[j,i] - B[j-1,i])*rdy) - r*v) - nu4*lap(lap(v))

with ``rdx = 1/dx``, ``rdy = 1/dy``, ``rdx2 = rdx*rdx``, ``rdy2 = rdy*rdy``. The Coriolis
/ vorticity term is Sadourny's (1975) energy-conserving form; the mass flux divergence
telescopes, so the domain-mean ``h`` is conserved to round-off. The biharmonic term
reaches two rows in ``y`` on each side (everything else one), so the Fortran slab
decomposition uses a 2-row halo.

Time stepping: classical RK4 ::

    k1 = T(s); k2 = T(s + (0.5*dt)*k1); k3 = T(s + (0.5*dt)*k2); k4 = T(s + dt*k3)
    s_new = s + (dt/6)*(((k1 + 2*k2) + 2*k3) + k4)

Default parameters (see :class:`ShallowWaterParams`): 64 x 64 over 3200 km x 3200 km
(dx = 50 km), reduced gravity g' = 1.8 m/s^2 with h0 = 500 m, so the gravity-wave speed
is c = sqrt(g' h0) = 30 m/s and the deformation radius Ld = c/f0 = 300 km = 6 dx;
dt = 900 s (gravity-wave Courant number c dt/dx = 0.54). The k = 8 Kolmogorov force
(F0 = 3e-6 m/s^2, wavelength 400 km) spins up 8 eastward and 8 westward jets, which break
up by barotropic instability at day ~12-15; after a 20-day spin-up the flow is
statistically steady geostrophic turbulence (RMS speed ~1.35 m/s, RMS h anomaly ~11 m,
max |zeta|/f ~0.6-1) with an error-doubling time of ~4 days (twins 1e-6 m apart reach
0.1 m/s differences at day ~90 and are decorrelated by day ~110). Lowering F0 to
2e-6 m/s^2 gives RMS ~1.0 m/s but a slower doubling (~5.5 days).
"""
from __future__ import annotations

from dataclasses import dataclass
import math

import numpy as np

__all__ = [
    "ShallowWaterParams",
    "ShallowWater",
    "sin_2pi_frac",
    "PI",
    "INITIAL_MODES",
    "INITIAL_AMPLITUDE_M",
]

#: pi as the float64 literal used by both implementations (== ``math.pi``).
PI = 3.141592653589793

#: Taylor-series length of :func:`sin_2pi_frac` (argument reduced to ``[-pi/2, pi/2]``).
_N_TAYLOR = 12

#: Initial height perturbation: ``(kx, ky, phase_eighths, weight)`` per mode, summed in
#: this order; see :meth:`ShallowWater.default_initial_state`.
INITIAL_MODES = (
    (1, 1, 1, 1.0),
    (2, -1, 3, 0.7),
    (3, 2, 5, 0.5),
    (1, 3, 7, 0.3),
)

#: Amplitude of the initial height perturbation, m.
INITIAL_AMPLITUDE_M = 5.0


def sin_2pi_frac(m, n: int) -> np.ndarray:
    """``sin(2 pi m / n)`` for integer ``m`` (array) and positive integer ``n``.

    Deterministic, libm-free twin of the Fortran ``sin_2pi_frac``: the reduction to
    ``x in [-pi/2, pi/2]`` is done exactly in integers (``sin(pi - x) = sin(x)``), then a
    12-term Taylor series is summed term by term with ``+ - * /`` only, so numpy and
    gfortran give bit-identical results. Accuracy ~1 ulp (|error| < 3e-16).

    Args:
        m: integer array (any shape), the numerator.
        n: the denominator, > 0.

    Returns:
        float64 array of ``m``'s shape.
    """
    n4 = 4 * int(n)
    r = (4 * np.asarray(m, dtype=np.int64)) % n4          # 0 .. n4-1  (angle 2 pi r/n4)
    r = np.where(2 * r >= n4, r - n4, r)                   # -n4/2 .. n4/2-1  ([-pi, pi))
    r = np.where(4 * r > n4, n4 // 2 - r, r)               # fold (pi/2, pi)  -> (0, pi/2)
    r = np.where(4 * r < -n4, -(n4 // 2) - r, r)           # fold [-pi,-pi/2) -> (-pi/2, 0]
    x = ((2.0 * PI) * r.astype(np.float64)) / float(n4)
    x2 = x * x
    term = x
    s = x
    for k in range(1, _N_TAYLOR + 1):
        term = -term * x2 / float((2 * k) * (2 * k + 1))
        s = s + term
    return s


@dataclass(frozen=True)
class ShallowWaterParams:
    """Parameters of the shallow-water testbed (SI units). Defaults: the tuned testbed.

    Attributes:
        nx, ny: grid points in x and y (ny must be divisible by the Fortran rank count).
        lx_m, ly_m: domain size, m (default 3200 km: dx = dy = 50 km).
        dt_s: RK4 time step, s (default 900 s: gravity-wave Courant number
            c dt/dx = 0.54; RK4 on this C-grid is stable up to c dt/dx ~ 1.0, i.e.
            2 sqrt(2) c dt/dx <= 2 sqrt(2), the RK4 limit on the imaginary axis).
        f0: Coriolis parameter, 1/s (f-plane).
        g: reduced gravity g', m/s^2 (default 1.8 with h0 = 500 m: c = 30 m/s,
            Ld = c/f0 = 300 km = 6 dx).
        h0_m: mean layer thickness, m.
        viscosity: **biharmonic** viscosity nu4, m^4/s (the term is ``-nu4 lap(lap(u))``;
            with the discrete operator, the default 1e12 damps a 2 dx wave with e-folding
            time ~4.5 days, the 2 dx checkerboard ~1.1 days, the 400 km forcing scale
            ~190 days).
        drag: linear (Rayleigh) drag r on u and v, 1/s (default 3e-7: 1/r ~ 39 days).
        forcing_amp: amplitude F0 of the zonal body force ``F_u = F0 sin(2 pi k y/ly)``,
            m/s^2 (acceleration, applied to u).
        forcing_wavenumber: k, forcing wavelengths across ly.
    """

    nx: int = 64
    ny: int = 64
    lx_m: float = 3.2e6
    ly_m: float = 3.2e6
    dt_s: float = 900.0
    f0: float = 1.0e-4
    g: float = 1.8
    h0_m: float = 500.0
    viscosity: float = 1.0e12
    drag: float = 3.0e-7
    forcing_amp: float = 3.0e-6
    forcing_wavenumber: int = 8

    def __post_init__(self) -> None:
        if self.nx < 3 or self.ny < 3:
            raise ValueError("ShallowWaterParams: nx and ny must be >= 3")
        for name in ("lx_m", "ly_m", "dt_s", "g", "h0_m"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ShallowWaterParams.{name} must be > 0")
        for name in ("viscosity", "drag"):
            if getattr(self, name) < 0:
                raise ValueError(f"ShallowWaterParams.{name} must be >= 0")

    @property
    def dx_m(self) -> float:
        """Grid spacing in x, m."""
        return self.lx_m / self.nx

    @property
    def dy_m(self) -> float:
        """Grid spacing in y, m."""
        return self.ly_m / self.ny

    @property
    def wave_speed(self) -> float:
        """Gravity-wave speed ``c = sqrt(g h0)``, m/s."""
        return math.sqrt(self.g * self.h0_m)

    @property
    def deformation_radius_m(self) -> float:
        """Rossby radius of deformation ``Ld = c / |f0|``, m (inf if f0 == 0)."""
        return self.wave_speed / abs(self.f0) if self.f0 else math.inf

    @property
    def courant_number(self) -> float:
        """Gravity-wave Courant number ``c dt / min(dx, dy)`` (dimensionless)."""
        return self.wave_speed * self.dt_s / min(self.dx_m, self.dy_m)

    @property
    def steps_per_day(self) -> float:
        """Model steps per 86400 s."""
        return 86400.0 / self.dt_s


class ShallowWater:
    """Numpy reference of the forced-dissipative rotating shallow-water model.

    A state is a float64 array ``(..., 3, ny, nx)``: ``state[..., 0] = u`` (m/s),
    ``[..., 1] = v`` (m/s), ``[..., 2] = h`` (m), C order (= Fortran ``state(nx, ny, 3)``).
    Leading axes are batch (ensemble) axes; members are independent.
    """

    variables = ("u", "v", "h")

    def __init__(self, params: ShallowWaterParams | None = None):
        self.params = ShallowWaterParams() if params is None else params
        p = self.params
        dx = p.lx_m / float(p.nx)
        dy = p.ly_m / float(p.ny)
        self._rdx = 1.0 / dx
        self._rdy = 1.0 / dy
        self._rdx2 = self._rdx * self._rdx
        self._rdy2 = self._rdy * self._rdy
        self.forcing_u = self.forcing_profile(p)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def forcing_profile(p: ShallowWaterParams) -> np.ndarray:
        """Zonal body force at the u rows, ``Fu[j] = F0 sin(2 pi k (j+1/2) / ny)``, m/s^2.

        Shape ``(ny, 1)`` (broadcasts over x). ``y = (j+1/2) dy`` is the latitude of row ``j``
        of u (and h); the sine argument is the exact fraction ``k (2j+1) / (2 ny)``.
        """
        j = np.arange(p.ny, dtype=np.int64)
        s = sin_2pi_frac(p.forcing_wavenumber * (2 * j + 1), 2 * p.ny)
        return (p.forcing_amp * s)[:, None]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The state shape ``(3, ny, nx)``."""
        return (3, self.params.ny, self.params.nx)

    def default_initial_state(self) -> np.ndarray:
        """Deterministic initial state, shape ``(3, ny, nx)``: rest plus a small h bump.

        ``u = v = 0``; ``h = h0 + A * sum_m w_m sin(2 pi (kx_m x/lx + ky_m y/ly + p_m/8))``
        at the h points ``x = (i+1/2) dx``, ``y = (j+1/2) dy`` with ``A`` =
        :data:`INITIAL_AMPLITUDE_M` (m) and the modes :data:`INITIAL_MODES` (summed in
        that order, starting from 0). Each sine argument is the exact fraction
        ``(kx (2i+1) ny 8 + ky (2j+1) nx 8 + p 2 nx ny) / (16 nx ny)``. The Fortran
        ``sw_default_initial_state`` produces the bit-identical array. The bump is not in
        balance: it sheds a few gravity waves while the forcing spins up the jets, and
        seeds their (barotropic) instability with several x wavenumbers.
        """
        p = self.params
        nx, ny = p.nx, p.ny
        i = np.arange(nx, dtype=np.int64)[None, :]
        j = np.arange(ny, dtype=np.int64)[:, None]
        pert = np.zeros((ny, nx))
        for kx, ky, ph, w in INITIAL_MODES:
            m = kx * (2 * i + 1) * ny * 8 + ky * (2 * j + 1) * nx * 8 + ph * 2 * nx * ny
            pert = pert + w * sin_2pi_frac(m, 16 * nx * ny)
        state = np.zeros((3, ny, nx))
        state[2] = p.h0_m + INITIAL_AMPLITUDE_M * pert
        return state

    # --------------------------------------------------------------- dynamics
    def tendency(self, state: np.ndarray) -> np.ndarray:
        """``d state / dt`` for a state ``(..., 3, ny, nx)``; units m/s^2, m/s^2, m/s.

        See the module docstring for the exact discrete formulas.
        """
        state = np.asarray(state, dtype=np.float64)
        if state.shape[-3:] != self.shape:
            raise ValueError(f"ShallowWater.tendency: expected (..., {self.shape}), got {state.shape}")
        p = self.params
        rdx, rdy, rdx2, rdy2 = self._rdx, self._rdy, self._rdx2, self._rdy2
        u = state[..., 0, :, :]
        v = state[..., 1, :, :]
        h = state[..., 2, :, :]

        # periodic neighbours: a[j, i-1], a[j, i+1], a[j-1, i], a[j+1, i]
        def xm(a): return np.roll(a, 1, axis=-1)
        def xp(a): return np.roll(a, -1, axis=-1)
        def ym(a): return np.roll(a, 1, axis=-2)
        def yp(a): return np.roll(a, -1, axis=-2)

        # mass fluxes, m^2/s
        U = (0.5 * (xm(h) + h)) * u                       # u points
        V = (0.5 * (ym(h) + h)) * v                       # v points
        dh = -((xp(U) - U) * rdx + (yp(V) - V) * rdy)     # h points, m/s

        # potential vorticity at corners, 1/(m s)
        zeta = (v - xm(v)) * rdx - (u - ym(u)) * rdy
        hm = xm(h)
        hq = 0.25 * ((h + hm) + (ym(h) + ym(hm)))
        q = (p.f0 + zeta) / hq

        # Bernoulli function at h points, m^2/s^2
        vp = yp(v)
        up = xp(u)
        ke = 0.25 * ((u * u + up * up) + (v * v + vp * vp))
        B = p.g * h + ke

        qV = q * (0.5 * (xm(V) + V))                      # corners
        qU = q * (0.5 * (ym(U) + U))                      # corners

        def lap(a):  # 5-point Laplacian, units of a / m^2
            return ((xp(a) + xm(a)) - 2.0 * a) * rdx2 + ((yp(a) + ym(a)) - 2.0 * a) * rdy2
        bihu = lap(lap(u))                                # 1/(m^3 s)
        bihv = lap(lap(v))

        du = (((0.5 * (qV + yp(qV)) - (B - xm(B)) * rdx) - p.drag * u)
              - p.viscosity * bihu) + self.forcing_u
        dv = (((-0.5 * (qU + xp(qU))) - (B - ym(B)) * rdy) - p.drag * v) - p.viscosity * bihv
        return np.stack([du, dv, dh], axis=-3)

    def step(self, state: np.ndarray, n_steps: int = 1) -> np.ndarray:
        """Advance ``n_steps`` classical RK4 steps of ``dt_s``; returns a new array.

        ``state`` has shape ``(..., 3, ny, nx)`` (batch axes allowed, not modified).
        """
        p = self.params
        dt = p.dt_s
        half = 0.5 * dt
        dt6 = dt / 6.0
        s = np.array(state, dtype=np.float64, copy=True)
        for _ in range(int(n_steps)):
            k1 = self.tendency(s)
            k2 = self.tendency(s + half * k1)
            k3 = self.tendency(s + half * k2)
            k4 = self.tendency(s + dt * k3)
            acc = k1 + 2.0 * k2
            acc = acc + 2.0 * k3
            acc = acc + k4
            s = s + dt6 * acc
        return s

    # ------------------------------------------------------------ diagnostics
    def mean_depth(self, state: np.ndarray) -> np.ndarray:
        """Domain-mean h, m, shape ``(...)`` (conserved)."""
        return np.asarray(state)[..., 2, :, :].mean(axis=(-2, -1))

    def energy(self, state: np.ndarray) -> np.ndarray:
        """Domain-mean total energy per unit area divided by density, m^3/s^2, shape ``(...)``.

        ``E = mean( h * ke + g (h - h0)^2 / 2 )`` with ``ke`` the h-point kinetic energy of
        the discretisation (conserved by the inviscid, unforced scheme up to time-stepping
        error).
        """
        s = np.asarray(state)
        u, v, h = s[..., 0, :, :], s[..., 1, :, :], s[..., 2, :, :]
        ke = 0.25 * ((u * u + np.roll(u, -1, -1) ** 2) + (v * v + np.roll(v, -1, -2) ** 2))
        return (h * ke + 0.5 * self.params.g * (h - self.params.h0_m) ** 2).mean(axis=(-2, -1))

    def diagnostics(self, state: np.ndarray) -> dict:
        """RMS speed (m/s), RMS h anomaly (m), min h (m), mean h (m), energy, max Rossby number."""
        s = np.asarray(state)
        u, v, h = s[..., 0, :, :], s[..., 1, :, :], s[..., 2, :, :]
        p = self.params
        zeta = (v - np.roll(v, 1, -1)) * self._rdx - (u - np.roll(u, 1, -2)) * self._rdy
        hbar = h.mean(axis=(-2, -1), keepdims=True)
        return {
            "rms_speed": np.sqrt((u * u + v * v).mean(axis=(-2, -1))),
            "rms_h_anomaly": np.sqrt(((h - hbar) ** 2).mean(axis=(-2, -1))),
            "min_h": h.min(axis=(-2, -1)),
            "mean_h": hbar[..., 0, 0],
            "energy": self.energy(s),
            "max_rossby": np.abs(zeta).max(axis=(-2, -1)) / abs(p.f0) if p.f0 else np.inf,
        }
