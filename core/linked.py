"""Items joined by a pairwise rule, transitively: which group each one is in.

Written by hand (a union-find over the few items of one image) because scipy's DisjointSet costs 0.6 s
of import in every pseudo-stage actor process, for work of a few microseconds (BENCHMARKS.md, pseudo).
"""
from __future__ import annotations

from typing import Callable


def linked_groups(n: int, joined: Callable[[int, int], bool]) -> list[int]:
    """For items 0..n-1 and a symmetric rule joined(i, j) (asked once per pair i < j), each item's group
    label: the same label for two items exactly when a chain of joined pairs links them."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if joined(i, j):
                parent[root(j)] = root(i)
    return [root(i) for i in range(n)]
