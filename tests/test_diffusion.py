"""The diffusion core (coupler.assim.diffusion) against a linear-Gaussian oracle.

The oracle: latents ``z`` in R^d with ``z | cond ~ N(M cond, Sigma)``. For the VP schedule
``z_t | cond ~ N(alpha M cond, alpha^2 Sigma + sigma^2 I)``, so the exact noise predictor is
``eps(z_t, t, cond) = sigma (alpha^2 Sigma + sigma^2 I)^{-1} (z_t - alpha M cond)``. With linear
observations ``y = H z + e``, ``e ~ N(0, R)``, the exact posterior (the BLUE) is known, and the
ensemble produced by each guidance method can be compared with it.

Tolerances on the analysis mean are fractions of the background-to-analysis distance
``||x_a - mu||`` (``mu`` the prior mean, ``x_a`` the BLUE mean); the sampling error of a
2000-member mean is ~0.015 of it here, and a guidance that is off by a factor 2 (the misfit
doubled or halved) leaves at least ~0.18 (checked by :func:`test_guidance_off_by_two_fails`).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coupler.assim.diffusion import (DPS, CosineSchedule, LatentOptimization, SDAGuidance,
                                     denoising_loss, gaussian_misfit, make_guidance,
                                     member_generators, sample)

N_MEMBERS = 2000     # ensemble size of the statistical tests
N_STEPS = 30         # reverse steps of the guided tests
TOL_MEAN = 0.06      # |mean - BLUE| / |BLUE - prior mean|, isotropic problem (measured <= 0.02)
TOL_MEAN_ANISO = 0.2  # the same for the anisotropic problem (LO-SDA's lambda_t and capped SDA
#                      assume an isotropic latent prior variance; measured 0.05-0.08)
TOL_DPS = 0.3        # DPS: only "moves towards the analysis" (measured 0.07-0.16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class LinearGaussian:
    """Prior ``N(M cond, Sigma)`` in R^d, observations ``y = H z + e``, ``e ~ N(0, diag(obs_std^2))``.

    Calling it is the exact eps model (any float dtype). ``y`` is placed 2.5 prior stds from
    the prior mean in each observed quantity, so the analysis is far from the background.
    """

    def __init__(self, d: int, eig: tuple[float, float], H: np.ndarray, obs_std: float, seed: int):
        rng = np.random.default_rng(seed)
        self.d = d
        self.Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        self.lam = np.linspace(eig[0], eig[1], d)
        self.Sigma = self.Q @ np.diag(self.lam) @ self.Q.T
        self.M = 0.5 * rng.standard_normal((d, d))
        self.cond = rng.standard_normal(d)
        self.mu = self.M @ self.cond
        self.H = H
        p = H.shape[0]
        self.obs_std = np.full(p, obs_std)
        signs = np.where(np.arange(p) % 2 == 0, 1.0, -1.0)
        self.y = H @ self.mu + 2.5 * np.sqrt(np.diag(H @ self.Sigma @ H.T)) * signs
        self.xa, self.Pa = self.blue(1.0)

    def blue(self, r_factor: float) -> tuple[np.ndarray, np.ndarray]:
        """BLUE mean and covariance with ``R`` multiplied by ``r_factor``."""
        R = np.diag(self.obs_std ** 2) * r_factor
        K = self.Sigma @ self.H.T @ np.linalg.inv(self.H @ self.Sigma @ self.H.T + R)
        return self.mu + K @ (self.y - self.H @ self.mu), self.Sigma - K @ self.H @ self.Sigma

    def __call__(self, z, t, cond, schedule=CosineSchedule()):
        Q = torch.as_tensor(self.Q, dtype=z.dtype, device=z.device)
        lam = torch.as_tensor(self.lam, dtype=z.dtype, device=z.device)
        M = torch.as_tensor(self.M, dtype=z.dtype, device=z.device)
        a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        w = (z - a * (cond @ M.T)) @ Q
        return s * ((w / (a * a * lam + s * s)) @ Q.T)

    def misfit(self, scale: float = 1.0):
        H = torch.as_tensor(self.H)
        base = gaussian_misfit(torch.as_tensor(self.y), torch.as_tensor(self.obs_std),
                               lambda z: z @ H.to(z.dtype).T)
        if scale == 1.0:
            return base
        return lambda z, obs_var_scale=0.0: scale * base(z, obs_var_scale)

    def conds(self, n: int, dtype=torch.float64) -> torch.Tensor:
        return torch.as_tensor(self.cond, dtype=dtype)[None].repeat(n, 1)

    def run(self, guidance, *, n=N_MEMBERS, n_steps=N_STEPS, stochastic=True, misfit_scale=1.0,
            dtype=torch.float64, seed=1) -> np.ndarray:
        z = sample(self, self.conds(n, dtype), member_generators(seed, 0, range(n)), CosineSchedule(),
                   n_steps, guidance=guidance, misfit=self.misfit(misfit_scale), stochastic=stochastic)
        assert z.dtype == dtype and z.shape == (n, self.d)
        return z.double().numpy()

    def residual(self, z: np.ndarray) -> float:
        """|ensemble mean - BLUE mean| / |BLUE mean - prior mean|."""
        return float(np.linalg.norm(z.mean(0) - self.xa) / np.linalg.norm(self.xa - self.mu))


# Isotropic latent prior (Sigma = I), three components observed directly: the case in which
# LO-SDA's lambda_t and the capped SDA variance are exact Gaussian conditionals.
ISO = LinearGaussian(6, (1.0, 1.0), np.eye(6)[[0, 2, 4]], obs_std=0.7, seed=0)
# Anisotropic prior (eigenvalues 0.5 ... 1.5) observed through a dense random H.
ANISO = LinearGaussian(6, (0.5, 1.5), np.random.default_rng(9).standard_normal((3, 6)) / math.sqrt(6),
                       obs_std=0.7, seed=0)


def _whiten(prob: LinearGaussian, z: np.ndarray, cov: np.ndarray, mean: np.ndarray):
    L = np.linalg.cholesky(cov)
    m = np.linalg.solve(L, z.mean(0) - mean)
    W = np.linalg.solve(L, np.linalg.solve(L, np.cov(z.T)).T)
    return float(np.linalg.norm(m)), np.linalg.eigvalsh(W)


# ----------------------------------------------------------------------------------------------
# 1. schedule
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [1e-3, 0.05])
def test_schedule_identities(eta):
    sch = CosineSchedule(eta)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a, s = sch.alpha(t), sch.sigma(t)
    assert abs(float(a[0]) - 1) < 1e-15 and abs(float(s[0]) - eta) < 1e-15
    assert abs(float(a[-1]) - eta) < 1e-12 * eta and abs(float(s[-1]) - 1) < 1e-12
    assert torch.allclose(a ** 2 + s ** 2, torch.full_like(t, 1 + eta ** 2), rtol=0, atol=1e-14)
    assert bool(torch.all(a[1:] < a[:-1])) and bool(torch.all(s[1:] > s[:-1]))
    assert bool(torch.all((s / a)[1:] > (s / a)[:-1]))
    # float32: no cancellation in sigma near t = 0
    t32 = torch.tensor([1e-4, 1e-3, 1e-2, 0.5], dtype=torch.float32)
    rel = (sch.sigma(t32).double() - sch.sigma(t32.double())).abs() / sch.sigma(t32.double())
    assert float(rel.max()) < 1e-5
    g = sch.grid(7, dtype=torch.float64)
    assert g.shape == (8,) and g.dtype == torch.float64 and float(g[0]) == 1.0 and float(g[-1]) == 0.0
    assert bool(torch.all(g[1:] < g[:-1]))
    assert sch.grid(1).tolist() == [1.0, 0.0] and sch.grid(3).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# 2. linear-Gaussian oracle
# ----------------------------------------------------------------------------------------------

def test_prior_sampling_reproduces_prior_mean_and_covariance():
    """Unguided sampling of the exact model gives N(M cond, Sigma): exactly as the number of
    steps grows (deterministic DDIM, 200 steps), with the known variance deficit of a coarse
    grid (first-order sampler: ~15% at 30 steps, ~40% at 10)."""
    p = ANISO
    z = p.run(None, n=4000, n_steps=200, stochastic=False)
    err, eig = _whiten(p, z, p.Sigma, p.mu)
    assert err < 0.09, err            # whitened mean error; 4000 members: ~0.04 expected
    assert abs(eig.mean() - 1) < 0.05 and eig.min() > 0.85 and eig.max() < 1.15, eig
    z = p.run(None, n=4000, n_steps=10, stochastic=False)
    assert _whiten(p, z, p.Sigma, p.mu)[1].mean() < 0.85          # coarse grid: clear deficit
    z = p.run(None, n=N_MEMBERS, n_steps=N_STEPS, stochastic=True)
    err, eig = _whiten(p, z, p.Sigma, p.mu)
    assert err < 0.12, err
    assert 0.75 < eig.mean() < 1.0 and eig.min() > 0.65 and eig.max() < 1.1, eig


GUIDED = {
    "lo-sda-adam": lambda: LatentOptimization(iterations=30, lr=0.3, optimizer="adam"),
    "lo-sda-sgd": lambda: LatentOptimization(iterations=20, lr=0.3, optimizer="sgd"),
    "lo-sda-tweedie": lambda: LatentOptimization(iterations=1, covariance="tweedie"),
    "lo-sda-tweedie-3": lambda: LatentOptimization(iterations=3, covariance="tweedie"),
    "sda": lambda: SDAGuidance(gamma=0.3),
    "sda-capped": lambda: SDAGuidance(gamma=1.0, prior_var=1.0),
}


@pytest.mark.parametrize("name", list(GUIDED))
def test_guided_mean_approaches_blue(name):
    z = ISO.run(GUIDED[name]())
    assert np.all(np.isfinite(z))
    assert ISO.residual(z) < TOL_MEAN, ISO.residual(z)


@pytest.mark.parametrize("name", list(GUIDED))
def test_guidance_off_by_two_fails(name):
    """A guidance twice too strong or too weak (the misfit doubled or halved) is caught by
    TOL_MEAN: the tolerance is tight enough to mean something."""
    for scale in (2.0, 0.5):
        z = ISO.run(GUIDED[name](), misfit_scale=scale)
        assert ISO.residual(z) > 2 * TOL_MEAN, (scale, ISO.residual(z))


@pytest.mark.parametrize("name", ["lo-sda-adam", "lo-sda-tweedie-3", "sda-capped"])
def test_guided_mean_anisotropic_prior(name):
    z = ANISO.run(GUIDED[name]())
    assert ANISO.residual(z) < TOL_MEAN_ANISO, ANISO.residual(z)


@pytest.mark.parametrize("prior_weight", [1.0, 0.5])
def test_tweedie_step_is_the_exact_conditional_analysis(prior_weight):
    """One reverse step of the Tweedie LO solves J_t(z) = misfit(z) + w/2 (z - z0_hat)^T C_t^-1
    (z - z0_hat) by conjugate gradients in the C_t metric. With the exact eps model,
    C_t = (Sigma^-1 + (alpha/sigma)^2 I)^-1 and the minimiser is the Kalman update of z0_hat
    with covariance C_t / w. The increment lies in the 3-dimensional span of C_t H^T, so 3
    iterations are exact (to 1e-6 of the increment: the misfit curvature is a difference of
    misfits, 2e-8 measured); one is the steepest-descent step along SDA's
    direction, off by more than 10% on this anisotropic prior and dense H."""
    p, sch = ANISO, CosineSchedule()
    t = 0.5
    a, s = (float(v) for v in (sch.alpha(torch.tensor(t)), sch.sigma(torch.tensor(t))))
    n = 4
    cond = p.conds(n)
    z_t = a * cond @ torch.as_tensor(p.M).T + torch.randn(n, p.d, generator=torch.Generator().manual_seed(3),
                                                           dtype=torch.float64)
    tb = torch.full((n,), t, dtype=torch.float64)
    denoiser = lambda x: p(x, tb, cond)
    z0_hat = ((z_t - s * denoiser(z_t)) / a).numpy()
    C = np.linalg.inv(np.linalg.inv(p.Sigma) + (a / s) ** 2 * np.eye(p.d)) / prior_weight
    K = C @ p.H.T @ np.linalg.inv(p.H @ C @ p.H.T + np.diag(p.obs_std ** 2))
    exact = z0_hat + (p.y[None] - z0_hat @ p.H.T) @ K.T
    dist = np.linalg.norm(exact - z0_hat, axis=1)
    err = {}
    for its in (1, 3, 5):
        g = LatentOptimization(iterations=its, covariance="tweedie", prior_weight=prior_weight)
        z = g.guide(denoiser, z_t, a, s, p.misfit()).z0.numpy()
        err[its] = float(np.max(np.linalg.norm(z - exact, axis=1) / dist))
    assert err[3] < 1e-6 and err[5] < 1e-6, err
    assert err[1] > 0.1, err


@pytest.mark.parametrize("prob", [ISO, ANISO], ids=["iso", "aniso"])
def test_dps_moves_mean_towards_analysis(prob):
    """DPS with Chung et al.'s normalised step; zeta ~ 3 / n_steps suits this problem."""
    z = prob.run(DPS(zeta=0.1))
    assert np.all(np.isfinite(z))
    assert prob.residual(z) < TOL_DPS, prob.residual(z)


def test_float32_sampling():
    z32 = ISO.run(GUIDED["lo-sda-adam"](), n=500, dtype=torch.float32)
    assert np.all(np.isfinite(z32))
    assert ISO.residual(z32) < 0.1, ISO.residual(z32)     # 500 members: sampling error ~0.03


@pytest.mark.parametrize("stochastic", [True, False], ids=["ddpm", "ddim"])
def test_no_observations_is_prior_sampling(stochastic):
    """With no observations every guidance leaves the prior sample unchanged."""
    mis = gaussian_misfit(torch.zeros(0), torch.ones(0), lambda z: z[:, :0])
    cond, sch = ANISO.conds(6), CosineSchedule()
    prior = sample(ANISO, cond, member_generators(2, 1, range(6)), sch, 8, stochastic=stochastic)
    for g in (LatentOptimization(), LatentOptimization(optimizer="sgd"), DPS(), SDAGuidance()):
        z = sample(ANISO, cond, member_generators(2, 1, range(6)), sch, 8, guidance=g, misfit=mis,
                   stochastic=stochastic)
        torch.testing.assert_close(z, prior, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 3. determinism and batching
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stochastic", [True, False], ids=["ddpm", "ddim"])
@pytest.mark.parametrize("method", ["none", "lo-sda", "dps", "sda"])
def test_same_seeds_same_samples_whatever_the_batching(method, stochastic):
    g = {"none": None, "lo-sda": LatentOptimization(), "dps": DPS(0.1), "sda": SDAGuidance(0.3)}[method]
    sch, mis = CosineSchedule(), ANISO.misfit()

    def run(members, cycle=4):
        return sample(ANISO, ANISO.conds(len(members)), member_generators(11, cycle, members), sch, 12,
                      guidance=g, misfit=mis, stochastic=stochastic)

    whole = run(list(range(8)))
    assert torch.equal(whole, run(list(range(8))))                       # reproducible, bitwise
    halves = torch.cat([run([0, 1, 2, 3]), run([4, 5, 6, 7])])
    # bitwise on this CPU; allow BLAS reassociation across batch sizes elsewhere
    torch.testing.assert_close(halves, whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(run([5]), whole[5:6], rtol=0, atol=1e-10)  # gemv vs gemm: ~1e-15
    torch.testing.assert_close(run([6, 2]), whole[[6, 2]], rtol=0, atol=1e-10)
    assert not torch.allclose(run(list(range(8)), cycle=5), whole)       # another cycle, other noise
    assert not torch.allclose(whole[0], whole[1])                         # members differ


def test_member_generators_streams():
    a = member_generators(3, 2, [0, 1, 7])
    b = member_generators(3, 2, [7, 0])
    draw = lambda g: torch.randn(5, generator=g, dtype=torch.float64)
    da, db = [draw(g) for g in a], [draw(g) for g in b]
    assert torch.equal(da[2], db[0]) and torch.equal(da[0], db[1])
    assert not torch.equal(da[0], da[1])
    assert not torch.equal(draw(member_generators(3, 3, [0])[0]), da[0])  # cycle matters
    assert not torch.equal(draw(member_generators(4, 2, [0])[0]), da[0])  # seed matters


# ----------------------------------------------------------------------------------------------
# 4. training loss
# ----------------------------------------------------------------------------------------------

def _loss_floor(prob: LinearGaussian, sch: CosineSchedule) -> float:
    """E_t tr Cov(eps | z_t) = E_t sum_i alpha^2 l_i / (alpha^2 l_i + sigma^2), t ~ U(0, 1)."""
    x, w = np.polynomial.legendre.leggauss(400)
    t = torch.as_tensor(0.5 * (x + 1))
    a2, s2 = (sch.alpha(t) ** 2).numpy()[:, None], (sch.sigma(t) ** 2).numpy()[:, None]
    return float(0.5 * w @ (a2 * prob.lam / (a2 * prob.lam + s2)).sum(1))


def test_denoising_loss_floor_and_gradients():
    sch = CosineSchedule()
    prob = LinearGaussian(6, (0.01, 0.05), np.eye(6)[:2], obs_std=1.0, seed=3)   # a sharp p(z | cond)
    B = 20000
    rng = np.random.default_rng(0)
    cond = torch.as_tensor(rng.standard_normal((B, 6)))
    z0 = cond @ torch.as_tensor(prob.M).T + torch.as_tensor(
        rng.standard_normal((B, 6)) @ np.linalg.cholesky(prob.Sigma).T)
    gen = lambda: torch.Generator().manual_seed(5)
    floor = _loss_floor(prob, sch)
    exact = float(denoising_loss(prob, z0, cond, sch, gen()))
    assert float(denoising_loss(prob, z0, cond, sch, gen())) == exact      # generator -> reproducible
    assert abs(exact - floor) < 0.05 * floor, (exact, floor)               # ~0.3 of the naive 6
    # wrong models, same noise: zero prediction, wrong conditional mean, wrong covariance
    zero = float(denoising_loss(lambda z, t, c: torch.zeros_like(z), z0, cond, sch, gen()))
    shifted = float(denoising_loss(lambda z, t, c: prob(z, t, c + 0.3), z0, cond, sch, gen()))
    wide = LinearGaussian(6, (0.04, 0.2), np.eye(6)[:2], obs_std=1.0, seed=3)
    widened = float(denoising_loss(wide, z0, cond, sch, gen()))
    assert abs(zero - 6) < 0.1 and zero > 5 * exact
    assert shifted > exact + 0.2 and widened > exact + 0.05, (exact, shifted, widened)

    # a Dirac p(z | cond) at z = cond: the exact model has zero loss (checks alpha and sigma)
    dirac = lambda z, t, c: (z - sch.alpha(t)[:, None] * c) / sch.sigma(t)[:, None]
    assert float(denoising_loss(dirac, cond[:1000], cond[:1000], sch, gen())) < 1e-20

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(13, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6))
    model = lambda z, t, c: net(torch.cat([z, t[:, None], c], 1))
    loss = denoising_loss(model, z0[:64].float(), cond[:64].float(), sch, torch.Generator().manual_seed(1))
    assert loss.ndim == 0
    loss.backward()
    for p in net.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------------------------
# 5. bad arguments
# ----------------------------------------------------------------------------------------------

def test_bad_arguments():
    sch, mis = CosineSchedule(), ISO.misfit()
    cond, gens = ISO.conds(2), member_generators(0, 0, [0, 1])
    for eta in (0.0, 1.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="eta"):
            CosineSchedule(eta)
    with pytest.raises(ValueError, match="n_steps"):
        sch.grid(0)
    with pytest.raises(ValueError, match="n_steps"):
        sample(ISO, cond, gens, sch, 0)
    with pytest.raises(ValueError, match="n_steps"):
        sample(ISO, cond, gens, sch, 2.5)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sample(ISO, cond, member_generators(0, 0, [0, 1, 2]), sch, 3)
    with pytest.raises(ValueError, match="needs a misfit"):
        sample(ISO, cond, gens, sch, 3, guidance=DPS())
    with pytest.raises(ValueError, match="guide"):
        sample(ISO, cond, gens, sch, 3, guidance="lo-sda", misfit=mis)
    with pytest.raises(ValueError, match="eps_model returned"):
        sample(lambda z, t, c: z[:, :3], cond, gens, sch, 3)
    with pytest.raises(ValueError, match="float32 or float64"):
        sample(ISO, cond.long(), gens, sch, 3)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        sample(ISO, cond, gens, sch, 3, guidance=SDAGuidance(), misfit=lambda z, s=0.0: z.sum())
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        sample(ISO, cond, gens, sch, 3, guidance=DPS(), misfit=mis)
    with torch.inference_mode():
        cond_inf = ISO.conds(2)
    assert sample(ISO, cond_inf, gens, sch, 3, guidance=SDAGuidance(), misfit=mis).shape == (2, 6)
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        LatentOptimization(optimizer="lbfgs")
    with pytest.raises(ValueError, match="iterations"):
        LatentOptimization(iterations=0)
    for kw in ({"lr": 0.0}, {"prior_weight": -1.0}, {"prior_var": float("inf")}):
        with pytest.raises(ValueError, match=list(kw)[0]):
            LatentOptimization(**kw)
    with pytest.raises(ValueError, match="zeta"):
        DPS(zeta=-1)
    with pytest.raises(ValueError, match="gamma"):
        SDAGuidance(gamma=0)
    with pytest.raises(ValueError, match="unknown guidance method 'ddpm'"):
        make_guidance("ddpm")
    with pytest.raises(ValueError, match="guidance 'dps'"):
        make_guidance("dps", gamma=1.0)
    assert make_guidance("none") is None and isinstance(make_guidance("sda", gamma=0.5), SDAGuidance)
    with pytest.raises(ValueError, match="seed"):
        member_generators(-1, 0, [0])
    with pytest.raises(ValueError, match="distinct"):
        member_generators(0, 0, [1, 1])
    with pytest.raises(ValueError, match="shape"):
        gaussian_misfit(torch.zeros(3), torch.ones(2), lambda z: z)
    with pytest.raises(ValueError, match="std"):
        gaussian_misfit(torch.zeros(2), torch.tensor([1.0, 0.0]), lambda z: z)
    with pytest.raises(ValueError, match="forward returned"):
        gaussian_misfit(torch.zeros(2), torch.ones(2), lambda z: z)(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="batch size"):
        denoising_loss(ISO, torch.zeros(4, 6), torch.zeros(3, 6), sch)
