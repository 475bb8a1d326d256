"""How a `ctcompare` command ends: its exit codes, the refused-argument error, and one sentence for a full or
read-only disk instead of a traceback."""

from __future__ import annotations

import errno
import logging

from tasks.common.paths import UNWRITABLE_ERRNOS

EXIT_OK = 0
EXIT_FAILED = 1  # the work failed: refused input found during the work, an unwritable disk, no arm completed
EXIT_USAGE = 2  # a bad argument, refused before any work starts
EXIT_PARTIAL = 3  # a comparison where some requested arms did not complete
EXIT_NO_ARM = EXIT_FAILED  # a comparison where no requested arm completed
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class UsageError(Exception):
    """A bad argument: reported as one sentence before any work starts."""


# An OSError that means "this folder cannot take more bytes" -> what the user can do; reported as one sentence.
UNWRITABLE_ADVICE: dict[int, str] = {
    errno.ENOSPC: "the disk holding {path} is full; free space on it and re-run: finished work is kept.",
    errno.EDQUOT: "the disk quota for {path} is used up; free space or raise the quota and re-run: "
                  "finished work is kept.",
    errno.EROFS: "{path} is on a read-only file system; give an output folder on a writable disk and re-run.",
    errno.EACCES: "{path} cannot be written (permission denied); give a writable output folder or fix its "
                  "permissions and re-run.",
    errno.EPERM: "{path} cannot be written (operation not permitted); give a writable output folder and re-run.",
    errno.EFBIG: "a file in {path} would exceed the file-size limit; give an output folder on another file system "
                 "and re-run: finished work is kept.",
}
if set(UNWRITABLE_ADVICE) != UNWRITABLE_ERRNOS:  # pragma: no cover - an errno added on one side only
    raise RuntimeError("UNWRITABLE_ADVICE must give advice for exactly tasks.common.paths.UNWRITABLE_ERRNOS")


def unwritable_cause(error: BaseException) -> OSError | None:
    """The disk-full, quota, read-only or permission OSError in error or what it was raised from or during
    (__cause__, __context__: Prefect re-raises a task's exception, tasks wrap theirs); None when there is none."""
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in UNWRITABLE_ADVICE:
            return current
        pending += [current.__cause__, current.__context__]
    return None


def unwritable_sentence(error: OSError) -> str:
    """One sentence naming the path an unwritable-output error is about and what to do."""
    path = error.filename if error.filename is not None else "the output folder"
    return UNWRITABLE_ADVICE[error.errno].format(path=path)


class _NoTracebackForUnwritable(logging.Filter):
    """Drops the traceback from Prefect's log lines about a full or read-only disk: its one-line message stays, and
    the command ends with the one sentence that says what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and unwritable_cause(exc) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def quiet_unwritable_tracebacks() -> None:
    """Install _NoTracebackForUnwritable on the loggers of Prefect's flow and task runs (console and API alike)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_NoTracebackForUnwritable())
