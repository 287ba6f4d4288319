"""Replay throughput and memory: cycles per second at 1 and 2 ranks, peak memory at 10 vs 100 cycles.

    python benchmarks/replay_throughput.py [--cycles 100] [--lo-sda-cycles 16] [--out DIR] [--json]

Builds a shallow-water archive once (64 x 64, u v h; the truth of `namelists/sw_bench.nml`'s
model from the numpy reference, backgrounds = truth + noise, one background file with a time
axis and one observation file per cycle from the bench network: 164 stations + 64 footprints),
then times `lodas replay` on it with

- 3D-Var with the parametric B (any grid, no training): ``--cycles`` cycles;
- LO-SDA with the shipped checkpoint (8 members, 5 steps, 3 iterations): ``--lo-sda-cycles``;

each at 1 and 2 ranks (``mpiexec -n``; keep ranks <= cores), one torch/BLAS thread per rank.
Figures: the loop's cycles per second (replay's own clock: reading, analysis, writing; not the
interpreter start-up), the whole command's wall time, the parallel efficiency
``rate(2) / (2 rate(1))``, and the largest resident set of any rank (``peak_rss_mb``) for 10
and for ``--cycles`` cycles of 3D-Var: flat memory means the two are close.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

T0 = datetime(2000, 1, 1)
BG_STD = (0.4, 0.4, 4.0)          # background error std of u, v (m/s) and h (m)


def build_archive(root: Path, n_cycles: int) -> Path:
    """Truth, backgrounds (one file, time axis) and observation files of ``n_cycles`` 6-hourly cycles."""
    from bridges.namelist import load
    from coupler.assim.networks import network_from_config, synthesize_cycle
    from coupler.io.obsfiles import write_obs_file
    from coupler.io.outputs import Grid, write_trajectory
    from coupler.twin import independent_state, reference_model

    stamp = root / f"archive_{n_cycles}.done"
    if stamp.is_file():
        return root
    cfg = load(REPO / "namelists" / "sw_bench.nml")
    model, grid = reference_model(cfg), Grid.from_config(cfg)
    rng = np.random.default_rng([7, 0])
    x = independent_state(model, cfg, rng)
    spc, dt = cfg.model.steps_per_cycle, cfg.model.dt_s
    network = network_from_config(cfg, 7)
    times, truth = [], []
    for c in range(n_cycles):
        x = model.step(x, spc)
        truth.append(x)
        times.append((c + 1) * spc * dt / cfg.grid.time_unit_s)
        write_obs_file(root / "obs" / f"obs_{c:06d}.nc", synthesize_cycle(x, network, seed=7, cycle=c),
                       cfg.grid.variables, c, grid.valid_time(times[-1]))
    truth = np.stack(truth)
    from scipy.ndimage import gaussian_filter        # background errors: Gaussian-correlated, length 3 points

    noise = gaussian_filter(rng.standard_normal(truth.shape), sigma=(0, 0, 3, 3), mode="wrap")
    noise *= (np.array(BG_STD) / noise.std(axis=(0, 2, 3)))[None, :, None, None]
    write_trajectory(root / "truth.nc", grid, times, truth, title="replay bench truth")
    write_trajectory(root / "backgrounds.nc", grid, times, truth + noise, title="replay bench backgrounds")
    stamp.write_text("ok\n")
    return root


def namelist(root: Path, method: str) -> Path:
    """The replay namelist: sw_bench.nml's grid and observation settings plus &replay_nml."""
    base = (REPO / "namelists" / "sw_bench.nml").read_text()
    path = root / f"replay_{method}.nml"
    path.write_text(base + f"""
&replay_nml
    background_file = '{root / 'backgrounds.nc'}'
/
""")
    return path


def run(nml: Path, out: Path, ranks: int, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "coupler", "replay", str(nml), "--json", "--no-progress",
           "--set", f"coupler_nml.output_dir='{out}'", *[a for o in overrides for a in ("--set", o)]]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"replay failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ranks": ranks, "cycles": s["cycles_run"], "cycles_per_s": s["cycles_per_s"], "command_wall_s": wall,
            "peak_rss_mb": s["peak_rss_mb"], "analysis_rmse": s["analysis_rmse"], "status_counts": s["status_counts"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--lo-sda-cycles", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "lodas_output" / "replay_bench"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    build_archive(root, args.cycles)
    truth = [f"coupler_nml.truth_file='{root / 'truth.nc'}'", f"obs_nml.obs_dir='{root / 'obs'}'"]
    methods = {
        "3dvar": (args.cycles, ["assim_nml.method='3dvar'", "assim_nml.b_scale=1.0",
                           "assim_nml.b_std=" + ",".join(map(str, BG_STD)), "assim_nml.b_length=3.0"]),
        "lo-sda": (args.lo_sda_cycles, ["assim_nml.method='lo-sda'", "assim_nml.n_members=8",
                                        "assim_nml.member_batch=8", "assim_nml.n_steps=5",
                                        "assim_nml.lo_iterations=3"]),
    }
    results = {"machine_cores": os.cpu_count(), "methods": {}}
    for method, (n, over) in methods.items():
        last = f"replay_nml.last_time='{(T0 + timedelta(hours=6 * n)).isoformat()}'"
        first = f"replay_nml.first_time='{(T0 + timedelta(hours=6)).isoformat()}'"
        nml = namelist(root, method)
        rows = {}
        for ranks in (1, 2):
            out = root / f"{method}_{ranks}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            rows[ranks] = run(nml, out, ranks, truth + over + [first, last])
        eff = rows[2]["cycles_per_s"] / (2 * rows[1]["cycles_per_s"])
        results["methods"][method] = {"runs": rows, "parallel_efficiency": eff}
    # memory: 10 vs n cycles of 3D-Var, one rank
    mem = {}
    for n in (10, args.cycles):
        out = root / f"mem_{n}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        mem[n] = run(namelist(root, "3dvar"), out, 1, truth + methods["3dvar"][1] + [
            f"replay_nml.first_time='{(T0 + timedelta(hours=6)).isoformat()}'",
            f"replay_nml.last_time='{(T0 + timedelta(hours=6 * n)).isoformat()}'"])["peak_rss_mb"]
    results["peak_rss_mb"] = {str(k): v for k, v in mem.items()}

    print(f"replay throughput (shallow water 64 x 64 x 3, {os.cpu_count()} cores, one thread per rank)")
    print(f"{'method':<8}{'ranks':>6}{'cycles':>8}{'cycles/s':>10}{'cmd wall s':>12}{'peak MB':>9}"
          f"{'RMSE a':>9}{'efficiency':>12}")
    for method, m in results["methods"].items():
        for ranks, r in m["runs"].items():
            eff = f"{m['parallel_efficiency']:.2f}" if ranks == 2 else ""
            print(f"{method:<8}{ranks:>6}{r['cycles']:>8}{r['cycles_per_s']:>10.3f}{r['command_wall_s']:>12.1f}"
                  f"{r['peak_rss_mb']:>9.0f}{r['analysis_rmse']:>9.3f}{eff:>12}")
    print(f"peak resident memory, 3dvar, 1 rank: {mem[10]:.0f} MB at 10 cycles, {mem[args.cycles]:.0f} MB at "
          f"{args.cycles} cycles (ratio {mem[args.cycles] / mem[10]:.3f})")
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
