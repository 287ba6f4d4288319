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
slice copies between the buffer and the global field, which is therefore bit-identical for any
decomposition.
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


#: Default of ``&bridge_nml spin_s`` (also in lodas_bridge.f90).
DEFAULT_SPIN_S = 2e-3
#: Sleep between polls once the spin time is over, s.
NAP_S = 2e-4


def wait(request: MPI.Request, spin_s: float = DEFAULT_SPIN_S) -> None:
    """Wait for ``request``: poll without sleeping for ``spin_s`` seconds, then poll with naps
    of ``NAP_S``.

    A blocking MPICH wait busy-polls a core for as long as it waits; with ranks <= cores that
    is the lowest latency, and ``&bridge_nml spin_s`` large gives exactly that. On oversubscribed
    nodes (more ranks than cores, as in small tests) a long busy wait starves the very ranks
    being waited for, hence the naps after ``spin_s``: a wait that outlasts ``spin_s`` gains at
    most one nap (0.2 ms, ~0.3 ms as the OS schedules it) of latency.
    """
    if request.Test():
        return
    t_end = time.perf_counter() + spin_s
    while time.perf_counter() < t_end:
        if request.Test():
            return
    while not request.Test():
        time.sleep(NAP_S)


@dataclass(frozen=True)
class Decomposition:
    """Where each host rank's packed field goes in the global state.

    Attributes:
        counts: float64 elements sent by each host rank (header included), shape ``(host_size,)``.
        displs: offsets of each rank's segment in the receive buffer.
        boxes: one ``(offset, v, j0, nj, i0, ni)`` per (host rank, variable) with data (0-based):
            ``buffer[offset : offset + nj*ni]`` is ``state[v, j0:j0+nj, i0:i0+ni]`` in C order
            (the Fortran box ``(i, j)`` with ``i`` fastest).
    """

    counts: np.ndarray
    displs: np.ndarray
    boxes: tuple[tuple[int, int, int, int, int, int], ...]

    @property
    def buffer_size(self) -> int:
        return int(self.counts.sum())

    def unpack(self, buffer: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Copy the field data of a gathered ``buffer`` into ``state`` ``(nvar, ny, nx)``: one
        slice copy per box (no index arrays: memory-bandwidth bound)."""
        for off, v, j0, nj, i0, ni in self.boxes:
            state[v, j0:j0 + nj, i0:i0 + ni] = buffer[off:off + nj * ni].reshape(nj, ni)
        return state

    def pack(self, state: np.ndarray, buffer: np.ndarray) -> np.ndarray:
        """Copy ``state`` ``(nvar, ny, nx)`` into the field positions of ``buffer`` (headers untouched)."""
        for off, v, j0, nj, i0, ni in self.boxes:
            buffer[off:off + nj * ni].reshape(nj, ni)[...] = state[v, j0:j0 + nj, i0:i0 + ni]
        return buffer

    @classmethod
    def from_boxes(cls, boxes: np.ndarray, shape: tuple[int, int, int]) -> "Decomposition":
        """``boxes``: ``(host_size, nvar, 4)`` 1-based ``[i0, ni, j0, nj]``; ``shape``: ``(nvar, ny, nx)``.

        Raises:
            ValueError: a box outside the grid, or boxes that overlap or leave gaps.
        """
        nvar, ny, nx = shape
        coverage = np.zeros(shape, dtype=np.int64)
        counts, pieces = [], []
        offset = 0
        for r, rank_boxes in enumerate(boxes):
            offset += HDR
            n_rank = 0
            for v, (i0, ni, j0, nj) in enumerate(rank_boxes):
                i0, ni, j0, nj = (int(b) for b in (i0, ni, j0, nj))
                if ni < 0 or nj < 0 or i0 < 1 or j0 < 1 or i0 - 1 + ni > nx or j0 - 1 + nj > ny:
                    raise ValueError(f"host rank {r}, variable {v + 1}: box i={i0}..{i0 + ni - 1}, "
                                     f"j={j0}..{j0 + nj - 1} is outside the {nx} x {ny} grid")
                if ni * nj:
                    pieces.append((offset, v, j0 - 1, nj, i0 - 1, ni))
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
        return cls(counts=counts, displs=displs, boxes=tuple(pieces))


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
        spin_s: ``&bridge_nml spin_s``, seconds a wait polls before it starts napping (:func:`wait`).
    """

    def __init__(self, layout: Layout, shape: tuple[int, int, int], variables: list[str], where: str,
                 spin_s: float = DEFAULT_SPIN_S):
        self.layout = layout
        self.spin_s = spin_s
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
            dec = self.decomposition
            self._recv = np.empty(dec.buffer_size)
            self._send = np.zeros(dec.buffer_size)     # headers stay zero but for status and cycle
            self._send_zero = True
            self._head_index = dec.displs[:, None] + np.arange(HDR)

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
        wait(req, self.spin_s)
        head = np.zeros(HDR)
        if lay.is_root:
            heads = self._recv[dec.displs[:, None] + np.arange(HDR)]
            head[:] = heads[0]
            if np.any(heads[:, :3] != heads[0, :3]):
                head[5] = -1.0   # ranks out of step
            elif np.any(heads[:, 5] != 0):
                head[5] = heads[heads[:, 5] != 0, 5][0]
        if lay.local.size > 1:
            wait(lay.local.Ibcast(head, root=0), self.spin_s)
        state = None
        if lay.is_root and head[0] == CMD_CYCLE:
            state = dec.unpack(self._recv, np.empty(self.shape))
        error = ""
        if head[5] == -1.0:
            error = "host ranks are out of step (different commands or steps in one exchange)"
        elif head[5] > 0:
            error = f"a host rank passed a state of size {int(head[5]) - 1} to lodas_put_background"
        return Background(command=int(head[0]), step=int(head[1]), model_time=float(head[2]),
                          host_put_s=float(head[3]), host_get_s=float(head[4]), state=state, host_error=error)

    def send_increment(self, increment: np.ndarray | None, status: Status, cycle: int) -> None:
        """Collective with the hosts' ``lodas_get_increment``. ``increment`` ``(nvar, ny, nx)``
        matters on the root only; a non-zero ``status`` always sends zeros."""
        lay, dec = self.layout, self.decomposition
        if lay.is_root:
            buf = self._send
            ok = status == Status.OK and increment is not None
            if ok:
                dec.pack(np.asarray(increment, dtype=np.float64).reshape(self.shape), buf)
            elif not self._send_zero:
                buf[:] = 0.0
            self._send_zero = not ok
            buf[self._head_index[:, 0]] = float(int(status))
            buf[self._head_index[:, 1]] = float(cycle)
            req = lay.inter.Iscatterv([buf, dec.counts, dec.displs, MPI.DOUBLE], None, root=MPI.ROOT)
        else:
            req = lay.inter.Iscatterv(None, None, root=MPI.PROC_NULL)
        wait(req, self.spin_s)

    def close(self) -> None:
        self.layout.inter.Free()
