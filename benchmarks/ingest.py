"""Ingest throughput: `ctcompare ingest` (Prefect flow, chunked tasks on a process pool) against a plain
single-process loop (pydicom read, decode, HU, window, resize) over the same files, side by side.

    .venv/bin/python benchmarks/ingest.py [--patients 150] [--slices 10] [--size 224] [--workers 0]

Prints images per second of each, their ratio, and the Prefect overhead (the flow's wall time on the same
input once every file is cached: listing, hashing, assembly and orchestration, no decoding).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

STATE = Path(tempfile.mkdtemp(prefix="ctcompare-bench-"))
os.environ.setdefault("PREFECT_HOME", str(STATE / "prefect"))
os.environ.setdefault("MPLCONFIGDIR", str(STATE / "mpl"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.pixels import apply_rescale  # noqa: E402

from flows.ingest import ingest_flow  # noqa: E402
from tasks.preprocess import hu_frame_to_image, parse_window  # noqa: E402
from tasks.synth import synthesize_cohort  # noqa: E402


def plain_loop(files: list[Path], size: int) -> int:
    """The baseline: one process, no validation, no hashing, no cache, no Prefect."""
    window = parse_window("lung")
    images = []
    for path in files:
        ds = pydicom.dcmread(path)
        hu = apply_rescale(ds.pixel_array, ds).astype(np.float32)
        image, _ = hu_frame_to_image(hu, window, size, ds.PhotometricInterpretation == "MONOCHROME1")
        images.append(image.astype(np.float16))
    return len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0, help="0: all cores")
    parser.add_argument("--cohort", type=Path, default=Path(tempfile.gettempdir()) / "ctcompare-bench-cohort")
    args = parser.parse_args()

    cohort = synthesize_cohort(args.cohort, patients=args.patients, slices_per_patient=args.slices, seed=0)
    files = sorted(p for p in cohort.dicom_dir.rglob("*") if p.is_file())
    print(f"cohort: {len(files)} files, {os.cpu_count()} cores, size {args.size}")

    started = time.perf_counter()
    n_plain = plain_loop(files, args.size)
    plain_seconds = time.perf_counter() - started

    out = STATE / "dataset"
    started = time.perf_counter()
    summary = ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(out), labels=str(cohort.labels_path), size=args.size, workers=args.workers)
    flow_seconds = time.perf_counter() - started
    n_flow = summary["card"]["n_images"]

    (out / "dataset.json").unlink()  # forces a full assembly; every decode is a cache hit
    started = time.perf_counter()
    ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(out), labels=str(cohort.labels_path), size=args.size, workers=args.workers)
    cached_seconds = time.perf_counter() - started

    plain_rate, flow_rate = n_plain / plain_seconds, n_flow / flow_seconds
    print(f"plain loop (1 process):        {n_plain} images in {plain_seconds:6.1f} s = {plain_rate:6.1f} images/s")
    print(f"ctcompare ingest (flow):       {n_flow} images in {flow_seconds:6.1f} s = {flow_rate:6.1f} images/s")
    print(f"ratio flow / plain loop:       {flow_rate / plain_rate:.2f}x")
    print(f"re-run with every file cached: {cached_seconds:6.1f} s (Prefect overhead + listing, hashing, assembly)")
    shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    main()
