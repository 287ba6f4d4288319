"""In-process bridge: a Python model plays the host, with the same cycle protocol as the
Fortran hosts (used by the skill benchmarks and by tests that need no MPI)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from bridges.mpi_bridge import CMD_CYCLE, CMD_FINALIZE, Background
from bridges.status import Status


class InProcessHost:
    """Integrate ``step`` between analyses and apply increments like the Fortran hosts do.

    Args:
        step: ``(state, n_steps) -> state``, e.g. ``Lorenz96.step``.
        initial_state: ``(nvar, ny, nx)`` state at model time 0.
        steps_per_cycle: model steps between analyses.
        n_cycles: analyses before the host finalizes.
        dt: model time per step (host units).
        increment_mode: ``'direct'`` (add at once) or ``'iau'`` (add ``increment/iau_steps``
            after each of the next ``iau_steps`` steps).
    """

    def __init__(self, step: Callable[[np.ndarray, int], np.ndarray], initial_state: np.ndarray, *,
                 steps_per_cycle: int, n_cycles: int, dt: float, increment_mode: str = "direct", iau_steps: int = 1):
        if increment_mode == "iau" and iau_steps > steps_per_cycle:
            raise ValueError(f"iau_steps = {iau_steps} exceeds steps_per_cycle = {steps_per_cycle}")
        self.stepper, self.x = step, np.array(initial_state, dtype=np.float64)
        self.steps_per_cycle, self.n_cycles, self.dt = steps_per_cycle, n_cycles, dt
        self.increment_mode, self.iau_steps = increment_mode, iau_steps
        self.step_count, self.cycles_done = 0, 0
        self._iau = None
        self.statuses: list[Status] = []

    def receive_background(self) -> Background:
        if self.cycles_done == self.n_cycles:
            return Background(CMD_FINALIZE, self.step_count, self.step_count * self.dt, 0.0, 0.0, None)
        for k in range(1, self.steps_per_cycle + 1):
            self.x = self.stepper(self.x, 1)
            self.step_count += 1
            if self._iau is not None and k <= self.iau_steps:
                self.x = self.x + (1.0 / self.iau_steps) * self._iau   # the Fortran hosts: w * inc
        self._iau = None
        return Background(CMD_CYCLE, self.step_count, self.step_count * self.dt, 0.0, 0.0, self.x.copy())

    def send_increment(self, increment, status: Status, cycle: int) -> None:
        self.cycles_done += 1
        self.statuses.append(Status(status))
        if status != Status.OK:
            return
        if self.increment_mode == "direct":
            self.x = self.x + increment
        else:
            self._iau = np.array(increment)
