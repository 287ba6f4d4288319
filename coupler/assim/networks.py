"""Synthetic observing networks for twin (OSSE) experiments, and synthetic observations.

A network is a tuple ``(var_index, x, y)`` of 1-D arrays (int64, float64, float64) giving,
for each observation, the observed variable and its location in grid-index units (0-based,
periodic, see :mod:`coupler.assim.base`). All network points here are grid points
(integer coordinates), so ``H`` selects state elements exactly. Order: by observed variable
(in the order of ``var_indices``), then by grid point in C order (``y`` slowest).

Synthetic observations of a nature run ``x_true`` are ``y = H x_true + eps`` with
``eps ~ N(0, diag(sigma_v^2))`` independent across observations (the ``R`` that the analysis
then assumes: a perfect-``R`` twin experiment).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from coupler.assim.base import Observations
from coupler.assim.obs_operator import observation_operator

__all__ = ["make_network", "synthesize", "NETWORK_KINDS"]

NETWORK_KINDS = ("all", "every_k", "stations", "fraction")


def _rng(rng, what: str) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise ValueError(f"rng: {what} is random and needs a numpy Generator "
                         "(or an int seed), got None")
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng: expected a numpy Generator or an int seed, got {rng!r}")


def make_network(kind: str, shape: tuple[int, int, int], var_indices: Sequence[int], *,
                 every_k: int = 2, n_stations: int = 100, fraction: float = 0.1,
                 rng: np.random.Generator | int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observation locations of a synthetic network.

    Args:
        kind: ``"all"``: every grid point of each observed variable;
            ``"every_k"``: grid points with ``x`` and ``y`` multiples of ``every_k`` (for
            ``ny == 1``, Lorenz-96, every ``every_k``-th variable: ``every_k=2`` observes every
            other variable); ``"stations"``: ``n_stations`` distinct random grid points, the
            same locations for every observed variable (a radiosonde-like network);
            ``"fraction"``: ``round(fraction*ny*nx)`` (at least 1) distinct random grid
            points drawn independently for each observed variable.
        shape: state shape ``(nvar, ny, nx)``.
        var_indices: the observed variables (distinct ints in ``[0, nvar)``), non-empty.
        every_k, n_stations, fraction: parameters of the kinds above (others ignored).
        rng: ``numpy.random.Generator`` (or int seed); required for the random kinds.

    Returns:
        ``(var_index, x, y)``: int64, float64, float64 arrays of equal length ``p``.

    Raises:
        ValueError: unknown ``kind`` or bad argument (named with its value).
    """
    if kind not in NETWORK_KINDS:
        raise ValueError(f"kind: expected one of {NETWORK_KINDS}, got {kind!r}")
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
        raise ValueError(f"shape: expected (nvar, ny, nx) of positive ints, got {shape!r}")
    nvar, ny, nx = (int(s) for s in shape)
    vars_ = np.asarray(var_indices)
    if (vars_.ndim != 1 or vars_.size == 0 or not np.issubdtype(vars_.dtype, np.integer)
            or np.any((vars_ < 0) | (vars_ >= nvar)) or np.unique(vars_).size != vars_.size):
        raise ValueError(f"var_indices: expected distinct ints in [0, {nvar}), got {var_indices!r}")
    vars_ = vars_.astype(np.int64)
    npts = ny * nx

    if kind == "all":
        per_var = [np.arange(npts)] * vars_.size
    elif kind == "every_k":
        if isinstance(every_k, bool) or int(every_k) != every_k or every_k < 1:
            raise ValueError(f"every_k: must be a positive int, got {every_k!r}")
        k = int(every_k)
        jj = np.arange(0, ny, k) if ny > 1 else np.zeros(1, dtype=np.int64)
        ii = np.arange(0, nx, k)
        per_var = [(jj[:, None] * nx + ii[None, :]).ravel()] * vars_.size
    elif kind == "stations":
        if isinstance(n_stations, bool) or int(n_stations) != n_stations or not 1 <= n_stations <= npts:
            raise ValueError(f"n_stations: must be an int in [1, {npts}] (grid points), "
                             f"got {n_stations!r}")
        g = _rng(rng, f"network kind {kind!r}")
        pts = np.sort(g.choice(npts, size=int(n_stations), replace=False))
        per_var = [pts] * vars_.size
    else:  # fraction
        if not (np.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"fraction: must be in (0, 1], got {fraction!r}")
        g = _rng(rng, f"network kind {kind!r}")
        m = max(1, int(round(fraction * npts)))
        per_var = [np.sort(g.choice(npts, size=m, replace=False)) for _ in vars_]

    var_index = np.concatenate([np.full(p.size, v, dtype=np.int64) for v, p in zip(vars_, per_var)])
    flat = np.concatenate(per_var)
    j, i = np.divmod(flat, nx)
    return var_index, i.astype(np.float64), j.astype(np.float64)


def synthesize(truth: np.ndarray, network: tuple[np.ndarray, np.ndarray, np.ndarray],
               error_std_per_var: float | Sequence[float], rng: np.random.Generator | int
               ) -> Observations:
    """Synthetic observations ``y = H x_true + eps``, ``eps ~ N(0, sigma^2)``.

    Args:
        truth: the true state ``(nvar, ny, nx)``.
        network: ``(var_index, x, y)`` as returned by :func:`make_network` (fractional
            coordinates are allowed: ``H`` interpolates bilinearly).
        error_std_per_var: observation-error standard deviation, a scalar for every
            variable or a sequence of length ``nvar`` indexed by variable (> 0 where used).
        rng: ``numpy.random.Generator`` (or int seed) for the errors.

    Returns:
        :class:`Observations` with ``error_std`` the per-observation sigma (so ``R`` is right).
    """
    x_true = np.asarray(truth, dtype=np.float64)
    if x_true.ndim != 3:
        raise ValueError(f"truth: expected shape (nvar, ny, nx), got {x_true.shape}")
    if not np.all(np.isfinite(x_true)):
        raise ValueError("truth: contains non-finite values")
    nvar = x_true.shape[0]
    try:
        var_index, x, y = (np.asarray(a) for a in network)
    except (TypeError, ValueError):
        raise ValueError(f"network: expected a (var_index, x, y) tuple, got {type(network).__name__}") from None
    sig = np.asarray(error_std_per_var, dtype=np.float64)
    if sig.ndim == 0:
        sig = np.full(nvar, float(sig))
    if sig.shape != (nvar,):
        raise ValueError(f"error_std_per_var: expected a scalar or {nvar} values, "
                         f"got {error_std_per_var!r}")
    g = _rng(rng, "synthesize")
    var_index = var_index.astype(np.int64)
    if var_index.size and np.any((var_index < 0) | (var_index >= nvar)):
        raise ValueError(f"network: var_index outside [0, {nvar})")
    sigma = sig[var_index]
    if sigma.size and not np.all(np.isfinite(sigma) & (sigma > 0)):
        raise ValueError(f"error_std_per_var: must be finite and > 0 for every observed "
                         f"variable, got {error_std_per_var!r}")
    locs = Observations(np.zeros(var_index.size), np.ones(var_index.size), var_index,
                        x.astype(np.float64), y.astype(np.float64))
    H = observation_operator(locs, x_true.shape)
    value = H @ x_true.ravel() + sigma * g.standard_normal(var_index.size)
    return Observations(value, sigma, var_index, locs.x, locs.y)
