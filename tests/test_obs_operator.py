"""The bilinear observation operator on the periodic grid."""
from __future__ import annotations

import numpy as np
import pytest

from coupler.assim.base import Observations
from coupler.assim.obs_operator import observation_operator


def obs_at(var_index, x, y):
    x = np.atleast_1d(np.asarray(x, dtype=float))
    return Observations(np.zeros(x.size), np.ones(x.size),
                        np.atleast_1d(np.asarray(var_index)).astype(np.int64), x,
                        np.atleast_1d(np.asarray(y, dtype=float)))


def test_hand_computed_bilinear():
    shape = (1, 3, 4)                              # nvar, ny, nx
    state = np.arange(12.0).reshape(shape) ** 2    # not bilinear, so weights matter
    H = observation_operator(obs_at(0, 1.25, 0.5), shape)
    assert H.shape == (1, 12)
    # weights: (1-a)(1-b)=0.375 at (j0,i1)... a=0.25, b=0.5; corners (0,1),(0,2),(1,1),(1,2)
    row = dict(zip(H.indices.tolist(), H.data.tolist()))
    assert row == pytest.approx({1: 0.375, 2: 0.125, 5: 0.375, 6: 0.125})
    s = state[0]
    expected = 0.375 * s[0, 1] + 0.125 * s[0, 2] + 0.375 * s[1, 1] + 0.125 * s[1, 2]
    assert (H @ state.ravel())[0] == pytest.approx(expected)
    assert expected == pytest.approx(0.375 * 1 + 0.125 * 4 + 0.375 * 25 + 0.125 * 36)


def test_periodic_wrap_at_the_edges():
    shape = (2, 3, 4)
    H = observation_operator(obs_at([1], [3.5], [2.25]), shape)
    # i0=3, i1=0; j0=2, j1=0; variable 1 offset 12
    row = dict(zip(H.indices.tolist(), H.data.tolist()))
    assert row == pytest.approx({12 + 2 * 4 + 3: 0.375, 12 + 2 * 4 + 0: 0.375,
                                 12 + 0 * 4 + 3: 0.125, 12 + 0 * 4 + 0: 0.125})


def test_integer_points_select_exactly():
    shape = (2, 3, 4)
    rng = np.random.default_rng(0)
    v, j, i = rng.integers(0, 2, 20), rng.integers(0, 3, 20), rng.integers(0, 4, 20)
    H = observation_operator(obs_at(v, i, j), shape)
    assert H.nnz == 20 and np.all(np.diff(H.indptr) == 1)
    assert np.all(H.data == 1.0)
    np.testing.assert_array_equal(H.indices, v * 12 + j * 4 + i)
    state = rng.standard_normal(shape)
    np.testing.assert_array_equal(H @ state.ravel(), state[v, j, i])


def test_fractional_in_one_direction_has_two_entries_and_rows_sum_to_one():
    shape = (1, 4, 4)
    H = observation_operator(obs_at([0, 0], [1.0, 2.5], [0.5, 3.0]), shape)
    assert np.diff(H.indptr).tolist() == [2, 2]
    np.testing.assert_allclose(np.asarray(H.sum(axis=1)).ravel(), 1.0)


def test_reproduces_bilinear_fields_exactly():
    shape = (1, 5, 6)
    jj, ii = np.meshgrid(np.arange(5.0), np.arange(6.0), indexing="ij")
    f = (2.0 + 0.5 * ii - 0.3 * jj + 0.1 * ii * jj)[None]
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 5, 50), rng.uniform(0, 4, 50)        # away from the wrap cell
    H = observation_operator(obs_at(np.zeros(50, int), x, y), shape)
    np.testing.assert_allclose(H @ f.ravel(), 2.0 + 0.5 * x - 0.3 * y + 0.1 * x * y, rtol=1e-13)


def test_lorenz96_interpolates_in_x_only():
    shape = (1, 1, 40)
    H = observation_operator(obs_at([0, 0], [39.75, 7.0], [0.0, 0.0]), shape)
    assert dict(zip(H[0].indices.tolist(), H[0].data.tolist())) == pytest.approx({39: 0.25, 0: 0.75})
    assert H[1].indices.tolist() == [7] and H[1].data.tolist() == [1.0]


def test_empty_observations():
    H = observation_operator(Observations.empty(), (3, 4, 5))
    assert H.shape == (0, 60) and H.nnz == 0


@pytest.mark.parametrize("v, x, y, match", [
    (2, 0.0, 0.0, "var_index"),
    (-1, 0.0, 0.0, "var_index"),
    (0, 4.0, 0.0, r"x: .*outside \[0, 4\)"),
    (0, -0.1, 0.0, "x: "),
    (0, np.nan, 0.0, "x: "),
    (0, 0.0, 3.0, r"y: .*outside \[0, 3\)"),
    (0, 0.0, -1e-9, "y: "),
])
def test_out_of_range_raises(v, x, y, match):
    with pytest.raises(ValueError, match=match):
        observation_operator(obs_at(v, x, y), (2, 3, 4))
