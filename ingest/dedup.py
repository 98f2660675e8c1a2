"""Exact and near-duplicate merging over shard manifests (policy: docs/CRAWL.md).

Rows are visited best first (most pixels, then key, then shard). A row is a duplicate when its
sha256 equals, or its perceptual hash is within `max_distance` bits of, a row already kept; it is
then dropped and its labels go to that kept row (multi-label). A decision only ever looks at rows
already kept, so dropped rows influence nothing: the outcome depends on the set of rows alone (not
on which unit finished first or where a run was killed), and the pass applied to its own output
changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Decision:
    """For each kept row: its merged labels and the rows merged into it; for each dropped row: its keeper."""

    labels: dict[tuple[str, str], list[str]] = field(default_factory=dict)      # (shard, key) -> labels
    merged: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)
    dropped: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    exact: int = 0
    near: int = 0


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class NearIndex:
    """Finds a kept 64-bit hash within `max_distance` bits without comparing against all of them.

    Pigeonhole: split the hash into max_distance + 1 bands; two hashes that differ in at most
    max_distance bits agree exactly on at least one band. So only rows sharing a band value are
    compared. (Hand-written: a few lines instead of a dependency, and linear in practice.)"""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        n = max_distance + 1
        edges = [round(i * 64 / n) for i in range(n + 1)]
        self.bands = list(zip(edges[:-1], edges[1:]))
        self.buckets: list[dict[int, list[tuple[int, object]]]] = [{} for _ in self.bands]

    def _band_values(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self.bands]

    def find(self, h: int):
        best = None
        for bucket, v in zip(self.buckets, self._band_values(h)):
            for other, ident in bucket.get(v, ()):
                d = hamming(h, other)
                if d <= self.max_distance and (best is None or d < best[0]):
                    best = (d, ident)
        return None if best is None else best[1]

    def add(self, h: int, ident) -> None:
        for bucket, v in zip(self.buckets, self._band_values(h)):
            bucket.setdefault(v, []).append((h, ident))


def decide(rows: list[dict], max_distance: int = 4) -> Decision:
    """rows: dicts with shard, key, labels, width, height, sha256, phash. max_distance < 0: exact only."""
    order = sorted(rows, key=lambda r: (-(r["width"] or 0) * (r["height"] or 0), r["key"], r["shard"]))
    out = Decision()
    by_sha: dict[str, tuple[str, str]] = {}
    near = NearIndex(max_distance) if max_distance >= 0 else None
    for r in order:
        ident = (r["shard"], r["key"])
        keeper = by_sha.get(r["sha256"]) if r["sha256"] else None
        if keeper is not None:
            out.exact += 1
        elif near is not None and r["phash"]:
            keeper = near.find(int(r["phash"], 16))
            if keeper is not None:
                out.near += 1
        if keeper is None:
            out.labels[ident] = sorted(set(r["labels"] or []))
            out.merged[ident] = []
            if r["sha256"]:
                by_sha[r["sha256"]] = ident
            if near is not None and r["phash"]:
                near.add(int(r["phash"], 16), ident)
        else:
            out.dropped[ident] = keeper
            out.labels[keeper] = sorted(set(out.labels[keeper]) | set(r["labels"] or []))
            out.merged[keeper].append(ident)
    return out
