"""``lodas`` command line (also ``python -m coupler``).

    lodas check  FILE.nml            validate, print the effective configuration and rank layout
    lodas run    FILE.nml            the driver side of an in-line MPMD job (under mpiexec)
    lodas launch FILE.nml            compose, print and run the MPMD mpiexec line
    lodas twin   FILE.nml            twin experiment: nature run, observations, free and assimilation runs
    lodas bench  l96|sw              skill harness: every method on the same truth and observations
    lodas train  FILE.nml            train the LO-SDA networks (VAE + diffusion prior) of &train_nml
    lodas replay FILE.nml            offline replay of archived cycles (&replay_nml; under mpiexec for N ranks)
    lodas diag   OUTPUT_DIR          O-B / O-A statistics, spread and RMSE over the cycles of a run
    lodas plot   OUTPUT_DIR          PNG panels of one cycle (background, analysis, increment, spread, obs)

Every command takes ``--set group.key=value`` (repeatable; applied on top of the file) and
``--json`` (the last line printed is one JSON object of summary figures). Bad input ends
with ``lodas: error: ...`` naming the file, group, key and value, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from bridges.namelist import HOST_GROUPS, NamelistError, load

log = logging.getLogger("lodas")
REPO = Path(__file__).resolve().parent.parent


class UsageError(RuntimeError):
    """A user error reported as ``lodas: error: ...`` with exit status 2."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE",
                   help="override a namelist key (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lodas", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a namelist; print the effective configuration and rank layout")
    p.add_argument("namelist")
    p.add_argument("--host-ranks", type=int, help="host ranks (&coupler_nml host_ranks)")
    p.add_argument("--coupler-ranks", type=int, help="driver ranks (&coupler_nml driver_ranks)")
    _common(p)
    p = sub.add_parser("run", help="driver of an in-line MPMD job (run under mpiexec)")
    p.add_argument("namelist")
    _common(p)
    p = sub.add_parser("launch", help="compose, print and run the MPMD mpiexec line")
    p.add_argument("namelist")
    p.add_argument("--host-ranks", type=int, help="host ranks (&coupler_nml host_ranks)")
    p.add_argument("--coupler-ranks", type=int, help="driver ranks (&coupler_nml driver_ranks)")
    p.add_argument("--host", help="host executable (&coupler_nml host_exe)")
    p.add_argument("--dry-run", action="store_true", help="print the line, run nothing")
    p.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds")
    _common(p)
    p = sub.add_parser("twin", help="twin experiment with the Fortran host in-line")
    p.add_argument("namelist")
    p.add_argument("--host-ranks", type=int)
    p.add_argument("--coupler-ranks", type=int)
    p.add_argument("--plot", action="store_true", help="write a PNG figure of the last cycle")
    _common(p)
    p = sub.add_parser("bench", help="skill harness")
    p.add_argument("testbed", choices=["l96", "sw"])
    p.add_argument("--methods", default="none,3dvar", help="comma-separated &assim_nml methods (and etkf)")
    p.add_argument("--cycles", type=int, default=None, help="analysis cycles (default: the namelist's)")
    p.add_argument("--seed", type=int, default=None, help="experiment seed (default: &coupler_nml seed)")
    p.add_argument("--namelist", default=None, help="default: namelists/<testbed>_bench.nml")
    _common(p)
    p = sub.add_parser("train", help="train the LO-SDA networks (VAE + conditional diffusion prior) of &train_nml")
    p.add_argument("namelist")
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint>.state.pt if it exists")
    p.add_argument("--max-epochs", type=int, default=None, metavar="N",
                   help="stop (resumably) after N epochs in this run, VAE and prior together")
    _common(p)
    p = sub.add_parser("replay", help="offline replay of archived cycles (&replay_nml); mpiexec -n N for N ranks")
    p.add_argument("namelist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)
    p = sub.add_parser("diag", help="O-B / O-A statistics, spread and RMSE over the cycles of an output directory")
    p.add_argument("output_dir")
    p.add_argument("--cycles", action="store_true", help="also print one line per cycle")
    p.add_argument("--spinup", type=int, default=0, metavar="N", help="leave the first N cycles out of the means")
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
    p = sub.add_parser("plot", help="PNG panels of one cycle of an output directory; prints their paths")
    p.add_argument("output_dir")
    p.add_argument("--cycle", default=None, metavar="T",
                   help="cycle index or ISO 8601 valid time (default: the last cycle)")
    p.add_argument("--variable", default=None, help="state variables to plot, comma-separated (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="lodas %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return {"check": cmd_check, "run": cmd_run, "launch": cmd_launch, "twin": cmd_twin,
                "bench": cmd_bench, "train": cmd_train, "replay": cmd_replay, "diag": cmd_diag,
                "plot": cmd_plot}[args.command](args)
    except (NamelistError, UsageError, ValueError, FileNotFoundError) as exc:
        print(f"lodas: error: {exc}", file=sys.stderr)
        return 2


def _rank_overrides(args) -> list[str]:
    extra = []
    if getattr(args, "host_ranks", None):
        extra.append(f"coupler_nml.host_ranks={args.host_ranks}")
    if getattr(args, "coupler_ranks", None):
        extra.append(f"coupler_nml.driver_ranks={args.coupler_ranks}")
    if getattr(args, "host", None):
        extra.append(f"coupler_nml.host_exe='{args.host}'")
    return list(args.overrides) + extra


def _emit(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, default=str))


# -- check ----------------------------------------------------------------------------------
def rank_layout(cfg) -> list[str]:
    """Describe which host rank owns what (testbed slab decompositions) and each driver rank's device."""
    from coupler.device import describe_devices

    c, g = cfg.coupler, cfg.grid
    lines = [f"host: {c.host_ranks} rank(s) of {c.host_exe or '<host_exe not set>'}"]
    along, n = ("x", g.nx) if g.ny == 1 else ("y", g.ny)
    if n % c.host_ranks:
        raise UsageError(f"{cfg.path}: &coupler_nml host_ranks = {c.host_ranks} does not divide the "
                         f"{n} grid points in {along} (&grid_nml n{along} = {n})")
    per = n // c.host_ranks
    for r in range(c.host_ranks):
        lines.append(f"  host rank {r}: {along} = {r * per + 1}..{(r + 1) * per} of {n}, all variables {g.variables}")
    lines.append(f"driver: {c.driver_ranks} rank(s), python -m coupler run")
    from coupler.ensemble import rank_batches
    from coupler.methods import ENSEMBLE_METHODS

    a = cfg.assim
    for r, dev in enumerate(describe_devices(a.device, c.driver_ranks)):
        what = " (root: gathers, analyses, scatters)" if r == 0 else ""
        if a.method in ENSEMBLE_METHODS:
            members = [f"{b[0]}-{b[-1]}" for b in rank_batches(a.n_members, a.member_batch, r, c.driver_ranks)]
            what = (" (root: gathers, reduces, scatters)" if r == 0 else "") + \
                f"; {a.method} members {', '.join(members) or 'none (more ranks than member batches)'}"
        lines.append(f"  driver rank {r}: device {dev}{what}")
    return lines


def cmd_check(args) -> int:
    from bridges.namelist import _namelist_text
    from coupler.methods import ENSEMBLE_METHODS, checkpoint_path

    cfg = load(args.namelist, _rank_overrides(args))
    ckpt_line = None
    if cfg.assim.method in ENSEMBLE_METHODS:     # the checkpoint must exist and fit the grid
        from coupler.io.checkpoints import load_checkpoint

        path = checkpoint_path(cfg)
        ck = load_checkpoint(path, shape=cfg.state_shape, variables=list(cfg.grid.variables),
                             where=f"{cfg.path}: &assim_nml checkpoint")
        ckpt_line = (f"# checkpoint {path}: latent {tuple(ck.meta['latent_shape'])}, trained on "
                     f"{ck.meta.get('testbed', '?')} seed {ck.meta.get('train_seed', '?')}, "
                     f"lodas {ck.meta.get('lodas_version', '?')}")
    replay_line = None
    if cfg.replay is not None:                   # the archive must exist and fit the grid
        from bridges.archive import Archive

        arch = Archive(cfg)
        c0, c1 = arch.cycles[0], arch.cycles[-1]
        replay_line = (f"# replay: {len(arch.cycles)} cycles, {c0.valid_time.isoformat()} (cycle {c0.index}) .. "
                       f"{c1.valid_time.isoformat()} (cycle {c1.index}); grid axes {arch.y_axis.dim} x "
                       f"{arch.x_axis.dim}" + (" (stored descending)" if arch.y_axis.flip else "")
                       + f"; first background {arch.background_file(c0)}")
    print(f"# {cfg.path}: valid. Effective configuration:")
    print(_namelist_text(cfg.to_namelist()).rstrip())
    print("# rank layout")
    for line in rank_layout(cfg):
        print(line)
    if ckpt_line:
        print(ckpt_line)
    if replay_line:
        print(replay_line)
    _emit({"valid": True, "namelist": str(cfg.path), "host_ranks": cfg.coupler.host_ranks,
           "driver_ranks": cfg.coupler.driver_ranks, "method": cfg.assim.method,
           "output_dir": cfg.coupler.output_dir}, args.json)
    return 0


# -- run (the driver) -----------------------------------------------------------------------
def _flush_before_abort() -> None:
    """Give mpiexec's output forwarding a moment: MPI_Abort kills the job at once, and a message
    still in flight would be lost, leaving the user with no reason."""
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.5)


def _install_abort_hook(comm) -> None:
    """An uncaught exception on any driver rank aborts the whole MPMD job with its message
    (as ``python -m mpi4py`` does): a dead driver must never leave the host waiting."""
    def hook(exc_type, exc, tb):
        import traceback

        traceback.print_exception(exc_type, exc, tb)
        print(f"lodas: driver rank {comm.rank}: aborting the job: {exc_type.__name__}: {exc}", file=sys.stderr)
        _flush_before_abort()
        comm.Abort(3)

    sys.excepthook = hook


def cmd_run(args) -> int:
    from mpi4py import MPI

    from bridges.mpi_bridge import DEFAULT_SPIN_S, HandshakeError, MpiHostBridge, connect

    world = MPI.COMM_WORLD
    _install_abort_hook(world)
    config_error, cfg = "", None
    try:
        cfg = load(args.namelist, args.overrides)
        touched = sorted(set(cfg.overridden_groups) & set(HOST_GROUPS))
        if touched:
            raise UsageError(f"--set on {', '.join('&' + g for g in touched)}: the host reads these groups from "
                             f"{cfg.path} itself; use `lodas launch`, which writes an effective namelist for both sides")
    except (NamelistError, UsageError) as exc:
        config_error = str(exc)
    layout = connect(world)
    shape = cfg.state_shape if cfg else (0, 0, 0)
    bridge = MpiHostBridge(layout, shape, cfg.grid.variables if cfg else [], where=str(args.namelist),
                           spin_s=cfg.bridge.spin_s if cfg else DEFAULT_SPIN_S)
    try:
        bridge.handshake(error=config_error)
    except HandshakeError as exc:
        if layout.is_root:
            print(f"lodas: error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = _serve(cfg, layout, bridge)
    except Exception as exc:  # noqa: BLE001 - once connected, any driver failure must end the whole job
        import traceback

        log.debug("%s", traceback.format_exc())
        print(f"lodas: error: driver rank {layout.local.rank}: {type(exc).__name__}: {exc}; aborting the job "
              f"(the host must not wait for an answer that will never come)", file=sys.stderr)
        _flush_before_abort()
        world.Abort(4)
    bridge.close()
    if layout.is_root:
        log.info("%d cycles done; outputs in %s", summary["cycles"], cfg.coupler.output_dir)
        _emit(summary, args.json)
    return 0


def _serve(cfg, layout, bridge) -> dict:
    """Everything the driver does once connected: build the method and outputs, run the cycles."""
    from coupler import driver
    from coupler.device import select_device
    from coupler.io.outputs import Grid, RunOutputs, read_trajectory
    from coupler.methods import ENSEMBLE_METHODS, make_method

    logging.getLogger().setLevel(cfg.coupler.log_level.upper())
    device = select_device(cfg.assim.device, layout.node_rank)
    if layout.is_root:
        log.info("connected to host '%s' on %d rank(s); %d driver rank(s); device %s",
                 bridge.host_model, layout.host_size, layout.local.size, device)
    method = outputs = truth = observations = None
    if layout.is_root or cfg.assim.method in ENSEMBLE_METHODS:    # ensemble members run on every rank
        method = make_method(cfg, device=device)
    if layout.is_root:
        grid = Grid.from_config(cfg)
        out = Path(cfg.coupler.output_dir)
        outputs = RunOutputs(out, grid, method=cfg.assim.method, experiment=cfg.coupler.experiment,
                             write_increments=cfg.coupler.write_increments,
                             keep_backgrounds=cfg.coupler.write_backgrounds)
        cfg.write(out / "effective.nml")
        if cfg.coupler.truth_file:
            truth = driver.Truth(*read_trajectory(cfg.coupler.truth_file, cfg.grid.variables))
        observations = driver.file_observations(cfg.obs.obs_dir, cfg.obs.file_template, cfg.grid.variables,
                                                cfg.state_shape, grid)
    summary = driver.run_cycles(bridge, method, observations, is_root=layout.is_root, outputs=outputs,
                                truth=truth, on_missing=cfg.obs.on_missing, spinup_cycles=cfg.twin.spinup_cycles,
                                variables=cfg.grid.variables, comm=layout.local)
    if layout.is_root:
        summary.update(output_dir=str(Path(cfg.coupler.output_dir)), method=cfg.assim.method,
                       host=bridge.host_model, host_ranks=layout.host_size, driver_ranks=layout.local.size)
        outputs.close(summary)
    return summary


# -- launch ---------------------------------------------------------------------------------
def mpmd_command(namelist: str | Path, host_exe: str, host_ranks: int, driver_ranks: int,
                 driver_args: tuple[str, ...] = ()) -> list[str]:
    """``mpiexec -n A <host> FILE.nml : -n B python -m coupler run FILE.nml``."""
    return ["mpiexec", "-n", str(host_ranks), str(host_exe), str(namelist), ":",
            "-n", str(driver_ranks), sys.executable, "-m", "coupler", "run", str(namelist), *driver_args]


def launch(cfg, *, timeout: float | None = None, dry_run: bool = False, quiet: bool = False,
           capture: bool = False) -> subprocess.CompletedProcess | None:
    """Write the effective namelist into the output directory and run the MPMD job on it."""
    c = cfg.coupler
    if not c.host_exe:
        raise UsageError(f"{cfg.path}: &coupler_nml host_exe is empty: name the host executable "
                         f"(or pass --host)")
    exe = Path(c.host_exe)
    if not dry_run and not exe.is_file():
        raise UsageError(f"{cfg.path}: &coupler_nml host_exe = '{c.host_exe}': no such file "
                         f"(build the hosts with `make -C fortran_stubs`)")
    out = Path(c.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    nml = cfg.write(out / "launch.nml")
    cmd = mpmd_command(nml, exe, c.host_ranks, c.driver_ranks, ("--json",))
    if not quiet:
        print(shlex.join(cmd), flush=True)
    if dry_run:
        return None
    return subprocess.run(cmd, timeout=timeout, capture_output=capture, text=True)


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("the driver printed no JSON summary")


def cmd_launch(args) -> int:
    cfg = load(args.namelist, _rank_overrides(args))
    proc = launch(cfg, timeout=args.timeout, dry_run=args.dry_run, capture=args.json)
    if proc is None:
        return 0
    if args.json:
        sys.stderr.write(proc.stderr)
        sys.stdout.write("\n".join(l for l in proc.stdout.splitlines() if not l.startswith("{")) + "\n")
        if proc.returncode == 0:
            _emit(last_json(proc.stdout), True)
    return proc.returncode


# -- twin, bench ----------------------------------------------------------------------------
def cmd_twin(args) -> int:
    from coupler.twin import run_twin

    cfg = load(args.namelist, _rank_overrides(args))
    summary = run_twin(cfg, plot=args.plot)
    _emit(summary, args.json)
    return 0 if summary.get("ok", True) else 1


def cmd_bench(args) -> int:
    from coupler.bench import bench

    cfg = load(args.namelist or REPO / "namelists" / f"{args.testbed}_bench.nml", args.overrides)
    if cfg.twin.model != args.testbed:
        raise SystemExit(f"lodas bench {args.testbed}: {cfg.path} sets &twin_nml model = '{cfg.twin.model}'")
    summary = bench(cfg, [m.strip() for m in args.methods.split(",") if m.strip()], n_cycles=args.cycles,
                    seed=args.seed)
    _emit(summary, args.json)
    return 0


def cmd_train(args) -> int:
    from coupler.train import format_summary, train

    cfg = load(args.namelist, args.overrides)
    if args.max_epochs is not None and args.max_epochs < 1:
        raise UsageError(f"--max-epochs {args.max_epochs}: expected an integer >= 1")
    summary = train(cfg, resume=args.resume, max_epochs=args.max_epochs)
    print(format_summary(summary))
    _emit({k: v for k, v in summary.items() if k != "history"}, args.json)
    return 0


# -- replay, diag, plot ---------------------------------------------------------------------
def cmd_replay(args) -> int:
    from coupler.replay import main_replay

    return main_replay(args)


def cmd_diag(args) -> int:
    from coupler.diag import main_diag

    return main_diag(args)


def cmd_plot(args) -> int:
    from coupler.plots import main_plot

    return main_plot(args)


if __name__ == "__main__":
    sys.exit(main())
