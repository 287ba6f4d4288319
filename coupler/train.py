r"""Training of the LO-SDA networks (``lodas train FILE.nml``): a VAE of model states, then a
conditional latent diffusion prior ``p(z | z_b)``, written as one checkpoint
(:mod:`coupler.io.checkpoints`) that ``&assim_nml checkpoint`` names.

**Training pairs** ``(x_t, x_b)``, truth and background, shapes ``(nvar, ny, nx)``, physical
units, come from **cycled** assimilation on the twin set-up of the namelist, drawn on the
*training seed* ``&train_nml seed`` (:func:`coupler.experiment.make_experiment`: its own truth
trajectory, observations and initial state, never those of the evaluation seeds):

* ``'3dvar'``: :func:`~coupler.experiment.run_method` with 3D-Var (``&assim_nml b_scale``)
  recording the cycled backgrounds; Lorenz-96 background RMSE ~0.44;
* ``'etkf'``: :func:`~coupler.assim.etkf.run_etkf` (``&assim_nml etkf_members``, ``inflation``,
  ``etkf_localization``, ``etkf_rtps``) recording the forecast ensemble means; Lorenz-96
  background RMSE ~0.2. With ``etkf_cycles > 0`` it covers only the last ``etkf_cycles`` kept
  cycles: its members start ``etkf_spinup_cycles`` earlier around the 3D-Var source's analysis
  of that time (a state with a cycled error, not the climatological one of the independent
  start, so the filter settles in tens of cycles; on shallow water the LETKF costs 2.8 s per
  cycle, and all 2020 training cycles would take 94 min on one core). Its earlier cycles have no
  background (NaN in :class:`Pairs`; :meth:`Pairs.valid` leaves them out of every phase).

Why cycled backgrounds: a prototype measured that pairs from cycled 3D-Var backgrounds gave
skill, while perturbed-truth backgrounds of the same RMSE gave a prior worse than 3D-Var. The
background errors a prior meets in cycling have the flow-dependent structure of forecast errors
(grown along the unstable directions of the flow), which white or climatological
perturbations lack. And why several sources: 3D-Var backgrounds are broader than those LO-SDA
sees once it beats 3D-Var, so ETKF-cycled backgrounds are mixed in (``background_sources =
'3dvar', 'etkf'``) so that the prior has seen the error levels it meets in cycling. All sources
share the seed's truth trajectory; each keeps ``n_cycles`` cycles after ``spinup_cycles``; the last
``val_fraction`` of the cycles (a contiguous block: consecutive cycles are correlated) is held
out for validation.

**Extra trajectories** (``extra_trajectories``, ``extra_cycles``): one long trajectory holds a
flow's early regime only at its start. On shallow water the first ~100 days after the jets break
up are such a regime (the VAE reconstructs seed 11's truth with RMSE 0.31 on days 20-40 and 0.14
after day 80, and LO-SDA passes 3D-Var only near day 100), so more trajectories, each from its
own independent start and cycled by 3D-Var for ``extra_cycles`` kept cycles, can be prepended to
the training cycles (never to the validation block).

**Forecast leads** (``forecast_leads``): a background of lead ``k`` is the forecast of the
source's analysis of ``k`` cycles before (the lead-1 background integrated ``k - 1`` more cycles
without assimilation). Its errors have the same flow-dependent origin, grown further: the
prior then also knows backgrounds worse than the cycled ones (the start of a cycle, a missed
analysis), which a prior trained on one error level cannot correct (measured on Lorenz-96: a
prior trained on lead 1 only could not pull a background of RMSE 1 back to 0.45).

**Augmentation** (``augment``): the testbeds are invariant under periodic translations, so each
pair is shifted by a random ``(dy, dx)`` (the same for truth and background): Lorenz-96 any
``dx``; shallow water any ``dx`` and ``dy`` a multiple of ``ny / forcing_wavenumber`` (the
Kolmogorov forcing ``sin(2 pi k y / L_y)`` is invariant under ``y -> y + L_y/k`` only).

**Phases**:

1. VAE (:class:`~coupler.assim.latent.StateVAE`) on the training states (the truths and all
   backgrounds), normalised per variable with their mean and std;
   loss ``mean (x_n_hat - x_n)^2 + kl_weight * mean KL`` (:func:`~coupler.assim.latent.vae_loss`);
   with ``increment_weight > 0`` one epoch is every base pair once (its truth and background in
   one batch) and the loss adds the relative squared error of the decoded increment
   ``D(z_t) - D(z_b)`` against ``x_t - x_b``. Validation: the loss, the reconstruction RMSE
   ``D(mu(x))`` per variable, and the *oracle latent analysis* RMSE per variable,
   ``x_b + D(E(x_t)) - D(E(x_b))`` against ``x_t`` on the validation pairs (physical units): the
   best analysis a sampler that found the true latent could give, the bound the VAE sets.
2. Freeze the VAE; ``latent_scale`` = std of ``mu`` over the training states.
3. Prior (:class:`~coupler.assim.latent.ConditionalEpsNet`) on the normalised latent increment
   ``d = (to_latent(x_t) - z_b) / s_d`` conditioned on ``z_b = to_latent(x_b)`` and on the pair's
   relative background error ``e_b`` (:func:`~coupler.assim.latent.prior_condition`), with ``s_d``
   (checkpoint ``latent_increment_std``) the RMS of ``to_latent(x_t) - to_latent(x_b)`` over
   the training pairs, by :func:`coupler.assim.diffusion.denoising_loss` (``t ~ U(0,1)``,
   ``d_t = alpha_t d + sigma_t eps``, loss ``E ||eps_hat - eps||^2`` summed over the latent
   elements, per pair); an exponential moving average (EMA) of its weights is validated and saved.
4. Self-cycling rounds (``self_cycling_rounds``, :func:`self_cycled_pairs`): cycle the
   ``&assim_nml`` diffusion method with the EMA prior on the last ``self_cycling_cycles`` cycles,
   add its backgrounds as the source ``'<method>@<round>'``, and train ``self_cycling_epochs``
   more epochs from the EMA weights (fresh optimiser and schedule) on every own pair plus as
   many pairs drawn from the other sources; ``latent_increment_std`` and the VAE stay fixed.
5. Evaluation (``eval_pairs``): the EMA prior is sampled (8 members, ``&assim_nml n_steps``, no
   observations) for validation backgrounds; the decoded ensemble-mean RMSE against the truth is
   reported next to the background's (the prior's conditional mean should not be worse than
   ``x_b``) and the ensemble spread (calibrated when close to that RMSE).

Adam, with a linear warm-up (``min(100, steps/20)`` steps) then ``lr_schedule`` decay over each
phase. **Resumable**: after every epoch the training state (models, optimiser, EMA, epoch
counters, history) is written atomically to ``<checkpoint>.state.pt`` and the pairs once to
``<checkpoint>.pairs.pt``; ``--resume`` continues from them. Every random draw of epoch ``e`` of
phase ``p`` comes from a generator seeded by ``(seed, p, e)``, so a resumed run equals an
uninterrupted one bit for bit (same thread count and device). The final checkpoint is written
atomically at the end; the state files are then removed unless ``keep_state``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bridges.namelist import NamelistError
from coupler.assim.latent import prior_condition, relative_error

log = logging.getLogger("lodas")

__all__ = ["train", "make_pairs", "Pairs", "format_summary", "state_paths", "EVAL_MEMBERS"]

STATE_FORMAT = "lodas-train-state"
STATE_VERSION = 2
EVAL_MEMBERS = 8
_VAE, _PRIOR, _VAL, _INIT, _ROUND, _EXTRA = 1, 2, 3, 4, 5, 6    # random-stream (and seed) tags
#: &train_nml keys that do not change the result (left out of the resume fingerprint).
#: self_cycling_rounds: more rounds extend a kept run (--resume) without changing what was done.
_NOT_FINGERPRINTED = ("checkpoint", "threads", "device", "keep_state", "eval_pairs", "self_cycling_rounds")


@dataclass
class Pairs:
    """Training pairs (``n`` kept cycles, ``S`` background sources): the cycles of any extra
    trajectories, then those of the seed trajectory, whose last ``n_val`` are validation.

    Attributes:
        truth: ``(n, nvar, ny, nx)`` float32, physical units.
        background: ``(S, n, nvar, ny, nx)`` float32: source ``s``'s background of each cycle.
        sources: the ``S`` source names.
        n_val: the last ``n_val`` cycles are validation, the first ``n - n_val`` training.
        info: per source, the background RMSE over the validation cycles, and timings.
    """

    truth: torch.Tensor
    background: torch.Tensor
    sources: list
    n_val: int
    info: dict

    @property
    def n_train(self) -> int:
        return self.truth.shape[0] - self.n_val

    def valid(self) -> torch.Tensor:
        """``(S, n)`` bool: the cycles for which source ``s`` has a background (a self-cycled
        source covers only the last cycles; the others are NaN)."""
        return torch.isfinite(self.background.flatten(2)).all(-1)

    def pair_ids(self, sources) -> torch.Tensor:
        """Flat ids ``s * n_train + c`` of the valid training pairs of the given source indices."""
        v = self.valid()[:, : self.n_train]
        ids = [s * self.n_train + torch.nonzero(v[s]).flatten() for s in sources]
        return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)

    def batches(self, source: int, part: str, size: int, device="cpu"):
        """``(x_t, x_b)`` of source ``source``'s valid pairs of ``part`` (``'train'`` or ``'val'``),
        in cycle order, ``size`` pairs at a time, on ``device``."""
        cycles = slice(None, self.n_train) if part == "train" else slice(self.n_train, None)
        rows = torch.nonzero(self.valid()[source, cycles]).flatten() + (0 if part == "train" else self.n_train)
        for sl in _chunks(len(rows), size):
            yield self.truth[rows[sl]].to(device), self.background[source, rows[sl]].to(device)


def state_paths(checkpoint: str | Path) -> tuple[Path, Path]:
    """``(<checkpoint>.state.pt, <checkpoint>.pairs.pt)``: the resumable training state and the pairs."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".state.pt"), p.with_name(p.name + ".pairs.pt")


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _generator(device, *words: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(_seed(*words))
    return g


def _check_config(cfg):
    t = cfg.train
    if t is None:
        raise NamelistError(f"{cfg.path}: lodas train needs a &train_nml group (keys: checkpoint, seed, n_cycles, "
                            f"background_sources, vae_epochs, prior_epochs, ...)")
    if not t.checkpoint:
        raise NamelistError(f"{cfg.path}: &train_nml checkpoint = '': name the output checkpoint file")
    if t.seed in (cfg.coupler.seed, 11):
        raise NamelistError(f"{cfg.path}: &train_nml seed = {t.seed} is an evaluation seed (&coupler_nml seed = "
                            f"{cfg.coupler.seed}; 11 is used for tuning): train on another truth trajectory")
    if len(set(t.background_sources)) != len(t.background_sources) or not t.background_sources:
        raise NamelistError(f"{cfg.path}: &train_nml background_sources = {t.background_sources}: expected distinct "
                            f"sources among '3dvar', 'etkf'")
    if t.self_cycling_rounds:
        from coupler.methods import ENSEMBLE_METHODS

        if cfg.assim.method not in ENSEMBLE_METHODS:
            raise NamelistError(f"{cfg.path}: &train_nml self_cycling_rounds = {t.self_cycling_rounds} cycles the "
                                f"&assim_nml method, which must be a diffusion method {ENSEMBLE_METHODS}; got "
                                f"method = '{cfg.assim.method}'")
        n_val = int(round(t.val_fraction * t.n_cycles))
        if t.self_cycling_cycles <= n_val or t.self_cycling_cycles > t.n_cycles:
            raise NamelistError(f"{cfg.path}: &train_nml self_cycling_cycles = {t.self_cycling_cycles}: expected more "
                                f"than the {n_val} validation cycles and at most n_cycles = {t.n_cycles}")
    if t.etkf_cycles and "etkf" in t.background_sources:
        n_val = int(round(t.val_fraction * t.n_cycles))
        if "3dvar" not in t.background_sources:
            raise NamelistError(f"{cfg.path}: &train_nml etkf_cycles = {t.etkf_cycles} starts the etkf source around "
                                f"the 3dvar source's analysis: add '3dvar' to background_sources = "
                                f"{t.background_sources} (or set etkf_cycles = 0)")
        if t.etkf_cycles <= n_val or t.etkf_cycles > t.n_cycles:
            raise NamelistError(f"{cfg.path}: &train_nml etkf_cycles = {t.etkf_cycles}: expected more than the {n_val} "
                                f"validation cycles and at most n_cycles = {t.n_cycles}")
        if t.etkf_cycles + t.etkf_spinup_cycles >= t.n_cycles + t.spinup_cycles:
            raise NamelistError(f"{cfg.path}: &train_nml etkf_spinup_cycles = {t.etkf_spinup_cycles}: with etkf_cycles "
                                f"= {t.etkf_cycles} the etkf source would start before the first 3D-Var analysis "
                                f"(expected etkf_cycles + etkf_spinup_cycles < n_cycles + spinup_cycles = "
                                f"{t.n_cycles + t.spinup_cycles})")
    if t.extra_trajectories and "3dvar" not in t.background_sources:
        raise NamelistError(f"{cfg.path}: &train_nml extra_trajectories = {t.extra_trajectories} are cycled by the "
                            f"3dvar source: add '3dvar' to background_sources = {t.background_sources} (or set "
                            f"extra_trajectories = 0)")
    if len(set(t.forecast_leads)) != len(t.forecast_leads):
        raise NamelistError(f"{cfg.path}: &train_nml forecast_leads = {t.forecast_leads}: expected distinct leads")
    if t.spinup_cycles < max(t.forecast_leads) - 1:
        raise NamelistError(f"{cfg.path}: &train_nml forecast_leads = {t.forecast_leads} needs spinup_cycles >= "
                            f"{max(t.forecast_leads) - 1} (the longest lead minus one), got {t.spinup_cycles}")
    n_val = int(round(t.val_fraction * t.n_cycles))
    if n_val < 1 or t.n_cycles - n_val < 1:
        raise NamelistError(f"{cfg.path}: &train_nml val_fraction = {t.val_fraction} with n_cycles = {t.n_cycles} "
                            f"leaves {n_val} validation and {t.n_cycles - n_val} training cycles; both must be >= 1")
    g = cfg.grid
    f = 2 ** t.levels
    if g.nx % f or (g.ny > 1 and g.ny % f):
        raise NamelistError(f"{cfg.path}: &train_nml levels = {t.levels}: the grid (&grid_nml ny = {g.ny}, nx = "
                            f"{g.nx}) must be divisible by 2**levels = {f}")
    return t


def _fingerprint(cfg) -> dict:
    """What must not change between an interrupted run and its resumption."""
    t = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _NOT_FINGERPRINTED}
    groups = {name: dataclasses.asdict(getattr(cfg, name)) for name in ("grid", "obs", "twin", "assim")}
    groups["model"] = dataclasses.asdict(cfg.model)
    return {"train": t, **groups}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} (state) vs {vb!r} (now)")
    return out


def arch_of(cfg) -> dict:
    """The :func:`~coupler.assim.latent.build_networks` arch of ``&train_nml`` and the grid."""
    t = cfg.train
    return dict(shape=list(cfg.state_shape), latent_channels=t.latent_channels, width=t.width, levels=t.levels,
                channel_mult=list(t.channel_mult), blocks=t.blocks, prior_width=t.prior_width,
                prior_blocks=t.prior_blocks, time_features=64, schedule_eta=t.schedule_eta)


def shift_steps(cfg) -> tuple[int, int]:
    """``(y_step, x_step)``: augmentation shifts are multiples of these (0: no shift on that axis).

    A shift must be a symmetry of the whole twin set-up, model *and* observing network, or the
    shifted pair's background error would sit where the network does not put it: the shallow-water
    forcing allows ``y`` shifts by ``ny / forcing_wavenumber`` only, and an ``every_k`` network
    (the same points for every seed: Lorenz-96 with every other variable observed) shifts by
    multiples of ``every_k`` on both axes (no shift on an axis that the step does not tile).
    Random stations are drawn anew for every seed, so the evaluation network is not the training
    one and any shift is as good as none (the prior learns the errors of a homogeneous network of
    that density); footprint boxes are not treated as a constraint (their box phase changes a
    background error little).
    """
    ny, nx = cfg.grid.ny, cfg.grid.nx
    k_net = int(cfg.obs.every_k) if "every_k" in cfg.obs.network else 1

    def periodic(step: int, n: int) -> int:            # 0 (no shift) unless the step tiles the axis
        return step if step < n and n % step == 0 else 0

    y_step = 0
    if ny > 1 and cfg.twin.model == "sw":
        k = cfg.sw.forcing_wavenumber if cfg.sw is not None else 0
        y_step = periodic(math.lcm(ny // k, k_net), ny) if k and ny % k == 0 else 0
    return y_step, periodic(k_net, nx)


def random_shift(tensors: list[torch.Tensor], gen: torch.Generator, steps: tuple[int, int]) -> list[torch.Tensor]:
    """Shift each sample ``b`` of every ``(B, nvar, ny, nx)`` tensor periodically by the same random
    ``(dy_b, dx_b)`` (multiples of ``steps``; a step of 0 leaves that axis alone)."""
    x0 = tensors[0]
    B, _, ny, nx = x0.shape
    dev = x0.device
    out = list(tensors)
    y_step, x_step = steps
    if x_step:
        dx = torch.randint(0, nx // x_step, (B,), generator=gen, device=gen.device).to(dev) * x_step
        ix = (torch.arange(nx, device=dev)[None, :] + dx[:, None]) % nx
        out = [torch.gather(t, 3, ix[:, None, None, :].expand(t.shape)) for t in out]
    if y_step:
        dy = torch.randint(0, ny // y_step, (B,), generator=gen, device=gen.device).to(dev) * y_step
        iy = (torch.arange(ny, device=dev)[None, :] + dy[:, None]) % ny
        out = [torch.gather(t, 2, iy[:, None, :, None].expand(t.shape)) for t in out]
    return out


# -- data -------------------------------------------------------------------------------------
def make_pairs(cfg) -> Pairs:
    """Cycle every ``&train_nml background_sources`` on the training seed; keep the pairs after
    ``spinup_cycles`` (see the module docstring)."""
    from coupler.experiment import make_experiment, run_method
    from coupler.methods import make_method

    t = cfg.train
    n_total = t.spinup_cycles + t.n_cycles
    t0 = time.perf_counter()
    exp = make_experiment(cfg, seed=t.seed, n_cycles=n_total)
    info = {"experiment_s": time.perf_counter() - t0, "sources": {}}
    n_val = int(round(t.val_fraction * t.n_cycles))
    keep = slice(t.spinup_cycles, None)
    truth = exp.truth[keep]
    backgrounds, names, made = [], [], []               # made: (source, lead) of each name
    runs: dict = {}

    def cycled_3dvar() -> dict:                  # shared by the 3dvar source and a late-started etkf
        if "3dvar" not in runs:
            cfg3 = dataclasses.replace(cfg, assim=dataclasses.replace(cfg.assim, method="3dvar"))
            runs["3dvar"] = run_method(exp, make_method(cfg3, covariance=exp.covariance), record_backgrounds=True,
                                       record_analyses=t.etkf_cycles > 0 and "etkf" in t.background_sources)
        return runs["3dvar"]

    for src in t.background_sources:
        t1 = time.perf_counter()
        first = 0                                           # the first cycle (of n_total) that gives pairs
        if src == "3dvar":
            s = cycled_3dvar()
            b = np.asarray(s["backgrounds"])
        elif t.etkf_cycles:
            # late start: cycle c0 is the first of the ensemble source, its members drawn around the 3D-Var
            # analysis of cycle c0 - 1 (valid at the model time the ensemble starts from)
            c0 = n_total - t.etkf_cycles - t.etkf_spinup_cycles
            late = dataclasses.replace(exp, times=exp.times[c0:], truth=exp.truth[c0:],
                                       observations=exp.observations[c0:], x_b0=cycled_3dvar()["analyses"][c0 - 1])
            from coupler.bench import etkf_run

            s = etkf_run(late, spinup_cycles=t.etkf_spinup_cycles, record_backgrounds=True)
            b = np.concatenate([np.full((c0, *exp.truth.shape[1:]), np.nan), s["backgrounds"]])
            first = c0 + t.etkf_spinup_cycles               # its spin-up cycles give no pairs
        else:
            from coupler.bench import etkf_run

            s = etkf_run(exp, spinup_cycles=t.spinup_cycles, record_backgrounds=True)   # exp.seed is t.seed
            b = np.asarray(s["backgrounds"])
        if b.shape != exp.truth.shape:
            raise RuntimeError(f"{src}: recorded {b.shape[0]} backgrounds for {exp.n_cycles} cycles")
        covered = np.isfinite(b).reshape(len(b), -1).all(1)             # the cycles this source has run
        if not np.all(np.isfinite(b[covered.argmax():])):
            raise RuntimeError(f"{src}: non-finite backgrounds in the training run (filter divergence)")
        for lead in t.forecast_leads:
            t2 = time.perf_counter()
            name = src if lead == 1 else f"{src}+{lead}"
            # lead k: the forecast of the analysis of k cycles before = the lead-1 background of
            # k - 1 cycles before, integrated k - 1 more cycles without assimilation (NaN where the
            # source has no background k - 1 cycles before)
            bk = _lead_backgrounds(exp, b, lead)
            if first:
                bk = bk.copy() if bk is b else bk
                bk[:first] = np.nan
            bk = bk[keep]
            err = bk - truth
            info["sources"][name] = {
                "kept_cycles": int(np.isfinite(bk).reshape(len(bk), -1).all(1).sum()),
                "background_rmse_train": float(np.sqrt(np.nanmean(err[:-n_val] ** 2))),
                "background_rmse_val": float(np.sqrt(np.nanmean(err[-n_val:] ** 2))),
                "analysis_rmse": float(s["analysis_rmse"]), "seconds": time.perf_counter() - t1}
            log.info("training pairs from cycled %s, forecast lead %d cycle(s): %d cycles, background RMSE %.4f "
                     "(%.1f s)", src, lead, info["sources"][name]["kept_cycles"],
                     info["sources"][name]["background_rmse_train"], time.perf_counter() - t2)
            backgrounds.append(torch.from_numpy(bk.astype(np.float32)))
            names.append(name)
            made.append((src, lead))
    if t.extra_trajectories:
        truth, backgrounds = _extra_trajectories(cfg, made, truth, backgrounds, info)
    return Pairs(truth=torch.from_numpy(truth.astype(np.float32)), background=torch.stack(backgrounds),
                 sources=names, n_val=n_val, info=info)


def _lead_backgrounds(exp, b: np.ndarray, lead: int) -> np.ndarray:
    """Backgrounds of forecast lead ``lead`` from the lead-1 backgrounds ``b`` ``(n, *shape)`` of one
    cycled run on ``exp``: the background of ``lead - 1`` cycles before integrated ``lead - 1``
    more cycles without assimilation; NaN where there is none (the first cycles, or where ``b``
    is NaN)."""
    if lead == 1:
        return b
    covered = np.isfinite(b).reshape(len(b), -1).all(1)
    bk = np.full_like(b, np.nan)
    rows = np.nonzero(covered[: len(b) - lead + 1])[0]
    bk[rows + lead - 1] = exp.model.step(b[rows], (lead - 1) * exp.steps_per_cycle)
    return bk


def _extra_trajectories(cfg, made: list, truth: np.ndarray, backgrounds: list, info: dict):
    """``&train_nml extra_trajectories``: prepend to the kept cycles of the seed trajectory
    (``truth`` ``(n, *shape)``, ``backgrounds`` one ``(n, *shape)`` tensor per ``(source, lead)``
    of ``made``) the ``extra_cycles`` kept cycles of each extra truth trajectory, cycled by 3D-Var
    only (its leads of the ``'3dvar'`` source; the other sources NaN there). Prepended, they are training
    cycles; the validation block stays the end of the seed trajectory. Trajectory ``k`` uses the
    experiment seed ``_seed(seed, _EXTRA, k)``: its own truth, observations, station network and
    independent start. Returns the new ``(truth, backgrounds)``; ``info['extra_trajectories']``
    gets each one's seed and 3D-Var background RMSE."""
    from coupler.experiment import make_experiment, run_method
    from coupler.methods import make_method

    t = cfg.train
    cfg3 = dataclasses.replace(cfg, assim=dataclasses.replace(cfg.assim, method="3dvar"))
    truths, extra = [], [[] for _ in made]
    info["extra_trajectories"] = []
    for k in range(t.extra_trajectories):
        t0 = time.perf_counter()
        seed = _seed(t.seed, _EXTRA, k)
        exp = make_experiment(cfg, seed=seed, n_cycles=t.spinup_cycles + t.extra_cycles)
        s = run_method(exp, make_method(cfg3, covariance=exp.covariance), record_backgrounds=True)
        b = np.asarray(s["backgrounds"])
        if not np.all(np.isfinite(b)):
            raise RuntimeError(f"extra trajectory {k} (seed {seed}): non-finite 3D-Var backgrounds")
        xt = exp.truth[t.spinup_cycles:]
        truths.append(xt)
        for i, (src, lead) in enumerate(made):
            bk = _lead_backgrounds(exp, b, lead)[t.spinup_cycles:] if src == "3dvar" else np.full_like(xt, np.nan)
            extra[i].append(torch.from_numpy(bk.astype(np.float32)))
        rmse = float(np.sqrt(np.mean((b[t.spinup_cycles:] - xt) ** 2)))
        info["extra_trajectories"].append({"seed": seed, "cycles": t.extra_cycles, "background_rmse_3dvar": rmse,
                                           "seconds": time.perf_counter() - t0})
        log.info("extra trajectory %d (seed %d): %d cycles of cycled 3dvar, background RMSE %.4f (%.1f s)", k, seed,
                 t.extra_cycles, rmse, time.perf_counter() - t0)
    truth = np.concatenate([*truths, truth])
    backgrounds = [torch.cat([*e, b]) for e, b in zip(extra, backgrounds)]
    return truth, backgrounds


def self_cycled_pairs(cfg, run: "_Run", pairs: Pairs, round_no: int) -> Pairs:
    """Self-cycling round ``round_no`` (1-based): ``pairs`` plus the source
    ``'<method>@<round_no>'``, the backgrounds of the ``&assim_nml`` diffusion method cycled with
    the prior trained so far (its EMA weights) on the training trajectory.

    The run starts from the first source's background ``spinup_cycles + 1`` cycles before the
    last ``self_cycling_cycles`` kept cycles and cycles to the end of the trajectory; the first
    ``spinup_cycles`` of its backgrounds are dropped, so the new source covers exactly the last
    ``self_cycling_cycles`` cycles (the validation block included) and is NaN before them.

    Why: a prior trained on 3D-Var (and ETKF) backgrounds is the prior of *those* systems;
    once the method beats 3D-Var its own backgrounds are better, and their errors have its own
    structure. Training on them (as DAgger does for imitation learning) makes the prior the
    conditional of the backgrounds it actually meets. Measured with a direct learned analysis on
    Lorenz-96 (``benchmarks/self_cycling_bound.py``, tuning seed 11, 3D-Var 0.416): 0.374 trained
    on 3D-Var backgrounds, 0.351 after one round on its own, 0.318 after two.
    """
    from coupler.assim.latent_da import LatentDiffusionAssimilation
    from coupler.experiment import make_experiment, run_method

    t = cfg.train
    off = pairs.truth.shape[0] - t.n_cycles                # extra trajectories come first: the seed one is last
    n = t.n_cycles
    keep_from = n - t.self_cycling_cycles                  # kept index of the first own background kept
    start = max(0, keep_from - t.spinup_cycles - 1)        # kept index of the background the run starts from
    t0 = time.perf_counter()
    cfg_r = dataclasses.replace(cfg, coupler=dataclasses.replace(cfg.coupler, seed=t.seed),
                                twin=dataclasses.replace(cfg.twin, spinup_cycles=keep_from - start - 1))
    exp = make_experiment(cfg_r, seed=t.seed, n_cycles=t.spinup_cycles + n)
    a0 = t.spinup_cycles + start                           # its absolute cycle
    m = exp.n_cycles - a0 - 1
    sub = dataclasses.replace(exp, times=exp.times[:m], truth=exp.truth[a0 + 1:], observations=exp.observations[a0 + 1:],
                              x_b0=pairs.background[0, off + start].double().numpy())
    meta = {"schedule_eta": t.schedule_eta, "latent_increment_std": run.increment_std,
            "background_error": run.relative_errors}
    method = LatentDiffusionAssimilation.from_networks(cfg_r, run.vae, run.ema, meta, device=run.device,
                                                       where="the prior being trained")
    name = f"{cfg.assim.method}@{round_no}"
    log.info("self-cycling round %d: cycling %s with the prior trained so far over %d cycles (%d kept)", round_no,
             cfg.assim.method, m, t.self_cycling_cycles)
    res = run_method(sub, method, record_backgrounds=True)
    b = np.full((n, *pairs.truth.shape[1:]), np.nan, dtype=np.float32)
    b[start + 1:] = res["backgrounds"]
    b[:keep_from] = np.nan
    if not np.all(np.isfinite(b[keep_from:])):
        raise RuntimeError(f"self-cycling round {round_no}: non-finite backgrounds when cycling {cfg.assim.method} "
                           f"with the prior trained so far (filter divergence); check &assim_nml")
    truth = pairs.truth[off:].numpy()
    n_tr = n - pairs.n_val
    err_tr, err_val = b[keep_from:n_tr] - truth[keep_from:n_tr], b[n_tr:] - truth[n_tr:]
    info = dict(pairs.info)
    info["sources"] = dict(info["sources"])
    info["sources"][name] = {"background_rmse_train": float(np.sqrt(np.mean(err_tr ** 2))),
                             "background_rmse_val": float(np.sqrt(np.mean(err_val ** 2))),
                             "analysis_rmse": float(res["analysis_rmse"]), "cycles": int(t.self_cycling_cycles),
                             "wall_s_per_cycle": float(res["wall_s_per_cycle"]),
                             "seconds": time.perf_counter() - t0}
    log.info("self-cycling round %d: %s analysis RMSE %.4f, background RMSE %.4f (train) %.4f (val) (%.1f s)",
             round_no, cfg.assim.method, res["analysis_rmse"], info["sources"][name]["background_rmse_train"],
             info["sources"][name]["background_rmse_val"], time.perf_counter() - t0)
    b = np.concatenate([np.full((off, *b.shape[1:]), np.nan, dtype=np.float32), b])
    return Pairs(truth=pairs.truth, background=torch.cat([pairs.background, torch.from_numpy(b)[None]]),
                 sources=pairs.sources + [name], n_val=pairs.n_val, info=info)


def _pairs_payload(pairs: Pairs, fingerprint: dict) -> dict:
    return {"format": "lodas-train-pairs", "fingerprint": fingerprint, "truth": pairs.truth,
            "background": pairs.background, "sources": pairs.sources, "n_val": pairs.n_val, "info": pairs.info}


# -- optimisation helpers ----------------------------------------------------------------------
def lr_at(step: int, total: int, base: float, kind: str) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``total`` in a phase."""
    warm = min(100, max(1, total // 20))
    if step < warm:
        return base * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    if kind == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
    if kind == "step":
        return base * (1.0 if p < 0.6 else 0.1 if p < 0.85 else 0.01)
    return base


def _epoch_generators(seed: int, phase: int, epoch: int, device: str) -> tuple[torch.Generator, torch.Generator]:
    """``(cpu, device)`` generators of one epoch (the same one on the CPU): every random draw of
    epoch ``epoch`` of ``phase`` comes from ``(seed, phase, epoch)``, so a resumed run repeats it."""
    g = _generator("cpu", seed, phase, epoch)
    return g, (g if device == "cpu" else _generator(device, seed, phase, epoch))


def _optimise(run, loss: torch.Tensor, total: int) -> None:
    """One optimiser step on ``loss`` at step ``run.step`` of ``total`` of the phase's schedule."""
    t = run.t
    for group in run.opt.param_groups:
        group["lr"] = lr_at(run.step, total, t.lr, t.lr_schedule)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.step += 1


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(d).add_(pm, alpha=1.0 - d)


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


class _Progress:
    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False, unit="step")

    def update(self, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3e}", refresh=False)

    def close(self) -> None:
        self.bar.close()


# -- the training run ------------------------------------------------------------------------
class _Run:
    """Everything one training run holds (models, optimiser state, counters); saved every epoch."""

    def __init__(self, cfg, device: str):
        from coupler.assim.latent import build_networks

        self.cfg, self.t, self.device = cfg, cfg.train, device
        self.arch = arch_of(cfg)
        torch.manual_seed(_seed(self.t.seed, _INIT))
        self.vae, self.eps_net = build_networks(self.arch)
        self.vae.to(device)
        self.eps_net.to(device)
        self.ema = copy.deepcopy(self.eps_net).requires_grad_(False)
        self.opt = torch.optim.Adam(self.vae.parameters(), lr=self.t.lr)
        self.phase, self.vae_epoch, self.prior_epoch, self.step = "vae", 0, 0, 0
        self.round, self.round_epoch = 0, 0       # self-cycling rounds completed, epochs of the current one
        self.history: list[dict] = []
        self.wall_s = 0.0
        self.latent_errors: dict = {}
        self.relative_errors: dict = {}

    @property
    def increment_std(self) -> float:
        """``s_d``: the RMS latent increment ``to_latent(x_t) - to_latent(x_b)`` of the training pairs."""
        return float(self.latent_errors["all"])

    def start_prior(self) -> None:
        self.phase, self.step = "prior", 0
        self.vae.eval().requires_grad_(False)
        self.opt = torch.optim.Adam(self.eps_net.parameters(), lr=self.t.lr)

    def start_round(self, round_no: int) -> None:
        """Self-cycling round ``round_no``: continue from the EMA weights, with a fresh optimiser and
        learning-rate schedule (the EMA restarts its warm-up from them)."""
        self.eps_net.load_state_dict(self.ema.state_dict())
        self.phase, self.step, self.round_epoch = f"round{round_no}", 0, 0
        self.opt = torch.optim.Adam(self.eps_net.parameters(), lr=self.t.lr)

    def state(self, fingerprint: dict) -> dict:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": fingerprint, "phase": self.phase,
                "vae_epoch": self.vae_epoch, "prior_epoch": self.prior_epoch, "step": self.step,
                "round": self.round, "round_epoch": self.round_epoch,
                "vae": self.vae.state_dict(), "eps": self.eps_net.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "history": self.history, "wall_s": self.wall_s,
                "latent_errors": self.latent_errors, "relative_errors": self.relative_errors}

    def restore(self, st: dict) -> None:
        self.vae.load_state_dict(st["vae"])
        self.eps_net.load_state_dict(st["eps"])
        self.ema.load_state_dict(st["ema"])
        self.vae_epoch, self.prior_epoch = int(st["vae_epoch"]), int(st["prior_epoch"])
        self.round, self.round_epoch = int(st["round"]), int(st["round_epoch"])
        self.history, self.wall_s = list(st["history"]), float(st["wall_s"])
        self.latent_errors = dict(st["latent_errors"])
        self.relative_errors = dict(st["relative_errors"])
        if st["phase"] != "vae":
            self.start_prior()
            self.phase = st["phase"]
        self.opt.load_state_dict(st["opt"])
        self.step = int(st["step"])


def _save_state(path: Path, run: _Run, fingerprint: dict) -> None:
    from coupler.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(run.state(fingerprint), tmp)


def _load(path: Path, what: str) -> dict:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: unreadable {what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                         f"delete it or run without --resume") from None


def _device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("&train_nml device = 'cuda': no CUDA device is available")
    return requested


def _oracle_rmse(vae, pairs: Pairs, sources: list[int], names: list[str], device) -> dict:
    """RMSE per variable (and ``'all'``) of the oracle latent analysis ``x_b + D(E(x_t)) - D(E(x_b))``
    against ``x_t`` over the validation pairs of ``sources`` (physical units)."""
    se, n = torch.zeros(vae.shape[0], dtype=torch.float64), 0
    with torch.no_grad():
        for s in sources:
            for xt, xb in pairs.batches(s, "val", 256, device):
                inc = vae.from_latent(vae.to_latent(xt)) - vae.from_latent(vae.to_latent(xb))
                se += ((xb + inc - xt).double() ** 2).sum(dim=(0, 2, 3)).cpu()
                n += xt.shape[0]
    m = max(n, 1) * vae.shape[1] * vae.shape[2]
    out = {v: float(torch.sqrt(e / m)) for v, e in zip(names, se)}
    out["all"] = float(torch.sqrt(se.sum() / (m * vae.shape[0])))
    return out


def _vae_validate(run: _Run, val_states: torch.Tensor, pairs: Pairs, base: list[int]) -> dict:
    from coupler.assim.latent import vae_loss

    vae, t = run.vae, run.t
    g = _generator(run.device, t.seed, _VAL, 0)
    se = torch.zeros(vae.shape[0], dtype=torch.float64)
    loss_sum, n = 0.0, val_states.shape[0]
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        for sl in _chunks(n, 256):
            x = val_states[sl].to(run.device)
            loss, _, _ = vae_loss(vae, x, t.kl_weight, g)
            loss_sum += loss.item() * x.shape[0]
            mu, _ = vae.encode(x)
            se += ((vae.decode(mu) - x).double() ** 2).sum(dim=(0, 2, 3)).cpu()
    names = list(run.cfg.grid.variables)
    oracle = _oracle_rmse(vae, pairs, base, names, run.device)
    vae.train(was_training)
    per_var = torch.sqrt(se / (n * vae.shape[1] * vae.shape[2]))
    return {"val_loss": loss_sum / n, "recon_rmse": {v: float(r) for v, r in zip(names, per_var)},
            "recon_rmse_all": float(torch.sqrt(se.sum() / (n * vae.shape[1] * vae.shape[2] * vae.shape[0]))),
            "oracle_rmse": oracle}


def _prior_validate(run: _Run, pairs: Pairs, repeats: int = 2) -> float:
    from coupler.assim.diffusion import CosineSchedule, denoising_loss

    schedule = CosineSchedule(run.t.schedule_eta)
    g = _generator(run.device, run.t.seed, _VAL, 1)
    vae, net = run.vae, run.ema
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(len(pairs.sources)):
            for xt, xb in pairs.batches(s, "val", 256, run.device):
                zb = vae.to_latent(xb)
                d = (vae.to_latent(xt) - zb) / run.increment_std
                c = prior_condition(zb, relative_error(vae, xb, xt))
                for _ in range(repeats):
                    total += float(denoising_loss(net, d, c, schedule, generator=g)) * d.shape[0]
                    n += d.shape[0]
    return total / n


def _latent_scale(run: _Run, states: torch.Tensor) -> float:
    s1 = s2 = 0.0
    n = 0
    with torch.no_grad():
        for sl in _chunks(states.shape[0], 512):
            mu = run.vae.encode(states[sl].to(run.device))[0].double()
            s1 += float(mu.sum())
            s2 += float((mu ** 2).sum())
            n += mu.numel()
    mean = s1 / n
    return math.sqrt(max(s2 / n - mean * mean, 1e-12))


def _pair_errors(run: _Run, pairs: Pairs, sources=None) -> tuple[dict, dict]:
    """Background errors of the training pairs of ``sources`` (indices; all by default), per
    source and ``'all'`` (over those sources), in one pass:

    - the RMS of ``to_latent(x_t) - to_latent(x_b)`` (``'all'`` over the base sources is the
      prior's ``latent_increment_std`` ``s_d``: it trains on ``(z_t - z_b) / s_d``);
    - the mean of :func:`~coupler.assim.latent.relative_error` (the ``e_b`` of the pairs; the
      per-source values bound the innovation estimate of ``&assim_nml background_error = 0``).
    """
    sources = range(len(pairs.sources)) if sources is None else sources
    latent, relative = {}, {}
    lat_tot = rel_tot = 0.0
    n_lat = n_rel = 0
    with torch.no_grad():
        for s in sources:
            lat = rel = 0.0
            m = rows = 0
            for xt, xb in pairs.batches(s, "train", 512, run.device):
                d = (run.vae.to_latent(xt) - run.vae.to_latent(xb)).double()
                lat += float((d ** 2).sum())
                m += d.numel()
                rel += float(relative_error(run.vae, xb, xt).sum())
                rows += xt.shape[0]
            latent[pairs.sources[s]], relative[pairs.sources[s]] = math.sqrt(lat / m), rel / rows
            lat_tot, rel_tot, n_lat, n_rel = lat_tot + lat, rel_tot + rel, n_lat + m, n_rel + rows
    latent["all"] = math.sqrt(lat_tot / n_lat)
    relative["all"] = rel_tot / n_rel
    return latent, relative


def _evaluate(run: _Run, pairs: Pairs) -> dict:
    """Sample the EMA prior (no observations) for evenly spaced validation pairs of every source."""
    from coupler.assim.diffusion import CosineSchedule, member_generators, sample

    t, cfg = run.t, run.cfg
    per_source = max(1, t.eval_pairs // len(pairs.sources))
    idx = np.unique(np.linspace(0, pairs.n_val - 1, min(per_source, pairs.n_val)).round().astype(int))
    schedule = CosineSchedule(t.schedule_eta)
    names = list(cfg.grid.variables)
    vae, M = run.vae, EVAL_MEMBERS
    out = {}
    valid = pairs.valid()[:, pairs.n_train:].numpy()
    for s, src in enumerate(pairs.sources):
        se = {k: torch.zeros(len(names), dtype=torch.float64) for k in ("b", "mean", "spread", "recon")}
        idx_s = idx[valid[s, idx]]
        for chunk in np.array_split(idx_s, max(1, len(idx_s) // 16)):
            if not len(chunk):
                continue
            xt = pairs.truth[pairs.n_train + chunk].to(run.device)
            xb = pairs.background[s, pairs.n_train + chunk].to(run.device)
            with torch.no_grad():
                zb = vae.to_latent(xb)
                cond = prior_condition(zb, relative_error(vae, xb, xt)).repeat_interleave(M, dim=0)
                gens = [g for j in chunk for g in member_generators(t.seed, int(j) + 100000 * s, range(M),
                                                                     device=run.device)]
                d = sample(run.ema, cond, gens, schedule, cfg.assim.n_steps, stochastic=cfg.assim.stochastic,
                           shape=zb.shape[1:])
                z = zb.repeat_interleave(M, dim=0) + run.increment_std * d
                xs = vae.from_latent(z).reshape(len(chunk), M, *xt.shape[1:]).double()
                recon = vae.from_latent(vae.to_latent(xt)).double()
            xt64 = xt.double()
            se["b"] += ((xb.double() - xt64) ** 2).sum(dim=(0, 2, 3)).cpu()
            se["mean"] += ((xs.mean(1) - xt64) ** 2).sum(dim=(0, 2, 3)).cpu()
            se["spread"] += xs.var(1, unbiased=True).sum(dim=(0, 2, 3)).cpu()
            se["recon"] += ((recon - xt64) ** 2).sum(dim=(0, 2, 3)).cpu()
        npts = len(idx_s) * cfg.grid.ny * cfg.grid.nx
        res = {"pairs": int(len(idx_s)), "members": M}
        for key, name in (("b", "background_rmse"), ("mean", "prior_mean_rmse"), ("spread", "prior_spread"),
                          ("recon", "truth_recon_rmse")):
            res[name] = float(torch.sqrt(se[key].sum() / (npts * len(names))))
            res[name + "_per_variable"] = {v: float(torch.sqrt(x / npts)) for v, x in zip(names, se[key])}
        out[src] = res
    return out


def train(cfg, *, resume: bool = False, max_epochs: int | None = None) -> dict:
    """Train the VAE and the prior of ``cfg`` (``&train_nml``); write the checkpoint; return the summary.

    Args:
        cfg: the effective :class:`bridges.namelist.Config` (with a ``&train_nml`` group).
        resume: continue from ``<checkpoint>.state.pt`` (and reuse ``<checkpoint>.pairs.pt``)
            when they exist and were written for the same configuration.
        max_epochs: stop (resumably) after this many epochs, VAE and prior counted together, in
            this call (for wall-clock-limited batch jobs); the summary then has
            ``complete = False`` and no checkpoint is written.

    Returns:
        The summary dict (see :func:`format_summary`; ``lodas train --json`` prints it).

    Raises:
        NamelistError: a missing ``&train_nml`` or inconsistent keys.
        ValueError: an unusable training-state file (on resume) or device.
    """
    from coupler.assim.diffusion import CosineSchedule, denoising_loss
    from coupler.assim.latent import vae_loss
    from coupler.io.atomic import atomic_path
    from coupler.io.checkpoints import save_checkpoint

    t = _check_config(cfg)
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(t.threads)
    try:
        device = _device(t.device)
        ckpt = Path(t.checkpoint)
        state_path, pairs_path = state_paths(ckpt)
        fp = _fingerprint(cfg)
        # -- data
        pairs = None
        if resume and pairs_path.is_file():
            p = _load(pairs_path, "training-pairs file")
            if p.get("fingerprint") == fp:
                pairs = Pairs(truth=p["truth"], background=p["background"], sources=list(p["sources"]),
                              n_val=int(p["n_val"]), info=p["info"])
                log.info("resume: training pairs from %s", pairs_path)
            else:
                log.warning("resume: %s was made for another configuration; regenerating the pairs", pairs_path)
        if pairs is None:
            pairs = make_pairs(cfg)
            with atomic_path(pairs_path) as tmp:
                torch.save(_pairs_payload(pairs, fp), tmp)
        data_s = time.perf_counter() - t_start
        n_tr = pairs.n_train
        # the VAE's states: the truths and the base sources' backgrounds (not the self-cycled ones, which a
        # resumed run may already hold: they come after the VAE)
        base = [k for k, src in enumerate(pairs.sources) if "@" not in src]
        valid = pairs.valid()             # a late-started source has no background (NaN) for the first cycles
        train_states = torch.cat([pairs.truth[:n_tr], *(pairs.background[k, :n_tr][valid[k, :n_tr]] for k in base)])
        val_states = torch.cat([pairs.truth[n_tr:], *(pairs.background[k, n_tr:][valid[k, n_tr:]] for k in base)])
        # -- models
        run = _Run(cfg, device)
        mean = train_states.double().mean(dim=(0, 2, 3))
        std = train_states.double().std(dim=(0, 2, 3))
        run.vae.set_normalization(mean.float(), std.float())
        if resume and state_path.is_file():
            st = _load(state_path, "training-state file")
            if st.get("format") != STATE_FORMAT or st.get("version") != STATE_VERSION:
                raise ValueError(f"{state_path}: not a lodas training state of version {STATE_VERSION}")
            diff = _diff(st["fingerprint"], fp)
            if diff:
                raise ValueError(f"{state_path}: written for another configuration ({'; '.join(diff[:5])}); "
                                 f"run without --resume to start afresh")
            run.restore(st)
            log.info("resume: %s at VAE epoch %d/%d, prior epoch %d/%d", state_path, run.vae_epoch, t.vae_epochs,
                     run.prior_epoch, t.prior_epochs)
        elif resume:
            log.info("resume: no training state %s; starting afresh", state_path)
        steps = shift_steps(cfg) if t.augment else (0, 0)
        epochs_done, stopped = 0, False
        to_dev = (lambda x: x.to(device)) if device != "cpu" else (lambda x: x)

        # -- phase 1: VAE, on the states, or (increment_weight > 0) on the base pairs: truth and background
        # in one batch, the loss adding the relative error of the decoded increment
        n_states = train_states.shape[0]
        base_ids = pairs.pair_ids(base)
        paired = t.increment_weight > 0
        n_items = len(base_ids) if paired else n_states
        increment_ms = 1.0
        if paired:                                 # mean square of the normalised training increments
            sq, m = 0.0, 0
            for src in base:
                for xt, xb in pairs.batches(src, "train", 512):
                    sq += float((((xt - xb).double() / std[:, None, None]) ** 2).sum())
                    m += xt.numel()
            increment_ms = sq / m
        per_epoch = math.ceil(n_items / t.batch_size)
        total = per_epoch * t.vae_epochs
        while run.vae_epoch < t.vae_epochs and not stopped:
            e0 = time.perf_counter()
            run.vae.train()
            g, gd = _epoch_generators(t.seed, _VAE, run.vae_epoch, device)
            perm = torch.randperm(n_items, generator=g)
            bar = _Progress(per_epoch, f"VAE {run.vae_epoch + 1}/{t.vae_epochs}")
            loss_sum = 0.0
            for sl in _chunks(n_items, t.batch_size):
                if paired:
                    k = base_ids[perm[sl]]
                    xt, xb = to_dev(pairs.truth[k % n_tr]), to_dev(pairs.background[k // n_tr, k % n_tr])
                    xt, xb = random_shift([xt, xb], g, steps) if t.augment else (xt, xb)
                    x = torch.cat([xt, xb])
                else:
                    x = to_dev(train_states[perm[sl]])
                    (x,) = random_shift([x], g, steps) if t.augment else (x,)
                loss, _, _ = vae_loss(run.vae, x, t.kl_weight, gd, increment_weight=t.increment_weight,
                                      increment_ms=increment_ms)
                _optimise(run, loss, total)
                loss_sum += loss.item() * x.shape[0]
                bar.update(loss.item())
            bar.close()
            run.vae_epoch += 1
            val = _vae_validate(run, val_states, pairs, base)
            row = {"phase": "vae", "epoch": run.vae_epoch, "train_loss": loss_sum / (n_items * (1 + paired)), **val,
                   "seconds": time.perf_counter() - e0}
            run.history.append(row)
            log.info("VAE epoch %d/%d: train loss %.4e, val loss %.4e, reconstruction RMSE %s, oracle latent "
                     "analysis RMSE %s (%.1f s)", run.vae_epoch, t.vae_epochs, row["train_loss"], val["val_loss"],
                     ", ".join(f"{k} {v:.4f}" for k, v in val["recon_rmse"].items()),
                     ", ".join(f"{k} {v:.4f}" for k, v in val["oracle_rmse"].items()), row["seconds"])
            run.wall_s += time.perf_counter() - e0
            epochs_done += 1
            stopped = max_epochs is not None and epochs_done >= max_epochs
            _save_state(state_path, run, fp)

        # -- phase 2: freeze, latent scale; phase 3: prior
        if run.vae_epoch >= t.vae_epochs and run.phase == "vae" and not stopped:
            run.vae.set_latent_scale(_latent_scale(run, train_states))
            run.start_prior()
            run.latent_errors, run.relative_errors = _pair_errors(run, pairs, base)
            errs = run.latent_errors
            log.info("background relative error e_b (mean per source): %s",
                     ", ".join(f"{k} {v:.4f}" for k, v in run.relative_errors.items()))
            log.info("VAE frozen; latent shape %s, latent_scale %.4f; background error in unit latents (RMS): %s",
                     run.vae.latent_shape, float(run.vae.latent_scale),
                     ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))
            _save_state(state_path, run, fp)
        schedule = CosineSchedule(t.schedule_eta)

        def prior_epoch(ids: torch.Tensor, g: torch.Generator, gd: torch.Generator, total: int, desc: str) -> float:
            """One pass over the flat pair ids ``s * n_train + c`` (in the order given); mean loss."""
            bar = _Progress(math.ceil(len(ids) / t.batch_size), desc)
            loss_sum = 0.0
            for sl in _chunks(len(ids), t.batch_size):
                k = ids[sl]
                src, cyc = k // n_tr, k % n_tr
                xt, xb = to_dev(pairs.truth[cyc]), to_dev(pairs.background[src, cyc])
                if t.augment:
                    xt, xb = random_shift([xt, xb], g, steps)
                with torch.no_grad():
                    zb = run.vae.to_latent(xb)
                    d = (run.vae.to_latent(xt) - zb) / run.increment_std
                    c = prior_condition(zb, relative_error(run.vae, xb, xt))
                loss = denoising_loss(run.eps_net, d, c, schedule, generator=gd)
                _optimise(run, loss, total)
                if t.ema_decay > 0:
                    _ema_update(run.ema, run.eps_net, t.ema_decay, run.step - 1)
                else:
                    run.ema.load_state_dict(run.eps_net.state_dict())
                loss_sum += loss.item() * d.shape[0]
                bar.update(loss.item())
            bar.close()
            return loss_sum / len(ids)

        def finish_epoch(row: dict, e0: float) -> bool:
            row.update(val_loss=_prior_validate(run, pairs), seconds=time.perf_counter() - e0)
            run.history.append(row)
            log.info("%s epoch %d: train loss %.4f, val loss (EMA) %.4f, per latent element %.4f (%.1f s)",
                     row["phase"], row["epoch"], row["train_loss"], row["val_loss"],
                     row["val_loss"] / math.prod(run.vae.latent_shape), row["seconds"])
            run.wall_s += time.perf_counter() - e0
            _save_state(state_path, run, fp)
            return max_epochs is not None and epochs_done + 1 >= max_epochs

        base_ids = pairs.pair_ids(base)
        total = math.ceil(len(base_ids) / t.batch_size) * t.prior_epochs
        while run.phase == "prior" and run.prior_epoch < t.prior_epochs and not stopped:
            e0 = time.perf_counter()
            run.eps_net.train()
            g, gd = _epoch_generators(t.seed, _PRIOR, run.prior_epoch, device)
            ids = base_ids[torch.randperm(len(base_ids), generator=g)]
            loss = prior_epoch(ids, g, gd, total, f"prior {run.prior_epoch + 1}/{t.prior_epochs}")
            run.prior_epoch += 1
            stopped = finish_epoch({"phase": "prior", "epoch": run.prior_epoch, "train_loss": loss}, e0)
            epochs_done += 1

        # -- phase 4: self-cycling rounds (retrain on the method's own cycled backgrounds)
        while (run.phase != "vae" and run.prior_epoch >= t.prior_epochs and run.round < t.self_cycling_rounds
               and not stopped):
            r = run.round + 1
            name = f"{cfg.assim.method}@{r}"
            if name not in pairs.sources:
                pairs = self_cycled_pairs(cfg, run, pairs, r)
                with atomic_path(pairs_path) as tmp:
                    torch.save(_pairs_payload(pairs, fp), tmp)
            s_new = pairs.sources.index(name)
            if name not in run.relative_errors:
                lat, rel = _pair_errors(run, pairs, [s_new])
                run.latent_errors[name], run.relative_errors[name] = lat[name], rel[name]
                log.info("self-cycling round %d: background relative error e_b %.4f (latent RMS %.4f)", r, rel[name],
                         lat[name])
            if run.phase != f"round{r}":
                run.start_round(r)
                _save_state(state_path, run, fp)
            own = pairs.pair_ids(range(len(base), len(pairs.sources)))     # self-cycled sources follow the base
            other = base_ids
            n_draw = min(len(own), len(other))
            total = math.ceil((len(own) + n_draw) / t.batch_size) * t.self_cycling_epochs
            while run.round_epoch < t.self_cycling_epochs and not stopped:
                e0 = time.perf_counter()
                run.eps_net.train()
                g, gd = _epoch_generators(t.seed, _ROUND * 1000 + r, run.round_epoch, device)
                ids = torch.cat([own, other[torch.randperm(len(other), generator=g)[:n_draw]]])
                ids = ids[torch.randperm(len(ids), generator=g)]
                loss = prior_epoch(ids, g, gd, total, f"round {r} epoch {run.round_epoch + 1}/{t.self_cycling_epochs}")
                run.round_epoch += 1
                if run.round_epoch == t.self_cycling_epochs:
                    run.round = r
                stopped = finish_epoch({"phase": f"round{r}", "epoch": run.round_epoch, "train_loss": loss}, e0)
                epochs_done += 1

        complete = (run.phase != "vae" and run.prior_epoch >= t.prior_epochs
                    and run.round >= t.self_cycling_rounds)
        vae_rows = [r for r in run.history if r["phase"] == "vae"]
        prior_rows = [r for r in run.history if r["phase"] == "prior"]
        summary = {
            "checkpoint": str(ckpt), "complete": complete, "testbed": cfg.twin.model, "namelist": str(cfg.path),
            "shape": list(cfg.state_shape), "variables": list(cfg.grid.variables), "seed": t.seed,
            "threads": t.threads, "device": device, "sources": pairs.sources,
            "n_train_pairs": int(len(pairs.pair_ids(range(len(pairs.sources))))),
            "n_val_pairs": int(pairs.valid()[:, n_tr:].sum()), "n_train_states": int(n_states),
            "self_cycling_rounds": run.round,
            "data": pairs.info, "data_s": data_s,
            "latent_shape": list(run.vae.latent_shape), "latent_scale": float(run.vae.latent_scale),
            "latent_error_rms": run.latent_errors, "background_error": run.relative_errors,
            "vae": {"epochs": run.vae_epoch, **({k: vae_rows[-1][k] for k in ("train_loss", "val_loss", "recon_rmse",
                                                                              "recon_rmse_all", "oracle_rmse")
                                                 if k in vae_rows[-1]} if vae_rows else {})},
            "prior": {"epochs": run.prior_epoch,
                      **({k: prior_rows[-1][k] for k in ("train_loss", "val_loss")} if prior_rows else {})},
            "history": run.history,
        }
        if complete:
            if t.eval_pairs > 0:
                e0 = time.perf_counter()
                summary["eval"] = _evaluate(run, pairs)
                summary["eval_s"] = time.perf_counter() - e0
            summary["train_s"] = run.wall_s
            summary["wall_s"] = time.perf_counter() - t_start
            meta = {"arch": run.arch, "variables": list(cfg.grid.variables), "schedule_eta": t.schedule_eta,
                    "train_namelist": _namelist_text(cfg), "summary": summary, "testbed": cfg.twin.model,
                    "train_seed": t.seed, "ema_decay": t.ema_decay,
                    "latent_increment_std": run.increment_std, "background_error": run.relative_errors}
            ema_vae, ema_net = run.vae.cpu(), run.ema.cpu()
            save_checkpoint(ckpt, ema_vae, ema_net, meta)
            summary["checkpoint_bytes"] = ckpt.stat().st_size
            if not t.keep_state:
                for p in (state_path, pairs_path):
                    p.unlink(missing_ok=True)
            log.info("checkpoint written: %s (%.1f kB)", ckpt, summary["checkpoint_bytes"] / 1e3)
        else:
            summary["wall_s"] = time.perf_counter() - t_start
            log.info("stopped after %d epoch(s) in this run; continue with `lodas train %s --resume`", epochs_done,
                     cfg.path)
        return summary
    finally:
        torch.set_num_threads(threads_before)


def _namelist_text(cfg) -> str:
    from bridges.namelist import _namelist_text as text

    return text(cfg.to_namelist())


def format_summary(s: dict) -> str:
    """The table ``lodas train`` prints."""
    lines = [f"lodas train: {s['testbed']} {tuple(s['shape'])} {s['variables']}, seed {s['seed']}, "
             f"{s['n_train_pairs']} training / {s['n_val_pairs']} validation pairs from {', '.join(s['sources'])}"]
    for src, d in s["data"]["sources"].items():
        lines.append(f"  cycled {src:<6} background RMSE {d['background_rmse_train']:.4f} (train) "
                     f"{d['background_rmse_val']:.4f} (val)")
    lines.append(f"latent {tuple(s['latent_shape'])}, latent_scale {s['latent_scale']:.4f}")
    v = s["vae"]
    if "val_loss" in v:
        rec = "  ".join(f"{k} {x:.4f}" for k, x in v["recon_rmse"].items())
        lines.append(f"VAE    {v['epochs']:>3} epochs  train loss {v['train_loss']:.4e}  val loss {v['val_loss']:.4e}  "
                     f"reconstruction RMSE: {rec}")
        if "oracle_rmse" in v:
            lines.append("       oracle latent analysis x_b + D(E(x_t)) - D(E(x_b)), RMSE vs truth: "
                         + "  ".join(f"{k} {x:.4f}" for k, x in v["oracle_rmse"].items()))
    p = s["prior"]
    if "val_loss" in p:
        lines.append(f"prior  {p['epochs']:>3} epochs  train loss {p['train_loss']:.4f}  val loss {p['val_loss']:.4f}"
                     f"  (per pair, summed over {math.prod(s['latent_shape'])} latent elements)")
    if "eval" in s:
        lines.append(f"{'prior samples (no obs)':<24}{'background':>12}{'prior mean':>12}{'spread':>10}"
                     f"{'recon(x_t)':>12}   RMSE vs truth")
        for src, e in s["eval"].items():
            lines.append(f"  {src:<22}{e['background_rmse']:>12.4f}{e['prior_mean_rmse']:>12.4f}"
                         f"{e['prior_spread']:>10.4f}{e['truth_recon_rmse']:>12.4f}")
    state = "complete" if s["complete"] else "INCOMPLETE (resume with --resume)"
    lines.append(f"{state}; wall {s['wall_s']:.1f} s (data {s['data_s']:.1f} s); checkpoint {s['checkpoint']}")
    return "\n".join(lines)
