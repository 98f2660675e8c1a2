"""URL lists as work by reference: find the list files, plan each as slices, read one slice in a task.

A web-scale list (LAION-style: 10^8 rows in many CSV/parquet files) must never pass through the
driver. The driver only lists the files, reads each text file's first HEAD_BYTES (header, columns,
mean row length) or each parquet file's footer, and plans slices: a window of a parquet file's rows,
or a byte range of a text file. A task reads its own slice; text ranges follow the usual split-at-newline
rule (a range owns every line that starts inside it), so every row lands in exactly one slice
whatever the cut. Each file's planned extent is kept in OUT/_lists (one small JSON per file): a
file that grew by appended rows keeps its earlier slices (and so its committed units) and gets new
slices for the new bytes only; a file rewritten in place is detected and reported. Docs:
docs/CRAWL.md "URL lists".
"""
from __future__ import annotations

import csv
import fnmatch
import glob
import hashlib
import json
import logging
import math
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Union

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from maskless.core import storage

logger = logging.getLogger(__name__)

FORMATS = ("csv", "tsv", "txt", "jsonl", "parquet")
EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".parquet": "parquet"}
DELIMITERS = {"csv": ",", "tsv": "\t"}
HEAD_BYTES = 64 * 1024        # what the driver reads of a text list: header, columns, mean row length
MAX_HEADER_BYTES = 1 << 20    # a first line longer than this is not a list header
BLOCK = 64 * 1024             # read size when a task looks for the end of a line
PLAN_THREADS = 16             # files planned at once (object stores answer each small read slowly)

Row = tuple[str, tuple[str, ...]]


class ListReadError(OSError):
    """A slice of a URL list that cannot be read: the unit fails and names its file and range."""


@dataclass(frozen=True)
class ListOptions:
    """How rows are read: the CrawlConfig options of the same names (docs/CRAWL.md)."""

    url_col: str = "url"
    label_col: tuple[str, ...] = ("label", "labels")  # the first of these that a list has
    label_sep: str = ""                               # splits a label cell; "": a cell is one label
    label: Optional[str] = None                       # label of every row of a list without a label column
    input_format: str = "auto"                        # auto: by file extension


@dataclass(frozen=True)
class ListFile:
    path: str       # absolute local path or URI
    format: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Columns:
    """Where a list's rows keep their URL and labels, as the planner found them in its header or schema."""

    url: Union[str, int]                  # a key (JSON lines, parquet) or a cell index (CSV/TSV, TXT: 0)
    label: Union[str, int, None]          # None: every row gets `fixed_label`
    fixed_label: str = ""
    sep: str = ""
    more_labels_from: int = 0             # CSV/TSV: cells from this index on are more labels (url,label,label...)


@dataclass(frozen=True)
class ListSlice:
    """One unit's share of a list file: rows [start, end) of a parquet file, or the lines that start in
    bytes [start, end) of a text file. `version` is the file's size and mtime when this part of it was
    first planned; it is part of the unit's name, so a unit never stands for other rows than its own."""

    path: str
    format: str
    version: str
    start: int
    end: int
    columns: Columns

    def describe(self) -> str:
        if self.format == "parquet":
            return f"{self.path} rows {self.start}-{self.end}"
        return f"{self.path} bytes {self.start}-{self.end}"

    def ident(self) -> str:
        c = self.columns
        return json.dumps([self.path, self.format, self.version, self.start, self.end,
                           c.url, c.label, c.fixed_label, c.sep, c.more_labels_from])

    def read(self) -> tuple[list[Row], list[tuple[str, str]]]:
        """(rows, rejects): rows as (url, labels); rejects as (url or file:offset, reason) for rows
        without a label (`no_label`) or that do not parse (`bad_row`). Raises ListReadError when the
        slice itself cannot be read."""
        try:
            if self.format == "parquet":
                return self._read_parquet()
            return self._read_text()
        except ListReadError:
            raise
        except (OSError, ValueError) as e:  # pyarrow's errors are both (ArrowIOError, ArrowInvalid)
            raise ListReadError(f"cannot read {self.describe()}: {' '.join(str(e).split())}") from None

    def _read_text(self) -> tuple[list[Row], list[tuple[str, str]]]:
        fs, path = storage.resolve(self.path)
        with fs.open_input_file(path) as f:
            size = f.size()
            begin = _next_line_start(f, self.start - 1, size) if self.start > 0 else 0
            stop = _next_line_start(f, self.end - 1, size)
            data = f.read_at(stop - begin, begin) if stop > begin else b""
        try:
            text = data.decode("utf-8-sig" if begin == 0 else "utf-8")  # a byte-order mark only at the start
        except UnicodeDecodeError as e:
            raise ListReadError(f"cannot read {self.describe()}: not UTF-8 at byte {begin + e.start}") from None
        rows, rejects = [], []
        offset = begin
        for line in text.split("\n"):
            where, offset = offset, offset + len(line.encode()) + 1
            line = line.rstrip("\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            row = self._parse_line(line)
            if row is None or not row[0]:
                rejects.append((f"{self.path}:{where}", "bad_row"))
            elif not row[1]:
                rejects.append((row[0], "no_label"))
            else:
                rows.append(row)
        return rows, rejects

    def _parse_line(self, line: str) -> Optional[Row]:
        c = self.columns
        if self.format == "txt":
            return line.strip(), (c.fixed_label,)
        if self.format == "jsonl":
            try:
                obj = json.loads(line)
            except ValueError:
                return None
            if not isinstance(obj, dict) or not isinstance(obj.get(c.url), str):
                return None
            return obj[c.url].strip(), self._labels(obj.get(c.label) if c.label is not None else None)
        try:
            cells = next(csv.reader([line], delimiter=DELIMITERS[self.format]))
        except csv.Error:  # a NUL byte, say
            return None
        if not isinstance(c.url, int) or c.url >= len(cells):
            return None
        value = cells[c.label] if isinstance(c.label, int) and c.label < len(cells) else None
        more = cells[c.more_labels_from:] if c.more_labels_from else []
        return cells[c.url].strip(), self._labels(value, more)

    def _labels(self, value, more: tuple | list = ()) -> tuple[str, ...]:
        c = self.columns
        if c.label is None:
            return (c.fixed_label,)
        items = list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])
        out = []
        for item in [*items, *more]:
            item = str(item)
            out += item.split(c.sep) if c.sep else [item]
        return tuple(dict.fromkeys(x.strip() for x in out if x.strip()))

    def _read_parquet(self) -> tuple[list[Row], list[tuple[str, str]]]:
        """The row groups that hold rows [start, end), read batch by batch (two columns) up to `end`."""
        c = self.columns
        fs, path = storage.resolve(self.path)
        columns = [c.url] + ([c.label] if c.label is not None else [])
        rows, rejects = [], []
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            groups, seen, pos = [], 0, 0  # seen: the rows before the first group read
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if pos + n <= self.start:
                    seen = pos + n
                elif pos < self.end:
                    groups.append(g)
                pos += n
            for batch in pf.iter_batches(batch_size=4096, row_groups=groups, columns=columns):
                lo, hi = max(self.start - seen, 0), min(self.end - seen, batch.num_rows)
                seen += batch.num_rows
                if hi > lo:
                    part = batch.slice(lo, hi - lo)
                    urls = part.column(0).to_pylist()
                    labels = part.column(1).to_pylist() if c.label is not None else [None] * len(urls)
                    for i, (url, value) in enumerate(zip(urls, labels)):
                        if not isinstance(url, str) or not url.strip():
                            rejects.append((f"{self.path}:row {seen - batch.num_rows + lo + i}", "bad_row"))
                        elif ls := self._labels(value):
                            rows.append((url.strip(), ls))
                        else:
                            rejects.append((url.strip(), "no_label"))
                if seen >= self.end:
                    break
        return rows, rejects


def _next_line_start(f, at: int, size: int) -> int:
    """The first offset after the first newline at or after byte `at` (or the file's size)."""
    pos = at
    while pos < size:
        block = f.read_at(min(BLOCK, size - pos), pos)
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return size


# ----------------------------------------------------------------------------------- finding lists

def _format_of(path: str, input_format: str) -> Optional[str]:
    if input_format != "auto":
        return input_format
    return EXTENSIONS.get(os.path.splitext(path)[1].lower())


def _uri(source: str, path: str) -> str:
    """A path inside the source's filesystem as the URI a task can open (local paths stay plain)."""
    if "://" not in source or source.startswith("file://"):
        return path
    return source.split("://", 1)[0] + "://" + path


def find_lists(sources: list[str], input_format: str = "auto") -> list[ListFile]:
    """The list files named by paths, URIs, folders (every list file under them) or globs, in order,
    each once. A name that matches nothing is a FileNotFoundError; a named file of no known type a
    ValueError (docs/CRAWL.md lists the extensions)."""
    if input_format not in ("auto", *FORMATS):
        raise ValueError(f"input_format must be auto or one of {', '.join(FORMATS)}, got {input_format!r}")
    found: dict[str, ListFile] = {}
    for source in sources:
        fs, path = storage.resolve(source)
        if any(ch in source for ch in "*?["):
            infos = _glob(fs, path)
            if not infos:
                raise FileNotFoundError(f"no URL list matches {source}")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"URL list {source} not found")
            infos = [info]
            if info.type == pafs.FileType.Directory:
                infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                         if i.type == pafs.FileType.File and not _hidden(posixpath.relpath(i.path, path))]
                skipped = [i.path for i in infos if _format_of(i.path, input_format) is None]
                if skipped:
                    logger.warning("URL lists in %s: skipped %d file(s) of no list type, e.g. %s",
                                   source, len(skipped), skipped[0])
                infos = [i for i in infos if _format_of(i.path, input_format) is not None]
                if not infos:
                    raise FileNotFoundError(f"folder {source} holds no URL list "
                                            f"({', '.join(sorted(EXTENSIONS))})")
        for info in sorted(infos, key=lambda i: i.path):
            fmt = _format_of(info.path, input_format)
            if fmt is None:
                raise ValueError(f"URL list {_uri(source, info.path)}: unknown type; give a file ending in "
                                 f"{', '.join(sorted(EXTENSIONS))} or set --input-format")
            uri = _uri(source, info.path)
            found.setdefault(uri, ListFile(uri, fmt, info.size or 0, info.mtime_ns or 0))
    return list(found.values())


def _hidden(relpath: str) -> bool:
    """Files a folder of lists may hold beside them: hidden files, and _SUCCESS-style markers."""
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


def _glob(fs: pafs.FileSystem, pattern: str) -> list[pafs.FileInfo]:
    if storage.is_local(fs):
        return [fs.get_file_info(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    parts = pattern.split("/")
    fixed = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
    base = "/".join(parts[:fixed])
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern)]


# ----------------------------------------------------------------------------------- planning

@dataclass
class FilePlan:
    """What planning found for one list file: its slices, the rows of each (exact, or estimated from the
    head's mean row length), and how it stands against what earlier commands planned of it."""

    file: ListFile
    status: str                   # new, unchanged, grown or changed
    slices: list[ListSlice]
    slice_rows: list[int]
    rows_exact: bool
    ledger: dict                  # the entry OUT/_lists keeps for it
    ledger_changed: bool = field(default=True)


def ledger_path(root: str, path: str) -> str:
    return storage.join(root, hashlib.sha1(path.encode()).hexdigest()[:20] + ".json")


def read_ledger(root: str, path: str) -> Optional[dict]:
    where = ledger_path(root, path)
    if not storage.exists(where):
        return None
    try:
        entry = storage.read_json(where)
        if entry["path"] == path and entry["segments"]:
            return entry
    except (ValueError, KeyError, TypeError):
        pass
    logger.warning("URL list record %s is unreadable; planning %s as a new list", where, path)
    return None


def save_ledgers(root: str, plans: list[FilePlan]) -> None:
    for p in plans:
        if p.ledger_changed:
            storage.write_json_atomic(ledger_path(root, p.file.path), p.ledger)


def fingerprint(path: str, end: int) -> str:
    """A digest of the first and last HEAD_BYTES of bytes [0, end): what tells an append (the earlier
    bytes are unchanged) from a rewrite without reading the whole list on the driver."""
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        head = f.read_at(min(HEAD_BYTES, end), 0)
        tail = f.read_at(min(HEAD_BYTES, end), max(0, end - HEAD_BYTES))
    return hashlib.sha256(b"%d\n" % end + head + tail).hexdigest()


def _segments(file: ListFile, entry: Optional[dict]) -> tuple[str, list[dict]]:
    """(status, segments): the byte (or row) extents of the file planned so far, oldest first, each
    with the file's version when it was planned."""
    new = {"end": file.size, "mtime_ns": file.mtime_ns}
    if entry is None:
        return "new", [{**new, "fingerprint": fingerprint(file.path, file.size)}]
    segments, last = entry["segments"], entry["segments"][-1]
    if entry.get("format") == file.format:
        if file.size == last["end"] and file.mtime_ns == last["mtime_ns"]:
            return "unchanged", segments
        if file.size >= last["end"] and fingerprint(file.path, last["end"]) == last["fingerprint"]:
            if file.size == last["end"]:
                return "unchanged", segments  # touched, not changed
            if file.format != "parquet":       # a parquet file cannot grow in place: rewritten = changed
                return "grown", segments + [{**new, "fingerprint": fingerprint(file.path, file.size)}]
    logger.warning("URL list %s changed since an earlier command planned it (size %d -> %d): its rows are "
                   "planned again as new units; units already crawled from the old version stay in OUT",
                   file.path, last["end"], file.size)
    return "changed", [{**new, "fingerprint": fingerprint(file.path, file.size)}]


def plan_list(file: ListFile, options: ListOptions, shard_size: int, entry: Optional[dict] = None) -> FilePlan:
    """Slices of about `shard_size` rows covering the file, earlier segments cut as they were before."""
    status, segments = _segments(file, entry)
    if file.format == "parquet":
        slices, rows, exact = _plan_parquet(file, options, shard_size, segments[0])
    else:
        slices, rows, exact = _plan_text(file, options, shard_size, segments)
    ledger = {"path": file.path, "format": file.format, "segments": segments}
    return FilePlan(file, status, slices, rows, exact, ledger, ledger_changed=ledger != entry)


def plan_lists(sources: list[str], options: ListOptions, shard_size: int, ledger_root: str) -> list[FilePlan]:
    """Every list file's plan, in the order find_lists gives; reads OUT/_lists, writes nothing."""
    files = find_lists(sources, options.input_format)
    with ThreadPoolExecutor(min(PLAN_THREADS, max(1, len(files)))) as pool:
        return list(pool.map(lambda f: plan_list(f, options, shard_size, read_ledger(ledger_root, f.path)), files))


def _version(segment: dict) -> str:
    return f"{segment['end']}:{segment['mtime_ns']}"


def _plan_parquet(file: ListFile, options: ListOptions, shard_size: int,
                  segment: dict) -> tuple[list[ListSlice], list[int], bool]:
    fs, path = storage.resolve(file.path)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        names, total = pf.schema_arrow.names, pf.metadata.num_rows
    columns = _columns_by_name(file, names, options)
    version = _version(segment)
    slices = [ListSlice(file.path, "parquet", version, lo, min(lo + shard_size, total), columns)
              for lo in range(0, total, shard_size)]
    return slices, [s.end - s.start for s in slices], True


def _columns_by_name(file: ListFile, names: list[str], options: ListOptions,
                     index: Optional[dict] = None) -> Columns:
    """Columns by name; a list without the URL column, or without a label column and no --label, is a
    ValueError naming the columns it has."""
    where = index if index is not None else {n: n for n in names}
    found = ", ".join(map(str, names)) or "none"
    key = options.url_col.lower() if index is not None else options.url_col
    if key not in where:
        raise ValueError(f"URL list {file.path} has no column {options.url_col!r} (--url-col); "
                         f"its columns: {found}")
    label = next((where[k] for k in ((c.lower() if index is not None else c) for c in options.label_col)
                  if k in where), None)
    if label is None and options.label is None:
        raise ValueError(f"URL list {file.path} has no label column {' or '.join(map(repr, options.label_col))} "
                         f"(--label-col; or --label for one label for every row); its columns: {found}")
    return Columns(where[key], label, options.label or "", options.label_sep)


def _plan_text(file: ListFile, options: ListOptions, shard_size: int,
               segments: list[dict]) -> tuple[list[ListSlice], list[int], bool]:
    fs, path = storage.resolve(file.path)
    with fs.open_input_file(path) as f:
        head = f.read_at(min(HEAD_BYTES, file.size), 0)
        first = _data_lines(head, 0)[:1]
        if (not first or first[0][1] < 0) and file.size > len(head):  # the header goes on: read more
            head = f.read_at(min(MAX_HEADER_BYTES, file.size), 0)
    columns, data_start = _text_layout(file, head, options)
    slices: list[ListSlice] = []
    rows: list[int] = []
    exact = True
    start = data_start
    for seg in segments:
        end = seg["end"]
        if end <= start:
            continue
        # the head as it was when this segment was planned: its cut never changes as the file grows
        known = head[:min(len(head), end)]
        bounds, seg_rows, seg_exact = _cut(known, start, end, shard_size, data_start)
        version = _version(seg)
        slices += [ListSlice(file.path, file.format, version, a, b, columns) for a, b in zip(bounds, bounds[1:])]
        rows, exact = rows + seg_rows, exact and seg_exact
        start = end
    return slices, rows, exact


def _data_lines(head: bytes, data_start: int) -> list[tuple[int, int]]:
    """(start, length with its newline) of the rows (not blank, not comment) that start in `head`."""
    out, pos = [], data_start
    while pos < len(head):
        nl = head.find(b"\n", pos)
        stop = len(head) if nl < 0 else nl + 1
        text = head[pos:stop].removeprefix(b"\xef\xbb\xbf" if pos == 0 else b"").strip()
        if text and not text.startswith(b"#"):
            out.append((pos, stop - pos if nl >= 0 else -1))  # -1: cut off by the head's end
        pos = stop
    return out


def _cut(known: bytes, start: int, end: int, shard_size: int, data_start: int) -> tuple[list[int], list[int], bool]:
    """Range bounds for bytes [start, end): at every shard_size-th row start inside `known` (the head),
    then every ~shard_size x mean row length bytes. Returns (bounds, rows per range, exact)."""
    lines = _data_lines(known, data_start)
    starts = [p for p, _ in lines if p >= start]
    bounds = [start] + starts[shard_size::shard_size]
    rows = [shard_size] * (len(bounds) - 1)
    left = len(starts) - shard_size * (len(bounds) - 1)  # known rows after the last bound
    if end <= len(known):  # all of it read: exact
        return (bounds + [end], rows + [left], True) if starts else ([start], [], True)
    whole = [n for _, n in lines if n > 0]
    mean = sum(whole) / len(whole) if whole else max(1, len(known) - data_start)
    last = bounds[-1]
    est = left + (end - max(last, len(known))) / mean
    n = max(1, math.ceil(est / shard_size))
    step = math.ceil((end - last) / n)
    tail = sorted({min(last + step * k, end) for k in range(1, n + 1)})
    rows += [round(est * (b - a) / (end - last)) for a, b in zip([last] + tail, tail)]
    return bounds + tail, rows, False


def _text_layout(file: ListFile, head: bytes, options: ListOptions) -> tuple[Columns, int]:
    """(columns, offset of the first row) from a text list's head: CSV/TSV find their header after
    blank and comment lines and map columns by name (a first row holding a URL means no header: url,
    label[,label...] by position); JSON lines take their keys from the first row."""
    fixed = options.label if options.label is not None else os.path.splitext(posixpath.basename(file.path))[0]
    if file.format == "txt":
        return Columns(0, None, fixed), 0
    lines = _data_lines(head, 0)
    if not lines:
        if file.size > len(head):
            raise ValueError(f"URL list {file.path}: its first {len(head)} bytes hold no row")
        return Columns(0, None, fixed), len(head)  # no rows at all: nothing to plan
    first_at, length = lines[0]
    if length < 0 and file.size > len(head):
        raise ValueError(f"URL list {file.path}: its first line is longer than {len(head)} bytes")
    raw = head[first_at:first_at + length if length > 0 else len(head)]
    try:
        first = raw.decode("utf-8-sig" if first_at == 0 else "utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"URL list {file.path} is not UTF-8 text") from None
    if file.format == "jsonl":
        try:
            obj = json.loads(first)
        except ValueError:
            raise ValueError(f"URL list {file.path}: its first row is not a JSON object: {first[:80]!r}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"URL list {file.path}: its first row is not a JSON object: {first[:80]!r}")
        return _columns_by_name(file, list(obj), options), 0
    cells = [c.strip() for c in next(csv.reader([first], delimiter=DELIMITERS[file.format]))]
    index = {c.lower(): i for i, c in reversed(list(enumerate(cells)))}  # the first of equal names wins
    if options.url_col.lower() in index:
        columns = _columns_by_name(file, cells, options, index)
        header_end = first_at + length if length > 0 else len(head)
        return Columns(columns.url, columns.label, columns.fixed_label, columns.sep, len(cells)), header_end
    if any("://" in c for c in cells):  # no header: url,label[,label...] by position
        if len(cells) < 2 and options.label is None:
            raise ValueError(f"URL list {file.path}: URL {cells[0]} has no label (each row is url,label[,label...]; "
                             f"or a header naming --url-col and --label-col; or --label)")
        if len(cells) < 2:
            return Columns(0, None, options.label, options.label_sep), 0
        return Columns(0, 1, "", options.label_sep, 2), 0
    raise ValueError(f"URL list {file.path} has no column {options.url_col!r} (--url-col); "
                     f"its columns: {', '.join(cells)}")
