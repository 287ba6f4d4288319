"""One namelist file for the host model and lodas: typed, validated configuration.

The same Fortran namelist file holds the host model's own groups and lodas's groups. Each
side reads the groups it knows: the Fortran host with plain ``read(unit, nml=...)``, the
Python side here, with f90nml, into the dataclasses below. Groups that lodas does not know
are carried along untouched (so the lodas groups can be appended to an existing model's
``input.nml``); inside a lodas group every key is checked: unknown keys, wrong types and
out-of-range values are :class:`NamelistError` naming the file, group, key, value and what
was expected, with a close-match suggestion.

This module is the single edge between the file format and the typed configuration: the
rest of lodas only sees :class:`Config`.

Groups (``lodas check FILE.nml`` prints every key with its value):

- ``&coupler_nml``  run-level settings; ``output_dir`` is a fixed contract scripts rely on.
- ``&grid_nml``     the grid and variables the driver expects from the host.
- ``&bridge_nml``   read by *both* the Fortran bridge and Python: how increments are applied.
- ``&assim_nml``    the analysis method and its settings.
- ``&obs_nml``      observation files and synthetic networks.
- ``&twin_nml``     twin-experiment workflow (nature run, perturbed start, climatology).
- ``&l96_nml``, ``&sw_nml``  the testbed host models' own groups (read by the Fortran hosts;
  known here so twin experiments can run the numpy reference models).
- ``&train_nml``    training of the LO-SDA networks (``lodas train``; optional).
- ``&replay_nml``   offline replay of archived cycles (``lodas replay``; optional).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import f90nml

__all__ = [
    "NamelistError", "Config", "load", "parse_override", "GROUPS",
    "CouplerNml", "GridNml", "BridgeNml", "AssimNml", "ObsNml", "TwinNml", "L96Nml", "SwNml", "TrainNml",
    "ReplayNml",
]


class NamelistError(ValueError):
    """A namelist problem, with the file, group, key and value in the message."""


def _key(default: Any = dataclasses.MISSING, *, doc: str, choices: tuple | None = None,
         ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None, required: bool = False):
    """A namelist key: default, docstring and the constraints checked on load."""
    meta = dict(doc=doc, choices=choices, ge=ge, gt=gt, le=le, lt=lt, required=required)
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    if required:
        return field(default=None, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class CouplerNml:
    """``&coupler_nml``: run-level settings of the driver."""

    output_dir: str = _key("lodas_output", doc="directory for increments, diagnostics and the effective namelist")
    experiment: str = _key("lodas", doc="experiment name written into every output file")
    seed: int = _key(0, doc="experiment seed; every random stream derives from (seed, cycle, member)", ge=0)
    start_time: str = _key("2000-01-01T00:00:00", doc="valid time of model time 0 (ISO 8601, UTC)")
    truth_file: str = _key("", doc="netCDF truth trajectory (twin experiments): RMSE against truth in the diagnostics")
    write_increments: bool = _key(True, doc="write one CF netCDF increment file per cycle")
    write_backgrounds: bool = _key(False, doc="write the background trajectory (backgrounds.nc; the truth of a nature run)")
    log_level: str = _key("info", doc="driver log level", choices=("debug", "info", "warning", "error"))
    host_exe: str = _key("", doc="host model executable used by `lodas launch` and `lodas twin`")
    host_ranks: int = _key(1, doc="MPI ranks of the host model (lodas launch / twin)", ge=1)
    driver_ranks: int = _key(1, doc="MPI ranks of the Python driver (lodas launch / twin)", ge=1)


@dataclass
class GridNml:
    """``&grid_nml``: the grid and variables the driver expects; checked against the host at init."""

    nx: int = _key(doc="global grid points in x (fastest index)", ge=1, required=True)
    ny: int = _key(doc="global grid points in y (1 for a 1-D model)", ge=1, required=True)
    variables: list[str] = _key(doc="state variables in the order the host packs them", required=True)
    dx_m: float = _key(1.0, doc="grid spacing in x, m (1.0 for index units)", gt=0)
    dy_m: float = _key(1.0, doc="grid spacing in y, m", gt=0)
    time_unit_s: float = _key(1.0, doc="seconds per unit of the host's model time (L96: 432000, 0.05 = 6 h)", gt=0)


@dataclass
class BridgeNml:
    """``&bridge_nml``: read by the Fortran bridge *and* by Python; keys must match
    ``fortran_stubs/lodas_bridge.f90`` (a test checks it)."""

    increment_mode: str = _key("direct", doc="apply the increment at once (direct) or over iau_steps model steps (iau)",
                               choices=("direct", "iau"))
    iau_steps: int = _key(1, doc="IAU window in model steps; each step adds increment/iau_steps", ge=1)
    deadline_s: float = _key(600.0, doc="seconds the host waits for an analysis before the job is aborted", gt=0)
    on_failure: str = _key("continue", doc="host action on a non-zero analysis status", choices=("continue", "abort"))
    spin_s: float = _key(2e-3, doc="seconds a waiting host or driver rank polls before it polls with 0.2 ms naps: "
                         "large (e.g. 1.0) for the lowest latency with ranks <= cores, small on oversubscribed nodes",
                         ge=0)


@dataclass
class AssimNml:
    """``&assim_nml``: the analysis method."""

    method: str = _key("3dvar", doc="analysis method: none, 3dvar, or latent diffusion with latent optimization "
                       "(lo-sda) and its baselines dps and sda (`lodas bench` also runs etkf)",
                       choices=("none", "3dvar", "lo-sda", "dps", "sda"))
    b_file: str = _key("", doc="background-error covariance file (netCDF, from `lodas twin` or `lodas climatology`)")
    b_scale: float = _key(1.0, doc="factor multiplying the climatological B", gt=0)
    cg_tol: float = _key(1e-10, doc="relative residual at which the 3D-Var conjugate gradients stop", gt=0, lt=1)
    cg_max_iter: int = _key(1000, doc="maximum conjugate-gradient iterations", ge=1)
    checkpoint: str = _key("", doc="diffusion methods: trained VAE + prior checkpoint (from `lodas train`); "
                           "empty: the shipped checkpoint of &twin_nml model")
    n_members: int = _key(16, doc="diffusion methods: ensemble members (samples, split over the driver ranks)",
                          ge=2)
    member_batch: int = _key(8, doc="diffusion methods: members sampled together in one batch; ranks get whole "
                             "batches, so results do not depend on the number of driver ranks", ge=1)
    n_steps: int = _key(10, doc="diffusion methods: reverse-diffusion sampling steps", ge=1)
    stochastic: bool = _key(True, doc="diffusion methods: re-noise with fresh noise (ancestral) instead of DDIM", )
    lo_iterations: int = _key(3, doc="lo-sda: latent-optimization iterations per sampling step", ge=1)
    lo_lr: float = _key(0.1, doc="lo-sda: step size of the latent optimizer (isotropic covariance; "
                          "the tweedie one takes an exact line search)", gt=0)
    lo_optimizer: str = _key("adam", doc="lo-sda: latent optimizer", choices=("adam", "sgd"))
    lo_covariance: str = _key("isotropic", doc="lo-sda: covariance of the latent background term: isotropic "
                              "(the noise level's variance) or tweedie (the prior's learnt covariance given the noisy "
                              "latent, (sigma_t^2/alpha_t) d z0_hat/d z_t, applied by vector-Jacobian products)",
                              choices=("isotropic", "tweedie"))
    prior_weight: float = _key(1.0, doc="lo-sda: weight of the latent background term (x the noise-level "
                               "consistent lambda_t)", ge=0)
    background_error: float = _key(0.0, doc="diffusion methods: the background's expected relative error e_b "
                                   "(RMS of (x_b - x_t) / climatological std per variable) that the prior is "
                                   "conditioned on; 0: estimated each cycle from the innovations (point "
                                   "observations), within the range the checkpoint was trained on", ge=0)
    b_std: list[float] = _key([], doc="3dvar without b_file: background-error standard deviation per variable (one "
                              "value: all), in the variable's units; with b_length a parametric homogeneous B that "
                              "needs no climatology (any grid)", gt=0)
    b_length: float = _key(0.0, doc="3dvar with b_std: length L of the Gaussian horizontal correlation "
                           "exp(-r^2 / (2 L^2)) in b_length_unit (0: uncorrelated, diagonal B)", ge=0)
    b_length_unit: str = _key("grid", doc="unit of b_length: grid (grid points) or km (with &grid_nml dx_m, dy_m)",
                              choices=("grid", "km"))
    dps_zeta: float = _key(1.0, doc="dps: guidance step size", gt=0)
    sda_gamma: float = _key(1e-2, doc="sda: variance factor of the Gaussian likelihood approximation", ge=0)
    precision: str = _key("float32", doc="diffusion networks: float32, or bf16 autocast (GPU)",
                          choices=("float32", "bf16"))
    etkf_members: int = _key(40, doc="etkf (lodas bench and lodas train only): ensemble members", ge=2)
    inflation: float = _key(1.0, doc="etkf (lodas bench and lodas train only): multiplicative inflation of the "
                            "forecast anomalies (1: none)", gt=0)
    etkf_localization: float = _key(0.0, doc="etkf (lodas bench and lodas train only): Gaspari-Cohn half-width of "
                                    "the LETKF's observation-error localisation, in grid points (weights vanish "
                                    "beyond twice it); 0: the global ETKF", ge=0)
    etkf_rtps: float = _key(0.0, doc="etkf (lodas bench and lodas train only): relaxation of the analysis spread "
                            "to the forecast spread, 0 (none) to 1 (Whitaker & Hamill 2012)", ge=0, le=1)
    threads: int = _key(1, doc="diffusion methods: torch CPU threads of each driver (or replay) rank; results are "
                        "bit-reproducible for a given count (left alone, torch takes 1 under mpiexec and every core "
                        "standalone, so in-line and replay runs would differ in the last bits)", ge=1)
    device: str = _key("auto", doc="device of each driver rank: auto (GPU if present), cpu, cuda",
                       choices=("auto", "cpu", "cuda"))


@dataclass
class ObsNml:
    """``&obs_nml``: observation files and the synthetic network of twin experiments."""

    obs_dir: str = _key("obs", doc="directory of observation files")
    file_template: str = _key("obs_{cycle:06d}.nc", doc="file name per cycle: {cycle} is the 0-based cycle index, "
                              "strftime codes (%Y%m%d%H) the cycle's valid time")
    on_missing: str = _key("warn", doc="missing file for a cycle: warn (zero increment, status 1) or error (stop)",
                           choices=("warn", "error"))
    network: list[str] = _key(["all"], doc="synthetic network: one kind or a list of distinct kinds observed in the "
                              "same cycle, e.g. 'stations', 'footprints' (all, every_k, stations, fraction: grid "
                              "points; footprints: box averages of footprint x footprint grid points tiling the grid)",
                              choices=("all", "every_k", "stations", "fraction", "footprints"))
    every_k: int = _key(2, doc="every_k network: observe every k-th grid point", ge=1)
    n_stations: int = _key(100, doc="stations network: number of stations", ge=1)
    fraction: float = _key(0.1, doc="fraction network: fraction of grid points observed", gt=0, le=1)
    variables: list[str] = _key([], doc="variables observed by the point kinds (all, every_k, stations, fraction); "
                                "empty: all of &grid_nml variables")
    error_std: list[float] = _key([1.0], doc="point kinds: observation error std per observed variable (one value: "
                                  "all), in the variable's units", gt=0)
    footprint: int = _key(8, doc="footprints network: grid points per box side (a satellite footprint of footprint x "
                          "footprint points; must divide nx and ny, a segment of footprint points when ny = 1)", ge=1)
    footprint_variables: list[str] = _key([], doc="variables observed by the footprints kind (empty: all of &grid_nml "
                                          "variables)")
    footprint_error_std: list[float] = _key([1.0], doc="footprints kind: observation error std per footprint variable "
                                            "(one value: all), in the variable's units", gt=0)


@dataclass
class TwinNml:
    """``&twin_nml``: the twin-experiment workflow (`lodas twin`)."""

    model: str = _key("l96", doc="testbed whose numpy reference makes spin-up and climatology", choices=("l96", "sw"))
    spinup_steps: int = _key(1000, doc="model steps from the default state to the truth's initial state", ge=0)
    init_background: str = _key("perturbed_truth", doc="initial state of the free and assimilation runs: "
                                "perturbed_truth (truth + white noise of init_error_std) or independent (a state "
                                "of an independent trajectory, spun up from the default state + init_error_std noise)",
                                choices=("perturbed_truth", "independent"))
    init_error_std: list[float] = _key([1.0], doc="std per variable of the initial perturbation (init_background) and "
                                       "of the perturbation that starts the independent climatology trajectory", ge=0)
    clim_samples: int = _key(1000, doc="states in the climatology from which B is estimated", ge=2)
    clim_stride: int = _key(10, doc="model steps between climatology samples", ge=1)
    free_run: bool = _key(True, doc="also run without assimilation, for the free-run RMSE")
    spinup_cycles: int = _key(0, doc="cycles left out of the mean RMSE (filter spin-up)", ge=0)


@dataclass
class L96Nml:
    """``&l96_nml``: Lorenz-96 host (Lorenz 1996; dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F)."""

    n: int = _key(40, doc="number of variables (divisible by the host ranks)", ge=4)
    forcing: float = _key(8.0, doc="forcing F")
    dt: float = _key(0.05, doc="RK4 time step, model time units (0.05 ~ 6 h)", gt=0)
    steps_per_cycle: int = _key(1, doc="model steps between analyses", ge=1)
    n_cycles: int = _key(100, doc="analysis cycles", ge=1)
    init_file: str = _key("", doc="initial state, raw float64 (Fortran order); empty: x=F, x(20)=F+0.01")
    final_file: str = _key("", doc="final state written here, raw float64; empty: not written")


@dataclass
class SwNml:
    """``&sw_nml``: 2-D rotating shallow-water host (doubly periodic, forced-dissipative).

    Defaults are those documented in :mod:`coupler.models.shallow_water`.
    """

    nx: int = _key(64, doc="grid points in x", ge=4)
    ny: int = _key(64, doc="grid points in y (a multiple of the host ranks, >= 2 rows per rank)", ge=4)
    lx_m: float = _key(3.2e6, doc="domain length in x, m (dx = lx_m/nx = 50 km)", gt=0)
    ly_m: float = _key(3.2e6, doc="domain length in y, m", gt=0)
    dt_s: float = _key(900.0, doc="RK4 time step, s (gravity-wave Courant number c dt/dx = 0.54)", gt=0)
    f0: float = _key(1e-4, doc="Coriolis parameter, 1/s (f-plane)")
    g: float = _key(1.8, doc="reduced gravity g', m/s^2 (c = sqrt(g h0) = 30 m/s, Ld = c/f0 = 300 km)", gt=0)
    h0_m: float = _key(500.0, doc="mean layer thickness, m", gt=0)
    viscosity: float = _key(1e12, doc="biharmonic viscosity nu4, m^4/s (2 dx wave e-folds in ~4.5 days)", ge=0)
    drag: float = _key(3e-7, doc="linear (Rayleigh) drag, 1/s (1/r = 39 days)", ge=0)
    forcing_amp: float = _key(3e-6, doc="amplitude F0 of the zonal Kolmogorov body force F0 sin(2 pi k y/Ly), m/s^2")
    forcing_wavenumber: int = _key(8, doc="forcing wavelengths across the domain (8: 400 km jets)", ge=1)
    steps_per_cycle: int = _key(24, doc="model steps between analyses (24 x 900 s = 6 h)", ge=1)
    n_cycles: int = _key(40, doc="analysis cycles", ge=1)
    init_file: str = _key("", doc="initial state, raw float64 (nx, ny, 3) Fortran order; empty: default state")
    final_file: str = _key("", doc="final state written here, raw float64; empty: not written")


@dataclass
class TrainNml:
    """``&train_nml``: training of the LO-SDA networks (``lodas train FILE.nml``; :mod:`coupler.train`).

    The (truth, background) pairs come from *cycled* assimilation runs of the twin set-up of
    the other groups on the training seed; the VAE is trained on their states, then frozen,
    then the conditional diffusion prior on their latents. Defaults suit Lorenz-96.
    """

    checkpoint: str = _key(doc="output checkpoint file (e.g. coupler/checkpoints/l96.pt); the resumable training "
                           "state goes next to it (<checkpoint>.state.pt, <checkpoint>.pairs.pt)", required=True)
    seed: int = _key(101, doc="training seed (truth trajectory, observations and initial states of the cycled runs, "
                     "network initialisation, batches); must differ from the evaluation seeds (&coupler_nml seed, "
                     "e.g. 1 for lodas bench, 11 used for tuning) so the networks never see the evaluation truth",
                     ge=0)
    n_cycles: int = _key(10000, doc="cycles of (truth, background) pairs kept per background source", ge=2)
    spinup_cycles: int = _key(100, doc="first cycles of each cycled run left out (filter spin-up)", ge=0)
    background_sources: list[str] = _key(["3dvar"], doc="cycled runs that make the backgrounds: 3dvar (&assim_nml "
                                         "b_scale) and/or etkf (&assim_nml etkf_members, inflation; sharper backgrounds)",
                                         choices=("3dvar", "etkf"))
    etkf_cycles: int = _key(0, doc="kept cycles the etkf source covers: 0 all n_cycles (its members start from the "
                            "independent initial state, like 3dvar's); > 0 only the last etkf_cycles, its members "
                            "drawn around the 3dvar source's analysis etkf_spinup_cycles cycles earlier (an ensemble "
                            "filter started late from a cycled analysis settles in tens of cycles instead of hundreds; "
                            "needs '3dvar' in background_sources)", ge=0)
    etkf_spinup_cycles: int = _key(80, doc="with etkf_cycles > 0: cycles the late-started etkf source runs before its "
                                   "first kept background (filter spin-up)", ge=0)
    extra_trajectories: int = _key(0, doc="more truth trajectories, each cycled by the 3dvar source from its own "
                                   "independent start (seeds derived from seed; their own station networks) for "
                                   "extra_cycles kept cycles after spinup_cycles: training pairs only (the validation "
                                   "block stays the end of the seed trajectory). Young flow: the first ~100 days of a "
                                   "shallow-water run, which one long trajectory holds only at its start", ge=0)
    extra_cycles: int = _key(320, doc="kept cycles per extra trajectory", ge=1)
    forecast_leads: list[int] = _key([1], doc="forecast leads (in cycles) of the backgrounds made from each source: "
                                     "lead k is the source's analysis of k cycles before integrated k cycles (wider "
                                     "background errors of the same flow-dependent kind)", ge=1)
    self_cycling_rounds: int = _key(0, doc="rounds of retraining the prior on the system's own backgrounds: cycle the "
                                    "&assim_nml method (a diffusion method, with its settings) with the prior trained "
                                    "so far on the last self_cycling_cycles cycles of the training trajectory, add "
                                    "its backgrounds as a source, train self_cycling_epochs more prior epochs", ge=0)
    self_cycling_cycles: int = _key(2000, doc="cycles of (truth, own background) pairs each self-cycling round keeps "
                                    "(after spinup_cycles more of spin-up), ending at the last training cycle", ge=2)
    self_cycling_epochs: int = _key(10, doc="prior epochs per self-cycling round; one epoch: every self-cycled "
                                    "training pair once plus as many pairs drawn from the other sources", ge=1)
    val_fraction: float = _key(0.1, doc="last fraction of the cycles of every source held out for validation",
                               gt=0, lt=1)
    augment: bool = _key(True, doc="random periodic shifts of each (truth, background) pair: any x-shift; y-shifts "
                         "by multiples of ny/forcing_wavenumber for the shallow-water testbed")
    vae_epochs: int = _key(6, doc="VAE epochs (one epoch: every training state once)", ge=1)
    prior_epochs: int = _key(20, doc="diffusion-prior epochs (one epoch: every training pair once)", ge=1)
    batch_size: int = _key(128, doc="states (VAE) or pairs (prior) per optimiser step", ge=1)
    lr: float = _key(2e-3, doc="peak Adam learning rate (both phases)", gt=0)
    lr_schedule: str = _key("cosine", doc="learning-rate decay over each phase, after a short linear warm-up: cosine "
                            "(to 0), step (x0.1 at 60 % and 85 %) or constant", choices=("cosine", "step", "constant"))
    latent_channels: int = _key(8, doc="VAE latent channels", ge=1)
    width: int = _key(32, doc="VAE channels at full resolution", ge=1)
    levels: int = _key(2, doc="VAE stride-2 downsamplings (latent: nx/2^levels points per row)", ge=0)
    channel_mult: list[int] = _key([1], doc="VAE channels at level l: width * channel_mult(l) (last value repeated)",
                                   ge=1)
    blocks: int = _key(1, doc="VAE residual blocks per resolution level", ge=0)
    kl_weight: float = _key(1e-3, doc="VAE KL weight, relative (mean KL per latent element vs mean squared "
                            "normalised reconstruction error per state element)", ge=0)
    increment_weight: float = _key(0.0, doc="VAE increment-consistency weight: > 0 trains the VAE on (truth, "
                                   "background) pairs and adds this times the relative squared error of the decoded "
                                   "increment D(z_t) - D(z_b) (coupler/assim/latent.py); 0: states only", ge=0)
    prior_width: int = _key(64, doc="channels of the diffusion prior's eps network", ge=1)
    prior_blocks: int = _key(4, doc="residual blocks of the eps network", ge=1)
    schedule_eta: float = _key(1e-3, doc="noise-schedule floor eta of the cosine schedule", gt=0, lt=1)
    ema_decay: float = _key(0.999, doc="exponential moving average of the prior's weights (0: none); the EMA "
                            "weights are validated and saved", ge=0, lt=1)
    eval_pairs: int = _key(128, doc="validation pairs on which the final prior is sampled (8 members, &assim_nml "
                           "n_steps) to report the prior ensemble-mean RMSE against the background's (0: skip)", ge=0)
    threads: int = _key(1, doc="torch CPU threads (results are deterministic for a given seed and thread count)",
                        ge=1)
    device: str = _key("cpu", doc="training device: cpu, cuda, or auto (cuda if present)",
                       choices=("cpu", "cuda", "auto"))
    keep_state: bool = _key(False, doc="keep the training state and pairs files after a completed run (to extend it "
                            "later with --resume)")


@dataclass
class ReplayNml:
    """``&replay_nml``: offline replay of archived cycles (``lodas replay FILE.nml``; :mod:`coupler.replay`).

    File names (``background_file`` and ``&obs_nml file_template``) are templates: ``{cycle}``
    (Python format, the 0-based cycle index) and strftime codes of the cycle's valid time
    (``%Y%m%d%H``). A ``background_file`` without either is one file with a time dimension.
    """

    background_file: str = _key(doc="background archive: a template naming one file per cycle (e.g. "
                                "'bg/bg_%Y%m%d%H.nc'), or one file with a time dimension", required=True)
    first_time: str = _key("", doc="valid time of the first cycle replayed (ISO 8601); empty: the first time of a "
                           "single background file")
    last_time: str = _key("", doc="valid time of the last cycle (ISO 8601); empty: the last time of a single "
                          "background file, or first_time (one cycle) for per-cycle files")
    interval_h: float = _key(6.0, doc="hours between cycles (with first_time); cycle k is valid at first_time + "
                             "k * interval_h", gt=0)
    variable_map: list[str] = _key([], doc="names in the archive files: 'lodas=file' per entry, for state variables "
                                   "('h=zg'; 'T500=t:3' takes level 3 (1-based) of a variable with a level "
                                   "dimension) and observation fields (value, error_std, var_index, x, y, lat, lon); "
                                   "unmapped names are looked up as they are")
    increment_layout: str = _key("cf", doc="increment files: cf (<var>_inc(time, y, x) per state variable) or fv3 "
                                 "(<var>_inc(lev, lat, lon) per archive variable, the layout FV3's IAU reads)",
                                 choices=("cf", "fv3"))
    write_analysis: bool = _key(False, doc="also write the analysis (background + increment) of each cycle")
    on_bad_cycle: str = _key("skip", doc="a cycle whose background cannot be read (missing or unreadable file, time "
                             "or variable): skip (zero increment, status no_background, retried by a re-run) or stop",
                             choices=("skip", "stop"))
    obs_outside: str = _key("skip", doc="observations outside the grid's domain: skip (counted in the diagnostics) "
                            "or error (the cycle fails)", choices=("skip", "error"))


#: lodas's groups, in the order they are printed and written.
GROUPS: dict[str, type] = {
    "coupler_nml": CouplerNml, "grid_nml": GridNml, "bridge_nml": BridgeNml, "assim_nml": AssimNml,
    "obs_nml": ObsNml, "twin_nml": TwinNml, "l96_nml": L96Nml, "sw_nml": SwNml, "train_nml": TrainNml,
    "replay_nml": ReplayNml,
}
#: Groups that must be present in every lodas namelist.
REQUIRED_GROUPS = ("grid_nml",)
#: Groups the Fortran side reads from the file itself: overrides of these only reach the host
#: through an effective namelist written by `lodas launch` / `lodas twin`.
HOST_GROUPS = ("bridge_nml", "l96_nml", "sw_nml")


@dataclass
class Config:
    """The effective configuration: every lodas group, typed, plus the raw namelist."""

    path: Path
    coupler: CouplerNml
    grid: GridNml
    bridge: BridgeNml
    assim: AssimNml
    obs: ObsNml
    twin: TwinNml
    l96: L96Nml | None
    sw: SwNml | None
    raw: f90nml.Namelist = field(repr=False)
    overridden_groups: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    train: TrainNml | None = None
    replay: ReplayNml | None = None

    @property
    def n_state(self) -> int:
        return len(self.grid.variables) * self.grid.ny * self.grid.nx

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """``(nvar, ny, nx)``: the Python state convention (Fortran ``state(nx, ny, nvar)``)."""
        return (len(self.grid.variables), self.grid.ny, self.grid.nx)

    @property
    def model(self) -> L96Nml | SwNml:
        """The testbed group named by ``&twin_nml model``."""
        m = self.l96 if self.twin.model == "l96" else self.sw
        if m is None:
            raise NamelistError(f"{self.path}: &twin_nml model = '{self.twin.model}' needs a "
                                f"&{self.twin.model}_nml group, which the file does not have")
        return m

    def observed_variables(self, kind: str | None = None) -> list[str]:
        """Variables observed by network ``kind`` (``None`` or a point kind: ``&obs_nml
        variables``; ``'footprints'``: ``footprint_variables``), each empty meaning all of
        ``&grid_nml variables``."""
        chosen = self.obs.footprint_variables if kind == "footprints" else self.obs.variables
        return list(chosen) or list(self.grid.variables)

    def error_std_per_variable(self, kind: str | None = None) -> list[float]:
        """Observation-error std of network ``kind`` indexed by *state* variable.

        Returns a list of length ``nvar`` in ``&grid_nml variables`` order (what
        :func:`coupler.assim.networks.synthesize` indexes by ``var_index``): the std of each
        variable observed by ``kind`` (``error_std``, or ``footprint_error_std`` for
        ``'footprints'``, given per observed variable in the order of
        :meth:`observed_variables`, one value meaning all), ``nan`` for a variable that kind
        does not observe.
        """
        names = self.observed_variables(kind)
        e = self.obs.footprint_error_std if kind == "footprints" else self.obs.error_std
        per_obs = list(e) * len(names) if len(e) == 1 else list(e)
        lookup = dict(zip(names, per_obs))
        return [float(lookup.get(v, float("nan"))) for v in self.grid.variables]

    def to_namelist(self) -> f90nml.Namelist:
        """The effective namelist: the file's groups with lodas's groups fully expanded."""
        nml = copy.deepcopy(self.raw)
        for name, cls in GROUPS.items():
            obj = getattr(self, _ATTR[name])
            if obj is None:
                continue
            # An empty list cannot be written in namelist syntax: leave it out (the default is empty).
            nml[name] = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if getattr(obj, f.name) != []}
        return nml

    def write(self, path: str | os.PathLike) -> Path:
        """Write the effective namelist (readable by f90nml and by Fortran ``read(nml=)``)."""
        from coupler.io.atomic import write_text  # local: bridges must not import the driver at load

        return write_text(path, _namelist_text(self.to_namelist()))


_ATTR = {"coupler_nml": "coupler", "grid_nml": "grid", "bridge_nml": "bridge", "assim_nml": "assim",
         "obs_nml": "obs", "twin_nml": "twin", "l96_nml": "l96", "sw_nml": "sw", "train_nml": "train",
         "replay_nml": "replay"}
_OPTIONAL_GROUPS = ("l96_nml", "sw_nml", "train_nml", "replay_nml")


def _namelist_text(nml: f90nml.Namelist) -> str:
    import io

    buf = io.StringIO()
    nml.uppercase = False
    nml.write(buf)
    return buf.getvalue()


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {int: "an integer", float: "a real number", bool: "a logical (.true./.false.)",
            str: "a string"}[tp]


def _coerce(tp, value):
    """Convert an f90nml value to ``tp`` or raise TypeError."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        values = value if isinstance(value, list) else [value]
        return [_coerce(item, v) for v in values]
    if isinstance(value, list):
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _check_range(where: str, meta: dict, value) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if meta["choices"] is not None and v not in meta["choices"]:
            opts = ", ".join(repr(c) for c in meta["choices"])
            raise NamelistError(f"{where} = {v!r}: expected one of {opts}{_suggest(str(v), meta['choices'])}")
        for op, bound, text in (("ge", meta["ge"], ">="), ("gt", meta["gt"], ">"),
                                ("le", meta["le"], "<="), ("lt", meta["lt"], "<")):
            if bound is None:
                continue
            ok = {"ge": v >= bound, "gt": v > bound, "le": v <= bound, "lt": v < bound}[op]
            if not ok:
                raise NamelistError(f"{where} = {v!r}: expected a value {text} {bound}")


def _build_group(path: Path, name: str, cls, values: dict) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{path}: &{name} {key}"
        if key not in fields:
            raise NamelistError(f"{path}: &{name}: unknown key '{key}'{_suggest(key, fields)}; "
                                f"known keys: {', '.join(fields)}")
        tp = hints[key]
        try:
            kwargs[key] = _coerce(tp, value)
        except TypeError:
            raise NamelistError(f"{where} = {value!r}: expected {_type_name(tp)}") from None
        _check_range(where, fields[key].metadata, kwargs[key])
    for key, f in fields.items():
        if f.metadata.get("required") and key not in kwargs:
            raise NamelistError(f"{path}: &{name}: required key '{key}' is missing ({f.metadata['doc']})")
    return cls(**kwargs)


def _parse_scalar(text: str):
    t = text.strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    low = t.lower()
    if low in (".true.", ".t.", "true", "t"):
        return True
    if low in (".false.", ".f.", "false", "f"):
        return False
    for conv in (int, lambda v: float(v.lower().replace("d", "e"))):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``group.key=value``; the value in Fortran namelist syntax (``1``, ``0.5``, ``.true.``,
    ``'a', 'b'`` for a list); a bare word is a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise NamelistError(f"--set {text!r}: expected group.key=value, e.g. assim_nml.method=3dvar")
    lhs, rhs = text.split("=", 1)
    group, key = (s.strip().lower() for s in lhs.split(".", 1))
    import csv

    items = next(csv.reader([rhs], quotechar="'", skipinitialspace=True)) if rhs.strip() else [""]
    values = [_parse_scalar(v) for v in items]
    return group, key, values[0] if len(values) == 1 else values


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a namelist file.

    Args:
        path: the namelist file.
        overrides: ``group.key=value`` strings applied on top of the file.

    Raises:
        NamelistError: with file, group, key, value and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise NamelistError(f"{path}: namelist file not found")
    try:
        raw = f90nml.read(path)
    except Exception as exc:  # noqa: BLE001 - f90nml raises a variety of parser errors
        raise NamelistError(f"{path}: not a readable Fortran namelist: {exc}") from None
    for name in GROUPS:
        if isinstance(raw.get(name), list):
            raise NamelistError(f"{path}: &{name} appears more than once; write it once")
    touched = []
    for text in overrides:
        group, key, value = parse_override(text)
        if group not in GROUPS:
            raise NamelistError(f"--set {text!r}: unknown group '&{group}'{_suggest(group, GROUPS)}")
        if group not in raw:
            raw[group] = {}
        raw[group][key] = value
        touched.append(group)
    for name in REQUIRED_GROUPS:
        if name not in raw:
            raise NamelistError(f"{path}: required group &{name} is missing "
                                f"(keys: {', '.join(f.name for f in dataclasses.fields(GROUPS[name]))})")
    groups = {}
    for name, cls in GROUPS.items():
        if name in _OPTIONAL_GROUPS and name not in raw:
            groups[_ATTR[name]] = None
            continue
        groups[_ATTR[name]] = _build_group(path, name, cls, dict(raw.get(name, {})))
    cfg = Config(path=path, raw=raw, overridden_groups=tuple(dict.fromkeys(touched)), overrides=tuple(overrides), **groups)
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg: Config) -> None:
    """Checks across keys and groups."""
    p = cfg.path
    names = cfg.grid.variables
    if not names:
        raise NamelistError(f"{p}: &grid_nml variables: expected at least one variable name")
    if len(set(names)) != len(names):
        raise NamelistError(f"{p}: &grid_nml variables = {names}: variable names must be unique")
    o = cfg.obs
    for key in ("variables", "footprint_variables"):
        chosen = getattr(o, key)
        for v in chosen:
            if v not in names:
                raise NamelistError(f"{p}: &obs_nml {key}: '{v}' is not a grid variable "
                                    f"(&grid_nml variables = {names}){_suggest(v, names)}")
        if len(set(chosen)) != len(chosen):
            raise NamelistError(f"{p}: &obs_nml {key} = {chosen}: expected distinct variable names")
    for key, kind, vkey in (("error_std", None, "variables"), ("footprint_error_std", "footprints",
                                                               "footprint_variables")):
        obs_vars = cfg.observed_variables(kind)
        if len(getattr(o, key)) not in (1, len(obs_vars)):
            n = "1 value" if len(obs_vars) == 1 else f"1 or {len(obs_vars)} values"
            raise NamelistError(f"{p}: &obs_nml {key} = {getattr(o, key)}: expected {n} "
                                f"(one per variable observed by &obs_nml {vkey}: {obs_vars})")
    kinds = o.network
    if not kinds:
        raise NamelistError(f"{p}: &obs_nml network = {kinds}: expected at least one network kind")
    if len(set(kinds)) != len(kinds):
        raise NamelistError(f"{p}: &obs_nml network = {kinds}: expected distinct kinds (each kind has one set "
                            f"of keys; list it once)")
    g = cfg.grid
    if "footprints" in kinds:
        for axis, size in (("nx", g.nx), ("ny", g.ny)):
            if size > 1 and size % o.footprint:
                raise NamelistError(f"{p}: &obs_nml footprint = {o.footprint}: expected a divisor of &grid_nml "
                                    f"{axis} = {size} (footprint boxes tile the grid; network = {kinds})")
    if "stations" in kinds and o.n_stations > g.nx * g.ny:
        raise NamelistError(f"{p}: &obs_nml n_stations = {o.n_stations}: expected at most the {g.nx * g.ny} grid "
                            f"points of &grid_nml (nx = {g.nx}, ny = {g.ny}); stations are distinct grid points")
    nv = len(names)
    if len(cfg.twin.init_error_std) not in (1, nv):
        raise NamelistError(f"{p}: &twin_nml init_error_std = {cfg.twin.init_error_std}: expected 1 or {nv} values")
    try:
        cfg.obs.file_template.format(cycle=0)
    except (KeyError, IndexError, ValueError) as exc:
        raise NamelistError(f"{p}: &obs_nml file_template = {cfg.obs.file_template!r}: expected a "
                            f"Python format string using only {{cycle}}: {exc}") from None
    from datetime import datetime

    def iso(group: str, key: str, value: str) -> None:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise NamelistError(f"{p}: &{group} {key} = {value!r}: expected an ISO 8601 date-time such as "
                                f"'2000-01-01T00:00:00'") from None

    iso("coupler_nml", "start_time", cfg.coupler.start_time)
    a = cfg.assim
    if a.b_std and len(a.b_std) not in (1, nv):
        raise NamelistError(f"{p}: &assim_nml b_std = {a.b_std}: expected 1 or {nv} values (one per &grid_nml "
                            f"variable: {names})")
    if a.b_std and a.b_file:
        raise NamelistError(f"{p}: &assim_nml b_file = {a.b_file!r} and b_std = {a.b_std}: expected one of them "
                            f"(a covariance file, or the parametric B of b_std and b_length)")
    r = cfg.replay
    if r is not None:
        for key in ("first_time", "last_time"):
            if getattr(r, key):
                iso("replay_nml", key, getattr(r, key))
        if r.last_time and not r.first_time:
            raise NamelistError(f"{p}: &replay_nml last_time = {r.last_time!r} needs first_time")
        if r.first_time and r.last_time and datetime.fromisoformat(r.last_time) < datetime.fromisoformat(r.first_time):
            raise NamelistError(f"{p}: &replay_nml last_time = {r.last_time!r}: expected a time >= first_time = "
                                f"{r.first_time!r}")
        try:
            r.background_file.format(cycle=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise NamelistError(f"{p}: &replay_nml background_file = {r.background_file!r}: expected a path, "
                                f"optionally with {{cycle}} and strftime codes: {exc}") from None
        seen = set()
        for entry in r.variable_map:
            lhs, sep, rhs = entry.partition("=")
            name, _, level = rhs.partition(":")
            if not sep or not lhs.strip() or not name.strip() or (level and not (level.isdigit() and int(level) >= 1)):
                raise NamelistError(f"{p}: &replay_nml variable_map entry {entry!r}: expected 'lodas=file' or "
                                    f"'lodas=file:level' (level a 1-based integer), e.g. 'h=zg' or 'T500=t:3'")
            if lhs.strip() in seen:
                raise NamelistError(f"{p}: &replay_nml variable_map: '{lhs.strip()}' is mapped more than once")
            seen.add(lhs.strip())
