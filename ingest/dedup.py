"""Exact and near-duplicate merging over shard manifests (policy: docs/CRAWL.md).

The rule, defined by `decide`: rows are visited best first (most pixels, then key, then shard). A
row is a duplicate when its sha256 equals a kept row's (exact), or when its perceptual hash is
within `max_distance` bits of a kept row's AND its colour signature within COLOUR_TOLERANCE of that
row's (near); it is then dropped and its labels go to that kept row (multi-label): the exact one,
else the nearest near one, ties to the best ranked. A decision only ever looks at rows already
kept, so dropped rows influence nothing: the outcome depends on the set of rows alone (not on which
unit finished first or where a run was killed), and the pass applied to its own output changes
nothing.

`decide_partitioned` gives the same decision over any number of unit shards without gathering
them anywhere. Ray tasks find every related pair (equal sha256, or near) in partitions, group the
rows into connected components of those pairs, and run `decide` on each component alone. That is
exact: `decide` compares a row only with rows related to it, and whether those were kept depends
only on rows related to them, and so on: all inside the row's component. A row with no related
row is kept as it is and never leaves its unit's tasks. Cost and memory: docs/CRAWL.md.
"""
from __future__ import annotations

import functools
import itertools
import string
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from maskless.core import shards, storage

COLOUR_TOLERANCE = 16  # most a colour-signature byte (of 255) may differ between near duplicates
UNITS_PER_TASK = 500  # unit shards per scan/gather task (about 250,000 rows at the default shard size)
ROW_BITS = 24  # a row's id: unit index << ROW_BITS | row index in its unit's manifest
MAX_NEAR_DISTANCE = 8  # beyond this, the near search's keys get too short (docs/CRAWL.md)


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


def colours_close(a: bytes | None, b: bytes | None) -> bool:
    """Two colour signatures (validator.colour_signature) close enough for the same picture; unknown is never close."""
    return (a is not None and b is not None and len(a) == len(b)
            and max(abs(x - y) for x, y in zip(a, b)) <= COLOUR_TOLERANCE)


def _split(bits: list[int], parts: int) -> list[int]:
    """Masks of `parts` runs of consecutive positions of `bits`, as equal in length as possible."""
    edges = [round(i * len(bits) / parts) for i in range(parts + 1)]
    return [sum(1 << b for b in bits[lo:hi]) for lo, hi in zip(edges[:-1], edges[1:])]


@functools.cache
def bands(max_distance: int) -> tuple[int, ...]:
    """max_distance + 1 bands of the 64 bits: two hashes within max_distance bits agree on one (pigeonhole)."""
    return tuple(_split(list(range(64)), max_distance + 1))


@functools.cache
def near_tables(max_distance: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Per band: the band's mask and its tables' masks, band | two of max_distance + 2 sub-bands of the other bits.

    Two hashes within max_distance bits agree on some band; their at most max_distance differing bits
    then leave at least two of the max_distance + 2 sub-bands alike, so they agree on one table's mask.
    With the default 4 bits a table keeps about 30 bits (13 + 2 x 8.5): rows sharing a table key by
    chance are about n / 2**30 per row (the tables of Manku, Jain and Das Sarma, "Detecting
    near-duplicates for web crawling", WWW 2007, in two levels: the band partitions, the tables sort)."""
    out = []
    for band in bands(max_distance):
        subs = _split([b for b in range(64) if not band >> b & 1], max_distance + 2)
        out.append((band, tuple(band | subs[j] | subs[k] for j, k in itertools.combinations(range(len(subs)), 2))))
    return tuple(out)


class NearIndex:
    """Finds the nearest added 64-bit hash within `max_distance` bits without comparing against all of them.

    Only entries sharing a band value (see `bands`) are compared. (Hand-written: a few lines instead of a
    dependency; `decide` runs it on one component at a time, where buckets stay small.)"""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        self.masks = bands(max_distance)
        self.buckets: list[dict[int, list[tuple[int, bytes | None, int, object]]]] = [{} for _ in self.masks]
        self.added = 0

    def find(self, h: int, colour: bytes | None = None):
        """The entry nearest to h (ties: the one added first); with `colour`, only entries of close colour count."""
        best = None
        for bucket, mask in zip(self.buckets, self.masks):
            for other, other_colour, order, ident in bucket.get(h & mask, ()):
                d = hamming(h, other)
                if d <= self.max_distance and (best is None or (d, order) < best[:2]) and (
                        colour is None or colours_close(colour, other_colour)):
                    best = (d, order, ident)
        return None if best is None else best[2]

    def add(self, h: int, ident, colour: bytes | None = None) -> None:
        for bucket, mask in zip(self.buckets, self.masks):
            bucket.setdefault(h & mask, []).append((h, colour, self.added, ident))
        self.added += 1


def rank(row: dict) -> tuple:
    """Best first: most pixels, then key, then shard."""
    return -(row["width"] or 0) * (row["height"] or 0), row["key"], row["shard"]


def decide(rows: list[dict], max_distance: int = 4) -> Decision:
    """rows: dicts with shard, key, labels, width, height, sha256, phash, colour. max_distance < 0: exact only."""
    out = Decision()
    by_sha: dict[str, tuple[str, str]] = {}
    near = NearIndex(max_distance) if max_distance >= 0 else None
    for r in sorted(rows, key=rank):
        ident = (r["shard"], r["key"])
        colour = bytes.fromhex(r["colour"]) if r.get("colour") else None
        keeper = by_sha.get(r["sha256"]) if r["sha256"] else None
        if keeper is not None:
            out.exact += 1
        elif near is not None and r["phash"] and colour:
            keeper = near.find(int(r["phash"], 16), colour)
            if keeper is not None:
                out.near += 1
        if keeper is None:
            out.labels[ident] = sorted(set(r["labels"] or []))
            out.merged[ident] = []
            if r["sha256"]:
                by_sha[r["sha256"]] = ident
            if near is not None and r["phash"] and colour:
                near.add(int(r["phash"], 16), ident, colour)
        else:
            out.dropped[ident] = keeper
            out.labels[keeper] = sorted(set(out.labels[keeper]) | set(r["labels"] or []))
            out.merged[keeper].append(ident)
    return out


# ---------------------------------------------------------------- the same decision in Ray tasks
#
# scan (per batch of units) -> pairs (per partition) -> components (one task, over pairs only) ->
# gather (per batch: the rows that have a pair) -> decide (per group of components) -> outcomes
# per batch of units, for ingest/finalize.py. All arrays are numpy; rows are ids until gathered.

def _mix(x: np.ndarray, salt: int = 0) -> np.ndarray:
    """splitmix64's finaliser of x ^ salt (Steele, Lea, Flood 2014): spreads keys over partitions and 32-bit keys."""
    x = x ^ np.uint64(salt)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _present(table: pa.Table, column: str) -> np.ndarray:
    """Whether each row has a value (not null, not empty) in `column`."""
    return pc.fill_null(pc.greater(pc.binary_length(table.column(column)), 0), False).to_numpy(zero_copy_only=False)


def _hex(table: pa.Table, column: str, rows: np.ndarray, digits: int, where) -> np.ndarray:
    """The `column` hex strings of `rows` as an (n, digits / 2) uint8 array; a clear error naming the first bad one
    (`where(row)`: its shard and key).

    Decoded from the Arrow string buffer in one call: a Python loop over the rows cost more than the
    rest of the scan."""
    values = table.column(column).take(rows).combine_chunks()
    if not len(values):
        return np.zeros((0, digits // 2), np.uint8)
    offsets = np.frombuffer(values.buffers()[1], np.int32)[values.offset:values.offset + len(values) + 1]
    if (np.diff(offsets) == digits).all():
        text = values.buffers()[2].to_pybytes()[offsets[0]:offsets[-1]]
        try:
            return np.frombuffer(bytes.fromhex(text.decode("ascii")), np.uint8).reshape(len(values), digits // 2)
        except (ValueError, UnicodeDecodeError):  # not hex, or spaces (which fromhex skips)
            pass
    texts = values.to_pylist()
    bad = next(i for i, v in enumerate(texts) if len(v) != digits or not set(v) <= set(string.hexdigits))
    raise ValueError(f"{where(int(rows[bad]))} has {column} {texts[bad]!r}, not {digits} hex digits")


def _u64(b: np.ndarray) -> np.ndarray:
    """Rows of 8 bytes as big-endian 64-bit integers."""
    return np.ascontiguousarray(b).view(">u8").ravel().astype(np.uint64)


_EXACT = {"sha": np.zeros(0, np.uint64), "id": np.zeros(0, np.uint64)}
_NEAR = {"h": np.zeros(0, np.uint64), "colour": np.zeros((0, 12), np.uint8), "id": np.zeros(0, np.uint64)}
_NEAR_BANDED = {**_NEAR, "band": np.zeros(0, np.uint8)}


def _concat(blocks: list[dict], empty: dict) -> dict:
    blocks = [b for b in blocks if len(b["id"])]
    return {k: np.concatenate([b[k] for b in blocks]) if blocks else v for k, v in empty.items()}


def _partition(part: np.ndarray, n_parts: int, arrays: dict) -> list[dict]:
    """Split columns by partition number (0 <= part < n_parts)."""
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(n_parts + 1))
    return [{k: v[order[lo:hi]] for k, v in arrays.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]


def _one_or_list(values: list):
    """A task's return values as Ray wants them: with num_returns=1, the value itself."""
    return values[0] if len(values) == 1 else values


def _scan(units_root: str, names: list[str], first: int, max_distance: int, n_parts: int):
    """Read the hashes of a batch of unit manifests and route them (see _route)."""
    tables, ids = [], []
    for u, name in enumerate(names):
        t = shards.read_manifest_file(storage.join(units_root, name + ".parquet"), ["key", "sha256", "phash", "colour"])
        if t.num_rows >> ROW_BITS:
            raise ValueError(f"{name}: {t.num_rows} samples, more than dedup's {2 ** ROW_BITS} per shard")
        tables.append(t)
        ids.append(np.uint64((first + u) << ROW_BITS) | np.arange(t.num_rows, dtype=np.uint64))
    t, ids = pa.concat_tables(tables), np.concatenate(ids)  # a batch has one unit at least

    def where(row: int) -> str:
        return f"{names[int(ids[row] >> np.uint64(ROW_BITS)) - first]}: sample {t.column('key')[row].as_py()}"

    near = _NEAR
    rows = np.flatnonzero(_present(t, "sha256"))
    # the first 64 bits of a sha256 only pair rows: decide() compares whole digests
    exact = {"sha": _u64(_hex(t, "sha256", rows, 64, where)[:, :8]), "id": ids[rows]}
    if max_distance >= 0:
        rows = np.flatnonzero(_present(t, "phash") & _present(t, "colour"))
        near = {"h": _u64(_hex(t, "phash", rows, 16, where)), "colour": _hex(t, "colour", rows, 24, where),
                "id": ids[rows]}
    return _one_or_list(_route(exact, near, max_distance, n_parts))


def _route(exact: dict, near: dict, max_distance: int, n_parts: int) -> list[dict]:
    """Each row's exact record to the partition of its sha256 prefix, and one near record per band
    to the partition of that band's value: rows that may be related meet in some partition."""
    out = [{"exact": e, "near": []} for e in _partition((_mix(exact["sha"]) % np.uint64(n_parts)).astype(np.int64),
                                                         n_parts, exact)]
    for b, mask in enumerate(bands(max_distance) if len(near["id"]) else []):
        part = (_mix(near["h"] & np.uint64(mask), b) % np.uint64(n_parts)).astype(np.int64)
        for p, block in enumerate(_partition(part, n_parts, {**near, "band": np.full(len(part), b, np.uint8)})):
            out[p]["near"].append(block)
    return [{"exact": o["exact"], "near": _concat(o["near"], _NEAR_BANDED)} for o in out]


def _pairs_in_runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All position pairs (i < j) of equal values in sorted `keys`; work in proportion to the pairs."""
    n = len(keys)
    p, o = np.flatnonzero(keys[1:] == keys[:-1]), 1
    first, second = [], []
    while p.size:
        first.append(p)
        second.append(p + o)
        o += 1
        p = p[p + o < n]
        p = p[keys[p + o] == keys[p]]
    if not first:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(first), np.concatenate(second)


def _pairs(max_distance: int, *blocks: dict) -> np.ndarray:
    """One partition's related pairs as (id, id) rows: equal sha256 prefixes, and near pairs (verified)."""
    edges = []
    exact = _concat([b["exact"] for b in blocks], _EXACT)
    order = np.argsort(exact["sha"], kind="stable")
    sha, ids = exact["sha"][order], exact["id"][order]
    same = np.flatnonzero(sha[1:] == sha[:-1])
    edges.append(np.stack([ids[same], ids[same + 1]], 1))  # a chain joins a group as well as all its pairs
    near = _concat([b["near"] for b in blocks], _NEAR_BANDED)
    if len(near["id"]):
        # rows with the same band, hash and colour are related to each other and to the same rows:
        # chain them and search with one of them (many copies of one image would cost n^2 pairs).
        # Sorted by a fingerprint, checked in full: a fingerprint collision only leaves a copy uncollapsed.
        colour_hi, colour_lo = _u64(near["colour"][:, :8]), _u64(np.pad(near["colour"][:, 8:], ((0, 0), (4, 0))))
        order = np.argsort(_mix(near["h"] ^ _mix(colour_hi ^ _mix(colour_lo, 1), 2), 3) ^ near["band"])
        columns = [near["band"][order], near["h"][order], colour_hi[order], colour_lo[order]]
        same = np.logical_and.reduce([col[1:] == col[:-1] for col in columns])
        band, h, c, ids = columns[0], columns[1], near["colour"][order], near["id"][order]
        dup = np.flatnonzero(same)
        edges.append(np.stack([ids[dup], ids[dup + 1]], 1))
        keep = np.concatenate([[True], ~same])
        band, h, c, ids = band[keep], h[keep], c[keep], ids[keep]
        for b, (_, masks) in enumerate(near_tables(max_distance)):
            sel = np.flatnonzero(band == b)
            for mask in masks:
                key = _mix(h[sel] & np.uint64(mask)) >> np.uint64(32)
                packed = np.sort((key << np.uint64(32)) | np.arange(len(sel), dtype=np.uint64))
                i, j = _pairs_in_runs(packed >> np.uint64(32))
                i = sel[(packed[i] & np.uint64(0xFFFFFFFF)).astype(np.int64)]
                j = sel[(packed[j] & np.uint64(0xFFFFFFFF)).astype(np.int64)]
                ok = np.bitwise_count(h[i] ^ h[j]) <= max_distance
                ok &= np.abs(c[i].astype(np.int16) - c[j].astype(np.int16)).max(axis=1, initial=0) <= COLOUR_TOLERANCE
                edges.append(np.stack([ids[i[ok]], ids[j[ok]]], 1))
    edges = np.concatenate(edges)
    return np.unique(np.sort(edges, axis=1), axis=0) if len(edges) else np.zeros((0, 2), np.uint64)


def _components(n_batches: int, units_per_task: int, *pair_blocks: np.ndarray):
    """Connected components of all pairs (scipy's); per batch of units, its related rows' ids and components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate(pair_blocks) if pair_blocks else np.zeros((0, 2), np.uint64)
    nodes, index = np.unique(edges.ravel(), return_inverse=True)
    index = index.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(index), np.int8), (index[:, 0], index[:, 1])), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=False)
    batch = (nodes >> np.uint64(ROW_BITS)).astype(np.int64) // units_per_task
    bounds = np.searchsorted(batch, np.arange(n_batches + 1))
    return _one_or_list([(nodes[lo:hi], labels[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])])


_GATHERED = ["key", "labels", "width", "height", "sha256", "phash", "colour", "url"]


def _gather(units_root: str, names: list[str], first: int, n_groups: int, related: tuple):
    """The rows of a batch that have a related row, with what decide() needs and their shard, unit and
    component, as one Arrow table per group of components."""
    ids, components = related
    units = (ids >> np.uint64(ROW_BITS)).astype(np.int64)
    tables = []
    for u in np.unique(units):
        sel = np.flatnonzero(units == u)
        t = shards.read_manifest_file(storage.join(units_root, names[u - first] + ".parquet"), _GATHERED)
        t = t.take((ids[sel] & np.uint64((1 << ROW_BITS) - 1)).astype(np.int64))
        t = t.append_column("shard", pa.array([names[u - first]] * len(sel), pa.string()))
        t = t.append_column("unit", pa.array(units[sel]))
        tables.append(t.append_column("component", pa.array(components[sel])))
    if not tables:
        return _one_or_list([None] * n_groups)
    table = pa.concat_tables(tables)
    group = np.asarray(table.column("component")) % n_groups
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(n_groups + 1))
    return _one_or_list([table.take(order[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])])


def _decide_components(max_distance: int, n_batches: int, units_per_task: int, *row_groups) -> list:
    """decide() per component; per batch of units {(shard, key): None for a dropped row, or the labels and
    duplicate_urls of a kept row that took others}, and last the (exact, near) counts."""
    components = defaultdict(list)
    for table in row_groups:
        for r in table.to_pylist() if table is not None else []:
            components[r["component"]].append(r)
    outcomes: list[dict] = [{} for _ in range(n_batches)]
    exact = near = 0
    for rows in components.values():
        d = decide(rows, max_distance)
        exact, near = exact + d.exact, near + d.near
        by_ident = {(r["shard"], r["key"]): r for r in rows}
        for ident in d.dropped:
            outcomes[by_ident[ident]["unit"] // units_per_task][ident] = None
        for ident, merged in d.merged.items():
            if merged:
                r = by_ident[ident]
                entry = {"labels": d.labels[ident]}
                dup_urls = sorted({by_ident[m]["url"] or "" for m in merged} - {r["url"] or ""})
                if dup_urls:
                    entry["duplicate_urls"] = dup_urls
                outcomes[r["unit"] // units_per_task][ident] = entry
    return [*outcomes, (exact, near)]


def _refs(result, n: int) -> list:
    """Ray returns one ref, not a list of one, for num_returns=1."""
    return [result] if n == 1 else list(result)


def decide_partitioned(units_root: str, names: list[str], max_distance: int,
                       units_per_task: int = UNITS_PER_TASK) -> tuple[list[list], list]:
    """Start the tasks deciding over the unit shards `names` (their order fixes the batches).

    Returns, per batch of `units_per_task` names, the refs of its outcome blocks (see
    _decide_components; rows absent from them are kept with their own labels), and the refs of the
    (exact, near) counts. The driver holds names and refs only."""
    import ray

    if max_distance > MAX_NEAR_DISTANCE:
        raise ValueError(f"near-duplicate distance {max_distance} is over {MAX_NEAR_DISTANCE} bits")
    batches = [names[i:i + units_per_task] for i in range(0, len(names), units_per_task)]
    n = len(batches)  # batches, pair partitions and component groups alike: each task's share stays bounded
    if not n:
        return [], []
    task = ray.remote(num_cpus=1)
    scan, pairs, components, gather, decide_task = (
        task(f) for f in (_scan, _pairs, _components, _gather, _decide_components))
    scanned = [_refs(scan.options(num_returns=n).remote(units_root, b, m * units_per_task, max_distance, n), n)
               for m, b in enumerate(batches)]
    paired = [pairs.remote(max_distance, *[s[p] for s in scanned]) for p in range(n)]
    related = _refs(components.options(num_returns=n).remote(n, units_per_task, *paired), n)
    gathered = [_refs(gather.options(num_returns=n).remote(units_root, b, m * units_per_task, n, related[m]), n)
                for m, b in enumerate(batches)]
    decided = [decide_task.options(num_returns=n + 1).remote(max_distance, n, units_per_task, *[g[q] for g in gathered])
               for q in range(n)]
    return [[d[m] for d in decided] for m in range(n)], [d[n] for d in decided]
