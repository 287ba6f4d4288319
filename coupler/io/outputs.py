"""Outputs of a run: CF increments per cycle, diagnostics, background trajectory, summary.

Contract (used by tools and people, see README):

- ``increments/inc_<cycle:06d>.nc``: CF-1.8 netCDF, variables ``<var>_inc(time, grid_y, grid_x)`` (and
  ``<var>_spread`` for ensemble methods), coordinates ``grid_x``, ``grid_y`` (m) and ``time`` (seconds
  since ``&coupler_nml start_time``), global attributes ``cycle``, ``status``, ``method``.
- ``diagnostics.jsonl``: one JSON object per cycle, appended and flushed as each cycle ends
  (a crash loses nothing already written); ``diagnostics.nc``: the same table, written at
  the end.
- ``backgrounds.nc``: the background trajectory ``<var>(time, grid_y, grid_x)`` when requested (the
  nature run of a twin experiment: the truth).
- ``effective.nml`` and ``summary.json``.

Every file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import netCDF4
import numpy as np

from coupler import __version__
from coupler.io.atomic import atomic_path, write_text

#: Grid dimensions and coordinates of the in-line runs (named so that they never clash with a state variable 'x').
XDIM, YDIM = "grid_x", "grid_y"
DIAGNOSTIC_FIELDS = (
    "cycle", "step", "model_time", "status", "n_obs", "omb_mean", "omb_rms", "oma_mean", "oma_rms",
    "rmse_b", "rmse_a", "spread", "wait_s", "analysis_s", "scatter_s", "host_put_s", "host_get_s",
)


def cycle_file_name(template: str, cycle: int, valid_time: datetime) -> str:
    """A per-cycle file name: ``{cycle}`` (0-based cycle index), then strftime codes of the
    valid time (``&obs_nml file_template``, ``&replay_nml background_file``)."""
    return valid_time.strftime(template.format(cycle=cycle))


@dataclass(frozen=True)
class Axis:
    """A horizontal axis of the output files, as the archive a replay read it from has it.

    Attributes:
        dim: dimension (and coordinate variable) name, e.g. ``'lat'``.
        values: coordinate values in *file* order, shape ``(n,)``.
        attrs: attributes of the coordinate variable (units, standard_name, axis, ...).
        flip: the file stores this axis in decreasing order (descending latitude): lodas
            holds states in increasing order and reverses the axis on writing.
    """

    dim: str
    values: np.ndarray
    attrs: dict
    flip: bool = False


class Grid:
    """Coordinates of the ``(nvar, ny, nx)`` state for output files.

    By default (in-line runs) the axes are ``grid_x``/``grid_y`` in metres from ``&grid_nml
    dx_m, dy_m``; a replay passes the axes of its archive (``x_axis``, ``y_axis``) so its
    outputs have the archive's coordinates, names and latitude order.
    """

    def __init__(self, variables, nx: int, ny: int, dx_m: float, dy_m: float, start_time: str, time_unit_s: float,
                 *, x_axis: Axis | None = None, y_axis: Axis | None = None):
        self.variables = list(variables)
        self.nx, self.ny, self.dx_m, self.dy_m = nx, ny, dx_m, dy_m
        self.start = datetime.fromisoformat(start_time)
        self.time_unit_s = time_unit_s
        self.x_axis = x_axis or Axis(XDIM, np.arange(nx) * dx_m, dict(
            units="m", axis="X", long_name="x of the grid point (periodic domain)"))
        self.y_axis = y_axis or Axis(YDIM, np.arange(ny) * dy_m, dict(
            units="m", axis="Y", long_name="y of the grid point (periodic domain)"))

    @classmethod
    def from_config(cls, cfg, **axes) -> "Grid":
        g = cfg.grid
        return cls(g.variables, g.nx, g.ny, g.dx_m, g.dy_m, cfg.coupler.start_time, g.time_unit_s, **axes)

    @property
    def dims(self) -> tuple[str, str]:
        """``(y dimension, x dimension)`` of 2-D fields in the files."""
        return (self.y_axis.dim, self.x_axis.dim)

    def to_file(self, field: np.ndarray) -> np.ndarray:
        """A ``(..., ny, nx)`` field in the files' axis order (reversed where an axis is flipped)."""
        if self.y_axis.flip:
            field = field[..., ::-1, :]
        if self.x_axis.flip:
            field = field[..., ::-1]
        return field

    def seconds(self, model_time: float) -> float:
        """Seconds since ``start_time`` of a host model time."""
        return float(model_time) * self.time_unit_s

    def valid_time(self, model_time: float) -> datetime:
        return self.start + timedelta(seconds=self.seconds(model_time))

    def file_name(self, template: str, cycle: int, model_time: float) -> str:
        """:func:`cycle_file_name` of the cycle at host model time ``model_time``."""
        return cycle_file_name(template, cycle, self.valid_time(model_time))

    @property
    def time_units(self) -> str:
        return f"seconds since {self.start.isoformat(sep=' ')}"

    def define(self, nc: netCDF4.Dataset, n_time: int | None) -> None:
        """Dimensions and coordinate variables; ``n_time = 0``: no time dimension."""
        if n_time != 0:
            nc.createDimension("time", n_time)
            t = nc.createVariable("time", "f8", ("time",))
            t.units, t.standard_name, t.calendar = self.time_units, "time", "proleptic_gregorian"
        for axis, n in ((self.y_axis, self.ny), (self.x_axis, self.nx)):
            nc.createDimension(axis.dim, n)
            c = nc.createVariable(axis.dim, "f8", (axis.dim,))
            c[:] = np.asarray(axis.values, dtype=np.float64)
            c.setncatts(dict(axis.attrs))


def write_increment(path: Path, grid: Grid, increment: np.ndarray, spread: np.ndarray | None, *,
                    cycle: int, model_time: float, status: int, method: str, experiment: str) -> Path:
    """Write one cycle's increment (and spread) as CF netCDF, atomically."""
    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            grid.define(nc, 1)
            nc["time"][:] = [grid.seconds(model_time)]
            for v, name in enumerate(grid.variables):
                var = nc.createVariable(f"{name}_inc", "f8", ("time", *grid.dims))
                var[0] = grid.to_file(increment[v])
                var.long_name = f"analysis increment of {name}"
                if spread is not None:
                    s = nc.createVariable(f"{name}_spread", "f8", ("time", *grid.dims))
                    s[0] = grid.to_file(spread[v])
                    s.long_name = f"ensemble spread (standard deviation) of the analysis of {name}"
            nc.Conventions = "CF-1.8"
            nc.title = "lodas analysis increment"
            nc.experiment, nc.method, nc.source = experiment, method, f"lodas {__version__}"
            nc.cycle, nc.status = int(cycle), int(status)
            nc.valid_time = grid.valid_time(model_time).isoformat()
    return Path(path)


@dataclass(frozen=True)
class Fv3Field:
    """One variable of an FV3-layout increment file: archive variable ``name`` with ``n_levels``
    levels (0: a 2-D field without level dimension) and ``levels[k] = v``: level ``k``
    (0-based) is state variable ``v``; levels not listed get a zero increment."""

    name: str
    n_levels: int
    levels: dict


def write_fv3_increment(path: Path, grid: Grid, increment: np.ndarray, fields: list[Fv3Field], *,
                        level_values: np.ndarray | None, cycle: int, model_time: float, status: int, method: str,
                        experiment: str) -> Path:
    """Write one cycle's increment in the layout FV3's IAU reads (that of GSI's
    ``write_fv3_increment``), atomically: ``<name>_inc(lev, lat, lon)`` per archive variable
    (``<name>_inc(lat, lon)`` for one without levels), coordinates ``lat``, ``lon`` (degrees,
    the archive's order) and ``lev``; no time dimension (the valid time is an attribute)."""
    n_lev = max([f.n_levels for f in fields] + [1])
    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            grid.define(nc, 0)
            nc.createDimension("lev", n_lev)
            lev = nc.createVariable("lev", "f8", ("lev",))
            lev[:] = np.arange(1, n_lev + 1) if level_values is None else np.asarray(level_values, dtype=np.float64)
            lev.long_name = "level of the archive's level dimension"
            for f in fields:
                dims = (("lev",) if f.n_levels else ()) + grid.dims
                var = nc.createVariable(f"{f.name}_inc", "f8", dims)
                data = np.zeros(((f.n_levels,) if f.n_levels else ()) + (grid.ny, grid.nx))
                for k, v in f.levels.items():
                    if f.n_levels:
                        data[k] = increment[v]
                    else:
                        data[...] = increment[v]
                var[:] = grid.to_file(data)
                var.long_name = f"analysis increment of {f.name}"
            nc.title = "lodas analysis increment (FV3 IAU layout)"
            nc.experiment, nc.method, nc.source = experiment, method, f"lodas {__version__}"
            nc.cycle, nc.status = int(cycle), int(status)
            nc.valid_time = grid.valid_time(model_time).isoformat()
    return Path(path)


def read_increment(path: str | Path, variables) -> np.ndarray:
    """The ``(nvar, ny, nx)`` increment of an increment file."""
    with netCDF4.Dataset(path) as nc:
        return np.stack([np.asarray(nc[f"{v}_inc"][0], dtype=np.float64) for v in variables])


def write_trajectory(path: Path, grid: Grid, model_times, states: np.ndarray, *, title: str) -> Path:
    """Write a state trajectory ``(T, nvar, ny, nx)`` as ``<var>(time, y, x)``, atomically."""
    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            grid.define(nc, None)
            nc["time"][:] = [grid.seconds(t) for t in model_times]
            mt = nc.createVariable("model_time", "f8", ("time",))
            mt[:] = np.asarray(model_times, dtype=np.float64)
            mt.long_name = "host model time"
            for v, name in enumerate(grid.variables):
                var = nc.createVariable(name, "f8", ("time", *grid.dims))
                var[:] = grid.to_file(states[:, v])
            nc.Conventions, nc.title, nc.source = "CF-1.8", title, f"lodas {__version__}"
    return Path(path)


def read_trajectory(path: str | Path, variables) -> tuple[np.ndarray, np.ndarray]:
    """``(model_times (T,), states (T, nvar, ny, nx))`` of a trajectory file, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file not found: {path}")
    with netCDF4.Dataset(path) as nc:
        missing = [v for v in list(variables) + ["model_time"] if v not in nc.variables]
        if missing:
            raise ValueError(f"{path}: missing variables {missing}; has {list(nc.variables)}")
        times = np.asarray(nc["model_time"][:], dtype=np.float64)
        states = np.stack([np.asarray(nc[v][:], dtype=np.float64) for v in variables], axis=1)
    return times, states


class RunOutputs:
    """The outputs of one driver run in ``run_dir`` (driver root only)."""

    def __init__(self, run_dir: str | Path, grid: Grid, *, method: str, experiment: str,
                 write_increments: bool = True, keep_backgrounds: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.grid, self.method, self.experiment = grid, method, experiment
        self.write_increments, self.keep_backgrounds = write_increments, keep_backgrounds
        self.rows: list[dict] = []
        self._times: list[float] = []
        self._states: list[np.ndarray] = []
        self._jsonl = open(self.dir / "diagnostics.jsonl", "w", buffering=1)

    def cycle(self, row: dict, increment: np.ndarray, spread: np.ndarray | None, background: np.ndarray | None) -> None:
        """Record one cycle: increment file, one diagnostics line, the background if kept."""
        if self.write_increments:
            write_increment(self.dir / "increments" / f"inc_{row['cycle']:06d}.nc", self.grid, increment, spread,
                            cycle=row["cycle"], model_time=row["model_time"], status=row["status"],
                            method=self.method, experiment=self.experiment)
        if self.keep_backgrounds and background is not None:
            self._times.append(row["model_time"])
            self._states.append(np.array(background))
        self.rows.append(row)
        self._jsonl.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")

    def amend(self, cycle: int, **values) -> None:
        """Fill in figures that arrive one cycle late (the host's own put/get times)."""
        for row in reversed(self.rows):
            if row["cycle"] == cycle:
                row.update(values)
                return

    def close(self, summary: dict) -> None:
        self._jsonl.close()
        if self.rows:
            write_diagnostics(self.dir / "diagnostics.nc", self.rows, self.method)
        if self.keep_backgrounds and self._states:
            write_trajectory(self.dir / "backgrounds.nc", self.grid, self._times, np.stack(self._states),
                             title="lodas background trajectory")
        write_text(self.dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def write_diagnostics(path: Path, rows: list[dict], method: str) -> Path:
    """The per-cycle diagnostics table ``rows`` as netCDF (one variable per
    :data:`DIAGNOSTIC_FIELDS` key along ``cycle``; NaN or -1 where missing), atomically."""
    with atomic_path(path) as tmp:
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            nc.createDimension("cycle", len(rows))
            for key in DIAGNOSTIC_FIELDS:
                values = [r.get(key, math.nan) for r in rows]
                kind = "i8" if key in ("cycle", "step", "status", "n_obs") else "f8"
                if kind == "i8":
                    values = [-1 if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in values]
                var = nc.createVariable(key, kind, ("cycle",))
                var[:] = np.asarray(values, dtype=np.int64 if kind == "i8" else np.float64)
            nc.title, nc.method, nc.source = "lodas per-cycle diagnostics", method, f"lodas {__version__}"
    return Path(path)


def _json_value(v):
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v
