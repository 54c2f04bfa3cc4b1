"""Run folders on any storage: local paths and ``s3://`` / ``gs://`` URIs alike.

Ray Tune reaches a run folder through pyarrow filesystems; these helpers do the same,
so one code path serves a laptop's folder and a bucket. Nothing here imports Ray.
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs

from covid_tune.errors import UserError


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a local path or a URI; a URI's query (``?endpoint_override=``
    and the like) stays at the end."""
    base, query = base.split("?", 1) if is_uri(base) and "?" in base else (base, None)
    joined = "/".join([base.rstrip("/"), *names])
    return f"{joined}?{query}" if query is not None else joined


def shown(path: str) -> str:
    """A path or URI as messages show it: a URI without its query and credentials
    (``s3://key:secret@bucket/runs?endpoint_override=...`` is ``s3://bucket/runs``)."""
    if not is_uri(path):
        return path
    scheme, rest = path.split("://", 1)
    rest = rest.split("?", 1)[0]
    head, slash, tail = rest.partition("/")
    return f"{scheme}://{head.rsplit('@', 1)[-1]}{slash}{tail}"


def open_path(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path inside it."""
    try:
        return pyarrow.fs.FileSystem.from_uri(path if is_uri(path) else os.path.abspath(path))
    except (pyarrow.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: cannot open this storage path ({exc})") from None


def exists(path: str) -> bool:
    return exists_on(*open_path(path))


def exists_on(fs: pyarrow.fs.FileSystem, fs_path: str) -> bool:
    return fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    fs, fs_path = open_path(path)
    with fs.open_input_stream(fs_path) as stream:
        return stream.readall()


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file so that readers see the old or the new one, never a part.

    A local file is written next to its target and renamed over it; an object store
    replaces an object in one PUT.
    """
    write_on(*open_path(path), data)


def write_on(fs: pyarrow.fs.FileSystem, fs_path: str, data: bytes) -> None:
    """``write_bytes`` on an open filesystem."""
    fs.create_dir(os.path.dirname(fs_path), recursive=True)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        partial = f"{fs_path}.{uuid.uuid4().hex[:8]}.partial"
        try:
            with open(partial, "wb") as out:
                out.write(data)
            os.replace(partial, fs_path)
        except BaseException:
            if os.path.exists(partial):
                os.unlink(partial)  # a full disk leaves neither a part nor a changed file
            raise
        return
    with fs.open_output_stream(fs_path) as stream:
        stream.write(data)


def remove(path: str) -> None:
    """Delete one file."""
    fs, fs_path = open_path(path)
    fs.delete_file(fs_path)


def list_dirs(path: str) -> list[str]:
    """Names of the folders directly inside ``path``."""
    fs, fs_path = open_path(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(fs_path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)


def list_files(path: str) -> list[str]:
    """Names of the files directly inside ``path``."""
    fs, fs_path = open_path(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(fs_path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.File)


def move_dir(source: str, destination: str) -> None:
    """Move a folder within one storage path (copy then delete on object stores)."""
    fs, source_path = open_path(source)
    move_on(fs, source_path, open_path(destination)[1])


def move_on(fs: pyarrow.fs.FileSystem, source_path: str, destination_path: str) -> None:
    """``move_dir`` on an open filesystem."""
    fs.create_dir(os.path.dirname(destination_path), recursive=True)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        os.replace(source_path, destination_path)
        return
    pyarrow.fs.copy_files(source_path, destination_path, source_filesystem=fs,
                          destination_filesystem=fs)
    fs.delete_dir(source_path)
