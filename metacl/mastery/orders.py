"""Task orders: Williams Latin squares, the reference's exact (legacy) orders, and the
heterogeneous-dimensions control.

Tasks are feature indices 0..29: dimension d (0 colour, 1 shape, 2 texture) owns 10d..10d+9.

A Williams square of even order n has every task follow every other task exactly once across its
rows (first-order carry-over balance). Shuffling its rows or relabelling its symbols keeps that
balance; shuffling its columns, as the reference did, breaks it, so `williams_order` relabels
and `legacy_order` reproduces the reference exactly.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..core.errors import ConfigError
from ..core.seeding import numpy_rng
from ..scenes.features import DIMENSIONS, NUM_FEATURES, VALUES_PER_DIMENSION
from .config import Config

FEATURES_PER_DIMENSION = VALUES_PER_DIMENSION
NUM_DIMENSIONS = len(DIMENSIONS)
REFERENCE_FIRST_ROW = (1, 2, 10, 3, 9, 4, 8, 5, 7, 6)


def williams_square(n: int = FEATURES_PER_DIMENSION) -> np.ndarray:
    """The cyclic Williams square of even order n, symbols 0..n-1: row 0 is 0, 1, n-1, 2, n-2, ..."""
    if n < 2 or n % 2:
        raise ConfigError(f"a Williams square needs an even order >= 2, got {n}")
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    return (np.array(first)[None, :] + np.arange(n)[:, None]) % n


def _check_dimension(dimension: int) -> None:
    if dimension not in range(NUM_DIMENSIONS):
        raise ConfigError(f"dimension {dimension}; valid choices: 0 (colour), 1 (shape), 2 (texture)")


def williams_order(dimension: int, index: int, square_seed: int) -> list[int]:
    """Row `index % 10` of the Williams square, symbols relabelled by a permutation from
    `square_seed`, as task ids of `dimension`. Every seed keeps the carry-over balance."""
    _check_dimension(dimension)
    square = williams_square()
    relabel = numpy_rng(square_seed, "williams-relabel").permutation(FEATURES_PER_DIMENSION)
    row = relabel[square[index % FEATURES_PER_DIMENSION]]
    return [int(v) + FEATURES_PER_DIMENSION * dimension for v in row]


def legacy_square(square_seed: int) -> np.ndarray:
    """The reference's square (values 1..10): rows shuffled, then columns, by RandomState(seed)."""
    first = np.array(REFERENCE_FIRST_ROW)
    square = np.stack([(first - 1 + i) % FEATURES_PER_DIMENSION + 1 for i in range(FEATURES_PER_DIMENSION)])
    rs = np.random.RandomState(square_seed)
    rs.shuffle(square)
    rs.shuffle(square.T)
    return square


def legacy_order(dimension: int, index: int, square_seed: int) -> list[int]:
    """The reference's exact order: `L[index % 10] - 1 + 10 * dimension`."""
    _check_dimension(dimension)
    row = legacy_square(square_seed)[index % FEATURES_PER_DIMENSION]
    return [int(v) - 1 + FEATURES_PER_DIMENSION * dimension for v in row]


DIMENSION_PERMUTATIONS = list(itertools.permutations(range(NUM_DIMENSIONS)))


def heterogeneous_order(num_tasks: int, seed: int, with_replacement: bool = False) -> list[int]:
    """Cycle through the three dimensions in one of their 6 permutations, one feature of the
    current dimension per episode.

    Without replacement (the default) the permutation and the features come from metacl's seeded
    generator and no task repeats. With replacement the order is the reference's exactly
    (`legacy_heterogeneous_order`): about 7 in 10 orders of 10 tasks repeat a task.
    """
    if with_replacement:
        return legacy_heterogeneous_order(num_tasks, seed)
    if num_tasks > NUM_FEATURES:
        raise ConfigError(f"num_tasks {num_tasks} exceeds the {NUM_FEATURES} distinct features")
    rng = numpy_rng(seed, "heterogeneous-order")
    dimensions = DIMENSION_PERMUTATIONS[int(rng.integers(len(DIMENSION_PERMUTATIONS)))]
    remaining = {d: list(rng.permutation(FEATURES_PER_DIMENSION)) for d in dimensions}
    order = []
    for episode in range(num_tasks):
        dimension = dimensions[episode % NUM_DIMENSIONS]
        order.append(int(remaining[dimension].pop()) + FEATURES_PER_DIMENSION * dimension)
    return order


def legacy_heterogeneous_order(num_tasks: int, seed: int) -> list[int]:
    """The reference control's exact order (run_control_sequential_benchmark.py, script seed `seed`).

    Dimension permutation number `seed % 6` of `itertools.permutations((0, 1, 2))`; episode j
    trains that permutation's element `j % 3`. One `RandomState(seed)` draws three rows of
    `ceil(num_tasks / 3)` features with replacement, in order; episode j's feature is row
    `j % 3`, entry `j // 3`, plus 10 times its dimension.
    """
    if num_tasks < 0:
        raise ConfigError(f"num_tasks must be >= 0, got {num_tasks}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"the reference heterogeneous order needs a seed in 0..2**32-1, got {seed}")
    dimensions = DIMENSION_PERMUTATIONS[seed % len(DIMENSION_PERMUTATIONS)]
    rs = np.random.RandomState(seed)
    per_row = -(-num_tasks // NUM_DIMENSIONS)
    rows = [rs.choice(FEATURES_PER_DIMENSION, per_row, replace=True) for _ in range(NUM_DIMENSIONS)]
    return [
        int(rows[j % NUM_DIMENSIONS][j // NUM_DIMENSIONS]) + FEATURES_PER_DIMENSION * dimensions[j % NUM_DIMENSIONS]
        for j in range(num_tasks)
    ]


def carryover_counts(rows: list[list[int]] | np.ndarray) -> dict[tuple[int, int], int]:
    """How often task b directly follows task a, over all rows (balanced: every pair once)."""
    counts: dict[tuple[int, int], int] = {}
    for row in rows:
        for a, b in zip(row, row[1:]):
            counts[int(a), int(b)] = counts.get((int(a), int(b)), 0) + 1
    return counts


def task_order(config: Config) -> list[int]:
    """The tasks of each episode (sequential, heterogeneous) or the task set (simultaneous)."""
    tasks = config.tasks
    if tasks.condition == "simultaneous":
        if tasks.dimension is None:
            return list(range(NUM_FEATURES))
        return [v + FEATURES_PER_DIMENSION * tasks.dimension for v in range(FEATURES_PER_DIMENSION)]
    if tasks.condition == "heterogeneous":
        order = heterogeneous_order(tasks.num_tasks, config.seed, tasks.with_replacement)
    elif tasks.order == "explicit":
        if not tasks.explicit or any(t not in range(NUM_FEATURES) for t in tasks.explicit):
            raise ConfigError(f"tasks.explicit must list feature ids in 0..{NUM_FEATURES - 1}, got {tasks.explicit}")
        order = list(tasks.explicit)
    else:
        if tasks.dimension is None:
            raise ConfigError("tasks.dimension must be 0, 1 or 2 for a sequential order")
        index = config.seed if tasks.order_index is None else tasks.order_index
        build = williams_order if tasks.order == "williams" else legacy_order
        order = build(tasks.dimension, index, tasks.square_seed)
    if not 1 <= tasks.num_tasks <= len(order):
        raise ConfigError(f"tasks.num_tasks {tasks.num_tasks} must be in 1..{len(order)}")
    return order[: tasks.num_tasks]


def episode_tasks(order: list[int], episode: int) -> tuple[int, list[int]]:
    """(new task, earlier distinct tasks in first-trained order) of 0-based `episode`."""
    new = order[episode]
    old = [t for t in dict.fromkeys(order[:episode]) if t != new]
    return new, old
