r"""The latent space of LO-SDA: a periodic convolutional VAE of model states and the conditional
noise-prediction network of the latent diffusion prior, in pure torch (no MPI, no file I/O).

States follow the lodas convention (:mod:`coupler.assim.base`): ``(B, nvar, ny, nx)`` in
physical units (Lorenz-96: ``(B, 1, 1, 40)``; shallow water: ``(B, 3, 64, 64)`` = u, v in m/s,
h in m), doubly periodic. ``ny == 1`` selects 1-D convolutions over ``x``; otherwise 2-D
convolutions. Every convolution pads circularly, so the networks see the periodic domain
without edges, and a circular shift of the input by a multiple of the total stride ``2^levels``
shifts the output the same way (translation equivariance up to the strides).

**Normalisation** (inside the VAE, so its public methods take and return physical states):

    x_n[v] = (x[v] - mean[v]) / std[v]           per state variable v (buffers, from training data)

**VAE** (``beta``-VAE with a small, relative KL weight): encoder ``E`` and decoder ``D`` with
``levels`` stride-2 downsamplings, latent ``z`` of shape ``latent_shape = (C, nx/2^L)`` (1-D)
or ``(C, ny/2^L, nx/2^L)`` (2-D), ``C = latent_channels``:

    (mu, log s^2) = E(x_n),   z = mu + s * xi, xi ~ N(0, I),   x_n_hat = D(z)
    loss = mean_elements (x_n_hat - x_n)^2  +  kl_weight * mean_latent KL(N(mu, s^2) || N(0, 1)),
    KL per latent element = 1/2 (mu^2 + s^2 - 1 - log s^2).

``E`` and ``D`` are each a linear patch map plus a deep correction: ``E(x) = W_e S(x) + E_deep(x)``
with ``S`` the space-to-depth rearrangement of ``2^L``-point patches (pixel unshuffle) and
``W_e`` a 1x1 convolution; ``D(z) = S^-1(W_d z) + D_deep(z)``. The linear path makes the
near-identity map easy to learn (Lorenz-96: reconstruction RMSE 0.02 instead of 0.06 after the
same 1000 steps; no group normalisation in the VAE, for the same reason).

**Increment consistency** (``increment_weight`` > 0, training on pairs of truth ``x_t`` and
background ``x_b``): the analysis an assimilation can reach is ``x_b + D(z_a) - D(z_b)``, so
the autoencoder is only as good as it reproduces *differences* of nearby states, which the
state loss above does not ask for: its reconstruction error ``r(x) = D(E(x)) - x`` may change
between ``x_b`` and ``x_t`` by as much as the background error itself (shallow water, shipped
``sw.pt`` before this term: the *oracle* latent analysis ``x_b + D(E(x_t)) - D(E(x_b))``
recovered only 60-70 % of the background error). The pair loss adds

    increment_weight * mean (dx_n_hat - dx_n)^2 / increment_ms,
    dx_n = x_t,n - x_b,n,   dx_n_hat = D(z_t) - D(z_b)   (z_t, z_b sampled with the same xi),

``increment_ms`` the mean square of ``dx_n`` over the training pairs, so the term is the
relative squared error of the represented increment (1 for ``D(z_t) = D(z_b)``).

Both terms are means (over state elements and latent elements), so ``kl_weight`` is relative:
at the optimum the sampled latent noise costs about ``kl_weight/2`` of normalised squared
reconstruction error, and the deterministic reconstruction ``D(mu)`` is sharper still.

**Unit-scale latents** (the latent-diffusion convention, Rombach et al. 2022): the buffer
``latent_scale`` is the standard deviation of the training states' ``mu`` (one scalar), and

    to_latent(x) = mu(x) / latent_scale,        from_latent(z) = decode(z * latent_scale),

so the diffusion prior (:mod:`coupler.assim.diffusion`, unit-variance noise at ``t = 1``) works
on latents of unit variance.

**Conditional eps network** over the *normalised latent increment* ``d = (z - z_b) / s_d``
(``z`` the truth's or analysis's unit-scale latent, ``z_b`` the background's, ``s_d`` the RMS
latent increment of the training pairs, checkpoint ``latent_increment_std``):
``eps_net(d_t, t, c) ~ E[eps | d_t, c]`` with ``d_t = alpha_t d + sigma_t eps`` and the
condition ``c = prior_condition(z_b, e_b)``: the background latent and the background's
*relative error* ``e_b`` (:func:`relative_error`: RMS of ``(x_b - x_t) / std_v`` over the
state, ``std_v`` the per-variable normalisation), one constant channel ``log e_b``. A prior
trained on backgrounds of several qualities (cycled 3D-Var and ETKF) and conditioned on ``z_b``
alone learns the mixture: too narrow for a poor background, too wide for a good one. Given
``e_b`` (the training pair's actual error; in assimilation ``&assim_nml background_error``, a
tuned constant like 3D-Var's B scale), the prior's spread follows the background's quality. ``d`` has
unit variance, as the variance-preserving schedule assumes, so the reverse diffusion spends its
steps on the scales of the background error rather than on the climate's (see
:mod:`coupler.assim.latent_da`). Input: the preconditioned noisy increment and ``z_b``,
concatenated on channels; residual blocks at the latent resolution modulated by a Fourier
embedding of ``t`` (FiLM: ``h <- h (1 + gamma(t)) + beta(t)``); the output is preconditioned so
that the sampler's Tweedie estimate ``(d_t - sigma_t eps_hat) / alpha_t`` tends to 0 (the
background) at large noise instead of amplifying the network's error by ``1/alpha_t`` (see
:class:`ConditionalEpsNet`).

:func:`build_networks` rebuilds both modules from the plain ``arch`` dict stored in a
checkpoint (:mod:`coupler.io.checkpoints`), so loading never executes code from the file.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["StateVAE", "ConditionalEpsNet", "build_networks", "default_arch", "vae_loss", "ARCH_KEYS",
           "prior_condition", "relative_error"]

#: Keys of the ``arch`` dict (plain ints or lists of ints; ``schedule_eta`` a float).
ARCH_KEYS = ("shape", "latent_channels", "width", "levels", "channel_mult", "blocks",
             "prior_width", "prior_blocks", "time_features", "schedule_eta")


def _conv(dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Module:
    """A periodic (circularly padded) convolution, 1-D or 2-D, keeping size ``n`` (stride 1)
    or halving it (stride 2, ``n`` even)."""
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    return conv(cin, cout, kernel, stride=stride, padding=kernel // 2, padding_mode="circular")


def _norm(ch: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(ch, 8), ch)


class _ResBlock(nn.Module):
    """``x + conv(act(FiLM(norm(conv(act(norm(x)))))))``, with an optional 1x1 projection when
    the channel count changes, optional FiLM conditioning on an embedding ``(B, emb_dim)`` and
    optional group normalisation (the VAE has none: it reconstructs sharper without)."""

    def __init__(self, dims: int, cin: int, cout: int, emb_dim: int = 0, norm: bool = True):
        super().__init__()
        self.dims = dims
        self.norm1, self.conv1 = (_norm(cin) if norm else nn.Identity()), _conv(dims, cin, cout)
        self.norm2, self.conv2 = (_norm(cout) if norm else nn.Identity()), _conv(dims, cout, cout)
        self.skip = nn.Identity() if cin == cout else _conv(dims, cin, cout, kernel=1)
        self.film = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            gamma, beta = self.film(emb).unsqueeze(-1).chunk(2, dim=1)
            if self.dims == 2:
                gamma, beta = gamma.unsqueeze(-1), beta.unsqueeze(-1)
            h = h * (1 + gamma) + beta
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


def _int(arch: dict, key: str, lo: int) -> int:
    v = arch.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"arch[{key!r}]: expected an integer >= {lo}, got {v!r}")
    return v


def _channels(width: int, levels: int, mult: Sequence[int]) -> list[int]:
    """Channels at resolution level 0 (full) .. ``levels`` (latent): ``width * mult[l]``, the
    last multiplier repeated for missing levels."""
    mult = list(mult) or [1]
    return [width * int(mult[min(l, len(mult) - 1)]) for l in range(levels + 1)]


class StateVAE(nn.Module):
    r"""Periodic convolutional VAE of physical states (see the module docstring for the maths).

    Args:
        shape: the state shape ``(nvar, ny, nx)``; ``nx`` (and ``ny`` if > 1) divisible by
            ``2**levels``.
        latent_channels: ``C``, channels of the latent.
        width: channels at full resolution.
        levels: stride-2 downsamplings (``>= 0``).
        channel_mult: channels at level ``l`` are ``width * channel_mult[l]`` (last value
            repeated); default all 1.
        blocks: residual blocks per resolution level (encoder and decoder each).

    Buffers (saved in ``state_dict``): ``norm_mean``, ``norm_std`` ``(nvar,)`` in the variables'
    units, ``latent_scale`` (0-d, latent units). Set them with :meth:`set_normalization` and
    :meth:`set_latent_scale`.
    """

    def __init__(self, shape: Sequence[int], latent_channels: int = 8, width: int = 32, levels: int = 2,
                 channel_mult: Sequence[int] = (1,), blocks: int = 1):
        super().__init__()
        nvar, ny, nx = (int(s) for s in shape)
        self.shape = (nvar, ny, nx)
        self.dims = 1 if ny == 1 else 2
        f = 2 ** levels
        if nx % f or (self.dims == 2 and ny % f):
            raise ValueError(f"StateVAE: grid (ny, nx) = ({ny}, {nx}) is not divisible by 2**levels = {f} "
                             f"(levels = {levels}); choose fewer levels")
        self.levels, self.latent_channels = levels, latent_channels
        ch = _channels(width, levels, channel_mult)
        d = self.dims
        enc: list[nn.Module] = [_conv(d, nvar, ch[0])]
        for l in range(levels):
            enc += [_ResBlock(d, ch[l], ch[l], norm=False) for _ in range(blocks)]
            enc.append(_conv(d, ch[l], ch[l + 1], stride=2))
        enc += [_ResBlock(d, ch[-1], ch[-1], norm=False) for _ in range(blocks)]
        enc += [nn.SiLU(), _conv(d, ch[-1], 2 * latent_channels)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [_conv(d, latent_channels, ch[-1])]
        dec += [_ResBlock(d, ch[-1], ch[-1], norm=False) for _ in range(blocks)]
        for l in reversed(range(levels)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(d, ch[l + 1], ch[l])]
            dec += [_ResBlock(d, ch[l], ch[l], norm=False) for _ in range(blocks)]
        dec += [nn.SiLU(), _conv(d, ch[0], nvar)]
        self.decoder = nn.Sequential(*dec)
        # linear shortcuts through space-to-depth (pixel unshuffle by f = 2^levels): the encoder's
        # and decoder's outputs are a linear patch projection plus the deep network's correction
        patch = nvar * f ** d
        self.enc_skip = _conv(d, patch, 2 * latent_channels, kernel=1)
        self.dec_skip = _conv(d, latent_channels, patch, kernel=1)
        self.register_buffer("norm_mean", torch.zeros(nvar))
        self.register_buffer("norm_std", torch.ones(nvar))
        self.register_buffer("latent_scale", torch.ones(()))

    # -- shapes and normalisation ---------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, nx/2^L)`` for 1-D states, ``(C, ny/2^L, nx/2^L)`` for 2-D states."""
        f = 2 ** self.levels
        nvar, ny, nx = self.shape
        return (self.latent_channels, nx // f) if self.dims == 1 else (self.latent_channels, ny // f, nx // f)

    def set_normalization(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        """Per-variable mean and std ``(nvar,)`` (physical units, std > 0)."""
        mean = torch.as_tensor(mean, dtype=self.norm_mean.dtype).reshape(-1)
        std = torch.as_tensor(std, dtype=self.norm_std.dtype).reshape(-1)
        if mean.shape != self.norm_mean.shape or std.shape != self.norm_std.shape:
            raise ValueError(f"set_normalization: expected ({self.shape[0]},) values, got {tuple(mean.shape)} "
                             f"and {tuple(std.shape)}")
        if not bool(torch.all(std > 0)):
            raise ValueError(f"set_normalization: every std must be > 0, got {std.tolist()}")
        self.norm_mean.copy_(mean)
        self.norm_std.copy_(std)

    def set_latent_scale(self, scale: float) -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"set_latent_scale: expected a finite number > 0, got {scale!r}")
        self.latent_scale.fill_(float(scale))

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"StateVAE: expected states (B, nvar, ny, nx) = (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")

    def normalize(self, x: Tensor) -> Tensor:
        """Physical ``(B, nvar, ny, nx)`` -> normalised, in the module's dtype."""
        self._check(x)
        x = x.to(self.norm_mean.dtype)
        return (x - self.norm_mean[:, None, None]) / self.norm_std[:, None, None]

    def denormalize(self, xn: Tensor) -> Tensor:
        return xn * self.norm_std[:, None, None] + self.norm_mean[:, None, None]

    # -- encoder / decoder ------------------------------------------------------------------
    def _unshuffle(self, h: Tensor) -> Tensor:
        f = 2 ** self.levels
        if self.dims == 2:
            return F.pixel_unshuffle(h, f)
        B, c, n = h.shape
        return h.reshape(B, c, n // f, f).permute(0, 1, 3, 2).reshape(B, c * f, n // f)

    def _shuffle(self, h: Tensor) -> Tensor:
        f = 2 ** self.levels
        if self.dims == 2:
            return F.pixel_shuffle(h, f)
        B, cf, m = h.shape
        return h.reshape(B, cf // f, f, m).permute(0, 1, 3, 2).reshape(B, cf // f, m * f)

    def encode_normalized(self, xn: Tensor) -> tuple[Tensor, Tensor]:
        h = xn[:, :, 0, :] if self.dims == 1 else xn
        mu, logvar = (self.encoder(h) + self.enc_skip(self._unshuffle(h))).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_normalized(self, z: Tensor) -> Tensor:
        z = z.to(self.norm_mean.dtype)
        h = self.decoder(z) + self._shuffle(self.dec_skip(z))
        return h[:, :, None, :] if self.dims == 1 else h

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Physical states ``(B, nvar, ny, nx)`` -> ``(mu, logvar)``, each ``(B, *latent_shape)``
        (raw latents, not divided by ``latent_scale``)."""
        return self.encode_normalized(self.normalize(x))

    def decode(self, z: Tensor) -> Tensor:
        """Raw latents ``(B, *latent_shape)`` -> physical states ``(B, nvar, ny, nx)`` (module dtype)."""
        return self.denormalize(self.decode_normalized(z))

    def to_latent(self, x: Tensor) -> Tensor:
        """Unit-scale latent of physical states: ``mu(x) / latent_scale``, ``(B, *latent_shape)``."""
        return self.encode(x)[0] / self.latent_scale

    def from_latent(self, z: Tensor) -> Tensor:
        """Physical states of unit-scale latents: ``decode(z * latent_scale)``, ``(B, nvar, ny, nx)``."""
        return self.decode(z * self.latent_scale)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reparameterised pass on physical ``x``: ``(x_n_hat, mu, logvar)``, the reconstruction
        in *normalised* units (compare with :meth:`normalize` of ``x``)."""
        mu, logvar = self.encode(x)
        xi = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        return self.decode_normalized(mu + torch.exp(0.5 * logvar) * xi), mu, logvar


def vae_loss(vae: StateVAE, x: Tensor, kl_weight: float, generator: torch.Generator | None = None, *,
             increment_weight: float = 0.0, increment_ms: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, recon, kl)`` of physical states ``x`` (module docstring): ``recon`` the mean
    squared normalised reconstruction error of a sampled latent, ``kl`` the mean KL per latent
    element, ``loss = recon + kl_weight * kl``.

    With ``increment_weight > 0``, ``x`` is ``(2B, nvar, ny, nx)``: ``B`` truths then their
    ``B`` backgrounds, pair ``k`` = ``(x[k], x[B + k])``; both latents of a pair are sampled with
    the same noise and the loss adds ``increment_weight`` times the relative squared error of
    the decoded increment (module docstring, *increment consistency*; ``increment_ms`` the mean
    square of the normalised training increments)."""
    mu, logvar = vae.encode(x)
    paired = increment_weight > 0
    if paired and (x.shape[0] % 2 or not increment_ms > 0):
        raise ValueError(f"vae_loss: increment_weight > 0 needs an even batch of (truths, backgrounds) and "
                         f"increment_ms > 0, got {x.shape[0]} states and increment_ms = {increment_ms}")
    half = x.shape[0] // 2
    xi = torch.randn((half, *mu.shape[1:]) if paired else mu.shape, generator=generator, dtype=mu.dtype,
                     device=mu.device)
    if paired:
        xi = torch.cat([xi, xi])
    xn_hat = vae.decode_normalized(mu + torch.exp(0.5 * logvar) * xi)
    xn = vae.normalize(x)
    recon = ((xn_hat - xn) ** 2).mean()
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).mean()
    loss = recon + kl_weight * kl
    if paired:
        err = (xn_hat[:half] - xn_hat[half:]) - (xn[:half] - xn[half:])
        loss = loss + increment_weight * (err ** 2).mean() / increment_ms
    return loss, recon, kl


class ConditionalEpsNet(nn.Module):
    r"""Noise prediction over normalised latent increments, conditioned on the background latent.

    ``forward(d_t, t, cond) -> eps_hat``: ``d_t`` and the result ``(B, *latent_shape)``, ``cond``
    ``(B, C + 1, ...)`` from :func:`prior_condition` (``z_b`` and ``log e_b``),
    ``t`` ``(B,)`` the diffusion time in ``[0, 1]`` (a scalar is broadcast), for the schedule
    ``d_t = alpha_t d + sigma_t eps`` of :class:`~coupler.assim.diffusion.CosineSchedule` with
    floor ``eta`` (which the network must therefore know); ``d = (z - z_b) / s_d`` has unit
    variance over the training pairs.

    **Preconditioning** (EDM, Karras et al. 2022, with data variance 1): in the
    variance-exploding form ``x = d_t / alpha_t = d + s eps`` with ``s = sigma_t / alpha_t``, the
    network ``F`` gives the denoised increment

        D(x) = c_skip x + c_out F(c_in x, z_b, t),
        c_in = 1/sqrt(s^2 + 1),  c_skip = c_in^2,  c_out = s c_in,

    and ``eps_hat = (d_t - alpha_t D) / sigma_t``, computed as ``c_in (s c_in x - F)`` (no
    cancellation). Why: the sampler's Tweedie estimate ``(d_t - sigma_t eps_hat) / alpha_t`` is
    then exactly ``D``. A plain eps network at ``t ~ 1`` (``alpha = eta = 1e-3``) would have its
    eps error multiplied by ``1/eta`` there; here the estimate tends to 0 (the background) at
    large noise (``F``'s weight ``c_out/s -> 1/s``), the network's inputs have unit variance at
    every noise level, and the eps loss weights the error of ``D`` by ``c_in^2``.

    Architecture of ``F``: ``conv(concat[c_in x, cond]) -> blocks x ResBlock(FiLM(t)) -> norm,
    SiLU, conv`` (output convolution zero-initialised: untrained, the network is the exact score
    of ``d ~ N(0, I)``). Time embedding: ``[sin(w_k t), cos(w_k t)]`` with ``time_features/2``
    log-spaced ``w_k`` in ``[1, 1000]``, then an MLP.

    Args:
        latent_shape: ``(C, n)`` (1-D) or ``(C, ny, nx)`` (2-D).
        width: channels of the residual blocks.
        blocks: residual blocks.
        time_features: size of the Fourier embedding (even).
        eta: the schedule floor (``CosineSchedule(eta)``) the network is trained and sampled with.
    """

    def __init__(self, latent_shape: Sequence[int], width: int = 64, blocks: int = 4, time_features: int = 64,
                 eta: float = 1e-3):
        super().__init__()
        from coupler.assim.diffusion import CosineSchedule

        self.latent_shape = tuple(int(s) for s in latent_shape)
        if len(self.latent_shape) not in (2, 3):
            raise ValueError(f"ConditionalEpsNet: latent_shape must be (C, n) or (C, ny, nx), got {self.latent_shape}")
        if time_features < 2 or time_features % 2:
            raise ValueError(f"ConditionalEpsNet: time_features must be even and >= 2, got {time_features}")
        self.schedule = CosineSchedule(eta)
        d = self.dims = len(self.latent_shape) - 1
        c = self.latent_shape[0]
        emb = 4 * time_features
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), time_features // 2)))
        self.time_mlp = nn.Sequential(nn.Linear(time_features, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = _conv(d, 2 * c + 1, width)
        self.blocks = nn.ModuleList([_ResBlock(d, width, width, emb_dim=emb) for _ in range(blocks)])
        self.norm_out = _norm(width)
        self.conv_out = _conv(d, width, c)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def eta(self) -> float:
        return self.schedule.eta

    def _coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(1/alpha_t, s, c_in)`` in float64, shape ``(B,)``."""
        t64 = t.to(torch.float64)
        a, sig = self.schedule.alpha(t64), self.schedule.sigma(t64)
        s = sig / a
        return 1.0 / a, s, torch.rsqrt(s * s + 1.0)

    def forward(self, d_t: Tensor, t: Tensor | float, cond: Tensor) -> Tensor:
        want = (d_t.shape[0], self.latent_shape[0] + 1, *self.latent_shape[1:])
        if d_t.shape[1:] != self.latent_shape or tuple(cond.shape) != want:
            raise ValueError(f"ConditionalEpsNet: expected d_t of shape (B, {self.latent_shape}) and cond "
                             f"(prior_condition) of shape {want}, got {tuple(d_t.shape)} and {tuple(cond.shape)}")
        dtype = self.conv_in.weight.dtype
        B = d_t.shape[0]
        t = torch.as_tensor(t, device=d_t.device).reshape(-1).expand(B)
        inv_a, s, c_in = self._coefficients(t)
        view = (B,) + (1,) * len(self.latent_shape)
        x = d_t.to(torch.float64) * inv_a.reshape(view)
        ang = t.to(dtype)[:, None] * self.freqs.to(dtype)
        emb = self.time_mlp(torch.cat([torch.sin(ang), torch.cos(ang)], dim=1))
        h = self.conv_in(torch.cat([(x * c_in.reshape(view)).to(dtype), cond.to(dtype)], dim=1))
        for block in self.blocks:
            h = block(h, emb)
        f = self.conv_out(F.silu(self.norm_out(h))).to(torch.float64)
        eps = c_in.reshape(view) * (s.reshape(view) * c_in.reshape(view) * x - f)
        return eps.to(d_t.dtype)


def relative_error(vae: StateVAE, x_b: Tensor, x_t: Tensor) -> Tensor:
    """``e_b`` per sample, ``(B,)``: RMS over the state of ``(x_b - x_t) / std_v``, ``std_v`` the
    VAE's per-variable normalisation (dimensionless; Lorenz-96: 0.45 / 3.6 = 0.125 for a
    3D-Var background)."""
    err = (x_b.to(vae.norm_std.dtype) - x_t.to(vae.norm_std.dtype)) / vae.norm_std[:, None, None]
    return err.pow(2).mean(dim=(1, 2, 3)).sqrt()


def prior_condition(z_b: Tensor, error: Tensor | float) -> Tensor:
    """The eps network's condition: ``z_b`` ``(B, *latent_shape)`` with one more channel holding
    ``log e_b`` (``error``: a number or ``(B,)``, > 0), shape ``(B, C + 1, ...)``."""
    e = torch.as_tensor(error, dtype=z_b.dtype, device=z_b.device).reshape(-1)
    if not bool(torch.all(e > 0)):
        raise ValueError(f"prior_condition: the background's relative error must be > 0, got {e.tolist()[:4]}")
    level = torch.log(e).expand(z_b.shape[0]).reshape((-1,) + (1,) * (z_b.ndim - 1))
    return torch.cat([z_b, level.expand(z_b.shape[0], 1, *z_b.shape[2:])], dim=1)


def default_arch(shape: Sequence[int], **overrides) -> dict:
    """A complete ``arch`` dict for a state ``shape`` (defaults below, then ``overrides``)."""
    arch = dict(shape=[int(s) for s in shape], latent_channels=8, width=32, levels=2, channel_mult=[1],
                blocks=1, prior_width=64, prior_blocks=4, time_features=64, schedule_eta=1e-3)
    unknown = set(overrides) - set(ARCH_KEYS)
    if unknown:
        raise ValueError(f"default_arch: unknown keys {sorted(unknown)}; known: {ARCH_KEYS}")
    arch.update(overrides)
    return arch


def build_networks(arch: dict) -> tuple[StateVAE, ConditionalEpsNet]:
    """``(vae, eps_net)`` from a plain ``arch`` dict (keys :data:`ARCH_KEYS`: ``shape`` the
    list ``[nvar, ny, nx]``, ``channel_mult`` a list of ints, ``schedule_eta`` a float, the rest
    ints), freshly initialised
    (load a ``state_dict`` to restore trained weights and buffers)."""
    if not isinstance(arch, dict):
        raise ValueError(f"arch: expected a dict, got {type(arch).__name__}")
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"arch: missing keys {missing}")
    shape = arch["shape"]
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"arch['shape']: expected [nvar, ny, nx] of positive integers, got {shape!r}")
    mult = arch["channel_mult"]
    if (not isinstance(mult, (list, tuple)) or not mult
            or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mult)):
        raise ValueError(f"arch['channel_mult']: expected a non-empty list of integers >= 1, got {mult!r}")
    vae = StateVAE(shape, latent_channels=_int(arch, "latent_channels", 1), width=_int(arch, "width", 1),
                   levels=_int(arch, "levels", 0), channel_mult=list(mult), blocks=_int(arch, "blocks", 0))
    eta = arch["schedule_eta"]
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 < eta < 1:
        raise ValueError(f"arch['schedule_eta']: expected a number in (0, 1), got {eta!r}")
    eps_net = ConditionalEpsNet(vae.latent_shape, width=_int(arch, "prior_width", 1),
                                blocks=_int(arch, "prior_blocks", 0), time_features=_int(arch, "time_features", 2),
                                eta=float(eta))
    return vae, eps_net
