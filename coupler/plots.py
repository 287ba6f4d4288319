"""Figures of a twin experiment: truth, background, analysis, increment, observation locations."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_cycle(out: Path, cfg, cycle: int, variable: str | None = None) -> Path:
    """PNG panels of one cycle of the assimilation run in ``out`` (a `lodas twin` directory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coupler.io.obsfiles import read_obs_file
    from coupler.io.outputs import read_increment, read_trajectory

    names = cfg.grid.variables
    var = variable or names[-1]
    v = names.index(var)
    _, truth = read_trajectory(out / "nature" / "backgrounds.nc", names)
    _, bgs = read_trajectory(out / "assim" / "backgrounds.nc", names)
    inc = read_increment(out / "assim" / "increments" / f"inc_{cycle:06d}.nc", names)
    obs = read_obs_file(out / "obs" / cfg.obs.file_template.format(cycle=cycle), names, shape=cfg.state_shape)
    x_t, x_b = truth[cycle, v], bgs[cycle, v]
    x_a = x_b + inc[v]
    sel = obs.var_index == v
    png = out / f"cycle_{cycle:06d}_{var}.png"
    if cfg.grid.ny == 1:
        fig, ax = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        i = np.arange(cfg.grid.nx)
        ax[0].plot(i, x_t[0], "k-", label="truth")
        ax[0].plot(i, x_b[0], "b--", label="background")
        ax[0].plot(i, x_a[0], "r-", label="analysis")
        ax[0].plot(obs.x[sel], obs.value[sel], "g.", label="observations")
        ax[0].legend(ncol=4, fontsize=8)
        ax[1].bar(i, inc[v, 0], color="gray")
        ax[1].set_ylabel("increment")
        ax[1].set_xlabel("grid index")
    else:
        fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
        lo, hi = np.percentile(x_t, [1, 99])
        for ax, field, title in zip(axes[:3], (x_t, x_b, x_a), ("truth", "background", "analysis")):
            im = ax.imshow(field, origin="lower", vmin=lo, vmax=hi, cmap="viridis")
            ax.set_title(f"{title} {var}")
        fig.colorbar(im, ax=axes[:3], shrink=0.8)
        lim = np.abs(inc[v]).max() or 1.0
        im = axes[3].imshow(inc[v], origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[3].scatter(obs.x[sel], obs.y[sel], s=6, c="k", marker="+", label="observations")
        axes[3].set_title(f"increment {var} (+: obs)")
        fig.colorbar(im, ax=axes[3], shrink=0.8)
    fig.suptitle(f"{cfg.coupler.experiment}: cycle {cycle}, method {cfg.assim.method}")
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
