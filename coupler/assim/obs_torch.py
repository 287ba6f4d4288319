"""The observation operator ``H`` in torch: differentiable, batched over ensemble members.

Every observation operator of lodas is *linear* (bilinear point interpolation and box-average
footprints, see :mod:`coupler.assim.obs_operator`), so the torch operator is built from the
very same ``scipy.sparse`` matrix that 3D-Var and the ETKF use: numpy and torch methods see the
same ``H`` by construction, and only one place defines what an observation means.

Maths and shapes. A state ``x`` of shape ``(nvar, ny, nx)`` flattens (C order) to a vector of
length ``n = nvar*ny*nx``; ``H`` is ``(p, n)`` with at most ``k`` non-zeros per row (4 for
bilinear points, ``w^2`` for a ``w x w`` footprint). It is stored as a *padded gather*:
``index`` ``(p, k)`` (int64 column indices) and ``weight`` ``(p, k)`` such that

    (H x)_o = sum_{m<k} weight[o, m] * x_flat[index[o, m]]            o = 0..p-1,

where row ``o`` holds its non-zeros first, then padding of weight 0 that repeats the row's
first column (so a non-finite value in ``x`` only reaches the observations that really depend
on it). For a batch ``X`` ``(B, nvar, ny, nx)``, ``forward(X)`` is ``(B, p)``, ``H`` applied to
each member; ``X[:, index]`` gathers ``(B, p, k)`` values (memory ``B*p*k``), and autograd
gives ``H^T`` (a scatter-add) for the backward pass.

With observations ``y`` ``(p,)`` and error stds ``sigma_o`` ``(p,)`` (uncorrelated errors,
``R = diag(sigma_o^2)``), :meth:`TorchObservationOperator.misfit` is the observation term of
the variational cost, per member:

    J_o(x) = 1/2 sum_o (y_o - (H x)_o)^2 / (sigma_o^2 + s)                 (B,)

with ``s = obs_var_scale >= 0`` a scalar added to every error variance (in squared observed
units; 0 gives ``-log p(y | x)`` up to a constant; SDA-style likelihood approximations pass
their extra variance here). Dimensionless.

Pure torch (no numpy at call time, no MPI, no I/O); the buffers follow ``.to(device, dtype)``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from coupler.assim.base import Observations
from coupler.assim.obs_operator import observation_operator

__all__ = ["TorchObservationOperator"]


class TorchObservationOperator(torch.nn.Module):
    """``H`` as a padded gather, with the observations ``y`` and error stds ``obs_std``.

    Buffers (all on one device; ``weight``, ``y``, ``obs_std`` in one floating dtype):
        index: ``(p, k)`` int64 columns of the flattened state (``k >= 1``).
        weight: ``(p, k)`` weights, 0 on padding.
        y: ``(p,)`` observed values (units of the observed variables).
        obs_std: ``(p,)`` observation-error standard deviations, > 0 (same units).

    Attributes:
        shape: the state shape ``(nvar, ny, nx)``.

    Build it with :meth:`from_observations`; ``len(op)`` is ``p``.
    """

    index: Tensor
    weight: Tensor
    y: Tensor
    obs_std: Tensor

    def __init__(self, index: Tensor, weight: Tensor, y: Tensor, obs_std: Tensor,
                 shape: tuple[int, int, int]):
        super().__init__()
        if len(shape) != 3 or any(int(s) != s or s < 1 for s in shape):
            raise ValueError(f"shape: expected (nvar, ny, nx) of positive ints, got {shape!r}")
        self.shape = tuple(int(s) for s in shape)
        n = self.shape[0] * self.shape[1] * self.shape[2]
        if index.ndim != 2 or weight.shape != index.shape or index.dtype != torch.int64:
            raise ValueError(f"index, weight: expected (p, k) int64 and (p, k) float, got "
                             f"{tuple(index.shape)} {index.dtype} and {tuple(weight.shape)} {weight.dtype}")
        p = index.shape[0]
        if y.shape != (p,) or obs_std.shape != (p,):
            raise ValueError(f"y, obs_std: expected shape ({p},), got {tuple(y.shape)} and {tuple(obs_std.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"index: column indices must lie in [0, {n}) for a state of shape {self.shape}")
        self.register_buffer("index", index)
        self.register_buffer("weight", weight)
        self.register_buffer("y", y)
        self.register_buffer("obs_std", obs_std)

    @classmethod
    def from_observations(cls, obs: Observations, shape: tuple[int, int, int], *,
                          device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32) -> "TorchObservationOperator":
        """The operator of ``obs`` (points and footprints) on a state of ``shape``.

        Args:
            obs: the ``p`` observations; ``value`` -> ``y``, ``error_std`` -> ``obs_std``.
            shape: the state shape ``(nvar, ny, nx)``.
            device: where the buffers live.
            dtype: floating dtype of ``weight``, ``y`` and ``obs_std`` (``index`` is int64).

        Raises:
            ValueError: as :func:`coupler.assim.obs_operator.observation_operator` (bad
                coordinates, variables or footprints), or ``dtype`` not floating.
        """
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: expected a floating torch dtype, got {dtype!r}")
        H = observation_operator(obs, shape)              # (p, n) csr, sorted, no explicit zeros
        p = H.shape[0]
        counts = np.diff(H.indptr)
        k = max(int(counts.max(initial=0)), 1)
        row = np.repeat(np.arange(p), counts)
        pos = np.arange(H.nnz) - H.indptr[row]            # position of each entry in its row
        first = H.indices[H.indptr[:-1]] if H.nnz else np.zeros(p, dtype=np.int64)
        index = np.repeat(first[:, None].astype(np.int64), k, axis=1)   # padding: the row's first column
        weight = np.zeros((p, k))
        index[row, pos] = H.indices
        weight[row, pos] = H.data
        t = dict(device=device, dtype=dtype)
        return cls(torch.as_tensor(index, device=device),
                   torch.as_tensor(weight, **t),
                   torch.as_tensor(np.asarray(obs.value, dtype=np.float64), **t),
                   torch.as_tensor(np.asarray(obs.error_std, dtype=np.float64), **t),
                   tuple(shape))

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def extra_repr(self) -> str:
        return (f"p={len(self)}, k={self.index.shape[1]}, shape={self.shape}, "
                f"dtype={self.weight.dtype}, device={self.weight.device}")

    def _flat(self, x: Tensor) -> tuple[Tensor, bool]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        batched = x.ndim == 4
        if tuple(x.shape[-3:]) != self.shape or x.ndim not in (3, 4):
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, self.shape))}) or "
                             f"{self.shape}, got {tuple(x.shape)}")
        if x.device != self.index.device:
            raise ValueError(f"x: on {x.device}, the operator on {self.index.device} (use op.to(device))")
        return x.reshape(x.shape[0] if batched else 1, -1), batched

    def forward(self, x: Tensor) -> Tensor:
        """``H x``: ``(B, nvar, ny, nx) -> (B, p)``, or unbatched ``(nvar, ny, nx) -> (p,)``.

        Computed in ``torch.promote_types(x.dtype, weight.dtype)``; differentiable in ``x``.
        """
        flat, batched = self._flat(x)
        hx = (flat[:, self.index] * self.weight).sum(dim=-1)          # (B, p, k) -> (B, p)
        return hx if batched else hx[0]

    def misfit(self, x: Tensor, obs_var_scale: Tensor | float = 0.0) -> Tensor:
        """``J_o(x) = 1/2 sum_o (y_o - (H x)_o)^2 / (obs_std_o^2 + obs_var_scale)``.

        Args:
            x: ``(B, nvar, ny, nx)`` or ``(nvar, ny, nx)``.
            obs_var_scale: a scalar >= 0 (float or 0-d tensor, squared observed units) added
                to every error variance.

        Returns:
            ``(B,)`` (a 0-d tensor for an unbatched ``x``); zeros without observations.
        """
        hx = self.forward(x)
        scale = torch.as_tensor(obs_var_scale, dtype=hx.dtype, device=hx.device)
        if scale.ndim != 0:
            raise ValueError(f"misfit: obs_var_scale must be a scalar, got shape {tuple(scale.shape)}")
        var = self.obs_std.to(hx.dtype) ** 2 + scale
        return 0.5 * ((self.y.to(hx.dtype) - hx) ** 2 / var).sum(dim=-1)
