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
    """Bilinear-interpolation observation operator on the periodic grid.

    Args:
        obs: the ``p`` observations (only ``var_index``, ``x`` and ``y`` are used).
        shape: the state shape ``(nvar, ny, nx)``.

    Returns:
        ``H``, a ``scipy.sparse.csr_matrix`` of shape ``(p, nvar*ny*nx)`` with at most four
        non-zeros per row (one for an observation at integer coordinates); rows sum to 1.

    Raises:
        ValueError: ``var_index`` not an integer in ``[0, nvar)``, ``x`` outside ``[0, nx)``
            or ``y`` outside ``[0, ny)`` (non-finite coordinates included).
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
                f"first at obs {bad[0]}: {name}={c[bad[0]]!r}")

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
    indptr = np.zeros(p + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    H = sp.csr_matrix((w[keep], cols[keep], indptr), shape=(p, n))
    H.sort_indices()
    return H
