"""Ensemble analyses split over the driver ranks (the one place where an analysis meets MPI).

An :class:`~coupler.assim.base.EnsembleMethod` samples analysis members in *batches*:
``n_members`` members, batch ``b`` holding members ``b*member_batch .. (b+1)*member_batch - 1``
(:func:`member_batches`). Each member's random stream derives from ``(seed, cycle, member)``
and a batch is always computed whole, so a member's analysis does not depend on how many
ranks run or which rank computes it. Rank ``r`` of ``size`` takes the batches ``b`` with
``b % size == r``; the root gathers every member, puts them back in member order and reduces
them with the method's own ``reduce`` (the same call as a serial ``analyse``): the mean
increment and spread are identical for any number of driver ranks.

Protocol per cycle (collective over ``comm``, the driver's intra-communicator):

1. the root broadcasts the task ``(background, observations, cycle)``, or ``None`` when this
   cycle has no analysis (skipped by the failure policy, or the host finalizes);
2. every rank samples its batches; any exception is caught and returned as text, so a
   failing rank never leaves the others waiting;
3. ``gather`` to the root, which re-raises the first failure as :class:`RuntimeError` (the
   driver turns it into a zero increment with ``ANALYSIS_FAILED``) or reduces the members.
"""
from __future__ import annotations

import traceback

import numpy as np

from coupler.assim.base import Analysis, Observations

__all__ = ["member_batches", "rank_batches", "EnsembleRunner"]


def member_batches(n_members: int, member_batch: int) -> list[list[int]]:
    """``[[0..mb-1], [mb..2mb-1], ...]`` covering ``range(n_members)`` (the last may be short)."""
    if n_members < 1 or member_batch < 1:
        raise ValueError(f"n_members = {n_members} and member_batch = {member_batch} must be >= 1")
    return [list(range(b, min(b + member_batch, n_members))) for b in range(0, n_members, member_batch)]


def rank_batches(n_members: int, member_batch: int, rank: int, size: int) -> list[list[int]]:
    """The batches rank ``rank`` of ``size`` computes (round robin over batches)."""
    return [b for k, b in enumerate(member_batches(n_members, member_batch)) if k % size == rank]


class EnsembleRunner:
    """Runs an ensemble method's analysis collectively over ``comm`` (any mpi4py-like
    intra-communicator with ``rank``, ``size``, ``bcast`` and ``gather``).

    On the root, :meth:`analyse` is what the driver calls instead of ``method.analyse``; the
    other ranks call :meth:`serve_cycle` once per cycle. The root calls :meth:`skip` for a
    cycle it does not analyse, so that every rank takes part in exactly one broadcast per cycle.
    """

    def __init__(self, method, comm):
        self.method, self.comm = method, comm
        self.name = method.name
        self._served = False

    # -- root -------------------------------------------------------------------------------
    def analyse(self, background: np.ndarray, observations: Observations, *, cycle: int) -> Analysis:
        self._served = True
        self.comm.bcast((background, observations, cycle), root=0)
        return self._collect(self._sample(background, observations, cycle), background, observations)

    def skip(self) -> None:
        """Root: end a cycle in which :meth:`analyse` was not called."""
        if not self._served:
            self.comm.bcast(None, root=0)
        self._served = False

    # -- every other rank -------------------------------------------------------------------
    def serve_cycle(self) -> None:
        task = self.comm.bcast(None, root=0)
        if task is not None:
            self._collect(self._sample(*task), None, None)

    # -- both -------------------------------------------------------------------------------
    def _sample(self, background, observations, cycle):
        m = self.method
        try:
            batches = rank_batches(m.n_members, m.member_batch, self.comm.rank, self.comm.size)
            members = [i for b in batches for i in b]
            states = m.sample_batches(background, observations, cycle=cycle, batches=batches)
            return ("ok", members, states)
        except Exception as exc:  # noqa: BLE001 - reported to the root, never left hanging
            return ("error", f"driver rank {self.comm.rank}: {type(exc).__name__}: {exc}",
                    traceback.format_exc())

    def _collect(self, mine, background, observations) -> Analysis | None:
        parts = self.comm.gather(mine, root=0)
        if self.comm.rank != 0:
            return None
        for p in parts:
            if p[0] == "error":
                raise RuntimeError(f"{p[1]}\n{p[2]}")
        members = [i for p in parts for i in p[1]]
        states = np.concatenate([p[2] for p in parts if len(p[1])], axis=0)
        order = np.argsort(members, kind="stable")
        return self.method.reduce(background, states[order], observations)


def serial_analyse(method, background: np.ndarray, observations: Observations, *, cycle: int) -> Analysis:
    """What :class:`EnsembleRunner` computes, on one process: every batch, then ``reduce``."""
    batches = member_batches(method.n_members, method.member_batch)
    states = method.sample_batches(background, observations, cycle=cycle, batches=batches)
    return method.reduce(background, states, observations)
