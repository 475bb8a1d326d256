"""Reading and writing schema files, shared by every stage and the report: atomic writes, validated JSON and CSV,
content hashes. Standard library and pydantic only, so that `reports` can use it too."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Iterable, TypeVar

from pydantic import BaseModel

ModelT = TypeVar("ModelT", bound=BaseModel)


TEMP_SUFFIX = ".tmp"
# .NAME.RANDOM.PID@HOST.tmp: unique per call, and a later run can tell whether the writer still lives.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.(?P<pid>\d+)@(?P<host>[^@/]+)\.tmp$")


def printable_path(path: str | os.PathLike[str]) -> str:
    """A path as text that can be printed, logged and written into JSON or CSV: bytes that are not UTF-8 (held as
    surrogates since os.listdir decoded them) as \\xNN, other unprintable characters as Python escapes. A printable
    UTF-8 path comes back unchanged."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def path_from_printable(text: str) -> Path:
    """The path that printable_path showed as `text`: text itself when it names something or holds no escape,
    else with its escapes turned back into the bytes they stand for."""
    if "\\" not in text or os.path.lexists(text):
        return Path(text)
    try:
        return Path(os.fsdecode(codecs.escape_decode(text.encode("utf-8"))[0]))
    except ValueError:
        return Path(text)


def temp_path_for(path: Path) -> Path:
    """A temp file name beside `path`, unique per host, process and call: .NAME.RANDOM.PID@HOST.tmp."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.{os.getpid()}@{socket.gethostname()}{TEMP_SUFFIX}")


def _writer_is_gone(name: str) -> bool:
    """True when a temp file's writer, named in it, was a process of this host that no longer runs."""
    match = _TEMP_NAME.match(name)
    if match is None or match["host"] != socket.gethostname():
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def remove_stale_temp_files(folder: Path, *, recursive: bool = False, any_writer: bool = False) -> int:
    """Delete temp files left by killed writers (their process is gone); return how many were removed.

    any_writer=True also removes temp files of unknown or live writers: only for folders written under a lock
    that the caller holds, where no other writer can be at work.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    candidates = folder.rglob(f".*{TEMP_SUFFIX}") if recursive else folder.glob(f".*{TEMP_SUFFIX}")
    removed = 0
    for candidate in candidates:
        match = _TEMP_NAME.match(candidate.name)
        if match and match["host"] == socket.gethostname() and int(match["pid"]) == os.getpid():
            continue  # this process's own write in progress
        if candidate.is_file() and (any_writer or _writer_is_gone(candidate.name)):
            candidate.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True, *, mode: int | None = None) -> None:
    """Write bytes so that readers see the old file or the whole new one, never a half-written file.

    durable=False skips the fsync: for files that are cheap to recreate (caches), where speed matters more.
    mode: permissions of the new file (default: what an ordinary open() gives, 0666 minus the umask); 0o600 for
    private files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # exact, whatever the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """Atomically write UTF-8 text (mode as in atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def write_model_json(path: Path, model: BaseModel) -> None:
    """Atomically write a pydantic model as indented JSON."""
    atomic_write_text(path, model.model_dump_json(indent=2) + "\n")


def read_model_json(path: Path, model_type: type[ModelT]) -> ModelT:
    """Read and validate a JSON file against a pydantic model."""
    return model_type.model_validate_json(Path(path).read_text(encoding="utf-8"))


def write_models_csv(
    path: Path, rows: Iterable[BaseModel], model_type: type[BaseModel], *, mode: int | None = None
) -> None:
    """Atomically write pydantic rows as CSV, columns in the model's field order (mode as in atomic_write_bytes)."""
    fields = list(model_type.model_fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        data = row.model_dump(mode="json")
        writer.writerow({k: ("" if data[k] is None else data[k]) for k in fields})
    atomic_write_text(path, buffer.getvalue(), mode=mode)


def read_models_csv(path: Path, model_type: type[ModelT]) -> list[ModelT]:
    """Read a CSV written by write_models_csv and validate each row (empty cells of optional fields become None)."""
    rows: list[ModelT] = []
    with open(path, newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            cleaned = {}
            for key, value in raw.items():
                field = model_type.model_fields.get(key)
                if value == "" and field is not None and not field.is_required() and field.default is None:
                    cleaned[key] = None
                else:
                    cleaned[key] = value
            rows.append(model_type.model_validate(cleaned))
    return rows


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: object) -> str:
    """Hex SHA-256 of a JSON-serialisable object in canonical form (sorted keys): a config's identity."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()
