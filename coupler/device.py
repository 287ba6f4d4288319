"""Rank-local device choice: each driver rank uses the GPU of its node-local rank, or the CPU.

The node-local rank comes from the caller (the MPI layout computes it with
``Split_type(COMM_TYPE_SHARED)``), so this module needs no MPI. torch is imported only when
a GPU is asked for or may be present, so CPU-only methods start fast.
"""
from __future__ import annotations


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def select_device(requested: str, node_rank: int) -> str:
    """``'cpu'`` or ``'cuda:<k>'`` with ``k = node_rank % n_gpus``.

    Args:
        requested: ``&assim_nml device``: ``'auto'`` (GPU when present), ``'cpu'``, ``'cuda'``.
        node_rank: this rank's index among the driver ranks of its node.

    Raises:
        ValueError: ``'cuda'`` requested on a node without a GPU.
    """
    if requested == "cpu":
        return "cpu"
    n = _cuda_count()
    if n == 0:
        if requested == "cuda":
            raise ValueError("&assim_nml device = 'cuda' but torch sees no CUDA device on this node; "
                             "use 'auto' or 'cpu'")
        return "cpu"
    return f"cuda:{node_rank % n}"


def describe_devices(requested: str, driver_ranks: int) -> list[str]:
    """Devices the driver ranks would use on a node like this one (for ``lodas check``)."""
    try:
        return [select_device(requested, r) for r in range(driver_ranks)]
    except ValueError as exc:
        return [f"none ({exc})"] * driver_ranks
