"""In-process twin experiments on the numpy reference models: one set-up, many methods.

An :class:`Experiment` is everything a cycled OSSE needs, drawn once from an experiment seed
(``&coupler_nml seed`` unless overridden), so that every method sees the *same* truth, the
same observations and the same initial background:

====================  ==========================================================================
random stream         what it draws
====================  ==========================================================================
``[seed, 0]``         the climatology (an independent trajectory) from which the static B is estimated
``[seed, 1]``         the observing network (random station locations; one generator used by the
                      kinds of ``&obs_nml network`` in turn, see :mod:`coupler.assim.networks`)
``[seed, 2, c]``      the observation errors of cycle ``c``
``[seed, 3]``         the initial background (``&twin_nml init_background``)
``[seed, 5]``         the truth's initial state: an independent spun-up state, so different seeds
                      give different truth trajectories (the training seed of ``lodas train``
                      and the evaluation seeds of ``lodas bench`` never share a trajectory)
====================  ==========================================================================

Used by the skill benchmark (:mod:`coupler.bench`) and by training (:mod:`coupler.train`,
whose (truth, background) pairs come from :func:`run_method` with ``record_backgrounds``).
The in-line twin (:mod:`coupler.twin`) runs the Fortran hosts instead and keeps its own
truth (the default state spun up).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from coupler.assim.base import AssimilationMethod, Observations


@dataclass
class Experiment:
    """One twin set-up (shapes: ``n`` cycles, state ``(nvar, ny, nx)``).

    Attributes:
        cfg: the effective configuration.
        model: the numpy reference model (``step(state, n_steps)``).
        seed: the experiment seed.
        steps_per_cycle: model steps between analyses.
        dt: model time per step, in the host's time unit.
        times: ``(n,)`` model time of each analysis.
        truth: ``(n, nvar, ny, nx)`` true state at each analysis time.
        network: the combined observing network (:class:`coupler.assim.networks.Network`, from
            :func:`coupler.assim.networks.network_from_config`: every kind of ``&obs_nml network``).
        observations: ``n`` :class:`Observations`, one per cycle.
        x_b0: ``(nvar, ny, nx)`` initial background at model time 0.
        covariance: the climatological background-error covariance (unscaled).
    """

    cfg: object
    model: object
    seed: int
    steps_per_cycle: int
    dt: float
    times: np.ndarray
    truth: np.ndarray
    network: object
    observations: list
    x_b0: np.ndarray
    covariance: object

    @property
    def n_cycles(self) -> int:
        return len(self.times)

    def observe(self, cycle: int, model_time: float) -> Observations:
        """The :data:`coupler.driver.ObservationSource` of this experiment."""
        return self.observations[cycle]


def make_experiment(cfg, *, seed: int | None = None, n_cycles: int | None = None) -> Experiment:
    """Draw the truth, observations, B and initial background of ``cfg`` for ``seed``."""
    from coupler.assim.covariance import SpectralCovariance
    from coupler.assim.networks import network_from_config, synthesize_cycle
    from coupler.twin import climatology, independent_state, init_error_std, model_dt, reference_model

    seed = cfg.coupler.seed if seed is None else int(seed)
    n_cycles = int(n_cycles or cfg.model.n_cycles)
    model = reference_model(cfg)
    if tuple(model.shape) != cfg.state_shape:
        raise ValueError(f"{cfg.path}: &grid_nml describes a {cfg.state_shape} state but &{cfg.twin.model}_nml "
                         f"gives {tuple(model.shape)} (nvar, ny, nx)")
    spc, dt = cfg.model.steps_per_cycle, model_dt(cfg)
    x = independent_state(model, cfg, np.random.default_rng([seed, 5]))
    times = np.arange(1, n_cycles + 1) * spc * dt
    truth = np.empty((n_cycles, *model.shape))
    x0 = x
    for c in range(n_cycles):
        x = model.step(x, spc)
        truth[c] = x
    network = network_from_config(cfg, seed)                 # streams [seed, 1] and [seed, 2, c]
    obs = [synthesize_cycle(truth[c], network, seed=seed, cycle=c) for c in range(n_cycles)]
    B = SpectralCovariance.from_climatology(climatology(model, cfg, np.random.default_rng([seed, 0])))
    rng_b = np.random.default_rng([seed, 3])
    if cfg.twin.init_background == "independent":
        x_b0 = independent_state(model, cfg, rng_b)
    else:
        x_b0 = x0 + init_error_std(cfg) * rng_b.standard_normal(x0.shape)
    return Experiment(cfg=cfg, model=model, seed=seed, steps_per_cycle=spc, dt=dt, times=times, truth=truth,
                      network=network, observations=obs, x_b0=x_b0, covariance=B)


class _Recorder:
    """A bridge wrapper that keeps a copy of every background it hands to the driver (and, if
    ``increments``, of every increment the driver sends back)."""

    def __init__(self, bridge, increments: bool = False):
        self.bridge, self.backgrounds = bridge, []
        self.increments = [] if increments else None

    def receive_background(self):
        bg = self.bridge.receive_background()
        if bg.state is not None:
            self.backgrounds.append(bg.state.copy())
        return bg

    def send_increment(self, increment, status, cycle):
        if self.increments is not None:
            self.increments.append(np.array(increment, dtype=np.float64, copy=True))
        self.bridge.send_increment(increment, status, cycle)


def run_method(exp: Experiment, method: AssimilationMethod | None, *, record_backgrounds: bool = False,
               record_analyses: bool = False) -> dict:
    """Cycle ``method`` on ``exp`` with the in-process host; the :func:`coupler.driver.summarize` dict
    plus ``wall_s_per_cycle`` (model integration included) and, if asked, ``backgrounds``
    ``(n, nvar, ny, nx)`` (the cycled background of each cycle, before its analysis) and
    ``analyses`` (background plus the increment sent back: zero for a failed cycle)."""
    from bridges.inprocess import InProcessHost
    from coupler.driver import Truth, run_cycles

    cfg = exp.cfg
    host = InProcessHost(exp.model.step, exp.x_b0, steps_per_cycle=exp.steps_per_cycle, n_cycles=exp.n_cycles,
                         dt=exp.dt, increment_mode=cfg.bridge.increment_mode, iau_steps=cfg.bridge.iau_steps)
    bridge = _Recorder(host, increments=record_analyses) if record_backgrounds or record_analyses else host
    t0 = time.perf_counter()
    s = run_cycles(bridge, method, exp.observe, truth=Truth(exp.times, exp.truth),
                   spinup_cycles=cfg.twin.spinup_cycles, variables=list(cfg.grid.variables))
    s["wall_s_per_cycle"] = (time.perf_counter() - t0) / exp.n_cycles
    if record_backgrounds:
        s["backgrounds"] = np.stack(bridge.backgrounds)
    if record_analyses:
        s["analyses"] = np.stack(bridge.backgrounds) + np.stack(bridge.increments)
    return s
