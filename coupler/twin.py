"""Twin experiment: the standard way to test DA without real observations.

``lodas twin FILE.nml`` runs, in ``&coupler_nml output_dir``:

1. **spin-up** (numpy reference model): from the default state, ``&twin_nml spinup_steps``
   steps -> the truth's initial state ``init_truth.bin``;
2. **climatology** (numpy reference): an independent trajectory (spun up from a perturbed
   default state), ``clim_samples`` states every ``clim_stride`` steps -> the static B
   (``b_clim.nc``: homogeneous covariance of the climatology, scaled by ``&assim_nml b_scale``
   in the analysis), as DAPPER's Var3D 'clim' B;
3. **nature run** (Fortran host in-line, method none) -> ``nature/backgrounds.nc``: the truth;
4. **observations** drawn from the truth with the ``&obs_nml`` network and errors -> ``obs/``;
5. **free run** (Fortran host in-line from the perturbed state, method none) -> free-run RMSE;
6. **assimilation run** (Fortran host in-line from the same perturbed state, the namelist's
   method) -> ``assim/``: increments, diagnostics with O-B, O-A and RMSE against the truth.

The Fortran hosts and the numpy references agree to round-off, so spin-up and climatology
may use the cheap reference while every cycled run uses the real host.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("lodas")


def reference_model(cfg):
    """The numpy reference of the testbed named by ``&twin_nml model``."""
    m = cfg.model
    if cfg.twin.model == "l96":
        from coupler.models.lorenz96 import Lorenz96

        return Lorenz96(n=m.n, forcing=m.forcing, dt=m.dt)
    from coupler.models.shallow_water import ShallowWater, ShallowWaterParams

    names = {f.name for f in dataclasses.fields(ShallowWaterParams)}
    return ShallowWater(ShallowWaterParams(**{k: getattr(m, k) for k in names if hasattr(m, k)}))


def model_dt(cfg) -> float:
    """Model time per step in the host's time unit (L96: dt; SW: dt_s)."""
    return cfg.model.dt if cfg.twin.model == "l96" else cfg.model.dt_s


def init_error_std(cfg) -> np.ndarray:
    """``&twin_nml init_error_std`` as ``(nvar, 1, 1)`` (one value: every variable)."""
    std = np.asarray(cfg.twin.init_error_std, dtype=np.float64)
    nvar = cfg.state_shape[0]
    if std.size not in (1, nvar):
        raise ValueError(f"{cfg.path}: &twin_nml init_error_std has {std.size} values; expected 1 or {nvar} "
                         f"(one per &grid_nml variable {cfg.grid.variables})")
    return np.broadcast_to(std.reshape(-1), (nvar,))[:, None, None]


def independent_state(model, cfg, rng: np.random.Generator) -> np.ndarray:
    """A state of a trajectory independent of the truth's: the default state plus white noise
    of ``init_error_std``, spun up ``spinup_steps``. The noise must be of the size of the
    climate's variability, not a round-off seed: the shallow-water flow (error-doubling time
    ~4 days) stays correlated > 0.99 with the truth for 40 days after a 1e-3 perturbation,
    and decorrelates in ~20 days after a (0.5 m/s, 5 m) one."""
    x = model.default_initial_state()
    x = x + init_error_std(cfg) * rng.standard_normal(x.shape)
    return model.step(x, cfg.twin.spinup_steps)


def climatology(model, cfg, rng: np.random.Generator) -> np.ndarray:
    """``(clim_samples, nvar, ny, nx)`` states of an independent long run of the reference model."""
    t = cfg.twin
    x = independent_state(model, cfg, rng)
    samples = np.empty((t.clim_samples, *x.shape))
    for k in range(t.clim_samples):
        x = model.step(x, t.clim_stride)
        samples[k] = x
    return samples


def _write_state(path: Path, state: np.ndarray) -> Path:
    """Raw float64 of the (nvar, ny, nx) C-order state = Fortran state(nx, ny, nvar)."""
    from coupler.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        np.ascontiguousarray(state, dtype=np.float64).tofile(tmp)
    return path


def _run(cfg, overrides: list[str], run_dir: Path, label: str) -> dict:
    """One in-line MPMD run on an effective namelist (the host reads it too)."""
    from bridges.namelist import load
    from coupler.cli import last_json, launch

    cfg_run = load(cfg.path, list(cfg_overrides(cfg)) + overrides + [f"coupler_nml.output_dir='{run_dir}'"])
    log.info("%s: running the %s host on %d rank(s), driver on %d", label, cfg.twin.model,
             cfg_run.coupler.host_ranks, cfg_run.coupler.driver_ranks)
    proc = launch(cfg_run, capture=True, quiet=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return last_json(proc.stdout)


def cfg_overrides(cfg) -> list[str]:
    """Overrides already applied to ``cfg`` (kept when the namelist is re-read for each run)."""
    return list(cfg.overrides)


def run_twin(cfg, *, plot: bool = False) -> dict:
    """Run the whole twin experiment; return the summary (also written to ``twin_summary.json``)."""
    from coupler.assim.covariance import SpectralCovariance
    from coupler.assim.networks import network_from_config, synthesize_cycle
    from coupler.io.covfiles import write_covariance
    from coupler.io.obsfiles import write_obs_file
    from coupler.io.outputs import Grid, read_trajectory

    out = Path(cfg.coupler.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, grid = reference_model(cfg), Grid.from_config(cfg)
    if tuple(model.shape) != cfg.state_shape:
        raise ValueError(f"{cfg.path}: &grid_nml describes a {cfg.state_shape} state but &{cfg.twin.model}_nml "
                         f"gives {tuple(model.shape)} (nvar, ny, nx)")
    rng = np.random.default_rng([cfg.coupler.seed, 0])
    m = cfg.model

    log.info("spin-up: %d steps of the numpy reference", cfg.twin.spinup_steps)
    x_truth0 = model.step(model.default_initial_state(), cfg.twin.spinup_steps)
    _write_state(out / "init_truth.bin", x_truth0)

    b_file = cfg.assim.b_file
    if cfg.assim.method == "3dvar" and not b_file and not cfg.assim.b_std:
        log.info("climatology: %d samples every %d steps", cfg.twin.clim_samples, cfg.twin.clim_stride)
        B = SpectralCovariance.from_climatology(climatology(model, cfg, rng))
        b_file = str(write_covariance(out / "b_clim.nc", B, cfg.grid.variables))

    nature = _run(cfg, [f"{cfg.twin.model}_nml.init_file='{out / 'init_truth.bin'}'", "assim_nml.method='none'",
                        "coupler_nml.write_backgrounds=.true.", "coupler_nml.write_increments=.false.",
                        "coupler_nml.truth_file=''"], out / "nature", "nature")
    truth_file = out / "nature" / "backgrounds.nc"
    times, truth = read_trajectory(truth_file, cfg.grid.variables)

    obs_dir = out / "obs"
    network = network_from_config(cfg, cfg.coupler.seed)    # streams [seed, 1] and [seed, 2, c]
    for c, (t, x_t) in enumerate(zip(times, truth)):
        obs = synthesize_cycle(x_t, network, seed=cfg.coupler.seed, cycle=c)
        write_obs_file(obs_dir / grid.file_name(cfg.obs.file_template, c, t), obs, cfg.grid.variables, c,
                       grid.valid_time(t))
    log.info("observations: %d per cycle (%s), %d cycles, in %s", len(network), ", ".join(cfg.obs.network),
             len(times), obs_dir)

    rng_b = np.random.default_rng([cfg.coupler.seed, 3])
    if cfg.twin.init_background == "independent":
        x_b0 = independent_state(model, cfg, rng_b)
    else:
        x_b0 = x_truth0 + init_error_std(cfg) * rng_b.standard_normal(x_truth0.shape)
    _write_state(out / "init_background.bin", x_b0)
    common = [f"{cfg.twin.model}_nml.init_file='{out / 'init_background.bin'}'", f"coupler_nml.truth_file='{truth_file}'",
              f"obs_nml.obs_dir='{obs_dir}'"]
    result = {"model": cfg.twin.model, "cycles": len(times), "n_obs_per_cycle": len(network),
              "output_dir": str(out), "nature": nature}
    if cfg.twin.free_run:
        result["free"] = _run(cfg, common + ["assim_nml.method='none'", "coupler_nml.write_increments=.false."],
                              out / "free", "free run")
    assim_over = common + ([f"assim_nml.b_file='{b_file}'"] if b_file else [])
    if plot:
        assim_over += ["coupler_nml.write_backgrounds=.true.", "coupler_nml.write_increments=.true."]
    result["assim"] = _run(cfg, assim_over, out / "assim", f"assimilation ({cfg.assim.method})")
    result["ok"] = result["assim"].get("status_counts", {}).get("ok", 0) == result["assim"].get("cycles", -1)
    print(table(result, cfg.assim.method))
    if plot:
        from coupler.plots import plot_cycle

        png = plot_cycle(out, cfg, len(times) - 1)
        result["figure"] = str(png)
        print(f"figure: {png}")
    (out / "twin_summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def table(result: dict, method: str) -> str:
    """The free-run vs analysis RMSE table of a twin experiment (per variable when there are several)."""
    def f(v):
        return "   n/a" if v is None else f"{v:8.4f}"

    a, free = result["assim"], result.get("free", {})
    per_var = a.get("analysis_rmse_per_variable") or {}
    names = list(per_var) if len(per_var) > 1 else []
    cols = ["all"] + names

    def figures(summary: dict, key: str) -> str:
        vals = [summary.get(f"{key}_rmse")] + [(summary.get(f"{key}_rmse_per_variable") or {}).get(n) for n in names]
        return "".join(f"{f(v):>10}" for v in vals)

    head = "".join(f"{c:>10}" for c in cols)
    lines = [f"twin experiment: {result['model']}, {result['cycles']} cycles, {result['n_obs_per_cycle']} obs/cycle "
             f"(RMSE against the truth, mean over cycles after {a.get('spinup_cycles', 0)} spin-up cycles"
             + ("; 'all' mixes units" if names else "") + ")",
             f"{'run':<34}{head}{'s/cycle':>10}"]
    if free:
        lines.append(f"{'free run (none)':<34}{figures(free, 'background')}"
                     f"{f((free.get('wall_s') or {}).get('analysis_s')):>10}")
    lines += [f"{method + ' background':<34}{figures(a, 'background')}",
              f"{method + ' analysis':<34}{figures(a, 'analysis')}{f((a.get('wall_s') or {}).get('analysis_s')):>10}"]
    return "\n".join(lines)
