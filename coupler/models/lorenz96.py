"""Lorenz-96, the numpy reference of ``fortran_stubs/l96_host.f90``.

    dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F,   i periodic,

integrated with classical RK4. The operation order matches the Fortran host term by term,
so the two agree to round-off (``tests/test_fortran_hosts.py``).

References:
    Lorenz (1996), Predictability: a problem partly solved. Sakov & Oke (2008) set-up:
    n = 40, F = 8, dt = 0.05 (about 6 h), as reproduced by DAPPER.
"""
from __future__ import annotations

import numpy as np


class Lorenz96:
    """Lorenz-96 on states of shape ``(..., 1, 1, n)`` (the lodas ``(nvar, ny, nx)`` convention).

    Args:
        n: number of variables.
        forcing: F.
        dt: RK4 time step in model time units.
    """

    variables = ("x",)

    def __init__(self, n: int = 40, forcing: float = 8.0, dt: float = 0.05):
        self.n, self.forcing, self.dt = n, float(forcing), float(dt)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, 1, self.n)

    def tendency(self, x: np.ndarray) -> np.ndarray:
        """dx/dt for ``x`` of shape ``(..., n)`` (any leading dims)."""
        return (np.roll(x, -1, axis=-1) - np.roll(x, 2, axis=-1)) * np.roll(x, 1, axis=-1) - x + self.forcing

    def step(self, state: np.ndarray, n_steps: int = 1) -> np.ndarray:
        """Advance ``state`` (``(..., 1, 1, n)`` or ``(..., n)``) by ``n_steps`` RK4 steps."""
        x = np.array(state, dtype=np.float64)
        dt, f = self.dt, self.tendency
        for _ in range(n_steps):
            k1 = f(x)
            k2 = f(x + (0.5 * dt) * k1)
            k3 = f(x + (0.5 * dt) * k2)
            k4 = f(x + dt * k3)
            x = x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return x

    def default_initial_state(self) -> np.ndarray:
        """x = F everywhere, x_20 = F + 0.01 (1-based): the Fortran host's default."""
        x = np.full(self.shape, self.forcing)
        x[..., 19] += 0.01
        return x
