"""The MONAI bundle of a package: MONAI's required metadata, and `python -m monai.bundle run` on a folder of DICOM
files giving the probabilities `ctcompare predict` gives on the same files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_schemas.dataset import PRIVATE_INDEX_FILE, PrivateIndexRow
from data_schemas.files import read_models_csv
from data_schemas.package import PREDICT_DATASET_DIR, PREDICTIONS_FILE, ImagePrediction
from flows.predict import predict_flow
from tasks.packaging.bundle import BUNDLE_CSV, REQUIRED_METADATA, write_bundle
from tests.ship_fixtures import ShippedRun, copy_test_patient_files, shared_shipped_run

ROOT = Path(__file__).resolve().parents[1]
# The parts of MONAI's metadata schema (meta_schema_20240725.json, not reachable offline) that a bundle must meet:
# its required top-level fields and the required keys of network_data_format's inputs and outputs.
IO_FIELDS = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def"]
REQUIRED_PARTS_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": list(REQUIRED_METADATA),
    "properties": {
        "version": {"type": "string"}, "changelog": {"type": "object"}, "monai_version": {"type": "string"},
        "pytorch_version": {"type": "string"}, "numpy_version": {"type": "string"},
        "required_packages_version": {"type": "object"}, "task": {"type": "string"},
        "description": {"type": "string"}, "authors": {"type": "string"}, "copyright": {"type": "string"},
        "network_data_format": {
            "type": "object", "required": ["inputs", "outputs"],
            "properties": {part: {"type": "object", "additionalProperties": {"type": "object", "required": IO_FIELDS}}
                           for part in ("inputs", "outputs")},
        },
    },
}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> ShippedRun:
    return shared_shipped_run(tmp_path_factory)


def test_bundle_metadata_has_what_monai_requires(shipped: ShippedRun, tmp_path: Path) -> None:
    from monai.bundle import verify_metadata

    bundle = write_bundle(shipped.package_dir, tmp_path / "bundle")
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
                 "docs/README.md", "LICENSE"):
        assert (bundle / name).is_file(), name
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert set(REQUIRED_METADATA) <= set(metadata)
    assert metadata["preprocessing"]["intensity_window_hu"] == {"name": "lung", "level": -600.0, "width": 1500.0}
    assert metadata["preprocessing"]["ingest_size"] == 48 and metadata["threshold"]["value"] == 0.5
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    schema = tmp_path / "schema.json"  # verify_metadata downloads only when the file is missing
    schema.write_text(json.dumps(REQUIRED_PARTS_SCHEMA))
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
    del metadata["network_data_format"]["outputs"]["pred"]["dtype"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="dtype"):
        verify_metadata(meta_file=str(broken), filepath=str(schema))
    assert "Research use only" in (bundle / "docs" / "README.md").read_text()


def test_monai_bundle_run_agrees_with_ctcompare_predict(shipped: ShippedRun, tmp_path: Path) -> None:
    dicom = tmp_path / "incoming"
    copy_test_patient_files(shipped, dicom)
    predict_flow(package=str(shipped.package_dir), dicom_dir=str(dicom), out_dir=str(tmp_path / "pred"),
                 precision="fp32")
    paths = {row.image_key: row.relative_path for row in
             read_models_csv(tmp_path / "pred" / PREDICT_DATASET_DIR / PRIVATE_INDEX_FILE, PrivateIndexRow)}
    expected = {paths[row.image_key]: row.prob_positive
                for row in read_models_csv(tmp_path / "pred" / PREDICTIONS_FILE, ImagePrediction)}

    bundle = write_bundle(shipped.package_dir, tmp_path / "bundle")
    out = tmp_path / "bundle-out"
    env = {**os.environ, "PYTHONPATH": ""}  # the bundle needs no ctcompare code
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--meta_file", "configs/metadata.json", "--dataset_dir", str(dicom), "--output_dir", str(out)],
        cwd=bundle, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / BUNDLE_CSV, newline="") as handle:
        got = {row["file"]: float(row["prob_positive"]) for row in csv.DictReader(handle)}
    assert set(got) == set(expected) and len(got) >= 2
    for path, probability in expected.items():
        assert got[path] == pytest.approx(probability, abs=1e-4), path
