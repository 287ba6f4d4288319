"""Synthetic observing networks for twin (OSSE) experiments, and synthetic observations.

A :class:`Network` gives, for each of its ``p`` observations, the observed variable, its
location in grid-index units (0-based, periodic, see :mod:`coupler.assim.base`), its footprint
(0: a point; ``w >= 1``: the average over a ``w x w`` grid-point box centred there, see
:class:`coupler.assim.base.Observations`) and optionally its observation-error std. The point
kinds here (``all``, ``every_k``, ``stations``, ``fraction``) observe grid points (integer
coordinates), so ``H`` selects state elements exactly; the ``footprints`` kind is a
satellite-like coarse field of box averages. Order within one network: by observed variable
(in the order of ``var_indices``), then by grid point (or box) in C order (``y`` slowest).
Several kinds observe in one cycle through :func:`combine_networks` (concatenation, in order).

Synthetic observations of a nature run ``x_true`` are ``y = H x_true + eps`` with
``eps ~ N(0, diag(sigma^2))`` independent across observations (the ``R`` that the analysis
then assumes: a perfect-``R`` twin experiment).

Random streams of a configured experiment (:func:`network_from_config`,
:func:`synthesize_cycle`): the network is drawn from ONE generator
``default_rng([seed, 1])``, used by the kinds one after the other in the order of
``&obs_nml network`` (only ``stations`` and ``fraction`` draw from it; the draws of a kind do
not depend on the kinds listed after it, and a single kind draws exactly as before kinds could
be combined). The errors of cycle ``c`` are ``sigma * z`` with ``z`` the first ``p``
standard normals of ``default_rng([seed, 2, c])``, in network order (the order of the kinds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from coupler.assim.base import Observations
from coupler.assim.obs_operator import observation_operator

__all__ = ["Network", "make_network", "combine_networks", "synthesize", "network_from_config",
           "synthesize_cycle", "NETWORK_KINDS", "POINT_KINDS"]

#: Kinds whose observations are grid points (``footprint == 0``).
POINT_KINDS = ("all", "every_k", "stations", "fraction")
NETWORK_KINDS = POINT_KINDS + ("footprints",)


@dataclass(frozen=True)
class Network:
    """The ``p`` observation locations of a synthetic observing network.

    Attributes:
        var_index: ``(p,)`` int64, observed state variable (index into the state's first axis).
        x, y: ``(p,)`` float64, location (grid-index units, 0-based, periodic); for a
            footprint, its centre.
        footprint: ``(p,)`` float64, 0 for a point observation, ``w >= 1`` (an integer) for
            the average over a ``w x w`` box (``w``-point segment when ``ny == 1``), as
            :attr:`coupler.assim.base.Observations.footprint`; ``None`` (default): all points.
        error_std: ``(p,)`` float64 observation-error std (> 0, units of the observed
            variable), or ``None`` when the network carries none (then :func:`synthesize`
            needs ``error_std_per_var``).

    Construction casts the arrays to these dtypes and checks shapes; ``len(network)`` is ``p``.
    """

    var_index: np.ndarray
    x: np.ndarray
    y: np.ndarray
    footprint: np.ndarray | None = None
    error_std: np.ndarray | None = None

    def __post_init__(self) -> None:
        vi = np.asarray(self.var_index)
        fp = np.zeros(vi.shape[:1]) if self.footprint is None else self.footprint
        arrays = {"var_index": vi, "x": np.asarray(self.x, dtype=np.float64),
                  "y": np.asarray(self.y, dtype=np.float64), "footprint": np.asarray(fp, dtype=np.float64)}
        if self.error_std is not None:
            arrays["error_std"] = np.asarray(self.error_std, dtype=np.float64)
        p = arrays["var_index"].shape[0] if arrays["var_index"].ndim == 1 else -1
        for name, a in arrays.items():
            if a.ndim != 1 or a.shape[0] != p:
                raise ValueError(f"Network.{name}: expected shape ({max(p, 0)},) like var_index, "
                                 f"got {a.shape}")
        vi = arrays["var_index"]
        if vi.size and not np.issubdtype(vi.dtype, np.integer):
            if not np.all(np.isfinite(vi)) or np.any(vi != np.round(vi)):
                raise ValueError("Network.var_index: values must be integers")
        arrays["var_index"] = vi.astype(np.int64)
        e = arrays.get("error_std")
        if e is not None and e.size and not np.all(np.isfinite(e) & (e > 0)):
            bad = np.flatnonzero(~(np.isfinite(e) & (e > 0)))
            raise ValueError(f"Network.error_std: must be finite and > 0, first bad at obs {bad[0]}: "
                             f"{float(e[bad[0]])!r}")
        w = arrays["footprint"]
        bad = np.flatnonzero(~(np.isfinite(w) & (w >= 0) & (w == np.round(w))))
        if bad.size:
            raise ValueError(f"Network.footprint: must be integers >= 0 (0: point), first bad at obs {bad[0]}: "
                             f"{float(w[bad[0]])!r}")
        for name, a in arrays.items():
            object.__setattr__(self, name, a)

    def __len__(self) -> int:
        return int(self.var_index.shape[0])

    def locations(self) -> Observations:
        """The network as :class:`Observations` with ``value`` 0 and ``error_std`` 1 (or the
        network's), e.g. to build ``H`` with :func:`coupler.assim.obs_operator.observation_operator`."""
        p = len(self)
        sigma = self.error_std if self.error_std is not None else np.ones(p)
        return Observations(np.zeros(p), sigma, self.var_index, self.x, self.y, self.footprint)


def _int_ge1(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or int(v) != v or v < 1:
        raise ValueError(f"{name}: must be a positive int, got {v!r}")
    return int(v)


def _rng(rng, what: str) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise ValueError(f"rng: {what} is random and needs a numpy Generator "
                         "(or an int seed), got None")
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ValueError(f"rng: expected a numpy Generator or an int seed, got {rng!r}")


def make_network(kind: str, shape: tuple[int, int, int], var_indices: Sequence[int], *,
                 every_k: int = 2, n_stations: int = 100, fraction: float = 0.1, footprint: int = 8,
                 error_std: float | Sequence[float] | None = None,
                 rng: np.random.Generator | int | None = None) -> Network:
    """Observation locations of a synthetic network.

    Args:
        kind: ``"all"``: every grid point of each observed variable;
            ``"every_k"``: grid points with ``x`` and ``y`` multiples of ``every_k`` (for
            ``ny == 1``, Lorenz-96, every ``every_k``-th variable: ``every_k=2`` observes every
            other variable); ``"stations"``: ``n_stations`` distinct random grid points, the
            same locations for every observed variable (a radiosonde-like network);
            ``"fraction"``: ``round(fraction*ny*nx)`` (at least 1) distinct random grid
            points drawn independently for each observed variable; ``"footprints"``: the grid
            tiled by boxes of ``footprint x footprint`` grid points (for ``ny == 1``,
            segments of ``footprint`` points), one box-average observation per box and
            observed variable, centred at ``(bx*f + (f-1)/2, by*f + (f-1)/2)`` for box
            ``(by, bx)`` (a satellite-like coarse field, ``(ny/f)*(nx/f)`` per variable);
            ``footprint`` must divide ``nx`` and ``ny`` (an axis of length 1 is not tiled).
        shape: state shape ``(nvar, ny, nx)``.
        var_indices: the observed variables (distinct ints in ``[0, nvar)``), non-empty.
        every_k, n_stations, fraction, footprint: parameters of the kinds above (others
            ignored).
        error_std: observation-error std of this network, a scalar for every observed
            variable or one value per entry of ``var_indices`` (same order), > 0; stored per
            observation in :attr:`Network.error_std`. ``None``: the network carries none.
        rng: ``numpy.random.Generator`` (or int seed); required for the random kinds
            (``stations``, ``fraction``), which draw from it; the others do not touch it.

    Returns:
        :class:`Network`; ``footprint`` is 0 for the point kinds and ``footprint`` for
        ``"footprints"``.

    Raises:
        ValueError: unknown ``kind`` or bad argument (named with its value).
    """
    if kind not in NETWORK_KINDS:
        raise ValueError(f"kind: expected one of {NETWORK_KINDS}, got {kind!r}")
    if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
        raise ValueError(f"shape: expected (nvar, ny, nx) of positive ints, got {shape!r}")
    nvar, ny, nx = (int(s) for s in shape)
    vars_ = np.asarray(var_indices)
    if (vars_.ndim != 1 or vars_.size == 0 or not np.issubdtype(vars_.dtype, np.integer)
            or np.any((vars_ < 0) | (vars_ >= nvar)) or np.unique(vars_).size != vars_.size):
        raise ValueError(f"var_indices: expected distinct ints in [0, {nvar}), got {var_indices!r}")
    vars_ = vars_.astype(np.int64)
    npts = ny * nx

    if kind == "all":
        per_var = [np.arange(npts)] * vars_.size
    elif kind == "every_k":
        if isinstance(every_k, bool) or int(every_k) != every_k or every_k < 1:
            raise ValueError(f"every_k: must be a positive int, got {every_k!r}")
        k = int(every_k)
        jj = np.arange(0, ny, k) if ny > 1 else np.zeros(1, dtype=np.int64)
        ii = np.arange(0, nx, k)
        per_var = [(jj[:, None] * nx + ii[None, :]).ravel()] * vars_.size
    elif kind == "stations":
        if isinstance(n_stations, bool) or int(n_stations) != n_stations or not 1 <= n_stations <= npts:
            raise ValueError(f"n_stations: must be an int in [1, {npts}] (grid points), "
                             f"got {n_stations!r}")
        g = _rng(rng, f"network kind {kind!r}")
        pts = np.sort(g.choice(npts, size=int(n_stations), replace=False))
        per_var = [pts] * vars_.size
    elif kind == "fraction":
        if not (np.isfinite(fraction) and 0.0 < fraction <= 1.0):
            raise ValueError(f"fraction: must be in (0, 1], got {fraction!r}")
        g = _rng(rng, f"network kind {kind!r}")
        m = max(1, int(round(fraction * npts)))
        per_var = [np.sort(g.choice(npts, size=m, replace=False)) for _ in vars_]
    else:  # footprints
        f = _int_ge1("footprint", footprint)
        for name, size in (("nx", nx), ("ny", ny)):
            if size > 1 and size % f:
                raise ValueError(f"footprint: {f} grid points per box side does not divide {name} = {size} "
                                 f"(the boxes must tile the grid; shape (nvar, ny, nx) = {tuple(shape)})")
        cx = np.arange(0, nx, f) + (f - 1) / 2.0 if nx > 1 else np.zeros(1)
        cy = np.arange(0, ny, f) + (f - 1) / 2.0 if ny > 1 else np.zeros(1)
        yy, xx = np.meshgrid(cy, cx, indexing="ij")                     # C order, y slowest
        nb = xx.size
        sigma = _error_std_per_obs(error_std, vars_, nb)
        return Network(np.repeat(vars_, nb), np.tile(xx.ravel(), vars_.size),
                       np.tile(yy.ravel(), vars_.size), np.full(nb * vars_.size, float(f)), sigma)

    var_index = np.concatenate([np.full(p.size, v, dtype=np.int64) for v, p in zip(vars_, per_var)])
    flat = np.concatenate(per_var)
    j, i = np.divmod(flat, nx)
    sigma = None if error_std is None else _error_std_per_obs(error_std, vars_, None, var_index)
    return Network(var_index, i.astype(np.float64), j.astype(np.float64), np.zeros(var_index.size), sigma)


def _error_std_per_obs(error_std, vars_: np.ndarray, per_var: int | None,
                       var_index: np.ndarray | None = None) -> np.ndarray | None:
    """Per-observation sigma from a scalar or one value per observed variable."""
    if error_std is None:
        return None
    e = np.asarray(error_std, dtype=np.float64)
    if e.ndim == 0:
        e = np.full(vars_.size, float(e))
    if e.shape != (vars_.size,) or not np.all(np.isfinite(e) & (e > 0)):
        raise ValueError(f"error_std: expected a scalar or {vars_.size} finite values > 0 (one per observed "
                         f"variable {vars_.tolist()}), got {error_std!r}")
    if per_var is not None:
        return np.repeat(e, per_var)
    lookup = dict(zip(vars_.tolist(), e.tolist()))
    return np.array([lookup[v] for v in var_index.tolist()], dtype=np.float64)


def combine_networks(*networks: Network) -> Network:
    """Several networks observing in one cycle: their concatenation, in the order given.

    Args:
        networks: one or more :class:`Network` (e.g. stations then footprints).

    Returns:
        :class:`Network` of ``sum(len(n))`` observations; ``error_std`` concatenated when every
        network carries one, ``None`` when none does.

    Raises:
        ValueError: no network, a non-:class:`Network` argument, or only some networks carry
            ``error_std`` (the combined errors would be half-defined).
    """
    if not networks:
        raise ValueError("combine_networks: expected at least one Network, got none")
    for k, n in enumerate(networks):
        if not isinstance(n, Network):
            raise ValueError(f"combine_networks: argument {k} is a {type(n).__name__}, expected a Network")
    has = [n.error_std is not None for n in networks]
    if any(has) and not all(has):
        raise ValueError(f"combine_networks: networks {[k for k, h in enumerate(has) if not h]} carry no "
                         "error_std while the others do; give every network its error_std (or none)")
    cat = lambda name: np.concatenate([getattr(n, name) for n in networks])  # noqa: E731
    return Network(cat("var_index"), cat("x"), cat("y"), cat("footprint"), cat("error_std") if all(has) else None)


def synthesize(truth: np.ndarray, network: Network | tuple,
               error_std_per_var: float | Sequence[float] | None = None,
               rng: np.random.Generator | int | None = None) -> Observations:
    """Synthetic observations ``y = H x_true + eps``, ``eps ~ N(0, diag(sigma^2))``.

    Args:
        truth: the true state ``(nvar, ny, nx)``.
        network: a :class:`Network` (points and footprints; fractional point coordinates are
            allowed: ``H`` interpolates bilinearly), or a legacy tuple ``(var_index, x, y)``
            or ``(var_index, x, y, footprint)``.
        error_std_per_var: observation-error standard deviation, a scalar for every
            variable or a sequence of length ``nvar`` indexed by *state* variable (> 0 where
            used; e.g. :meth:`bridges.namelist.Config.error_std_per_variable`). If given it
            overrides ``network.error_std``; if ``None`` the network's per-observation
            ``error_std`` is used (then it must have one).
        rng: ``numpy.random.Generator`` (or int seed) for the errors: ``eps = sigma * z``
            with ``z = rng.standard_normal(p)`` in network order (one draw of ``p`` numbers).

    Returns:
        :class:`Observations` with ``error_std`` the per-observation sigma (so ``R`` is right)
        and the network's ``footprint``.
    """
    x_true = np.asarray(truth, dtype=np.float64)
    if x_true.ndim != 3:
        raise ValueError(f"truth: expected shape (nvar, ny, nx), got {x_true.shape}")
    if not np.all(np.isfinite(x_true)):
        raise ValueError("truth: contains non-finite values")
    nvar = x_true.shape[0]
    if not isinstance(network, Network):
        try:
            arrays = [np.asarray(a) for a in network]
        except TypeError:
            arrays = []
        if len(arrays) not in (3, 4):
            raise ValueError(f"network: expected a Network or a (var_index, x, y[, footprint]) tuple, "
                             f"got {type(network).__name__}")
        network = Network(*arrays)
    var_index = network.var_index
    if var_index.size and np.any((var_index < 0) | (var_index >= nvar)):
        raise ValueError(f"network: var_index outside [0, {nvar})")
    if error_std_per_var is not None:
        sig = np.asarray(error_std_per_var, dtype=np.float64)
        if sig.ndim == 0:
            sig = np.full(nvar, float(sig))
        if sig.shape != (nvar,):
            raise ValueError(f"error_std_per_var: expected a scalar or {nvar} values (one per state "
                             f"variable), got {error_std_per_var!r}")
        sigma = sig[var_index]
        if sigma.size and not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise ValueError(f"error_std_per_var: must be finite and > 0 for every observed "
                             f"variable, got {error_std_per_var!r}")
    elif network.error_std is not None:
        sigma = network.error_std
    else:
        raise ValueError("error_std_per_var: the network carries no error_std, so give one "
                         "(a scalar or one value per state variable)")
    g = _rng(rng, "synthesize")
    locs = network.locations()
    H = observation_operator(locs, x_true.shape)
    value = H @ x_true.ravel() + sigma * g.standard_normal(var_index.size)
    return Observations(value, sigma.copy(), var_index.copy(), locs.x.copy(), locs.y.copy(),
                        locs.footprint.copy())


# -- from a configuration (&obs_nml) ----------------------------------------------------------
def network_from_config(cfg, seed: int | None = None) -> Network:
    """The combined observing network of ``&obs_nml`` (one per experiment seed).

    For each kind of ``&obs_nml network`` in order: :func:`make_network` on the variables
    ``cfg.observed_variables(kind)`` with the per-variable stds ``cfg.error_std_per_variable(kind)``
    (point kinds: ``variables``/``error_std``; ``footprints``: ``footprint_variables``/
    ``footprint_error_std``/``footprint``), all kinds drawing in turn from ONE generator
    ``default_rng([seed, 1])``; then :func:`combine_networks`. The result carries
    ``error_std``, so :func:`synthesize_cycle` needs nothing else from the configuration.

    Args:
        cfg: a :class:`bridges.namelist.Config` (duck-typed: ``obs``, ``grid``, ``coupler``,
            ``state_shape``, ``observed_variables(kind)``, ``error_std_per_variable(kind)``).
        seed: the experiment seed; ``None``: ``&coupler_nml seed``.
    """
    seed = int(cfg.coupler.seed if seed is None else seed)
    kinds = [cfg.obs.network] if isinstance(cfg.obs.network, str) else list(cfg.obs.network)
    rng = np.random.default_rng([seed, 1])
    names = list(cfg.grid.variables)
    nets = []
    for kind in kinds:
        var_idx = [names.index(v) for v in cfg.observed_variables(kind)]
        per_state = cfg.error_std_per_variable(kind)
        o = cfg.obs
        try:
            nets.append(make_network(kind, cfg.state_shape, var_idx, every_k=o.every_k, n_stations=o.n_stations,
                                     fraction=o.fraction, footprint=o.footprint,
                                     error_std=[per_state[v] for v in var_idx], rng=rng))
        except ValueError as e:
            raise ValueError(f"{cfg.path}: &obs_nml network kind {kind!r}: {e}") from None
    return combine_networks(*nets)


def synthesize_cycle(truth: np.ndarray, network: Network, *, seed: int, cycle: int) -> Observations:
    """The synthetic observations of cycle ``cycle``: :func:`synthesize` with the network's
    ``error_std`` and the error stream ``default_rng([seed, 2, cycle])``.

    Args:
        truth: the true state ``(nvar, ny, nx)`` at the analysis time of ``cycle``.
        network: from :func:`network_from_config` (must carry ``error_std``).
        seed: the experiment seed.
        cycle: 0-based analysis cycle.
    """
    if network.error_std is None:
        raise ValueError("network: carries no error_std (build it with network_from_config or "
                         "make_network(..., error_std=...))")
    return synthesize(truth, network, None, np.random.default_rng([int(seed), 2, int(cycle)]))
