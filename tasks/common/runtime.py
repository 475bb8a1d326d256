"""Where and how a run computes: device, precision and memory format, chosen once from the config and the hardware.

Training and the cost stage both ask this module, so the precision a run is priced at is the one it trains at.

What the hardware offers (a CUDA device and its bf16, the CPU's fast bf16) is asked of torch once per machine and
torch installation and kept in the cache folder (runtime_probe.json, tasks.common.paths.cache_folder), keyed on
torch's version and location, the CPU's model and flags, the GPU device nodes, the NVIDIA driver and the variables
that choose visible GPUs: any change asks torch again. So a re-run that finds its runs completed decides so without
importing torch (planned_runtime), with the answers torch gave.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pydantic import ValidationError

from data_schemas.files import read_model_json, sha256_json, write_model_json
from data_schemas.training import HardwareProbe, TrainConfig
from tasks.common.paths import cache_folder

if TYPE_CHECKING:
    import torch

GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def _cpu_description() -> str:
    """The first processor's model name and flags from /proc/cpuinfo ('' where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return platform.processor()
    first = text.split("\n\n", 1)[0]
    return "\n".join(line for line in first.splitlines() if line.split(":")[0].strip() in ("model name", "flags",
                                                                                           "Features"))


def _probe_key() -> str:
    """What torch's answers depend on: torch's installation, the CPU, the GPU device nodes and driver, and the
    variables that hide or show GPUs."""
    spec = importlib.util.find_spec("torch")
    try:
        nodes = sorted(name for name in os.listdir("/dev") if name.startswith(("nvidia", "kfd", "dxg")))
    except OSError:
        nodes = []
    try:
        driver = Path("/proc/driver/nvidia/version").read_text(errors="ignore")
    except OSError:
        driver = ""
    return sha256_json({"torch": metadata.version("torch"), "where": spec.origin if spec else None,
                        "cpu": _cpu_description(), "host": platform.node(), "devices": nodes, "driver": driver,
                        "variables": {name: os.environ.get(name) for name in GPU_VARIABLES}})


def _ask_torch(key: str) -> HardwareProbe:
    """torch's answers (this imports torch)."""
    import torch

    fast_bf16 = None
    try:  # oneDNN's own answer first: it is what CPU autocast dispatches to
        fast_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older or unusual builds: /proc/cpuinfo below
        pass
    if fast_bf16 is None:
        flags = _cpu_description()
        fast_bf16 = "amx_bf16" in flags or "avx512_bf16" in flags
    cuda = torch.cuda.is_available()
    return HardwareProbe(key=key, cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
                         cpu_fast_bf16=fast_bf16)


@functools.lru_cache(maxsize=1)
def hardware_probe() -> HardwareProbe:
    """This machine's hardware as torch sees it: from runtime_probe.json when its key holds, else asked of torch and
    recorded (a cache folder that cannot be written only costs the question next time)."""
    path, key = cache_folder() / "runtime_probe.json", _probe_key()
    try:
        recorded = read_model_json(path, HardwareProbe)
        if recorded.key == key:
            return recorded
    except (OSError, ValueError, ValidationError):
        pass
    probe = _ask_torch(key)
    try:
        write_model_json(path, probe)
    except OSError:
        pass
    return probe


def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 natively, so bf16 autocast pays off: oneDNN's own answer (what autocast
    dispatches to), else AVX512-BF16 or AMX in /proc/cpuinfo for builds that do not expose it (hardware_probe)."""
    return hardware_probe().cpu_fast_bf16


@dataclass(frozen=True)
class RuntimeChoice:
    """What choose_runtime picks, in plain values: device type ("cpu" or "cuda"), precision, channels-last."""

    device: str
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool


def planned_runtime(config: TrainConfig) -> RuntimeChoice:
    """Device, precision and memory format from the config's "auto" choices and the hardware (hardware_probe);
    ValueError (one sentence) for a device or precision this machine cannot give."""
    hardware = hardware_probe()
    if config.device == "cuda" and not hardware.cuda:
        raise ValueError("device 'cuda' was requested but no CUDA device is available.")
    device = "cuda" if (config.device == "cuda" or (config.device == "auto" and hardware.cuda)) else "cpu"
    precision = config.precision
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if hardware.cuda_bf16 else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise ValueError("precision 'fp16' is for GPUs; use bf16 or fp32 on a CPU.")
    return RuntimeChoice(device, precision, uses_channels_last(config.channels_last, device, precision))


def uses_channels_last(setting: str, device: str, precision: str) -> bool:
    """Whether training runs channels-last: `setting` "on", or "auto" on a GPU or with bf16 autocast (where
    channels-last kernels were measured to gain); fp32 on a CPU keeps torch's default contiguous format."""
    return setting == "on" or (setting == "auto" and (device == "cuda" or precision == "bf16"))


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
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> Any:
        import torch

        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def threads(self):
        """torch_threads(num_threads): the runtime's thread count inside the block only."""
        return torch_threads(self.num_threads)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's CPU thread count set to `count` inside the block and put back after it, so that a runtime chosen for
    one model (a package's measurement or prediction) does not change what the rest of the process runs with."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def choose_runtime(config: TrainConfig) -> Runtime:
    """planned_runtime as torch objects, with torch's CPU threads set from the config (when it sets them)."""
    import torch

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    choice = planned_runtime(config)
    return Runtime(torch.device(choice.device), choice.precision, choice.channels_last, torch.get_num_threads())
