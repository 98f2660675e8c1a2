"""Work units: slices of at most `unit_size` consecutive samples of one shard.

A stage that maps over units instead of shards keeps every worker busy whatever the input's sharding:
one shard of 10,000 images is 313 units of 32, ten thousand one-image shards are ten thousand units.
A unit is read with one ranged read of its bytes in the shard tar (the offsets come from the tar
headers, `shards.index_tar`), not by streaming the shard from its start. Unit `NAME_START-STOP`
holds samples [START, STOP) of shard NAME (0-based, in write order), so its name says where it came
from and a rerun with the same unit size cuts every shard into the same units.
"""
from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from typing import Iterator

from maskless.core import shards, storage

UNIT_SIZE = 32  # default samples per unit: seconds of work per unit in the pseudo stage (docs/PSEUDO.md)
# The importers' default shard size: a whole number of default units, so that every unit but a dataset's
# last is full. Shard size sets file sizes and an import's rerun granularity, not any stage's parallelism.
SHARD_SIZE = 16 * UNIT_SIZE


def unit_name(shard: str, start: int, stop: int) -> str:
    return f"{shard}_{start:06d}-{stop:06d}"


def unit_names(shard: str, count: int, unit_size: int) -> list[str]:
    """The names of the units a shard of `count` samples is cut into."""
    return [unit_name(shard, a, min(a + unit_size, count)) for a in range(0, count, unit_size)]


@dataclass(frozen=True)
class Unit:
    """Samples [start, stop) of shard `shard`, whose tar is `tar`; they fill bytes span[0]:span[1] of it."""

    shard: str
    tar: str
    start: int
    stop: int
    span: tuple[int, int]

    @property
    def name(self) -> str:
        return unit_name(self.shard, self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def samples(self) -> Iterator[shards.Sample]:
        return shards.read_shard_range(self.tar, *self.span)


@dataclass(frozen=True)
class ShardPlan:
    """One shard cut into units, with a digest of its ordered sample keys: a shard rewritten with other
    samples gets another digest, so a rerun can tell it from the shard its earlier units came from."""

    shard: str
    samples: int
    keys_sha256: str
    units: list[Unit]


def plan_shard(root: str, shard: str, unit_size: int) -> ShardPlan:
    """Cut shard `shard` of dataset `root` into units of at most unit_size samples (reads tar headers only)."""
    if unit_size < 1:
        raise ValueError(f"unit size must be >= 1, got {unit_size}")
    tar = storage.join(root, shard + ".tar")
    try:
        index = shards.index_tar(tar)
    except tarfile.TarError as e:
        raise ValueError(f"{tar} is not a readable tar ({e}): rewrite or remove that shard") from None
    digest = hashlib.sha256("\n".join(s.key for s in index).encode()).hexdigest()
    units = []
    for a in range(0, len(index), unit_size):
        b = min(a + unit_size, len(index))
        units.append(Unit(shard, tar, a, b, (index[a].start, index[b - 1].end)))
    return ShardPlan(shard, len(index), digest, units)


def dataset_units(root: str, unit_size: int = UNIT_SIZE) -> list[Unit]:
    """Every shard of a dataset cut into units, shard after shard (reads the tar headers only)."""
    return [u for name in shards.shard_names(root) for u in plan_shard(root, name, unit_size).units]
