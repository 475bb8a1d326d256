"""Where and how a run computes: device, precision and memory format, chosen once from the config and the hardware.

Training and the cost stage both ask this module, so the precision a run is priced at is the one it trains at.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from data_schemas.training import TrainConfig


def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 natively (AVX512-BF16 or AMX), so bf16 autocast pays off.

    oneDNN's own answer is asked first, since it is what autocast dispatches to; /proc/cpuinfo is the fallback
    for builds that do not expose it.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older or unusual builds
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        flags = ""
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass(frozen=True)
class Runtime:
    """The resolved runtime of one run.

    Args:
        device: the torch device.
        precision: "fp32", "bf16" or "fp16" (autocast dtype; weights stay fp32).
        channels_last: whether model and batches use the channels-last memory format.
        num_threads: torch's CPU thread count when the runtime was chosen.
    """

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    num_threads: int

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def threads(self):
        """torch_threads(num_threads): the runtime's thread count inside the block only."""
        return torch_threads(self.num_threads)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's CPU thread count set to `count` inside the block and put back after it, so that a runtime chosen for
    one model (a package's measurement or prediction) does not change what the rest of the process runs with."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def choose_runtime(config: TrainConfig) -> Runtime:
    """Device, precision and memory format from the config's "auto" choices and the hardware."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise ValueError("device 'cuda' was requested but no CUDA device is available.")
    device = torch.device("cuda" if (config.device == "cuda" or (config.device == "auto" and cuda)) else "cpu")
    precision = config.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision 'fp16' is for GPUs; use bf16 or fp32 on a CPU.")
    channels_last = config.channels_last == "on" or (
        config.channels_last == "auto" and (device.type == "cuda" or precision == "bf16")
    )
    return Runtime(device, precision, channels_last, torch.get_num_threads())

