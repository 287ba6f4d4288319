r"""Latent diffusion assimilation: LO-SDA and its baselines DPS and SDA, as an ensemble method.

One analysis of a background ``x_b`` (``(nvar, ny, nx)``, physical units) with observations
``y`` (``p``, error std ``sigma_o``) and the linear observation operator ``H``
(:mod:`coupler.assim.obs_torch`, the same sparse ``H`` as 3D-Var's):

1. encode the background: ``z_b = E(x_b)`` (the VAE's mean, scaled to unit variance over the
   climate);
2. the prior is over the *normalized latent increment* ``d = (z_a - z_b) / s``, where ``s`` is
   the RMS latent increment of the training pairs (checkpoint ``latent_increment_std``): the
   analysis latent lies within a background error of ``z_b``, a small fraction of the climate's
   spread, so diffusing ``z_a`` itself would spend the noise schedule on scales the analysis
   never visits, while ``d`` has unit variance as the VP schedule assumes. The prior is also
   conditioned on the background's relative error ``e_b`` (``&assim_nml background_error``, a
   constant, or by default estimated each cycle from the innovations), so its spread follows
   the quality of the backgrounds the cycle produces (:mod:`coupler.assim.latent`). For each
   member ``m``: run the reverse diffusion of ``p(d | z_b, e_b)`` learnt by the checkpoint's
   noise-prediction network, from ``d_1 ~ N(0, I)`` to ``d_0``, with the noise of member ``m``
   drawn from its own stream ``(seed, cycle, m)``, guided towards ``y`` through the decoder by
   the misfit of the analysis that ``d`` stands for (step 3),

       J_o(d) = 1/2 sum_k (y_k - (H x_a(d))_k)^2 / sigma_o,k^2,
       x_a(d) = x_b + D(z_b + s d) - D(z_b),

   with the ``&assim_nml method``'s guidance: ``lo-sda`` (latent optimization of the Tweedie
   estimate at each step), ``dps`` (diffusion posterior sampling) or ``sda`` (Gaussian
   likelihood approximation); see :mod:`coupler.assim.diffusion`;
3. decode the members and form the analysis ensemble. The increment of member ``m`` is taken
   relative to the *decoded* background,

       dx_m = D(z_b + s d_0^m) - D(z_b),     x_a^m = x_b + dx_m,

   so the VAE's reconstruction error of the background (``D(E(x_b)) - x_b``, which the
   observations know nothing about) cancels instead of entering the analysis: where the
   observations do not constrain the analysis, the increment is the prior's, not the
   autoencoder's error;
4. the analysis is the ensemble mean ``x_b + mean_m dx_m``; the spread is the ensemble's
   standard deviation (``ddof = 1``), both in physical units.

Members are computed in batches (:func:`coupler.ensemble.member_batches`) so the driver can
split them over its ranks (:class:`coupler.ensemble.EnsembleRunner`) with results identical to
one rank. No MPI and no file I/O here (the checkpoint is loaded by :meth:`from_config`).
"""
from __future__ import annotations

import contextlib
import time
from typing import Sequence

import numpy as np
import torch

from coupler.assim.base import Analysis, Observations

__all__ = ["LatentDiffusionAssimilation"]


def _guidance(method: str, a):
    from coupler.assim import diffusion as d

    if method == "lo-sda":
        return d.LatentOptimization(iterations=a.lo_iterations, lr=a.lo_lr, optimizer=a.lo_optimizer,
                                    prior_weight=a.prior_weight, covariance=a.lo_covariance)
    if method == "dps":
        return d.DPS(zeta=a.dps_zeta)
    if method == "sda":
        return d.SDAGuidance(gamma=a.sda_gamma)
    raise ValueError(f"&assim_nml method = '{method}': not a latent diffusion method (lo-sda, dps, sda)")


class LatentDiffusionAssimilation:
    """An ensemble analysis method (:class:`coupler.assim.base.EnsembleMethod`).

    Args:
        vae: the checkpoint's autoencoder, with ``to_latent(x)`` and ``from_latent(z)``
            (physical states ``(B, nvar, ny, nx)`` <-> unit-scale latents ``(B, *L)``).
        eps_net: the prior's noise-prediction network ``eps(d_t, t, prior_condition(z_b, e_b))``.
        increment_std: ``s``, the RMS latent increment of the training pairs.
        background_error: ``e_b``, the background's relative error the prior is conditioned on
            (:func:`coupler.assim.latent.prior_condition`), or ``None``: estimated each cycle
            from the innovations (:meth:`background_error_of`).
        error_range: ``(lo, hi)``, the range the innovation estimate is clipped to (the
            relative errors the prior was trained on, widened by 2 each way); ``e_b`` is relative
            to the VAE's per-variable normalisation std.
        schedule: the noise schedule the prior was trained with.
        guidance: a guidance object of :mod:`coupler.assim.diffusion` (``None``: prior samples).
        name: the method's name (``lo-sda``, ``dps``, ``sda``).
        n_members, member_batch: ensemble size and members per batch.
        n_steps: reverse-diffusion steps; ``stochastic``: ancestral re-noising (else DDIM).
        seed: experiment seed; member ``m`` of cycle ``c`` uses the stream ``(seed, c, m)``.
        device: torch device of this rank; ``precision``: ``'float32'`` or ``'bf16'`` (autocast
            of the networks on the device; the misfit and the optimizer stay in float32).
    """

    def __init__(self, vae, eps_net, schedule, guidance, *, increment_std: float, background_error: float | None,
                 error_range: tuple[float, float] = (1e-3, 1.0), name: str, n_members: int,
                 member_batch: int, n_steps: int, stochastic: bool, seed: int, device: str = "cpu",
                 precision: str = "float32"):
        if n_members < 2:
            raise ValueError(f"n_members = {n_members}: an ensemble needs at least 2 members")
        self.vae, self.eps_net, self.schedule, self.guidance = vae, eps_net, schedule, guidance
        if not increment_std > 0:
            raise ValueError(f"increment_std = {increment_std}: the latent increment scale must be > 0")
        self.increment_std = float(increment_std)
        if background_error is not None and not background_error > 0:
            raise ValueError(f"background_error = {background_error}: the relative background error must be > 0")
        self.background_error = None if background_error is None else float(background_error)
        lo, hi = (float(e) for e in error_range)
        if not 0 < lo <= hi:
            raise ValueError(f"error_range = {error_range}: expected 0 < lo <= hi")
        self.error_range = (lo, hi)
        self.norm_std = vae.norm_std.detach().double().cpu().numpy()
        self.name, self.n_members, self.member_batch = name, int(n_members), int(member_batch)
        self.n_steps, self.stochastic, self.seed = int(n_steps), bool(stochastic), int(seed)
        self.device, self.precision = torch.device(device), precision
        for p in list(vae.parameters()) + list(eps_net.parameters()):
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg, checkpoint, *, device: str = "cpu") -> "LatentDiffusionAssimilation":
        """Load ``checkpoint`` (checked against ``&grid_nml``) and build the ``&assim_nml`` method."""
        from coupler.io.checkpoints import load_checkpoint

        ck = load_checkpoint(checkpoint, shape=cfg.state_shape, variables=list(cfg.grid.variables),
                             where=f"{cfg.path}: &assim_nml checkpoint = '{checkpoint}'", device=device)
        return cls.from_networks(cfg, ck.vae, ck.eps_net, ck.meta, device=device, where=str(checkpoint))

    @classmethod
    def from_networks(cls, cfg, vae, eps_net, meta: dict, *, device: str = "cpu",
                      where: str = "the networks") -> "LatentDiffusionAssimilation":
        """The ``&assim_nml`` method on networks already in memory (a loaded checkpoint, or the
        prior being trained by ``lodas train``'s self-cycling rounds); ``meta``: the checkpoint's
        ``schedule_eta``, ``latent_increment_std`` and per-source ``background_error``."""
        from coupler.assim.diffusion import CosineSchedule

        a = cfg.assim
        schedule = CosineSchedule(eta=float(meta.get("schedule_eta", 1e-3)))
        if "latent_increment_std" not in meta:
            raise ValueError(f"{where}: the checkpoint has no latent_increment_std (written by `lodas train` "
                             f"of this version); retrain it")
        trained = {k: float(v) for k, v in meta.get("background_error", {}).items() if k != "all"}
        if a.background_error == 0 and not trained:
            raise ValueError(f"{cfg.path}: &assim_nml background_error = 0 (estimate from the innovations) but the "
                             f"checkpoint {where} records no training background errors to bound the estimate: "
                             f"set background_error (e.g. 0.1)")
        error_range = (0.5 * min(trained.values()), 2.0 * max(trained.values())) if trained else (1e-3, 1.0)
        return cls(vae, eps_net, schedule, _guidance(a.method, a), name=a.method, n_members=a.n_members,
                   increment_std=float(meta["latent_increment_std"]),
                   background_error=a.background_error or None, error_range=error_range,
                   member_batch=a.member_batch, n_steps=a.n_steps, stochastic=a.stochastic, seed=cfg.coupler.seed,
                   device=device, precision=a.precision)

    # -- the ensemble-method protocol --------------------------------------------------------
    def _autocast(self):
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def background_error_of(self, background: np.ndarray, observations: Observations,
                            omb: np.ndarray | None = None) -> float:
        r"""``e_b`` for this cycle: the configured value, or the innovation estimate

            e_b^2 = mean_k [ (y_k - H_k x_b)^2 - sigma_o,k^2 ] / std_{v_k}^2

        over the point observations (``E[(y - H x_b)^2] = sigma_b^2 + sigma_o^2`` for unbiased,
        uncorrelated errors; area-mean observations are left out when there are point ones, as
        their background error is smaller than a point's), clipped to ``error_range`` (which
        also catches a negative estimate from a small sample). Deterministic: every rank gets
        the same number. ``omb``: the innovations ``y - H x_b`` when already computed."""
        if self.background_error is not None:
            return self.background_error
        lo, hi = self.error_range
        if not len(observations):
            return float(np.sqrt(lo * hi))
        if omb is None:
            from coupler.assim.obs_operator import observation_operator

            omb = observations.value - observation_operator(observations, background.shape) @ background.ravel()
        keep = observations.footprint == 0
        if not keep.any():
            keep = np.ones(len(observations), dtype=bool)
        std = self.norm_std[observations.var_index[keep]]
        e2 = float(np.mean((omb[keep] ** 2 - observations.error_std[keep] ** 2) / std ** 2))
        return float(np.clip(np.sqrt(max(e2, 0.0)), lo, hi))

    def sample_batches(self, background: np.ndarray, observations: Observations, *, cycle: int,
                       batches: Sequence[Sequence[int]]) -> np.ndarray:
        """Analysis increments ``dx_m = D(z_b + s d_0^m) - D(z_b)`` of the members in ``batches``.

        Returns:
            ``(M, nvar, ny, nx)`` float64, members in the order of ``batches`` (concatenated).
        """
        from coupler.assim.diffusion import member_generators, sample
        from coupler.assim.latent import prior_condition
        from coupler.assim.obs_torch import TorchObservationOperator

        shape = tuple(background.shape)
        members = [m for b in batches for m in b]
        if not members:
            return np.zeros((0, *shape))
        dev, f32 = self.device, torch.float32
        H = TorchObservationOperator.from_observations(observations, shape, device=dev, dtype=f32)
        x_b = torch.as_tensor(np.ascontiguousarray(background), dtype=f32, device=dev)[None]
        with torch.no_grad(), self._autocast():
            z_b = self.vae.to_latent(x_b).float()
            x_bb = self.vae.from_latent(z_b).float()              # D(E(x_b))
        r = x_b - x_bb                                             # the VAE's reconstruction error of x_b

        s = self.increment_std
        e_b = self.background_error_of(background, observations)

        def forward(d):                                            # H x_a(d), x_a(d) = x_b + D(z_b + s d) - D(z_b)
            with self._autocast():
                x = self.vae.from_latent(z_b + s * d)
            return H(x.float() + r)

        from coupler.assim.diffusion import gaussian_misfit

        misfit = gaussian_misfit(H.y, H.obs_std, forward) if len(observations) else None
        guidance = self.guidance if misfit is not None else None

        def eps_model(z_t, t, cond):
            with self._autocast():
                return self.eps_net(z_t, t, cond).float()

        out = []
        for batch in batches:
            gens = member_generators(self.seed, cycle, list(batch), device=dev)
            z_bb = z_b.expand(len(batch), *z_b.shape[1:]).contiguous()
            cond = prior_condition(z_bb, e_b)
            d0 = sample(eps_model, cond, gens, self.schedule, self.n_steps, guidance=guidance, misfit=misfit,
                        stochastic=self.stochastic, shape=z_b.shape[1:])
            with torch.no_grad(), self._autocast():
                dx = self.vae.from_latent(z_bb + s * d0.detach()).float() - x_bb
            out.append(dx.double().cpu().numpy())
        return np.concatenate(out, axis=0)

    def reduce(self, background: np.ndarray, increments: np.ndarray, observations: Observations) -> Analysis:
        """Mean increment, spread and innovation statistics of the ``(M, nvar, ny, nx)`` member increments
        (in member order; the same arithmetic for any number of ranks)."""
        from coupler.assim.obs_operator import observation_operator

        inc = np.asarray(increments, dtype=np.float64)
        mean = inc.mean(axis=0)
        spread = inc.std(axis=0, ddof=1)
        info = {"n_obs": len(observations), "n_members": int(inc.shape[0])}
        omb = None
        if len(observations):
            H = observation_operator(observations, background.shape)
            omb = observations.value - H @ background.ravel()
            oma = observations.value - H @ (background + mean).ravel()
            info.update(omb_mean=float(omb.mean()), omb_rms=float(np.sqrt(np.mean(omb ** 2))),
                        oma_mean=float(oma.mean()), oma_rms=float(np.sqrt(np.mean(oma ** 2))))
        info["background_error"] = self.background_error_of(background, observations, omb)
        return Analysis(increment=mean, spread=spread, info=info)

    def analyse(self, background: np.ndarray, observations: Observations, *, cycle: int) -> Analysis:
        """All members on this process (the serial reference of the driver's ensemble split)."""
        from coupler.ensemble import serial_analyse

        t0 = time.perf_counter()
        a = serial_analyse(self, background, observations, cycle=cycle)
        a.info["sample_s"] = time.perf_counter() - t0
        return a
