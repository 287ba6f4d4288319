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


def make_method(cfg, covariance=None, device: str = "cpu") -> AssimilationMethod | None:
    """The configured method, or ``None`` for ``method = 'none'`` (zero increments, free run).

    Args:
        cfg: the effective :class:`bridges.namelist.Config`.
        covariance: a ready background-error covariance (skips reading ``b_file``).
        device: this rank's torch device (diffusion methods).
    """
    a = cfg.assim
    if a.method == "none":
        return None
    if a.method in ENSEMBLE_METHODS:
        from coupler.assim.latent_da import LatentDiffusionAssimilation

        return LatentDiffusionAssimilation.from_config(cfg, checkpoint_path(cfg), device=device)
    if a.method == "3dvar":
        from coupler.assim.threedvar import ThreeDVar

        if covariance is None:
            if not a.b_file:
                raise ValueError(f"{cfg.path}: &assim_nml method = '3dvar' needs b_file (a covariance file "
                                 f"written by `lodas twin` or `lodas climatology`)")
            from coupler.io.covfiles import read_covariance

            covariance, names = read_covariance(a.b_file)
            if list(names) != list(cfg.grid.variables):
                raise ValueError(f"{cfg.path}: &assim_nml b_file = '{a.b_file}' holds variables {list(names)}; "
                                 f"&grid_nml variables = {cfg.grid.variables}")
        return ThreeDVar(covariance.scaled(a.b_scale), cg_tol=a.cg_tol, cg_max_iter=a.cg_max_iter)
    raise ValueError(f"{cfg.path}: &assim_nml method = '{a.method}' is not implemented")
