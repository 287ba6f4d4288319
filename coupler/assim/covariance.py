r"""Homogeneous multivariate background-error covariance ``B``, diagonal in Fourier space.

On the doubly periodic ``ny x nx`` grid a translation-invariant (homogeneous) covariance is
block-circulant: the covariance between variable ``a`` at grid point ``p = (j, i)`` and
variable ``b`` at ``q = (j', i')`` depends only on the separation,

    B[(a, p), (b, q)] = c_ab[(p - q) mod (ny, nx)],     c_ab[m] = Cov(x_a[q + m], x_b[q]),

so ``(B x)_a = sum_b c_ab (*) x_b`` (circular convolution) and the 2-D DFT diagonalises it:

    Lambda(k) = rfft2(c)(k)            (an nvar x nvar matrix for each wavenumber k),
    B x = irfft2( Lambda(k) rfft2(x)(k) ).

``Lambda(k)`` is Hermitian (``c_ab[m] = c_ba[-m]``) and positive semi-definite for each ``k``,
and ``Lambda(-k) = conj(Lambda(k))`` because ``c`` is real; together these make ``B`` real,
symmetric and PSD. Unnormalised numpy/scipy FFT conventions are used throughout
(``rfft2`` sums, ``irfft2`` divides by ``ny*nx``). ``ny == 1`` is the 1-D periodic case
(Lorenz-96): the FFT along the length-1 axis is the identity.

This is the "climatological B of the nature run" used by DAPPER's ``Var3D`` (``B='clim'``),
here in its homogeneous (translation-invariant) form: it is exact for a statistically
homogeneous flow (Lorenz-96, the doubly periodic shallow-water model) and a product ``B x``
costs O(n log n) instead of the O(n^2) of a dense matrix (``n = nvar*ny*nx``). Without a
climatology, :meth:`SpectralCovariance.parametric` gives a Gaussian-correlated ``B`` of given
standard deviations and correlation lengths (``&assim_nml b_std, b_length``) on any grid.
"""
from __future__ import annotations

import numpy as np
import scipy.fft as sfft

__all__ = ["SpectralCovariance"]


class SpectralCovariance:
    r"""Homogeneous ``B``, stored as its spectrum ``Lambda``.

    Attributes:
        shape: the state shape ``(nvar, ny, nx)``.
        spectrum: complex128 array ``Lambda`` of shape ``(nvar, nvar, ny, nx//2 + 1)``;
            ``spectrum[a, b, ky, kx] = rfft2(c_ab)[ky, kx]`` (units: state units squared,
            times ``ny*nx`` by the unnormalised DFT).

    The constructor checks that ``Lambda`` is (to round-off) Hermitian in ``(a, b)``, satisfies
    the real-field symmetry ``Lambda(-k) = conj(Lambda(k))`` on the self-conjugate columns
    ``kx = 0`` (and ``kx = nx/2`` for even ``nx``), and is PSD at every ``k``; it then
    enforces the two symmetries exactly so that :meth:`dense` is exactly symmetric.
    """

    def __init__(self, spectrum: np.ndarray, shape: tuple[int, int, int], *, rtol: float = 1e-8):
        if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
            raise ValueError(f"shape: expected (nvar, ny, nx) of positive ints, got {shape!r}")
        nvar, ny, nx = (int(s) for s in shape)
        lam = np.array(spectrum, dtype=np.complex128)  # copy
        expected = (nvar, nvar, ny, nx // 2 + 1)
        if lam.shape != expected:
            raise ValueError(f"spectrum: expected shape {expected} for state shape {shape}, "
                             f"got {lam.shape}")
        if not np.all(np.isfinite(lam)):
            raise ValueError("spectrum: contains non-finite values")
        scale = float(np.max(np.abs(lam))) if lam.size else 0.0
        tol = rtol * max(scale, np.finfo(float).tiny)

        # Hermitian in (a, b).
        lam_h = np.conj(np.swapaxes(lam, 0, 1))
        if np.max(np.abs(lam - lam_h)) > tol:
            raise ValueError("spectrum: Lambda(k) is not Hermitian in the variable indices")
        lam = 0.5 * (lam + lam_h)
        # Real-field symmetry on the self-conjugate columns: Lambda(-ky, kx) = conj(Lambda(ky, kx)).
        neg_ky = (-np.arange(ny)) % ny
        cols = [0] + ([nx // 2] if nx % 2 == 0 and nx > 1 else [])
        for kx in cols:
            col = lam[:, :, :, kx]
            mirrored = np.conj(col[:, :, neg_ky])
            if np.max(np.abs(col - mirrored)) > tol:
                raise ValueError(f"spectrum: column kx={kx} violates Lambda(-k) = conj(Lambda(k)) "
                                 "(not the spectrum of a real covariance)")
            lam[:, :, :, kx] = 0.5 * (col + mirrored)
        # PSD at every wavenumber.
        eig = np.linalg.eigvalsh(np.moveaxis(lam, (0, 1), (-2, -1)))
        if eig.size and eig.min() < -tol * nvar:
            raise ValueError(f"spectrum: Lambda(k) is not positive semi-definite "
                             f"(min eigenvalue {eig.min():.3e}, scale {scale:.3e})")

        self.shape: tuple[int, int, int] = (nvar, ny, nx)
        self.spectrum: np.ndarray = lam
        self.spectrum.setflags(write=False)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_climatology(cls, states: np.ndarray, *, ddof: int = 1) -> "SpectralCovariance":
        r"""Estimate ``B`` from a sample of states (e.g. a long nature run).

        With anomalies ``a_t = x_t - mean_t x_t`` and ``â_t = rfft2(a_t)`` (shape
        ``(nvar, ny, nx//2+1)``), the estimate is the translation-averaged sample covariance

            c_ab[m] = 1/(T - ddof) sum_t 1/(ny*nx) sum_q a_t,a[q + m] a_t,b[q],
            Lambda(k) = rfft2(c)(k) = 1/(T - ddof) sum_t â_t(k) â_t(k)^H / (ny*nx),

        i.e. ``mean_t â â^H / (nx*ny)`` with the mean taken with ``T - ddof`` in the
        denominator (``ddof=1``: the unbiased sample covariance, as ``np.cov``). It is PSD
        by construction. Averaging over all translations makes it exact in expectation
        for a statistically homogeneous flow.

        Args:
            states: float array ``(T, nvar, ny, nx)``, ``T > ddof``.
            ddof: delta degrees of freedom of the time mean (1 or 0).
        """
        X = np.asarray(states, dtype=np.float64)
        if X.ndim != 4:
            raise ValueError(f"states: expected shape (T, nvar, ny, nx), got {X.shape}")
        T = X.shape[0]
        if T - ddof < 1:
            raise ValueError(f"states: need more than ddof={ddof} samples, got T={T}")
        if not np.all(np.isfinite(X)):
            raise ValueError("states: contains non-finite values")
        _, nvar, ny, nx = X.shape
        A = X - X.mean(axis=0)
        Ah = sfft.rfft2(A, axes=(-2, -1))                    # (T, nvar, ny, nk)
        lam = np.einsum("tajk,tbjk->abjk", Ah, np.conj(Ah)) / ((T - ddof) * ny * nx)
        return cls(lam, (nvar, ny, nx))

    @classmethod
    def from_covariance_function(cls, c: np.ndarray) -> "SpectralCovariance":
        """``B`` from its real-space covariance function ``c`` of shape ``(nvar, nvar, ny, nx)``,
        ``c[a, b, dj, di] = Cov(x_a[j + dj, i + di], x_b[j, i])`` (so ``Lambda = rfft2(c)``)."""
        c = np.asarray(c, dtype=np.float64)
        if c.ndim != 4 or c.shape[0] != c.shape[1]:
            raise ValueError(f"c: expected shape (nvar, nvar, ny, nx), got {c.shape}")
        nvar, _, ny, nx = c.shape
        return cls(sfft.rfft2(c, axes=(-2, -1)), (nvar, ny, nx))

    @classmethod
    def parametric(cls, shape: tuple[int, int, int], std, length_x: float, length_y: float
                   ) -> "SpectralCovariance":
        r"""A parametric ``B``: Gaussian horizontal correlation, variables uncorrelated.

        The covariance function is, to the images described below,

            c_ab[dj, di] = delta_ab std_a^2 exp(-(dx^2 / (2 Lx^2) + dy^2 / (2 Ly^2))),

        ``dx``, ``dy`` the minimum-image (periodic) separations ``min(di, nx - di)``,
        ``min(dj, ny - dj)`` in grid points, so the correlation at a separation of ``Lx``
        along x is ``exp(-1/2)``. ``L = 0`` along an axis is the delta correlation along it
        (``Lx = Ly = 0``: the diagonal ``B = diag(std_a^2)``); ``ny == 1`` (1-D ring,
        Lorenz-96) ignores ``Ly``.

        Positive semi-definiteness. The minimum-image Gaussian sampled on the ring is *not*
        a covariance in general: its DFT has negative values once ``L`` is a sizeable
        fraction of the domain (about ``n/4`` and up: e.g. ``n = 40``, ``L = 20`` gives
        ``min Lambda / max Lambda = -0.019``). Instead each axis uses the *periodised*
        Gaussian, the sum of its images ``c(d) = sum_m g(d + m n)``, ``g(t) = exp(-t^2 /
        (2 L^2))``. By Poisson summation its DFT is the aliased continuous Gaussian spectrum,

            Lambda(k) = sum_d c(d) e^{-2 pi i k d / n} = sum_{t in Z} g(t) e^{-2 pi i k t / n}
                      = sqrt(2 pi) L sum_{j in Z} exp(-2 pi^2 L^2 (k/n + j)^2)  >= 0,

        a sum of non-negative terms, so ``B`` is PSD by construction for every ``L`` (it is
        computed as that sum, never as the FFT of a sampled ``c``). For ``L`` well below the
        domain it is the minimum-image Gaussian up to the nearest other image, an absolute
        correlation error of at most about ``exp(-n^2 / (8 L^2))`` (at ``d = n/2``: 3e-4 for
        ``L = n/8``, 4e-6 for ``L = n/10``, 2e-22 for ``L = n/20``); for ``L`` comparable to
        the domain it is flatter than the minimum-image Gaussian, and as ``L -> inf`` it tends
        to a constant correlation (only the domain-mean mode left). The sum is evaluated in
        the spectral form above for ``L >= 1/2`` grid point (at most ~15 terms ``j``) and, for
        ``L < 1/2``, as the real-space image sum followed by its DFT (a few images ``m``; the
        spectrum is then > 0.7 of its mean, so round-off cannot make it negative). Each axis
        factor is normalised so that ``c(0) = 1`` (``mean_k Lambda(k) = 1``), hence the
        pointwise variance is ``std_a^2`` to round-off. The 2-D covariance is the product of
        the x and y factors; its spectrum is the product of theirs.

        Args:
            shape: the state shape ``(nvar, ny, nx)``.
            std: ``nvar`` background-error standard deviations (state units), finite, > 0;
                a scalar is accepted when ``nvar == 1``.
            length_x, length_y: correlation lengths ``Lx``, ``Ly`` in grid points, finite,
                ``>= 0`` (0: delta correlation along that axis).

        Returns:
            ``B`` with ``spectrum[a, b] = delta_ab std_a^2 Lambda_y(ky) Lambda_x(kx)``.
        """
        if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
            raise ValueError(f"shape: expected (nvar, ny, nx) of positive ints, got {shape!r}")
        nvar, ny, nx = (int(s) for s in shape)
        sd = np.asarray(std, dtype=np.float64).reshape(-1)
        if sd.size != nvar:
            raise ValueError(f"std: expected {nvar} values (one per variable), got {sd.size}")
        if not np.all(np.isfinite(sd) & (sd > 0)):
            raise ValueError(f"std: expected finite values > 0, got {sd.tolist()}")
        for name, L in (("length_x", length_x), ("length_y", length_y)):
            if not (np.isfinite(L) and L >= 0):
                raise ValueError(f"{name}: expected a finite length >= 0 in grid points, got {L!r}")
        lam_x = _periodic_gaussian_spectrum(nx, float(length_x))[: nx // 2 + 1]
        lam_y = _periodic_gaussian_spectrum(ny, float(length_y))
        lam = np.zeros((nvar, nvar, ny, nx // 2 + 1), dtype=np.complex128)
        idx = np.arange(nvar)
        lam[idx, idx] = (sd ** 2)[:, None, None] * (lam_y[:, None] * lam_x[None, :])
        return cls(lam, (nvar, ny, nx))

    @classmethod
    def from_arrays(cls, arrays: dict) -> "SpectralCovariance":
        """Inverse of :meth:`to_arrays`."""
        try:
            shape = tuple(int(s) for s in np.asarray(arrays["shape"]).ravel())
            lam = np.asarray(arrays["spectrum_re"]) + 1j * np.asarray(arrays["spectrum_im"])
        except KeyError as e:
            raise ValueError(f"SpectralCovariance.from_arrays: missing key {e}") from None
        return cls(lam, shape)  # type: ignore[arg-type]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays for storage: ``spectrum_re``, ``spectrum_im`` (float64,
        ``(nvar, nvar, ny, nx//2+1)``) and ``shape`` (int64, ``(3,)``)."""
        return {"spectrum_re": self.spectrum.real.copy(),
                "spectrum_im": self.spectrum.imag.copy(),
                "shape": np.array(self.shape, dtype=np.int64)}

    # ------------------------------------------------------------------ operations
    @property
    def n(self) -> int:
        """State dimension ``nvar*ny*nx``."""
        nvar, ny, nx = self.shape
        return nvar * ny * nx

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``B x`` for ``x`` of shape ``(..., nvar, ny, nx)`` (leading axes are a batch)."""
        x = np.asarray(x, dtype=np.float64)
        nvar, ny, nx = self.shape
        if x.shape[-3:] != self.shape:
            raise ValueError(f"x: expected shape (..., {nvar}, {ny}, {nx}), got {x.shape}")
        if ny == 1:   # 1-D ring: the FFT along the length-1 axis is the identity
            xh = sfft.rfft(x, axis=-1)
        else:
            xh = sfft.rfft2(x, axes=(-2, -1))
        if nvar == 1:
            yh = self.spectrum[0, 0] * xh
        else:
            yh = np.einsum("abjk,...bjk->...ajk", self.spectrum, xh)
        if ny == 1:
            return sfft.irfft(yh, n=nx, axis=-1)
        return sfft.irfft2(yh, s=(ny, nx), axes=(-2, -1))

    __matmul__ = apply

    def scaled(self, factor: float) -> "SpectralCovariance":
        """``factor * B`` (e.g. a tuned variance inflation), ``factor > 0``."""
        f = float(factor)
        if not (np.isfinite(f) and f > 0):
            raise ValueError(f"factor: must be finite and > 0, got {factor!r}")
        return SpectralCovariance(self.spectrum * f, self.shape)

    def sqrt(self) -> "SpectralCovariance":
        r"""The symmetric square root ``B^{1/2}`` (``B^{1/2} B^{1/2} = B``), homogeneous too: its
        spectrum is the Hermitian square root of ``Lambda(k)`` at every wavenumber,
        ``U diag(sqrt(l)) U^H`` for ``Lambda(k) = U diag(l) U^H``. ``B^{1/2} xi`` with white
        ``xi ~ N(0, I)`` has covariance ``B`` (:meth:`sample`)."""
        lam = np.moveaxis(self.spectrum, (0, 1), (-2, -1))              # (ny, nk, nvar, nvar)
        l, U = np.linalg.eigh(lam)
        root = (U * np.sqrt(np.clip(l, 0.0, None))[..., None, :]) @ np.conj(np.swapaxes(U, -1, -2))
        return SpectralCovariance(np.moveaxis(root, (-2, -1), (0, 1)), self.shape)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` draws from ``N(0, B)``, shape ``(n, nvar, ny, nx)``: ``B^{1/2} xi`` (:meth:`sqrt`)."""
        return self.sqrt().apply(rng.standard_normal((int(n), *self.shape)))

    def covariance_function(self) -> np.ndarray:
        """Real-space covariance function ``c = irfft2(Lambda)``, shape ``(nvar, nvar, ny, nx)``,
        ``c[a, b, dj, di] = Cov(x_a[j + dj, i + di], x_b[j, i])``."""
        _, ny, nx = self.shape
        return sfft.irfft2(self.spectrum, s=(ny, nx), axes=(-2, -1))

    def variance(self) -> np.ndarray:
        """Per-variable pointwise variance ``c_aa[0, 0]``, shape ``(nvar,)`` (state units
        squared). ``B`` being homogeneous, ``diag(B)`` is this value at every grid point:
        ``np.broadcast_to(v[:, None, None], shape)``."""
        c0 = self.covariance_function()[:, :, 0, 0]
        return np.diag(c0).copy()

    def dense(self) -> np.ndarray:
        """The full ``(n, n)`` matrix (state vectors flattened in C order), built from the
        covariance function: ``B[(a,j,i), (b,j',i')] = c_ab[(j-j') mod ny, (i-i') mod nx]``.
        Memory ``8 n^2`` bytes: for tests on small grids."""
        nvar, ny, nx = self.shape
        c = self.covariance_function()
        dj = (np.arange(ny)[:, None] - np.arange(ny)[None, :]) % ny      # (j, j')
        di = (np.arange(nx)[:, None] - np.arange(nx)[None, :]) % nx      # (i, i')
        # full[a, j, i, b, j', i'] = c[a, b, dj[j, j'], di[i, i']]
        full = c[:, :, dj[:, None, :, None], di[None, :, None, :]]      # (a, b, j, i, j', i')
        full = full.transpose(0, 2, 3, 1, 4, 5)
        return np.ascontiguousarray(full.reshape(self.n, self.n))

    def __repr__(self) -> str:
        return f"SpectralCovariance(shape={self.shape}, variance={self.variance()!r})"


def _periodic_gaussian_spectrum(n: int, length: float) -> np.ndarray:
    r"""DFT ``Lambda(k)``, ``k = 0..n-1`` (numpy order), of the periodised Gaussian correlation
    ``c(d) = sum_m exp(-(d + m n)^2 / (2 L^2)) / Z`` on a ring of ``n`` points, ``Z`` such that
    ``c(0) = 1`` (so ``mean_k Lambda(k) = 1``). Real, ``>= 0``, and even in ``k`` exactly.
    ``L = 0``: ``Lambda = 1`` (delta correlation). See :meth:`SpectralCovariance.parametric`."""
    if length == 0.0 or n == 1:
        return np.ones(n)
    f = np.abs(sfft.fftfreq(n))                         # |k|/n in cycles per grid point, even in k
    if length >= 0.5:
        # Spectral (Poisson) form: terms exp(-2 pi^2 L^2 (f + j)^2) underflow beyond |f + j| > 6.2/L.
        J = int(np.ceil(6.2 / length)) + 1
        j = np.arange(-J, J + 1, dtype=np.float64)
        lam = np.exp(-2.0 * np.pi ** 2 * length ** 2 * (f[:, None] + j[None, :]) ** 2).sum(axis=1)
    else:
        # Real-space image sum (terms beyond |d + m n| > 39 L underflow), then its DFT; even in d,
        # so the DFT is real. For L < 1/2 the spectrum is > 0.7 of its mean (minimum at the
        # Nyquist wavenumber), so FFT round-off cannot make it negative (clipped anyway).
        M = int(np.ceil(39.0 * length / n)) + 1
        d = np.arange(n, dtype=np.float64)
        m = np.arange(-M, M + 1, dtype=np.float64)
        c = np.exp(-((d[:, None] + n * m[None, :]) ** 2) / (2.0 * length ** 2)).sum(axis=1)
        c = 0.5 * (c + c[(-np.arange(n)) % n])          # exactly even in d
        lam = np.maximum(sfft.fft(c).real, 0.0)
        lam = 0.5 * (lam + lam[(-np.arange(n)) % n])
    return lam * (n / lam.sum())
