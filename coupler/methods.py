"""Build the analysis method named by ``&assim_nml method`` (the one place that maps names
to implementations and reads what they need from files)."""
from __future__ import annotations

from pathlib import Path

from coupler.assim.base import AssimilationMethod

#: Latent diffusion methods: ensembles whose members are split over the driver ranks.
ENSEMBLE_METHODS = ("lo-sda", "dps", "sda")


def checkpoint_path(cfg) -> Path:
    """``&assim_nml checkpoint``, or the shipped checkpoint of ``&twin_nml model``
    (``coupler/checkpoints/<testbed>.pt``)."""
    from coupler.io.checkpoints import shipped_checkpoint

    return Path(cfg.assim.checkpoint) if cfg.assim.checkpoint else shipped_checkpoint(cfg.twin.model)


def parametric_covariance(cfg):
    """The parametric ``B`` of ``&assim_nml b_std, b_length, b_length_unit``
    (:meth:`coupler.assim.covariance.SpectralCovariance.parametric`, before ``b_scale``).

    One ``b_std`` value applies to every variable. ``b_length_unit = 'grid'``: ``b_length`` grid
    points along both axes; ``'km'``: ``Lx = b_length*1000/dx_m`` and ``Ly = b_length*1000/dy_m``
    grid points (``&grid_nml dx_m, dy_m``).
    """
    from coupler.assim.covariance import SpectralCovariance

    a, g = cfg.assim, cfg.grid
    nvar = len(g.variables)
    std = list(a.b_std) * nvar if len(a.b_std) == 1 else list(a.b_std)
    if len(std) != nvar:
        raise ValueError(f"{cfg.path}: &assim_nml b_std = {a.b_std}: expected 1 or {nvar} values (one per "
                         f"&grid_nml variable: {g.variables})")
    if a.b_length_unit == "km":
        lx, ly = a.b_length * 1000.0 / g.dx_m, a.b_length * 1000.0 / g.dy_m
    else:
        lx = ly = a.b_length
    return SpectralCovariance.parametric(cfg.state_shape, std, lx, ly)


def make_method(cfg, covariance=None, device: str = "cpu") -> AssimilationMethod | None:
    """The configured method, or ``None`` for ``method = 'none'`` (zero increments, free run).

    For ``3dvar`` the covariance is, in order: the parametric ``B`` when ``&assim_nml b_std`` is
    set (:func:`parametric_covariance`; it overrides ``covariance``, so ``lodas bench --set
    assim_nml.b_std=...`` uses it), else ``covariance``, else the one read from ``b_file``; it
    is multiplied by ``b_scale``.

    Args:
        cfg: the effective :class:`bridges.namelist.Config`.
        covariance: a ready background-error covariance (skips reading ``b_file``; ignored when
            ``b_std`` is set).
        device: this rank's torch device (diffusion methods).
    """
    a = cfg.assim
    if a.method == "none":
        return None
    if a.method in ENSEMBLE_METHODS:
        import torch

        from coupler.assim.latent_da import LatentDiffusionAssimilation

        torch.set_num_threads(a.threads)

        return LatentDiffusionAssimilation.from_config(cfg, checkpoint_path(cfg), device=device)
    if a.method == "3dvar":
        from coupler.assim.threedvar import ThreeDVar

        if a.b_std:
            covariance = parametric_covariance(cfg)
        elif covariance is None:
            if not a.b_file:
                raise ValueError(f"{cfg.path}: &assim_nml method = '3dvar' needs a background-error covariance: "
                                 f"expected b_file (a covariance file written by `lodas twin` or `lodas "
                                 f"climatology`) or b_std (background-error standard deviations, 1 or "
                                 f"{len(cfg.grid.variables)} values > 0 in the units of &grid_nml variables "
                                 f"{cfg.grid.variables}, with b_length for a Gaussian correlation); neither is set")
            from coupler.io.covfiles import read_covariance

            covariance, names = read_covariance(a.b_file)
            if list(names) != list(cfg.grid.variables):
                raise ValueError(f"{cfg.path}: &assim_nml b_file = '{a.b_file}' holds variables {list(names)}; "
                                 f"&grid_nml variables = {cfg.grid.variables}")
        return ThreeDVar(covariance.scaled(a.b_scale), cg_tol=a.cg_tol, cg_max_iter=a.cg_max_iter)
    raise ValueError(f"{cfg.path}: &assim_nml method = '{a.method}' is not implemented")
