"""Paths memrecall reads and writes: local or mounted filesystems, not URLs."""

from __future__ import annotations

import os


def local_path(path: str | os.PathLike, what: str = "path") -> str:
  """`path`, refused if it is a URL (`gs://...`): memrecall writes metrics, rows and assets
  with plain file I/O, which would put a URL's files in a local directory named `gs:`, lost
  with the VM.  Mount the bucket on every host (gcsfuse, Filestore) and give the mount."""
  path = os.fspath(path)
  if "://" in path:
    raise ValueError(f"{what} {path} is a URL: memrecall reads and writes local or mounted "
                     "paths; mount the bucket on every host (e.g. gcsfuse) and pass the mount's "
                     "path")
  return path
