"""Which data-parallel replica owns each source row: deterministic and streaming.

Rows are taken in windows of `ROWS_PER_REPLICA * num_replicas` consecutive rows. A full window's rows go,
largest prompt first (ties: source order), each to the replica with the fewest prompt tokens dealt so far
among those still short of their `ROWS_PER_REPLICA` rows of the window: every replica gets the same number
of rows, and their prompt tokens stay close. The last, short window is dealt by position (snake order), so
how many rows a replica owns does not depend on the rows. Dealing row i to replica i mod R let long prompts
pile up: on ShareGPT's first 57 rows over two replicas, 7,598 prompt tokens against 4,440, and the job
waited for the heavier replica.

A row's owner depends only on the rows up to its window, so a rerun over the same source deals the same
way; and since a resumed job skips every row written by any replica, a change of dealing never loses or
repeats a row.
"""
from __future__ import annotations

from typing import Sequence

ROWS_PER_REPLICA = 2      # rows each replica gets from a full window


def window_rows(num_replicas: int) -> int:
    return ROWS_PER_REPLICA * num_replicas


def snake(position: int, num_replicas: int) -> int:
    """The replica that gets the `position`-th largest row of a window."""
    lap, offset = divmod(position, num_replicas)
    return offset if lap % 2 == 0 else num_replicas - 1 - offset


class Dealer:
    """Deals one replica split's windows in order; `loads` are the prompt tokens dealt to each replica."""

    def __init__(self, num_replicas: int):
        self.num_replicas = num_replicas
        self.loads = [0] * num_replicas

    def deal(self, sizes: Sequence[int]) -> list[int]:
        """One window's rows (their prompt tokens, in source order) -> each row's replica."""
        if len(sizes) < window_rows(self.num_replicas):                 # the last window: by position
            return [snake(p, self.num_replicas) for p in range(len(sizes))]
        owners, taken = [0] * len(sizes), [0] * self.num_replicas
        for row in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            open_ = (r for r in range(self.num_replicas) if taken[r] < ROWS_PER_REPLICA)
            owner = min(open_, key=lambda r: (self.loads[r], r))
            owners[row], taken[owner] = owner, taken[owner] + 1
            self.loads[owner] += sizes[row]
        return owners


def rows_dealt(num_rows: int, replica: int, num_replicas: int) -> int:
    """How many of `num_rows` source rows `replica` owns (whatever their sizes)."""
    full, rest = divmod(num_rows, window_rows(num_replicas))
    return full * ROWS_PER_REPLICA + sum(snake(p, num_replicas) == replica for p in range(rest))
