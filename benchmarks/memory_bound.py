"""What an analysis without memory can do: each method against the best *static* linear analysis
of its own cycled backgrounds, split into observed and unobserved variables.

    python benchmarks/memory_bound.py [--namelist namelists/l96_half_bench.nml]
                                      [--methods 3dvar,etkf,lo-sda] [--cycles 600] [--spinup 100]
                                      [--seed 11] [--threads 1] [--json]

An in-line analysis (3D-Var, LO-SDA, SDA, DPS) sees one background ``x_b`` and this cycle's
observations: whatever it knows of the errors of the day must be a function of ``x_b``. The ETKF
carries more: an ensemble of forecasts whose covariance remembers where the past observations
did and did not constrain the state. This harness measures how much of a method's skill a
memoryless analysis could reach. Each method is cycled on the same truth and observations
(:func:`coupler.experiment.make_experiment`, ``--seed``: the tuning seed 11 by default, never
the evaluation seed 1); from its kept background errors ``e_b = x_t - x_b`` (``n`` cycles after
``--spinup``) the sample covariance ``C = cov(e_b)`` (``(N, N)``, ``N`` state elements) gives the
**static BLUE** of the same backgrounds with the same observations,

    x_a^BLUE = x_b + C H^T (H C H^T + R)^{-1} (y - H x_b),

the minimum-variance linear analysis for those backgrounds with a stationary covariance that is
*exact* for them (the covariance is estimated in-sample, so the bound is optimistic). A
memoryless analysis whose skill equals its static BLUE uses everything a stationary covariance
of its backgrounds can give; the rest of the gap to the ETKF is flow dependence (covariances of
the day), which the learnt prior ``p(x_t | x_b)`` can only have as far as it is a function of
``x_b``. Also printed: how much the previous cycle's increment says about this cycle's background
error (:func:`previous_increment`), the memory an in-line driver could carry at no cost.

For Lorenz-96 only (``N = 40``: a well-estimated sample covariance from a few hundred cycles; the
shallow-water state has 12288 elements). Observed = the grid points a point observation falls on.
Prints a table; ``--json`` prints the figures (also written to ``lodas_output/memory_bound.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a ** 2))) if a.size else float("nan")


def static_blue(errors_b: np.ndarray, innovations: np.ndarray, H: np.ndarray, obs_var: np.ndarray) -> np.ndarray:
    """Analysis errors of the static BLUE with the sample covariance of ``errors_b``.

    Args:
        errors_b: ``(n, N)`` background errors ``x_t - x_b``.
        innovations: ``(n, p)`` ``y - H x_b`` of the same cycles (a fixed network).
        H: ``(p, N)`` the linear observation operator.
        obs_var: ``(p,)`` observation-error variances (``R`` diagonal).

    Returns:
        ``(n, N)`` analysis errors ``x_t - x_a = e_b - K d``, ``K = C H^T (H C H^T + R)^{-1}``.
    """
    C = np.cov(errors_b, rowvar=False)
    K = C @ H.T @ np.linalg.inv(H @ C @ H.T + np.diag(obs_var))
    return errors_b - innovations @ K.T


def previous_increment(errors_b: np.ndarray, increments: np.ndarray, observed: np.ndarray) -> dict:
    """What the last increment says about this background's error (memory a driver could carry).

    ``errors_b[c]`` against ``increments[c - 1]`` (``(n, N)`` each), pooled over the observed and
    the unobserved elements apart: the correlation, and the fraction of the error variance a
    least-squares ``e_b ~ beta * dx_prev`` per group removes (``gain``, 0: none).
    """
    e, d = errors_b[1:], increments[:-1]
    out = {}
    for label, m in (("observed", observed), ("unobserved", ~observed)):
        ee, dd = e[:, m].ravel(), d[:, m].ravel()
        if ee.size < 2 or not np.any(dd):
            out[label] = {"corr": float("nan"), "gain": 0.0}
            continue
        beta = float(ee @ dd / (dd @ dd))
        out[label] = {"corr": float(np.corrcoef(ee, dd)[0, 1]),
                      "gain": float(1.0 - np.mean((ee - beta * dd) ** 2) / np.mean(ee ** 2))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--namelist", default=str(REPO / "namelists" / "l96_half_bench.nml"))
    ap.add_argument("--methods", default="3dvar,etkf,lo-sda")
    ap.add_argument("--cycles", type=int, default=600, help="cycles in all (spin-up included)")
    ap.add_argument("--spinup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=11, help="experiment seed (11: the tuning seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from bridges.namelist import load
    from coupler.assim.obs_operator import observation_operator
    from coupler.bench import etkf_run
    from coupler.experiment import make_experiment, run_method
    from coupler.io.atomic import write_text
    from coupler.methods import make_method

    over = [f"assim_nml.threads={args.threads}", f"twin_nml.spinup_cycles={args.spinup}"]
    cfg = load(args.namelist, over)
    if cfg.twin.model != "l96":
        raise SystemExit(f"{args.namelist}: &twin_nml model = '{cfg.twin.model}'; this harness is for Lorenz-96")
    exp = make_experiment(cfg, seed=args.seed, n_cycles=args.cycles)
    shape, s0 = exp.truth.shape[1:], args.spinup
    obs = exp.observations[0]
    for c, o in enumerate(exp.observations):          # one H and R for every cycle
        if not all(np.array_equal(getattr(o, k), getattr(obs, k)) for k in ("var_index", "x", "y", "footprint",
                                                                          "error_std")):
            raise SystemExit(f"{args.namelist}: &obs_nml network = {cfg.obs.network}: the observing network of "
                             f"cycle {c} differs from cycle 0's; this harness needs a fixed network")
    H = observation_operator(obs, shape).toarray()
    observed = np.zeros(H.shape[1], bool)
    observed[np.flatnonzero(np.abs(H).sum(0))] = True
    truth = exp.truth.reshape(len(exp.truth), -1)[s0:]
    y = np.stack([o.value for o in exp.observations])[s0:]
    result = {"namelist": str(args.namelist), "seed": args.seed, "cycles": args.cycles, "spinup_cycles": s0,
              "n_observed": int(observed.sum()), "n_unobserved": int((~observed).sum()), "methods": {}}
    for name in args.methods.split(","):
        t0 = time.perf_counter()
        if name == "etkf":
            s = etkf_run(exp, record_backgrounds=True, record_analyses=True)
        else:
            mcfg = load(args.namelist, over + [f"assim_nml.method='{name}'"])
            s = run_method(exp, make_method(mcfg, covariance=exp.covariance), record_backgrounds=True,
                           record_analyses=True)
        xb = s["backgrounds"].reshape(len(s["backgrounds"]), -1)[s0:]
        xa = s["analyses"].reshape(len(s["analyses"]), -1)[s0:]
        eb, ea = truth - xb, truth - xa
        blue = static_blue(eb, y - xb @ H.T, H, obs.error_std ** 2)
        row = {"seconds": time.perf_counter() - t0}
        for label, e in (("background", eb), ("analysis", ea), ("static_blue", blue)):
            row[label] = {"all": _rms(e), "observed": _rms(e[:, observed]), "unobserved": _rms(e[:, ~observed])}
        row["previous_increment"] = previous_increment(eb, xa - xb, observed)
        result["methods"][name] = row
    lines = [f"memoryless bound: {args.namelist}, seed {args.seed}, {args.cycles - s0} cycles after {s0}; "
             f"{result['n_observed']} observed, {result['n_unobserved']} unobserved",
             f"{'method':<8}{'background':>24}{'analysis':>24}{'static BLUE of its backgrounds':>34}",
             f"{'':<8}" + "".join(f"{'all':>8}{'obs':>8}{'unobs':>8}" for _ in range(2)) + f"{'all':>18}{'obs':>8}{'unobs':>8}"]
    for name, row in result["methods"].items():
        cells = "".join(f"{row[k][p]:>8.3f}" for k in ("background", "analysis") for p in ("all", "observed", "unobserved"))
        cells += f"{row['static_blue']['all']:>18.3f}{row['static_blue']['observed']:>8.3f}{row['static_blue']['unobserved']:>8.3f}"
        lines.append(f"{name:<8}{cells}")
    lines.append("previous increment vs this background's error (corr, variance removed), observed | unobserved:")
    for name, row in result["methods"].items():
        p = row["previous_increment"]
        lines.append(f"  {name:<8}" + " | ".join(f"{p[k]['corr']:+.3f} {p[k]['gain']:.4f}" for k in ("observed", "unobserved")))
    print("\n".join(lines))
    write_text(REPO / "lodas_output" / "memory_bound.json", json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
