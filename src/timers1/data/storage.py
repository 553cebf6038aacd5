"""Where corpus inputs live: local paths or pyarrow.fs URIs (s3://, gs://, hdfs://, file://).

Build inputs and Parquet corpora may sit in object stores; the compiled training form is
memory-mapped and therefore local (or on a shared POSIX filesystem such as Lustre or NFS).
Everything that reads a build input or a Parquet shard goes through ``resolve`` so one code
path serves both; ``file://`` URIs take the same pyarrow.fs route as ``s3://`` ones, which is
how the tests exercise it without a bucket.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pyarrow.fs as pafs

from timers1.errors import InputError

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(location: str | Path) -> bool:
    return isinstance(location, str) and bool(_URI.match(location))


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or a URI."""
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(str(location))
        except (ValueError, OSError) as exc:  # unknown scheme, missing credentials, no network
            raise InputError(f"{location}: cannot open ({str(exc).splitlines()[0]})") from None
    return pafs.LocalFileSystem(), str(Path(location).absolute())


def local_path(location: str | Path) -> Path | None:
    """The local path of a location (a path or a file:// URI), or None for remote storage."""
    if not is_uri(location):
        return Path(location)
    fs, path = resolve(location)
    return Path(path) if isinstance(fs, pafs.LocalFileSystem) else None


def join(location: str | Path, name: str) -> str:
    """``location``/``name`` for paths and URIs alike."""
    return f"{str(location).rstrip('/')}/{name}" if is_uri(location) else str(Path(location) / name)


def file_size(location: str | Path) -> int | None:
    """Size in bytes, or None when the file does not exist."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def is_dir(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(location: str | Path) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def expand(location: str | Path, patterns: tuple[str, ...]) -> list[str]:
    """The files a build source names, sorted: the file itself, or the files under a directory
    (recursively) whose names match one of ``patterns``; or a glob in the last path component."""
    text = str(location)
    head, _, tail = text.rpartition("/")
    if any(ch in tail for ch in "*?["):
        return expand(head or ".", (tail,))
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [text]
    if info.type != pafs.FileType.Directory:
        raise InputError(f"{location}: no such file or directory")
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = sorted(f.path for f in found if f.type == pafs.FileType.File
                   and any(fnmatch.fnmatch(Path(f.path).name, p) for p in patterns))
    if is_uri(text):  # filesystem paths back to URIs (file:///x and s3://bucket/x alike)
        scheme = text.split("://", 1)[0]
        return [f"{scheme}://{n}" for n in names]
    return names
