"""Build the analysis method named by ``&assim_nml method`` (the one place that maps names
to implementations and reads what they need from files)."""
from __future__ import annotations

from coupler.assim.base import AssimilationMethod


def make_method(cfg, covariance=None) -> AssimilationMethod | None:
    """The configured method, or ``None`` for ``method = 'none'`` (zero increments, free run).

    Args:
        cfg: the effective :class:`bridges.namelist.Config`.
        covariance: a ready background-error covariance (skips reading ``b_file``).
    """
    a = cfg.assim
    if a.method == "none":
        return None
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
    if a.method == "etkf":      # not a namelist choice; guards a Config built in code
        raise ValueError(f"{cfg.path}: &assim_nml method = 'etkf': etkf needs an ensemble of model forecasts, "
                         f"which the in-line host (one deterministic state) cannot provide: use `lodas bench`")
    raise ValueError(f"{cfg.path}: &assim_nml method = '{a.method}' is not implemented")
