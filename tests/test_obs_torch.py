"""The torch observation operator: the same H as scipy's, differentiable, batched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coupler.assim.base import Observations
from coupler.assim.obs_operator import observation_operator
from coupler.assim.obs_torch import TorchObservationOperator

SHAPE = (3, 8, 12)                                    # nvar, ny, nx


def make_obs(kind: str, shape=SHAPE, seed: int = 0) -> Observations:
    """Observations of one kind (or all kinds mixed) with random values and stds."""
    rng = np.random.default_rng(seed)
    nvar, ny, nx = shape
    if kind == "stations":                            # fractional positions: bilinear
        p = 17
        v, x, y, w = rng.integers(0, nvar, p), rng.uniform(0, nx, p), rng.uniform(0, ny, p), np.zeros(p)
    elif kind == "grid":                              # grid points: one entry of weight 1
        p = 11
        v, x, y, w = (rng.integers(0, nvar, p), rng.integers(0, nx, p).astype(float),
                      rng.integers(0, ny, p).astype(float), np.zeros(p))
    elif kind == "footprints":                        # odd and even boxes, some wrapping
        v = np.array([0, 1, 2, 0, 2])
        x = np.array([0.0, 5.5, 11.0, 3.5, 6.0])
        y = np.array([0.0, 3.5, 7.0, 1.5, 4.0])
        w = np.array([3, 4, 1, 2, 5])
    else:                                             # mixed: all of the above, interleaved
        parts = [make_obs(k, shape, seed) for k in ("stations", "grid", "footprints")]
        cat = {f: np.concatenate([getattr(o, f) for o in parts])
               for f in ("var_index", "x", "y", "footprint")}
        order = rng.permutation(cat["x"].size)
        v, x, y, w = (cat[f][order] for f in ("var_index", "x", "y", "footprint"))
    p = len(x)
    return Observations(rng.standard_normal(p), rng.uniform(0.5, 2.0, p), np.asarray(v, dtype=np.int64),
                        np.asarray(x, float), np.asarray(y, float), np.asarray(w, float))


KINDS = ["stations", "grid", "footprints", "mixed"]


@pytest.mark.parametrize("kind", KINDS)
def test_equals_scipy_H_in_float64(kind):
    obs = make_obs(kind)
    H = observation_operator(obs, SHAPE)
    op = TorchObservationOperator.from_observations(obs, SHAPE, dtype=torch.float64)
    assert len(op) == len(obs) and op.index.shape[1] == np.diff(H.indptr).max()
    rng = np.random.default_rng(1)
    X = rng.standard_normal((4, *SHAPE))
    out = op(torch.as_tensor(X))
    assert out.shape == (4, len(obs)) and out.dtype == torch.float64
    expected = np.stack([H @ x.ravel() for x in X])
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    single = op(torch.as_tensor(X[2]))                      # unbatched (nvar, ny, nx) -> (p,)
    assert single.shape == (len(obs),)
    np.testing.assert_allclose(single.numpy(), expected[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(op.y, torch.as_tensor(obs.value))
    torch.testing.assert_close(op.obs_std, torch.as_tensor(obs.error_std))


def test_misfit_formula():
    obs = make_obs("mixed")
    H = observation_operator(obs, SHAPE)
    op = TorchObservationOperator.from_observations(obs, SHAPE, dtype=torch.float64)
    X = np.random.default_rng(2).standard_normal((3, *SHAPE))
    for s in (0.0, 0.7):
        expected = [0.5 * np.sum((obs.value - H @ x.ravel()) ** 2 / (obs.error_std ** 2 + s)) for x in X]
        got = op.misfit(torch.as_tensor(X), s)
        assert got.shape == (3,)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-13)
        assert op.misfit(torch.as_tensor(X[1]), torch.tensor(s)).shape == ()
    with pytest.raises(ValueError, match="obs_var_scale must be a scalar"):
        op.misfit(torch.as_tensor(X), torch.ones(3))


def test_gradcheck_forward_and_misfit():
    shape = (2, 4, 4)
    obs = Observations(np.array([0.3, -1.0, 2.0, 0.5]), np.array([0.5, 1.0, 2.0, 0.8]),
                       np.array([0, 1, 1, 0]), np.array([1.25, 1.5, 3.0, 0.0]), np.array([2.5, 1.5, 0.0, 0.0]),
                       np.array([0, 2, 0, 3]))
    op = TorchObservationOperator.from_observations(obs, shape, dtype=torch.float64)
    x = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradcheck(lambda z: op.misfit(z, 0.3), (x,))
    # the gradient of the misfit is -H^T R^-1 (y - Hx), as in 3D-Var
    H = observation_operator(obs, shape).toarray()
    xv = x.detach()[0].numpy().ravel()
    g = torch.autograd.grad(op.misfit(x).sum(), x)[0][0].numpy().ravel()
    np.testing.assert_allclose(g, -H.T @ ((obs.value - H @ xv) / obs.error_std ** 2), rtol=1e-12, atol=1e-14)


def test_batch_equals_loop_over_members():
    obs = make_obs("mixed", seed=3)
    op = TorchObservationOperator.from_observations(obs, SHAPE)          # float32 default
    X = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    batch, loop = op(X), torch.stack([op(X[m]) for m in range(5)])
    torch.testing.assert_close(batch, loop, rtol=0, atol=0)
    torch.testing.assert_close(op.misfit(X), torch.stack([op.misfit(X[m]) for m in range(5)]), rtol=0, atol=0)


def test_device_and_dtype_are_respected():
    obs = make_obs("footprints")
    op = TorchObservationOperator.from_observations(obs, SHAPE)
    assert op.weight.dtype == op.y.dtype == op.obs_std.dtype == torch.float32
    assert op.index.dtype == torch.int64 and op.y.device.type == "cpu"
    assert op(torch.zeros(2, *SHAPE)).dtype == torch.float32
    op64 = op.to(torch.float64)                                   # a Module: buffers follow .to()
    assert op64.weight.dtype == torch.float64 and op64.index.dtype == torch.int64
    with pytest.raises(ValueError, match="dtype"):
        TorchObservationOperator.from_observations(obs, SHAPE, dtype=torch.int32)
    if torch.cuda.is_available():
        opc = TorchObservationOperator.from_observations(obs, SHAPE, device="cuda", dtype=torch.float64)
        assert opc.y.device.type == "cuda" and opc.index.device.type == "cuda"
        x = torch.randn(2, *SHAPE, dtype=torch.float64)
        torch.testing.assert_close(opc(x.cuda()).cpu(), op64(x), rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="on cpu"):
            opc(x)


def test_padding_keeps_non_finite_values_local():
    shape = (1, 4, 4)
    obs = Observations(np.zeros(2), np.ones(2), np.zeros(2, int), np.array([2.0, 1.5]), np.array([2.0, 1.5]),
                       np.array([0.0, 2.0]))                      # k = 4: the point row is padded
    op = TorchObservationOperator.from_observations(obs, shape, dtype=torch.float64)
    x = torch.zeros(shape, dtype=torch.float64)
    x[0, 0, 0] = float("nan")               # column 0 is not seen by either observation (nor used as padding)
    assert torch.isfinite(op(x)).all()
    x[0, 2, 2] = float("nan")               # seen by both
    assert torch.isnan(op(x)).all()


def test_empty_observations():
    op = TorchObservationOperator.from_observations(Observations.empty(), SHAPE, dtype=torch.float64)
    X = torch.randn(3, *SHAPE, dtype=torch.float64, requires_grad=True)
    assert len(op) == 0 and op(X).shape == (3, 0) and op(X[0]).shape == (0,)
    j = op.misfit(X)
    assert j.shape == (3,) and torch.all(j == 0)
    j.sum().backward()
    assert torch.all(X.grad == 0)


def test_shape_errors():
    op = TorchObservationOperator.from_observations(make_obs("grid"), SHAPE)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3, 8, 12\)"):
        op(torch.zeros(2, 3, 8, 11))
    with pytest.raises(ValueError, match="x: expected shape"):
        op(torch.zeros(1, 1, 3, 8, 12))
    with pytest.raises(ValueError, match=r"Observations.x: \d+ coordinate\(s\) outside \[0, 12\)"):
        TorchObservationOperator.from_observations(make_obs("grid", shape=(3, 8, 13)), SHAPE)
