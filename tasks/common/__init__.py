"""What every stage shares: the runtime (device, threads, precision), progress reporting and output folders.

The runtime pulls in torch, so it is imported on first use: the command line checks folders without it.
"""

from __future__ import annotations

from typing import Any

from tasks.common.paths import UNWRITABLE_ERRNOS, check_folder_writable, nearest_existing, refuse_non_folder
from tasks.common.progress import progress

_RUNTIME_NAMES = ("Runtime", "choose_runtime", "cpu_has_fast_bf16")

__all__ = ["UNWRITABLE_ERRNOS", "check_folder_writable", "nearest_existing", "progress", "refuse_non_folder",
           *_RUNTIME_NAMES]


def __getattr__(name: str) -> Any:
    """Runtime, choose_runtime and cpu_has_fast_bf16, imported from tasks.common.runtime when first asked for."""
    if name in _RUNTIME_NAMES:
        from tasks.common import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'tasks.common' has no attribute {name!r}")
