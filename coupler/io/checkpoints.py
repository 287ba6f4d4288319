"""Checkpoints of the LO-SDA networks (VAE + conditional diffusion prior): safe, self-describing files.

A checkpoint is one ``torch.save`` file holding **only plain values**: a dict of tensors,
ints, floats, strings, booleans, ``None``, lists and dicts (no classes, no code). It is read
back with ``torch.load(..., weights_only=True)``, whose restricted unpickler refuses anything
else, so a checkpoint received from another site cannot execute code; the modules are
rebuilt from the plain ``arch`` dict by :func:`coupler.assim.latent.build_networks` and the
weights loaded with ``load_state_dict(strict=True)``.

Contents (``FORMAT_VERSION = 1``):

====================  ======================================================================
key                   what
====================  ======================================================================
``format``            ``"lodas-latent-checkpoint"``
``format_version``    ``1``
``lodas_version``     the lodas version that wrote it
``arch``              the architecture dict (:data:`coupler.assim.latent.ARCH_KEYS`)
``shape``             ``[nvar, ny, nx]`` of the states it was trained on
``variables``         the state variables' names, in packing order (``&grid_nml variables``)
``normalization``     ``{"mean": [...], "std": [...]}`` per variable, physical units
``latent_shape``      ``[C, n]`` or ``[C, ny', nx']``
``latent_scale``      std of the training latents' ``mu`` (``to_latent = mu / latent_scale``)
``schedule_eta``      the :class:`~coupler.assim.diffusion.CosineSchedule` floor it was trained with
``latent_increment_std``  ``s_d``, RMS of ``to_latent(x_t) - to_latent(x_b)`` over the training
                      pairs: the prior is over ``d = (z - z_b) / s_d``
``background_error``  mean relative background error ``e_b`` of the training pairs, per source
                      and ``"all"`` (the default condition of the prior)
``train_namelist``    the effective training namelist (text), when trained by ``lodas train``
``summary``           training figures (losses, reconstruction RMSE per variable, ...)
``vae_state``         ``StateVAE.state_dict()`` (float32 tensors, on the CPU)
``eps_state``         ``ConditionalEpsNet.state_dict()``
====================  ======================================================================

plus any other plain entries of the ``meta`` given to :func:`save_checkpoint`. Files are
written atomically (temporary name + rename, :mod:`coupler.io.atomic`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from coupler.io.atomic import atomic_path

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "shipped_checkpoint", "FORMAT", "FORMAT_VERSION",
           "CHECKPOINT_DIR"]

FORMAT = "lodas-latent-checkpoint"
FORMAT_VERSION = 1
#: Where the trained checkpoints shipped with lodas live (``<name>.pt``, e.g. ``l96.pt``).
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
_STATES = ("vae_state", "eps_state")


def shipped_checkpoint(name: str) -> Path:
    """The shipped checkpoint of a testbed (``'l96'``, ``'sw'``): ``coupler/checkpoints/<name>.pt``
    (it may not exist: check before use, or let :func:`load_checkpoint` say so)."""
    return CHECKPOINT_DIR / f"{name}.pt"


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        vae: the :class:`~coupler.assim.latent.StateVAE`, eval mode, parameters frozen
            (``requires_grad=False``; gradients still flow to its *inputs*, as latent
            optimisation needs).
        eps_net: the :class:`~coupler.assim.latent.ConditionalEpsNet`, likewise.
        meta: every plain entry of the file but the two state dicts.
        path: the file.
    """

    vae: Any
    eps_net: Any
    meta: dict = field(repr=False)
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])

    @property
    def variables(self) -> list[str]:
        return list(self.meta["variables"])

    @property
    def schedule(self):
        """The :class:`~coupler.assim.diffusion.CosineSchedule` the prior was trained with."""
        from coupler.assim.diffusion import CosineSchedule

        return CosineSchedule(eta=float(self.meta["schedule_eta"]))


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain checkpoint data (tuples -> lists, numpy scalars -> Python), or ValueError."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"save_checkpoint: {where}: dict keys must be strings, got {k!r}")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    try:                                    # numpy scalars and 0-d arrays
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise ValueError(f"save_checkpoint: {where}: {type(value).__name__} is not plain checkpoint data "
                     "(tensors, numbers, strings, booleans, None, lists and dicts only)")


def save_checkpoint(path: str | os.PathLike, vae, eps_net, meta: dict) -> Path:
    """Write ``vae``, ``eps_net`` and ``meta`` to ``path`` atomically; returns the path.

    Args:
        path: the output file (parent directories are created).
        vae: a :class:`~coupler.assim.latent.StateVAE` (its buffers carry the normalisation and
            ``latent_scale``).
        eps_net: a :class:`~coupler.assim.latent.ConditionalEpsNet`.
        meta: plain values; must hold ``arch`` (the dict the modules were built from),
            ``variables`` and ``latent_increment_std`` (> 0); optional ``schedule_eta`` (default 1e-3), ``train_namelist``,
            ``summary`` and anything else plain. The entries of the table in the module
            docstring are derived from the modules and override ``meta``'s.

    Raises:
        ValueError: missing ``arch``/``variables``, a variable count that does not match the
            VAE, or non-plain data in ``meta``.
    """
    from coupler import __version__

    for key in ("arch", "variables", "latent_increment_std"):
        if key not in meta:
            raise ValueError(f"save_checkpoint: meta needs {key!r}")
    variables = [str(v) for v in meta["variables"]]
    if len(variables) != vae.shape[0]:
        raise ValueError(f"save_checkpoint: {len(variables)} variables {variables} for a VAE of "
                         f"{vae.shape[0]} state variables")
    payload = _plain({k: v for k, v in meta.items() if k not in _STATES}, "meta")
    scale = float(vae.latent_scale)
    payload.update(
        format=FORMAT, format_version=FORMAT_VERSION, lodas_version=__version__,
        arch=_plain(meta["arch"], "meta.arch"), shape=list(vae.shape), variables=variables,
        normalization={"mean": vae.norm_mean.tolist(), "std": vae.norm_std.tolist()},
        latent_shape=list(vae.latent_shape), latent_scale=scale,
        schedule_eta=float(meta.get("schedule_eta", 1e-3)),
        train_namelist=str(meta.get("train_namelist", "")), summary=_plain(meta.get("summary", {}), "meta.summary"),
        vae_state={k: v.detach().to("cpu", copy=True).contiguous() for k, v in vae.state_dict().items()},
        eps_state={k: v.detach().to("cpu", copy=True).contiguous() for k, v in eps_net.state_dict().items()},
    )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"save_checkpoint: latent_scale = {scale} (set it with vae.set_latent_scale)")
    inc = payload["latent_increment_std"]
    if isinstance(inc, bool) or not isinstance(inc, (int, float)) or not (math.isfinite(inc) and inc > 0):
        raise ValueError(f"save_checkpoint: latent_increment_std = {inc!r}: expected a finite number > 0")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _describe(shape, variables) -> str:
    return f"(nvar, ny, nx) = {tuple(shape)} with variables {list(variables)}"


def load_checkpoint(path: str | os.PathLike, *, shape: Sequence[int] | None = None,
                    variables: Sequence[str] | None = None, where: str = "", device="cpu") -> Checkpoint:
    """Read a checkpoint safely (``weights_only=True``) and rebuild its modules on ``device``.

    Args:
        path: the file.
        shape: the run's state shape ``(nvar, ny, nx)``, checked against the checkpoint's
            (``None``: not checked).
        variables: the run's variable names (``&grid_nml variables``), checked likewise.
        where: context for messages, e.g. ``"run.nml: &assim_nml checkpoint"``: errors read
            ``"run.nml: &assim_nml checkpoint = 'file.pt': ..."`` (default
            ``"checkpoint 'file.pt': ..."``).
        device: where the modules go (``map_location`` too).

    Raises:
        ValueError: naming the file, what the checkpoint has and what the run expects, when the
            file is missing or unreadable, holds anything but plain data (e.g. a pickled
            object), is of another format or format version, or was trained on another grid
            or other variables.
    """
    from coupler.assim.latent import build_networks

    path = Path(path)
    prefix = f"{where} = '{path}'" if where else f"checkpoint '{path}'"
    if not path.is_file():
        raise ValueError(f"{prefix}: no such file (train one with `lodas train FILE.nml`)")
    try:
        payload = torch.load(path, weights_only=True, map_location=device)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (not a zip), EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{prefix}: not a readable lodas checkpoint ({type(exc).__name__}: {first[:300]}); "
                         "checkpoints are read with torch.load(weights_only=True) and may hold only tensors "
                         "and plain values, never pickled objects") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{prefix}: not a lodas checkpoint (format {what!r}, expected {FORMAT!r})")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{prefix}: checkpoint format version {version!r} (written by lodas "
                         f"{payload.get('lodas_version', '?')}); this lodas reads version {FORMAT_VERSION}: "
                         "retrain with `lodas train`")
    have_shape, have_vars = tuple(payload.get("shape", ())), list(payload.get("variables", []))
    if shape is not None and tuple(int(s) for s in shape) != have_shape:
        nvar, ny, nx = (int(s) for s in shape)
        run_vars = f", variables = {list(variables)}" if variables is not None else ""
        raise ValueError(f"{prefix}: trained on states {_describe(have_shape, have_vars)}; the run expects "
                         f"(nvar, ny, nx) = {(nvar, ny, nx)} (&grid_nml nx = {nx}, ny = {ny}{run_vars})")
    if variables is not None and list(variables) != have_vars:
        raise ValueError(f"{prefix}: trained on variables {have_vars}; the run has &grid_nml variables = "
                         f"{list(variables)}")
    try:
        vae, eps_net = build_networks(payload["arch"])
        vae.load_state_dict(payload["vae_state"], strict=True)
        eps_net.load_state_dict(payload["eps_state"], strict=True)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{prefix}: inconsistent checkpoint (cannot rebuild its networks: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    if tuple(vae.shape) != have_shape:
        raise ValueError(f"{prefix}: inconsistent checkpoint: arch shape {vae.shape} but shape {have_shape}")
    for m in (vae, eps_net):
        m.to(device).eval().requires_grad_(False)
    meta = {k: v for k, v in payload.items() if k not in _STATES}
    return Checkpoint(vae=vae, eps_net=eps_net, meta=meta, path=path)
