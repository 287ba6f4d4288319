"""Is a benchmark window stationary? Analysis and background RMSE by block of cycles over one
long cycled run, with the truth's per-variable spread.

    python benchmarks/cycle_drift.py [--namelist namelists/sw_bench.nml] [--methods 3dvar]
                                     [--cycles 1040] [--block 80] [--seed 11] [--threads 1] [--json]

Every method starts from the independent initial background of ``&twin_nml init_background``
(a state of another trajectory: an error of the climate's size), so the first cycles measure the
filter's spin-up, not its cycled skill; and the truth starts ``&twin_nml spinup_steps`` model
steps after the default state, so early blocks may also see the flow's own adjustment. For each
block of ``--block`` cycles the table gives the mean over the block of the per-cycle RMSE of the
analysis and of the background against the truth (all variables, physical units), and the mean
spatial standard deviation of the truth per variable. A window whose blocks agree is stationary
for that method; ``lodas bench``'s ``twin_nml.spinup_cycles`` should cover the blocks that do not.
Measured (shallow water, seed 11, 3D-Var) in the README. ``--json`` prints the figures (also
written to ``lodas_output/cycle_drift.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def block_means(values: np.ndarray, block: int) -> list[float]:
    """Means of ``values`` ``(n,)`` over consecutive blocks of ``block`` (the last may be shorter)."""
    return [float(values[k:k + block].mean()) for k in range(0, len(values), block)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--namelist", default=str(REPO / "namelists" / "sw_bench.nml"))
    ap.add_argument("--methods", default="3dvar")
    ap.add_argument("--cycles", type=int, default=1040)
    ap.add_argument("--block", type=int, default=80)
    ap.add_argument("--seed", type=int, default=11, help="experiment seed (11: the tuning seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.block < 1 or args.cycles < args.block:
        raise SystemExit(f"--block {args.block} --cycles {args.cycles}: expected 1 <= block <= cycles")

    from bridges.namelist import load
    from coupler.experiment import make_experiment, run_method
    from coupler.io.atomic import atomic_path
    from coupler.methods import make_method

    over = [f"assim_nml.threads={args.threads}", "twin_nml.spinup_cycles=0"]
    cfg = load(args.namelist, over)
    exp = make_experiment(cfg, seed=args.seed, n_cycles=args.cycles)
    n = args.cycles
    hours = exp.steps_per_cycle * exp.dt / 3600.0 if cfg.twin.model == "sw" else None
    spread = exp.truth.reshape(n, exp.truth.shape[1], -1).std(-1)            # (n, nvar)
    result = {"namelist": str(args.namelist), "seed": args.seed, "cycles": n, "block": args.block,
              "spinup_steps": cfg.twin.spinup_steps, "variables": list(cfg.grid.variables),
              "truth_std": {v: block_means(spread[:, k], args.block) for k, v in enumerate(cfg.grid.variables)},
              "methods": {}}
    for name in args.methods.split(","):
        mcfg = load(args.namelist, over + [f"assim_nml.method='{name}'"])
        s = run_method(exp, make_method(mcfg, covariance=exp.covariance), record_backgrounds=True,
                       record_analyses=True)
        ea = np.sqrt(((s["analyses"] - exp.truth) ** 2).reshape(n, -1).mean(-1))
        eb = np.sqrt(((s["backgrounds"] - exp.truth) ** 2).reshape(n, -1).mean(-1))
        result["methods"][name] = {"analysis_rmse": block_means(ea, args.block),
                                   "background_rmse": block_means(eb, args.block)}
    head = f"{'cycles':>11}" + (f"{'days':>12}" if hours else "")
    head += "".join(f"{m + ' a / b':>20}" for m in result["methods"]) + "".join(f"{'std ' + v:>9}" for v in
                                                                                 cfg.grid.variables)
    lines = [f"cycled RMSE by block: {args.namelist}, seed {args.seed}, truth after {cfg.twin.spinup_steps} "
             f"model steps", head]
    for b, k in enumerate(range(0, n, args.block)):
        row = f"{k:>5}-{min(k + args.block, n) - 1:<5}"
        if hours:
            d0 = cfg.twin.spinup_steps * exp.dt / 86400.0
            row += f"{d0 + k * hours / 24:>6.0f}-{d0 + min(k + args.block, n) * hours / 24:<5.0f}"
        for m in result["methods"].values():
            row += f"{m['analysis_rmse'][b]:>11.4f} {m['background_rmse'][b]:>7.4f} "
        row += "".join(f"{result['truth_std'][v][b]:>9.3f}" for v in cfg.grid.variables)
        lines.append(row)
    print("\n".join(lines))
    with atomic_path(REPO / "lodas_output" / "cycle_drift.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
