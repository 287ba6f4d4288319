"""Storage of a :class:`~coupler.assim.covariance.SpectralCovariance` ``B`` in netCDF.

Layout::

    dimensions:
        var_row = nvar ; var_col = nvar ; ky = ny ; kx = nx/2 + 1 (integer division) ;
    variables:
        double spectrum_re(var_row, var_col, ky, kx) ;   real part of Lambda
        double spectrum_im(var_row, var_col, ky, kx) ;   imaginary part of Lambda
        double variance(var_row) ;                        per-variable pointwise variance (info)
    // global attributes:
        :nvar, :ny, :nx (ints; nx is needed because kx = nx/2 + 1 loses its parity),
        :variable_names = "u v h" ; :Conventions = "CF-1.8" ;

``Lambda[a, b, ky, kx] = rfft2(c_ab)[ky, kx]`` (numpy's unnormalised FFT) where ``c`` is the
covariance function, see :mod:`coupler.assim.covariance`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import netCDF4
import numpy as np

from coupler.assim.covariance import SpectralCovariance
from coupler.io.atomic import atomic_path

__all__ = ["write_covariance", "read_covariance"]


def write_covariance(path: str | os.PathLike, B: SpectralCovariance, var_names: Sequence[str]) -> Path:
    """Write ``B`` (with the names of its variables) to ``path`` atomically; return the path."""
    names = var_names.split() if isinstance(var_names, str) else [str(v) for v in var_names]
    nvar, ny, nx = B.shape
    if len(names) != nvar or any((not n) or any(c.isspace() for c in n) for n in names):
        raise ValueError(f"var_names: expected {nvar} names without whitespace, got {var_names!r}")
    arrays = B.to_arrays()
    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as ds:
            for dim, size in (("var_row", nvar), ("var_col", nvar), ("ky", ny), ("kx", nx // 2 + 1)):
                ds.createDimension(dim, size)
            dims = ("var_row", "var_col", "ky", "kx")
            for part, long in (("re", "real"), ("im", "imaginary")):
                v = ds.createVariable(f"spectrum_{part}", "f8", dims)
                v.long_name = f"{long} part of the covariance spectrum Lambda = rfft2(c)"
                v[:] = arrays[f"spectrum_{part}"]
            v = ds.createVariable("variance", "f8", ("var_row",))
            v.long_name = "pointwise background-error variance of each variable (diag of B)"
            v[:] = B.variance()
            ds.Conventions = "CF-1.8"
            ds.title = "lodas homogeneous background-error covariance (spectral form)"
            ds.variable_names = " ".join(names)
            ds.nvar, ds.ny, ds.nx = np.int32(nvar), np.int32(ny), np.int32(nx)
    return Path(path)


def read_covariance(path: str | os.PathLike) -> tuple[SpectralCovariance, list[str]]:
    """Read a covariance written by :func:`write_covariance`: ``(B, var_names)``.

    Raises:
        FileNotFoundError: ``path`` does not exist (message names it).
        ValueError: naming the file: not netCDF, missing variable/attribute, inconsistent
            shapes, or a spectrum that is not a valid covariance.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"covariance file not found: {path}")
    try:
        ds = netCDF4.Dataset(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable netCDF file ({e})") from None
    with ds:
        missing = [a for a in ("nvar", "ny", "nx", "variable_names") if a not in ds.ncattrs()]
        missing += [v for v in ("spectrum_re", "spectrum_im") if v not in ds.variables]
        if missing:
            raise ValueError(f"{path}: missing attribute(s)/variable(s) {missing}")
        shape = (int(ds.nvar), int(ds.ny), int(ds.nx))
        names = str(ds.variable_names).split()
        arrays = {"shape": np.array(shape),
                  "spectrum_re": np.asarray(ds.variables["spectrum_re"][:], dtype=np.float64),
                  "spectrum_im": np.asarray(ds.variables["spectrum_im"][:], dtype=np.float64)}
    if len(names) != shape[0]:
        raise ValueError(f"{path}: variable_names {names} does not have nvar={shape[0]} entries")
    try:
        B = SpectralCovariance.from_arrays(arrays)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return B, names
