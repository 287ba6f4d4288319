"""Archive bridge: the backgrounds and observations of archived cycles, read from netCDF.

A bridge only moves and checks data (:mod:`coupler.replay` does the cycles). Configured by
``&replay_nml`` and ``&obs_nml`` (see :class:`bridges.namelist.ReplayNml`):

**Cycles.** ``background_file`` is either a *template* naming one file per cycle -- ``{cycle}``
(Python format: the 0-based cycle index) and strftime codes of the cycle's valid time
(``bg/bg_%Y%m%d%H.nc``) -- or *one file with a time dimension*. Cycle ``k`` is valid at
``first_time + k * interval_h`` up to ``last_time``; with a single file and no ``first_time``
the cycles are the file's times, in order. The cycle index names the per-cycle outputs and
seeds every random stream, so a cycle's result does not depend on which rank runs it.

**Variables.** State variable ``v`` of ``&grid_nml variables`` is read from the archive
variable of the same name, or of the name ``&replay_nml variable_map`` gives (``'h=zg'``;
``'T500=t:3'`` takes level 3, 1-based, of a variable with a level dimension). Each is a 2-D
slice ``(y, x)`` of a variable whose dimensions are, in any order, x and y, optionally time
and level. Dimensions are recognised by their coordinate variable's CF ``axis``,
``standard_name`` or ``units`` (``degrees_north``, ``... since ...``), else by common names
(``lat``/``latitude``/``y``/``grid_yt``, ``lon``/``longitude``/``x``/``grid_xt``,
``time``, ``lev``/``level``/``pfull``/``plev``...). An axis stored in decreasing order
(descending latitude) is reversed on reading and again on writing: lodas holds states with
``y`` and ``x`` increasing, the outputs keep the archive's order. Fill values read as NaN
(the driver's failure policy then skips the cycle).

**Domain.** A longitude axis spanning 360 degrees is periodic; a latitude axis never is (nor
a longitude axis of a regional grid); index axes (the in-line twin's ``grid_x``/``grid_y``)
are periodic, as the testbeds are. Observations located by latitude/longitude (or by grid
index) outside the domain -- beyond the first or last row of a non-periodic axis -- are
skipped and counted, or an error (``&replay_nml obs_outside``).

Every problem is an :class:`ArchiveError` naming the file, the variable or dimension, what
was found and what was expected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import netCDF4
import numpy as np

__all__ = ["ArchiveError", "Cycle", "Archive", "render", "parse_variable_map"]

TIME_NAMES = ("time", "t", "times", "valid_time", "time_counter")
LEVEL_NAMES = ("lev", "level", "levels", "pfull", "phalf", "plev", "z", "height", "depth", "isobaricinhpa",
               "model_level", "zaxis_1", "pressure", "nz", "sigma", "hybrid")
Y_NAMES = ("lat", "latitude", "y", "grid_y", "grid_yt", "yt", "south_north", "rlat", "nlat", "ny", "yaxis_1")
X_NAMES = ("lon", "longitude", "x", "grid_x", "grid_xt", "xt", "west_east", "rlon", "nlon", "nx", "xaxis_1")
LAT_UNITS = ("degrees_north", "degree_north", "degrees_n", "degree_n", "degreesn")
LON_UNITS = ("degrees_east", "degree_east", "degrees_e", "degree_e", "degreese")
OBS_FIELDS = ("value", "error_std", "var_index", "x", "y", "lat", "lon", "footprint")


class ArchiveError(ValueError):
    """A problem with an archive file: names the file, the variable and what was expected."""


@dataclass(frozen=True)
class Cycle:
    """One archived analysis cycle: 0-based ``index`` and ``valid_time`` (naive UTC)."""

    index: int
    valid_time: datetime


def render(template: str, cycle: Cycle) -> str:
    """A file name template for one cycle (:func:`coupler.io.outputs.cycle_file_name`)."""
    from coupler.io.outputs import cycle_file_name

    return cycle_file_name(template, cycle.index, cycle.valid_time)


def is_template(name: str) -> bool:
    return "{" in name or "%" in name


def parse_variable_map(entries: list[str]) -> dict[str, tuple[str, int | None]]:
    """``['h=zg', 'T500=t:3']`` -> ``{'h': ('zg', None), 'T500': ('t', 2)}`` (level 0-based).
    The syntax is checked when the namelist is loaded."""
    out = {}
    for e in entries:
        lhs, _, rhs = e.partition("=")
        name, _, level = rhs.partition(":")
        out[lhs.strip()] = (name.strip(), int(level) - 1 if level else None)
    return out


def _units(var) -> str:
    return str(getattr(var, "units", "")).strip().lower().replace(" ", "_")


def classify_dim(ds: netCDF4.Dataset, dim: str) -> str | None:
    """``'time'``, ``'level'``, ``'y'``, ``'x'`` or ``None`` for dimension ``dim`` of ``ds``."""
    var = ds.variables.get(dim)
    if var is not None:
        axis = str(getattr(var, "axis", "")).upper()
        if axis in ("T", "Z", "Y", "X"):
            return {"T": "time", "Z": "level", "Y": "y", "X": "x"}[axis]
        sn, units = str(getattr(var, "standard_name", "")).lower(), _units(var)
        if sn == "time" or "_since_" in units:
            return "time"
        if sn in ("latitude", "grid_latitude", "projection_y_coordinate") or units in LAT_UNITS:
            return "y"
        if sn in ("longitude", "grid_longitude", "projection_x_coordinate") or units in LON_UNITS:
            return "x"
        if sn in ("air_pressure", "altitude", "height", "depth", "model_level_number",
                  "atmosphere_hybrid_sigma_pressure_coordinate"):
            return "level"
    n = dim.lower()
    for kind, names in (("time", TIME_NAMES), ("level", LEVEL_NAMES), ("y", Y_NAMES), ("x", X_NAMES)):
        if n in names:
            return kind
    return None


def decode_times(var, where: str) -> list[datetime]:
    """CF time coordinate values as naive datetimes rounded to the second."""
    units = getattr(var, "units", None)
    if not units or " since " not in str(units):
        raise ArchiveError(f"{where}: time variable '{var.name}' has units {units!r}, expected CF "
                           f"'<unit> since <date>' (e.g. 'hours since 2000-01-01 00:00:00')")
    try:
        values = np.ma.getdata(var[:]).astype(np.float64).ravel()
        dates = netCDF4.num2date(values, str(units), calendar=getattr(var, "calendar", "standard"),
                                 only_use_cftime_datetimes=False, only_use_python_datetimes=True)
    except Exception as exc:  # noqa: BLE001 - cftime raises several kinds
        raise ArchiveError(f"{where}: cannot decode time variable '{var.name}' (units {units!r}): {exc}") from None
    out = []
    for d in np.atleast_1d(dates):
        d = datetime(d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond)
        out.append((d + timedelta(microseconds=500_000)).replace(microsecond=0))
    return out


@dataclass
class _Axis:
    """A horizontal axis of the archive: file order values, whether reversed, kind, periodic."""

    dim: str
    values: np.ndarray           # file order
    attrs: dict
    flip: bool
    degrees: str | None           # 'lat', 'lon' or None (index/metric coordinates)
    periodic: bool

    @property
    def ascending(self) -> np.ndarray:
        return self.values[::-1] if self.flip else self.values


def _axis(ds: netCDF4.Dataset, dim: str, kind: str, where: str) -> _Axis:
    n = len(ds.dimensions[dim])
    var = ds.variables.get(dim)
    if var is None or var.ndim != 1:
        return _Axis(dim, np.arange(n, dtype=np.float64), {"long_name": f"{dim} index"}, False, None, True)
    values = np.asarray(np.ma.getdata(var[:]), dtype=np.float64)
    attrs = {a: var.getncattr(a) for a in var.ncattrs() if not a.startswith("_")}
    d = np.diff(values)
    if n > 1 and not (np.all(d > 0) or np.all(d < 0)):
        raise ArchiveError(f"{where}: coordinate '{dim}' is not strictly monotonic")
    flip = bool(n > 1 and d[0] < 0)
    units, sn = _units(var), str(getattr(var, "standard_name", "")).lower()
    degrees = None
    if units in LAT_UNITS or sn == "latitude" or (kind == "y" and dim.lower() in ("lat", "latitude")):
        degrees = "lat"
    elif units in LON_UNITS or sn == "longitude" or (kind == "x" and dim.lower() in ("lon", "longitude")):
        degrees = "lon"
    periodic = True
    if degrees == "lat":
        periodic = False
    elif degrees == "lon":
        spacing = abs(d).mean() if n > 1 else 360.0
        periodic = bool(n > 1 and np.allclose(abs(d), spacing, rtol=1e-6) and abs(n * spacing - 360.0) < 1e-6 * 360)
    return _Axis(dim, values, attrs, flip, degrees, periodic)


class Archive:
    """The backgrounds (and where the observations are) of the cycles a replay runs.

    Args:
        cfg: the effective :class:`bridges.namelist.Config` (with ``&replay_nml``).

    Construction reads only metadata (the time axis of a single file, and the first cycle's
    background file for the grid) and checks the layout, so a misconfigured replay fails at
    once, before any cycle runs. :meth:`read_background` then reads one 2-D slice per state
    variable: memory does not grow with the number of cycles.
    """

    def __init__(self, cfg):
        r = cfg.replay
        self.cfg, self.path = cfg, cfg.path
        self.template = r.background_file
        self.variables = list(cfg.grid.variables)
        self.shape = cfg.state_shape
        vmap = parse_variable_map(r.variable_map)
        unknown = [k for k in vmap if k not in self.variables and k not in OBS_FIELDS]
        if unknown:
            raise ArchiveError(f"{cfg.path}: &replay_nml variable_map maps {unknown}, which are neither &grid_nml "
                               f"variables {self.variables} nor observation fields {list(OBS_FIELDS)}")
        self.sources = {v: vmap.get(v, (v, None)) for v in self.variables}    # state var -> (file var, level)
        self.obs_names = {k: v[0] for k, v in vmap.items() if k in OBS_FIELDS}
        files = [f for f, _ in self.sources.values()]     # observation files may name variables as the archive does
        self.obs_aliases = {f: v for v, (f, _) in self.sources.items() if f != v and files.count(f) == 1}
        self.start = datetime.fromisoformat(cfg.coupler.start_time)
        self._times: dict[datetime, int] | None = None
        if is_template(self.template):
            if not r.first_time:
                raise ArchiveError(f"{cfg.path}: &replay_nml background_file = {self.template!r} names one file per "
                                   f"cycle: set first_time (and last_time) to say which cycles to replay")
            self.cycles = self._cycles_between(r.first_time, r.last_time or r.first_time)
        else:
            file = Path(self.template)
            with self._open(file) as ds:
                tdim = self._time_dim(ds, file)
                if tdim is None:
                    raise ArchiveError(f"{file}: no time dimension, and &replay_nml background_file = "
                                       f"{self.template!r} has no {{cycle}} or strftime codes: a single archive "
                                       f"file needs a time dimension (dimensions: {list(ds.dimensions)})")
                times = decode_times(ds.variables[tdim], str(file))
            if len(set(times)) != len(times):
                raise ArchiveError(f"{file}: time variable '{tdim}' has repeated times")
            self._times = {t: k for k, t in enumerate(times)}
            if r.first_time:
                self.cycles = self._cycles_between(r.first_time, r.last_time or max(times).isoformat())
            else:
                self.cycles = [Cycle(k, t) for k, t in enumerate(sorted(times))]
        if not self.cycles:
            raise ArchiveError(f"{cfg.path}: &replay_nml: no cycles to replay")
        self._probe()

    # -- cycles ---------------------------------------------------------------------------
    def _cycles_between(self, first: str, last: str) -> list[Cycle]:
        t0, t1 = datetime.fromisoformat(first), datetime.fromisoformat(last)
        step = timedelta(hours=self.cfg.replay.interval_h)
        n = int(math.floor((t1 - t0) / step + 1e-9)) + 1
        return [Cycle(k, t0 + k * step) for k in range(n)]

    def model_time(self, cycle: Cycle) -> float:
        """The host model time of a cycle: ``(valid_time - &coupler_nml start_time) / time_unit_s``."""
        return (cycle.valid_time - self.start).total_seconds() / self.cfg.grid.time_unit_s

    def background_file(self, cycle: Cycle) -> Path:
        return Path(render(self.template, cycle))

    # -- files ----------------------------------------------------------------------------
    @staticmethod
    def _open(file: Path) -> netCDF4.Dataset:
        if not file.is_file():
            raise ArchiveError(f"{file}: background file not found")
        try:
            return netCDF4.Dataset(file, "r")
        except OSError as exc:
            raise ArchiveError(f"{file}: not a readable netCDF file ({exc})") from None

    @staticmethod
    def _time_dim(ds: netCDF4.Dataset, file: Path) -> str | None:
        dims = [d for d in ds.dimensions if classify_dim(ds, d) == "time"]
        if len(dims) > 1:
            raise ArchiveError(f"{file}: several time dimensions {dims}")
        if dims and dims[0] not in ds.variables:
            raise ArchiveError(f"{file}: time dimension '{dims[0]}' has no coordinate variable (CF times needed)")
        return dims[0] if dims else None

    def _layout(self, ds: netCDF4.Dataset, file: Path, name: str, level: int | None, state: str):
        """Check archive variable ``name``; return ``(dims by kind, level dim or None, level count)``."""
        where = f"{file}: variable '{name}' (state variable '{state}', &replay_nml variable_map)"
        if name not in ds.variables:
            raise ArchiveError(f"{file}: no variable '{name}' for state variable '{state}' (has "
                               f"{sorted(v for v in ds.variables if v not in ds.dimensions)}; map names with "
                               f"&replay_nml variable_map = '{state}=<name in the file>')")
        var = ds.variables[name]
        kinds = {}
        for d in var.dimensions:
            k = classify_dim(ds, d)
            if k is None:
                raise ArchiveError(f"{where}: dimension '{d}' is not recognised as time, level, y or x (give its "
                                   f"coordinate variable a CF axis attribute T/Z/Y/X)")
            if k in kinds:
                raise ArchiveError(f"{where}: dimensions '{kinds[k]}' and '{d}' are both {k} dimensions")
            kinds[k] = d
        for k in ("y", "x"):
            if k not in kinds:
                raise ArchiveError(f"{where}: dimensions {var.dimensions} have no {k} dimension")
        ny, nx = len(ds.dimensions[kinds["y"]]), len(ds.dimensions[kinds["x"]])
        if (ny, nx) != self.shape[1:]:
            raise ArchiveError(f"{where}: {kinds['y']} x {kinds['x']} = {ny} x {nx}, expected ny x nx = "
                               f"{self.shape[1]} x {self.shape[2]} (&grid_nml ny, nx)")
        n_lev = len(ds.dimensions[kinds["level"]]) if "level" in kinds else 0
        if n_lev > 1 and level is None:
            raise ArchiveError(f"{where}: has {n_lev} levels along '{kinds['level']}': choose one with "
                               f"&replay_nml variable_map = '{state}={name}:<level 1..{n_lev}>'")
        if level is not None and not (0 <= level < max(n_lev, 1)):
            raise ArchiveError(f"{where}: level {level + 1} requested but '{name}' has "
                               f"{max(n_lev, 1)} level(s)")
        return kinds, n_lev

    def _probe(self) -> None:
        """Read the grid from the first cycle's background file and check every variable."""
        file = self.background_file(self.cycles[0])
        with self._open(file) as ds:
            self.levels: dict[str, tuple[int, np.ndarray | None]] = {}
            axes = None
            for v in self.variables:
                name, level = self.sources[v]
                kinds, n_lev = self._layout(ds, file, name, level, v)
                here = (_axis(ds, kinds["y"], "y", str(file)), _axis(ds, kinds["x"], "x", str(file)))
                axes = axes or here
                lev_values = None
                if n_lev and kinds["level"] in ds.variables:
                    lev_values = np.asarray(np.ma.getdata(ds.variables[kinds["level"]][:]), dtype=np.float64)
                self.levels[name] = (n_lev, lev_values)
        self.y_axis, self.x_axis = axes

    @property
    def has_latlon(self) -> bool:
        return self.y_axis.degrees == "lat" and self.x_axis.degrees == "lon"

    def output_axes(self):
        """``(x_axis, y_axis)`` as :class:`coupler.io.outputs.Axis` for the output files."""
        from coupler.io.outputs import Axis

        return tuple(Axis(a.dim, a.values, a.attrs, a.flip) for a in (self.x_axis, self.y_axis))

    def read_background(self, cycle: Cycle) -> np.ndarray:
        """The ``(nvar, ny, nx)`` float64 background of ``cycle``, axes increasing; NaN at fill values.

        Raises:
            ArchiveError: missing or unreadable file, missing time, variable, wrong shape.
        """
        file = self.background_file(cycle)
        out = np.empty(self.shape)
        with self._open(file) as ds:
            t_index = self._time_index(ds, file, cycle)
            for k, v in enumerate(self.variables):
                name, level = self.sources[v]
                kinds, n_lev = self._layout(ds, file, name, level, v)
                var = ds.variables[name]
                index = []
                for d in var.dimensions:
                    kind = next(key for key, dim in kinds.items() if dim == d)
                    index.append(slice(None) if kind in ("y", "x") else
                                 (t_index if kind == "time" else (level or 0)))
                try:
                    a = var[tuple(index)]
                except Exception as exc:  # noqa: BLE001 - HDF5 errors of a damaged file
                    raise ArchiveError(f"{file}: cannot read variable '{name}': {exc}") from None
                a = np.ma.filled(np.ma.asarray(a, dtype=np.float64), np.nan)
                spatial = [d for d in var.dimensions if d in (kinds["y"], kinds["x"])]
                if spatial != [kinds["y"], kinds["x"]]:
                    a = a.T
                out[k] = a
        if self.y_axis.flip:
            out = out[:, ::-1, :]
        if self.x_axis.flip:
            out = out[:, :, ::-1]
        return np.ascontiguousarray(out)

    def _time_index(self, ds: netCDF4.Dataset, file: Path, cycle: Cycle) -> int:
        tdim = self._time_dim(ds, file)
        if tdim is None:
            return 0
        if self._times is not None:                  # the single archive file: times decoded once
            times = self._times
        else:
            times = {t: k for k, t in enumerate(decode_times(ds.variables[tdim], str(file)))}
        if cycle.valid_time not in times:
            shown = sorted(times)
            span = f"{shown[0].isoformat()} .. {shown[-1].isoformat()}" if shown else "none"
            raise ArchiveError(f"{file}: no time {cycle.valid_time.isoformat()} (cycle {cycle.index}) in "
                               f"'{tdim}' ({len(shown)} times: {span})")
        return times[cycle.valid_time]

    # -- observations ---------------------------------------------------------------------
    def locate(self, kind: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid indices (axes increasing) of observations at file grid indices ``(x, y) = (a, b)``
        (``kind = 'index'``) or at latitude/longitude ``(a, b)`` in degrees (``'latlon'``);
        NaN outside the domain. See :data:`coupler.io.obsfiles.Locator`."""
        if kind == "latlon":
            if not self.has_latlon:
                raise ArchiveError(f"observations are located by lat/lon but the background archive "
                                   f"{self.template} has no latitude/longitude coordinates "
                                   f"({self.y_axis.dim}, {self.x_axis.dim})")
            return self._to_index(self.x_axis, b), self._to_index(self.y_axis, a)
        x, y = (np.asarray(c, dtype=np.float64) for c in (a, b))
        return self._index(self.x_axis, x, self.shape[2]), self._index(self.y_axis, y, self.shape[1])

    @staticmethod
    def _index(axis: _Axis, i: np.ndarray, n: int) -> np.ndarray:
        hi = n if axis.periodic else n - 1
        i = np.where((i >= 0) & ((i < hi) if axis.periodic else (i <= hi)), i, np.nan)
        return (n - 1) - i if axis.flip else i

    @staticmethod
    def _to_index(axis: _Axis, c: np.ndarray) -> np.ndarray:
        coord = axis.ascending
        n = len(coord)
        c = np.asarray(c, dtype=np.float64)
        if axis.degrees == "lon":
            c = coord[0] + np.mod(c - coord[0], 360.0)          # into [lon0, lon0 + 360)
        if axis.periodic and n > 1:
            spacing = (coord[-1] - coord[0]) / (n - 1)
            return np.mod((c - coord[0]) / spacing, n)
        inside = (c >= coord[0]) & (c <= coord[-1])
        return np.where(inside, np.interp(c, coord, np.arange(n, dtype=np.float64)), np.nan)
