"""Paths that may be URIs (gs://...), and files that readers never see half-written."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import tempfile
from typing import BinaryIO, Callable

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
  """True for a URI such as `gs://bucket/run` (a cloud path, not a local file)."""
  return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `etils.epath.Path`: URIs as they are, local paths absolute.

  `pathlib.Path('gs://b/run').resolve()` would give the local `<cwd>/gs:/b/run`;
  epath (what orbax and tfds use) reads and writes the bucket instead.
  """
  if is_uri(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
  """Writes `path` through `write(file)` into a temporary file, then renames it.

  A reader (or a run killed mid-write) sees the old file or the new one, never
  a partial one; on an error the temporary file is removed and `path` is left
  as it was. The parent directory is created if missing.

  On a URI (`is_uri`) the bytes are uploaded as one object, which object
  stores make visible only once complete.

  Args:
    path: the file to (re)write.
    write: called once with the temporary file, opened for binary writing.
  """
  if is_uri(path):
    buffer = io.BytesIO()
    write(buffer)
    path = epath.Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
