"""A model package as a MONAI bundle (RUN_DIR/bundle/), the MONAI ecosystem's way to share a model.

    configs/metadata.json   MONAI's metadata schema (version, changelog, monai/pytorch/numpy versions, required
                            packages, task, description, authors, copyright, network_data_format with inputs and
                            outputs), plus the recipe: intensity window, sizes, normalisation, threshold
    configs/inference.json  runs the model on a folder of DICOM files with MONAI transforms and writes
                            OUTPUT_DIR/probabilities.csv (file, prob_positive), one row per file
    models/model.pt         the package's own model.pt, hard-linked (copied where the file system cannot link):
                            the weights under "state_dict" (keys as in ctcompare's model), the package's metadata
                            under "metadata"; monai.bundle.load(..., key_in_ckpt="state_dict") reads the weights
    models/model.ts         the same network as TorchScript, softmax (or the linear probe) included: inference needs
                            no ctcompare code
    docs/README.md          the package's model card
    LICENSE                 the licence of the code and of the weights

The bundle is written again only when the package or its model card changed (the key in metadata.json's
"ctcompare_inputs_sha256", tasks.common.reuse).

Run it from the bundle folder:
    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \
        --dataset_dir DICOM_DIR --output_dir OUT_DIR

The transforms reproduce ctcompare's conversion step for step (tasks.ingest.preprocess, the float16 the dataset
stores, tasks.training.models.resize_images, the normalisation), so the probabilities agree with `ctcompare
predict` on the same files. Each file is read as one frame (multi-frame files: use `ctcompare predict`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from data_schemas.files import atomic_write_text
from data_schemas.package import MODEL_CARD_FILE, ModelPackageMeta
from tasks.common.reuse import file_sha256, inputs_key
from tasks.ingest.preprocess import window_level_width
from tasks.packaging.package import LoadedPackage, architecture_key, load_package, package_file

if TYPE_CHECKING:
    from tasks.packaging.background import BackgroundWrites

BUNDLE_DIR = "bundle"  # RUN_DIR/bundle, beside RUN_DIR/package
BUNDLE_CSV = "probabilities.csv"
BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
                "docs/README.md", "LICENSE")
# torch deprecates TorchScript in favour of torch.export, while a MONAI bundle's network is TorchScript
# (models/model.ts, which configs/inference.json loads with torch.jit.load): the warnings would be printed on every run.
TORCHSCRIPT_WARNINGS = r"`torch\.jit\.(trace|trace_method|save)` is deprecated"
INPUTS_FIELD = "ctcompare_inputs_sha256"  # in configs/metadata.json: what the bundle was made from
LICENSE_TEXT = "Apache-2.0"
METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
# The fields MONAI's metadata schema requires (meta_schema_20240725.json "required").
REQUIRED_METADATA = ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                     "required_packages_version", "task", "description", "authors", "copyright",
                     "network_data_format")


@functools.lru_cache(maxsize=None)
def _version(name: str) -> str:
    """An installed distribution's version (looked up once per process: each lookup scans the installed ones)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class ProbabilityNetwork(nn.Module):
    """The package's network with its probability step: (N, 1, S, S) normalised images -> (N, 2) class
    probabilities (softmax of the logits, or the linear probe's standardiser and logistic regression)."""

    def __init__(self, network: nn.Module, meta: ModelPackageMeta) -> None:
        super().__init__()
        self.network = network
        probe = meta.linear_probe
        self.probe = probe is not None
        if probe is not None:
            self.register_buffer("feature_mean", torch.tensor(probe.feature_mean, dtype=torch.float64))
            self.register_buffer("feature_scale", torch.tensor(probe.feature_scale, dtype=torch.float64))
            self.register_buffer("coef", torch.tensor(probe.coef, dtype=torch.float64))
            self.intercept = float(probe.intercept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.network(x).float()
        if not self.probe:
            return torch.softmax(outputs, dim=1)
        z = (outputs.double() - self.feature_mean) / self.feature_scale
        positive = torch.sigmoid(z @ self.coef + self.intercept).float()[:, None]
        return torch.cat([1.0 - positive, positive], dim=1)


def bundle_metadata(meta: ModelPackageMeta, package_sha256: str) -> dict[str, Any]:
    """configs/metadata.json: MONAI's required fields, the network's inputs and outputs, and the recipe."""
    recipe, point = meta.recipe, meta.operating_point
    level, width = window_level_width(recipe.window)
    size = recipe.train_image_size
    created = meta.created_at[:10]
    return {
        "schema": METADATA_SCHEMA,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"ctcompare package {package_sha256[:16]} of arm {meta.arm}, written {created}"},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"pydicom": _version("pydicom"), "ctcompare": _version("ctcompare")},
        "name": f"ctcompare {meta.arm}",
        "task": f"CT slice classification: {meta.classes[0]} vs {meta.positive_label}",
        "description": (
            f"{meta.arm} arm trained by ctcompare on {meta.training_data.n_patients} patients; outputs the probability "
            f"of '{meta.positive_label}' per image. Research use only, not for diagnosis."
        ),
        "authors": "ctcompare",
        "copyright": f"Copyright {created[:4]} the model's owner; ctcompare is Apache-2.0",
        "data_source": "the owner's CT cohort (see docs/README.md); no image is shipped",
        "data_type": "dicom",
        "image_classes": "one channel grey image in [0, 1] after the CT window, normalised",
        "label_classes": f"0: {meta.classes[0]}, 1: {meta.positive_label}",
        "pred_classes": f"probabilities of {meta.classes[0]} and {meta.positive_label}",
        "eval_metrics": {name: value.value for name, value in (meta.metrics.patient if meta.metrics else {}).items()
                         if value.value is not None},
        "intended_use": "research; not for diagnosis",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                "spatial_shape": [size, size], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {"0": "CT window to [0, 1], normalised with the mean and std below"},
            }},
            "outputs": {"pred": {
                "type": "probabilities", "format": "classes", "num_channels": 2, "spatial_shape": [2],
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {"0": meta.classes[0], "1": meta.positive_label},
            }},
        },
        "preprocessing": {
            "intensity_window_hu": {"name": recipe.window.name, "level": level, "width": width},
            "ingest_size": recipe.ingest_image_size, "train_size": size,
            "normalisation": {"mean": recipe.normalisation_mean, "std": recipe.normalisation_std},
            "value_mapping": recipe.value_mapping, "padding": recipe.padding, "interpolation": recipe.interpolation,
        },
        "threshold": {"value": point.threshold, "rule": point.rule, "aggregation": point.aggregation,
                      "positive_label": meta.positive_label},
    }


def _resize(size: int) -> str:
    """The expression of ctcompare's resize (antialiased bicubic, clamped), skipped at the same size."""
    return (f"$lambda x: x if tuple(x.shape[-2:]) == ({size}, {size}) else torch.nn.functional.interpolate("
            f"torch.as_tensor(x)[None].float(), size=({size}, {size}), mode='bicubic', antialias=True, "
            "align_corners=False)[0].clamp(0, 1)")


def inference_config(meta: ModelPackageMeta) -> dict[str, Any]:
    """configs/inference.json: the folder's files -> ctcompare's conversion as MONAI transforms -> the network."""
    recipe = meta.recipe
    level, width = window_level_width(recipe.window)
    low = level - width / 2.0
    load = ("$lambda d: (lambda ds: dict(d, image=pydicom.pixels.apply_rescale(ds.pixel_array, ds).astype('float32')"
            "[None], monochrome1=str(ds.PhotometricInterpretation) == 'MONOCHROME1'))(pydicom.dcmread(d['path']))")
    return {
        "imports": ["$import glob", "$import os", "$import pydicom", "$import torch", "$import monai"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/dicom'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "cpu",
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device)",
        "network": "$@network_def.eval()",
        "files": "$sorted(p for p in glob.glob(os.path.join(@dataset_dir, '**', '*'), recursive=True) "
                 "if os.path.isfile(p))",
        "data": "$[{'path': p} for p in @files]",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Lambda", "func": load},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": low + width,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "Lambda", "func": "$lambda d: dict(d, image=1.0 - d['image']) if d['monochrome1'] else d"},
            {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: monai.transforms.SpatialPad("
             "spatial_size=[max(x.shape[-2:])] * 2, method='symmetric', mode='constant')(x)"},
            {"_target_": "Lambdad", "keys": "image", "func": _resize(recipe.ingest_image_size)},
            # the dataset ctcompare trained on stores images as float16
            {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: torch.as_tensor(x).half().float()"},
            {"_target_": "Lambdad", "keys": "image", "func": _resize(recipe.train_image_size)},
            {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": recipe.normalisation_mean,
             "divisor": recipe.normalisation_std},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@data", "transform": "@preprocessing"},
        "predict": ("$lambda image: float(@network(torch.as_tensor(image)[None].float().to(@device))[0, 1]"
                    ".clamp(0, 1))"),
        "rows": "$[(os.path.relpath(item['path'], @dataset_dir), @predict(item['image'])) for item in @dataset]",
        "run": [
            "$os.makedirs(@output_dir, exist_ok=True)",
            (f"$open(os.path.join(@output_dir, '{BUNDLE_CSV}'), 'w').write('file,prob_positive\\n' + "
             "''.join(f'{path},{prob:.8f}\\n' for path, prob in @rows))"),
        ],
    }


def bundle_inputs_key(model_path: Path, package_sha256: str | None = None) -> str:
    """What a bundle is made from: the package's model.pt (package_sha256: its SHA-256 when known), its model card
    (the bundle's README) and the code."""
    card = model_path.parent / MODEL_CARD_FILE
    return inputs_key({"package": package_sha256 or file_sha256(model_path),
                       "card": file_sha256(card) if card.is_file() else None})


def recorded_bundle_inputs(out_dir: Path) -> str | None:
    """The inputs key of the whole bundle in out_dir, or None when there is none or a file is missing."""
    if not all((out_dir / name).is_file() for name in BUNDLE_FILES):
        return None
    try:
        return json.loads((out_dir / "configs" / "metadata.json").read_text()).get(INPUTS_FIELD)
    except (OSError, ValueError, AttributeError):
        return None


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (the weights are stored once), a copy where the file system cannot link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@dataclass(frozen=True)
class TracedNetwork:
    """A package's network as TorchScript: a trace, and the package's weights when the trace is shared with the
    packages of the same network shipped before (SameNetworkWork.traces), which `ready` gives it just before it is
    saved, in the order the bundles are written."""

    trace: torch.jit.ScriptModule
    weights: dict[str, torch.Tensor] | None = None

    def ready(self) -> torch.jit.ScriptModule:
        """The trace with this package's weights: assigned, not copied, so the tensors of the package the trace was
        made from (which it shared) are never written into."""
        if self.weights is not None:
            self.trace.load_state_dict(self.weights, assign=True)
        return self.trace


def traced_network(network: ProbabilityNetwork, meta: ModelPackageMeta,
                   traces: dict[str, torch.jit.ScriptModule] | None = None) -> TracedNetwork:
    """The network as TorchScript, traced at the trained size; for a classifier whose network was traced before (in
    `traces`, by architecture_key), that trace with this network's weights: the graph is the same, the weights are
    its parameters (a linear probe's intercept is a constant of its trace, so probes are always traced)."""
    key = architecture_key(meta) if meta.kind == "network" else None
    if traces is not None and key in traces:
        return TracedNetwork(traces[key], network.state_dict())
    size = meta.recipe.train_image_size
    # a narrow filter, added once for the process (warnings.catch_warnings is not thread-safe, and model.ts files
    # are saved by shipping's writing thread)
    warnings.filterwarnings("ignore", message=TORCHSCRIPT_WARNINGS, category=FutureWarning)
    with torch.no_grad():
        traced = torch.jit.trace(network, torch.zeros(1, 1, size, size), check_trace=False)
    if traces is not None and key is not None:
        traces[key] = traced
    return TracedNetwork(traced)


def bundle_network(package: LoadedPackage, traces: dict[str, torch.jit.ScriptModule] | None = None) -> TracedNetwork:
    """The package's network with its probability step as TorchScript (models/model.ts; traces: see
    traced_network)."""
    return traced_network(ProbabilityNetwork(package.float_network, package.meta).eval(), package.meta, traces)


def write_bundle(package: Path | LoadedPackage, out_dir: Path, *, reuse: bool = True,
                 traces: dict[str, torch.jit.ScriptModule] | None = None,
                 network: TracedNetwork | None = None, writes: BackgroundWrites | None = None) -> Path:
    """Write the MONAI bundle of a float (fp32 or bf16) package into out_dir (replaced whole); returns out_dir.
    reuse: keep a whole bundle in out_dir made from the same package and model card (bundle_inputs_key); traces:
    see traced_network; network: the package's bundle_network when traced already; writes: write the bundle's
    files in the background (tasks.packaging.background) once they are made, after the package's own."""
    out_dir = Path(out_dir)
    model_path = package.path if isinstance(package, LoadedPackage) else package_file(Path(package))
    key = bundle_inputs_key(model_path, package.sha256 if isinstance(package, LoadedPackage) else None)
    if reuse and recorded_bundle_inputs(out_dir) == key:
        return out_dir
    loaded = package if isinstance(package, LoadedPackage) else load_package(model_path)
    meta = loaded.meta
    if meta.weights_variant == "int8":
        raise ValueError("a MONAI bundle is written from the full-precision package, not its int8 variant.")
    script = network if network is not None else bundle_network(loaded, traces)
    card = loaded.path.parent / MODEL_CARD_FILE
    files = {
        "configs/metadata.json": json.dumps({**bundle_metadata(meta, loaded.sha256), INPUTS_FIELD: key}, indent=2)
        + "\n",
        "configs/inference.json": json.dumps(inference_config(meta), indent=2) + "\n",
        "docs/README.md": (card.read_text() if card.is_file() else f"# ctcompare {meta.arm}\n") + _RUN_NOTE,
        "LICENSE": _license_text(meta),
    }

    def write() -> None:
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        for folder in ("configs", "models", "docs"):
            (staging / folder).mkdir(parents=True)
        torch.jit.save(script.ready(), str(staging / "models" / "model.ts"))
        _link_or_copy(loaded.path, staging / "models" / "model.pt")
        for name, text in files.items():
            atomic_write_text(staging / name, text)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)

    if writes is not None:
        writes.submit(write)
    else:
        write()
    return out_dir


_RUN_NOTE = """
## Running this MONAI bundle

From the bundle folder:

    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
        --dataset_dir DICOM_DIR --output_dir OUT_DIR

OUT_DIR/probabilities.csv gets one row per DICOM file (path relative to DICOM_DIR, probability of the positive
class). The threshold and patient aggregation are in configs/metadata.json. models/model.ts is the whole network
(TorchScript, probabilities out); models/model.pt is the ctcompare package file, whose weights
`monai.bundle.load(..., key_in_ckpt="state_dict")` or `torch.load(path, weights_only=True)["state_dict"]` reads.
Research use only, not for diagnosis.
"""


def _license_text(meta: ModelPackageMeta) -> str:
    return (
        f"The code of this bundle (configs) is licensed under {LICENSE_TEXT} (https://www.apache.org/licenses/"
        "LICENSE-2.0), as ctcompare is.\n\nThe weights (models/) were trained by the model's owner on their own data"
        f" (arm {meta.arm}); their use is governed by the owner's terms for that data. ImageNet-initialised arms "
        "also carry the terms of the torchvision ImageNet weights.\n"
    )
