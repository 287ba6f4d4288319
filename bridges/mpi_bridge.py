"""The driver's half of the MPI coupling with Fortran hosts (``fortran_stubs/lodas_bridge.f90``).

Parallel layout, built here and only here (:func:`connect`): the communicator given in
(normally ``MPI.COMM_WORLD`` of an MPMD job) is split by role (host colour 0, driver colour
1; a colour rather than ``MPI_APPNUM`` so any launcher and any embedding communicator work),
the lowest world rank of each group is its leader, and ``Intercomm_create`` joins the two
groups. Everything else takes the resulting communicators as parameters.

Wire protocol per cycle: one ``Igatherv`` host -> driver root and one ``Iscatterv`` driver
root -> host, each carrying a header of ``HDR`` float64 per rank in front of the packed
field (see the Fortran module). Buffers are contiguous float64 numpy arrays; nothing is
pickled. Each host rank described its boxes at init; :class:`Decomposition` turns them into
one index map, so unpacking is a single gather ``x[global_index] = buf[buffer_index]`` and
the global field is bit-identical for any decomposition.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from bridges.status import Status

PROTOCOL_VERSION = 1
HDR = 8
NAME_LEN = 32
MSG_LEN = 512
TAG_HANDSHAKE = 7301
COLOR_HOST, COLOR_DRIVER = 0, 1
CMD_CYCLE, CMD_FINALIZE = 1, 2


class HandshakeError(RuntimeError):
    """Host and driver disagree; the host has been told the same message."""


@dataclass
class Layout:
    """The communicators of one driver rank.

    Attributes:
        world: the communicator holding host and driver ranks (given in).
        local: the driver ranks (``Split`` of ``world``).
        inter: intercommunicator driver group <-> host group.
        host_size: number of host ranks.
    """

    world: MPI.Comm
    local: MPI.Intracomm
    inter: MPI.Intercomm
    host_size: int
    node_rank: int = 0  #: index of this driver rank among the driver ranks of its node

    @property
    def is_root(self) -> bool:
        return self.local.rank == 0

    @property
    def root_arg(self) -> int:
        """``root`` argument of this rank in intercommunicator collectives rooted at the driver."""
        return MPI.ROOT if self.is_root else MPI.PROC_NULL


def connect(world: MPI.Comm) -> Layout:
    """Collective with the hosts' ``lodas_init``: split ``world`` and build the intercommunicator."""
    rank = world.rank
    local = world.Split(COLOR_DRIVER, rank)
    mine = np.array([np.iinfo(np.int32).max, rank], dtype=np.int32)
    leaders = np.empty(2, dtype=np.int32)
    world.Allreduce(mine, leaders, op=MPI.MIN)
    if leaders[0] == np.iinfo(np.int32).max:
        raise HandshakeError("no host ranks in the communicator: launch with "
                             "'mpiexec -n A <host> FILE.nml : -n B python -m coupler run FILE.nml'")
    inter = local.Create_intercomm(0, world, int(leaders[0]), TAG_HANDSHAKE)
    node = local.Split_type(MPI.COMM_TYPE_SHARED)
    node_rank = node.rank
    node.Free()
    return Layout(world=world, local=local, inter=inter, host_size=inter.Get_remote_size(), node_rank=node_rank)


def wait(request: MPI.Request, spins: int = 2000, nap_s: float = 2e-4) -> None:
    """Wait for ``request``: spin briefly for a quick answer, then poll with short naps.

    A blocking MPICH wait busy-polls a core; on oversubscribed nodes (more ranks than cores,
    as in small tests) that starves the very host ranks the driver is waiting for.
    """
    for _ in range(spins):
        if request.Test():
            return
    while not request.Test():
        time.sleep(nap_s)


@dataclass(frozen=True)
class Decomposition:
    """Where each host rank's packed field goes in the global state.

    Attributes:
        counts: float64 elements sent by each host rank (header included), shape ``(host_size,)``.
        displs: offsets of each rank's segment in the receive buffer.
        buffer_index: positions of field data in the receive buffer, shape ``(n_state,)``.
        global_index: matching positions in the flattened global state ``(nvar, ny, nx)``.
    """

    counts: np.ndarray
    displs: np.ndarray
    buffer_index: np.ndarray
    global_index: np.ndarray

    @property
    def buffer_size(self) -> int:
        return int(self.counts.sum())

    @classmethod
    def from_boxes(cls, boxes: np.ndarray, shape: tuple[int, int, int]) -> "Decomposition":
        """``boxes``: ``(host_size, nvar, 4)`` 1-based ``[i0, ni, j0, nj]``; ``shape``: ``(nvar, ny, nx)``.

        Raises:
            ValueError: a box outside the grid, or boxes that overlap or leave gaps.
        """
        nvar, ny, nx = shape
        coverage = np.zeros(shape, dtype=np.int64)
        counts, buffer_index, global_index = [], [], []
        offset = 0
        for r, rank_boxes in enumerate(boxes):
            offset += HDR
            n_rank = 0
            for v, (i0, ni, j0, nj) in enumerate(rank_boxes):
                if ni < 0 or nj < 0 or i0 < 1 or j0 < 1 or i0 - 1 + ni > nx or j0 - 1 + nj > ny:
                    raise ValueError(f"host rank {r}, variable {v + 1}: box i={i0}..{i0 + ni - 1}, "
                                     f"j={j0}..{j0 + nj - 1} is outside the {nx} x {ny} grid")
                g = (v * ny + (j0 - 1 + np.arange(nj))[:, None]) * nx + (i0 - 1 + np.arange(ni))[None, :]
                global_index.append(g.ravel())  # i fastest: the Fortran order of the box
                buffer_index.append(offset + np.arange(ni * nj))
                coverage[v, j0 - 1:j0 - 1 + nj, i0 - 1:i0 - 1 + ni] += 1
                offset += ni * nj
                n_rank += ni * nj
            counts.append(HDR + n_rank)
        if not np.all(coverage == 1):
            v, j, i = np.argwhere(coverage != 1)[0]
            what = "is not covered by any host rank" if coverage[v, j, i] == 0 else "is owned by several host ranks"
            raise ValueError(f"the host decomposition does not tile the grid: point (i={i + 1}, j={j + 1}) "
                             f"of variable {v + 1} {what}")
        counts = np.asarray(counts, dtype=np.int64)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(counts=counts, displs=displs, buffer_index=np.concatenate(buffer_index),
                   global_index=np.concatenate(global_index))


@dataclass
class Background:
    """One message from the host: a background at an analysis time, or the end of the run."""

    command: int
    step: int
    model_time: float
    host_put_s: float       #: host wall time of its previous put (s)
    host_get_s: float       #: host wall time of its previous get (s)
    state: np.ndarray | None  #: (nvar, ny, nx) on the driver root, None elsewhere
    host_error: str = ""    #: a host-side usage error flagged in the header


class MpiHostBridge:
    """Driver side of the coupling with a Fortran host over ``layout.inter``.

    Args:
        layout: the communicators (from :func:`connect`).
        shape: ``(nvar, ny, nx)`` the driver expects.
        variables: the variable names the driver expects, in packing order.
        where: text naming the namelist file, for error messages.
    """

    def __init__(self, layout: Layout, shape: tuple[int, int, int], variables: list[str], where: str):
        self.layout = layout
        self.shape = shape
        self.variables = list(variables)
        self.where = where
        self.decomposition: Decomposition | None = None
        self.host_model = ""
        self._recv = self._send = None

    # -- init -------------------------------------------------------------------------------
    def handshake(self, error: str = "") -> None:
        """Receive the host's description, check it, answer every host rank with the verdict.

        Args:
            error: a driver-side problem found before connecting (e.g. the namelist): the host
                is told, and both sides stop with it.

        Raises:
            HandshakeError: on every driver rank when the host and the driver disagree.
        """
        lay = self.layout
        hdr = np.zeros(8, dtype=np.int32)
        names = msg = b""
        if lay.is_root:
            lay.inter.Recv([hdr, MPI.INT], source=0, tag=TAG_HANDSHAKE)
            nbuf = bytearray(NAME_LEN * (int(hdr[2]) + 1))
            lay.inter.Recv([nbuf, MPI.CHAR], source=0, tag=TAG_HANDSHAKE)
            mbuf = bytearray(MSG_LEN)
            lay.inter.Recv([mbuf, MPI.CHAR], source=0, tag=TAG_HANDSHAKE)
            names, msg = bytes(nbuf), bytes(mbuf)
        lay.local.Bcast(hdr, root=0)
        version, host_status, nvar, nx, ny, host_size = (int(v) for v in hdr[:6])
        boxes = None
        if host_status == Status.OK:
            desc = np.zeros((host_size, 4 * nvar), dtype=np.int32) if lay.is_root else None
            lay.inter.Gather(None, [desc, MPI.INT] if lay.is_root else None, root=lay.root_arg)
            if lay.is_root:
                boxes = desc.reshape(host_size, nvar, 4)
        verdict, text = Status.OK, ""
        if error:
            verdict, text = Status.CONFIG_ERROR, f"the lodas driver reported: {error}"
        elif lay.is_root:
            verdict, text = self._check(version, host_status, nvar, nx, ny, names, msg, boxes)
        answer = np.array([int(verdict), 0], dtype=np.int32)
        lay.local.Bcast(answer, root=0)
        text = lay.local.bcast(text, root=0)
        lay.inter.Bcast([answer, MPI.INT], root=lay.root_arg)
        lay.inter.Bcast([bytearray(text.encode()[:MSG_LEN].ljust(MSG_LEN)), MPI.CHAR], root=lay.root_arg)
        if answer[0] != Status.OK:
            raise HandshakeError(text)
        self.decomposition = lay.local.bcast(self.decomposition, root=0)
        self.host_model = lay.local.bcast(self.host_model, root=0)
        if lay.is_root:
            self._recv = np.empty(self.decomposition.buffer_size)
            self._send = np.zeros(self.decomposition.buffer_size)

    def _check(self, version, host_status, nvar, nx, ny, names, msg, boxes) -> tuple[Status, str]:
        def text(b: bytes) -> str:
            return b.decode(errors="replace").strip(" \x00")

        if version != PROTOCOL_VERSION:
            return Status.CONFIG_ERROR, (f"lodas protocol mismatch: host bridge version {version}, driver "
                                         f"{PROTOCOL_VERSION}: rebuild the host against this lodas")
        if host_status != Status.OK:
            return Status(host_status), f"the host reported: {text(msg)}"
        split = [text(names[k * NAME_LEN:(k + 1) * NAME_LEN]) for k in range(nvar + 1)]
        self.host_model, host_vars = split[0], split[1:]
        want_nvar, want_ny, want_nx = self.shape
        problems = []
        if host_vars != self.variables:
            problems.append(f"&grid_nml variables = {self.variables} but the host ({self.host_model}) "
                            f"sends {host_vars}")
        if nx != want_nx:
            problems.append(f"&grid_nml nx = {want_nx} but the host ({self.host_model}) has nx = {nx}")
        if ny != want_ny:
            problems.append(f"&grid_nml ny = {want_ny} but the host ({self.host_model}) has ny = {ny}")
        if problems:
            return Status.CONFIG_ERROR, f"{self.where}: host and driver disagree: " + "; ".join(problems)
        try:
            self.decomposition = Decomposition.from_boxes(boxes, self.shape)
        except ValueError as exc:
            return Status.CONFIG_ERROR, f"{self.where}: {exc}"
        return Status.OK, ""

    # -- cycles -----------------------------------------------------------------------------
    def receive_background(self) -> Background:
        """Collective with the hosts' ``lodas_put_background`` (or ``lodas_finalize``)."""
        lay, dec = self.layout, self.decomposition
        if lay.is_root:
            req = lay.inter.Igatherv(None, [self._recv, dec.counts, dec.displs, MPI.DOUBLE], root=MPI.ROOT)
        else:
            req = lay.inter.Igatherv(None, None, root=MPI.PROC_NULL)
        wait(req)
        head = np.zeros(HDR)
        if lay.is_root:
            heads = self._recv[dec.displs[:, None] + np.arange(HDR)]
            head[:] = heads[0]
            if np.any(heads[:, :3] != heads[0, :3]):
                head[5] = -1.0   # ranks out of step
            elif np.any(heads[:, 5] != 0):
                head[5] = heads[heads[:, 5] != 0, 5][0]
        req = lay.local.Ibcast(head, root=0)
        wait(req)
        state = None
        if lay.is_root:
            state = np.empty(int(np.prod(self.shape)))
            state[dec.global_index] = self._recv[dec.buffer_index]
            state = state.reshape(self.shape)
        error = ""
        if head[5] == -1.0:
            error = "host ranks are out of step (different commands or steps in one exchange)"
        elif head[5] > 0:
            error = f"a host rank passed a state of size {int(head[5]) - 1} to lodas_put_background"
        return Background(command=int(head[0]), step=int(head[1]), model_time=float(head[2]),
                          host_put_s=float(head[3]), host_get_s=float(head[4]), state=state, host_error=error)

    def send_increment(self, increment: np.ndarray | None, status: Status, cycle: int) -> None:
        """Collective with the hosts' ``lodas_get_increment``. ``increment`` matters on the root only;
        a non-zero ``status`` always sends zeros."""
        lay, dec = self.layout, self.decomposition
        if lay.is_root:
            buf = self._send
            buf[:] = 0.0
            heads = dec.displs[:, None] + np.arange(HDR)
            buf[heads[:, 0]] = float(int(status))
            buf[heads[:, 1]] = float(cycle)
            if status == Status.OK:
                buf[dec.buffer_index] = np.ravel(increment)[dec.global_index]
            req = lay.inter.Iscatterv([buf, dec.counts, dec.displs, MPI.DOUBLE], None, root=MPI.ROOT)
        else:
            req = lay.inter.Iscatterv(None, None, root=MPI.PROC_NULL)
        wait(req)

    def close(self) -> None:
        self.layout.inter.Free()
