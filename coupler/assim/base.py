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
        x, y: location in grid-index units (0-based, periodic), shape ``(p,)``. Integer
            values observe a grid point; fractional values are bilinearly interpolated.
    """

    value: np.ndarray
    error_std: np.ndarray
    var_index: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        p = np.shape(self.value)[0] if np.ndim(self.value) else -1
        for name in ("value", "error_std", "var_index", "x", "y"):
            a = getattr(self, name)
            if np.ndim(a) != 1 or a.shape[0] != p:
                raise ValueError(f"Observations.{name}: expected shape ({p},), got {np.shape(a)}")
        if p and not np.all(self.error_std > 0):
            raise ValueError("Observations.error_std: every observation error std must be > 0")

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
