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


def block_means(values, block: int) -> list[float]:
    """Means of ``values`` ``(n,)`` over consecutive blocks of ``block`` (the last may be shorter),
    skipping ``None`` and NaN (a cycle without a score)."""
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    return [float(np.nanmean(v[k:k + block])) for k in range(0, len(v), block)]


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

    from bridges.namelist import NamelistError, load
    from coupler.experiment import make_experiment, run_method
    from coupler.io.atomic import write_text
    from coupler.methods import make_method

    over = [f"assim_nml.threads={args.threads}", "twin_nml.spinup_cycles=0"]
    try:                                     # every method's settings checked before the (long) experiment
        cfg = load(args.namelist, over)
        methods = {name: load(args.namelist, over + [f"assim_nml.method='{name}'"])
                   for name in args.methods.split(",")}
    except NamelistError as exc:
        raise SystemExit(f"cycle_drift: {exc}") from None
    exp = make_experiment(cfg, seed=args.seed, n_cycles=args.cycles)
    n, variables = args.cycles, list(cfg.grid.variables)
    spread = exp.truth.reshape(n, len(variables), -1).std(-1)                  # (n, nvar)
    result = {"namelist": str(args.namelist), "seed": args.seed, "cycles": n, "block": args.block,
              "spinup_steps": cfg.twin.spinup_steps, "variables": variables,
              "truth_std": {v: block_means(spread[:, k], args.block) for k, v in enumerate(variables)},
              "methods": {}}
    for name, mcfg in methods.items():
        s = run_method(exp, make_method(mcfg, covariance=exp.covariance))      # no spin-up: every cycle scored
        result["methods"][name] = {"analysis_rmse": block_means(s["analysis_rmse_by_cycle"], args.block),
                                   "background_rmse": block_means(s["background_rmse_by_cycle"], args.block)}
    # shallow water counts model time in seconds: label the blocks in days as well
    days = (lambda c: (cfg.twin.spinup_steps + c * exp.steps_per_cycle) * exp.dt / 86400.0) \
        if cfg.twin.model == "sw" else None
    lines = [f"cycled RMSE by block: {args.namelist}, seed {args.seed}, truth after {cfg.twin.spinup_steps} "
             f"model steps",
             f"{'cycles':<11}" + (f"{'days':<12}" if days else "") + "".join(f"{m + ' a / b':>20}" for m in methods)
             + "".join(f"{'std ' + v:>9}" for v in variables)]
    for b, k in enumerate(range(0, n, args.block)):
        end = min(k + args.block, n)
        row = f"{k:>5}-{end - 1:<5}" + (f"{days(k):>5.0f}-{days(end):<6.0f}" if days else "")
        row += "".join(f"{m['analysis_rmse'][b]:>12.4f} {m['background_rmse'][b]:>7.4f}"
                       for m in result["methods"].values())
        lines.append(row + "".join(f"{result['truth_std'][v][b]:>9.3f}" for v in variables))
    print("\n".join(lines))
    write_text(REPO / "lodas_output" / "cycle_drift.json", json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
