r"""The diffusion core of latent score-based data assimilation (LO-SDA), in pure torch.

A noise-prediction (``eps``) network learns the conditional distribution ``p(z | z_b)`` of the
**analysis latent** ``z`` given the **background latent** ``z_b`` (``cond``, same shape as
``z``). Sampling runs the reverse diffusion from pure noise to ``z``; **guidance** pulls each
ensemble member towards the observations ``y`` through a differentiable misfit (the
observation term of the variational cost, see :class:`Misfit`). No MPI, no file I/O.

Forward (noising) process, variance preserving, time ``t`` in ``[0, 1]`` (dimensionless):

    z_t = alpha_t z + sigma_t eps,        eps ~ N(0, I),

with SDA's cosine schedule (Rozet & Louppe 2023), ``eta`` a small floor:

    alpha_t = cos(arccos(sqrt(eta)) t)^2,     sigma_t = sqrt(1 - alpha_t^2 + eta^2),

so ``alpha_0 = 1, sigma_0 = eta`` (clean) and ``alpha_1 = eta, sigma_1 = 1`` (noise), and
``alpha_t^2 + sigma_t^2 = 1 + eta^2`` at every ``t``.

The network ``eps_model(z_t, t, cond) ~ E[eps | z_t, cond]`` (shapes ``(B, *S), (B,), (B, *S)
-> (B, *S)``) is equivalent to the score, ``grad log p_t(z_t | cond) = -eps / sigma_t``, and
gives Tweedie's denoised estimate (the posterior mean of the clean latent given ``z_t``)

    z0_hat(z_t) = E[z | z_t] = (z_t - sigma_t eps_hat) / alpha_t.

Reverse step ``t -> s < t`` (DDIM, Song et al. 2021, written for a general ``alpha, sigma``):

    z_s = alpha_s z0 + sqrt(sigma_s^2 - c^2) (z_t - alpha_t z0) / sigma_t + c xi,   xi ~ N(0, I),
    c = sigma_s sqrt(1 - r^2),   r = (alpha_t sigma_s) / (alpha_s sigma_t)       (stochastic)
    c = 0                                                                     (deterministic)

With ``z0`` the true clean latent and ``c`` as above this is exactly the DDPM posterior
``q(z_s | z_t, z0)`` (ancestral sampling, "eta = 1"): mean ``(alpha_t sigma_s^2) / (alpha_s
sigma_t^2) z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 z0``, variance ``sigma_{t|s}^2 sigma_s^2 /
sigma_t^2``, ``sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2``. ``c = 0`` is the
deterministic DDIM (probability-flow) step. The sampler uses the (guided) estimate for ``z0``.

Guidance (one object per method, one call per reverse step, see :class:`Guidance`):

* :class:`LatentOptimization` (``'lo-sda'``): optimise the Tweedie estimate against the
  observations under a noise-level-aware proximal term, then re-noise.
* :class:`DPS` (``'dps'``, Chung et al. 2023): one normalised gradient step on ``z_t``
  through the Tweedie estimate.
* :class:`SDAGuidance` (``'sda'``, Rozet & Louppe 2023): Gaussian approximation of the
  likelihood ``p(y | z_t)`` added to the score.
* ``None``: prior sampling of ``p(z | z_b)``.

Randomness: each ensemble member draws from its own ``torch.Generator``
(:func:`member_generators`), one draw of shape ``S`` per use, so a member's noise (hence, up to
floating-point reassociation in batched kernels, its sample) does not depend on which rank or
batch computes it.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CosineSchedule", "denoising_loss", "member_generators", "Misfit", "gaussian_misfit",
    "Guidance", "GuidedEstimate", "LatentOptimization", "DPS", "SDAGuidance", "make_guidance",
    "GUIDANCE_METHODS", "sample",
]

GUIDANCE_METHODS = ("none", "lo-sda", "dps", "sda")
OPTIMIZERS = ("adam", "sgd")


def _positive(name: str, value, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    ok = v >= 0 if allow_zero else v > 0
    if not (ok and math.isfinite(v)):
        raise ValueError(f"{name}: expected a finite number {'>= 0' if allow_zero else '> 0'}, "
                         f"got {value!r}")
    return v


def _int_at_least(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {lo}, got {value!r}")
    if value < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {value}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Noise schedule
# ---------------------------------------------------------------------------------------------

class CosineSchedule:
    r"""SDA's variance-preserving cosine schedule (dimensionless, ``t`` in ``[0, 1]``).

    ``alpha(t) = cos(theta t)^2`` with ``theta = arccos(sqrt(eta))``, and
    ``sigma(t) = sqrt(1 - alpha^2 + eta^2)``, computed as ``sqrt(sin^2(theta t) (1 +
    cos^2(theta t)) + eta^2)`` (the same number without the cancellation of ``1 - alpha^2``
    near ``t = 0`` in float32). Exact identities: ``alpha(0) = 1``, ``sigma(0) = eta``,
    ``alpha(1) = eta``, ``sigma(1) = 1``, ``alpha^2 + sigma^2 = 1 + eta^2``; ``alpha`` decreases
    and ``sigma`` and the noise-to-signal ratio ``sigma/alpha`` increase with ``t``.

    Args:
        eta: the floor, in ``(0, 1)``: the noise std of ``z_0`` and the signal level of ``z_1``.
    """

    def __init__(self, eta: float = 1e-3):
        eta = _positive("CosineSchedule eta", eta)
        if not eta < 1:
            raise ValueError(f"CosineSchedule eta: expected 0 < eta < 1, got {eta!r}")
        self.eta = eta
        self.theta = math.acos(math.sqrt(eta))

    def __repr__(self) -> str:
        return f"CosineSchedule(eta={self.eta!r})"

    def alpha(self, t: Tensor) -> Tensor:
        """Signal coefficient ``alpha(t)`` (same shape, dtype and device as ``t``)."""
        t = torch.as_tensor(t)
        return torch.cos(self.theta * t) ** 2

    def sigma(self, t: Tensor) -> Tensor:
        """Noise std ``sigma(t)`` (same shape, dtype and device as ``t``)."""
        t = torch.as_tensor(t)
        c2 = torch.cos(self.theta * t) ** 2
        s2 = torch.sin(self.theta * t) ** 2
        return torch.sqrt(s2 * (1 + c2) + self.eta ** 2)

    def grid(self, n_steps: int, *, device=None, dtype=torch.float32) -> Tensor:
        """``n_steps + 1`` equally spaced times from exactly 1 down to exactly 0."""
        n_steps = _int_at_least("n_steps", n_steps, 1)
        return torch.linspace(1.0, 0.0, n_steps + 1, device=device, dtype=dtype)

    def _coeffs(self, t: float) -> tuple[float, float]:
        """``(alpha, sigma)`` at a scalar time, in float64 Python floats (sampler arithmetic)."""
        tt = torch.tensor(float(t), dtype=torch.float64)
        return float(self.alpha(tt)), float(self.sigma(tt))


# ---------------------------------------------------------------------------------------------
# Training loss
# ---------------------------------------------------------------------------------------------

def denoising_loss(eps_model, z0: Tensor, cond: Tensor, schedule: CosineSchedule,
                   generator: torch.Generator | None = None) -> Tensor:
    r"""Denoising score-matching loss (noise prediction), a 0-d tensor to minimise.

    For each sample ``i``: ``t_i ~ U(0, 1)``, ``eps_i ~ N(0, I)``, ``z_t = alpha(t_i) z0_i +
    sigma(t_i) eps_i``; the loss is the batch mean of ``||eps_model(z_t, t, cond)_i - eps_i||^2``
    (sum over the latent dimensions). Its minimiser is ``E[eps | z_t, cond]``; even that
    leaves an irreducible floor ``E_t tr Cov(eps | z_t, cond)``.

    Args:
        eps_model: ``(z_t (B, *S), t (B,), cond (B, *C)) -> (B, *S)``.
        z0: clean (analysis) latents ``(B, *S)``.
        cond: conditioning (background latents) ``(B, *C)``, same ``B``.
        schedule: the noise schedule.
        generator: draws ``t`` and ``eps`` (on ``z0``'s device) when given, else the global RNG.
    """
    if not isinstance(z0, Tensor) or not isinstance(cond, Tensor):
        raise ValueError("denoising_loss: z0 and cond must be torch tensors")
    if z0.ndim < 2 or cond.ndim < 1 or z0.shape[0] != cond.shape[0]:
        raise ValueError(f"denoising_loss: z0 (B, *S) and cond (B, *C) need the same batch size "
                         f"B >= 1 and S non-empty, got {tuple(z0.shape)} and {tuple(cond.shape)}")
    if not z0.is_floating_point():
        raise ValueError(f"denoising_loss: z0 must be floating point, got {z0.dtype}")
    B = z0.shape[0]
    t = torch.rand(B, generator=generator, device=z0.device, dtype=z0.dtype)
    eps = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
    shape = (B,) + (1,) * (z0.ndim - 1)
    z_t = schedule.alpha(t).reshape(shape) * z0 + schedule.sigma(t).reshape(shape) * eps
    pred = eps_model(z_t, t, cond)
    if pred.shape != z0.shape:
        raise ValueError(f"denoising_loss: eps_model returned shape {tuple(pred.shape)}, "
                         f"expected {tuple(z0.shape)}")
    return ((pred - eps) ** 2).reshape(B, -1).sum(1).mean()


# ---------------------------------------------------------------------------------------------
# Per-member random streams
# ---------------------------------------------------------------------------------------------

def member_generators(seed: int, cycle: int, members: Sequence[int], device="cpu"
                      ) -> list[torch.Generator]:
    """One ``torch.Generator`` per ensemble member, seeded from
    ``numpy.random.SeedSequence([seed, cycle, member])`` (64-bit state), so member ``m`` of
    cycle ``c`` gets the same stream whichever rank, batch or position computes it.

    Args:
        seed: experiment seed, integer >= 0.
        cycle: 0-based analysis cycle, integer >= 0.
        members: the member indices (integers >= 0, distinct) this call computes.
        device: device of the generators (the sampler draws on it and moves the draws).
    """
    seed = _int_at_least("seed", seed, 0)
    cycle = _int_at_least("cycle", cycle, 0)
    members = list(members)
    for m in members:
        _int_at_least("member index", m, 0)
    if len(set(int(m) for m in members)) != len(members):
        raise ValueError(f"members: indices must be distinct, got {members}")
    gens = []
    for m in members:
        state = np.random.SeedSequence([seed, cycle, int(m)]).generate_state(1, dtype=np.uint64)[0]
        g = torch.Generator(device=device)
        g.manual_seed(int(state))
        gens.append(g)
    return gens


def _draw(generators: Sequence[torch.Generator], shape, dtype, device) -> Tensor:
    """One standard-normal draw of ``shape`` per member from its own generator, stacked."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype, device=g.device)
                        for g in generators]).to(device)


# ---------------------------------------------------------------------------------------------
# Observation misfit
# ---------------------------------------------------------------------------------------------

class Misfit(Protocol):
    r"""Observation term of the cost, per ensemble member, differentiable w.r.t. ``z0``.

    ``misfit(z0, obs_var_scale) = 1/2 sum_k (y_k - h_k(z0))^2 / (sigma_o,k^2 + obs_var_scale)``

    with ``z0`` the latents ``(B, *S)``, ``h`` the forward operator (in lodas: observation
    operator of the decoded state, ``H(decode(z0))``), ``y`` the observations and
    ``sigma_o`` the observation-error stds (in the observed units); returns ``(B,)``
    (dimensionless: ``-log p(y | z0)`` up to a constant). ``obs_var_scale`` (a scalar in
    squared observed units, default 0) is added to every observation-error variance: SDA uses
    it for its ``gamma (sigma_t/alpha_t)^2`` term, the other methods call it with 0.
    """

    def __call__(self, z0: Tensor, obs_var_scale: Tensor | float = 0.0) -> Tensor:
        ...


def gaussian_misfit(y: Tensor, obs_std: Tensor, forward: Callable[[Tensor], Tensor]) -> Misfit:
    """The :class:`Misfit` of ``p`` observations with independent Gaussian errors.

    Args:
        y: observations ``(p,)``.
        obs_std: observation-error stds ``(p,)``, > 0, same units as ``y``.
        forward: ``(B, *S) -> (B, p)``, the model equivalent of the observations.

    The returned callable moves ``y`` and ``obs_std`` to the dtype and device of ``z0``.
    """
    y = torch.as_tensor(y)
    obs_std = torch.as_tensor(obs_std)
    if y.ndim != 1 or obs_std.shape != y.shape:
        raise ValueError(f"gaussian_misfit: y and obs_std must both have shape (p,), got "
                         f"{tuple(y.shape)} and {tuple(obs_std.shape)}")
    if not bool(torch.all(torch.isfinite(y))):
        raise ValueError("gaussian_misfit: y has non-finite values")
    if y.numel() and not bool(torch.all(obs_std > 0) & torch.all(torch.isfinite(obs_std))):
        raise ValueError("gaussian_misfit: every observation-error std must be finite and > 0")
    if not callable(forward):
        raise ValueError(f"gaussian_misfit: forward must be callable, got {forward!r}")
    p = y.shape[0]

    def misfit(z0: Tensor, obs_var_scale: Tensor | float = 0.0) -> Tensor:
        hz = forward(z0)
        if hz.ndim != 2 or hz.shape != (z0.shape[0], p):
            raise ValueError(f"gaussian_misfit: forward returned shape {tuple(hz.shape)}, "
                             f"expected {(z0.shape[0], p)}")
        yy = y.to(dtype=hz.dtype, device=hz.device)
        var = obs_std.to(dtype=hz.dtype, device=hz.device) ** 2
        scale = torch.as_tensor(obs_var_scale, dtype=hz.dtype, device=hz.device)
        if scale.numel() != 1:
            raise ValueError(f"misfit: obs_var_scale must be a scalar, got shape {tuple(scale.shape)}")
        return 0.5 * ((yy - hz) ** 2 / (var + scale)).sum(-1)

    return misfit


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------

class GuidedEstimate(NamedTuple):
    """What a guidance step hands back to the sampler.

    Attributes:
        z0: the (guided) estimate of the clean analysis latent ``(B, *S)`` used in the reverse
            step (for no guidance: Tweedie's ``z0_hat``).
        shift: subtracted from ``z_s`` after the step (DPS's gradient step), or ``None``.
    """

    z0: Tensor
    shift: Tensor | None = None


class Guidance(Protocol):
    r"""One guidance method: the sampler calls ``guide`` once per reverse step ``t -> s``.

    ``guide(denoiser, z_t, alpha_t, sigma_t, misfit) -> GuidedEstimate`` with

    * ``denoiser(z) -> eps_hat``: the eps network at the current time and conditioning
      (``(B, *S) -> (B, *S)``); differentiable when called under ``torch.enable_grad()``;
    * ``z_t`` ``(B, *S)``, detached, the current noisy latents;
    * ``alpha_t, sigma_t``: Python floats, the schedule at the current time;
    * ``misfit``: the :class:`Misfit`.

    It runs inside ``torch.no_grad()`` and enables gradients itself where it needs them.
    """

    def guide(self, denoiser: Callable[[Tensor], Tensor], z_t: Tensor, alpha_t: float,
              sigma_t: float, misfit: Misfit) -> GuidedEstimate:
        ...


def _member_sum(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(1)


def _per_member(v: Tensor, like: Tensor) -> Tensor:
    """A per-member ``(B,)`` tensor shaped ``(B, 1, ..., 1)`` to broadcast against ``like``."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _member_norm(x: Tensor) -> Tensor:
    """Per-member 2-norm, shaped ``(B, 1, ..., 1)`` to broadcast against ``x``."""
    return _per_member(x.reshape(x.shape[0], -1).norm(dim=1), x)


def _call_misfit(misfit: Misfit, z0: Tensor, obs_var_scale: float = 0.0) -> Tensor:
    j = misfit(z0, obs_var_scale)
    if not isinstance(j, Tensor) or j.shape != (z0.shape[0],):
        raise ValueError(f"misfit must return a tensor of shape (B,) = ({z0.shape[0]},), got "
                         f"{getattr(j, 'shape', type(j))}")
    return j


def _grad(j: Tensor, x: Tensor) -> Tensor:
    """``d sum(j) / d x`` (zero when ``j`` does not depend on ``x``, e.g. no observations)."""
    if not j.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(j.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


class LatentOptimization:
    r"""LO-SDA: latent optimisation of the Tweedie estimate at every reverse step.

    At time ``t`` with ``z0_hat = (z_t - sigma_t eps_hat) / alpha_t`` the analysis estimate is
    the (approximate) minimiser of

        J_t(z) = misfit(z) + 1/2 lambda_t ||z - z0_hat||^2,

    a 3D-Var whose background is ``z0_hat`` and whose background-error covariance is
    ``v_t I / prior_weight``, with ``v_t`` the variance of the clean latent given ``z_t``.
    For a latent prior ``N(m, prior_var I)`` that variance is exact in closed form:
    ``1 / v_t = 1 / prior_var + alpha_t^2 / sigma_t^2``, i.e.

        lambda_t = prior_weight / v_t = prior_weight (1/prior_var + (alpha_t / sigma_t)^2).

    It follows the noise level: ``lambda_t ~ prior_weight (alpha_t/sigma_t)^2`` at small ``t``
    (the denoised estimate is sharp, the observations may only move it by ~``sigma_t/alpha_t``)
    and ``lambda_t -> prior_weight / prior_var`` at large ``t`` (the estimate is no better
    than the prior: the observations dominate). It is the smooth (harmonic) version of
    ``prior_weight / min(prior_var, (sigma_t/alpha_t)^2)``. With a linear forward operator the
    exact minimiser is the Kalman update of ``z0_hat`` with gain
    ``v H^T (H v H^T + R)^{-1}`` (``v = v_t/prior_weight``).

    The optimiser works in the preconditioned variable ``u = sqrt(lambda_t) (z - z0_hat)``
    (``J_t = misfit(z0_hat + u / sqrt(lambda_t)) + 1/2 ||u||^2``, the same minimiser), started
    at ``u = 0``, so ``lr`` means the same thing at every noise level: a step in units of the
    proximal std ``lambda_t^{-1/2}``. Both optimisers are element-wise, so members stay
    independent (no line search, no L-BFGS). ``sgd``: ``u <- u - lr grad``; ``adam``: Adam with
    ``(0.9, 0.999)`` and ``1e-8``, bias-corrected (its first step is ``lr`` per component).

    Convergence matters (tests/test_diffusion.py, linear-Gaussian, 30 steps, innovations of
    2.5 background stds): the defaults ``adam`` x 3 at ``lr = 0.1`` move at most 0.3
    proximal std per reverse step and leave ~70% of the background-to-analysis distance;
    ``adam`` x 30 at 0.3 or ``sgd`` x 20 at 0.3 leave ~1-2%. ``sgd`` is stable only for
    ``lr < 2 / (1 + ||h'^T R^{-1} h'|| / lambda_t)`` (it diverges for accurate observations);
    ``adam`` is not limited that way.

    **Tweedie covariance** (``covariance = 'tweedie'``): the isotropic ``v_t I`` knows nothing of
    what the prior has learnt about the background's errors, so the increment it allows is
    shaped by the observation operator alone (a latent 3D-Var with ``B = v I``). The exact
    covariance of the clean latent given ``z_t`` is Tweedie's second moment,

        C_t = Cov[z | z_t] = (sigma_t^2 / alpha_t) d z0_hat / d z_t,

    the learnt, background-dependent covariance of the prior at this noise level. With it

        J_t(z) = misfit(z) + prior_weight/2 (z - z0_hat)^T C_t^{-1} (z - z0_hat)

    minimised by preconditioned conjugate gradients (Fletcher-Reeves in the ``C_t`` metric) with
    an exact line search, in ``u = z - z0_hat`` (tracking ``w = C_t^{-1} u`` and
    ``q = C_t^{-1} p``, so that ``C_t`` is never inverted):

        r = -(grad misfit(z0_hat + u) + w),     s = C_t r,
        p = s + beta p_prev,   q = r + beta q_prev,   beta = r.s / (r.s)_prev   (0 at the first),
        step = r.p / (p.q + p^T G^T R^{-1} G p),     u <- u + step p,   w <- w + step q,

    per member, with the curvature ``p^T G^T R^{-1} G p`` (``G`` the observed decoder Jacobian)
    from one more misfit evaluation, ``2 (misfit(z + p) - misfit(z) - p.g)`` (exact for a linear
    observed decoder). ``C_t r`` is one vector-Jacobian product through the eps network
    (``d z0_hat / d z_t`` is the Hessian of a log-density, symmetric up to the network's error).
    The first iteration moves along SDA's direction ``-C_t grad misfit`` (Rozet & Louppe's update
    without their inflation of ``R``), by the step that minimises ``J_t`` along it instead of a
    tuned one; more iterations converge to the minimiser, the Gauss-Newton MAP of the nonlinear
    decoder under ``N(z0_hat, C_t)`` (the Kalman update of ``z0_hat`` for a linear one: exactly
    after as many iterations as the increment has independent directions, ``rank(C_t G^T)`` at
    most, where steepest descent only converges geometrically); no step size to tune (``lr``
    and ``optimizer`` are not used). ``C_t r`` is capped at ``prior_var/prior_weight * ||r||``
    per member: at large noise ``C_t`` is the difference of nearly equal terms divided by
    ``alpha_t^2``, and the network's error in it is not bounded. A member whose direction does
    not descend (a learnt ``C_t`` need not be positive definite) restarts with ``beta = 0``.
    Same cost per iteration as steepest descent (one misfit gradient, one VJP, one misfit).

    Args:
        iterations: optimiser iterations per reverse step, >= 1.
        lr: step size (dimensionless, see above), > 0 (``covariance = 'isotropic'`` only).
        optimizer: ``'adam'`` or ``'sgd'`` (``covariance = 'isotropic'`` only).
        prior_weight: multiplies ``lambda_t`` (> 1 trusts the diffusion prior more), > 0.
        prior_var: the latent prior variance assumed in ``v_t`` (1 for standardised latents).
        covariance: ``'isotropic'`` (``v_t I``) or ``'tweedie'`` (``C_t``, see above).
    """

    name = "lo-sda"

    def __init__(self, iterations: int = 3, lr: float = 0.1, optimizer: str = "adam",
                 prior_weight: float = 1.0, prior_var: float = 1.0, covariance: str = "isotropic"):
        if covariance not in ("isotropic", "tweedie"):
            raise ValueError(f"LatentOptimization covariance: {covariance!r}; expected 'isotropic' or 'tweedie'")
        self.covariance = covariance
        self.iterations = _int_at_least("LatentOptimization iterations", iterations, 1)
        self.lr = _positive("LatentOptimization lr", lr)
        if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"LatentOptimization optimizer: unknown optimizer {optimizer!r}; "
                             f"expected one of {OPTIMIZERS} (member-independent element-wise "
                             "optimisers only: no L-BFGS, its line search couples members)")
        self.optimizer = optimizer.lower()
        self.prior_weight = _positive("LatentOptimization prior_weight", prior_weight)
        self.prior_var = _positive("LatentOptimization prior_var", prior_var)

    def __repr__(self) -> str:
        return (f"LatentOptimization(iterations={self.iterations}, lr={self.lr}, "
                f"optimizer={self.optimizer!r}, prior_weight={self.prior_weight}, "
                f"prior_var={self.prior_var}, covariance={self.covariance!r})")

    def weight(self, alpha_t: float, sigma_t: float) -> float:
        """``lambda_t = prior_weight (1/prior_var + (alpha_t/sigma_t)^2)``."""
        return self.prior_weight * (1.0 / self.prior_var + (alpha_t / sigma_t) ** 2)

    def _guide_tweedie(self, denoiser, z_t, alpha_t, sigma_t, misfit) -> GuidedEstimate:
        c = sigma_t ** 2 / alpha_t / self.prior_weight
        cap = self.prior_var / self.prior_weight
        with torch.enable_grad():
            zt = z_t.detach().requires_grad_(True)
            z0_graph = (zt - sigma_t * denoiser(zt)) / alpha_t
        z0_hat = z0_graph.detach()
        u = torch.zeros_like(z0_hat)            # z - z0_hat
        w = torch.zeros_like(z0_hat)            # C^{-1} u
        p = q = rs_old = None                   # search direction, C^{-1} p, previous r.s
        for k in range(self.iterations):
            with torch.enable_grad():
                z = (z0_hat + u).requires_grad_(True)
                j = _call_misfit(misfit, z)
                g = _grad(j, z)
                r = -(g + w)                                           # -grad J, J = misfit + 1/2 u^T C^-1 u
                (s,) = torch.autograd.grad(z0_graph, zt, r, retain_graph=k + 1 < self.iterations)
            s = c * s                                                  # C r: the preconditioned residual
            # Cov[z | z_t] <= Cov[z] = prior_var I: at large noise C_t is the difference of nearly equal
            # terms divided by alpha_t^2, and the network's error in it is not bounded: where C r is
            # longer than cap ||r|| the member's covariance is taken as kappa C (kappa < 1), so that
            # s = kappa C r and its C^{-1} s is still r
            s = s * (cap * _member_norm(r) / _member_norm(s).clamp_min(1e-30)).clamp(max=1.0)
            rs = _member_sum(r * s)
            # a learnt C_t need not be positive definite: where r.s <= 0 it does not precondition;
            # that member takes the isotropic direction cap * r instead (C = cap I there) and restarts
            # its conjugate directions. Either way C^{-1} s = r
            bad = ~(rs > 1e-12 * cap * _member_sum(r * r))
            if bool(bad.any()):
                s = torch.where(_per_member(bad, s), cap * r, s)
                rs = _member_sum(r * s)
            if p is None:
                p, q = s, r
            else:
                # Fletcher-Reeves in the C metric, restarted (beta = 0) for a member whose
                # direction would not descend or that fell back to the isotropic direction
                beta = rs / rs_old.clamp_min(1e-30)
                pc, qc = s + _per_member(beta, s) * p, r + _per_member(beta, r) * q
                keep = _per_member(~bad & (_member_sum(r * pc) > 0), s)
                p, q = torch.where(keep, pc, s), torch.where(keep, qc, r)
            rp, pq = _member_sum(r * p), _member_sum(p * q)            # -dJ/da and the prior curvature p^T C^-1 p
            # curvature of the misfit along p (exact for a linear observed decoder):
            # misfit(z + p) - misfit(z) - p.g = 1/2 p^T G^T R^-1 G p
            pgp = 2.0 * (_call_misfit(misfit, z.detach() + p) - j.detach() - _member_sum(p * g))
            step = _per_member(rp / (pq + pgp.clamp_min(0.0)).clamp_min(1e-30), u)
            u, w = u + step * p, w + step * q
            rs_old = rs
        return GuidedEstimate(z0_hat + u)

    def guide(self, denoiser, z_t, alpha_t, sigma_t, misfit) -> GuidedEstimate:
        if self.covariance == "tweedie":
            return self._guide_tweedie(denoiser, z_t, alpha_t, sigma_t, misfit)
        z0_hat = (z_t - sigma_t * denoiser(z_t)) / alpha_t
        scale = 1.0 / math.sqrt(self.weight(alpha_t, sigma_t))
        u = torch.zeros_like(z0_hat)
        m = torch.zeros_like(u)
        v = torch.zeros_like(u)
        b1, b2, tiny = 0.9, 0.999, 1e-8
        for k in range(1, self.iterations + 1):
            with torch.enable_grad():
                z = (z0_hat + scale * u).requires_grad_(True)
                gz = _grad(_call_misfit(misfit, z), z)
            g = scale * gz + u        # d/du [misfit(z0_hat + scale u) + 1/2 ||u||^2]
            if self.optimizer == "sgd":
                u = u - self.lr * g
            else:
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                u = u - self.lr * (m / (1 - b1 ** k)) / (torch.sqrt(v / (1 - b2 ** k)) + tiny)
        return GuidedEstimate(z0_hat + scale * u)


class DPS:
    r"""Diffusion posterior sampling (Chung et al. 2023), with their normalised step.

    After the prior reverse step, ``z_s <- z_s - zeta grad_{z_t} ||r(z_t)||^2 / ||r(z_t)||``
    with ``r = (y - h(z0_hat(z_t))) / sigma_o`` the observation-error-normalised innovation of
    the Tweedie estimate, i.e. ``||r||^2 = 2 misfit``, so the shift is
    ``zeta * 2 grad misfit / sqrt(2 misfit)`` per member (``= 2 zeta grad ||r||``). The
    gradient goes through the eps network (``z0_hat`` depends on ``z_t`` through ``eps_hat``).
    The per-step displacement does not depend on the distance to the observations, nor on
    the number of steps: ``zeta`` (dimensionless) must be tuned with ``n_steps`` (about
    ``3 / n_steps`` in the linear-Gaussian test; the default 1 overshoots there); the
    Jacobian ``d z0_hat / d z_t ~ alpha_t Cov(z | z_t) / sigma_t^2`` makes it small at
    large noise.

    Args:
        zeta: step size, > 0 (Chung et al. use ~1 with 1000 steps).
    """

    name = "dps"

    def __init__(self, zeta: float = 1.0):
        self.zeta = _positive("DPS zeta", zeta)

    def __repr__(self) -> str:
        return f"DPS(zeta={self.zeta})"

    def guide(self, denoiser, z_t, alpha_t, sigma_t, misfit) -> GuidedEstimate:
        with torch.enable_grad():
            z = z_t.detach().requires_grad_(True)
            z0_hat = (z - sigma_t * denoiser(z)) / alpha_t
            j = _call_misfit(misfit, z0_hat)
            g = _grad(j, z)
        norm = torch.sqrt(2.0 * j.detach()).clamp_min(torch.finfo(j.dtype).tiny)
        shift = (2.0 * self.zeta) * g / _per_member(norm, g)
        return GuidedEstimate(z0_hat.detach(), shift)


class SDAGuidance:
    r"""Score-based data assimilation's likelihood approximation (Rozet & Louppe 2023).

    ``log p(y | z_t) ~ log N(y | h(z0_hat(z_t)), diag(sigma_o^2) + gamma (sigma_t/alpha_t)^2 I)``,
    i.e. ``-misfit(z0_hat(z_t), obs_var_scale=gamma (sigma_t/alpha_t)^2)`` (the log-determinant
    does not depend on ``z_t``). Its gradient (through the eps network) is added to the score,
    ``grad log p(z_t | y) = -eps_hat / sigma_t + grad log p(y | z_t)``, i.e.

        eps_guided = eps_hat + sigma_t grad_{z_t} misfit(z0_hat(z_t), gamma (sigma_t/alpha_t)^2),

    and the reverse step uses ``z0 = (z_t - sigma_t eps_guided) / alpha_t``. The added variance
    stands for ``h``'s image of ``Cov(z | z_t) ~ (sigma_t/alpha_t)^2 I`` at small noise:
    ``gamma`` (in squared observed units per squared latent unit) is ``~ ||dh/dz||^2``; at
    large noise ``(sigma_t/alpha_t)^2 -> 1/eta^2`` switches the guidance off. That
    over-estimate at large noise leaves the ensemble mean short of the observations (in the
    linear-Gaussian test: ~20-25% of the background-to-analysis distance with ``gamma = 1``).

    With ``prior_var`` given, ``(sigma_t/alpha_t)^2`` is replaced by the variance of the clean
    latent given ``z_t`` under a ``N(m, prior_var I)`` prior (as in LatentOptimization and
    Song et al. 2023's PiGDM), ``v_t = 1 / (1/prior_var + (alpha_t/sigma_t)^2)``: equal at
    small noise, capped by ``prior_var`` at large noise, exact for an isotropic Gaussian latent
    prior observed through a linear ``h`` with ``h h^T = gamma I``.

    Args:
        gamma: > 0.
        prior_var: ``None`` (Rozet & Louppe's ``(sigma_t/alpha_t)^2``) or the latent prior
            variance, > 0.
    """

    name = "sda"

    def __init__(self, gamma: float = 1e-2, prior_var: float | None = None):
        self.gamma = _positive("SDAGuidance gamma", gamma)
        self.prior_var = None if prior_var is None else _positive("SDAGuidance prior_var", prior_var)

    def __repr__(self) -> str:
        return f"SDAGuidance(gamma={self.gamma}, prior_var={self.prior_var})"

    def obs_var_scale(self, alpha_t: float, sigma_t: float) -> float:
        """``gamma (sigma_t/alpha_t)^2`` (or ``gamma v_t``), added to every observation-error
        variance."""
        if self.prior_var is None:
            return self.gamma * (sigma_t / alpha_t) ** 2
        return self.gamma / (1.0 / self.prior_var + (alpha_t / sigma_t) ** 2)

    def guide(self, denoiser, z_t, alpha_t, sigma_t, misfit) -> GuidedEstimate:
        with torch.enable_grad():
            z = z_t.detach().requires_grad_(True)
            eps = denoiser(z)
            j = _call_misfit(misfit, (z - sigma_t * eps) / alpha_t,
                             self.obs_var_scale(alpha_t, sigma_t))
            g = _grad(j, z)
        eps_guided = eps.detach() + sigma_t * g
        return GuidedEstimate((z_t - sigma_t * eps_guided) / alpha_t)


def make_guidance(method: str, **options):
    """The guidance object of a method name (``'none'`` gives ``None``); ``options`` go to its
    constructor (``'lo-sda'``: iterations, lr, optimizer, prior_weight, prior_var; ``'dps'``:
    zeta; ``'sda'``: gamma, prior_var)."""
    kinds = {"lo-sda": LatentOptimization, "dps": DPS, "sda": SDAGuidance}
    if method == "none":
        if options:
            raise ValueError(f"guidance 'none' takes no options, got {sorted(options)}")
        return None
    if method not in kinds:
        raise ValueError(f"unknown guidance method {method!r}; expected one of {GUIDANCE_METHODS}")
    try:
        return kinds[method](**options)
    except TypeError as e:
        raise ValueError(f"guidance {method!r}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample(eps_model, cond: Tensor, generators: list[torch.Generator], schedule: CosineSchedule,
           n_steps: int, *, guidance: Guidance | None = None, misfit: Misfit | None = None,
           stochastic: bool = True, shape: Sequence[int] | None = None) -> Tensor:
    r"""Reverse diffusion from ``z_1 ~ N(0, I)`` to ``z_0``: an ensemble of analysis latents.

    Args:
        eps_model: ``(z_t (B, *S), t (B,), cond (B, *C)) -> (B, *S)``, ``t`` the diffusion time in
            ``[0, 1]`` (all members share it).
        cond: the conditioning ``(B, *C)`` (background latents, ...), float32 or float64, on any
            device; sets the dtype and device of the sampling, and the latent shape ``S = C``
            unless ``shape`` is given.
        generators: ``B`` per-member generators (:func:`member_generators`); the initial
            ``z_1`` and every re-noising draw come from member ``m``'s own generator.
        schedule: the noise schedule.
        n_steps: reverse steps, >= 1, on ``schedule.grid(n_steps)``.
        guidance: ``None`` (prior sampling) or a :class:`Guidance` (:class:`LatentOptimization`,
            :class:`DPS`, :class:`SDAGuidance`).
        misfit: the :class:`Misfit`, required with guidance (unused without).
        stochastic: ``True``: DDPM ancestral re-noising (fresh noise at every step, "eta = 1");
            ``False``: deterministic DDIM ("eta = 0", noise only in ``z_1``).
        shape: the latent shape ``S`` when it differs from ``cond``'s.

    Returns:
        ``z_0`` ``(B, *S)``, the analysis latents, detached, dtype and device of ``cond``.

    Cost: ``n_steps`` eps-network evaluations (DPS and SDA: plus one backward through it
    each; LatentOptimization: plus ``iterations`` misfit gradients each), and ``B`` small
    random draws per step (per-member generators).

    Raises:
        ValueError: bad arguments (see messages).
    """
    if not isinstance(cond, Tensor) or cond.ndim < 2:
        raise ValueError(f"sample: cond must be a tensor (B, *S) with a latent shape S, got "
                         f"{getattr(cond, 'shape', type(cond))}")
    if cond.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"sample: cond must be float32 or float64, got {cond.dtype}")
    gens = list(generators)
    if not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError("sample: generators must be torch.Generator objects (see member_generators)")
    B, S = cond.shape[0], tuple(cond.shape[1:]) if shape is None else tuple(int(n) for n in shape)
    if len(gens) != B:
        raise ValueError(f"sample: {len(gens)} generators for a batch of {B} members "
                         "(cond.shape[0]): one generator per member")
    if B == 0:
        raise ValueError("sample: empty batch (no members)")
    if not isinstance(schedule, CosineSchedule):
        raise ValueError(f"sample: schedule must be a CosineSchedule, got {schedule!r}")
    n_steps = _int_at_least("n_steps", n_steps, 1)
    if guidance is not None:
        if not callable(getattr(guidance, "guide", None)):
            raise ValueError(f"sample: guidance must be None or have a guide() method "
                             f"(LatentOptimization, DPS, SDAGuidance), got {guidance!r}")
        if misfit is None or not callable(misfit):
            raise ValueError(f"sample: guidance {type(guidance).__name__} needs a misfit "
                             "(see gaussian_misfit)")
        if torch.is_inference_mode_enabled():
            raise ValueError("sample: guidance needs autograd; call sample outside "
                             "torch.inference_mode()")
    if cond.is_inference():
        cond = cond.clone()     # an inference tensor cannot enter the guidance's autograd graph
    dtype, device = cond.dtype, cond.device
    times = schedule.grid(n_steps, dtype=torch.float64).tolist()

    z = _draw(gens, S, dtype, device)
    for i in range(n_steps):
        t, s = times[i], times[i + 1]
        a_t, s_t = schedule._coeffs(t)
        a_s, s_s = schedule._coeffs(s)
        tb = torch.full((B,), t, dtype=dtype, device=device)

        def denoiser(x: Tensor, _tb=tb) -> Tensor:
            eps = eps_model(x, _tb, cond)
            if not isinstance(eps, Tensor) or eps.shape != x.shape:
                raise ValueError(f"sample: eps_model returned {getattr(eps, 'shape', type(eps))}, "
                                 f"expected the shape of z_t {tuple(x.shape)}")
            return eps

        if guidance is None:
            est = GuidedEstimate((z - s_t * denoiser(z)) / a_t)
        else:
            est = guidance.guide(denoiser, z, a_t, s_t, misfit)
        z0 = est.z0.detach()
        eps_dir = (z - a_t * z0) / s_t
        if stochastic:
            r = min(1.0, (a_t * s_s) / (a_s * s_t))
            c = s_s * math.sqrt(max(0.0, 1.0 - r * r))
            k = s_s * r
            z = a_s * z0 + k * eps_dir + c * _draw(gens, S, dtype, device)
        else:
            z = a_s * z0 + s_s * eps_dir
        if est.shift is not None:
            z = z - est.shift.detach()
    return z
