"""Observation files: one netCDF file per analysis cycle (CF-style).

Layout (``ncdump -h``)::

    dimensions:
        obs = p ;
    variables:
        double value(obs) ;        value:long_name = "observed value" ;
        double error_std(obs) ;    error_std:long_name = "observation error standard deviation" ;
        int var_index(obs) ;       var_index:flag_values = 0, 1, ... ;
                                   var_index:flag_meanings = "u v h" ;
        double x(obs) ;            x:units = "grid_index" ;
        double y(obs) ;            y:units = "grid_index" ;
        double footprint(obs) ;    footprint:units = "grid_points" ;   (optional)
    // global attributes:
        :Conventions = "CF-1.8" ;
        :variable_names = "u v h" ;       (space-separated; var_index indexes this list)
        :cycle = 3 ;                       (0-based analysis cycle)
        :valid_time = "2000-01-01T06:00:00" ;   (ISO 8601)

``value`` and ``error_std`` are in the units of the observed variable; ``x``, ``y`` are
0-based grid-index coordinates on the periodic grid (``x`` in ``[0, nx)``, ``y`` in
``[0, ny)``). The reader maps ``var_index`` through the file's ``variable_names`` onto the
run's variable list, so a file that observes a subset of the variables (or lists them in a
different order) is read correctly, and a file for another model is refused.

``footprint`` (see :attr:`coupler.assim.base.Observations.footprint`): 0 for a point
observation (bilinear at ``(x, y)``), an integer ``w >= 1`` for the average over the
``w x w`` grid-point box centred at ``(x, y)`` (a ``w``-point segment when ``ny == 1``). It is
always written; a file without it (older files) reads as all points (zeros).
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Callable, Sequence

import netCDF4
import numpy as np

from coupler.assim.base import Observations
from coupler.io.atomic import atomic_path

__all__ = ["write_obs_file", "read_obs_file", "read_observations", "read_obs_attributes"]

_FIELDS = ("value", "error_std", "var_index", "x", "y")
_OPTIONAL = ("footprint",)        # absent in older files: all zeros (point observations)


def _names(var_names: Sequence[str] | str, what: str = "var_names") -> list[str]:
    names = var_names.split() if isinstance(var_names, str) else [str(v) for v in var_names]
    if not names or any((not n) or any(c.isspace() for c in n) for n in names):
        raise ValueError(f"{what}: expected non-empty names without whitespace, got {var_names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: duplicate names in {names}")
    return names


def _iso(valid_time: _dt.datetime | _dt.date | str, what: str = "valid_time") -> str:
    """Normalised ISO 8601 (``datetime.isoformat()``; a date means its midnight)."""
    if isinstance(valid_time, _dt.datetime):
        return valid_time.isoformat()
    if isinstance(valid_time, _dt.date):
        return _dt.datetime.combine(valid_time, _dt.time()).isoformat()
    if isinstance(valid_time, str):
        try:
            return _dt.datetime.fromisoformat(valid_time.strip()).isoformat()
        except ValueError:
            raise ValueError(f"{what}: not an ISO 8601 date-time: {valid_time!r}") from None
    raise ValueError(f"{what}: expected a datetime or ISO 8601 string, got {valid_time!r}")


def write_obs_file(path: str | os.PathLike, obs: Observations, var_names: Sequence[str],
                   cycle: int, valid_time: _dt.datetime | str) -> Path:
    """Write the observations of one cycle to ``path`` (atomically) and return the path.

    Args:
        obs: the observations; ``var_index`` indexes ``var_names``.
        var_names: names of the state variables (no whitespace), e.g. ``["u", "v", "h"]``.
        cycle: 0-based analysis cycle (>= 0).
        valid_time: the analysis time, a ``datetime`` or an ISO 8601 string; stored
            normalised as ``datetime.fromisoformat(...).isoformat()``.

    Raises:
        ValueError: non-finite values or coordinates, ``var_index`` outside ``var_names``.
    """
    names = _names(var_names)
    if isinstance(cycle, bool) or int(cycle) != cycle or cycle < 0:
        raise ValueError(f"cycle: must be an int >= 0, got {cycle!r}")
    vt = _iso(valid_time)
    p = len(obs)
    arrays = {f: np.asarray(getattr(obs, f)) for f in _FIELDS + _OPTIONAL}
    for f in ("value", "error_std", "x", "y", "footprint"):
        if not np.all(np.isfinite(arrays[f])):
            raise ValueError(f"obs.{f}: contains non-finite values; refusing to write {path}")
    vi = arrays["var_index"]
    if p and (np.any(vi != np.round(vi)) or np.any((vi < 0) | (vi >= len(names)))):
        raise ValueError(f"obs.var_index: values must be ints in [0, {len(names)}) "
                         f"(var_names={names}); refusing to write {path}")

    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as ds:
            ds.createDimension("obs", p)
            v = ds.createVariable("value", "f8", ("obs",))
            v.long_name = "observed value"
            v.comment = "in the units of the observed state variable"
            v[:] = arrays["value"].astype(np.float64)
            v = ds.createVariable("error_std", "f8", ("obs",))
            v.long_name = "observation error standard deviation"
            v.comment = "R = diag(error_std**2); same units as value"
            v[:] = arrays["error_std"].astype(np.float64)
            v = ds.createVariable("var_index", "i4", ("obs",))
            v.long_name = "index of the observed state variable in variable_names"
            v.flag_values = np.arange(len(names), dtype=np.int32)
            v.flag_meanings = " ".join(names)
            v[:] = vi.astype(np.int32)
            for c, axis in (("x", "X"), ("y", "Y")):
                v = ds.createVariable(c, "f8", ("obs",))
                v.long_name = f"{c} position, 0-based grid index on the periodic grid"
                v.units = "grid_index"
                v.axis = axis
                v[:] = arrays[c].astype(np.float64)
            v = ds.createVariable("footprint", "f8", ("obs",))
            v.long_name = "footprint side: 0 point observation, w >= 1 average over w x w grid points centred at (x, y)"
            v.units = "grid_points"
            v.comment = ("box i = x-(w-1)/2 .. x+(w-1)/2 (periodic), same in y; a w-point segment in x when ny = 1; "
                         "weights 1/w^2 (1/w for a segment)")
            v[:] = arrays["footprint"].astype(np.float64)
            ds.Conventions = "CF-1.8"
            ds.title = "lodas observations of one analysis cycle"
            ds.variable_names = " ".join(names)
            ds.cycle = np.int32(cycle)
            ds.valid_time = vt
    return Path(path)


def _open(path: str | os.PathLike) -> netCDF4.Dataset:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"observation file not found: {path}")
    try:
        return netCDF4.Dataset(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable netCDF file ({e})") from None


def read_obs_attributes(path: str | os.PathLike) -> dict:
    """Global metadata of an observation file: ``cycle`` (int), ``valid_time`` (normalised
    ISO 8601 str), ``variable_names`` (list of str), ``n_obs`` (int)."""
    with _open(path) as ds:
        missing = [a for a in ("cycle", "valid_time", "variable_names") if a not in ds.ncattrs()]
        if missing:
            raise ValueError(f"{path}: missing global attribute(s) {missing}")
        if "obs" not in ds.dimensions:
            raise ValueError(f"{path}: missing dimension 'obs'")
        return {"cycle": int(ds.getncattr("cycle")),
                "valid_time": _iso(str(ds.getncattr("valid_time")), f"{path}: valid_time"),
                "variable_names": str(ds.getncattr("variable_names")).split(),
                "n_obs": len(ds.dimensions["obs"])}


def read_obs_file(path: str | os.PathLike, var_names: Sequence[str], *,
                  shape: tuple[int, int, int] | None = None, with_valid_time: bool = False
                  ) -> Observations | tuple[Observations, str | None]:
    """Read one observation file in the layout above, checked against the run's variables (and grid).

    Args:
        path: the file.
        var_names: the run's state variable names, in state order; the file's
            ``var_index`` is mapped through its ``variable_names`` onto this list.
        shape: the run's state shape ``(nvar, ny, nx)``; if given, ``x``/``y`` are checked to
            lie in ``[0, nx)``/``[0, ny)`` and ``nvar`` against ``var_names``.
        with_valid_time: also return the file's ``valid_time`` attribute.

    Returns:
        :class:`Observations` with ``var_index`` in the run's variable order; with
        ``with_valid_time``, the tuple ``(observations, valid_time)`` where ``valid_time`` is
        the normalised ISO 8601 string (``datetime.fromisoformat(s).isoformat()``) or
        ``None`` if the file has no ``valid_time`` attribute.

    Raises:
        FileNotFoundError: ``path`` does not exist (message names the path).
        ValueError: naming the file and the problem: not netCDF, missing dimension/variable/
            attribute, wrong units, variable names not matching the run's, ``var_index`` out
            of range, non-finite or fill values, ``error_std <= 0``, coordinates off the grid.
    """
    obs, valid_time, _ = read_observations(path, var_names, shape=shape)
    return (obs, valid_time) if with_valid_time else obs


#: ``locate(kind, a, b) -> (x, y)``: grid-index coordinates of observations given as
#: ``kind = 'index'`` (``a, b`` = the file's x, y grid indices) or ``'latlon'`` (``a, b`` =
#: latitude, longitude in degrees); NaN where the observation lies outside the domain.
Locator = Callable[[str, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def read_observations(path: str | os.PathLike, var_names: Sequence[str], *,
                      shape: tuple[int, int, int] | None = None, names: dict | None = None,
                      aliases: dict | None = None, locate: Locator | None = None,
                      outside: str = "error") -> tuple[Observations, str | None, int]:
    """Read one observation file, also one written by another tool (replay archives).

    Args:
        path, var_names, shape: as :func:`read_obs_file`.
        names: the file's names of the fields (``value``, ``error_std``, ``var_index``,
            ``x``, ``y``, ``lat``, ``lon``, ``footprint``), for those that differ
            (``&replay_nml variable_map``).
        aliases: the file's names of state variables (in its ``variable_names``) ->
            the run's names, for those that differ.
        locate: converts the file's locations to the run's grid indices (an archive's
            latitude/longitude, flipped axes, non-periodic domains), NaN outside the domain.
            ``None``: the file's ``x, y`` are the run's grid indices on the periodic grid.
            Locations are ``x, y`` (units ``grid_index``) when the file has them, else
            ``lat, lon`` (degrees; needs ``locate``).
        outside: observations outside the domain: ``'error'`` (ValueError naming the file,
            the count and the first one) or ``'skip'`` (dropped and counted).

    Returns:
        ``(observations, valid_time or None, number of observations skipped outside)``.
    """
    run_names = _names(var_names)
    names = dict(names or {})
    aliases = dict(aliases or {})
    fname = {f: names.get(f, f) for f in _FIELDS + _OPTIONAL + ("lat", "lon")}
    if shape is not None and (len(shape) != 3 or shape[0] != len(run_names)):
        raise ValueError(f"shape: {shape!r} does not match var_names {run_names} "
                         f"(expected (nvar={len(run_names)}, ny, nx))")
    with _open(path) as ds:
        if "obs" not in ds.dimensions:
            raise ValueError(f"{path}: missing dimension 'obs'")
        by_index = fname["x"] in ds.variables and fname["y"] in ds.variables
        by_latlon = fname["lat"] in ds.variables and fname["lon"] in ds.variables
        where = ("x", "y") if by_index or not (by_latlon and locate) else ("lat", "lon")
        needed = ("value", "error_std", "var_index") + where
        missing = [fname[f] for f in needed if fname[f] not in ds.variables]
        if missing:
            hint = "" if locate is None else " (locations: x and y in grid_index units, or lat and lon in degrees)"
            raise ValueError(f"{path}: missing variable(s) {missing} (need {[fname[f] for f in needed]}){hint}")
        if "variable_names" not in ds.ncattrs():
            raise ValueError(f"{path}: missing global attribute 'variable_names'")
        file_names = [aliases.get(n, n) for n in str(ds.getncattr("variable_names")).split()]
        valid_time = (_iso(str(ds.getncattr("valid_time")), f"{path}: valid_time")
                      if "valid_time" in ds.ncattrs() else None)
        data = {}
        for f in needed + tuple(f for f in _OPTIONAL if fname[f] in ds.variables):
            var = ds.variables[fname[f]]
            if var.dimensions != ("obs",):
                raise ValueError(f"{path}: variable '{fname[f]}' has dimensions {var.dimensions}, "
                                 "expected ('obs',)")
            a = var[:]
            if np.ma.is_masked(a):
                raise ValueError(f"{path}: variable '{fname[f]}' has {int(np.ma.count_masked(a))} "
                                 "missing (fill) value(s)")
            data[f] = np.asarray(np.ma.getdata(a))
        if where == ("x", "y"):
            for c in ("x", "y"):
                units = getattr(ds.variables[fname[c]], "units", None)
                if units != "grid_index":
                    raise ValueError(f"{path}: variable '{fname[c]}' has units {units!r}, expected 'grid_index'")
        if not np.issubdtype(data["var_index"].dtype, np.integer):
            raise ValueError(f"{path}: variable '{fname['var_index']}' has type {data['var_index'].dtype}, "
                             "expected an integer type")

    unknown = [n for n in file_names if n not in run_names]
    if not file_names or unknown or len(set(file_names)) != len(file_names):
        raise ValueError(f"{path}: variable_names {file_names} do not match the run's "
                         f"variables {run_names}" + (f" (unknown: {unknown})" if unknown else ""))
    vi = data["var_index"].astype(np.int64)
    bad = np.flatnonzero((vi < 0) | (vi >= len(file_names)))
    if bad.size:
        raise ValueError(f"{path}: {bad.size} var_index value(s) outside [0, {len(file_names)}) "
                         f"(variable_names {file_names}), first at obs {bad[0]}: {vi[bad[0]]}")
    footprint = data.get("footprint")
    if footprint is None:
        footprint = np.zeros(len(data["value"]))
    data["footprint"] = footprint
    for f in ("value", "error_std") + where + ("footprint",):
        bad = np.flatnonzero(~np.isfinite(data[f]))
        if bad.size:
            raise ValueError(f"{path}: variable '{fname[f]}' has {bad.size} non-finite value(s), "
                             f"first at obs {bad[0]}: {data[f][bad[0]]!r}")
    bad = np.flatnonzero(data["error_std"] <= 0)
    if bad.size:
        raise ValueError(f"{path}: variable '{fname['error_std']}' has {bad.size} value(s) <= 0, "
                         f"first at obs {bad[0]}: {data['error_std'][bad[0]]!r}")
    bad = np.flatnonzero((data["footprint"] < 0) | (data["footprint"] != np.round(data["footprint"])))
    if bad.size:
        raise ValueError(f"{path}: variable 'footprint' has {bad.size} value(s) that are not an integer >= 0 "
                         f"(0: point, w >= 1: w x w box), first at obs {bad[0]}: {float(data['footprint'][bad[0]])!r}")
    x, y = data[where[0]].astype(np.float64), data[where[1]].astype(np.float64)
    if locate is not None:
        if where == ("x", "y"):
            x, y = locate("index", x, y)
        else:
            x, y = locate("latlon", x, y)
        out = ~(np.isfinite(x) & np.isfinite(y))
        what = "outside the domain of the grid"
    elif shape is not None:
        _, ny, nx = shape
        out = np.zeros(len(x), dtype=bool)
        for c, v, m in (("x", x, nx), ("y", y, ny)):
            bad = np.flatnonzero((v < 0) | (v >= m))
            if bad.size and outside == "error":
                raise ValueError(f"{path}: {bad.size} '{c}' coordinate(s) outside the grid "
                                 f"[0, {m}), first at obs {bad[0]}: {v[bad[0]]!r}")
            out[bad] = True
        what = "outside the grid"
    else:
        out = np.zeros(len(x), dtype=bool)
    n_out = int(out.sum())
    if n_out and outside == "error":
        k = int(np.flatnonzero(out)[0])
        raise ValueError(f"{path}: {n_out} observation(s) {what}, first at obs {k}: "
                         f"{where[0]} = {data[where[0]][k]!r}, {where[1]} = {data[where[1]][k]!r}")
    keep = ~out
    to_run = np.array([run_names.index(n) for n in file_names], dtype=np.int64)
    obs = Observations(value=data["value"][keep].astype(np.float64),
                       error_std=data["error_std"][keep].astype(np.float64),
                       var_index=to_run[vi[keep]], x=x[keep], y=y[keep],
                       footprint=data["footprint"][keep].astype(np.float64))
    if shape is not None and np.any(obs.footprint > 0):
        from coupler.assim.obs_operator import observation_operator

        try:                                   # footprint alignment and size against the grid
            observation_operator(obs, shape)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return obs, valid_time, n_out
