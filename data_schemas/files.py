"""Reading and writing schema files, shared by every stage and the report: atomic writes, validated JSON and CSV,
content hashes. Standard library and pydantic only, so that `reports` can use it too."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, TypeVar

from pydantic import BaseModel

ModelT = TypeVar("ModelT", bound=BaseModel)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write bytes so that readers see the old file or the whole new one, never a half-written file.

    durable=False skips the fsync: for files that are cheap to recreate (caches), where speed matters more.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions an ordinary open() would (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_model_json(path: Path, model: BaseModel) -> None:
    """Atomically write a pydantic model as indented JSON."""
    atomic_write_text(path, model.model_dump_json(indent=2) + "\n")


def read_model_json(path: Path, model_type: type[ModelT]) -> ModelT:
    """Read and validate a JSON file against a pydantic model."""
    return model_type.model_validate_json(Path(path).read_text(encoding="utf-8"))


def write_models_csv(path: Path, rows: Iterable[BaseModel], model_type: type[BaseModel]) -> None:
    """Atomically write pydantic rows as CSV, columns in the model's field order."""
    fields = list(model_type.model_fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        data = row.model_dump(mode="json")
        writer.writerow({k: ("" if data[k] is None else data[k]) for k in fields})
    atomic_write_text(path, buffer.getvalue())


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
