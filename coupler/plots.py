"""Figures: PNG panels of one analysis cycle (``lodas plot OUTPUT_DIR``, ``lodas twin --plot``).

Panels per state variable: (truth,) background, analysis, increment with the observation
locations, and the ensemble spread when the method has one. A 1-D state (Lorenz-96) is drawn
as curves over the grid index instead of images.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np

from coupler.io.outputs import Grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_panels(png: Path, title: str, var: str, fields: dict, increment: np.ndarray | None,
                spread: np.ndarray | None, obs_xy: tuple | None, obs_values: np.ndarray | None = None) -> Path:
    """One PNG for one variable.

    Args:
        fields: ``{panel title: (ny, nx) field}`` drawn with a shared colour scale (truth,
            background, analysis; any may be missing).
        increment, spread: ``(ny, nx)`` or ``None``.
        obs_xy: ``(x, y)`` grid-index locations of this variable's observations, or ``None``.
        obs_values: the observed values (drawn as dots on the 1-D curves).
    """
    plt = _pyplot()
    extra = [p for p in (("increment", increment), ("spread", spread)) if p[1] is not None]
    one_d = next(iter(fields.values()), increment).shape[0] == 1
    if one_d:
        fig, ax = plt.subplots(1 + len(extra), 1, figsize=(9, 3 + 2.2 * len(extra)), sharex=True, squeeze=False)
        ax = ax[:, 0]
        styles = {"truth": "k-", "background": "b--", "analysis": "r-"}
        for name, f in fields.items():
            ax[0].plot(np.arange(f.shape[1]), f[0], styles.get(name, "-"), label=name)
        if obs_xy is not None and obs_values is not None:
            ax[0].plot(obs_xy[0], obs_values, "g.", label="observations")
        ax[0].set_ylabel(var)
        ax[0].legend(ncol=4, fontsize=8)
        for a, (name, f) in zip(ax[1:], extra):
            a.bar(np.arange(f.shape[1]), f[0], color="gray")
            a.set_ylabel(name)
        ax[-1].set_xlabel("grid index")
    else:
        n = len(fields) + len(extra)
        fig, axes = plt.subplots(1, n, figsize=(4.3 * n, 4.2), squeeze=False)
        axes = axes[0]
        if fields:
            lo, hi = np.nanpercentile(np.stack(list(fields.values())), [1, 99])
            for a, (name, f) in zip(axes, fields.items()):
                im = a.imshow(f, origin="lower", vmin=lo, vmax=hi, cmap="viridis")
                a.set_title(f"{name} {var}")
            fig.colorbar(im, ax=list(axes[:len(fields)]), shrink=0.8)
        for a, (name, f) in zip(axes[len(fields):], extra):
            if name == "increment":
                lim = float(np.nanmax(np.abs(f))) or 1.0
                im = a.imshow(f, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
                if obs_xy is not None:
                    a.scatter(obs_xy[0], obs_xy[1], s=6, c="k", marker="+")
                a.set_title(f"increment {var}" + (" (+: obs)" if obs_xy is not None else ""))
            else:
                im = a.imshow(f, origin="lower", cmap="magma", vmin=0)
                a.set_title(f"spread {var}")
            fig.colorbar(im, ax=a, shrink=0.8)
    fig.suptitle(title)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def plot_cycle(out: Path, cfg, cycle: int, variable: str | None = None) -> Path:
    """PNG panels of one cycle of the assimilation run in ``out`` (a `lodas twin` directory)."""
    from coupler.io.obsfiles import read_obs_file
    from coupler.io.outputs import read_increment, read_trajectory

    names = cfg.grid.variables
    var = variable or names[-1]
    v = names.index(var)
    _, truth = read_trajectory(out / "nature" / "backgrounds.nc", names)
    times, bgs = read_trajectory(out / "assim" / "backgrounds.nc", names)
    inc = read_increment(out / "assim" / "increments" / f"inc_{cycle:06d}.nc", names)
    obs = read_obs_file(out / "obs" / Grid.from_config(cfg).file_name(cfg.obs.file_template, cycle, times[cycle]),
                        names, shape=cfg.state_shape)
    sel = obs.var_index == v
    fields = {"truth": truth[cycle, v], "background": bgs[cycle, v], "analysis": bgs[cycle, v] + inc[v]}
    return plot_panels(out / f"cycle_{cycle:06d}_{var}.png",
                       f"{cfg.coupler.experiment}: cycle {cycle}, method {cfg.assim.method}", var, fields, inc[v],
                       None, (obs.x[sel], obs.y[sel]), obs.value[sel])


# -- lodas plot OUTPUT_DIR -------------------------------------------------------------------
def _choose_cycle(out: Path, rows: list[dict], spec: str | None, grid) -> dict:
    if not rows:
        raise ValueError(f"{out}: no cycles recorded (no diagnostics.jsonl or records/): expected the output "
                         f"directory of `lodas run`, `lodas launch` or `lodas replay`")
    if spec is None:
        return rows[-1]
    if spec.lstrip("-").isdigit():
        match = [r for r in rows if r["cycle"] == int(spec)]
    else:
        try:
            t = datetime.fromisoformat(spec)
        except ValueError:
            raise ValueError(f"--cycle {spec!r}: expected a cycle index or an ISO 8601 valid time") from None

        def valid(r):
            return datetime.fromisoformat(r["valid_time"]) if r.get("valid_time") else grid.valid_time(r["model_time"])

        match = [r for r in rows if valid(r) == t]
    if not match:
        raise ValueError(f"{out}: no cycle {spec} (cycles {rows[0]['cycle']}..{rows[-1]['cycle']} recorded)")
    return match[0]


def main_plot(args) -> int:
    """``lodas plot OUTPUT_DIR [--cycle T] [--variable V]``: write PNGs, print their paths."""
    from bridges.namelist import load

    out = Path(args.output_dir)
    nml = out / "effective.nml"
    if not nml.is_file():
        raise FileNotFoundError(f"{out}: no effective.nml: expected the output directory of a lodas run")
    cfg = load(nml)
    names = list(cfg.grid.variables)
    chosen = names if not args.variable else [v.strip() for v in args.variable.split(",") if v.strip()]
    for v in chosen:
        if v not in names:
            raise ValueError(f"--variable {v!r}: not a state variable of {nml} ({names})")
    from coupler.diag import read_rows

    rows, _ = read_rows(out)
    row = _choose_cycle(out, rows, args.cycle, Grid.from_config(cfg))
    c = row["cycle"]
    background, inc, spread, obs = _cycle_fields(out, cfg, c, row["model_time"], names)
    pngs = []
    for var in chosen:
        v = names.index(var)
        fields = {}
        if background is not None:
            fields = {"background": background[v], "analysis": background[v] + inc[v]}
        sel = obs.var_index == v if obs is not None else None
        title = (f"{cfg.coupler.experiment}: cycle {c} ({row.get('valid_time') or row.get('model_time')}), "
                 f"{cfg.assim.method}, status {row.get('status')}")
        pngs.append(plot_panels(out / "plots" / f"cycle_{c:06d}_{var}.png", title, var, fields, inc[v],
                                None if spread is None else spread[v],
                                None if obs is None else (obs.x[sel], obs.y[sel]),
                                None if obs is None else obs.value[sel]))
    for p in pngs:
        print(p)
    if args.json:
        print(json.dumps({"cycle": c, "figures": [str(p) for p in pngs]}))
    return 0


def _cycle_fields(out: Path, cfg, cycle: int, model_time: float, names: list[str]):
    """``(background or None, increment, spread or None, observations or None)`` of a cycle,
    as ``(nvar, ny, nx)`` arrays with axes increasing."""
    import netCDF4

    inc_file = out / "increments" / f"inc_{cycle:06d}.nc"
    if not inc_file.is_file():
        raise FileNotFoundError(f"{inc_file}: no increment file for cycle {cycle} (&coupler_nml write_increments)")
    archive = background = obs = None
    if cfg.replay is not None:
        from bridges.archive import Archive
        from coupler.replay import cycle_observations

        archive = Archive(cfg)
        cyc = next(c for c in archive.cycles if c.index == cycle)
        try:
            background = archive.read_background(cyc)
        except ValueError:
            background = None
        try:
            obs = cycle_observations(cfg, archive, cyc)[0]
        except (ValueError, FileNotFoundError):
            obs = None
    else:
        from coupler.io.obsfiles import read_obs_file
        from coupler.io.outputs import read_trajectory

        if (out / "backgrounds.nc").is_file():
            _, states = read_trajectory(out / "backgrounds.nc", names)
            background = states[cycle] if cycle < len(states) else None
        try:
            obs = read_obs_file(Path(cfg.obs.obs_dir) / Grid.from_config(cfg).file_name(
                cfg.obs.file_template, cycle, model_time), names, shape=cfg.state_shape)
        except (ValueError, FileNotFoundError):
            obs = None
    with netCDF4.Dataset(inc_file) as nc:
        if archive is not None and cfg.replay.increment_layout == "fv3":
            inc = np.stack([np.asarray(nc[f"{name}_inc"][(level or 0,) if nc[f"{name}_inc"].ndim == 3 else ()])
                            for name, level in (archive.sources[v] for v in names)])
            spread = None
        else:
            inc = np.stack([np.asarray(nc[f"{v}_inc"][0]) for v in names])
            spread = (np.stack([np.asarray(nc[f"{v}_spread"][0]) for v in names])
                      if f"{names[0]}_spread" in nc.variables else None)
    if archive is not None:                        # file order -> axes increasing
        flips = ((-2, archive.y_axis.flip), (-1, archive.x_axis.flip))
        for axis, flip in flips:
            if flip:
                inc = np.flip(inc, axis)
                spread = None if spread is None else np.flip(spread, axis)
    return background, inc, spread, obs
