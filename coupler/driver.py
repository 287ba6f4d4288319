"""The driver's cycle loop: receive a background, analyse it, send the increment back.

The loop is the same for every bridge (the MPI bridge to a Fortran host, the in-process
bridge to a Python model): a bridge only moves data. :func:`analyse_cycle` applies the
failure policy, so a failing analysis never reaches the host as anything but a zero
increment and a status:

========================  ==============================  ===================
condition                 increment sent                  status
========================  ==============================  ===================
NaN/Inf in background     zero, cycle skipped             BAD_BACKGROUND (2)
no observation file       zero (on_missing = 'warn')      NO_OBSERVATIONS (1)
analysis raises           zero, traceback in the log      ANALYSIS_FAILED (3)
NaN/Inf in increment      zero                            BAD_INCREMENT (4)
========================  ==============================  ===================

With ``&obs_nml on_missing = 'error'`` a missing file stops the run (:class:`FatalCycleError`).
"""
from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from bridges.status import Status
from coupler.assim.base import Analysis, AssimilationMethod, Observations

log = logging.getLogger("lodas")

#: (cycle, model_time) -> Observations; raises FileNotFoundError when there are none.
ObservationSource = Callable[[int, float], Observations]


class FatalCycleError(RuntimeError):
    """A cycle problem the namelist says must stop the run."""


class Bridge(Protocol):
    def receive_background(self): ...
    def send_increment(self, increment, status: Status, cycle: int) -> None: ...


@dataclass
class CycleOutcome:
    status: Status
    increment: np.ndarray
    analysis: Analysis | None
    message: str = ""


def analyse_cycle(method: AssimilationMethod | None, background: np.ndarray, observations: ObservationSource,
                  cycle: int, model_time: float, *, on_missing: str = "warn") -> CycleOutcome:
    """One analysis under the failure policy of the module docstring (no MPI, no host)."""
    zero = np.zeros_like(background)
    if not np.all(np.isfinite(background)):
        n_bad = int(np.size(background) - np.count_nonzero(np.isfinite(background)))
        return CycleOutcome(Status.BAD_BACKGROUND, zero, None,
                            f"cycle {cycle}: {n_bad} NaN/Inf values in the background: cycle skipped")
    if method is None:
        return CycleOutcome(Status.OK, zero, None)
    try:
        obs = observations(cycle, model_time)
    except FileNotFoundError as exc:
        if on_missing == "error":
            raise FatalCycleError(f"cycle {cycle}: {exc} (&obs_nml on_missing = 'error')") from None
        return CycleOutcome(Status.NO_OBSERVATIONS, zero, None,
                            f"cycle {cycle}: {exc}: zero increment (&obs_nml on_missing = 'warn')")
    try:
        _maybe_inject_fault(cycle)
        analysis = method.analyse(background, obs, cycle=cycle)
    except Exception as exc:  # noqa: BLE001 - any failure of the analysis becomes a status
        log.error("cycle %d: analysis failed:\n%s", cycle, traceback.format_exc())
        return CycleOutcome(Status.ANALYSIS_FAILED, zero, None,
                            f"cycle {cycle}: analysis failed: {type(exc).__name__}: {exc}")
    if not np.all(np.isfinite(analysis.increment)):
        return CycleOutcome(Status.BAD_INCREMENT, zero, analysis,
                            f"cycle {cycle}: the analysis produced NaN/Inf: zero increment")
    return CycleOutcome(Status.OK, analysis.increment, analysis)


def _maybe_inject_fault(cycle: int) -> None:
    """Test hook: ``LODAS_TEST_FAIL_CYCLES=3,5`` makes the analysis of those cycles raise."""
    spec = os.environ.get("LODAS_TEST_FAIL_CYCLES", "")
    if spec and str(cycle) in spec.split(","):
        raise RuntimeError(f"fault injected at cycle {cycle} (LODAS_TEST_FAIL_CYCLES)")


class Truth:
    """Truth trajectory of a twin experiment, matched to cycles by model time."""

    def __init__(self, model_times: np.ndarray, states: np.ndarray):
        self.index = {round(float(t), 9): k for k, t in enumerate(model_times)}
        self.states = states

    def __call__(self, model_time: float) -> np.ndarray | None:
        k = self.index.get(round(float(model_time), 9))
        return None if k is None else self.states[k]


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference over all state elements."""
    return float(np.sqrt(np.mean((a - b) ** 2)))


def rmse_per_variable(a: np.ndarray, b: np.ndarray) -> list[float]:
    """RMS difference of each variable of ``(nvar, ny, nx)`` states (each in its own unit)."""
    return [float(v) for v in np.sqrt(np.mean((a - b) ** 2, axis=(-2, -1)))]


def run_cycles(bridge: Bridge, method: AssimilationMethod | None, observations: ObservationSource, *,
               is_root: bool = True, outputs=None, truth: Truth | None = None, on_missing: str = "warn",
               spinup_cycles: int = 0, progress=None, variables: list[str] | None = None, comm=None) -> dict:
    """Serve the host until it finalizes; return the summary figures (root only).

    Deterministic methods (3D-Var) run on the driver root. An ensemble method (one with
    ``sample_batches``, :mod:`coupler.ensemble`) given with ``comm``, the driver's
    intra-communicator of more than one rank, has its members sampled on every rank: every
    rank must then call this with the same method built from the same configuration.
    """
    from coupler.ensemble import EnsembleRunner

    runner = None
    if comm is not None and comm.size > 1 and hasattr(method, "sample_batches"):
        runner = EnsembleRunner(method, comm)
        if is_root:
            method = runner
    rows, cycle = [], -1
    while True:
        t0 = time.perf_counter()
        bg = bridge.receive_background()
        wait_s = time.perf_counter() - t0
        if outputs is not None and rows:
            outputs.amend(rows[-1]["cycle"], host_put_s=bg.host_put_s, host_get_s=bg.host_get_s)
        if bg.command != 1:
            break
        cycle += 1
        outcome, t1 = None, time.perf_counter()
        if runner is not None and not is_root:
            runner.serve_cycle()
        if is_root:
            if bg.host_error:
                outcome = CycleOutcome(Status.PROTOCOL_ERROR, np.zeros(bg.state.shape), None,
                                       f"cycle {cycle}: {bg.host_error}")
            else:
                outcome = analyse_cycle(method, bg.state, observations, cycle, bg.model_time, on_missing=on_missing)
            if runner is not None:
                runner.skip()
            if outcome.message:
                (log.warning if outcome.status == Status.NO_OBSERVATIONS else log.error)(outcome.message)
        analysis_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        bridge.send_increment(outcome.increment if outcome else None, outcome.status if outcome else Status.OK, cycle)
        scatter_s = time.perf_counter() - t2
        if not is_root:
            continue
        row = _diagnostics(cycle, bg, outcome, truth)
        row.update(wait_s=wait_s, analysis_s=analysis_s, scatter_s=scatter_s)
        rows.append(row)
        if outputs is not None:
            spread = outcome.analysis.spread if outcome.analysis is not None else None
            outputs.cycle(row, outcome.increment, spread, bg.state)
        if progress is not None:
            progress(row)
    return summarize(rows, spinup_cycles, variables) if is_root else {}


def _diagnostics(cycle: int, bg, outcome: CycleOutcome, truth: Truth | None) -> dict:
    nan = math.nan
    info = outcome.analysis.info if outcome.analysis is not None else {}
    row = dict(cycle=cycle, step=bg.step, model_time=bg.model_time, status=int(outcome.status),
               n_obs=int(info.get("n_obs", 0)), omb_mean=info.get("omb_mean", nan), omb_rms=info.get("omb_rms", nan),
               oma_mean=info.get("oma_mean", nan), oma_rms=info.get("oma_rms", nan), rmse_b=nan, rmse_a=nan,
               spread=nan, host_put_s=nan, host_get_s=nan)
    if outcome.analysis is not None and outcome.analysis.spread is not None:
        row["spread"] = float(np.sqrt(np.mean(outcome.analysis.spread ** 2)))
    x_t = truth(bg.model_time) if truth is not None else None
    if x_t is not None and np.all(np.isfinite(bg.state)):
        x_a = bg.state + outcome.increment
        row["rmse_b"], row["rmse_a"] = rmse(bg.state, x_t), rmse(x_a, x_t)
        row["rmse_b_per_variable"] = rmse_per_variable(bg.state, x_t)
        row["rmse_a_per_variable"] = rmse_per_variable(x_a, x_t)
    return row


def summarize(rows: list[dict], spinup_cycles: int = 0, variables: list[str] | None = None) -> dict:
    """Summary figures over the cycles after ``spinup_cycles``.

    RMSEs against the truth are means over cycles of the per-cycle RMSE: ``*_rmse`` over all
    state elements, ``*_rmse_per_variable`` for each variable in its own unit (keyed by
    ``variables`` when given, else a list in state order). ``analysis_rmse_by_cycle`` and
    ``background_rmse_by_cycle`` are the per-cycle RMSEs after spin-up (``None`` where there is
    none or it is not finite): the series that paired comparisons of two methods
    (:func:`coupler.bench.paired_difference`) and block means (``benchmarks/cycle_drift.py``) need.
    """
    def mean(key, rs):
        vals = [r[key] for r in rs if r.get(key) is not None and math.isfinite(r[key])]
        return float(np.mean(vals)) if vals else None

    def mean_per_variable(key, rs):
        vals = [r[key] for r in rs if r.get(key) is not None and np.all(np.isfinite(r[key]))]
        if not vals:
            return None
        means = [float(v) for v in np.mean(vals, axis=0)]
        return dict(zip(variables, means)) if variables else means

    def by_cycle(key, rs):
        return [r[key] if r.get(key) is not None and math.isfinite(r[key]) else None for r in rs]

    kept = rows[spinup_cycles:] or rows
    counts = Counter(Status(r["status"]).label for r in rows)
    return {
        "cycles": len(rows),
        "spinup_cycles": min(spinup_cycles, len(rows)),
        "background_rmse": mean("rmse_b", kept),
        "analysis_rmse": mean("rmse_a", kept),
        "background_rmse_per_variable": mean_per_variable("rmse_b_per_variable", kept),
        "analysis_rmse_per_variable": mean_per_variable("rmse_a_per_variable", kept),
        "background_rmse_by_cycle": by_cycle("rmse_b", kept),
        "analysis_rmse_by_cycle": by_cycle("rmse_a", kept),
        "wall_s": {k: mean(k, rows) for k in ("wait_s", "analysis_s", "scatter_s", "host_put_s", "host_get_s")},
        "status_counts": dict(counts),
    }


def file_observations(obs_dir: str | Path, template: str, variables: list[str], shape, grid) -> ObservationSource:
    """Observations from one netCDF file per cycle (``&obs_nml obs_dir, file_template``).

    The file's ``valid_time`` must match the background's: a shifted archive is an error.
    """
    from coupler.io.obsfiles import read_obs_file

    def load(cycle: int, model_time: float) -> Observations:
        path = Path(obs_dir) / grid.file_name(template, cycle, model_time)
        obs, valid = read_obs_file(path, variables, shape=shape, with_valid_time=True)
        expected = grid.valid_time(model_time).isoformat()
        if valid and valid != expected:
            raise ValueError(f"{path}: valid_time {valid} but the background of cycle {cycle} is valid at {expected}")
        return obs

    return load
