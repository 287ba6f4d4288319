"""Skill harness (``lodas bench l96|sw``): every method on the same truth, observations and seeds.

The host is the numpy reference model behind the in-process bridge (it agrees with the
Fortran host to round-off), so thousands of cycles take seconds and the figures measure the
analysis, not the coupling. The truth, the observations, B and the initial background are
drawn once from the experiment seed (:func:`coupler.experiment.make_experiment`); each method
then cycles from the same start.

Published references (Sakov & Oke 2008, as reproduced by DAPPER; L96, all 40 variables
observed every 0.05, R = I): 3D-Var 0.41, ETKF 0.18, climatology 3.6.

Method ``etkf`` (bench only, :mod:`coupler.assim.etkf`): the ETKF needs an ensemble of
forecasts, which the in-line host cannot give, so the harness integrates the ensemble itself
(:func:`~coupler.assim.etkf.run_etkf`, same truth and observations, the same summary keys
plus ``spread``). Its ``&assim_nml etkf_members`` initial members are centred on the initial
background of the other methods (:func:`etkf_run`), drawn from ``default_rng([seed, 4])``;
the filter is deterministic after that. ``&assim_nml inflation`` inflates the forecast
anomalies, ``etkf_rtps`` relaxes the analysis spread to the forecast's, and
``etkf_localization > 0`` makes it the local ETKF (LETKF) that a 12288-dimensional
shallow-water state with a few tens of members needs.

Paired comparison: when ``lo-sda`` is among the methods, every other method's entry gets
``minus_lo-sda``, the mean over the scored cycles of ``rmse_m(c) - rmse_lo-sda(c)`` (positive:
LO-SDA better) with its 95% interval (:func:`paired_difference`): the methods see the same
truth and observations, so the per-cycle difference removes the flow's own variability, and
the interval says whether a difference of a few per cent is one.
"""
from __future__ import annotations

import math

import numpy as np

PUBLISHED = {"l96": {"3dvar": 0.41, "etkf": 0.18, "climatology": 3.6}, "sw": {}}
#: Methods only the harness can run (not &assim_nml method choices of the in-line driver).
BENCH_ONLY = ("etkf",)


#: The method every other one is compared with, cycle by cycle (:func:`paired_difference`).
REFERENCE = "lo-sda"


def paired_difference(a, b, level: float = 0.95) -> dict | None:
    """Mean of the paired difference ``delta_c = a_c - b_c`` of two per-cycle score series and its
    confidence interval, allowing for the serial correlation of cycled scores.

    With ``rho`` the lag-1 autocorrelation of ``delta`` (clipped to ``[0, 0.99]``, so never
    narrower than for independent cycles), the series counts as ``n_eff = n (1 - rho) / (1 + rho)``
    independent values (the AR(1) variance inflation of a time mean: Wilks, *Statistical Methods
    in the Atmospheric Sciences*, 3rd ed., eq. 5.12; the approach of operational score cards,
    Geer 2016, Tellus A 68, 30229) and the interval is ``mean +- t_{(1+level)/2, n_eff-1} s / sqrt(n_eff)``.

    Args:
        a, b: per-cycle scores (same cycles, same length); ``None`` or non-finite entries drop
            that cycle from both.
        level: the interval's coverage.

    Returns:
        ``{"mean", "ci": [lo, hi], "level", "lag1_autocorrelation", "cycles", "effective_cycles"}``,
        or ``None`` with fewer than 10 common finite cycles.
    """
    from scipy.stats import t as student_t

    if len(a) != len(b):
        raise ValueError(f"paired_difference: series of {len(a)} and {len(b)} cycles")
    x = np.array([np.nan if v is None else v for v in a], dtype=float)
    y = np.array([np.nan if v is None else v for v in b], dtype=float)
    d = (x - y)[np.isfinite(x) & np.isfinite(y)]
    n = d.size
    if n < 10:
        return None
    dev = d - d.mean()
    var = float(np.mean(dev ** 2))
    rho = float(np.sum(dev[1:] * dev[:-1]) / (n * var)) if var > 0 else 0.0
    rho = min(max(rho, 0.0), 0.99)
    n_eff = n * (1 - rho) / (1 + rho)
    half = float(student_t.ppf(0.5 + level / 2, max(n_eff - 1, 1)) * d.std(ddof=1) / math.sqrt(n_eff))
    mean = float(d.mean())
    return {"mean": mean, "ci": [mean - half, mean + half], "level": level, "lag1_autocorrelation": rho,
            "cycles": int(n), "effective_cycles": float(n_eff)}


def etkf_run(exp, *, spinup_cycles: int | None = None, **record) -> dict:
    """The harness' ETKF (LETKF with ``&assim_nml etkf_localization > 0``) on ``exp``, cycled
    in-process: :func:`coupler.assim.etkf.run_etkf`'s dict (``record``: its
    ``record_backgrounds`` / ``record_analyses``).

    Its ``etkf_members`` initial members (stream ``[exp.seed, 4]``) are re-centred on ``x_b0``: with ``&twin_nml init_background = 'perturbed_truth'``
    white noise of ``init_error_std``; with ``'independent'`` (``x_b0`` a state of another
    trajectory) ``B^{1/2} xi / sqrt(2)``, ``B`` the experiment's climatological covariance:
    balanced, spatially correlated perturbations (white ones are damped within hours). Half the
    climatological variance, not the initial error's ``2 B``: from ``2 B`` the first analysis
    collapses the spread far below the error (shallow water, seed 11, 20 members: 7.6 -> 0.7
    against an error of 3.0) and the filter recovers more slowly. ``spinup_cycles``:
    ``&twin_nml spinup_cycles`` by default."""
    from coupler.assim.etkf import initial_ensemble, run_etkf
    from coupler.twin import init_error_std

    cfg, a = exp.cfg, exp.cfg.assim
    rng = np.random.default_rng([exp.seed, 4])
    if cfg.twin.init_background == "independent":
        members = initial_ensemble(exp.x_b0, a.etkf_members, exp.covariance.scaled(0.5), rng)
    else:
        members = initial_ensemble(exp.x_b0, a.etkf_members, init_error_std(cfg)[:, 0, 0], rng)
    return run_etkf(exp.model.step, members, exp.observations, exp.truth, exp.steps_per_cycle, a.inflation,
                    localization=a.etkf_localization, rtps=a.etkf_rtps,
                    spinup_cycles=cfg.twin.spinup_cycles if spinup_cycles is None else spinup_cycles,
                    model_times=exp.times, **record)


def _bench_etkf(exp) -> dict:
    """The ETKF row of the table (:func:`etkf_run`)."""
    a, s = exp.cfg.assim, etkf_run(exp)
    return {"analysis_rmse": s["analysis_rmse"], "background_rmse": s["background_rmse"],
            "wall_s_per_cycle": s["wall_s_per_cycle"], "status_counts": s["status_counts"],
            "analysis_rmse_per_variable": dict(zip(exp.cfg.grid.variables, s["analysis_rmse_per_variable"])),
            "analysis_rmse_by_cycle": s["analysis_rmse_by_cycle"], "spread": s["spread"],
            "n_members": a.etkf_members, "inflation": a.inflation, "localization": a.etkf_localization,
            "rtps": a.etkf_rtps}


def bench(cfg, methods: list[str], *, n_cycles: int | None = None, seed: int | None = None,
          quiet: bool = False) -> dict:
    """Run ``methods`` on one twin set-up of ``cfg``; print a table; return the ``--json`` summary.

    Each method name is an ``&assim_nml method`` (the namelist is re-read with that method, so
    its other keys apply) or one of :data:`BENCH_ONLY`.
    """
    from bridges.namelist import load
    from coupler.experiment import make_experiment, run_method
    from coupler.methods import make_method

    exp = make_experiment(cfg, seed=seed, n_cycles=n_cycles)
    testbed = cfg.twin.model
    result = {"testbed": testbed, "cycles": exp.n_cycles, "spinup_cycles": cfg.twin.spinup_cycles,
              "seed": exp.seed, "n_obs_per_cycle": int(len(exp.observations[0])),
              "variables": list(cfg.grid.variables), "published": PUBLISHED.get(testbed, {}), "methods": {}}
    for name in methods:
        if name in BENCH_ONLY:
            result["methods"][name] = _bench_etkf(exp)
            continue
        mcfg = load(cfg.path, list(cfg.overrides) + [f"assim_nml.method='{name}'"])
        s = run_method(exp, make_method(mcfg, covariance=exp.covariance))
        result["methods"][name] = {k: s[k] for k in ("analysis_rmse", "background_rmse", "wall_s_per_cycle",
                                                     "status_counts", "analysis_rmse_per_variable",
                                                     "analysis_rmse_by_cycle")}
    series = {name: m.pop("analysis_rmse_by_cycle") for name, m in result["methods"].items()}
    if REFERENCE in series:
        for name, m in result["methods"].items():
            if name != REFERENCE:
                m[f"minus_{REFERENCE}"] = paired_difference(series[name], series[REFERENCE])
    ref = result["methods"].get("3dvar")
    if ref:                                        # cost relative to 3D-Var in the same run
        for m in result["methods"].values():
            m["time_ratio_to_3dvar"] = m["wall_s_per_cycle"] / ref["wall_s_per_cycle"]
    if not quiet:
        print(format_table(result))
    return result


def _difference_cell(m: dict) -> str:
    d = m.get(f"minus_{REFERENCE}")
    if not d:
        return "-"
    return f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"


def format_table(result: dict) -> str:
    published = result.get("published", {})
    lines = [f"{result['testbed']} skill: {result['cycles']} cycles ({result['spinup_cycles']} spin-up), "
             f"{result['n_obs_per_cycle']} obs/cycle, seed {result['seed']}",
             f"{'method':<10}{'analysis RMSE':>15}{'background RMSE':>17}{'published':>11}{'s/cycle':>11}"
             f"{'x 3D-Var':>10}{f'minus {REFERENCE} (95%)':>28}"]
    for name, m in result["methods"].items():
        pub = published.get(name)
        ratio = m.get("time_ratio_to_3dvar")
        rmse = {k: "diverged" if m[k] is None or not math.isfinite(m[k]) else f"{m[k]:.4f}"
                for k in ("analysis_rmse", "background_rmse")}
        lines.append(f"{name:<10}{rmse['analysis_rmse']:>15}{rmse['background_rmse']:>17}"
                     f"{(f'{pub:.2f}' if pub else '-'):>11}{m['wall_s_per_cycle']:>11.2e}"
                     f"{(f'{ratio:.3g}' if ratio is not None else '-'):>10}{_difference_cell(m):>28}")
    return "\n".join(lines)
