"""What stops an ingest: one sentence for the user, never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tasks.common.paths import UNWRITABLE_ERRNOS


class IngestError(ValueError):
    """Ingest cannot go on (bad labels file, nothing ingested): one sentence for the user."""


class OutputWriteError(IngestError):
    """The dataset folder cannot be written (disk full, read-only, busy): one sentence naming the folder."""


@contextlib.contextmanager
def writing_into(folder: str | Path, what: str) -> Iterator[None]:
    """Turn an OSError that means the folder takes no more (disk full, read-only, no permission) into an
    OutputWriteError: one sentence naming `what` was being written and the folder."""
    try:
        yield
    except OSError as error:
        if error.errno not in UNWRITABLE_ERRNOS:
            raise
        raise OutputWriteError(f"cannot write {what} into {folder} ({error.strerror or error}).") from None
