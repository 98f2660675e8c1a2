"""The crawl's final pass: the dataset's shards in OUT from the unit shards, duplicates merged.

Each unit shard U gives dataset shard U holding its kept samples (dedup.py decides which, and their
merged labels). The shard's stats record a digest of its decision: when a rerun decides the same,
the shard is left alone; otherwise it is deleted (tar first, so it never reads as complete with
stale content) and written again; a shard none of whose samples changed is shared with its unit
(a hard link on a local disk).

Everything per image happens in Ray tasks: dedup.decide_partitioned decides, then one task per
batch of units writes those units' dataset shards and returns counts (samples, samples per class,
unit stats per engine and class). The driver holds unit names, task refs and those counts:
memory by units, not by images.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field

from maskless.core import errors, shards, storage
from maskless.ingest.dedup import UNITS_PER_TASK, decide_partitioned

SUMMED = ("found", "downloaded", "accepted", "duplicates", "seconds")  # unit stats added up per engine/class


@dataclass
class FinalPass:
    """What the pass did, summed over its tasks."""

    unit_samples: int = 0
    samples: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    shards_rewritten: int = 0
    samples_per_class: Counter = field(default_factory=Counter)
    # "engine/class" -> unit stats summed (units, found, ..., rejected by reason), duplicates including
    # the rows this pass dropped
    by_engine_class: dict[str, dict] = field(default_factory=dict)

    def add(self, other: "FinalPass") -> None:
        for name in ("unit_samples", "samples", "exact_duplicates", "near_duplicates", "shards_rewritten"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.samples_per_class.update(other.samples_per_class)
        for key, g in other.by_engine_class.items():
            mine = self.by_engine_class.setdefault(key, {**g, "units": 0, "rejected": Counter(),
                                                         **dict.fromkeys(SUMMED, 0)})
            for name in ("units", *SUMMED):
                mine[name] += g[name]
            mine["rejected"].update(g["rejected"])

    def count_unit(self, stats: dict, dropped: int) -> None:
        g = self.by_engine_class.setdefault(f"{stats['engine']}/{stats['class'] or '(list)'}", {
            "engine": stats["engine"], "class": stats["class"], "units": 0, **dict.fromkeys(SUMMED, 0),
            "rejected": Counter()})
        g["units"] += 1
        for name in SUMMED:
            g[name] += stats.get(name, 0)
        g["duplicates"] += dropped
        g["rejected"].update(stats.get("rejected", {}))

    def summary(self) -> dict:
        """The crawl summary's counts of the pass."""
        return {"unit_samples": self.unit_samples, "samples": self.samples, "exact_duplicates": self.exact_duplicates,
                "near_duplicates": self.near_duplicates, "shards_rewritten": self.shards_rewritten}


def _write_units(out: str, units_root: str, names: list[str], *outcome_blocks: dict) -> FinalPass:
    """Write (or leave, or share) the dataset shards of a batch of units; count what they hold."""
    outcome: dict = {}
    for block in outcome_blocks:
        outcome.update(block)
    result = FinalPass()
    for name in names:
        table = shards.read_manifest_file(storage.join(units_root, name + ".parquet"), ["key", "labels"])
        keys, unit_labels = table.column("key").to_pylist(), table.column("labels").to_pylist()
        unit_stats = storage.read_json(storage.join(units_root, name + ".stats.json"))
        plan, unchanged = {}, True
        for key, labels in zip(keys, unit_labels):
            entry = outcome.get((name, key), {})  # absent: kept as it is
            if entry is None:  # dropped as a duplicate
                continue
            plan[key] = entry or {"labels": sorted(set(labels or []))}
            unchanged &= list(plan[key]) == ["labels"] and plan[key]["labels"] == sorted(labels or [])
        result.unit_samples += len(keys)
        result.samples += len(plan)
        result.samples_per_class.update(label for entry in plan.values() for label in entry["labels"])
        result.count_unit(unit_stats, len(keys) - len(plan))
        digest = hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()
        final = storage.join(out, name)
        if storage.exists(final + ".tar") and storage.read_json(final + ".stats.json").get("dedup_digest") == digest:
            continue
        shards.delete_shard(out, name)
        if not plan:
            continue
        stats = {**unit_stats, "dedup_digest": digest, "dropped_as_duplicates": len(keys) - len(plan)}
        with errors.disk_full_is_one_line(f"the dataset's shard {name} into {out}", "every unit is kept"):
            if unchanged and len(plan) == len(keys):
                _share_shard(units_root, out, name, stats)
            else:
                with shards.ShardWriter(out, name) as writer:
                    for s in shards.read_shard(storage.join(units_root, name + ".tar")):
                        if s.key in plan:
                            s.meta.update(plan[s.key])
                            writer.write(s)
                    writer.commit({k: v for k, v in stats.items() if k not in ("shard", "count", "schema_version")})
        result.shards_rewritten += 1
    return result


def finalize(out: str, units_root: str, near_dup_bits: int, units_per_task: int = UNITS_PER_TASK) -> FinalPass:
    """Write OUT's shards from every unit shard under units_root with duplicates merged; needs Ray initialised."""
    import ray

    names = sorted(shards.shard_names(units_root))
    outcomes, counts = decide_partitioned(units_root, names, near_dup_bits, units_per_task)
    write = ray.remote(num_cpus=1)(_write_units)
    parts = [write.remote(out, units_root, names[m * units_per_task:(m + 1) * units_per_task], *blocks)
             for m, blocks in enumerate(outcomes)]
    total = FinalPass()
    for part in _get(parts):
        total.add(part)
    for exact, near in _get(counts):
        total.exact_duplicates += exact
        total.near_duplicates += near
    for name in set(shards.shard_names(out)) - set(names):
        shards.delete_shard(out, name)
    for g in total.by_engine_class.values():
        g["rejected"] = dict(sorted(g["rejected"].items()))
        g["seconds"] = round(g["seconds"], 3)
        g["images_per_second"] = round(g["accepted"] / g["seconds"], 2) if g["seconds"] > 0 else None
    total.by_engine_class = dict(sorted(total.by_engine_class.items()))
    return total


def _get(refs: list) -> list:
    """ray.get, raising a task's own ValueError (a manifest that cannot be read says which) or full disk
    as it is: the CLI explains those in one line."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ValueError) or errors.disk_full(e.cause):
            raise e.cause from None
        raise


def _share_shard(src_root: str, dst_root: str, name: str, stats: dict) -> None:
    """A unit shard that dedup leaves untouched becomes a dataset shard without rewriting it: a hard
    link on a local disk (unit shards are never modified, only replaced), a copy elsewhere.
    Manifest and stats first, the tar last, as the commit rule says."""
    src, dst = storage.join(src_root, name), storage.join(dst_root, name)
    storage.write_bytes_atomic(dst + ".parquet", storage.read_bytes(src + ".parquet"))
    storage.write_json_atomic(dst + ".stats.json", stats)
    fs, src_tar = storage.resolve(src + ".tar")
    _, dst_tar = storage.resolve(dst + ".tar")
    if not storage.is_local(fs):
        fs.copy_file(src_tar, dst_tar)  # one object copy: atomic on an object store
        return
    try:
        os.link(src_tar, dst_tar)
    except OSError:  # another device or a filesystem without hard links
        tmp = storage.temp_name(dst_tar)
        fs.copy_file(src_tar, tmp)
        os.replace(tmp, dst_tar)
