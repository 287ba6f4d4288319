"""`lodas train` (coupler.train): tiny Lorenz-96 configurations through the CLI, resumption, &train_nml checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bridges.namelist import NamelistError, load
from coupler.assim.latent import prior_condition
from coupler.io.checkpoints import load_checkpoint
from coupler.train import random_shift, state_paths
from tests.conftest import lodas

torch.set_num_threads(1)

TINY = """
&l96_nml
    n = 40
/
&coupler_nml
    seed = 1
/
&grid_nml
    nx = 40
    ny = 1
    variables = 'x'
/
&assim_nml
    b_scale = 0.02
    etkf_members = 20
    inflation = 1.05
    n_steps = 3
/
&obs_nml
    network = 'all'
    error_std = 1.0
/
&twin_nml
    model = 'l96'
    spinup_steps = 200
    clim_samples = 100
    clim_stride = 5
/
&train_nml
    checkpoint = '{ckpt}'
    seed = 5
    n_cycles = 40
    spinup_cycles = 5
    background_sources = '3dvar', 'etkf'
    forecast_leads = 1, 3
    val_fraction = 0.25
    vae_epochs = 2
    prior_epochs = 2
    batch_size = 16
    latent_channels = 2
    width = 4
    levels = 1
    prior_width = 8
    prior_blocks = 1
    eval_pairs = 4
    threads = 1
/
"""


def _nml(tmp_path, name="train.nml", ckpt=None, extra=""):
    path = tmp_path / name
    path.write_text(TINY.format(ckpt=ckpt or tmp_path / "ck.pt") + extra)
    return path


def _last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lodas_train_writes_a_loadable_checkpoint(tmp_path):
    proc = lodas("train", str(_nml(tmp_path)), "--json", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    s = _last_json(proc)
    assert s["complete"] and s["vae"]["epochs"] == 2 and s["prior"]["epochs"] == 2
    assert set(s["vae"]["recon_rmse"]) == {"x"} and np.isfinite(s["prior"]["val_loss"])
    assert set(s["eval"]) == {"3dvar", "3dvar+3", "etkf", "etkf+3"} and s["checkpoint"] == str(tmp_path / "ck.pt")
    assert "reconstruction RMSE" in proc.stdout and "prior samples" in proc.stdout
    ck = load_checkpoint(tmp_path / "ck.pt", shape=(1, 1, 40), variables=["x"])
    m = ck.meta
    assert m["shape"] == [1, 1, 40] and m["variables"] == ["x"] and m["latent_shape"] == [2, 20]
    assert len(m["normalization"]["mean"]) == 1 and m["normalization"]["std"][0] > 1
    assert m["latent_scale"] > 0 and m["arch"]["width"] == 4 and "&train_nml" in m["train_namelist"]
    assert m["summary"]["vae"]["recon_rmse"]["x"] == s["vae"]["recon_rmse"]["x"]
    assert not any(p.exists() for p in state_paths(tmp_path / "ck.pt")), "state files removed (keep_state false)"
    z = ck.vae.to_latent(torch.zeros(2, 1, 1, 40) + 2.0)
    assert ck.eps_net(z, torch.full((2,), 0.5), prior_condition(z, 0.1)).shape == (2, 2, 20)
    e = m["background_error"]
    assert set(e) == {"3dvar", "3dvar+3", "etkf", "etkf+3", "all"} and 0 < min(e.values()) and max(e.values()) < 1
    assert e["3dvar+3"] > e["3dvar"] and e["etkf+3"] > e["etkf"], e                 # errors grow with the lead
    assert min(e.values()) <= e["all"] <= max(e.values()) and m["latent_increment_std"] > 0


def test_increment_weight_trains_on_pairs_and_reports_the_oracle_latent_analysis(tmp_path):
    """&train_nml increment_weight > 0: the VAE phase runs on (truth, background) pairs; the summary's
    oracle latent analysis RMSE is x_b + D(E(x_t)) - D(E(x_b)) against x_t on the validation pairs,
    recomputed here from the checkpoint and the kept pairs file."""
    proc = lodas("train", str(_nml(tmp_path)), "--set", "train_nml.increment_weight=1.0", "--set",
                 "train_nml.keep_state=.true.", "--json", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    s = _last_json(proc)
    assert "oracle latent analysis" in proc.stdout and "oracle latent analysis RMSE" in proc.stderr
    ck = load_checkpoint(tmp_path / "ck.pt", shape=(1, 1, 40), variables=["x"])
    p = torch.load(state_paths(tmp_path / "ck.pt")[1], weights_only=True)
    n_tr = p["truth"].shape[0] - p["n_val"]
    base = [k for k, src in enumerate(p["sources"]) if "@" not in src]
    se, n = 0.0, 0
    with torch.no_grad():
        for k in base:
            xt, xb = p["truth"][n_tr:], p["background"][k, n_tr:]
            xa = xb + ck.vae.from_latent(ck.vae.to_latent(xt)) - ck.vae.from_latent(ck.vae.to_latent(xb))
            se, n = se + float(((xa - xt).double() ** 2).sum()), n + xt.numel()
    assert s["vae"]["oracle_rmse"]["x"] == pytest.approx((se / n) ** 0.5, rel=1e-4)
    assert 0 < s["vae"]["oracle_rmse"]["all"] == s["vae"]["oracle_rmse"]["x"]


def test_resume_continues_and_equals_an_uninterrupted_run(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    full = lodas("train", str(_nml(tmp_path, "a.nml", tmp_path / "a.pt")), "--json", env=env)
    assert full.returncode == 0, full.stderr
    nml = _nml(tmp_path, "b.nml", tmp_path / "b.pt")
    first = lodas("train", str(nml), "--max-epochs", "1", "--json", env=env)         # "interrupted" after 1 epoch
    assert first.returncode == 0, first.stderr
    s1 = _last_json(first)
    assert not s1["complete"] and s1["vae"]["epochs"] == 1 and s1["prior"]["epochs"] == 0
    assert not (tmp_path / "b.pt").exists() and all(p.exists() for p in state_paths(tmp_path / "b.pt"))
    second = lodas("train", str(nml), "--resume", "--max-epochs", "2", "--json", env=env)
    s2 = _last_json(second)
    assert "resume:" in second.stderr and (s2["vae"]["epochs"], s2["prior"]["epochs"]) == (2, 1)
    last = lodas("train", str(nml), "--resume", "--json", env=env)
    assert last.returncode == 0, last.stderr
    s3 = _last_json(last)
    assert s3["complete"] and (s3["vae"]["epochs"], s3["prior"]["epochs"]) == (2, 2)
    # bit for bit: same seed, same thread count
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "ab")
    for key in ("vae_state", "eps_state"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k}"
    sa, sb = _last_json(full), s3
    assert sa["prior"]["val_loss"] == sb["prior"]["val_loss"] and sa["vae"]["recon_rmse"] == sb["vae"]["recon_rmse"]
    # a changed configuration is not resumed silently
    state_nml = _nml(tmp_path, "c.nml", tmp_path / "c.pt")
    assert lodas("train", str(state_nml), "--max-epochs", "1", env=env).returncode == 0
    bad = lodas("train", str(state_nml), "--resume", "--set", "train_nml.lr=0.01", env=env)
    assert bad.returncode == 2 and "written for another configuration (train.lr: 0.002 (state) vs 0.01 (now))" \
        in bad.stderr


@pytest.mark.parametrize("setting, message", [
    ("vae_epochs = 0", r"&train_nml vae_epochs = 0: expected a value >= 1"),
    ("background_sources = '4dvar'", r"&train_nml background_sources = '4dvar': expected one of '3dvar', 'etkf'"),
    ("val_fraction = 1.5", r"&train_nml val_fraction = 1.5: expected a value < 1"),
    ("lr_schedule = 'cosin'", r"&train_nml lr_schedule = 'cosin': .*did you mean 'cosine'"),
    ("epochs = 3", r"&train_nml: unknown key 'epochs'"),
])
def test_bad_train_nml_values_name_group_and_key(tmp_path, setting, message):
    path = _nml(tmp_path)
    path.write_text(path.read_text().replace("    threads = 1\n", f"    threads = 1\n    {setting}\n"))
    with pytest.raises(NamelistError, match=message):
        load(path)


def test_train_refuses_evaluation_seeds_and_missing_group(tmp_path):
    path = _nml(tmp_path)
    proc = lodas("train", str(path), "--set", "train_nml.seed=1")
    assert proc.returncode == 2 and "&train_nml seed = 1 is an evaluation seed" in proc.stderr
    proc = lodas("train", str(path), "--set", "train_nml.levels=4")
    assert proc.returncode == 2 and "&train_nml levels = 4" in proc.stderr
    proc = lodas("train", str(path), "--set", "train_nml.forecast_leads=1,8")
    assert proc.returncode == 2 and "forecast_leads = [1, 8] needs spinup_cycles >= 7" in proc.stderr
    bare = tmp_path / "bare.nml"
    bare.write_text(TINY.split("&train_nml")[0])
    proc = lodas("train", str(bare))
    assert proc.returncode == 2 and "needs a &train_nml group" in proc.stderr
    assert load(bare).train is None


def test_late_started_etkf_source_covers_the_last_cycles_around_the_3dvar_analysis(tmp_path):
    """etkf_cycles > 0: the etkf source has backgrounds (finite) for exactly its last cycles, after its
    spin-up; started from the cycled 3D-Var analysis it is closer to the truth over those cycles than
    the same filter cycled from the independent start; the VAE and prior train on the valid pairs only."""
    from coupler.train import make_pairs, train

    path = _nml(tmp_path)
    path.write_text(path.read_text().replace("    val_fraction", "    etkf_cycles = 20\n    etkf_spinup_cycles = 5\n"
                                             "    val_fraction"))
    cfg = load(path)
    pairs = make_pairs(cfg)
    v = pairs.valid()
    assert pairs.sources == ["3dvar", "3dvar+3", "etkf", "etkf+3"]
    assert v[0].all() and v[1].all() and v[2, 20:].all() and not v[2, :20].any() and v[3].sum() == 20
    whole = make_pairs(load(_nml(tmp_path, "whole.nml")))                        # etkf_cycles = 0: from the start
    rmse = lambda b: float((b[20:] - pairs.truth[20:]).pow(2).mean().sqrt())     # noqa: E731
    assert rmse(pairs.background[2]) < 0.75 * rmse(whole.background[2]), (rmse(pairs.background[2]),
                                                                         rmse(whole.background[2]))
    torch.testing.assert_close(pairs.background[:2], whole.background[:2])        # 3dvar: the same run
    assert pairs.info["sources"]["etkf"]["kept_cycles"] == 20
    s = train(cfg)
    assert s["complete"] and s["n_train_states"] == 30 * 3 + 10 * 2 and s["n_train_pairs"] == 30 * 2 + 10 * 2
    assert np.isfinite(s["prior"]["val_loss"]) and np.isfinite(s["vae"]["val_loss"])
    assert all(np.isfinite(x) for x in s["background_error"].values()), s["background_error"]


@pytest.mark.parametrize("setting, message", [
    ("etkf_cycles = 10", "etkf_cycles = 10: expected more than the 10 validation cycles"),
    ("etkf_cycles = 38", "etkf_spinup_cycles = 80: with etkf_cycles = 38 the etkf source would start before"),
])
def test_late_etkf_source_checks(tmp_path, setting, message):
    proc = lodas("train", str(_nml(tmp_path)), "--set", f"train_nml.{setting.replace(' ', '')}")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    proc = lodas("train", str(_nml(tmp_path)), "--set", "train_nml.etkf_cycles=20",
                 "--set", "train_nml.background_sources='etkf'")
    assert proc.returncode == 2 and "add '3dvar' to background_sources" in proc.stderr, proc.stderr


def test_extra_trajectories_prepend_3dvar_training_pairs_of_other_truths(tmp_path):
    """extra_trajectories: their kept cycles come first, 3dvar sources only (etkf NaN), other truths; the
    seed trajectory's pairs (and so the validation block) are those of a run without them; the VAE and
    prior count the extra pairs; a self-cycling round still cycles the seed trajectory's last cycles."""
    from coupler.train import make_pairs, train

    extra = "    extra_trajectories = 2\n    extra_cycles = 7\n"
    path = _self_cycling_nml(tmp_path, "x.nml", tmp_path / "x.pt")
    path.write_text(path.read_text().replace("    val_fraction", extra + "    val_fraction"))
    cfg = load(path)
    pairs, plain = make_pairs(cfg), make_pairs(load(_nml(tmp_path)))
    assert pairs.truth.shape[0] == 2 * 7 + 40 and pairs.n_val == plain.n_val == 10
    torch.testing.assert_close(pairs.truth[14:], plain.truth)
    torch.testing.assert_close(pairs.background[:, 14:], plain.background, equal_nan=True)
    v = pairs.valid()
    assert pairs.sources == ["3dvar", "3dvar+3", "etkf", "etkf+3"]
    assert v[:2, :14].all() and not v[2:, :14].any()
    gap = lambda a, b: float((a - b).abs().mean())                                   # noqa: E731
    assert gap(pairs.truth[:7], pairs.truth[7:14]) > 1 and gap(pairs.truth[7:14], plain.truth[:7]) > 1
    rmse = [e["background_rmse_3dvar"] for e in pairs.info["extra_trajectories"]]
    assert len(rmse) == 2 and all(0 < r < 3 for r in rmse), rmse
    s = train(cfg)
    assert s["complete"] and s["n_train_states"] == 30 * 5 + 14 * 3          # truths and all four sources
    # 30 per source, 14 more per 3dvar source, 10 own (lo-sda@1: 20 cycles, 10 in the validation block)
    assert s["n_train_pairs"] == 4 * 30 + 2 * 14 + 10 and s["n_val_pairs"] == 4 * 10 + 10
    own = s["data"]["sources"]["lo-sda@1"]
    assert own["cycles"] == 20 and np.isfinite(own["background_rmse_train"])


def test_extra_trajectories_need_the_3dvar_source(tmp_path):
    proc = lodas("train", str(_nml(tmp_path)), "--set", "train_nml.extra_trajectories=1",
                 "--set", "train_nml.background_sources='etkf'")
    assert proc.returncode == 2 and "extra_trajectories = 1 are cycled by the 3dvar source" in proc.stderr, proc.stderr


def test_random_shift_moves_pairs_together():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = x + 1000
    sx, sy = random_shift([x, y], g, (4, 1))
    torch.testing.assert_close(sy - sx, torch.full_like(sx, 1000.0))
    for b in range(2):
        hits = [(dy, dx) for dy in (0, 4) for dx in range(8) if torch.equal(sx[b], torch.roll(x[b], (-dy, -dx), (1, 2)))]
        assert len(hits) == 1


def test_run_etkf_records_forecast_means():
    from coupler.assim.etkf import initial_ensemble, run_etkf
    from coupler.assim.networks import make_network, synthesize
    from coupler.models.lorenz96 import Lorenz96

    m = Lorenz96()
    truth = np.stack([m.step(m.default_initial_state() + 1.0, 10 + k) for k in range(3)])
    net = make_network("all", (1, 1, 40), [0])
    obs = [synthesize(truth[c], net, [1.0], np.random.default_rng(c)) for c in range(3)]
    E0 = initial_ensemble(truth[0], 10, 1.0, np.random.default_rng(0))
    s = run_etkf(m.step, E0, obs, truth, 1, 1.0, record_backgrounds=True, record_analyses=True)
    assert s["backgrounds"].shape == s["analyses"].shape == (3, 1, 1, 40)
    np.testing.assert_allclose(s["backgrounds"][0], m.step(E0, 1).mean(0))
    rms_a = [float(np.sqrt(np.mean((s["analyses"][c] - truth[c]) ** 2))) for c in range(3)]
    np.testing.assert_allclose(rms_a, [r["rmse_a"] for r in s["rows"]], rtol=1e-12)
    plain = run_etkf(m.step, E0, obs, truth, 1, 1.0)
    assert "backgrounds" not in plain and "analyses" not in plain


SELF_CYCLING = """    self_cycling_rounds = 1
    self_cycling_cycles = 20
    self_cycling_epochs = 2
"""


def _self_cycling_nml(tmp_path, name, ckpt):
    path = _nml(tmp_path, name, ckpt)
    text = path.read_text().replace("&assim_nml\n", "&assim_nml\n    method = 'lo-sda'\n    n_members = 4\n"
                                    "    member_batch = 4\n    background_error = 0.1\n    lo_iterations = 1\n")
    path.write_text(text.replace("    threads = 1\n/", "    threads = 1\n" + SELF_CYCLING + "/"))
    return path


def test_self_cycling_round_adds_own_backgrounds_and_resumes_bit_for_bit(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    full = lodas("train", str(_self_cycling_nml(tmp_path, "a.nml", tmp_path / "a.pt")), "--json", env=env)
    assert full.returncode == 0, full.stderr
    s = _last_json(full)
    assert s["complete"] and s["self_cycling_rounds"] == 1 and s["sources"][-1] == "lo-sda@1"
    own = s["data"]["sources"]["lo-sda@1"]
    assert own["cycles"] == 20 and np.isfinite(own["background_rmse_train"]) and own["analysis_rmse"] > 0
    # 20 own pairs, 10 of them in the validation block (the last 10 of 40 cycles)
    base = 4 * 30
    assert s["n_train_pairs"] == base + 10 and s["n_val_pairs"] == 4 * 10 + 10
    m = load_checkpoint(tmp_path / "a.pt", shape=(1, 1, 40), variables=["x"]).meta
    assert [r["phase"] for r in m["summary"]["history"]][-3:] == ["prior", "round1", "round1"]
    assert "lo-sda@1" in m["background_error"] and "lo-sda@1" in s["eval"]
    # the latent increment scale stays that of the base sources the prior was first trained on
    assert m["latent_increment_std"] == s["latent_error_rms"]["all"] != s["latent_error_rms"]["lo-sda@1"]
    # interrupted inside the round (2 VAE + 2 prior + 1 round epoch), then resumed: the same networks
    nml = _self_cycling_nml(tmp_path, "b.nml", tmp_path / "b.pt")
    first = lodas("train", str(nml), "--max-epochs", "5", "--json", env=env)
    assert first.returncode == 0, first.stderr
    assert not _last_json(first)["complete"] and "self-cycling round 1" in first.stderr
    last = lodas("train", str(nml), "--resume", "--json", env=env)
    assert last.returncode == 0, last.stderr
    assert "self-cycling round 1: cycling" not in last.stderr        # the own backgrounds were kept, not redone
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "ab")
    for k in a["eps_state"]:
        assert torch.equal(a["eps_state"][k], b["eps_state"][k]), k


def test_self_cycling_needs_a_diffusion_method(tmp_path):
    path = _self_cycling_nml(tmp_path, "c.nml", tmp_path / "c.pt")
    proc = lodas("train", str(path), "--set", "assim_nml.method='3dvar'")
    assert proc.returncode == 2 and "self_cycling_rounds = 1 cycles the &assim_nml method, which must be a " \
        "diffusion method" in proc.stderr
    proc = lodas("train", str(path), "--set", "train_nml.self_cycling_cycles=5")
    assert proc.returncode == 2 and "self_cycling_cycles = 5: expected more than the 10 validation cycles" in proc.stderr


@pytest.mark.parametrize("extra, steps", [("", (0, 1)), ("&obs_nml network = 'every_k', every_k = 2 /", (0, 2))])
def test_augmentation_shifts_respect_the_observing_network(tmp_path, extra, steps):
    """Lorenz-96: any shift with every point observed; multiples of k with an every_k network (the
    background errors are larger between the observed points, and must stay there)."""
    from coupler.train import shift_steps

    text = TINY.format(ckpt=tmp_path / "ck.pt")
    if extra:
        text = text.replace("&obs_nml\n    network = 'all'\n    error_std = 1.0\n/", extra)
    (tmp_path / "t.nml").write_text(text)
    assert shift_steps(load(tmp_path / "t.nml")) == steps


def test_run_method_records_the_analyses_it_scores():
    """run_method(record_analyses=True): background plus the increment sent back, the states the
    summary's analysis RMSE (mean of the per-cycle RMSEs after spin-up) is computed from."""
    from coupler.experiment import make_experiment, run_method
    from coupler.methods import make_method
    from tests.conftest import REPO

    cfg = load(REPO / "namelists" / "l96_bench.nml", ["assim_nml.method='3dvar'", "twin_nml.spinup_cycles=5"])
    exp = make_experiment(cfg, seed=11, n_cycles=30)
    s = run_method(exp, make_method(cfg, covariance=exp.covariance), record_analyses=True)
    assert "backgrounds" not in s and s["analyses"].shape == exp.truth.shape
    per_cycle = np.sqrt(np.mean((s["analyses"] - exp.truth) ** 2, axis=(1, 2, 3)))
    assert float(np.mean(per_cycle[5:])) == pytest.approx(s["analysis_rmse"], rel=1e-12)
    both = run_method(exp, make_method(cfg, covariance=exp.covariance), record_backgrounds=True,
                      record_analyses=True)
    assert float(np.sqrt(np.mean((both["analyses"] - both["backgrounds"]) ** 2))) > 0.1     # real increments
    np.testing.assert_array_equal(both["analyses"], s["analyses"])
