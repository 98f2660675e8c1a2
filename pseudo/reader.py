"""The pseudo stage's reading step (a Ray CPU task): one unit's samples, decoded, with their
proposals when the rule needs them, pickled for the masking actors.

Kept out of pseudo/stage.py, which imports torch through the masker: a reader process imports only
this module's needs (shards, units, OpenCV), so each reader worker starts in a fraction of the time
and memory (a reader that imported torch held about 500 MB before reading anything)."""
from __future__ import annotations

import os
import pickle
import time
from typing import Any

import numpy as np

from maskless.core.units import Unit
from maskless.pseudo.proposals import cached_or_compute, make_source


def unit_row(u: Unit) -> dict[str, Any]:
    """A unit as plain values (what a reading task is given); unit_of reads it back."""
    return {"unit": u.name, "shard": u.shard, "tar": u.tar, "start": u.start, "stop": u.stop,
            "lo": u.span[0], "hi": u.span[1]}


def unit_of(row: dict[str, Any]) -> Unit:
    """The Unit a row (unit_row) describes."""
    return Unit(str(row["shard"]), str(row["tar"]), int(row["start"]), int(row["stop"]), (int(row["lo"]), int(row["hi"])))


def read_unit(row: dict[str, Any], source_name: str | None, objectness: str) -> dict[str, Any]:
    """One unit (a unit_row) read: its samples, their decoded images and, when source_name is given,
    their proposals, as one pickled [(sample, image, proposals npz bytes or None), ...] (the actor gets
    writable arrays back); with when and in which process it was read."""
    source = make_source(source_name, objectness) if source_name else None
    start, reused, items = time.time(), 0, []
    for s in unit_of(row).samples():
        image = np.asarray(s.image())
        props = None
        if source is not None:
            p, was_cached = cached_or_compute(source, image, s.extra)
            reused += was_cached
            props = p.to_bytes()
        items.append((s, image, props))
    return {**row, "payload": pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL), "proposals_reused": reused,
            "read_started": start, "read_seconds": time.time() - start, "reader_pid": os.getpid()}
