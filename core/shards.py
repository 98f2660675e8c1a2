"""The maskless shard format (docs/FORMAT.md), written and read here and nowhere else.

A dataset is a folder (or URI) of shards. Shard NAME is three files:
  NAME.tar         WebDataset tar: per sample `__key__`, `jpg`, `json`, and later `gt.json`/`pseudo.json`
  NAME.parquet     manifest, one row per sample
  NAME.stats.json  counts and reject reasons of the work that produced the shard
The tar is renamed into place last, so a shard whose `.tar` exists is complete: a killed writer leaves
only hidden temporary files, which readers never list. `dataset.json` lists the shards and the classes
once a stage has finished.

The tars are written and read with the standard library's tarfile, not webdataset: importing webdataset
imports torch (2.5 s in every fresh process, so in every crawl worker, which needs no torch), and a bare
GPU machine has no webdataset. The format is WebDataset's (a sample's members `KEY.EXT`, together, in
order); the tests read our shards with webdataset itself and with Ray Data's read_webdataset.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from maskless.core import errors, storage

SCHEMA_VERSION = 1
DATASET_FILE = "dataset.json"
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("labels", pa.list_(pa.string())),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("sha256", pa.string()),
    ("phash", pa.string()),
    ("colour", pa.string()),  # added after schema 1 was first written: older manifests lack it (read as null)
    ("url", pa.string()),
    ("engine", pa.string()),
    ("query", pa.string()),
    ("gt_instances", pa.int32()),
    ("pseudo_instances", pa.int32()),
])


@dataclass
class Sample:
    """One image and everything known about it."""

    key: str
    jpg: bytes
    meta: dict
    gt: dict | None = None
    pseudo: dict | None = None
    extra: dict[str, bytes] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.meta.get("labels", []))

    def image(self) -> Image.Image:
        return Image.open(io.BytesIO(self.jpg)).convert("RGB")


def _manifest_row(s: Sample) -> dict:
    m = s.meta
    return {
        "key": s.key,
        "labels": s.labels,
        "width": int(m.get("width", 0)),
        "height": int(m.get("height", 0)),
        "sha256": m.get("sha256"),
        "phash": m.get("phash"),
        "colour": m.get("colour"),
        "url": m.get("url"),
        "engine": m.get("engine"),
        "query": m.get("query"),
        "gt_instances": len(s.gt["instances"]) if s.gt else None,
        "pseudo_instances": len(s.pseudo["instances"]) if s.pseudo else None,
    }


class ShardWriter:
    """Writes one shard atomically. Use as a context manager: commits on success, aborts on error."""

    def __init__(self, root: str, name: str):
        if not KEY_PATTERN.match(name):
            raise ValueError(f"shard name {name!r} must use letters, digits, '_' or '-' only")
        self.root, self.name = root, name
        storage.makedirs(root)
        fs, path = storage.resolve(root)
        tmp_dir = path if storage.is_local(fs) else None
        self._tmp = tempfile.NamedTemporaryFile(dir=tmp_dir, prefix=f".{name}.", suffix=".tar.tmp", delete=False)
        self._tar = tarfile.open(fileobj=self._tmp, mode="w")
        self._rows: list[dict] = []
        self._keys: set[str] = set()
        self.closed = False

    def write(self, sample: Sample) -> None:
        if not KEY_PATTERN.match(sample.key):
            raise ValueError(f"sample key {sample.key!r} must use letters, digits, '_' or '-' only")
        if sample.key in self._keys:
            raise ValueError(f"duplicate sample key {sample.key!r} in shard {self.name}")
        self._keys.add(sample.key)
        record = {"jpg": sample.jpg, "json": json.dumps(sample.meta).encode()}
        if sample.gt is not None:
            record["gt.json"] = json.dumps(sample.gt).encode()
        if sample.pseudo is not None:
            record["pseudo.json"] = json.dumps(sample.pseudo).encode()
        record.update(sample.extra)
        for ext in sorted(record):  # a sample's members together, in a fixed order (webdataset's too)
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size, info.mode = len(record[ext]), 0o444  # mtime 0: the same samples give the same bytes
            self._tar.addfile(info, io.BytesIO(record[ext]))
        self._rows.append(_manifest_row(sample))

    def __len__(self) -> int:
        return len(self._rows)

    def commit(self, stats: dict | None = None) -> dict:
        """Finish the shard: manifest and stats first, the tar last (the commit point)."""
        self._tar.close()
        self._tmp.close()
        base = storage.join(self.root, self.name)
        table = pa.Table.from_pylist(self._rows, schema=MANIFEST_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes_atomic(base + ".parquet", buf.getvalue())
        # the shard's own facts last: a caller's stats must not override them (a crawl unit's stats
        # carry the window size it asked for under "count")
        info = {**(stats or {}), "shard": self.name, "schema_version": SCHEMA_VERSION, "count": len(self._rows)}
        storage.write_json_atomic(base + ".stats.json", info)
        fs, final = storage.resolve(base + ".tar")
        if storage.is_local(fs):
            os.chmod(self._tmp.name, 0o644)  # NamedTemporaryFile creates 0600
            os.replace(self._tmp.name, final)
        else:
            with open(self._tmp.name, "rb") as src, fs.open_output_stream(final) as dst:
                dst.write(src.read())
            os.unlink(self._tmp.name)
        self.closed = True
        return info

    def abort(self) -> None:
        if self.closed:
            return
        try:
            self._tar.close()
        finally:
            self._tmp.close()
            if os.path.exists(self._tmp.name):
                os.unlink(self._tmp.name)
        self.closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.closed:
            self.commit()
        else:
            self.abort()


def write_shards(samples: Iterable[Sample], root: str, prefix: str, max_count: int = 1000,
                 stats: dict | None = None) -> list[dict]:
    """Write samples into shards PREFIX-000000, PREFIX-000001, ... of at most max_count samples."""
    if max_count < 1:
        raise ValueError("max_count must be at least 1")
    infos, writer, index = [], None, 0
    try:
        for s in samples:
            if writer is None:
                writer = ShardWriter(root, f"{prefix}-{index:06d}")
                index += 1
            writer.write(s)
            if len(writer) >= max_count:
                infos.append(writer.commit(stats))
                writer = None
        if writer is not None:
            infos.append(writer.commit(stats))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return infos


class InvalidSample(ValueError):
    """Source data an importer cannot turn into a correct sample (an image that does not decode, a mask
    that does not, a malformed annotation); `reason` is a short stats key. A ValueError, so the command
    stops with exit 2 and this message, unless the import skips invalid items (`skip_invalid`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


MAX_LISTED_SKIPS = 1000  # per shard; the counts by reason are always complete


def write_chunks(items: list, root: str, prefix: str, shard_size: int,
                 to_sample: Callable[[Any, Counter], Sample], desc: str, skip_invalid: bool = False,
                 describe: Callable[[Any], str] = str) -> tuple[int, int]:
    """Write items as shards PREFIX-000000, ... of shard_size items each, skipping shards already complete.

    Shard i always holds the same items (for a fixed order and size), so a rerun after a kill writes only
    the missing shards. `to_sample(item, dropped)` gives an item's sample and counts in `dropped` what of
    it was left out (e.g. empty instances); with skip_invalid an item raising InvalidSample is left out
    too. Both are recorded in the shard's stats (`dropped`, `skipped`, `skipped_items`). Running out of
    disk raises an OSError naming the shard and the item; complete shards stay. Returns (shards written,
    shards skipped)."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    storage.makedirs(root)
    storage.remove_stale_temps(root)
    done = set(shard_names(root))
    from tqdm import tqdm  # here, not at the top: the model-level stages import this module on a bare GPU machine

    written = skipped = 0
    chunks = [items[i:i + shard_size] for i in range(0, len(items), shard_size)]
    for index, chunk in enumerate(tqdm(chunks, desc=desc, unit="shard", disable=None)):
        name = f"{prefix}-{index:06d}"
        if name in done:
            skipped += 1
            continue
        dropped, invalid, listed, item = Counter(), Counter(), [], None

        def writing() -> str:  # read when the disk fills: the item being written then
            return f"shard {name} of {root} ({f'at {describe(item)}' if item is not None else 'committing it'})"

        with errors.disk_full_is_one_line(writing, f"the {written + skipped} shards already complete are kept"):
            with ShardWriter(root, name) as w:
                for item in chunk:
                    try:
                        sample = to_sample(item, dropped)
                    except InvalidSample as e:
                        if not skip_invalid:
                            raise
                        invalid[e.reason] += 1
                        if len(listed) < MAX_LISTED_SKIPS:
                            listed.append(str(e))
                        continue
                    w.write(sample)
                item = None
                w.commit({"dropped": dict(dropped), "skipped": dict(invalid), "skipped_items": listed})
        written += 1
    return written, skipped


def sum_stats(root: str, key: str) -> dict[str, int]:
    """Counts under `key` (a dict of reason -> n) summed over every complete shard's stats."""
    total: Counter = Counter()
    for st in read_stats(root):
        total.update(st.get(key) or {})
    return dict(sorted(total.items()))


def shard_names(root: str) -> list[str]:
    """Names of the complete shards of a dataset (those whose tar is in place)."""
    return [n[:-4] for n in storage.listdir(root) if n.endswith(".tar") and not n.startswith(".")]


def list_shards(root: str) -> list[str]:
    """Paths/URIs of the complete shard tars of a dataset, sorted."""
    return [storage.join(root, n + ".tar") for n in shard_names(root)]


def delete_shard(root: str, name: str) -> None:
    """Remove a shard, tar first so it stops reading as complete before its manifest goes."""
    for ext in (".tar", ".parquet", ".stats.json"):
        storage.delete(storage.join(root, name + ext))


def _sample_from_members(key: str, members: dict[str, bytes]) -> Sample:
    extra = {k: v for k, v in members.items() if k not in ("jpg", "json", "gt.json", "pseudo.json")}
    return Sample(
        key=key,
        jpg=members["jpg"],
        meta=json.loads(members["json"]),
        gt=json.loads(members["gt.json"]) if "gt.json" in members else None,
        pseudo=json.loads(members["pseudo.json"]) if "pseudo.json" in members else None,
        extra=extra,
    )


def _member_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member name by WebDataset's rule: the key is the name up to the
    first dot of its last path component; None for a name without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext


def _samples(tar: tarfile.TarFile) -> Iterator[Sample]:
    """The samples of an open tar stream: consecutive members sharing a key, in write order."""
    key, members = None, {}
    for m in tar:
        split = _member_key(m.name) if m.isfile() else None
        if split is None:
            continue
        if split[0] != key and members:
            yield _sample_from_members(key, members)
            members = {}
        key = split[0]
        members[split[1]] = tar.extractfile(m).read()
    if members:
        yield _sample_from_members(key, members)


def read_shard(shard: str) -> Iterator[Sample]:
    """Samples of one shard tar, in write order, streamed from a path or URI."""
    fs, path = storage.resolve(shard)
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        yield from _samples(tar)


@dataclass(frozen=True)
class TarSample:
    """Where one sample lives in its shard tar: its members' data spans, and the byte range
    [start, end) from its first header to the end of its last member's data blocks."""

    key: str
    start: int
    end: int
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)


def index_tar(shard: str) -> list[TarSample]:
    """Every sample of a shard tar, in write order, from the tar headers alone (member data is
    skipped, not read): random access by byte offset for training and work units."""
    fs, path = storage.resolve(shard)
    index: list[TarSample] = []
    with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            split = _member_key(m.name) if m.isfile() else None
            if split is None:
                continue
            end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if index and index[-1].key == split[0]:
                last = index[-1]
                index[-1] = TarSample(last.key, last.start, end, {**last.members, split[1]: (m.offset_data, m.size)})
            else:
                index.append(TarSample(split[0], m.offset, end, {split[1]: (m.offset_data, m.size)}))
    return index


def read_shard_range(shard: str, start: int, end: int) -> Iterator[Sample]:
    """The samples whose members lie in bytes [start, end) of a shard tar (a range from index_tar):
    one ranged read, not the whole tar."""
    fs, path = storage.resolve(shard)
    with fs.open_input_file(path) as f:
        data = f.read_at(end - start, start)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:  # a slice of members needs no end marker
        yield from _samples(tar)


def read_dataset(root: str) -> Iterator[Sample]:
    """All samples of all complete shards of a dataset."""
    for shard in list_shards(root):
        yield from read_shard(shard)


def read_manifest_file(path: str, columns: list[str] | None = None) -> pa.Table:
    """One shard's manifest in MANIFEST_SCHEMA (or its `columns`): a column an older shard lacks reads as null."""
    fields = [MANIFEST_SCHEMA.field(c) for c in (columns or MANIFEST_SCHEMA.names)]
    file = pq.ParquetFile(io.BytesIO(storage.read_bytes(path)))
    table = file.read(columns=[f.name for f in fields if f.name in file.schema_arrow.names])
    return pa.table([table.column(f.name).cast(f.type) if f.name in table.column_names
                     else pa.nulls(table.num_rows, f.type) for f in fields], schema=pa.schema(fields))


def read_manifest(root: str) -> pa.Table:
    """One table of every complete shard's manifest rows, with a `shard` column."""
    tables = []
    for name in shard_names(root):
        t = read_manifest_file(storage.join(root, name + ".parquet"))
        tables.append(t.append_column("shard", pa.array([name] * t.num_rows, pa.string())))
    if not tables:
        return MANIFEST_SCHEMA.empty_table().append_column("shard", pa.array([], pa.string()))
    return pa.concat_tables(tables)


def read_stats(root: str) -> list[dict]:
    return [storage.read_json(storage.join(root, n + ".stats.json")) for n in shard_names(root)]


def map_shards(src: str, dst: str, fn: Callable[[Sample], Sample]) -> None:
    """Write fn(sample) of every sample of `src` into `dst`, one output shard per input shard under the same
    name; shards already complete in `dst` are kept, so a rerun finishes the rest (derived datasets:
    the ablation's degraded masks, bench.relabel's new labels)."""
    storage.makedirs(dst)
    storage.remove_stale_temps(dst)
    done = set(shard_names(dst))
    for name in shard_names(src):
        if name in done:
            continue
        with ShardWriter(dst, name) as w:
            for s in read_shard(storage.join(src, name + ".tar")):
                w.write(fn(s))


def write_dataset_info(root: str, classes: list[str], stage: str, **extra) -> dict:
    """Record a finished dataset: its classes, shards and counts (dataset.json)."""
    stats = read_stats(root)
    info = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "classes": list(classes),
        "shards": [{"name": s["shard"], "count": s["count"]} for s in stats],
        "samples": sum(s["count"] for s in stats),
        **extra,
    }
    storage.write_json_atomic(storage.join(root, DATASET_FILE), info)
    return info


def read_dataset_info(root: str) -> dict:
    """dataset.json of a finished dataset; a clear error when the folder is not one."""
    path = storage.join(root, DATASET_FILE)
    if not storage.exists(path):
        if not storage.exists(root):
            raise FileNotFoundError(f"no dataset at {root}: the folder does not exist")
        raise FileNotFoundError(f"{root} has no {DATASET_FILE}: not a finished maskless dataset "
                                f"(rerun the stage that writes it)")
    info = storage.read_json(path)
    if info.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {info.get('schema_version')} is not {SCHEMA_VERSION}")
    return info
