"""Discovery: every file under a source folder, whatever its extension, with its content hash.

Folder links are followed once; a loop, an unreadable entry or a non-regular file is quarantined with a reason.
"""

from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data_schemas.dataset import QuarantineReason, QuarantineRow
from data_schemas.files import printable_path, sha256_file

# Below this many files, hashing stays on the calling thread (starting threads would cost more than it saves).
HASH_THREADS_MIN_FILES = 32


@dataclass(frozen=True)
class SourceFile:
    """A discovered file: absolute path (as the file system names it: bytes that are not UTF-8 held as surrogates),
    path relative to the source folder (POSIX, printable_path: what records, CSV files and messages show) and
    content hash."""

    path: str
    relative_path: str
    content_sha256: str


def _relative(path: Path, root: Path) -> str:
    """The path relative to root, as printable text (a name that is not UTF-8 is shown with \\xNN escapes)."""
    return printable_path(path.relative_to(root).as_posix())


def discover_files(src_dir: Path) -> tuple[list[SourceFile], list[QuarantineRow]]:
    """Walk src_dir recursively (following folder links once), whatever the extensions, and hash each file."""
    candidates: list[tuple[Path, str]] = []
    rejected: list[QuarantineRow] = []

    def reject(relative: str, reason: QuarantineReason, text: str) -> None:
        rejected.append(QuarantineRow(relative_path=relative, reason=reason, message=f"{relative}: {text}"))

    root_stat = src_dir.stat()
    visited: set[tuple[int, int]] = {(root_stat.st_dev, root_stat.st_ino)}
    stack = [src_dir]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            reject(_relative(directory, src_dir) or ".", QuarantineReason.UNREADABLE, "folder cannot be listed "
                                                                                      f"({error.strerror})")
            continue
        for entry in entries:
            path = Path(entry.path)
            relative = _relative(path, src_dir)
            try:
                info = os.stat(path)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    reject(relative, QuarantineReason.SYMLINK_LOOP, "symbolic link loop")
                else:
                    reject(relative, QuarantineReason.UNREADABLE, f"cannot be read ({error.strerror})")
                continue
            if stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) in visited:
                    reject(relative, QuarantineReason.SYMLINK_LOOP, "link to a folder already visited (symbolic link "
                                                                    "loop)")
                else:
                    visited.add((info.st_dev, info.st_ino))
                    stack.append(path)
                continue
            if not stat.S_ISREG(info.st_mode):
                reject(relative, QuarantineReason.UNREADABLE, "not a regular file (pipe, socket or device)")
                continue
            candidates.append((path, relative))
    files: list[SourceFile] = []
    for (path, relative), content_sha256 in zip(candidates, _hash_files([path for path, _ in candidates])):
        if isinstance(content_sha256, OSError):
            reject(relative, QuarantineReason.UNREADABLE, f"cannot be read ({content_sha256.strerror})")
        else:
            files.append(SourceFile(path=str(path), relative_path=relative, content_sha256=content_sha256))
    files.sort(key=lambda item: item.relative_path)
    return files, rejected


def _hash_or_error(path: Path) -> str | OSError:
    try:
        return sha256_file(path)
    except OSError as error:
        return error


def _hash_files(paths: list[Path]) -> list[str | OSError]:
    """SHA-256 of each file, in order, on one thread per core: reading and hashlib release the GIL, so the threads
    hash in parallel without a process pool (an unreadable file gives its OSError in its place)."""
    if len(paths) < HASH_THREADS_MIN_FILES:
        return [_hash_or_error(path) for path in paths]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="ctcompare-hash") as threads:
        return list(threads.map(_hash_or_error, paths))
