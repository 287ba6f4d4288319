"""Skill harness (``lodas bench l96``): every method on the same truth, observations and seeds.

The host is the numpy reference model behind the in-process bridge (it agrees with the
Fortran host to round-off), so thousands of cycles take seconds and the figures measure the
analysis, not the coupling. The truth, the observations and the perturbed initial state are
drawn once from ``&coupler_nml seed``; each method then cycles from the same start.

Published references (Sakov & Oke 2008, as reproduced by DAPPER; L96, all 40 variables
observed every 0.05, R = I): 3D-Var 0.41, ETKF 0.18, climatology 3.6.
"""
from __future__ import annotations

import time

import numpy as np

from bridges.inprocess import InProcessHost
from coupler.driver import Truth, run_cycles

PUBLISHED = {"3dvar": 0.41, "etkf": 0.18, "climatology": 3.6}


def bench_l96(cfg, methods: list[str], *, n_cycles: int | None = None, seed: int | None = None,
              quiet: bool = False) -> dict:
    """Run ``methods`` on one L96 twin set-up; print a table; return the ``--json`` summary."""
    from bridges.namelist import load
    from coupler.assim.covariance import SpectralCovariance
    from coupler.assim.networks import make_network, synthesize
    from coupler.methods import make_method
    from coupler.twin import climatology, reference_model

    seed = cfg.coupler.seed if seed is None else seed
    n_cycles = n_cycles or cfg.l96.n_cycles
    model = reference_model(cfg)
    spc = cfg.l96.steps_per_cycle
    x0 = model.step(model.default_initial_state(), cfg.twin.spinup_steps)
    times = np.arange(1, n_cycles + 1) * spc * cfg.l96.dt
    truth = np.empty((n_cycles, *model.shape))
    x = x0
    for c in range(n_cycles):
        x = model.step(x, spc)
        truth[c] = x
    var_idx = [cfg.grid.variables.index(v) for v in cfg.observed_variables()]
    network = make_network(cfg.obs.network, cfg.state_shape, var_idx, every_k=cfg.obs.every_k,
                           n_stations=cfg.obs.n_stations, fraction=cfg.obs.fraction,
                           rng=np.random.default_rng([seed, 1]))
    obs = [synthesize(truth[c], network, cfg.error_std_per_variable(), np.random.default_rng([seed, 2, c]))
           for c in range(n_cycles)]
    B = SpectralCovariance.from_climatology(climatology(model, cfg, np.random.default_rng([seed, 0])))
    x_b0 = x0 + cfg.twin.init_error_std[0] * np.random.default_rng([seed, 3]).standard_normal(x0.shape)
    result = {"testbed": "l96", "cycles": n_cycles, "spinup_cycles": cfg.twin.spinup_cycles, "seed": seed,
              "n_obs_per_cycle": int(len(network[0])), "published": PUBLISHED, "methods": {}}
    for name in methods:
        mcfg = load(cfg.path, list(cfg.overrides) + [f"assim_nml.method='{name}'"])
        method = make_method(mcfg, covariance=B)
        host = InProcessHost(model.step, x_b0, steps_per_cycle=spc, n_cycles=n_cycles, dt=cfg.l96.dt,
                             increment_mode=cfg.bridge.increment_mode, iau_steps=cfg.bridge.iau_steps)
        t0 = time.perf_counter()
        s = run_cycles(host, method, lambda c, t: obs[c], truth=Truth(times, truth),
                       spinup_cycles=cfg.twin.spinup_cycles)
        wall = (time.perf_counter() - t0) / n_cycles
        result["methods"][name] = {"analysis_rmse": s["analysis_rmse"], "background_rmse": s["background_rmse"],
                                   "wall_s_per_cycle": wall, "status_counts": s["status_counts"]}
    if not quiet:
        print(format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = [f"Lorenz-96 skill: {result['cycles']} cycles ({result['spinup_cycles']} spin-up), "
             f"{result['n_obs_per_cycle']} obs/cycle, seed {result['seed']}",
             f"{'method':<10}{'analysis RMSE':>15}{'background RMSE':>17}{'published':>11}{'s/cycle':>11}"]
    for name, m in result["methods"].items():
        pub = PUBLISHED.get(name)
        lines.append(f"{name:<10}{m['analysis_rmse']:>15.4f}{m['background_rmse']:>17.4f}"
                     f"{(f'{pub:.2f}' if pub else '-'):>11}{m['wall_s_per_cycle']:>11.2e}")
    return "\n".join(lines)
