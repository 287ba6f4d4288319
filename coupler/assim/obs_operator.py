"""The linear observation operator H: bilinear interpolation on the doubly periodic grid.

State vector ordering: a state ``x`` of shape ``(nvar, ny, nx)`` (C order) is flattened to
``x.ravel()`` of length ``n = nvar*ny*nx``; element ``(v, j, i)`` has index
``v*ny*nx + j*nx + i``.

For an observation of variable ``v`` at ``(x, y)`` (grid-index units, 0-based) let
``i0 = floor(x)``, ``j0 = floor(y)``, ``a = x - i0``, ``b = y - j0`` and
``i1 = (i0 + 1) mod nx``, ``j1 = (j0 + 1) mod ny`` (periodic wrap). Then

    (H x)_obs = (1-a)(1-b) x[v, j0, i0] + a (1-b) x[v, j0, i1]
              + (1-a) b     x[v, j1, i0] + a b     x[v, j1, i1].

Zero weights are not stored, so an observation at integer coordinates is a single entry of
weight 1 (H selects the grid point exactly). For ``ny == 1`` (Lorenz-96, a 1-D ring) only
``x`` is interpolated (``b = 0``, ``j0 = 0``); ``y`` must still lie in ``[0, 1)``. Likewise
``nx == 1`` interpolates in ``y`` only.

Footprint observations (``Observations.footprint`` ``w >= 1``, satellite-like area averages;
see :class:`coupler.assim.base.Observations`): with ``wx = w`` if ``nx > 1`` else 1,
``wy = w`` if ``ny > 1`` else 1, ``i0 = x - (wx-1)/2`` and ``j0 = y - (wy-1)/2`` (integers,
otherwise an error; along an axis of length 1 the coordinate is simply floored to 0),

    (H x)_obs = 1/(wx wy) sum_{q=0}^{wy-1} sum_{r=0}^{wx-1} x[v, (j0+q) mod ny, (i0+r) mod nx],

i.e. weight ``1/w^2`` on each of the ``w x w`` box points (``1/w`` on a ``w``-point segment
when ``ny == 1``). ``w`` may not exceed ``nx`` (if ``nx > 1``) nor ``ny`` (if ``ny > 1``), so a
box never covers a grid point twice. Rows sum to 1 for every kind.

Point and footprint rows mix freely in one matrix (one cycle can hold stations and satellite
footprints); :class:`coupler.assim.obs_torch.TorchObservationOperator` is built from this same
matrix, so the numpy and torch methods see the same ``H``.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from coupler.assim.base import Observations

__all__ = ["observation_operator"]


def _check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
        raise ValueError(f"shape: expected (nvar, ny, nx) of positive ints, got {shape!r}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def observation_operator(obs: Observations, shape: tuple[int, int, int]) -> sp.csr_matrix:
    """Observation operator on the periodic grid: bilinear points and box-average footprints.

    Args:
        obs: the ``p`` observations (only ``var_index``, ``x``, ``y`` and ``footprint`` are
            used).
        shape: the state shape ``(nvar, ny, nx)``.

    Returns:
        ``H``, a ``scipy.sparse.csr_matrix`` of shape ``(p, nvar*ny*nx)``, float64, sorted
        column indices, no explicit zeros: a point row has at most four non-zeros (one for an
        observation at integer coordinates), a footprint row ``wx*wy`` non-zeros of
        ``1/(wx*wy)``; rows sum to 1 (to round-off).

    Raises:
        ValueError: ``var_index`` not an integer in ``[0, nvar)``, ``x`` outside ``[0, nx)``
            or ``y`` outside ``[0, ny)`` (non-finite coordinates included), a footprint larger
            than the grid or whose centre is not aligned with its box (``x - (w-1)/2`` not an
            integer); each message names the field, the first offending observation and value.
    """
    nvar, ny, nx = _check_shape(shape)
    n = nvar * ny * nx
    p = len(obs)
    if p == 0:
        return sp.csr_matrix((0, n))

    vi = np.asarray(obs.var_index)
    if not np.issubdtype(vi.dtype, np.integer):
        if not np.all(np.isfinite(vi)) or np.any(vi != np.round(vi)):
            raise ValueError("Observations.var_index: values must be integers")
    vi = vi.astype(np.int64)
    x = np.asarray(obs.x, dtype=np.float64)
    y = np.asarray(obs.y, dtype=np.float64)

    bad = np.flatnonzero((vi < 0) | (vi >= nvar))
    if bad.size:
        raise ValueError(
            f"Observations.var_index: {bad.size} value(s) outside [0, {nvar}), "
            f"first at obs {bad[0]}: var_index={vi[bad[0]]}")
    for name, c, m in (("x", x, nx), ("y", y, ny)):
        bad = np.flatnonzero(~((c >= 0.0) & (c < m)))  # also catches NaN
        if bad.size:
            raise ValueError(
                f"Observations.{name}: {bad.size} coordinate(s) outside [0, {m}), "
                f"first at obs {bad[0]}: {name}={float(c[bad[0]])!r}")

    fp = np.asarray(obs.footprint, dtype=np.float64)
    pt, bx = np.flatnonzero(fp == 0), np.flatnonzero(fp > 0)
    rows_p, cols_p, w_p = _point_rows(vi[pt], x[pt], y[pt], ny, nx)
    rows_f, cols_f, w_f = _footprint_rows(vi[bx], x[bx], y[bx], fp[bx].astype(np.int64), bx, ny, nx)
    # no duplicate (row, col) pairs in either kind, so the COO -> CSR conversion sums nothing
    H = sp.csr_matrix((np.concatenate([w_p, w_f]), (np.concatenate([pt[rows_p], rows_f]),
                                                    np.concatenate([cols_p, cols_f]))), shape=(p, n))
    H.sort_indices()
    return H


def _point_rows(vi: np.ndarray, x: np.ndarray, y: np.ndarray, ny: int, nx: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO triplets ``(row, col, weight)`` of bilinear point rows, row-major (rows ascending),
    zero weights dropped; ``row`` indexes the given observations."""
    p = vi.size
    # nx == 1 (or ny == 1): the field is constant along that axis, interpolate along the
    # other one only; otherwise i0 != i1 and j0 != j1, so a row has no duplicate columns.
    i0 = np.floor(x).astype(np.int64)
    a = x - i0 if nx > 1 else np.zeros(p)
    i1 = (i0 + 1) % nx
    if ny == 1:
        j0 = np.zeros(p, dtype=np.int64)
        b = np.zeros(p)
    else:
        j0 = np.floor(y).astype(np.int64)
        b = y - j0
    j1 = (j0 + 1) % ny

    base = vi * (ny * nx)
    cols = np.stack([base + j0 * nx + i0, base + j0 * nx + i1,
                     base + j1 * nx + i0, base + j1 * nx + i1], axis=1)
    w = np.stack([(1 - a) * (1 - b), a * (1 - b), (1 - a) * b, a * b], axis=1)
    keep = w != 0.0                                   # no explicit zeros in H
    rows = np.broadcast_to(np.arange(p, dtype=np.int64)[:, None], keep.shape)
    return rows[keep], cols[keep], w[keep]


def _footprint_rows(vi: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray, which: np.ndarray,
                    ny: int, nx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO triplets ``(row, col, weight)`` of footprint (box-average) rows; ``row`` is taken from
    ``which`` (the observations' indices in the full set, also used in error messages)."""
    boxes = []
    for name, c, m in (("x", x, nx), ("y", y, ny)):
        if m == 1:                                   # an axis of length 1: extent 1, start 0
            boxes.append((np.ones_like(w), np.zeros_like(w)))
            continue
        bad = np.flatnonzero(w > m)
        if bad.size:
            k = which[bad[0]]
            raise ValueError(
                f"Observations.footprint: {bad.size} footprint(s) wider than the grid "
                f"({'nx' if name == 'x' else 'ny'} = {m}), first at obs {k}: footprint={int(w[bad[0]])}")
        start = c - (w - 1) / 2.0
        bad = np.flatnonzero(start != np.round(start))
        if bad.size:
            k = which[bad[0]]
            raise ValueError(
                f"Observations.{name}: {bad.size} footprint centre(s) not aligned with the grid, first at "
                f"obs {k}: {name}={float(c[bad[0]])!r} with footprint={int(w[bad[0]])} (expected {name} - (footprint-1)/2 "
                f"to be an integer: a grid point for an odd footprint, half-way between two for an even one)")
        boxes.append((w, np.round(start).astype(np.int64)))
    (wx, i0), (wy, j0) = boxes
    counts = wx * wy
    rows = np.repeat(which.astype(np.int64), counts)
    # position of each entry inside its box, row-major (y slowest): q = k // wx, r = k % wx
    first = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(rows.size, dtype=np.int64) - first
    rw = np.repeat(wx, counts)
    q, r = np.divmod(k, rw)
    j = (np.repeat(j0, counts) + q) % ny
    i = (np.repeat(i0, counts) + r) % nx
    cols = np.repeat(vi, counts) * (ny * nx) + j * nx + i
    weight = 1.0 / np.repeat(counts, counts).astype(np.float64)
    return rows, cols, weight
