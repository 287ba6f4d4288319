"""Latent diffusion assimilation as a method (coupler.assim.latent_da) on a tiny random checkpoint:
finite, deterministic analyses that move towards the observations, clear errors for a checkpoint
of another grid, and the in-line MPI job giving bit-identical increments on 1 and 2 driver ranks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bridges.namelist import load
from coupler.assim.base import Observations
from coupler.assim.latent import build_networks, default_arch
from coupler.io.checkpoints import save_checkpoint
from coupler.io.outputs import read_increment
from coupler.methods import make_method
from tests.conftest import REPO, lodas

TINY = dict(latent_channels=2, width=8, levels=1, blocks=1, prior_width=8, prior_blocks=1, time_features=8)
L96_TWIN = str(REPO / "namelists" / "l96_twin.nml")
torch.set_num_threads(1)


def tiny_checkpoint(path: Path, shape=(1, 1, 40), variables=("x",)) -> Path:
    """Random (untrained) networks with L96-like normalisation: the prior is d ~ N(0, I)."""
    torch.manual_seed(3)
    arch = default_arch(list(shape), **TINY)
    vae, eps = build_networks(arch)
    vae.set_normalization([2.3] * shape[0], [3.6] * shape[0])
    vae.set_latent_scale(0.5)
    return save_checkpoint(path, vae, eps, {"arch": arch, "variables": list(variables),
                                            "latent_increment_std": 0.3,
                                            "background_error": {"3dvar": 0.15, "all": 0.15}})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny_l96.pt")


def _cfg(ckpt, method="lo-sda", *extra):
    return load(L96_TWIN, [f"assim_nml.method='{method}'", f"assim_nml.checkpoint='{ckpt}'", "assim_nml.n_members=4",
                           "assim_nml.member_batch=2", "assim_nml.n_steps=3", *extra])


def _case(seed=0):
    rng = np.random.default_rng(seed)
    x_t = 2.3 + 3.6 * rng.standard_normal((1, 1, 40))
    x_b = x_t + 0.5 * rng.standard_normal(x_t.shape)
    idx = np.arange(0, 40, 2)
    obs = Observations(value=x_t[0, 0, idx] + 0.1 * rng.standard_normal(idx.size), error_std=np.full(idx.size, 0.1),
                       var_index=np.zeros(idx.size, dtype=int), x=idx.astype(float), y=np.zeros(idx.size))
    return x_b, obs, idx


@pytest.mark.parametrize("method", ["lo-sda", "dps", "sda"])
def test_analysis_is_finite_deterministic_and_moves_towards_the_observations(ckpt, method):
    extra = {"lo-sda": ["assim_nml.lo_iterations=20", "assim_nml.lo_lr=0.3"], "dps": ["assim_nml.dps_zeta=1.0"],
             "sda": ["assim_nml.sda_gamma=0.1"]}[method]
    m = make_method(_cfg(ckpt, method, *extra))
    x_b, obs, idx = _case()
    a = m.analyse(x_b, obs, cycle=5)
    assert a.increment.shape == x_b.shape and np.all(np.isfinite(a.increment))
    assert a.spread.shape == x_b.shape and np.all(a.spread > 0) and a.info["n_members"] == 4
    assert a.info["oma_rms"] < 0.8 * a.info["omb_rms"], a.info
    b = m.analyse(x_b, obs, cycle=5)
    assert np.array_equal(a.increment, b.increment) and np.array_equal(a.spread, b.spread)
    c = m.analyse(x_b, obs, cycle=6)                 # another cycle: other noise streams
    assert not np.array_equal(a.increment, c.increment)


def test_background_error_from_the_innovations(ckpt):
    """e_b^2 = mean[(y - H x_b)^2 - sigma_o^2] / std^2 over point observations, clipped to the trained range."""
    m = make_method(_cfg(ckpt))
    assert m.background_error is None and m.error_range == (0.075, 0.3)
    x_t = np.zeros((1, 1, 40))
    sign = np.where(np.arange(40) % 2, 1.0, -1.0)[None, None]
    idx = np.arange(40)
    obs = Observations(value=np.zeros(40), error_std=np.full(40, 0.1), var_index=np.zeros(40, dtype=int),
                       x=idx.astype(float), y=np.zeros(40))
    # |x_b - x_t| = sqrt(0.36^2 + 0.1^2) everywhere, so e_b = 0.36 / 3.6 = 0.1 after removing sigma_o^2
    x_b = x_t + np.hypot(0.36, 0.1) * sign
    assert m.background_error_of(x_b, obs) == pytest.approx(0.1, rel=1e-6)     # std stored in float32
    assert m.background_error_of(x_t, obs) == 0.075                    # negative estimate: clipped up
    assert m.background_error_of(x_t + 10.0, obs) == 0.3               # clipped down
    fixed = make_method(_cfg(ckpt, "lo-sda", "assim_nml.background_error=0.2"))
    assert fixed.background_error_of(x_b, obs) == 0.2
    a = m.analyse(x_b, obs, cycle=0)
    assert a.info["background_error"] == pytest.approx(0.1)


def test_member_increments_do_not_depend_on_how_members_are_batched(ckpt):
    m = make_method(_cfg(ckpt))
    x_b, obs, _ = _case(1)
    whole = m.sample_batches(x_b, obs, cycle=2, batches=[[0, 1], [2, 3]])
    alone = m.sample_batches(x_b, obs, cycle=2, batches=[[2, 3]])
    np.testing.assert_array_equal(whole[2:], alone)


def test_without_observations_the_increment_is_the_priors(ckpt):
    """No observations: members are prior samples around the background (mean near 0, spread ~ s_d)."""
    m = make_method(_cfg(ckpt, "lo-sda", "assim_nml.n_members=16", "assim_nml.member_batch=16"))
    x_b, _, _ = _case(2)
    a = m.analyse(x_b, Observations.empty(), cycle=0)
    assert np.all(np.isfinite(a.increment)) and a.spread.mean() > 0
    assert np.abs(a.increment).mean() < a.spread.mean()


def test_a_checkpoint_of_another_grid_is_a_clear_error(tmp_path):
    path = tiny_checkpoint(tmp_path / "sw_like.pt", shape=(3, 8, 8), variables=("u", "v", "h"))
    with pytest.raises(ValueError, match=r"l96_twin.nml: &assim_nml checkpoint = '.*sw_like.pt'.*trained on states "
                       r"\(nvar, ny, nx\) = \(3, 8, 8\).*the run expects \(nvar, ny, nx\) = \(1, 1, 40\)"):
        make_method(_cfg(path))
    with pytest.raises(ValueError, match=r"nothere.pt'.*no such file"):
        make_method(_cfg(tmp_path / "nothere.pt"))


def test_lodas_check_names_a_bad_checkpoint(tmp_path):
    path = tiny_checkpoint(tmp_path / "sw_like.pt", shape=(3, 8, 8), variables=("u", "v", "h"))
    proc = lodas("check", L96_TWIN, "--set", "assim_nml.method='lo-sda'", "--set", f"assim_nml.checkpoint='{path}'")
    assert proc.returncode == 2 and "trained on states" in proc.stderr and "Traceback" not in proc.stderr


SMALL = ["l96_nml.n_cycles=6", "twin_nml.spinup_cycles=1", "twin_nml.clim_samples=300", "twin_nml.spinup_steps=300",
         "coupler_nml.write_increments=.true.", "assim_nml.method='lo-sda'", "assim_nml.n_members=5",
         "assim_nml.member_batch=2", "assim_nml.n_steps=2", "assim_nml.lo_iterations=2"]


def _twin(out: Path, ckpt: Path, driver_ranks: int) -> dict:
    sets = [a for s in SMALL + [f"coupler_nml.output_dir='{out}'", f"assim_nml.checkpoint='{ckpt}'"]
            for a in ("--set", s)]
    proc = lodas("twin", L96_TWIN, "--host-ranks", "2", "--coupler-ranks", str(driver_ranks), *sets, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_inline_lo_sda_is_bit_identical_on_1_and_2_driver_ranks(hosts, ckpt, tmp_path):
    """Fortran host on 2 ranks, driver on 1 or 2 (members split over the driver ranks, real mpiexec)."""
    got = {}
    for n in (1, 2):
        s = _twin(tmp_path / f"d{n}", ckpt, n)
        assert s["assim"]["status_counts"] == {"ok": 6}, s["assim"]["status_counts"]
        files = sorted((Path(s["assim"]["output_dir"]) / "increments").glob("inc_*.nc"))
        assert len(files) == 6
        got[n] = np.stack([read_increment(f, ["x"]) for f in files])
    assert np.abs(got[1]).max() > 0
    assert np.array_equal(got[1], got[2])
