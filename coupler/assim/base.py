"""The typed contract between the driver and an assimilation method.

State convention (everywhere in Python): a model state is a float64 array of shape
``(nvar, ny, nx)`` in C order, which is the memory layout of the Fortran array
``state(nx, ny, nvar)``. Lorenz-96 is ``(1, 1, 40)``. Grid coordinates are in grid-index
units, 0-based, and the grid is doubly periodic: ``x`` in ``[0, nx)``, ``y`` in ``[0, ny)``.

No MPI and no file I/O in this package: the driver hands in arrays, gets arrays back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Observations:
    """The observations of one analysis cycle (``p`` of them).

    Attributes:
        value: observed values ``y``, shape ``(p,)``, in the units of the observed variable.
        error_std: observation-error standard deviations, shape ``(p,)``, > 0; ``R`` is
            ``diag(error_std**2)`` (uncorrelated errors).
        var_index: index of the observed variable in the state's first axis, shape ``(p,)``.
        x, y: location in grid-index units (0-based, periodic), shape ``(p,)``. For a point
            observation, integer values observe a grid point and fractional values are
            bilinearly interpolated; for a footprint observation, the centre of the footprint.
        footprint: ``(p,)`` float64, or ``None`` (the default, normalised to all zeros on
            construction, so ``obs.footprint`` is always an array). Per observation:

            - ``w = 0``: a *point* observation of ``x[v]`` at ``(x, y)`` (bilinear
              interpolation, see :mod:`coupler.assim.obs_operator`);
            - ``w >= 1`` (an integer, in grid points): the *area average* of ``x[v]`` over a
              box of ``w`` x ``w`` grid points centred at ``(x, y)`` (a satellite-like
              footprint). Along x the box is the grid points ``i = i0, i0+1, ..., i0+w-1``
              (mod ``nx``, periodic) with ``i0 = x - (w-1)/2``, which must be an integer
              (odd ``w``: ``x`` on a grid point; even ``w``: ``x`` half-way between two);
              likewise along y with ``j0 = y - (w-1)/2``. Along an axis of length 1 (``ny == 1``,
              Lorenz-96; or ``nx == 1``) the box has extent 1 and that coordinate only has to
              lie on the grid as usual, so the footprint is a ``w``-point segment. ``w`` must
              not exceed the length of any axis longer than 1 (no point counted twice). The
              operator row has weight ``1/w^2`` (``1/w`` for a segment) on each box point.
              ``w = 1`` is the grid point at ``(x, y)``.

            Checked here: finite, ``>= 0``, integer-valued. The grid-dependent rules (centre
            alignment, ``w`` against the grid size) are checked by
            :func:`coupler.assim.obs_operator.observation_operator`, which knows the grid.
    """

    value: np.ndarray
    error_std: np.ndarray
    var_index: np.ndarray
    x: np.ndarray
    y: np.ndarray
    footprint: np.ndarray | None = None

    def __post_init__(self) -> None:
        p = np.shape(self.value)[0] if np.ndim(self.value) else -1
        if self.footprint is None:
            object.__setattr__(self, "footprint", np.zeros(max(p, 0)))
        for name in ("value", "error_std", "var_index", "x", "y", "footprint"):
            a = getattr(self, name)
            if np.ndim(a) != 1 or np.shape(a)[0] != p:
                raise ValueError(f"Observations.{name}: expected shape ({p},), got {np.shape(a)}")
        if p and not np.all(self.error_std > 0):
            raise ValueError("Observations.error_std: every observation error std must be > 0")
        w = np.asarray(self.footprint)
        if not (np.issubdtype(w.dtype, np.integer) or np.issubdtype(w.dtype, np.floating)):
            raise ValueError(f"Observations.footprint: expected a numeric array, got dtype {w.dtype}")
        w = w.astype(np.float64)
        bad = np.flatnonzero(~(np.isfinite(w) & (w >= 0) & (w == np.round(w))))
        if bad.size:
            raise ValueError(
                f"Observations.footprint: {bad.size} value(s) not an integer >= 0 (0: point "
                f"observation, w >= 1: w x w grid-point box), first at obs {bad[0]}: {float(w[bad[0]])!r}")
        object.__setattr__(self, "footprint", w)

    def __len__(self) -> int:
        return int(self.value.shape[0])

    @classmethod
    def empty(cls) -> "Observations":
        z = np.zeros(0)
        return cls(z, z.copy(), np.zeros(0, dtype=np.int64), z.copy(), z.copy())


@dataclass
class Analysis:
    """The result of one analysis.

    Attributes:
        increment: ``x_a - x_b``, shape ``(nvar, ny, nx)``.
        spread: ensemble standard deviation of the analysis, same shape, or ``None`` for
            deterministic methods.
        info: scalar diagnostics of the method (iterations, cost function values, ...).
    """

    increment: np.ndarray
    spread: np.ndarray | None = None
    info: dict = field(default_factory=dict)


class AssimilationMethod(Protocol):
    """One analysis: ``background`` (nvar, ny, nx) and ``observations`` -> :class:`Analysis`.

    ``cycle`` is the 0-based cycle index; stochastic methods derive their random streams
    from it (and the experiment seed) so results do not depend on the parallel layout.
    """

    name: str

    def analyse(self, background: np.ndarray, observations: Observations, *, cycle: int) -> Analysis:
        ...


class EnsembleMethod(AssimilationMethod, Protocol):
    """An analysis whose members can be computed anywhere (:mod:`coupler.ensemble` splits them
    over the driver ranks).

    ``sample_batches`` returns the analysis increments of the members in ``batches``
    (``(M, nvar, ny, nx)``, in the order of the batches), each member's randomness drawn from
    ``(seed, cycle, member)`` only; ``reduce`` turns all ``n_members`` increments, in member
    order, into the :class:`Analysis` (mean increment, spread, diagnostics). ``analyse`` is
    their serial composition.
    """

    n_members: int
    member_batch: int

    def sample_batches(self, background: np.ndarray, observations: Observations, *, cycle: int,
                       batches) -> np.ndarray:
        ...

    def reduce(self, background: np.ndarray, increments: np.ndarray, observations: Observations) -> Analysis:
        ...
