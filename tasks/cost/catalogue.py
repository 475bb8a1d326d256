"""The device catalogue (data_schemas/devices.json) and this machine's place in it: precision, RAM, calibration.

time = FLOPs / (peak FLOP/s at the precision x utilisation) + overhead, nanoGPT estimate_mfu inverted, with peak and
utilisation per device from the catalogue; for this machine both, and the overhead, come from a short calibration
(tasks.cost.calibration) of ResNet-50 training: other models are priced at ResNet-50's share of peak, an assumption
the report's notes state.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from data_schemas.cost import THIS_MACHINE, Calibration, DeviceCatalogue, DeviceRate, DeviceSpec
from data_schemas.files import read_model_json

# Precisions tried in order when a device lacks the requested one (bf16 -> fp16 tensor cores -> fp32).
_PRECISION_FALLBACK: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "tf32": ("tf32", "fp32"),
    "fp16": ("fp16", "bf16", "fp32"),
    "bf16": ("bf16", "fp16", "fp32"),
}


def default_catalogue_path() -> Path:
    """data_schemas/devices.json, the catalogue shipped with the package."""
    return Path(str(resources.files("data_schemas").joinpath("devices.json")))


def load_catalogue(path: Path | None = None) -> DeviceCatalogue:
    """Read and validate the device catalogue; a broken entry raises ValueError naming the file and the problem."""
    from pydantic import ValidationError

    path = Path(path or default_catalogue_path())
    try:
        return read_model_json(path, DeviceCatalogue)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in error.errors(include_url=False)
        )
        raise ValueError(f"device catalogue {path} is invalid: {problems}") from None


def resolve_precision(device: DeviceSpec, requested: str) -> str:
    """The precision a device runs a `requested` job at: bf16 -> fp16 tensor cores -> fp32; tf32 -> fp32."""
    for precision in _PRECISION_FALLBACK[requested]:
        if precision in device.rates:
            return precision
    return "fp32"


def estimate_seconds(flops: float, device: DeviceSpec, precision: str) -> float:
    """seconds = FLOPs / (peak FLOP/s at the resolved precision x utilisation)  (nanoGPT estimate_mfu, inverted)."""
    rate = device.rates[resolve_precision(device, precision)]
    return flops / rate.effective_flops_per_second


def ram_bytes() -> int:
    """This machine's RAM: the memory this-machine trains in."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def this_machine_precision(requested: str) -> str:
    """bf16/fp16 requests run as bf16 autocast when the CPU supports it (tasks.common.runtime), else fp32; no CPU
    tf32."""
    from tasks.common.runtime import cpu_has_fast_bf16

    return "bf16" if requested in ("bf16", "fp16") and cpu_has_fast_bf16() else "fp32"


def price_this_machine(catalogue: DeviceCatalogue, calibration: Calibration | None) -> DeviceCatalogue:
    """Catalogue with this-machine's memory set to its RAM, bf16 dropped if unsupported, and the calibration applied.

    With a calibration, this-machine's rate at the calibrated precision becomes peak = the matmul rate and
    utilisation = achieved training FLOP/s / peak, so that its effective rate is the measured training rate.
    """
    from tasks.common.runtime import cpu_has_fast_bf16

    devices = []
    for device in catalogue.devices:
        if device.name == THIS_MACHINE:
            rates = dict(device.rates)
            source = device.source
            if not cpu_has_fast_bf16():
                rates.pop("bf16", None)
                rates.pop("fp16", None)
            if calibration is not None:
                rates[calibration.precision] = DeviceRate(
                    peak_tflops=calibration.matmul_flops_per_second / 1e12,
                    utilisation=min(1.0, calibration.utilisation),
                )
                source = (
                    f"calibrated {calibration.measured_at}: {calibration.precision} matmul "
                    f"{calibration.matmul_flops_per_second / 1e9:.0f} GFLOP/s, ResNet-50 training "
                    f"{calibration.train_images_per_second:.1f} img/s at {calibration.image_size} px "
                    f"({calibration.cpu_model}, {calibration.threads} threads)"
                )
            device = device.model_copy(update={"rates": rates, "memory_gb": ram_bytes() / 1e9, "source": source})
        devices.append(device)
    return catalogue.model_copy(update={"devices": devices})
