"""Time of the header-only labels check (tasks.ingest.labels) against a full read of the same files.

    .venv/bin/python benchmarks/label_precheck.py [--patients 150] [--slices 10] [--cohort DIR]

Writes (or reuses) a synthetic cohort, lists it as ingest does (tasks.ingest.discover.discover_files), then times, for
each
key column, the header pass of ingest_flow's labels check, and once a plain `pydicom.dcmread` of every file with
its pixel data (what the check avoids). Load (uptime) is printed: figures taken on a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import pydicom

from tasks.demo.synth import synthesize_cohort
from tasks.ingest.dicom_io import read_ct_file
from tasks.ingest.discover import discover_files
from tasks.ingest.labels import KEY_ELEMENTS, check_labels_match_headers, read_labels


def main() -> None:
    """Print the seconds of each pass."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--cohort", type=Path, default=Path(tempfile.gettempdir()) / "ctcompare-bench-cohort")
    args = parser.parse_args()
    cohort = synthesize_cohort(args.cohort, patients=args.patients, slices_per_patient=args.slices, seed=0)
    started = time.perf_counter()
    sources, _ = discover_files(cohort.dicom_dir)
    print(f"{len(sources)} files listed and hashed in {time.perf_counter() - started:.2f} s; load "
          f"{os.getloadavg()[0]:.1f}")
    first = read_ct_file(Path(sources[0].path), sources[0].relative_path).record
    with tempfile.TemporaryDirectory() as folder:
        for column in (*KEY_ELEMENTS, "path"):
            key = first.relative_path if column == "path" else getattr(first, column)
            labels_path = Path(folder) / f"{column}.csv"
            with open(labels_path, "w", newline="") as handle:
                csv.writer(handle).writerows([[column, "label"], [key, "positive"], ["0.0.0", "negative"]])
            labels = read_labels(labels_path)
            started = time.perf_counter()
            match = check_labels_match_headers(labels, sources, lambda line: None)
            print(f"header check by {column}: {time.perf_counter() - started:.2f} s for {match.n_files} files "
                  f"({match.n_matched_files} matched)")
    started = time.perf_counter()
    for source in sources:
        pydicom.dcmread(source.path).pixel_array
    print(f"full read with pixel decode (what the check avoids): {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
