"""The heterogeneous-dimensions control as the reference ran it (run_control_sequential_benchmark.py)."""

import math

import numpy as np
import pytest

from metacl.core.errors import ConfigError
from metacl.mastery.orders import heterogeneous_order, legacy_heterogeneous_order

# The six permutations of (0, 1, 2) in itertools.permutations order, written out by hand.
PERMUTATIONS = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]


def reference_order(length, seed):
    """An independent transcription of the reference rule."""
    dims = PERMUTATIONS[seed % 6]
    state = np.random.RandomState(seed)
    draws = [state.choice(10, math.ceil(length / 3), replace=True) for _row in range(3)]
    order = []
    for episode in range(length):
        dim = dims[episode % 3]
        order.append(int(draws[episode % 3][episode // 3]) + 10 * dim)
    return order


def test_reference_check_orders():
    assert legacy_heterogeneous_order(10, 0) == [5, 17, 22, 0, 19, 24, 3, 13, 27, 3]
    assert legacy_heterogeneous_order(10, 1) == [5, 20, 16, 8, 20, 19, 9, 21, 12, 5]
    # The legacy (with replacement) condition is exactly this order.
    assert heterogeneous_order(10, 0, with_replacement=True) == [5, 17, 22, 0, 19, 24, 3, 13, 27, 3]
    assert heterogeneous_order(10, 1, with_replacement=True) == [5, 20, 16, 8, 20, 19, 9, 21, 12, 5]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 6, 7, 11, 42, 1050, 123456, 2**32 - 1])
@pytest.mark.parametrize("length", [1, 2, 3, 5, 9, 10, 11, 30, 31])
def test_legacy_heterogeneous_order_follows_the_reference_rule(seed, length):
    order = heterogeneous_order(length, seed, with_replacement=True)
    assert order == reference_order(length, seed)
    dims = [t // 10 for t in order]
    assert dims == [PERMUTATIONS[seed % 6][j % 3] for j in range(length)]


def test_legacy_heterogeneous_order_uses_every_permutation_and_repeats_tasks_as_the_reference():
    firsts = {tuple(t // 10 for t in legacy_heterogeneous_order(3, seed)) for seed in range(6)}
    assert firsts == set(PERMUTATIONS)
    # Rows of 4, 3 and 3 draws with replacement: P(no repeat) = 0.504 * 0.72 ** 2 ~ 0.26.
    repeats = np.mean([len(set(legacy_heterogeneous_order(10, s))) < 10 for s in range(600)])
    assert 0.65 < repeats < 0.83


def test_legacy_heterogeneous_order_rejects_seeds_randomstate_cannot_take():
    with pytest.raises(ConfigError, match="seed"):
        legacy_heterogeneous_order(10, -1)


def test_non_legacy_heterogeneous_order_is_unchanged_and_without_replacement():
    for seed in range(20):
        order = heterogeneous_order(10, seed)
        assert len(set(order)) == 10 and order == heterogeneous_order(10, seed, with_replacement=False)
    with pytest.raises(ConfigError, match="exceeds"):
        heterogeneous_order(31, 0)
