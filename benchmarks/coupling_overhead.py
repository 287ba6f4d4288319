"""Coupling overhead of the lodas MPI bridge against a bare MPI exchange and a file round trip.

Usage (after ``make -C fortran_stubs``; this script builds nothing)::

    .venv/bin/python benchmarks/coupling_overhead.py [--host-ranks 1,2] [--sizes 40,12288,100000,1000000]
                                                     [--reps-scale 1.0] [--json PATH]

Per host-rank count and state size it writes a temporary namelist and runs one MPMD job (under
``timeout``)::

    mpiexec -n A fortran_stubs/build/bench_host FILE.nml : -n 1 python benchmarks/coupling_overhead.py --driver FILE.nml

State: ``N`` float64 values, one variable on a 1-D grid (nx = N, ny = 1, slab over i), except
12288 = the shallow-water-like 3 x 64 x 64 state (u, v, h; slab over j). Every repetition runs
the five variants below in an order rotated by the repetition (after ``--warmup`` discarded
repetitions); each variant starts after a world barrier, so host and driver start together, and
is timed on the host with MPI_Wtime around the exchange only, max over the host ranks:

``bridge``
    ``lodas_put_background`` + ``lodas_get_increment`` on the host; the driver runs
    ``MpiHostBridge.receive_background`` + ``send_increment`` as shipped (nonblocking
    collectives waited for by ``bridges.mpi_bridge.wait``: polling for ``&bridge_nml spin_s``
    (``--spin-s``, default the shipped 2 ms), then with 0.2 ms naps; the host's bridge polls
    the same way). No analysis: a zero increment (a known pattern in the
    warm-up repetitions, checked by both sides).
``bridge_blocking``
    the same, with the driver's waits blocking (``Request.Wait``, as the bare variant): it
    separates the cost of polling from that of headers and packing.
``bare``
    the same bytes, no header: host ``MPI_Gatherv`` of its piece over ``ctx%inter_comm`` then
    ``MPI_Scatterv`` back; driver ``inter.Gatherv(None, [buf, counts, displs, MPI.DOUBLE],
    root=MPI.ROOT)`` then ``inter.Scatterv([inc, counts, displs, MPI.DOUBLE], None, root=MPI.ROOT)``.
    Both sides blocking; no unpacking into the global array.
``bare_polled``
    as ``bare`` with nonblocking collectives waited for as the bridge does on both sides (host:
    ``MPI_Test`` for ``spin_s`` then ``usleep(200)`` naps, as in ``lodas_bridge.f90``; driver:
    ``bridges.mpi_bridge.wait``): bridge / bare_polled is the cost of the headers, the Python
    bookkeeping and the packing alone.
``netcdf`` (file round trip; the Fortran hosts have no netCDF library), exactly:
    1. each host rank writes its packed piece raw (stream access) to ``WORK/bg.RANK.bin``;
    2. world barrier ("background written");
    3. the driver reads every ``bg.RANK.bin`` (``np.fromfile``) into the global ``(nvar, ny, nx)``
       array; writes the increment as ``WORK/inc.nc`` with netCDF4-python (NETCDF4 format, one
       ``f8 (y, x)`` variable per state variable, no compression); opens it again and reads it
       back (standing in for the host's netCDF read); writes each rank's box raw to
       ``WORK/inc.RANK.bin``;
    4. world barrier ("increment written");
    5. each host rank reads ``inc.RANK.bin``.
    Files live in a temporary directory on local disk (page cache, no fsync): a lower bound
    for a real file coupling, whose host would write and read netCDF itself.

With ranks <= cores (1 host + 1 driver rank on 2 cores) barriers block (busy-poll). With more
ranks than cores (2 + 1 here) the barriers are polled with naps (``polite_sync``), but MPICH's
busy polling inside the exchanges still competes for the cores: those timings are distorted.

Output: a table per host-rank count, then one JSON line ``{"sizes": {N: {bridge_s, bare_s,
netcdf_s, ratio_bridge_bare, ratio_netcdf_bare, ...}}, ...}`` (medians; ``sizes`` is the first
host-rank count, ``sizes_by_host_ranks`` has all of them); ``--json PATH`` writes it too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HOST_EXE = REPO / "fortran_stubs" / "build" / "bench_host"
VARIANTS = ("bridge", "bridge_blocking", "bare", "netcdf", "bare_polled")   # the host's variant numbers 1..5
TARGET_RATIO = 1.2
# size -> (shape (nvar, ny, nx), variables, timed repetitions at --reps-scale 1)
CASES = {
    40: ((1, 1, 40), ["x"], 500),
    12288: ((3, 64, 64), ["u", "v", "h"], 300),
    100_000: ((1, 1, 100_000), ["x"], 120),
    1_000_000: ((1, 1, 1_000_000), ["x"], 30),
}


def variant_order(rep: int) -> list[int]:
    """0-based variants of 1-based repetition ``rep`` (the rule of bench_host.f90)."""
    return [(rep - 1 + p) % len(VARIANTS) for p in range(len(VARIANTS))]


def slab_boxes(shape: tuple[int, int, int], host_size: int) -> list[tuple[int, int, int, int]]:
    """0-based ``(i0, ni, j0, nj)`` of each host rank (the rule of bench_host.f90)."""
    _, ny, nx = shape
    m = ny if ny > 1 else nx
    boxes = []
    for r in range(host_size):
        ext = m // host_size + (1 if r < m % host_size else 0)
        start = r * (m // host_size) + min(r, m % host_size)
        boxes.append((0, nx, start, ext) if ny > 1 else (start, ext, 0, ny))
    return boxes


# -- the driver (one MPI rank of the MPMD job) -----------------------------------------------
def driver(nml_path: str) -> None:
    import f90nml
    import netCDF4
    from mpi4py import MPI

    import bridges.mpi_bridge as mb
    from bridges.status import Status

    world = MPI.COMM_WORLD

    def abort_hook(exc_type, exc, tb):   # a dead driver must not leave the host waiting
        import traceback

        traceback.print_exception(exc_type, exc, tb)
        sys.stderr.flush()
        time.sleep(0.3)
        world.Abort(3)

    sys.excepthook = abort_hook
    nml = f90nml.read(nml_path)
    grid, bench = nml["grid_nml"], nml["bench_nml"]
    variables = grid["variables"] if isinstance(grid["variables"], list) else [grid["variables"]]
    shape = (len(variables), int(grid["ny"]), int(grid["nx"]))
    warmup, reps, work = int(bench["warmup"]), int(bench["reps"]), Path(bench["work_dir"])
    polite = bool(bench["polite_sync"])

    layout = mb.connect(world)
    spin_s = float(nml["bridge_nml"]["spin_s"])
    bridge = mb.MpiHostBridge(layout, shape, variables, where=nml_path, spin_s=spin_s)
    bridge.handshake()
    if layout.local.size != 1:
        raise RuntimeError("coupling_overhead: the benchmark driver runs on one rank")
    inter = layout.inter
    def shipped_wait(request, *args, **kwargs):
        return wait_as_shipped(request, spin_s)

    wait_as_shipped = mb.wait

    def blocking_wait(request, *args, **kwargs):
        request.Wait()

    def sync():
        if polite:
            shipped_wait(world.Ibarrier())
        else:
            world.Barrier()

    nvar, ny, nx = shape
    boxes = slab_boxes(shape, layout.host_size)
    sizes = np.array([nvar * ni * nj for _, ni, _, nj in boxes], dtype=np.int64)
    displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    dec = bridge.decomposition
    if not np.array_equal(dec.counts - mb.HDR, sizes):
        raise RuntimeError(f"slab rule differs from the host's boxes: {dec.counts - mb.HDR} vs {sizes}")

    truth = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    pattern, zero = -0.5 * truth, np.zeros(shape)

    def pack(x):   # global (nvar, ny, nx) -> rank-ordered packed buffer (no headers)
        return np.concatenate([x[:, j0:j0 + nj, i0:i0 + ni].ravel() for i0, ni, j0, nj in boxes])

    bare_recv = np.empty(int(sizes.sum()))
    bare_send = {True: pack(pattern), False: pack(zero)}
    inc_nc = work / "inc.nc"
    drv_times = np.zeros((warmup + reps, len(VARIANTS)))
    drv_phases = np.zeros((warmup + reps, 4))   # receive_background, send_increment of variants 0 and 1

    for k in range(1, warmup + reps + 1):
        warm = k <= warmup
        for v in variant_order(k):
            sync()
            t0 = time.perf_counter()
            if v in (0, 1):   # bridge as shipped / with blocking waits
                mb.wait = wait_as_shipped if v == 0 else blocking_wait
                try:
                    bg = bridge.receive_background()
                    t1 = time.perf_counter()
                    if bg.command != mb.CMD_CYCLE or bg.host_error or bg.step != k:
                        raise RuntimeError(f"unexpected message from the host: {bg}")
                    if warm and not np.array_equal(bg.state, truth):
                        raise RuntimeError(f"bridge: wrong background at repetition {k}")
                    t2 = time.perf_counter()
                    bridge.send_increment(pattern if warm else zero, Status.OK, k)
                    drv_phases[k - 1, 2 * v:2 * v + 2] = t1 - t0, time.perf_counter() - t2
                finally:
                    mb.wait = wait_as_shipped
            elif v == 2:      # bare
                inter.Gatherv(None, [bare_recv, sizes, displs, MPI.DOUBLE], root=MPI.ROOT)
                if warm and not np.array_equal(bare_recv, pack(truth)):
                    raise RuntimeError(f"bare: wrong background at repetition {k}")
                inter.Scatterv([bare_send[warm], sizes, displs, MPI.DOUBLE], None, root=MPI.ROOT)
            elif v == 4:      # bare, polled like the bridge
                shipped_wait(inter.Igatherv(None, [bare_recv, sizes, displs, MPI.DOUBLE], root=MPI.ROOT))
                if warm and not np.array_equal(bare_recv, pack(truth)):
                    raise RuntimeError(f"bare_polled: wrong background at repetition {k}")
                shipped_wait(inter.Iscatterv([bare_send[warm], sizes, displs, MPI.DOUBLE], None, root=MPI.ROOT))
            else:             # file round trip
                sync()
                state = np.empty(shape)
                for r, (i0, ni, j0, nj) in enumerate(boxes):
                    state[:, j0:j0 + nj, i0:i0 + ni] = np.fromfile(work / f"bg.{r}.bin").reshape(nvar, nj, ni)
                if warm and not np.array_equal(state, truth):
                    raise RuntimeError(f"netcdf: wrong background at repetition {k}")
                inc = pattern if warm else zero
                with netCDF4.Dataset(inc_nc, "w") as ds:
                    ds.createDimension("y", ny)
                    ds.createDimension("x", nx)
                    for name, field in zip(variables, inc):
                        ds.createVariable(name, "f8", ("y", "x"))[:] = field
                with netCDF4.Dataset(inc_nc) as ds:
                    ds.set_auto_mask(False)
                    back = np.stack([ds[name][:] for name in variables])
                for r, (i0, ni, j0, nj) in enumerate(boxes):
                    np.ascontiguousarray(back[:, j0:j0 + nj, i0:i0 + ni]).tofile(work / f"inc.{r}.bin")
                sync()
            drv_times[k - 1, v] = time.perf_counter() - t0

    bg = bridge.receive_background()
    if bg.command != mb.CMD_FINALIZE:
        raise RuntimeError(f"expected the host's finalize, got command {bg.command}")
    bridge.close()

    # What the bridge does on the driver besides moving bytes: unpack into the global array, pack.
    recv, send = np.zeros(dec.buffer_size), np.zeros(dec.buffer_size)
    n_t = max(3, min(200, int(2e7 // truth.size)))
    t0 = time.perf_counter()
    for _ in range(n_t):
        dec.unpack(recv, np.empty(shape))
        dec.pack(zero, send)
    pack_unpack_s = (time.perf_counter() - t0) / n_t
    (work / "driver.json").write_text(json.dumps({
        "driver_times": drv_times.tolist(), "driver_phases": drv_phases.tolist(), "pack_unpack_s": pack_unpack_s}))


# -- the orchestrator -----------------------------------------------------------------------
def stats(x: np.ndarray) -> tuple[float, float]:
    q25, q50, q75 = np.percentile(x, [25, 50, 75])
    return float(q50), float(q75 - q25)


def run_case(size: int, host_ranks: int, reps: int, warmup: int, polite: bool, timeout: float,
             spin_s: float) -> dict:
    shape, variables, _ = CASES[size]
    with tempfile.TemporaryDirectory(prefix="lodas_bench_") as tmp:
        work = Path(tmp)
        nml = work / "bench.nml"
        names = ", ".join(f"'{v}'" for v in variables)
        nml.write_text(
            "! coupling_overhead.py: temporary namelist, read by bench_host and the benchmark driver\n"
            f"&grid_nml\n    nx = {shape[2]}\n    ny = {shape[1]}\n    variables = {names}\n/\n"
            f"&bridge_nml\n    deadline_s = {timeout:.0f}\n    spin_s = {spin_s!r}\n/\n"
            f"&bench_nml\n    reps = {reps}\n    warmup = {warmup}\n"
            f"    polite_sync = {'.true.' if polite else '.false.'}\n    work_dir = '{work}'\n/\n")
        cmd = ["timeout", "-k", "5", f"{timeout:.0f}", "mpiexec", "-n", str(host_ranks), str(HOST_EXE), str(nml),
               ":", "-n", "1", sys.executable, str(Path(__file__).resolve()), "--driver", str(nml)]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 15, env=env, cwd=REPO)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not (work / "host_times.bin").is_file():
            raise RuntimeError(f"benchmark job failed (rc {proc.returncode}): {' '.join(cmd)}\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        raw = np.fromfile(work / "host_times.bin")
        nv, nrep, errors, ranks = (int(x) for x in raw[:4])
        cols = raw[4:].reshape(nrep, nv)[warmup:]         # Fortran (9, nrep) == C (nrep, 9)
        times, put_get = cols[:, :len(VARIANTS)], cols[:, len(VARIANTS):]
        drv = json.loads((work / "driver.json").read_text())
        phases = np.asarray(drv["driver_phases"])[warmup:]
    if errors:
        raise RuntimeError(f"size {size}, {host_ranks} host ranks: {errors} wrong increments on the host")
    res: dict = {"shape": list(shape), "host_ranks": ranks, "reps": int(times.shape[0]), "warmup": warmup,
                 "job_wall_s": round(wall, 2), "driver_pack_unpack_s": drv["pack_unpack_s"]}
    for i, name in enumerate(VARIANTS):
        med, iqr = stats(times[:, i])
        res[f"{name}_s"], res[f"{name}_iqr_s"] = med, iqr
    for i, name in enumerate(("bridge", "bridge_blocking")):   # where the bridge's time goes (medians)
        res[f"{name}_host_put_s"] = stats(put_get[:, 2 * i])[0]
        res[f"{name}_host_get_s"] = stats(put_get[:, 2 * i + 1])[0]
        res[f"{name}_driver_receive_s"] = stats(phases[:, 2 * i])[0]
        res[f"{name}_driver_send_s"] = stats(phases[:, 2 * i + 1])[0]
    res["ratio_bridge_bare"] = res["bridge_s"] / res["bare_s"]
    res["ratio_bridge_blocking_bare"] = res["bridge_blocking_s"] / res["bare_s"]
    res["ratio_bridge_bare_polled"] = res["bridge_s"] / res["bare_polled_s"]
    res["ratio_netcdf_bare"] = res["netcdf_s"] / res["bare_s"]
    res["meets_target"] = bool(res["ratio_bridge_bare"] <= TARGET_RATIO)
    return res


def fmt_t(s: float) -> str:
    return f"{s * 1e6:9.1f}us" if s < 1e-3 else f"{s * 1e3:9.3f}ms"


def print_table(host_ranks: int, rows: dict, cores: int) -> None:
    over = host_ranks + 1 > cores
    print(f"\n# {host_ranks} host rank(s) + 1 driver rank on {cores} cores"
          + (" (OVERSUBSCRIBED: busy polling distorts these timings)" if over else "")
          + ": host time per cycle (max over host ranks), median [IQR]")
    print(f"{'N':>8} {'shape':>8} {'reps':>4} | {'bridge':>11} {'[IQR]':>11} | {'bridge_blk':>11} | "
          f"{'bare':>11} {'[IQR]':>11} | {'bare_poll':>11} | {'netcdf':>11} {'[IQR]':>11} | "
          f"{'br/bare':>7} {'blk/bare':>8} {'br/bpoll':>8} {'nc/bare':>8}")
    for size, r in rows.items():
        shp = "x".join(str(d) for d in r["shape"] if d > 1) or "1"
        print(f"{size:>8} {shp:>8} {r['reps']:>4} | {fmt_t(r['bridge_s'])} {fmt_t(r['bridge_iqr_s'])} | "
              f"{fmt_t(r['bridge_blocking_s'])} | {fmt_t(r['bare_s'])} {fmt_t(r['bare_iqr_s'])} | "
              f"{fmt_t(r['bare_polled_s'])} | {fmt_t(r['netcdf_s'])} {fmt_t(r['netcdf_iqr_s'])} | "
              f"{r['ratio_bridge_bare']:7.2f} {r['ratio_bridge_blocking_bare']:8.2f} "
              f"{r['ratio_bridge_bare_polled']:8.2f} {r['ratio_netcdf_bare']:8.1f}")
    print("# where the bridge's time goes (medians; shipped / driver-blocking): host put, host get, "
          "driver receive_background, driver send_increment; driver unpack+pack alone (numpy, no MPI)")
    for size, r in rows.items():
        part = " | ".join(f"{fmt_t(r[f'{v}_host_put_s'])} {fmt_t(r[f'{v}_host_get_s'])} "
                          f"{fmt_t(r[f'{v}_driver_receive_s'])} {fmt_t(r[f'{v}_driver_send_s'])}"
                          for v in ("bridge", "bridge_blocking"))
        print(f"{size:>8} | {part} | {fmt_t(r['driver_pack_unpack_s'])}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", metavar="FILE.nml", help=argparse.SUPPRESS)
    ap.add_argument("--host-ranks", default="1,2", help="comma-separated host-rank counts (default 1,2)")
    ap.add_argument("--sizes", default=",".join(str(s) for s in CASES),
                    help=f"comma-separated state sizes among {list(CASES)}")
    ap.add_argument("--reps-scale", type=float, default=1.0, help="scale the timed repetitions")
    ap.add_argument("--warmup", type=int, default=5, help="discarded repetitions (default 5)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per MPMD job (default 120)")
    ap.add_argument("--spin-s", type=float, default=None,
                    help="&bridge_nml spin_s of both sides (default: the shipped default)")
    ap.add_argument("--json", metavar="PATH", help="also write the JSON summary here")
    args = ap.parse_args(argv)
    if args.driver:
        driver(args.driver)
        return 0
    if not HOST_EXE.is_file():
        print(f"coupling_overhead: {HOST_EXE} not found: build it with `make -C fortran_stubs`", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    if args.spin_s is None:
        from bridges.mpi_bridge import DEFAULT_SPIN_S

        args.spin_s = DEFAULT_SPIN_S
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    unknown = [s for s in sizes if s not in CASES]
    if unknown:
        ap.error(f"--sizes {unknown}: choose among {list(CASES)}")
    host_counts = [int(a) for a in args.host_ranks.split(",")]
    by_ranks: dict[str, dict] = {}
    t_start = time.perf_counter()
    for a in host_counts:
        over = a + 1 > cores
        rows = {}
        for size in sizes:
            reps = max(5, int(CASES[size][2] * args.reps_scale * (0.5 if over else 1.0)))
            rows[size] = run_case(size, a, reps, args.warmup, polite=over, timeout=args.timeout,
                                  spin_s=args.spin_s)
        print_table(a, rows, cores)
        by_ranks[str(a)] = {"oversubscribed": over, "sizes": {str(s): r for s, r in rows.items()}}
    first = by_ranks[str(host_counts[0])]
    summary = {
        "sizes": first["sizes"],
        "host_ranks": host_counts[0], "driver_ranks": 1, "cores": cores, "target_ratio_bridge_bare": TARGET_RATIO,
        "spin_s": args.spin_s,
        "sizes_by_host_ranks": by_ranks, "wall_s": round(time.perf_counter() - t_start, 1),
        "mpi": "MPICH (mpiexec)", "timing": "host MPI_Wtime per cycle, max over host ranks, median and IQR",
    }
    line = json.dumps(summary)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
