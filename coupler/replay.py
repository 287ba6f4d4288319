"""Offline replay of archived cycles: ``[mpiexec -n N] lodas replay FILE.nml``.

Each cycle of the archive (:mod:`bridges.archive`) is independent: read its background and
observations, analyse under the driver's failure policy (:func:`coupler.driver.analyse_cycle`),
write its outputs. The cycles still to do are dealt round robin over the ranks of the
communicator, each rank on its own device; every random stream derives from
``(seed, cycle, member)``, so every output is the same for any number of ranks.

Outputs in ``&coupler_nml output_dir`` (the in-line contract, plus the records):

- ``increments/inc_<cycle:06d>.nc``: ``&replay_nml increment_layout`` ``cf`` (``<var>_inc(time,
  y, x)`` per state variable, the archive's coordinates and latitude order) or ``fv3``
  (``<var>_inc(lev, lat, lon)`` per archive variable, what FV3's IAU reads);
- ``analyses/ana_<cycle:06d>.nc`` with ``write_analysis``;
- ``records/cycle_<cycle:06d>.json``: the cycle's diagnostics row, written *last*: a cycle is
  complete when its record exists with status ``ok``. A re-run skips complete cycles and
  redoes the rest (a cycle that failed, e.g. for a missing file, is retried);
- at the end, on the root: ``diagnostics.jsonl`` and ``diagnostics.nc`` (every record in
  cycle order), ``summary.json``, ``effective.nml``.

Every file is written under a temporary name and renamed when complete, so a run killed at
any moment (SIGKILL included) leaves only complete files; nothing is held in memory across
cycles but the records' small rows.

Exit status: 0 when every cycle is ``ok``, 1 when some cycle was not (its status and message
are in its record; a re-run retries it), 2 for a bad namelist or archive layout.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bridges.archive import Archive, ArchiveError, Cycle, render
from bridges.status import Status
from coupler.diag import RECORDS_DIR, read_rows

log = logging.getLogger("lodas")

def record_path(out: Path, cycle: int) -> Path:
    return out / RECORDS_DIR / f"cycle_{cycle:06d}.json"


def complete_cycles(out: Path) -> set[int]:
    """Cycles whose record (or line of a previous run's diagnostics.jsonl) says status ok."""
    if not out.is_dir():
        return set()
    rows, _ = read_rows(out)
    return {r["cycle"] for r in rows if r.get("status") == int(Status.OK)}


class _Serial:
    """The communicator of a one-process replay (no MPI needed)."""

    rank, size = 0, 1

    def bcast(self, obj, root=0):
        return obj

    def allreduce(self, value, op=None):
        return value

    def Barrier(self):
        pass


class Replayer:
    """Runs the cycles of an archive on the ranks of ``comm`` (any mpi4py-like communicator
    with ``rank``, ``size``, ``bcast``, ``allreduce``, ``Barrier``).

    Args:
        cfg: the effective configuration (with ``&replay_nml``).
        comm: the communicator of the replay ranks (``None``: one process).
        node_rank: this rank's index among the replay ranks of its node (device choice).
    """

    def __init__(self, cfg, comm=None, node_rank: int = 0):
        from coupler.device import select_device
        from coupler.io.outputs import Fv3Field, Grid
        from coupler.methods import make_method

        self.cfg, self.comm = cfg, comm or _Serial()
        self.archive = Archive(cfg)
        r = cfg.replay
        if r.increment_layout == "fv3" and not self.archive.has_latlon:
            raise ArchiveError(f"{cfg.path}: &replay_nml increment_layout = 'fv3' needs latitude/longitude "
                               f"coordinates in the background archive; it has '{self.archive.y_axis.dim}', "
                               f"'{self.archive.x_axis.dim}' (use 'cf')")
        x_axis, y_axis = self.archive.output_axes()
        self.grid = Grid.from_config(cfg, x_axis=x_axis, y_axis=y_axis)
        self.out = Path(cfg.coupler.output_dir)
        self.device = select_device(cfg.assim.device, node_rank)
        self.method = make_method(cfg, device=self.device)
        self.truth = None
        if cfg.coupler.truth_file:
            self.truth = _truth_archive(cfg)
        self.fv3_fields = []
        if r.increment_layout == "fv3":
            by_name: dict[str, dict] = {}
            for v, (name, level) in self.archive.sources.items():
                by_name.setdefault(name, {})[level or 0] = cfg.grid.variables.index(v)
            self.fv3_fields = [Fv3Field(name, self.archive.levels[name][0], levels)
                               for name, levels in by_name.items()]
            self.level_values = next((lv for n, lv in self.archive.levels.values() if n > 1 and lv is not None), None)

    # -- one cycle ------------------------------------------------------------------------
    def observations(self, cycle: Cycle):
        return cycle_observations(self.cfg, self.archive, cycle)

    def run_cycle(self, cycle: Cycle) -> dict:
        """Analyse one cycle and write its outputs, the record last; return the record."""
        from coupler.driver import CycleOutcome, FatalCycleError, _diagnostics, analyse_cycle

        t0 = time.perf_counter()
        model_time = self.archive.model_time(cycle)
        extra = {"n_obs_outside": 0, "analysis_s": math.nan}
        try:
            background = self.archive.read_background(cycle)
        except ArchiveError as exc:
            if self.cfg.replay.on_bad_cycle == "stop":
                raise ArchiveError(f"{exc} (&replay_nml on_bad_cycle = 'stop')") from None
            background = np.zeros(self.cfg.state_shape)
            outcome = CycleOutcome(Status.NO_BACKGROUND, background, None,
                                   f"cycle {cycle.index}: {exc} (&replay_nml on_bad_cycle = 'skip')")
        else:
            def observe(_c, _t):
                try:
                    obs, extra["n_obs_outside"] = self.observations(cycle)
                except ValueError as exc:           # a malformed observation file: an archive problem
                    raise exc if isinstance(exc, ArchiveError) else ArchiveError(str(exc)) from None
                return obs

            try:
                t_a = time.perf_counter()
                outcome = analyse_cycle(self.method, background, observe, cycle.index, model_time,
                                        on_missing=self.cfg.obs.on_missing)
                extra["analysis_s"] = time.perf_counter() - t_a
            except ArchiveError as exc:
                if self.cfg.replay.on_bad_cycle == "stop":
                    raise ArchiveError(f"{exc} (&replay_nml on_bad_cycle = 'stop')") from None
                outcome = CycleOutcome(Status.NO_OBSERVATIONS, np.zeros_like(background), None,
                                       f"cycle {cycle.index}: {exc} (&replay_nml on_bad_cycle = 'skip')")
            except FatalCycleError as exc:
                raise ArchiveError(str(exc)) from None
        if outcome.message:
            (log.warning if outcome.status == Status.NO_OBSERVATIONS else log.error)(outcome.message)
        bg = SimpleNamespace(step=-1, model_time=model_time, state=background)
        truth = None
        if self.truth is not None and outcome.status != Status.NO_BACKGROUND:
            try:
                truth = self.truth.read_background(cycle)
            except ArchiveError as exc:
                log.warning("cycle %d: no truth: %s", cycle.index, exc)
        row = _diagnostics(cycle.index, bg, outcome, (lambda _t: truth) if truth is not None else None)
        row.update(valid_time=cycle.valid_time.isoformat(), n_obs_outside=extra["n_obs_outside"],
                   message=outcome.message, analysis_s=extra["analysis_s"])
        self._write(cycle, row, outcome, background)
        row["wall_s"] = time.perf_counter() - t0
        from coupler.io.atomic import write_text
        from coupler.io.outputs import _json_value

        write_text(record_path(self.out, cycle.index), json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
        return row

    def _write(self, cycle: Cycle, row: dict, outcome, background: np.ndarray) -> None:
        from coupler.io.outputs import write_fv3_increment, write_increment, write_trajectory

        c, r = self.cfg.coupler, self.cfg.replay
        common = dict(cycle=cycle.index, model_time=row["model_time"], status=row["status"],
                      method=self.cfg.assim.method, experiment=c.experiment)
        inc_path = self.out / "increments" / f"inc_{cycle.index:06d}.nc"
        if c.write_increments:
            if r.increment_layout == "fv3":
                write_fv3_increment(inc_path, self.grid, outcome.increment, self.fv3_fields,
                                    level_values=self.level_values, **common)
            else:
                spread = outcome.analysis.spread if outcome.analysis is not None else None
                write_increment(inc_path, self.grid, outcome.increment, spread, **common)
        if r.write_analysis and outcome.status != Status.NO_BACKGROUND:
            write_trajectory(self.out / "analyses" / f"ana_{cycle.index:06d}.nc", self.grid, [row["model_time"]],
                             (background + outcome.increment)[None], title="lodas analysis")

    # -- all cycles -----------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict:
        """Run every cycle not yet complete; the root returns the summary (others ``{}``)."""
        comm, out = self.comm, self.out
        t_start = time.perf_counter()
        task = None
        if comm.rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                for stray in out.glob("**/.*.tmp-*"):      # left by a killed run: never a complete file
                    stray.unlink(missing_ok=True)
                self.cfg.write(out / "effective.nml")
                done = complete_cycles(out)
                task = [c for c in self.archive.cycles if c.index not in done]
                if done:
                    log.info("%d of %d cycles already complete in %s: skipped", len(self.archive.cycles) - len(task),
                             len(self.archive.cycles), out)
            except (OSError, ValueError) as exc:           # e.g. an output directory that cannot be written
                task = f"&coupler_nml output_dir = '{out}': {exc}"
        task = comm.bcast(task, root=0)                    # every rank stops together on an error
        if isinstance(task, str):
            raise ArchiveError(task)
        todo = task
        mine = todo[comm.rank::comm.size]
        bar = _progress(len(todo), progress and comm.rank == 0 and todo)
        error = ""
        for cycle in mine:
            try:
                self.run_cycle(cycle)
            except ArchiveError as exc:                # on_bad_cycle = 'stop', or &obs_nml on_missing = 'error'
                error = f"cycle {cycle.index}: {exc}"
                break
            if bar is not None:                        # the ranks advance together (round robin)
                bar.update(min(comm.size, len(todo) - bar.n))
        errors = comm.allreduce([error] if error else [])
        import resource

        rss_mb = comm.allreduce([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])   # KiB on Linux
        if bar is not None:
            bar.update(len(todo) - bar.n)
            bar.close()
        wall = time.perf_counter() - t_start
        if comm.rank != 0:
            return {}
        summary = self._finish(len(todo), wall)
        summary["peak_rss_mb"] = max(rss_mb)            # the largest resident set of any rank
        if errors:
            summary["error"] = errors[0]
        return summary

    def _finish(self, n_run: int, wall: float) -> dict:
        from coupler.driver import summarize
        from coupler.io.atomic import write_text
        from coupler.io.outputs import _json_value, write_diagnostics

        cycles = {c.index for c in self.archive.cycles}
        rows = [r for r in read_rows(self.out)[0] if r["cycle"] in cycles]
        summary = summarize(rows, self.cfg.twin.spinup_cycles, list(self.cfg.grid.variables))
        summary.update(output_dir=str(self.out), method=self.cfg.assim.method, ranks=self.comm.size,
                       cycles_total=len(cycles), cycles_run=n_run, cycles_skipped_complete=len(cycles) - n_run,
                       wall_s_total=wall, cycles_per_s=(n_run / wall if wall > 0 else None), device=self.device,
                       ok=len(rows) == len(cycles) and all(r["status"] == int(Status.OK) for r in rows))
        write_text(self.out / "diagnostics.jsonl",
                   "".join(json.dumps({k: _json_value(v) for k, v in r.items()}) + "\n" for r in rows))
        if rows:
            write_diagnostics(self.out / "diagnostics.nc", rows, self.cfg.assim.method)
        write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def cycle_observations(cfg, archive: Archive, cycle: Cycle):
    """The observations of ``cycle`` (``&obs_nml obs_dir / file_template``, located on the
    archive's grid) and how many lay outside the domain."""
    from coupler.io.obsfiles import read_observations

    path = Path(cfg.obs.obs_dir) / render(cfg.obs.file_template, cycle)
    obs, valid, n_out = read_observations(path, cfg.grid.variables, shape=cfg.state_shape, names=archive.obs_names,
                                          aliases=archive.obs_aliases, locate=archive.locate,
                                          outside=cfg.replay.obs_outside)
    if valid and valid != cycle.valid_time.isoformat():
        raise ArchiveError(f"{path}: valid_time {valid} but cycle {cycle.index} is valid at "
                           f"{cycle.valid_time.isoformat()}")
    return obs, n_out


def _truth_archive(cfg) -> Archive:
    """The truth trajectory (``&coupler_nml truth_file``, one file with a time dimension) read
    like an archive; cycles are looked up in it by valid time."""
    import copy
    import dataclasses

    tcfg = copy.copy(cfg)
    tcfg.replay = dataclasses.replace(cfg.replay, background_file=cfg.coupler.truth_file, first_time="", last_time="",
                                      variable_map=[e for e in cfg.replay.variable_map
                                                    if e.split("=")[0].strip() in cfg.grid.variables])
    return Archive(tcfg)


def _progress(total: int, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="replay", unit="cycle", file=sys.stderr, dynamic_ncols=True)


def main_replay(args) -> int:
    """``lodas replay FILE.nml``: under ``mpiexec -n N`` the cycles are spread over the N ranks."""
    from bridges.namelist import NamelistError, load

    comm, node_rank = _world()
    error = ""
    replayer = None
    try:
        cfg = load(args.namelist, args.overrides)
        if cfg.replay is None:
            raise NamelistError(f"{cfg.path}: no &replay_nml group: `lodas replay` needs at least "
                                f"&replay_nml background_file")
        logging.getLogger().setLevel(cfg.coupler.log_level.upper())
        replayer = Replayer(cfg, comm, node_rank)
    except (NamelistError, ValueError, FileNotFoundError) as exc:
        error = str(exc)
    errors = comm.allreduce([error] if error else [])     # every rank reads the same files: stop together
    if errors:
        if comm.rank == 0:
            print(f"lodas: error: {errors[0]}", file=sys.stderr)
        return 2
    try:
        summary = replayer.run(progress=not args.no_progress)
    except ArchiveError as exc:                             # raised on every rank together
        if comm.rank == 0:
            print(f"lodas: error: {exc}", file=sys.stderr)
        return 2
    if comm.rank != 0:
        return 0
    counts = summary.get("status_counts", {})
    log.info("replay: %d cycles run on %d rank(s) (%d already complete), statuses %s; outputs in %s",
             summary["cycles_run"], summary["ranks"], summary["cycles_skipped_complete"], counts,
             summary["output_dir"])
    if summary.get("error"):
        print(f"lodas: error: {summary['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, default=str))
    if summary.get("error"):
        return 2
    return 0 if summary["ok"] else 1


def _world():
    """The replay communicator (``COMM_WORLD``: one rank standalone, N under ``mpiexec -n N``) and the
    node-local rank, with an abort hook so that an unexpected exception on one rank ends the job."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.size > 1:
        from coupler.cli import _install_abort_hook

        _install_abort_hook(comm)
    node_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).rank
    return comm, node_rank
