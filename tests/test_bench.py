"""The skill harness: every method on the same truth and observations, the --json contract."""
import json

import numpy as np
import pytest

from tests.conftest import lodas


def test_bench_l96_json_contract_and_ordering():
    """300 cycles: 3D-Var beats no assimilation and the ETKF beats 3D-Var (published 0.41 vs 0.18)."""
    p = lodas("bench", "l96", "--methods", "none,3dvar,etkf", "--cycles", "300", "--set",
              "twin_nml.spinup_cycles=100", "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["testbed"] == "l96" and out["cycles"] == 300 and out["n_obs_per_cycle"] == 40
    m = out["methods"]
    for name in ("none", "3dvar", "etkf"):
        assert {"analysis_rmse", "background_rmse", "wall_s_per_cycle"} <= set(m[name]), m[name]
    assert m["3dvar"]["analysis_rmse"] < 0.6 < 3.0 < m["none"]["analysis_rmse"]
    assert m["etkf"]["analysis_rmse"] < 0.8 * m["3dvar"]["analysis_rmse"]
    assert m["3dvar"]["time_ratio_to_3dvar"] == 1.0
    assert m["etkf"]["time_ratio_to_3dvar"] == pytest.approx(m["etkf"]["wall_s_per_cycle"] / m["3dvar"]["wall_s_per_cycle"])


def test_bench_letkf_keys_reach_the_filter():
    """&assim_nml etkf_localization / etkf_rtps: 10 members, where the global ETKF diverges (tests/test_etkf.py)."""
    p = lodas("bench", "l96", "--methods", "etkf", "--cycles", "300", "--set", "twin_nml.spinup_cycles=100",
              "--set", "assim_nml.etkf_members=10", "--set", "assim_nml.etkf_localization=4",
              "--set", "assim_nml.etkf_rtps=0.3", "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout.strip().splitlines()[-1])["methods"]["etkf"]
    assert (m["n_members"], m["localization"], m["rtps"]) == (10, 4.0, 0.3)
    assert m["analysis_rmse"] < 0.3 and set(m["analysis_rmse_per_variable"]) == {"x"}, m


def test_bench_rejects_a_namelist_of_the_other_testbed():
    p = lodas("bench", "sw", "--namelist", "namelists/l96_bench.nml", "--cycles", "2", timeout=120)
    assert p.returncode != 0 and "twin_nml model = 'l96'" in p.stderr


def test_bench_runs_the_diffusion_methods_with_the_shipped_checkpoint():
    """The shipped L96 checkpoint loads (package data) and every diffusion method cycles stably."""
    p = lodas("bench", "l96", "--methods", "none,lo-sda,dps,sda", "--cycles", "12", "--set",
              "twin_nml.spinup_cycles=2", "--set", "assim_nml.n_members=4", "--set", "assim_nml.n_steps=4",
              "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout.strip().splitlines()[-1])["methods"]
    for name in ("lo-sda", "dps", "sda"):
        assert m[name]["status_counts"] == {"ok": 12}, m[name]
        assert m[name]["analysis_rmse"] < m[name]["background_rmse"] < m["none"]["background_rmse"], m[name]
    # the paired comparison with LO-SDA: over the same 10 scored cycles the mean per-cycle difference is
    # the difference of the mean RMSEs (10 serially correlated cycles are too few for a narrow interval)
    assert "minus_lo-sda" not in m["lo-sda"]
    for name in ("none", "dps", "sda"):
        d = m[name]["minus_lo-sda"]
        assert d["cycles"] == 10 and d["mean"] == pytest.approx(m[name]["analysis_rmse"] - m["lo-sda"]["analysis_rmse"])
        assert d["ci"][0] < d["mean"] < d["ci"][1] and d["effective_cycles"] <= 10


def test_paired_difference_interval_and_serial_correlation():
    """The interval covers the true mean difference and excludes zero; serially correlated
    differences count as fewer cycles and widen it; missing cycles drop from both series."""
    from coupler.bench import paired_difference

    rng = np.random.default_rng(0)
    b = rng.uniform(0.3, 0.5, 2000)
    white = paired_difference(b + 0.01 + 0.02 * rng.standard_normal(2000), b)
    assert white["ci"][0] < 0.01 < white["ci"][1] and white["ci"][0] > 0
    assert white["lag1_autocorrelation"] < 0.1 and white["effective_cycles"] > 0.8 * 2000

    e = np.zeros(2000)                                # AR(1) differences, rho = 0.9: n_eff ~ n / 19
    for c in range(1, 2000):
        e[c] = 0.9 * e[c - 1] + 0.02 * np.sqrt(1 - 0.81) * rng.standard_normal()
    red = paired_difference(b + 0.01 + e, b)
    assert 0.8 < red["lag1_autocorrelation"] < 0.95 and red["effective_cycles"] < 200
    assert red["ci"][1] - red["ci"][0] > 3 * (white["ci"][1] - white["ci"][0])

    gappy = paired_difference([0.5, None, float("nan")] + [0.4] * 20, [0.3, 0.3, 0.3] + [0.3] * 20)
    assert gappy["cycles"] == 21
    assert paired_difference([0.1] * 9, [0.2] * 9) is None
    with pytest.raises(ValueError, match="10 and 11 cycles"):
        paired_difference([0.1] * 10, [0.1] * 11)


def test_bench_every_other_variable_observed_uses_its_own_prior():
    """namelists/l96_half_bench.nml: the shipped prior trained on that observing system (l96_half.pt)
    loads, and LO-SDA cycles stably with half the variables unobserved."""
    p = lodas("check", "namelists/l96_half_bench.nml", "--set", "assim_nml.method='lo-sda'", timeout=120)
    assert p.returncode == 0, p.stderr
    assert "l96_half.pt" in p.stdout and "trained on l96 seed 101" in p.stdout
    p = lodas("bench", "l96", "--namelist", "namelists/l96_half_bench.nml", "--methods", "none,lo-sda", "--cycles",
              "12", "--set", "twin_nml.spinup_cycles=2", "--set", "assim_nml.n_members=4", "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    m = out["methods"]
    assert out["n_obs_per_cycle"] == 20 and m["lo-sda"]["status_counts"] == {"ok": 12}, out
    assert m["lo-sda"]["analysis_rmse"] < m["lo-sda"]["background_rmse"] < m["none"]["background_rmse"], m


def _memory_bound():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_bound.py"
    spec = importlib.util.spec_from_file_location("memory_bound", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_static_blue_reaches_the_kalman_posterior_variance():
    """Gaussian background errors of a known covariance: the static BLUE's analysis errors have the
    Kalman posterior variance trace((I - K H) C) / N."""
    import numpy as np

    rng = np.random.default_rng(0)
    N, n = 12, 40000
    i = np.arange(N)
    d = np.minimum(np.abs(i[:, None] - i[None]), N - np.abs(i[:, None] - i[None]))
    w, v = np.linalg.eigh(np.exp(-0.5 * (d / 2.0) ** 2))     # periodic Gaussian correlations, made PSD
    C = (v * np.maximum(w, 1e-3)) @ v.T
    H = np.eye(N)[::3]
    r = np.full(H.shape[0], 0.25)
    eb = rng.multivariate_normal(np.zeros(N), C, size=n)
    innov = eb @ H.T + np.sqrt(r) * rng.standard_normal((n, H.shape[0]))
    ea = _memory_bound().static_blue(eb, innov, H, r)
    K = C @ H.T @ np.linalg.inv(H @ C @ H.T + np.diag(r))
    expected = np.sqrt(np.trace((np.eye(N) - K @ H) @ C) / N)
    assert np.sqrt(np.mean(ea ** 2)) == pytest.approx(expected, rel=0.02)
    assert expected < 0.8 * np.sqrt(np.mean(eb ** 2))


def test_memory_bound_harness_on_3dvar_and_etkf():
    """benchmarks/memory_bound.py: the split figures are consistent, and the static BLUE of 3D-Var's
    own backgrounds beats 3D-Var's analysis (its climatological B is not its backgrounds' covariance)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "benchmarks/memory_bound.py", "--methods", "3dvar,etkf", "--cycles", "300",
                        "--spinup", "100", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout[p.stdout.index("{"):])
    assert out["n_observed"] == out["n_unobserved"] == 20
    m = out["methods"]
    for row in m.values():
        for k in ("background", "analysis", "static_blue"):
            v = row[k]                                   # all^2 = mean of the two halves' squares
            assert v["all"] ** 2 == pytest.approx((v["observed"] ** 2 + v["unobserved"] ** 2) / 2, rel=1e-9)
    assert m["3dvar"]["static_blue"]["all"] < 0.9 * m["3dvar"]["analysis"]["all"]
    assert m["etkf"]["analysis"]["all"] < m["etkf"]["background"]["all"] < 0.5 * m["3dvar"]["background"]["all"]
    # 3D-Var under-corrects where it observes: its last increment predicts the next background error
    # there; the ETKF's does not (its innovations are close to white)
    prev = {k: m[k]["previous_increment"]["observed"] for k in m}
    assert prev["3dvar"]["corr"] > 0.3 and prev["3dvar"]["gain"] > 0.1 > abs(prev["etkf"]["corr"]), prev


def test_cycle_drift_shows_the_filter_spin_up():
    """benchmarks/cycle_drift.py: cycled from an independent background, 3D-Var's first block is
    worse than its later ones (the filter's spin-up), the later blocks agree, and the blocks cover
    every cycle."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "benchmarks/cycle_drift.py", "--namelist", "namelists/l96_bench.nml",
                        "--cycles", "200", "--block", "25", "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout[p.stdout.index("{"):])
    a = np.array(out["methods"]["3dvar"]["analysis_rmse"])
    b = np.array(out["methods"]["3dvar"]["background_rmse"])
    assert len(a) == len(b) == len(out["truth_std"]["x"]) == 8
    assert a[0] > 1.4 * a[1:].max(), a                  # spin-up from a climatological error
    assert a[1:].max() < 1.35 * a[1:].min(), a          # then stationary (about 0.41, block noise +-0.05)
    assert np.all(a < b), (a, b)                        # every block: the analysis beats its background
