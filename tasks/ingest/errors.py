"""What stops an ingest: one sentence for the user, never a traceback."""

from __future__ import annotations


class IngestError(ValueError):
    """Ingest cannot go on (bad labels file, nothing ingested): one sentence for the user."""


class OutputWriteError(IngestError):
    """The dataset folder cannot be written (disk full, read-only, busy): one sentence naming the folder."""
