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


# ------------------------------------------------------------------ footprints (area averages)
def fp_at(var_index, x, y, w):
    o = obs_at(var_index, x, y)
    return Observations(o.value, o.error_std, o.var_index, o.x, o.y,
                        np.broadcast_to(np.asarray(w, dtype=float), o.x.shape).copy())


def row_of(H, k=0):
    return dict(zip(H[k].indices.tolist(), H[k].data.tolist()))


def test_footprint_default_is_points_and_constructors_still_work():
    o = obs_at([0, 1], [1.0, 2.0], [0.0, 1.0])
    assert o.footprint.tolist() == [0.0, 0.0] and o.footprint.dtype == np.float64
    assert Observations.empty().footprint.shape == (0,)
    assert len(Observations(np.zeros(2), np.ones(2), np.zeros(2, int), np.zeros(2), np.zeros(2), [0, 3])) == 2


def test_footprint_odd_box_hand_computed():
    shape = (1, 4, 5)                              # nvar, ny, nx
    H = observation_operator(fp_at(0, 1.0, 2.0, 3), shape)
    # box i = 0..2, j = 1..3: columns j*5 + i, weight 1/9 each
    assert row_of(H) == pytest.approx({j * 5 + i: 1 / 9 for j in (1, 2, 3) for i in (0, 1, 2)})
    state = np.arange(20.0).reshape(shape) ** 2
    assert (H @ state.ravel())[0] == pytest.approx(state[0, 1:4, 0:3].mean())


def test_footprint_even_box_wraps_periodically_and_picks_the_variable():
    shape = (2, 4, 4)
    H = observation_operator(fp_at(1, 3.5, 3.5, 2), shape)     # i0 = j0 = 3: i, j in {3, 0}
    assert row_of(H) == pytest.approx({16 + j * 4 + i: 0.25 for j in (3, 0) for i in (3, 0)})
    H = observation_operator(fp_at(0, 0.0, 0.0, 3), shape)     # i0 = j0 = -1: {3, 0, 1}
    assert row_of(H) == pytest.approx({j * 4 + i: 1 / 9 for j in (3, 0, 1) for i in (3, 0, 1)})


def test_footprint_of_one_is_the_grid_point_and_full_width_is_the_mean():
    shape = (1, 4, 6)
    H = observation_operator(fp_at(0, 5.0, 2.0, 1), shape)
    assert row_of(H) == {2 * 6 + 5: 1.0}
    H = observation_operator(fp_at(0, 1.5, 1.5, 4), (1, 4, 4))
    np.testing.assert_allclose(H.toarray(), np.full((1, 16), 1 / 16))


def test_footprint_is_a_segment_on_a_ring():
    shape = (1, 1, 40)                             # Lorenz-96: y is ignored, weights 1/w
    H = observation_operator(fp_at(0, 39.5, 0.0, 4), shape)      # i0 = 38: 38, 39, 0, 1
    assert row_of(H) == pytest.approx({38: 0.25, 39: 0.25, 0: 0.25, 1: 0.25})
    H = observation_operator(fp_at(0, 7.0, 0.5, 5), shape)       # y in [0, 1) is allowed, as for points
    assert row_of(H) == pytest.approx({i: 0.2 for i in range(5, 10)})
    H = observation_operator(fp_at(0, 0.0, 2.0, 3), (1, 4, 1))   # nx == 1: a segment in y
    assert row_of(H) == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})


def test_box_average_of_a_linear_field_is_its_centre_value():
    shape = (1, 12, 16)
    jj, ii = np.meshgrid(np.arange(12.0), np.arange(16.0), indexing="ij")
    f = (3.0 + 0.5 * ii - 0.25 * jj)[None]
    w = np.array([1, 2, 3, 4, 5, 2])
    x = np.array([7.0, 7.5, 6.0, 8.5, 8.0, 1.5])  # boxes away from the wrap
    y = np.array([3.0, 4.5, 5.0, 5.5, 6.0, 1.5])
    H = observation_operator(fp_at(np.zeros(6, int), x, y, w), shape)
    np.testing.assert_allclose(H @ f.ravel(), 3.0 + 0.5 * x - 0.25 * y, rtol=1e-14)
    assert np.diff(H.indptr).tolist() == (w ** 2).tolist()
    np.testing.assert_allclose(np.asarray(H.sum(axis=1)).ravel(), 1.0, rtol=1e-14)


def test_points_and_footprints_mix_in_one_operator_in_order():
    shape = (3, 8, 8)
    rng = np.random.default_rng(4)
    v = np.array([0, 2, 1, 2, 0, 1])
    x = np.array([1.25, 3.0, 2.5, 7.0, 0.5, 4.0])
    y = np.array([6.5, 3.0, 0.5, 7.0, 5.5, 2.0])
    w = np.array([0, 3, 2, 0, 2, 1])
    H = observation_operator(fp_at(v, x, y, w), shape)
    for k in range(6):                              # row k == the operator of observation k alone
        alone = observation_operator(fp_at(v[k], x[k], y[k], w[k]), shape)
        assert row_of(H, k) == pytest.approx(row_of(alone))
    assert np.all(np.diff(H.indices[H.indptr[1]:H.indptr[2]]) > 0)     # sorted columns
    state = rng.standard_normal(shape)
    assert (H @ state.ravel())[1] == pytest.approx(state[2, 2:5, 2:5].mean())
    assert (H @ state.ravel())[5] == state[1, 2, 4]


@pytest.mark.parametrize("x, y, w, match", [
    (1.5, 1.0, 3, r"x: 1 footprint centre\(s\) not aligned .* obs 0: x=1.5 with footprint=3"),
    (1.0, 1.0, 2, r"x: .*not aligned"),
    (1.5, 2.0, 2, r"y: .*not aligned"),
    (2.0, 1.0, 5, r"footprint: .*wider than the grid \(nx = 4\)"),
])
def test_footprint_grid_errors(x, y, w, match):
    with pytest.raises(ValueError, match=match):
        observation_operator(fp_at(0, x, y, w), (1, 4, 4))


@pytest.mark.parametrize("w, match", [
    (-1.0, r"footprint: 1 value\(s\) not an integer >= 0.*obs 0: -1.0"),
    (2.5, r"footprint: .*2.5"),
    (np.nan, r"footprint: "),
])
def test_footprint_value_errors(w, match):
    with pytest.raises(ValueError, match=match):
        fp_at(0, 1.0, 1.0, w)
    with pytest.raises(ValueError, match=r"Observations.footprint: expected shape \(1,\)"):
        Observations(np.zeros(1), np.ones(1), np.zeros(1, int), np.zeros(1), np.zeros(1), np.zeros(2))
