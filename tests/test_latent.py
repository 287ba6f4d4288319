"""The latent networks (coupler.assim.latent) and their checkpoints (coupler.io.checkpoints): tiny
networks, a few optimiser steps."""
from __future__ import annotations

import pytest
import torch

from coupler.assim.diffusion import CosineSchedule, denoising_loss, member_generators, sample
from coupler.assim.latent import (ConditionalEpsNet, StateVAE, build_networks, default_arch, prior_condition,
                                  relative_error, vae_loss)
from coupler.io.checkpoints import FORMAT_VERSION, load_checkpoint, save_checkpoint

torch.set_num_threads(1)
TINY = dict(latent_channels=2, width=4, levels=1, blocks=1, prior_width=8, prior_blocks=1, time_features=8)


def _nets(shape, seed=0, **kw):
    torch.manual_seed(seed)
    return build_networks(default_arch(shape, **{**TINY, **kw}))


@pytest.mark.parametrize("shape, latent", [((1, 1, 40), (2, 20)), ((3, 8, 8), (2, 4, 4))])
def test_shapes_and_physical_units(shape, latent):
    vae, eps = _nets(shape)
    vae.set_normalization([5.0] * shape[0], [3.0] * shape[0])
    vae.set_latent_scale(2.0)
    x = 5.0 + 3.0 * torch.randn(3, *shape, dtype=torch.float64)
    assert vae.latent_shape == latent
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, *latent)
    assert vae.decode(mu).shape == (3, *shape)
    # normalisation happens inside: encode(x) == encode_normalized((x - mean)/std)
    torch.testing.assert_close(mu, vae.encode_normalized(((x - 5.0) / 3.0).float())[0])
    torch.testing.assert_close(vae.decode(mu), 5.0 + 3.0 * vae.decode_normalized(mu))
    torch.testing.assert_close(vae.to_latent(x), mu / 2.0)
    torch.testing.assert_close(vae.from_latent(mu / 2.0), vae.decode(mu))
    z = vae.to_latent(x)
    out = eps(z, torch.rand(3), prior_condition(z, torch.tensor([0.1, 0.2, 0.3])))
    assert out.shape == z.shape and out.dtype == z.dtype
    with pytest.raises(ValueError, match=r"expected states \(B, nvar, ny, nx\)"):
        vae.encode(torch.zeros(2, shape[0] + 1, *shape[1:]))


@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 8, 8)])
def test_periodic_translation_equivariance(shape):
    """Circular padding: shifting the state by the total stride 2^levels shifts the latent by one."""
    vae, _ = _nets(shape, levels=2)
    x = torch.randn(2, *shape)
    mu = vae.encode(x)[0]
    mu_x = vae.encode(torch.roll(x, 4, dims=-1))[0]
    torch.testing.assert_close(mu_x, torch.roll(mu, 1, dims=-1), atol=1e-5, rtol=1e-5)
    if shape[1] > 1:
        mu_y = vae.encode(torch.roll(x, 4, dims=-2))[0]
        torch.testing.assert_close(mu_y, torch.roll(mu, 1, dims=-2), atol=1e-5, rtol=1e-5)
    z = torch.randn(2, *vae.latent_shape)
    torch.testing.assert_close(vae.decode(torch.roll(z, 1, dims=-1)), torch.roll(vae.decode(z), 4, dims=-1),
                               atol=1e-5, rtol=1e-5)


def test_relative_error_and_prior_condition():
    vae, eps = _nets((2, 4, 4))
    vae.set_normalization([0.0, 10.0], [2.0, 4.0])
    x_t = torch.zeros(2, 2, 4, 4)
    x_b = x_t.clone()
    x_b[0, 0] += 2.0                      # sample 0: error 1 std in u everywhere, none in h
    x_b[1, 1] += 4.0                      # sample 1: the same in h
    x_b[1, 0] -= 2.0
    torch.testing.assert_close(relative_error(vae, x_b, x_t), torch.tensor([0.5 ** 0.5, 1.0]))
    z = torch.randn(2, *vae.latent_shape)
    c = prior_condition(z, torch.tensor([0.5, 2.0]))
    assert c.shape == (2, vae.latent_shape[0] + 1, *vae.latent_shape[1:])
    torch.testing.assert_close(c[:, :-1], z)
    torch.testing.assert_close(c[:, -1], torch.log(torch.tensor([0.5, 2.0]))[:, None, None].expand(2, 2, 2))
    with pytest.raises(ValueError, match="must be > 0"):
        prior_condition(z, 0.0)
    with pytest.raises(ValueError, match=r"cond \(prior_condition\) of shape \(2, 3, 2, 2\)"):
        eps(z, torch.rand(2), z)


def test_bad_arch_and_grids_are_refused():
    with pytest.raises(ValueError, match=r"not divisible by 2\*\*levels = 8"):
        StateVAE((1, 1, 20), levels=3)
    with pytest.raises(ValueError, match=r"missing keys \['prior_width'"):
        build_networks({k: v for k, v in default_arch((1, 1, 8)).items() if k != "prior_width"})
    with pytest.raises(ValueError, match=r"arch\['shape'\]"):
        build_networks({**default_arch((1, 1, 8)), "shape": [1, 8]})
    with pytest.raises(ValueError, match=r"arch\['levels'\]"):
        build_networks(default_arch((1, 1, 8), levels=-1))


def test_vae_and_prior_losses_decrease():
    vae, eps = _nets((1, 1, 16))
    g = torch.Generator().manual_seed(0)
    x = torch.cumsum(torch.randn(32, 1, 1, 16, generator=g), -1)
    vae.set_normalization(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, recon, kl = vae_loss(vae, x, 1e-3, torch.Generator().manual_seed(1))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first and recon.item() > 0 and kl.item() > 0
    with torch.no_grad():
        z = vae.to_latent(x)
    sched = CosineSchedule(1e-3)
    opt = torch.optim.Adam(eps.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = denoising_loss(eps, torch.randn(z.shape, generator=g), prior_condition(z, 0.1), sched,
                              generator=torch.Generator().manual_seed(2))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


def test_preconditioning_gives_the_standard_gaussian_prior_when_untrained():
    """With F = 0 the eps network is the exact score of d ~ N(0, I): its Tweedie estimate is the
    Gaussian posterior mean c_skip d_t / alpha_t (-> 0, the background, at t = 1, not an error /
    alpha_t), and the sampler of coupler.assim.diffusion draws from N(0, I)."""
    eps = ConditionalEpsNet((2, 4), width=8, blocks=1, time_features=8, eta=1e-3)
    sched = eps.schedule
    zb = prior_condition(torch.randn(1, 2, 4).repeat(2000, 1, 1), 0.1)
    for tv in (1.0, 0.5):
        t = torch.full((2000,), tv, dtype=torch.float64)
        a, s = sched.alpha(t)[:, None, None], sched.sigma(t)[:, None, None]
        a, s = a.double(), s.double()
        dt = a * torch.randn(2000, 2, 4).double() + s * torch.randn(2000, 2, 4).double()
        with torch.no_grad():
            d0 = (dt - s * eps(dt, t, zb)) / a
        assert d0.shape == (2000, 2, 4)
        torch.testing.assert_close(d0, dt * a / (a * a + s * s), rtol=1e-9, atol=1e-9)
        if tv == 1.0:
            assert d0.abs().max() < 1e-2
    gens = member_generators(0, 0, range(2000))
    d = sample(eps, zb, gens, sched, 100, stochastic=True, shape=(2, 4))
    assert d.shape == (2000, 2, 4)
    assert abs(d.mean().item()) < 0.02
    assert abs(d.std().item() - 1.0) < 0.05


def _ckpt(tmp_path, shape=(1, 1, 16), variables=("x",)):
    vae, eps = _nets(shape)
    vae.set_normalization([1.0] * shape[0], [2.0] * shape[0])
    vae.set_latent_scale(1.5)
    arch = default_arch(shape, **TINY)
    path = save_checkpoint(tmp_path / "ck.pt", vae, eps, {"arch": arch, "variables": list(variables),
                                                          "latent_increment_std": 0.1,
                                                          "summary": {"recon_rmse": {"x": 0.01}}, "note": (1, 2)})
    return vae, eps, path


def test_checkpoint_round_trip(tmp_path):
    vae, eps, path = _ckpt(tmp_path)
    ck = load_checkpoint(path, shape=(1, 1, 16), variables=["x"])
    x = torch.randn(4, 1, 1, 16)
    with torch.no_grad():
        z = vae.to_latent(x)
        torch.testing.assert_close(ck.vae.to_latent(x), z, rtol=0, atol=0)
        torch.testing.assert_close(ck.vae.from_latent(z), vae.from_latent(z), rtol=0, atol=0)
        t = torch.rand(4)
        c = prior_condition(z, 0.2)
        torch.testing.assert_close(ck.eps_net(z, t, c), eps(z, t, c), rtol=0, atol=0)
    m = ck.meta
    assert m["format_version"] == FORMAT_VERSION and m["shape"] == [1, 1, 16] and m["variables"] == ["x"]
    assert m["normalization"] == {"mean": [1.0], "std": [2.0]} and m["latent_scale"] == 1.5
    assert m["note"] == [1, 2] and m["latent_increment_std"] == 0.1 and m["summary"]["recon_rmse"]["x"] == 0.01
    assert not ck.vae.training and not any(p.requires_grad for p in ck.eps_net.parameters())
    assert ck.schedule.eta == 1e-3 and ck.shape == (1, 1, 16)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


def test_checkpoint_mismatch_errors_name_the_file_and_both_sides(tmp_path):
    _, _, path = _ckpt(tmp_path, shape=(3, 8, 8), variables=("u", "v", "h"))
    where = "run.nml: &assim_nml checkpoint"
    with pytest.raises(ValueError, match=r"run.nml: &assim_nml checkpoint = '.*ck.pt': trained on states "
                       r"\(nvar, ny, nx\) = \(3, 8, 8\) with variables \['u', 'v', 'h'\]; the run expects "
                       r"\(nvar, ny, nx\) = \(1, 1, 40\) \(&grid_nml nx = 40, ny = 1, variables = \['x'\]\)"):
        load_checkpoint(path, shape=(1, 1, 40), variables=["x"], where=where)
    with pytest.raises(ValueError, match=r"trained on variables \['u', 'v', 'h'\]; the run has &grid_nml "
                       r"variables = \['u', 'v', 'eta'\]"):
        load_checkpoint(path, shape=(3, 8, 8), variables=["u", "v", "eta"], where=where)
    with pytest.raises(ValueError, match=r"checkpoint '.*nothere.pt': no such file"):
        load_checkpoint(tmp_path / "nothere.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pt': not a readable lodas checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match=r"format version 99 .* reads version 1"):
        load_checkpoint(tmp_path / "v99.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not a lodas checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    vae, eps = _nets((1, 1, 16))
    with pytest.raises(ValueError, match=r"meta.bad: object is not plain checkpoint data"):
        save_checkpoint(tmp_path / "x.pt", vae, eps, {"arch": default_arch((1, 1, 16), **TINY), "variables": ["x"],
                                                      "latent_increment_std": 0.1, "bad": object()})
    vae.set_latent_scale(1.0)
    with pytest.raises(ValueError, match=r"meta needs 'latent_increment_std'"):
        save_checkpoint(tmp_path / "x.pt", vae, eps, {"arch": default_arch((1, 1, 16), **TINY), "variables": ["x"]})


class _Payload:
    """Unpickling this would create a marker file (stands for arbitrary code in a foreign file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    _, _, path = _ckpt(tmp_path)
    payload = torch.load(path, weights_only=True)
    marker = tmp_path / "code_ran"
    payload["summary"] = _Payload(marker)
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt': not a readable lodas checkpoint .*weights_only"):
        load_checkpoint(tmp_path / "evil.pt", shape=(1, 1, 16), variables=["x"])
    assert not marker.exists()


def test_increment_term_is_the_relative_error_of_the_decoded_increment():
    """vae_loss(increment_weight > 0) on (truths; backgrounds) = the state loss (both latents of a
    pair sampled with the same noise) + w * mean((D(z_t) - D(z_b)) - (x_t - x_b))^2_n / ms."""
    vae, _ = _nets((1, 1, 16))
    g = torch.Generator().manual_seed(0)
    xt = torch.cumsum(torch.randn(4, 1, 1, 16, generator=g), -1)
    x = torch.cat([xt, xt + 0.3 * torch.randn(4, 1, 1, 16, generator=g)])
    vae.set_normalization(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)))
    loss, recon, kl = vae_loss(vae, x, 1e-3, torch.Generator().manual_seed(1), increment_weight=0.5,
                               increment_ms=0.2)
    mu, logvar = vae.encode(x)
    xi = torch.randn((4, *mu.shape[1:]), generator=torch.Generator().manual_seed(1))
    xh = vae.decode_normalized(mu + torch.exp(0.5 * logvar) * torch.cat([xi, xi]))
    xn = vae.normalize(x)
    inc = ((xh[:4] - xh[4:]) - (xn[:4] - xn[4:])).pow(2).mean() / 0.2
    torch.testing.assert_close(recon, ((xh - xn) ** 2).mean())
    torch.testing.assert_close(loss, recon + 1e-3 * kl + 0.5 * inc)
    # weight 0: the state loss, one noise draw per state (what the forward pass does)
    loss0, recon0, kl0 = vae_loss(vae, x, 1e-3, torch.Generator().manual_seed(1))
    xh0, _, _ = vae(x, torch.Generator().manual_seed(1))
    assert torch.equal(recon0, ((xh0 - xn) ** 2).mean()) and torch.equal(loss0, recon0 + 1e-3 * kl0)
    with pytest.raises(ValueError, match="even batch of \\(truths, backgrounds\\)"):
        vae_loss(vae, x[:3], 1e-3, increment_weight=1.0)


def test_increment_term_improves_the_oracle_latent_analysis():
    """The term is there for the oracle latent analysis x_b + D(E(x_t)) - D(E(x_b)): a tiny VAE that
    must compress (8 latents for 16 values) keeps the states' large scales when trained on states,
    and the background errors' small scales too when trained with the term: with it, the same
    steps and noise reproduce held-out increments better."""
    g = torch.Generator().manual_seed(3)

    def pairs(n):
        xt = torch.cumsum(torch.randn(n, 1, 1, 16, generator=g), -1)
        phase = 2 * torch.pi * (6 * torch.arange(16) / 16 + torch.rand(n, 1, 1, 1, generator=g))
        return xt, xt + 0.5 * torch.randn(n, 1, 1, 1, generator=g) * torch.cos(phase)     # errors at wavenumber 6

    (xt, xb), (vt, vb) = pairs(64), pairs(64)
    errors = {}
    for w in (0.0, 1.0):
        vae, _ = _nets((1, 1, 16), seed=1, latent_channels=1)
        x = torch.cat([xt, xb])
        vae.set_normalization(x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)))
        ms = float((((xt - xb) / vae.norm_std) ** 2).mean())
        opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
        for step in range(150):
            loss, _, _ = vae_loss(vae, x, 1e-3, torch.Generator().manual_seed(step), increment_weight=w,
                                  increment_ms=ms)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            xa = vb + vae.decode(vae.encode(vt)[0]) - vae.decode(vae.encode(vb)[0])
            errors[w] = float((xa - vt).pow(2).mean().sqrt() / (vb - vt).pow(2).mean().sqrt())
    assert errors[1.0] < 0.5 * errors[0.0], errors               # measured: 0.078 vs 1.03
