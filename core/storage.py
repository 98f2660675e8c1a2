"""Paths and URIs (local, file://, s3://, gs://) through pyarrow filesystems, with atomic writes.

Every stage writes through here so that a killed run never leaves a file that looks complete:
on a local disk we write a temporary name and rename it; on an object store a single PUT is
already atomic, so the final name is written directly.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Split a path or URI into (filesystem, path inside it)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def same_location(a: str, b: str) -> bool:
    """Whether two paths or URIs name the same folder (a stage's --out must not be its --data)."""
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    """A folder (on an object store: a prefix some object is under)."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly inside a folder; empty when it does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def temp_name(uri: str) -> str:
    """A sibling name that no reader ever lists (leading '.', '.tmp' suffix)."""
    head, tail = (posixpath.split(uri) if "://" in uri else os.path.split(uri))
    return join(head, f".{tail}.{uuid.uuid4().hex[:8]}.tmp")


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path) if not is_local(fs) else os.path.dirname(path), recursive=True)
    if not is_local(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)  # a full disk keeps no half-written file
        raise OSError(e.errno, e.strerror, path) from e  # name the file the error is about
    os.replace(tmp, path)


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def remove_stale_temps(uri: str) -> int:
    """Delete temporary files a killed writer left behind; returns how many."""
    n = 0
    for name in listdir(uri):
        if name.startswith(".") and name.endswith(".tmp"):
            delete(join(uri, name))
            n += 1
    return n
