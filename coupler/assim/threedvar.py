r"""3D-Var with a static homogeneous ``B``, solved in observation space (PSAS form).

The 3D-Var analysis minimises

    J(x) = 1/2 (x - x_b)^T B^{-1} (x - x_b) + 1/2 (y - H x)^T R^{-1} (y - H x)

with ``x_b`` the background (``n = nvar*ny*nx``), ``y`` the ``p`` observations, ``H`` the
linear (bilinear-interpolation) observation operator and ``R = diag(sigma_o^2)``. For linear
``H`` its minimiser is the BLUE

    x_a = x_b + B H^T (H B H^T + R)^{-1} d,       d = y - H x_b  (the innovation, O-B).

The Physical-space Statistical Analysis System (PSAS; Cohn et al. 1998) form solves the
``p x p`` symmetric positive-definite system

    (H B H^T + R) w = d

by preconditioned conjugate gradients, matrix-free (each iteration: one ``H^T``, one
``B`` product by FFT, one ``H``), then forms the increment ``dx = B H^T w``. It needs no
``B^{-1}`` and no square root of ``B``, and ``p << n`` here. The preconditioner is Jacobi,
``diag(H B H^T) + diag(R)``, computed exactly from ``B``'s covariance function.

For small problems (``p*n <= explicit_max``, e.g. Lorenz-96) the same CG runs on the
explicitly formed ``p x p`` matrix ``H B H^T + R``: ``G = B H^T`` costs ``p`` FFT products
in one batched call, after which an iteration is a small dense matvec and ``dx = G w``.
Both paths solve the same system to the same tolerance.

Cost at the analysis, with ``dx = B H^T w``: ``J_b = 1/2 dx^T B^{-1} dx = 1/2 w^T H B H^T w
= 1/2 w . (H dx)`` and ``J_o = 1/2 sum ((y - H x_a)/sigma_o)^2``; at the background
``J = J_o(x_b) = 1/2 sum (d/sigma_o)^2``.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from coupler.assim.base import Analysis, Observations
from coupler.assim.covariance import SpectralCovariance
from coupler.assim.obs_operator import observation_operator

__all__ = ["ThreeDVar", "pcg"]


def pcg(matvec, b: np.ndarray, minv: np.ndarray, *, tol: float, max_iter: int
        ) -> tuple[np.ndarray, int, float]:
    r"""Preconditioned conjugate gradients for ``A w = b``, ``A`` SPD, ``M^{-1} = diag(minv)``.

    Stops when the (recursively updated) residual satisfies ``||b - A w||_2 <= tol ||b||_2``.

    Returns:
        ``(w, iterations, relative_residual)``; ``relative_residual > tol`` means the
        iteration did not converge within ``max_iter`` (the caller decides what to do).

    Raises:
        RuntimeError: breakdown (``p^T A p <= 0``: ``A`` not positive definite).
    """
    w = np.zeros_like(b)
    bnorm = float(np.linalg.norm(b))
    if bnorm == 0.0:
        return w, 0, 0.0
    r = b.copy()
    z = minv * r
    s = z.copy()
    rz = float(r @ z)
    rel = 1.0
    for it in range(1, max_iter + 1):
        As = matvec(s)
        sAs = float(s @ As)
        if not sAs > 0.0:
            raise RuntimeError(f"3D-Var CG breakdown at iteration {it}: s^T A s = {sAs!r} "
                               "(H B H^T + R not positive definite)")
        alpha = rz / sAs
        w += alpha * s
        r -= alpha * As
        rel = float(np.linalg.norm(r)) / bnorm
        if rel <= tol:
            return w, it, rel
        z = minv * r
        rz_new = float(r @ z)
        s = z + (rz_new / rz) * s
        rz = rz_new
    return w, max_iter, rel


class ThreeDVar:
    """3D-Var analysis (PSAS form) with a static :class:`SpectralCovariance` ``B``.

    Args:
        B: the background-error covariance; its ``shape`` must be the state shape.
        cg_tol: relative residual ``||d - (H B H^T + R) w|| / ||d||`` at which CG stops.
        cg_max_iter: iteration limit; exceeding it raises ``RuntimeError``.
        explicit_max: form ``H B H^T`` explicitly when ``p*n`` is at most this (memory
            ``8 p n`` bytes); 0 forces the matrix-free path.

    ``analyse`` returns ``Analysis(increment=dx, spread=None, info=...)`` with ``info`` keys
    ``n_obs``, ``cg_iterations``, ``cg_residual`` (final true relative residual),
    ``omb_mean``, ``omb_rms`` (of ``d = y - H x_b``), ``oma_mean``, ``oma_rms`` (of
    ``y - H x_a``), ``cost_initial`` (``J(x_b)``), ``cost_final`` (``J(x_a)``), ``cost_b``,
    ``cost_o`` (the two terms of ``J(x_a)``). With no observations the increment is zero,
    the O-B/O-A statistics are NaN and the costs 0.
    """

    name = "3dvar"

    def __init__(self, B: SpectralCovariance, cg_tol: float = 1e-10, cg_max_iter: int = 1000,
                 *, explicit_max: int = 1_000_000):
        if not isinstance(B, SpectralCovariance):
            raise TypeError(f"B: expected a SpectralCovariance, got {type(B).__name__}")
        if not (np.isfinite(cg_tol) and cg_tol > 0):
            raise ValueError(f"cg_tol: must be finite and > 0, got {cg_tol!r}")
        if int(cg_max_iter) != cg_max_iter or cg_max_iter < 1:
            raise ValueError(f"cg_max_iter: must be a positive int, got {cg_max_iter!r}")
        self.B = B
        self.cg_tol = float(cg_tol)
        self.cg_max_iter = int(cg_max_iter)
        self.explicit_max = int(explicit_max)
        self._c = B.covariance_function()   # (nvar, nvar, ny, nx), for the preconditioner

    def _diag_HBHt(self, H: sp.csr_matrix) -> np.ndarray:
        """``diag(H B H^T)_r = sum_{s,t} h_rs h_rt B[s, t]`` over the (<= 4) non-zeros of row r."""
        nvar, ny, nx = self.B.shape
        p = H.shape[0]
        counts = np.diff(H.indptr)
        width = int(counts.max()) if p else 0
        cols = np.zeros((p, width), dtype=np.int64)
        wts = np.zeros((p, width))
        slot = np.arange(H.nnz) - np.repeat(H.indptr[:-1], counts)
        rows = np.repeat(np.arange(p), counts)
        cols[rows, slot] = H.indices
        wts[rows, slot] = H.data
        v, rem = np.divmod(cols, ny * nx)
        j, i = np.divmod(rem, nx)
        # B[(v,j,i),(v',j',i')] = c[v, v', (j-j') mod ny, (i-i') mod nx]
        Bst = self._c[v[:, :, None], v[:, None, :],
                      (j[:, :, None] - j[:, None, :]) % ny,
                      (i[:, :, None] - i[:, None, :]) % nx]          # (p, width, width)
        return np.einsum("rs,rst,rt->r", wts, Bst, wts)

    def analyse(self, background: np.ndarray, observations: Observations, *, cycle: int) -> Analysis:
        """One 3D-Var analysis; ``cycle`` is unused (the method is deterministic)."""
        x_b = np.asarray(background, dtype=np.float64)
        shape = self.B.shape
        if x_b.shape != shape:
            raise ValueError(f"background: expected shape {shape} (the shape of B), got {x_b.shape}")
        p = len(observations)
        if p == 0:
            nan = float("nan")
            return Analysis(np.zeros(shape), None,
                            {"n_obs": 0, "cg_iterations": 0, "cg_residual": 0.0,
                             "omb_mean": nan, "omb_rms": nan, "oma_mean": nan, "oma_rms": nan,
                             "cost_initial": 0.0, "cost_final": 0.0, "cost_b": 0.0, "cost_o": 0.0})

        y = np.asarray(observations.value, dtype=np.float64)
        sigma_o = np.asarray(observations.error_std, dtype=np.float64)
        R = sigma_o ** 2                                   # diag(R)
        H = observation_operator(observations, shape)      # (p, n) sparse
        d = y - H @ x_b.ravel()                            # innovation O-B

        if p * self.B.n <= self.explicit_max:
            # G = (B H^T)^T = H B (B symmetric): p batched B products; S = H B H^T + R.
            G = self.B.apply(H.toarray().reshape((p,) + shape)).reshape(p, -1)
            S = H @ G.T
            S = 0.5 * (S + S.T)
            S[np.diag_indices(p)] += R
            minv = 1.0 / np.diag(S)

            def A(w: np.ndarray) -> np.ndarray:            # (H B H^T + R) w
                return S @ w

            def BHt(w: np.ndarray) -> np.ndarray:          # B H^T w, flattened (n,)
                return w @ G
        else:
            Ht = H.T                                       # CSC, no copy

            def BHt(w: np.ndarray) -> np.ndarray:          # B H^T w, flattened (n,)
                return self.B.apply((Ht @ w).reshape(shape)).ravel()

            def A(w: np.ndarray) -> np.ndarray:            # (H B H^T + R) w
                return H @ BHt(w) + R * w

            minv = 1.0 / (self._diag_HBHt(H) + R)

        w, iters, rel = pcg(A, d, minv, tol=self.cg_tol, max_iter=self.cg_max_iter)
        if rel > self.cg_tol:
            raise RuntimeError(f"3D-Var CG did not converge in {iters} iterations: relative "
                               f"residual {rel:.3e} > cg_tol {self.cg_tol:.1e} (n_obs={p})")

        dx = BHt(w)                                        # B H^T w
        Hdx = H @ dx
        oma = d - Hdx                                      # y - H x_a
        true_rel = float(np.linalg.norm(d - Hdx - R * w) / np.linalg.norm(d)) if np.any(d) else 0.0
        cost_b = 0.5 * float(w @ Hdx)                      # 1/2 w^T H B H^T w
        cost_o = 0.5 * float(np.sum((oma / sigma_o) ** 2))
        info = {
            "n_obs": p,
            "cg_iterations": iters,
            "cg_residual": true_rel,
            "omb_mean": float(d.mean()),
            "omb_rms": float(np.sqrt(np.mean(d ** 2))),
            "oma_mean": float(oma.mean()),
            "oma_rms": float(np.sqrt(np.mean(oma ** 2))),
            "cost_initial": 0.5 * float(np.sum((d / sigma_o) ** 2)),
            "cost_final": cost_b + cost_o,
            "cost_b": cost_b,
            "cost_o": cost_o,
        }
        return Analysis(dx.reshape(shape), None, info)
