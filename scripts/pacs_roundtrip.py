"""The PACS loop end to end on a synthetic cohort, against a throw-away Orthanc (needs `make orthanc`).

Upload the cohort with STOW-RS; `ctcompare ingest URL` by date range (twice: the second fetches nothing);
`ctcompare compare` on the smoke profile; `ctcompare predict RUN URL --send URL`; then every SR found in the archive
by a QIDO query is read back and its finding compared with patient_predictions.csv, and the scratch arm's MONAI
bundle is run on the same files and compared with predictions.csv.

    .venv/bin/python scripts/pacs_roundtrip.py [WORK_DIR]     (default: a new temporary folder)
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.demo.synth import synthesize_cohort  # noqa: E402
from tasks.packaging.dicom_sr import read_study_report  # noqa: E402
from tests.orthanc_server import OrthancServer  # noqa: E402
from tests.pacs.pacs_helpers import study_dates, upload  # noqa: E402

CTCOMPARE = str(Path(sys.executable).with_name("ctcompare"))


def command(*args: str, cwd: Path | None = None) -> None:
    """Run one command, print it, its exit status, wall time and last output line; stop on failure."""
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, cwd=cwd, check=False)
    lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
    print(f"$ {' '.join(args)}\n  exit {result.returncode} in {time.perf_counter() - started:.0f} s: "
          f"{lines[-1] if lines else ''}", flush=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def main(work: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    with OrthancServer(work / "orthanc") as pacs:
        url = pacs.dicomweb_url
        synthesize_cohort(work / "cohort", patients=24, slices_per_patient=3, seed=11, matrix_sizes=[128])
        files = sorted(p for p in (work / "cohort" / "dicom").rglob("*") if p.is_file())
        upload(url, files)
        days = sorted(set(study_dates(files).values()))
        dates = f"{days[0]}-{days[-1]}"
        ingest = ("ingest", url, "--out", str(work / "dataset"), "--study-date", dates,
                  "--labels", str(work / "cohort" / "labels.csv"), "--size", "64")
        command(CTCOMPARE, *ingest)
        command(CTCOMPARE, *ingest)  # incremental: fetches nothing
        command(CTCOMPARE, "compare", str(work / "dataset"), "--out", str(work / "report"), "--profile", "smoke",
                "--arms", "scratch")
        run = work / "report" / "runs" / "scratch" / "main"
        pred = work / "pred"
        command(CTCOMPARE, "predict", str(run), url, "--study-date", dates, "--out", str(pred), "--send", url,
                "--precision", "fp32")

        index = {r["image_key"]: r["relative_path"] for r in rows(pred / "dataset" / "private" / "index.csv")}
        patient_of = {index[r["image_key"]].split("/")[0]: r["patient_key"] for r in rows(pred / "predictions.csv")}
        decision = {r["patient_key"]: r["decision"] for r in rows(pred / "patient_predictions.csv")}
        client = DICOMwebClient(url=url)
        reports = client.search_for_series(search_filters={"Modality": "SR"})
        agree = 0
        for item in reports:
            study, series = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
            (instance,) = client.search_for_instances(study, series)
            saved = work / "read-back.dcm"
            client.retrieve_instance(study, series, instance["00080018"]["Value"][0]).save_as(saved)
            agree += read_study_report(saved)["finding"].meaning.lower() == decision[patient_of[study]].lower()
        print(f"SR series found by QIDO: {len(reports)}; findings equal to patient_predictions.csv: {agree}")

    mirror = pred / "dataset" / "private" / "dicomweb" / "files"
    command(sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--meta_file",
            "configs/metadata.json", "--dataset_dir", str(mirror), "--output_dir", str(work / "bundle-out"),
            cwd=run / "bundle")
    predicted = {index[r["image_key"]]: float(r["prob_positive"]) for r in rows(pred / "predictions.csv")}
    bundled = {r["file"]: float(r["prob_positive"]) for r in rows(work / "bundle-out" / "probabilities.csv")}
    difference = max(abs(predicted[name] - bundled[name]) for name in predicted)
    print(f"MONAI bundle vs ctcompare predict: {len(bundled)} images, largest difference {difference:.2e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="ctcompare-pacs-")))
