"""ActiveSet: immutable, versioned, refusals change nothing."""
from __future__ import annotations

import numpy as np
import pytest

from elit_stream.core.ensemble import ActiveSet, SelectionError


def test_full_and_versions():
    s0 = ActiveSet.full(range(4))
    assert s0.active == (0, 1, 2, 3) and s0.version == 0
    s1 = s0.deselect([1, 3])
    assert s1.active == (0, 2) and s1.version == 1 and s1.inactive == (1, 3)
    assert s0.active == (0, 1, 2, 3)                       # the old value is untouched
    s2 = s1.select(3)
    assert s2.active == (0, 2, 3) and s2.version == 2
    s3 = s2.set_active([3, 1])
    assert s3.active == (1, 3) and s3.version == 3         # member order, not request order
    s4 = s3.reset()
    assert s4.active == s4.all_members and s4.version == 4
    np.testing.assert_array_equal(s3.indices, [1, 3])
    assert s3.indices.dtype == np.intp


def test_indices_are_positions_not_ids():
    s = ActiveSet.full([10, 20, 30]).deselect([20])
    np.testing.assert_array_equal(s.indices, [0, 2])


@pytest.mark.parametrize("call, match", [
    (lambda s: s.deselect([0, 1, 2]), "empty"),
    (lambda s: s.set_active([]), "empty"),
    (lambda s: s.select([7, 9]), r"unknown member ids \[7, 9\]"),
    (lambda s: s.deselect([1, 5]), r"unknown member ids \[5\]"),
    (lambda s: s.set_active(["a"]), "integers"),
    (lambda s: s.set_active([True]), "integers"),
    (lambda s: s.select(None), "integers"),
])
def test_refusals_change_nothing(call, match):
    s = ActiveSet.full(range(3)).deselect([2])
    with pytest.raises(SelectionError, match=match):
        call(s)
    assert s.active == (0, 1) and s.version == 1


def test_selection_error_is_a_value_error():
    assert issubclass(SelectionError, ValueError)
    with pytest.raises(SelectionError, match="repeat"):
        ActiveSet.full([1, 1])


def test_frozen():
    s = ActiveSet.full(range(2))
    with pytest.raises(AttributeError):
        s.version = 5
