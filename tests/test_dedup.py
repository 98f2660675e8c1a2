"""Dedup: the partitioned decision equals the rule (dedup.decide), the near search misses no pair,
colours keep different pictures apart, and the final pass writes what the rule decides."""
import io
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from maskless.core import shards, storage
from maskless.ingest import dedup
from maskless.ingest.crawl import run_crawl
from maskless.ingest.finalize import finalize
from maskless.ingest.dedup import COLOUR_TOLERANCE
from maskless.ingest.validator import Rejected, clean_image

from test_crawl import encode, fast_config, serve, smooth_image, write_urls  # noqa: F401 (serve: a fixture)


def flip(h: int, bits) -> int:
    for b in bits:
        h ^= 1 << int(b)
    return h


def random_rows(rng: np.random.Generator, n: int, d: int) -> list[dict]:
    """Rows with planted exact copies (same key, other unit), same-hash copies, near copies at 1..d+2 bits,
    chains of copies, equal sizes, distance ties that only the rank breaks, and missing fields."""
    rows: list[dict] = []

    def add(h, colour, sha=None, key=None, width=None, phash=True):
        rows.append({"key": key or rng.bytes(12).hex(), "labels": [f"c{int(rng.integers(0, 6))}"],
                     "width": width or int(rng.integers(1, 4)) * 10, "height": 10, "sha256": sha or rng.bytes(32).hex(),
                     "phash": "%016x" % h if phash else None,
                     "colour": None if colour is None else np.clip(colour, 0, 255).astype(np.uint8).tobytes().hex(),
                     "url": f"http://x/{len(rows)}"})
        return rows[-1]

    def parts(r):
        return int(r["phash"] or "0", 16), (None if r["colour"] is None else
                                           np.frombuffer(bytes.fromhex(r["colour"]), np.uint8).astype(int))

    while len(rows) < n:
        kind = rng.random()
        if not rows or kind < 0.45:
            add(int(rng.integers(0, 2**62)) << 2 | int(rng.integers(0, 4)), rng.integers(0, 256, 12),
                phash=rng.random() > 0.03)
            if rng.random() < 0.03:
                rows[-1]["colour"] = None
            if rng.random() < 0.02:
                rows[-1]["sha256"] = None
            continue
        src = rows[int(rng.integers(max(0, len(rows) - 50), len(rows)))]  # recent rows: chains of copies
        h, colour = parts(src)
        if kind < 0.55:  # the same file found again: same sha256 and key
            add(h, colour, sha=src["sha256"], key=src["key"], width=src["width"] if rng.random() < 0.5 else None)
        elif kind < 0.62:  # another encoding with the same hash and colour
            add(h, colour)
        elif kind < 0.7 and colour is not None and d >= 1:  # as few shared keys as d bits allow
            a, b = limit_pair(rng, d)
            add(h ^ a ^ b, colour)
        elif kind < 0.9 and colour is not None:
            add(flip(h, rng.choice(64, int(rng.integers(1, max(d, 0) + 3)), replace=False)),
                colour + rng.integers(-COLOUR_TOLERANCE - 4, COLOUR_TOLERANCE + 5, 12))
        elif colour is not None and d >= 3:  # q between two keepers at equal distance (3 bits each)
            bits = rng.choice(64, 6, replace=False)
            add(flip(h, bits[:3]), colour, width=40)
            add(flip(h, bits[3:]), colour, width=40)
            add(h, colour, width=10)
    return rows


def write_manifests(root: str, rows: list[dict], units: int, rng: np.random.Generator) -> list[str]:
    """Spread rows over unit manifests (a key once per unit); sets each row's shard; returns the names."""
    os.makedirs(root, exist_ok=True)
    names = [f"unit-{u:03d}" for u in range(units)]
    per_unit: dict[str, dict] = {name: {} for name in names}
    for r in rows:
        free = [n for n in names if r["key"] not in per_unit[n]]
        r["shard"] = free[int(rng.integers(0, len(free)))]
        per_unit[r["shard"]][r["key"]] = r
    for name in names:
        table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "shard"} for r in per_unit[name].values()],
                                     schema=shards.MANIFEST_SCHEMA)
        pq.write_table(table, os.path.join(root, name + ".parquet"))
    return names


def outcomes_of(rows: list[dict], max_distance: int) -> tuple[dict, tuple[int, int]]:
    """The rule's decision in the partitioned pass's terms: None per dropped row; labels and duplicate_urls
    per kept row that took others."""
    d = dedup.decide(rows, max_distance)
    url = {(r["shard"], r["key"]): r["url"] for r in rows}
    out = {ident: None for ident in d.dropped}
    for ident, merged in d.merged.items():
        if merged:
            out[ident] = {"labels": d.labels[ident]}
            dup_urls = sorted({url[m] for m in merged} - {url[ident]})
            if dup_urls:
                out[ident]["duplicate_urls"] = dup_urls
    return out, (d.exact, d.near)


def partitioned(ray, root, names, max_distance, units_per_task):
    outcomes, counts = dedup.decide_partitioned(root, names, max_distance, units_per_task)
    got = {}
    for blocks in outcomes:
        for block in ray.get(blocks):
            assert not set(block) & set(got)  # each row decided once
            got.update(block)
    return got, tuple(map(sum, zip(*ray.get(counts))))


@pytest.mark.parametrize("max_distance", [4, 0, -1])
def test_partitioned_decision_equals_the_rule_on_random_manifests(ray_local, tmp_path, max_distance):
    rng = np.random.default_rng(max_distance + 10)
    rows = random_rows(rng, 1000, max_distance)
    names = write_manifests(str(tmp_path), rows, 24, rng)
    want, counts = outcomes_of(rows, max_distance)
    assert counts[0] > 50 and (max_distance < 0 or counts[1] > 50)  # the planted copies are there
    # many batches and partitions; then one, with the units listed the other way round
    for order, units_per_task in ((names, 2), (names, 7), (names[::-1], 1000)):
        got, got_counts = partitioned(ray_local, str(tmp_path), order, max_distance, units_per_task)
        assert got == want and got_counts == counts


def test_partitioned_decision_errors_name_the_row(ray_local, tmp_path):
    rows = [{"key": "a", "labels": ["x"], "width": 10, "height": 10, "sha256": "ab" * 32, "phash": "12345",
             "colour": "00" * 12, "url": "u", "shard": "s"}]
    units = str(tmp_path / "out" / "_units")
    write_unit_shards(units, rows, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="^unit-000: sample a has phash '12345', not 16 hex digits$"):
        finalize(str(tmp_path / "out"), units, 4)


def limit_pair(rng: np.random.Generator, d: int) -> tuple[int, int]:
    """Two hashes d bits apart that agree on exactly one band, and there on exactly two sub-bands of
    the other bits: the fewest keys the search can share."""
    tables = dedup.near_tables(d)
    while True:
        h = int(rng.integers(0, 2**63)) << 1 | int(rng.integers(0, 2))
        other = flip(h, rng.choice(64, d, replace=False))
        diff = h ^ other
        clean = [b for b, (band, _) in enumerate(tables) if not diff & band]
        if len(clean) == 1 and sum(not diff & m for m in tables[clean[0]][1]) == 1:
            return h, other


@pytest.mark.parametrize("max_distance", [1, 2, 4, 6])
def test_near_search_finds_every_pair_within_the_distance_and_no_other(max_distance):
    rng = np.random.default_rng(max_distance)
    hashes, colours = [], []
    for _ in range(300):  # pairs at the pigeonhole limit, with close colours
        a, b = limit_pair(rng, max_distance)
        c = rng.integers(0, 256 - COLOUR_TOLERANCE, 12)
        hashes += [a, b]
        colours += [c, c + COLOUR_TOLERANCE]
    for _ in range(200):  # one bit too far, or colours one step too far apart
        h = int(rng.integers(0, 2**63))
        c = rng.integers(0, 200, 12)
        hashes += [h, flip(h, rng.choice(64, max_distance + 1, replace=False)), h + (1 << 63)]
        colours += [c, c, c + np.eye(12, dtype=int)[int(rng.integers(0, 12))] * (COLOUR_TOLERANCE + 1)]
    hashes += [int(rng.integers(0, 2**63)) for _ in range(1000)]
    colours += [rng.integers(0, 256, 12) for _ in range(1000)]
    hashes += [hashes[0]] * 40  # many copies of one hash and colour: chained, searched once
    colours += [colours[0]] * 40
    n = len(hashes)
    h = np.array(hashes, np.uint64)
    c = np.array(colours, np.uint8)
    near = {"h": h, "colour": c, "id": np.arange(n, dtype=np.uint64)}
    exact = {"sha": np.zeros(0, np.uint64), "id": np.zeros(0, np.uint64)}
    edges = np.concatenate([dedup._pairs(max_distance, block) for block in dedup._route(exact, near, max_distance, 7)])
    spread = np.zeros((n, n), np.int16)  # the most any colour byte differs, pair by pair
    for k in range(12):
        np.maximum(spread, np.abs(c[:, None, k].astype(np.int16) - c[None, :, k]), out=spread)
    related = (np.bitwise_count(h[:, None] ^ h[None, :]) <= max_distance) & (spread <= COLOUR_TOLERANCE)
    assert related[edges[:, 0].astype(int), edges[:, 1].astype(int)].all()  # no pair that is not related
    graph = np.zeros((n, n), bool)
    graph[edges[:, 0].astype(int), edges[:, 1].astype(int)] = True
    from scipy.sparse.csgraph import connected_components
    _, want = connected_components(related, directed=False)
    _, got = connected_components(graph, directed=False)
    assert len(set(zip(want, got))) == len(set(want)) == len(set(got))  # the same components
    assert len(set(want)) < n - 300


def test_near_rule_needs_the_same_colours_and_exact_copies_do_not():
    base = {"labels": ["a"], "width": 20, "height": 10, "phash": "00ff00ff00ff00ff", "url": None}
    red, blue = "ff0000" * 4, "0000ff" * 4
    rows = [{**base, "shard": "s", "key": "red", "sha256": "1", "colour": red},
            {**base, "shard": "s", "key": "blue", "sha256": "2", "colour": blue, "labels": ["b"]},
            {**base, "shard": "s", "key": "red2", "sha256": "3", "colour": "f00a00" * 4, "width": 10},
            {**base, "shard": "s", "key": "unknown", "sha256": "4", "colour": None, "width": 10},
            {**base, "shard": "t", "key": "red", "sha256": "1", "colour": blue, "width": 10, "labels": ["c"]}]
    d = dedup.decide(rows, 4)
    assert d.dropped == {("s", "red2"): ("s", "red"), ("t", "red"): ("s", "red")}  # near: close colour; exact
    assert d.labels[("s", "red")] == ["a", "c"] and d.labels[("s", "blue")] == ["b"]
    assert (d.exact, d.near) == (1, 1)  # an unknown colour is never near


def test_a_row_between_two_keepers_goes_to_the_nearest_then_the_best_ranked():
    colour = "40" * 12
    q = 0x0F0F0F0F0F0F0F0F
    rows = [{"shard": "s", "key": key, "labels": [key], "width": w, "height": 10, "sha256": key, "url": None,
             "colour": colour, "phash": "%016x" % h}
            for key, w, h in [("a", 30, q ^ 0b111), ("b", 40, q ^ 0b111 << 40), ("q", 10, q), ("n", 20, q ^ 0b11 << 20)]]
    assert dedup.decide(rows, 4).dropped == {("s", "q"): ("s", "n")}  # nearest: 2 bits against 3
    rows.pop()
    assert dedup.decide(rows, 4).dropped == {("s", "q"): ("s", "b")}  # a tie at 3 bits: the larger image
    rows[0]["width"] = 40
    assert dedup.decide(rows, 4).dropped == {("s", "q"): ("s", "a")}  # same size: the smaller key


def test_flat_images_are_rejected_and_colour_keeps_red_and_blue_apart():
    flat = [Image.new("RGB", (120, 90), c) for c in [(255, 0, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255),
                                                      (128, 128, 128), (0, 255, 0), (255, 255, 0), (0, 128, 128)]]
    for img in flat:
        with pytest.raises(Rejected, match="near_blank"):
            clean_image(encode(img))
    shape = np.asarray(smooth_image(11, 200, 160).convert("L")).astype(float)
    red = clean_image(encode(Image.fromarray(np.stack([shape, 0 * shape, 0 * shape], -1).astype(np.uint8))))
    blue = clean_image(encode(Image.fromarray(np.stack([0 * shape, 0 * shape, shape], -1).astype(np.uint8))))
    assert dedup.hamming(int(red.phash, 16), int(blue.phash, 16)) <= 4  # pHash alone calls them one picture
    assert not dedup.colours_close(bytes.fromhex(red.colour), bytes.fromhex(blue.colour))
    a = smooth_image(11, 200, 160)
    copy = clean_image(encode(a.resize((180, 144), Image.Resampling.BILINEAR), quality=70))
    assert dedup.colours_close(bytes.fromhex(clean_image(encode(a)).colour), bytes.fromhex(copy.colour))


def test_crawl_keeps_different_flat_and_coloured_images_apart_and_merges_copies(ray_local, serve, tmp_path):
    """Issue 14 item 4: solid red and blue (pHash 0 both) became one sample [blue, red]; 8 flat images one."""
    jpg = {"Content-Type": "image/jpeg"}
    colours = [(255, 0, 0), (0, 0, 255), (0, 0, 0), (255, 255, 255), (128, 128, 128), (0, 255, 0), (255, 255, 0),
               (0, 128, 128)]
    routes = {f"/flat{i}.jpg": (200, jpg, encode(Image.new("RGB", (120, 90), c))) for i, c in enumerate(colours)}
    shape = np.asarray(smooth_image(11, 200, 160).convert("L")).astype(np.uint8)
    zero = np.zeros_like(shape)
    red, blue = (encode(Image.fromarray(np.stack(ch, -1))) for ch in ([shape, zero, zero], [zero, zero, shape]))
    a = smooth_image(12, 200, 160)
    routes.update({"/red.jpg": (200, jpg, red), "/blue.jpg": (200, jpg, blue), "/a.jpg": (200, jpg, encode(a)),
                   "/a-small.jpg": (200, jpg, encode(a.resize((180, 144), Image.Resampling.BILINEAR), quality=70))})
    srv = serve(routes)
    labels = {**{f"/flat{i}.jpg": f"flat{i}" for i in range(8)}, "/red.jpg": "red", "/blue.jpg": "blue",
              "/a.jpg": "cat", "/a-small.jpg": "dog"}
    cfg = fast_config(tmp_path, urls=write_urls(tmp_path / "u.csv", [(srv.url + p, labels[p]) for p in routes]),
                      shard_size=4)
    summary = run_crawl(cfg)
    samples = list(shards.read_dataset(cfg.out))
    assert sorted(s.labels for s in samples) == [["blue"], ["cat", "dog"], ["red"]]
    assert summary["by_engine_class"]["urls/(list)"]["rejected"] == {"near_blank": 8}
    assert summary["near_duplicates"] == 1 and summary["exact_duplicates"] == 0
    assert summary["by_engine_class"]["urls/(list)"]["duplicates"] == 1
    assert summary["samples_per_class"] == {"blue": 1, "cat": 1, "dog": 1, "red": 1}
    assert all(len(s.meta["colour"]) == 24 for s in samples)
    assert shards.read_manifest(cfg.out).column("colour").to_pylist() == [s.meta["colour"] for s in samples]


def write_unit_shards(root: str, rows: list[dict], units: int, rng: np.random.Generator) -> list[str]:
    """Unit shards (tar, manifest, stats) holding the rows, images of one byte."""
    names = write_manifests(root, rows, units, rng)
    for name in names:
        with shards.ShardWriter(root, name) as writer:
            for r in (r for r in rows if r["shard"] == name):
                meta = {k: v for k, v in r.items() if k not in ("key", "shard")}
                writer.write(shards.Sample(r["key"], b"\xff", meta))
            writer.commit({"engine": "urls", "class": "", "found": 7, "accepted": 5, "rejected": {"http_404": 2},
                           "duplicates": 1, "seconds": 2.0})
    return names


def test_final_pass_writes_what_the_rule_decides_and_a_rerun_changes_nothing(ray_local, tmp_path):
    rng = np.random.default_rng(3)
    rows = random_rows(rng, 400, 4)
    units, out = str(tmp_path / "out" / "_units"), str(tmp_path / "out")
    names = write_unit_shards(units, rows, 8, rng)
    want, (exact, near) = outcomes_of(rows, 4)
    final = finalize(out, units, 4, units_per_task=3)
    expected = {}  # the dataset the rule describes: kept rows, their labels and duplicate URLs
    for r in rows:
        entry = want.get((r["shard"], r["key"]), {"labels": sorted(set(r["labels"]))})
        if entry is not None:
            expected[(r["shard"], r["key"])] = {"labels": entry["labels"],
                                                "duplicate_urls": entry.get("duplicate_urls")}
    got = {(name, s.key): {"labels": s.labels, "duplicate_urls": s.meta.get("duplicate_urls")}
           for name in shards.shard_names(out) for s in shards.read_shard(os.path.join(out, name + ".tar"))}
    assert got == expected
    assert final.summary() == {"unit_samples": len(rows), "samples": len(expected), "exact_duplicates": exact,
                               "near_duplicates": near, "shards_rewritten": 8}
    assert final.samples_per_class == Counter(label for e in expected.values() for label in e["labels"])
    group = final.by_engine_class["urls/(list)"]
    assert (group["units"], group["found"], group["rejected"], group["duplicates"]) == (
        8, 56, {"http_404": 16}, 8 + len(rows) - len(expected))
    again = finalize(out, units, 4)  # other batches, same decision: nothing is written
    assert again.shards_rewritten == 0 and again.summary()["samples"] == len(expected)
    # a unit none of whose samples changed is a hard link to the unit's tar
    untouched = [n for n in names if not any(r["shard"] == n and (n, r["key"]) in want for r in rows)]
    for n in untouched:
        assert os.stat(os.path.join(out, n + ".tar")).st_ino == os.stat(os.path.join(units, n + ".tar")).st_ino


def test_manifests_written_before_the_colour_column_still_read(tmp_path):
    old = pa.schema([f for f in shards.MANIFEST_SCHEMA if f.name != "colour"])
    table = pa.Table.from_pylist([{"key": "k", "labels": ["a"], "width": 3, "height": 4, "sha256": "ab", "phash": "00",
                                   "url": "u", "engine": "e", "query": "q"}], schema=old)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(str(tmp_path / "old.parquet"), buf.getvalue())
    got = shards.read_manifest_file(str(tmp_path / "old.parquet"))
    assert got.schema == shards.MANIFEST_SCHEMA
    assert got.to_pylist()[0]["colour"] is None and got.to_pylist()[0]["key"] == "k"
