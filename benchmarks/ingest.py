"""Ingest throughput: `ctcompare ingest` (Prefect flow, chunk tasks feeding a local decode pool) against a plain
single-process loop (pydicom read, decode, HU, window, resize) over the same files, side by side, phase by phase.

    .venv/bin/python benchmarks/ingest.py [--patients 150] [--slices 10] [--size 224] [--workers 0] [--cohort DIR]

The plain loop runs before and after the flow (the mean is the baseline: on a shared machine the load changes);
every file is read once before, untimed, so that all runs read the files from the page cache.
Each ingest runs in a child process of its own (pointed at this script's Prefect API, so it starts no server), so
that its peak resident memory is its own: VmHWM of the child's /proc/self/status, the high-water mark of the
address space it got at exec (getrusage's ru_maxrss would not do: Linux carries into it the resident size of the
forked copy of this script before the exec, i.e. this script's own memory), and ru_maxrss of its largest decode
worker (forked from the child: pages shared with the child count in it too);
its wall time is taken inside the child around the flow call, as a caller of the flow sees it.
The cohort is written once into --cohort and reused (same parameters: same files).
The flow's phases are read back from its own records (log timestamps and task runs on the Prefect API):

- listing + hashing: flow start to the "Found N file(s)" log line (the decode workers start meanwhile);
- planning: from there to the first decode-chunk task start (cache checks, pool start);
- decode: first decode-chunk start to last decode-chunk end;
- assembly: last decode-chunk end to the "Wrote ..." log line (records, pseudonyms, images.npy, manifest);
- Prefect overhead: wall time of the call minus the flow run's own start-to-end (creating and finishing the run),
  plus artifacts after assembly.

A re-run with every file cached shows what remains without decoding. Load (uptime) is printed: figures taken
on a busy machine are noisy, ratios less so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy machine starts it slowly
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # the phases are read from the run's INFO log lines
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_loop(src_dir: Path, size: int) -> tuple[int, float, float]:
    """The baseline: one process, no validation, no hashing, no cache, no Prefect. Returns (images, list s, decode
    s)."""
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_rescale

    from tasks.ingest.preprocess import hu_frame_to_image, parse_window

    started = time.perf_counter()
    paths = sorted(p for p in src_dir.rglob("*") if p.is_file())
    listed = time.perf_counter()
    window = parse_window("lung")
    images = []
    for path in paths:
        ds = pydicom.dcmread(path)
        hu = apply_rescale(ds.pixel_array, ds).astype(np.float32)
        image, _ = hu_frame_to_image(hu, window, size, ds.PhotometricInterpretation == "MONOCHROME1")
        images.append(image.astype(np.float16))
    return len(images), listed - started, time.perf_counter() - listed


def warm_file_cache(src_dir: Path) -> None:
    """Read every file once, untimed: the first plain loop would otherwise read from disk what every later run reads
    from the page cache (a cold first loop made the baseline slower and the flow's ratios higher)."""
    for path in src_dir.rglob("*"):
        if path.is_file():
            path.read_bytes()


def flow_phases(flow_run_id: object) -> dict[str, float]:
    """Seconds of each phase of one ingest flow run, from its task runs and log timestamps on the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # log lines reach the API in the background: send what is still queued
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    chunks = [r for r in runs if r.name.startswith("decode-chunk") and r.start_time and r.end_time]

    def logged(prefix: str | tuple[str, ...]) -> datetime:
        return min(log.timestamp for log in logs if log.message.startswith(prefix))

    found, wrote = logged("Found "), logged(("Wrote ", "Unchanged:"))
    first_chunk = min(r.start_time for r in chunks) if chunks else found
    last_chunk = max(r.end_time for r in chunks) if chunks else found
    return {
        "listing + hashing": (found - flow_run.start_time).total_seconds(),
        "planning + pool start": (first_chunk - found).total_seconds(),
        "decode": (last_chunk - first_chunk).total_seconds(),
        "assembly": (wrote - last_chunk).total_seconds(),
        "artifacts + finish": (flow_run.end_time - wrote).total_seconds(),
        "flow run": (flow_run.end_time - flow_run.start_time).total_seconds(),
    }


def quiet_console() -> None:
    """Keep Prefect's INFO lines off the terminal (they still reach the API, where the phases are read)."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.WARNING)


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) used so far by this process, and by its finished, reaped children."""
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def load() -> str:
    """The 1-minute load average and the number of cores, for the record."""
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


# The child process that runs one ingest: prints one JSON line with its wall time, flow run id, CPU seconds and
# peak RSS (VmHWM of its own address space; ru_maxrss of RUSAGE_CHILDREN, in KiB on Linux, is the largest reaped
# child, i.e. one decode worker).
INGEST_CHILD = """
import json, resource, sys, time
kwargs = json.loads(sys.argv[1])
from flows.ingest import ingest_flow
started = time.perf_counter()
state = ingest_flow(**kwargs, return_state=True)
seconds = time.perf_counter() - started
me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
with open("/proc/self/status") as status:
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({
    "seconds": seconds, "flow_run_id": str(state.state_details.flow_run_id),
    "n_images": state.result()["card"]["n_images"],
    "cpu": [me.ru_utime + me.ru_stime, workers.ru_utime + workers.ru_stime],
    "peak_rss_mib": [peak_kib / 1024, workers.ru_maxrss / 1024],
}))
"""


def ingest_in_child(kwargs: dict[str, object], repo: Path, api_url: str) -> dict[str, object]:
    """Run ingest_flow(**kwargs) in a fresh process with `repo`'s code, reporting to `api_url`; its JSON line."""
    import json
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(repo), "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "INFO"}
    done = subprocess.run([sys.executable, "-c", INGEST_CHILD, json.dumps(kwargs)], cwd=repo, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ingest child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def this_api_url() -> str:
    """The URL of the Prefect API this process uses (the ephemeral one it started, or PREFECT_API_URL)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0, help="0: all cores")
    parser.add_argument("--cohort", type=Path, default=None,
                        help="folder of the synthetic cohort, written once and reused (default: a folder per size in "
                             "the temp dir)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="checkout whose code the ingest runs (default this one; another gives a before/after)")
    parser.add_argument("--ingest-only", action="store_true",
                        help="no plain loops and no re-run: the ingest's phases and peak memory only (large cohorts)")
    parser.add_argument("--dask", action="store_true",
                        help="instead of the plain loops: the process pool against a Dask LocalCluster (2 worker "
                             "processes, started beforehand), phase by phase, and whether their bytes are identical")
    args = parser.parse_args()
    cohort_dir = args.cohort or Path(tempfile.gettempdir()) / f"ctcompare-bench-cohort-{args.patients}x{args.slices}"
    state = Path(tempfile.mkdtemp(prefix="ctcompare-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(state / "mpl"))

    from prefect import flow

    from tasks.demo.synth import synthesize_cohort

    @flow(name="benchmark-warm-up")
    def warm_up_flow() -> None:
        """Nothing: starts the ephemeral API."""

    quiet_console()
    started = time.perf_counter()
    cohort = synthesize_cohort(cohort_dir, patients=args.patients, slices_per_patient=args.slices, seed=0)
    n_files = sum(1 for p in cohort.dicom_dir.rglob("*") if p.is_file())
    print(f"cohort: {n_files} files in {cohort_dir} ({'reused' if cohort.skipped else 'written'} in "
          f"{time.perf_counter() - started:.0f} s), size {args.size}; {load()}")

    if args.dask:
        warm_up_flow()
        compare_with_dask(cohort, state, args)
        shutil.rmtree(state, ignore_errors=True)
        return
    if not args.ingest_only:
        warm_file_cache(cohort.dicom_dir)
        cpu_before = cpu_seconds()
        n_plain, plain_listing, plain_decode_a = plain_loop(cohort.dicom_dir, args.size)
        plain_cpu = cpu_seconds()[0] - cpu_before[0]
    started = time.perf_counter()
    warm_up_flow()  # a deployment or a running project server has its API up already
    print(f"Prefect ephemeral API start: {time.perf_counter() - started:6.1f} s (not counted below)")
    api_url = this_api_url()

    out = state / "dataset"
    kwargs = dict(
        src_dir=str(cohort.dicom_dir),
        out_dir=str(out),
        labels=str(cohort.labels_path),
        size=args.size,
        workers=args.workers,
    )
    first = ingest_in_child(kwargs, args.repo, api_url)
    phases = flow_phases(uuid.UUID(first["flow_run_id"]))
    print(f"flow done; {load()}")
    if args.ingest_only:
        print_ingest_only(first, phases, args.size)
        shutil.rmtree(state, ignore_errors=True)
        return
    _, _, plain_decode_b = plain_loop(cohort.dicom_dir, args.size)

    (out / "dataset.json").unlink()  # forces a full assembly; every decode is a cache hit
    cached = ingest_in_child(kwargs, args.repo, api_url)
    cached_phases = flow_phases(uuid.UUID(cached["flow_run_id"]))
    report(args, n_plain=n_plain, plain=(plain_decode_a, plain_decode_b, plain_listing, plain_cpu),
           first=first, phases=phases, cached=cached, cached_phases=cached_phases, cohort_dir=cohort.dicom_dir)
    shutil.rmtree(state, ignore_errors=True)


def compare_with_dask(cohort: object, state: Path, args: argparse.Namespace) -> None:
    """The same files ingested on the local process pool and on a Dask LocalCluster (cold: its workers import
    Prefect, torch and pydicom on their first chunk; warm: a second run on the same workers), side by side."""
    from distributed import LocalCluster

    from data_schemas.dataset import IMAGES_FILE, MANIFEST_FILE

    os.environ["CTCOMPARE_HMAC_KEY"] = "benchmark-fixed-key"  # the same pseudonyms in every dataset: bytes comparable
    api_url = this_api_url()
    base = dict(src_dir=str(cohort.dicom_dir), labels=str(cohort.labels_path), size=args.size, workers=args.workers)
    runs = {"process pool": ingest_in_child({**base, "out_dir": str(state / "pool")}, args.repo, api_url)}
    started = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1",
                      worker_dashboard_address=None) as cluster:
        print(f"Dask LocalCluster (2 workers x 1 thread) start: {time.perf_counter() - started:.1f} s (not counted)")
        for name in ("Dask, cold workers", "Dask, warm workers"):
            out = state / name.split()[-2].rstrip(",")
            runs[name] = ingest_in_child(
                {**base, "out_dir": str(out), "dask_address": cluster.scheduler_address}, args.repo, api_url
            )
    phases = {name: flow_phases(uuid.UUID(run["flow_run_id"])) for name, run in runs.items()}
    print(f"\n{'phase':<28}" + "".join(f"{name:>20}" for name in runs))
    for phase in phases["process pool"]:
        print(f"{phase:<28}" + "".join(f"{phases[name][phase]:>20.2f}" for name in runs))
    print(f"{'end to end (wall)':<28}" + "".join(f"{run['seconds']:>20.2f}" for run in runs.values()))
    pool_seconds = runs["process pool"]["seconds"]
    for name in list(runs)[1:]:
        same = all((state / "pool" / f).read_bytes() == (state / name.split()[-2].rstrip(",") / f).read_bytes()
                   for f in (IMAGES_FILE, MANIFEST_FILE))
        print(f"{name}: end to end {pool_seconds / runs[name]['seconds']:.2f}x the process pool's speed, "
              f"decode phase {phases['process pool']['decode'] / phases[name]['decode']:.2f}x; "
              f"images.npy and manifest.csv {'byte-identical' if same else 'DIFFER'} to the process pool's")
    print(load())


def print_ingest_only(first: dict, phases: dict[str, float], size: int) -> None:
    """The ingest's phases, rate and peak memory, without the plain loops."""
    for name in phases:
        print(f"{name:<28}{phases[name]:>12.2f}")
    print(f"{'Prefect outside the run':<28}{first['seconds'] - phases['flow run']:>12.2f}")
    print(f"{'end to end (wall)':<28}{first['seconds']:>12.2f}   = {first['n_images'] / first['seconds']:.0f} images/s")
    flow_peak, worker_peak = first["peak_rss_mib"]
    print(f"peak RSS of the ingest: flow's process {flow_peak:.0f} MiB, largest decode worker {worker_peak:.0f} MiB; "
          f"images.npy is {first['n_images'] * size * size * 2 / 2**20:.0f} MiB; CPU seconds {first['cpu'][0]:.1f} in "
          "the "
          f"flow's process + {first['cpu'][1]:.1f} in the decode workers; {load()}")


def report(args: argparse.Namespace, *, n_plain: int, plain: tuple[float, float, float, float], first: dict,
           phases: dict[str, float], cached: dict, cached_phases: dict[str, float], cohort_dir: Path) -> None:
    """Print the phases, the ratios to the plain loops, CPU seconds and peak memory."""
    plain_a, plain_b, plain_listing, plain_cpu = plain
    plain_rate = n_plain / ((plain_a + plain_b) / 2)
    n_flow, flow_seconds = first["n_images"], first["seconds"]
    print(f"\nplain loop, 1 process: {n_plain} images in {plain_a:.1f} s before the flow, {plain_b:.1f} s after; "
          f"mean {(plain_a + plain_b) / 2:.1f} s = {plain_rate:.0f} images/s (+ {plain_listing:.2f} s listing)")
    print(f"{'phase of ctcompare ingest':<28}{'first run s':>12}{'all cached s':>14}")
    for name in phases:
        print(f"{name:<28}{phases[name]:>12.2f}{cached_phases[name]:>14.2f}")
    print(f"{'Prefect outside the run':<28}{flow_seconds - phases['flow run']:>12.2f}"
          f"{cached['seconds'] - cached_phases['flow run']:>14.2f}")
    print(f"{'end to end (wall)':<28}{flow_seconds:>12.2f}{cached['seconds']:>14.2f}")
    decode_rate = n_flow / phases["decode"]
    print(f"\ndecode phase: {decode_rate:.0f} images/s = {decode_rate / plain_rate:.2f}x the plain loop (target >= "
          "1.7x)")
    print(f"end to end:   {n_flow / flow_seconds:.0f} images/s = {n_flow / flow_seconds / plain_rate:.2f}x the plain "
          "loop "
          f"(target >= 1.5x at 1,500 files, >= 1.7x at 15,000)")
    # A second baseline: the same loop with one torch thread (its resize no longer spreads over the cores, and
    # on a busy machine no longer spins OpenMP threads), i.e. what one decode worker does.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, _, single_seconds = plain_loop(cohort_dir, args.size)
    torch.set_num_threads(threads)
    single_rate = n_plain / single_seconds
    print(f"plain loop, 1 process, 1 torch thread: {single_seconds:.1f} s = {single_rate:.0f} images/s; "
          f"decode phase = {decode_rate / single_rate:.2f}x, end to end = {n_flow / flow_seconds / single_rate:.2f}x "
          "this loop")
    # CPU seconds do not depend on how busy the machine is: the work the flow adds over the plain loop.
    flow_cpu = first["cpu"]
    print(f"CPU seconds: plain loop {plain_cpu:.1f} s; flow {sum(flow_cpu):.1f} s = {flow_cpu[0]:.1f} s in the flow's "
          f"process (Prefect, hashing, assembly) + {flow_cpu[1]:.1f} s in the decode workers")
    images_mib = n_flow * args.size * args.size * 2 / 2**20
    (flow_peak, worker_peak), (cached_peak, _) = first["peak_rss_mib"], cached["peak_rss_mib"]
    print(f"peak RSS of the ingest: flow's process {flow_peak:.0f} MiB (all-cached re-run {cached_peak:.0f} MiB), "
          f"largest decode worker {worker_peak:.0f} MiB; images.npy is {images_mib:.0f} MiB")
    print(f"{load()}")


if __name__ == "__main__":
    main()
