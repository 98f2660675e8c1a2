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


def write_unit_plan(data: str, out: str, unit_size: int, plans: list[ShardPlan], plan_file: str, **extra) -> None:
    """Record in OUT/plan_file how `data` was cut (the unit size; per shard its sample count and key digest)
    and what else the output depends on (`extra`), for check_earlier_units on the next run."""
    storage.write_json_atomic(storage.join(out, plan_file), {
        "data": data, "unit_size": unit_size, **extra,
        "shards": {p.shard: {"samples": p.samples, "keys_sha256": p.keys_sha256} for p in plans}})


def check_earlier_units(data: str, out: str, unit_size: int, plans: list[ShardPlan], committed: set[str],
                        plan_file: str, **extra) -> None:
    """Refuse to add to an output whose committed units were cut from other input samples (a shard
    rewritten or removed since, another unit size), made from another `extra` (e.g. another model), or
    that holds shards no unit plan explains: the output would mix two versions of the input. Shards
    without committed units may change freely. Raises ValueError saying what differs."""
    path = storage.join(out, plan_file)
    hint = "use a new --out (or restore the input)"
    if not storage.exists(path):
        if committed:
            raise ValueError(f"{out} holds shards ({', '.join(sorted(committed)[:3])}, ...) but no {plan_file}: "
                             f"they were not written by this stage's units; use a new --out")
        return
    earlier = storage.read_json(path)
    now = {p.shard: p for p in plans}
    known: set[str] = set()
    for shard, e in earlier["shards"].items():
        names = set(unit_names(shard, e["samples"], earlier["unit_size"]))
        known |= names
        done = committed & names
        if not done:
            continue
        if earlier["unit_size"] != unit_size:
            raise ValueError(f"--unit-size {unit_size}: the units already in {out} hold "
                             f"{earlier['unit_size']} samples each; rerun with --unit-size {earlier['unit_size']} "
                             f"or use a new --out")
        for key, value in extra.items():
            if earlier.get(key) != value:
                raise ValueError(f"{out} holds units made with {key} {earlier.get(key, '(not recorded)')}, this "
                                 f"run has {value}: use a new --out")
        if shard not in now:
            raise ValueError(f"input shard {shard} is gone from {data}, but {len(done)} unit(s) of it are in "
                             f"{out} (e.g. {min(done)}): {hint}")
        if now[shard].keys_sha256 != e["keys_sha256"]:
            raise ValueError(f"input shard {shard} of {data} was rewritten since {len(done)} unit(s) of it were "
                             f"committed to {out} (e.g. {min(done)}): {e['samples']} samples then, "
                             f"{now[shard].samples} now, other keys; {hint}")
    foreign = committed - known
    if foreign:
        raise ValueError(f"{out} holds shards that no unit of {plan_file} names "
                         f"({', '.join(sorted(foreign)[:3])}, ...): use a new --out")
