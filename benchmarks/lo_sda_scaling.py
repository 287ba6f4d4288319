"""How LO-SDA's skill and cost scale with sampling steps, optimisation iterations and members.

    python benchmarks/lo_sda_scaling.py [--testbed l96] [--cycles 300] [--spinup 100] [--seed 11]
                                        [--threads 2] [--json]

One twin set-up (the testbed's bench namelist, ``--seed``: the *tuning* seed 11 by default;
never tune on the evaluation seed 1), 3D-Var run side by side as the reference, then LO-SDA
with one knob varied at a time around the namelist's settings:

- ``n_steps`` in 2, 3, 5, 10;
- ``lo_iterations`` in 1, 2, 3 (with ``lo_covariance = 'tweedie'`` each is an exact line
  search: one eps-network VJP and two misfit evaluations);
- ``n_members`` in 8, 16, 32, 64 (``member_batch`` = ``n_members``: one batch).

The baselines at equal steps: SDA and DPS (their namelist step sizes ``sda_gamma`` and
``dps_zeta``, the same prior, members and ``e_b``) at every ``n_steps`` of the sweep, so that
"LO-SDA beats SDA" is checked at each step count rather than at the one LO-SDA was tuned at.

Printed per setting: analysis RMSE after spin-up, seconds per cycle (model integration
included, as ``lodas bench``), the ratio of that time to 3D-Var's in the same run, and the
RMSE reduction over 3D-Var per second of extra analysis time ("skill per second"). The
JSON (``--json``; also written to ``lodas_output/lo_sda_scaling_<testbed>.json``) holds every
figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SWEEPS = {"n_steps": (2, 3, 5, 10), "lo_iterations": (1, 2, 3), "n_members": (8, 16, 32, 64)}
BASELINES = ("sda", "dps")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", default="l96", choices=("l96", "sw"))
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--spinup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (&assim_nml threads)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from bridges.namelist import load
    from coupler.experiment import make_experiment, run_method
    from coupler.io.atomic import write_text
    from coupler.methods import make_method

    nml = REPO / "namelists" / f"{args.testbed}_bench.nml"
    base = [f"twin_nml.spinup_cycles={args.spinup}", f"assim_nml.threads={args.threads}"]
    cfg = load(nml, base)
    exp = make_experiment(cfg, seed=args.seed, n_cycles=args.cycles)

    def run(overrides: list[str]) -> dict:
        mcfg = load(nml, base + overrides)
        t0 = time.perf_counter()
        s = run_method(exp, make_method(mcfg, covariance=exp.covariance))
        return {"analysis_rmse": s["analysis_rmse"], "wall_s_per_cycle": s["wall_s_per_cycle"],
                "total_s": time.perf_counter() - t0}

    ref = run(["assim_nml.method='3dvar'"])
    a = cfg.assim
    centre = {"n_steps": a.n_steps, "lo_iterations": a.lo_iterations, "n_members": a.n_members}
    rows, cache = [], {}
    print(f"LO-SDA scaling, {args.testbed}, seed {args.seed}, {args.cycles} cycles ({args.spinup} spin-up), "
          f"{args.threads} thread(s); centre {centre}, member_batch = n_members")
    print(f"3dvar: analysis RMSE {ref['analysis_rmse']:.4f}, {ref['wall_s_per_cycle']:.2e} s/cycle")
    print(f"{'knob':<15}{'value':>6}{'RMSE a':>9}{'s/cycle':>10}{'x 3D-Var':>10}{'gain/s':>9}")
    for knob, values in SWEEPS.items():
        for v in values:
            setting = dict(centre, **{knob: v})
            over = ["assim_nml.method='lo-sda'", *(f"assim_nml.{k}={x}" for k, x in setting.items()),
                    f"assim_nml.member_batch={setting['n_members']}"]
            key = tuple(sorted(setting.items()))
            r = cache[key] if key in cache else cache.setdefault(key, run(over))
            extra_s = r["wall_s_per_cycle"] - ref["wall_s_per_cycle"]
            gain = (ref["analysis_rmse"] - r["analysis_rmse"]) / extra_s if extra_s > 0 else float("nan")
            row = dict(knob=knob, value=v, setting=setting, **r, time_ratio=r["wall_s_per_cycle"] / ref["wall_s_per_cycle"],
                       rmse_gain_per_s=gain)
            rows.append(row)
            print(f"{knob:<15}{v:>6}{r['analysis_rmse']:>9.4f}{r['wall_s_per_cycle']:>10.3f}"
                  f"{row['time_ratio']:>10.0f}{gain:>9.3f}", flush=True)
    print(f"equal steps ({centre['n_members']} members): RMSE a (s/cycle)")
    print(f"{'n_steps':<9}" + "".join(f"{m:>18}" for m in ("lo-sda", *BASELINES)))
    baselines = []
    for v in SWEEPS["n_steps"]:
        lo = cache[tuple(sorted(dict(centre, n_steps=v).items()))]
        row = {"n_steps": v, "lo-sda": lo}
        for m in BASELINES:
            row[m] = run([f"assim_nml.method='{m}'", f"assim_nml.n_steps={v}",
                          f"assim_nml.member_batch={centre['n_members']}"])
        baselines.append(row)
        print(f"{v:<9}" + "".join(f"{row[m]['analysis_rmse']:>10.4f} ({row[m]['wall_s_per_cycle']:.2f})"
                                  for m in ("lo-sda", *BASELINES)), flush=True)
    result = {"testbed": args.testbed, "seed": args.seed, "cycles": args.cycles, "spinup": args.spinup,
              "threads": args.threads, "centre": centre, "3dvar": ref, "lo-sda": rows, "equal_steps": baselines}
    write_text(REPO / "lodas_output" / f"lo_sda_scaling_{args.testbed}.json", json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
