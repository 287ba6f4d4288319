"""The shallow-water testbed's climate and predictability, measured (numpy reference model).

Usage::

    .venv/bin/python benchmarks/sw_testbed.py [--days 180] [--json PATH]

From the default initial state it runs the model ``--days`` days and a twin started 1e-6 m
away in one ``h`` value, and prints, every 10 days: RMS speed, RMS ``h`` anomaly, max Rossby
number, domain-mean ``h`` drift, energy, and the RMS ``(u, v)`` difference of the twins. From
the twin difference it fits the error-doubling time (log-linear over the growth phase, where
the difference is between 1e-6 and 1e-2 of the RMS speed). The last line is a JSON object.

What it checks (exit 1 if any fails): the flow stays finite and bounded (energy after day 20
below 3x its mean), the mean ``h`` is conserved to 1e-9 m, and the twins diverge to O(1)
(chaos), which is what makes the twin experiments a data-assimilation problem.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coupler.models.shallow_water import ShallowWater, ShallowWaterParams  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=180)
    ap.add_argument("--json", type=Path, help="also write the JSON result here")
    args = ap.parse_args(argv)

    model = ShallowWater(ShallowWaterParams())
    p = model.params
    spd = int(round(86400 / p.dt_s))
    s0 = model.default_initial_state()
    ens = np.stack([s0, s0])
    ens[1, 2, 10, 20] += 1e-6
    rows, t0 = [], time.perf_counter()
    print(f"{'day':>4}{'rms speed':>11}{'rms h anom':>12}{'max Ro':>8}{'mean h - h0':>13}{'energy':>10}{'twin diff':>11}")
    for day in range(1, args.days + 1):
        ens = model.step(ens, spd)
        d = model.diagnostics(ens[0])
        diff = float(np.sqrt(((ens[1, :2] - ens[0, :2]) ** 2).mean()))
        rows.append(dict(day=day, rms_speed=float(d["rms_speed"]), rms_h_anomaly=float(d["rms_h_anomaly"]),
                         max_rossby=float(d["max_rossby"]), mean_h_drift=float(d["mean_h"] - p.h0_m),
                         energy=float(model.energy(ens[0])), twin_diff=diff))
        if day % 10 == 0:
            r = rows[-1]
            print(f"{day:4d}{r['rms_speed']:11.3f}{r['rms_h_anomaly']:12.2f}{r['max_rossby']:8.2f}"
                  f"{r['mean_h_drift']:13.1e}{r['energy']:10.1f}{diff:11.2e}")

    days = np.array([r["day"] for r in rows])
    diff = np.array([r["twin_diff"] for r in rows])
    speed = np.array([r["rms_speed"] for r in rows])
    growth = (diff > 1e-6 * speed) & (diff < 1e-2 * speed) & (days > 20)
    doubling = None
    if growth.sum() >= 5:
        slope = np.polyfit(days[growth], np.log(diff[growth]), 1)[0]
        doubling = float(np.log(2) / slope) if slope > 0 else None
    energy = np.array([r["energy"] for r in rows])
    late = energy[days > 20]
    checks = {
        "finite": bool(np.all(np.isfinite(ens))),
        "energy_bounded": bool(late.size == 0 or late.max() < 3 * late.mean()),
        "mass_conserved": bool(max(abs(r["mean_h_drift"]) for r in rows) < 1e-9),
        "chaotic": bool(diff[-1] > 0.3 * speed[-1]),
    }
    result = {"days": args.days, "wall_s": time.perf_counter() - t0, "error_doubling_days": doubling,
              "rms_speed_after_day_20": float(speed[days > 20].mean()) if (days > 20).any() else None,
              "checks": checks, "daily": rows}
    print(f"error-doubling time: {doubling if doubling is None else round(doubling, 2)} days; "
          f"checks: {checks}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "daily"}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
