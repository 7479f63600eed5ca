"""Files that readers never see half-written."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
  """Writes `path` through `write(file)` into a temporary file, then renames it.

  A reader (or a run killed mid-write) sees the old file or the new one, never
  a partial one; on an error the temporary file is removed and `path` is left
  as it was. The parent directory is created if missing.

  Args:
    path: the file to (re)write.
    write: called once with the temporary file, opened for binary writing.
  """
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
