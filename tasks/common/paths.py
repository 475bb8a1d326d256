"""Output folders: whether one can be written, checked before any work and without leaving anything behind."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# OSError numbers that mean "this folder cannot take more bytes": a full disk, a used-up quota, a read-only file
# system, no permission, a file over the size limit.
UNWRITABLE_ERRNOS: frozenset[int] = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)


def cache_folder() -> Path:
    """Where what is measured or checked once per machine is kept (calibration, model counts, weights-file checks,
    the runtime probe): $CTCOMPARE_CACHE_DIR, else .ctcompare/ in the working folder. Losing it costs a re-measure."""
    base = os.environ.get("CTCOMPARE_CACHE_DIR")
    return Path(base) if base else Path.cwd() / ".ctcompare"


def nearest_existing(path: Path) -> Path:
    """path itself when it exists, else its nearest existing parent (the folder a mkdir would write into)."""
    return path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))


def check_folder_writable(folder: Path) -> Path:
    """The folder a new `folder` would be made in (itself once it exists), after checking that it can take a file;
    OSError when it cannot. Creates nothing: the probe file is anonymous and gone when closed."""
    parent = nearest_existing(folder)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(parent))
    tempfile.TemporaryFile(dir=parent).close()  # the real test: read-only mounts, immutable folders, root
    return parent


def refuse_non_folder(path: Path, name: str, advice: str = "") -> None:
    """ValueError '<name> <path> exists and is not a folder.' (with advice after a semicolon) when path is a file."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} exists and is not a folder{'; ' + advice if advice else ''}.")
