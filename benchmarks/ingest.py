"""Ingest throughput: `ctcompare ingest` (Prefect flow, chunked tasks on a process pool) against a plain
single-process loop (pydicom read, decode, HU, window, resize) over the same files, side by side.

    .venv/bin/python benchmarks/ingest.py [--patients 150] [--slices 10] [--size 224] [--workers 0]

Prints images per second of each and their ratio, end to end and for the decode phase alone (first decode-chunk
task start to last task end, read from the Prefect API), and the Prefect overhead: the flow's wall time on the
same input once every file is cached (listing, hashing, assembly, orchestration; no decoding).
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
from prefect import flow  # noqa: E402
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


@flow(name="benchmark-warm-up")
def warm_up_flow() -> None:
    """Nothing: starts the ephemeral API."""


def decode_phase_seconds(flow_run_id: object) -> float:
    """Wall time from the first decode-chunk task start to the last one's end, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    chunks = [r for r in runs if r.name.startswith("decode-chunk") and r.start_time and r.end_time]
    return (max(r.end_time for r in chunks) - min(r.start_time for r in chunks)).total_seconds()


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

    # Start Prefect's ephemeral API before timing (a deployment or a running server has it already).
    started = time.perf_counter()
    warm_up_flow()
    print(f"Prefect ephemeral API start:   {time.perf_counter() - started:6.1f} s (not counted below)")

    out = STATE / "dataset"
    started = time.perf_counter()
    state = ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(out), labels=str(cohort.labels_path), size=args.size, workers=args.workers, return_state=True)
    flow_seconds = time.perf_counter() - started
    n_flow = state.result()["card"]["n_images"]
    decode_seconds = decode_phase_seconds(state.state_details.flow_run_id)

    (out / "dataset.json").unlink()  # forces a full assembly; every decode is a cache hit
    started = time.perf_counter()
    ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(out), labels=str(cohort.labels_path), size=args.size, workers=args.workers)
    cached_seconds = time.perf_counter() - started

    plain_rate, flow_rate = n_plain / plain_seconds, n_flow / flow_seconds
    print(f"plain loop (1 process):        {n_plain} images in {plain_seconds:6.1f} s = {plain_rate:6.1f} images/s")
    print(f"ctcompare ingest (flow):       {n_flow} images in {flow_seconds:6.1f} s = {flow_rate:6.1f} images/s")
    print(f"ratio flow / plain loop:       {flow_rate / plain_rate:.2f}x end to end")
    print(f"decode phase of the flow:      {n_flow} images in {decode_seconds:6.1f} s = {n_flow / decode_seconds:6.1f} images/s"
          f" = {n_flow / decode_seconds / plain_rate:.2f}x the plain loop")
    print(f"re-run with every file cached: {cached_seconds:6.1f} s (Prefect overhead + listing, hashing, assembly)")
    shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    main()
