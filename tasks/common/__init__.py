"""What every stage shares: the runtime (device, threads, precision) and progress reporting."""

from tasks.common.progress import progress
from tasks.common.runtime import Runtime, choose_runtime, cpu_has_fast_bf16

__all__ = ["Runtime", "choose_runtime", "cpu_has_fast_bf16", "progress"]
