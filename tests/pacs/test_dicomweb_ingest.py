"""Ingest from a real Orthanc over DICOMweb: same dataset as the folder ingest, incremental, clean on failure."""

from __future__ import annotations

import csv
import shutil
from datetime import date
from pathlib import Path

import pydicom
import pytest
import requests

from data_schemas.dataset import DATASET_CARD_FILE, MANIFEST_FILE, DatasetCard
from flows.ingest import ingest_dicomweb_flow, ingest_flow
from tasks.ingest import dicomweb
from tasks.ingest.dicomweb import (
    DICOMWEB_DIR,
    MIRROR_FILES_DIR,
    MIRROR_INDEX_FILE,
    DicomWebError,
)
from tests.orthanc_server import OrthancServer
from tests.pacs.pacs_helpers import dicom_files, small_cohort, study_dates, upload

INGEST = {"size": 32, "window": "lung", "workers": 1}


def card(dataset: Path) -> DatasetCard:
    return DatasetCard.model_validate_json((dataset / DATASET_CARD_FILE).read_text())


def test_date_range_ingest_equals_folder_ingest_and_rerun_fetches_nothing(fresh_orthanc: OrthancServer,
                                                                           tmp_path: Path) -> None:
    cohort = small_cohort(tmp_path / "cohort")
    files = dicom_files(cohort)
    upload(fresh_orthanc.dicomweb_url, files)
    dates = study_dates(files)
    ordered = sorted(set(dates.values()))
    assert len(ordered) >= 3, "the cohort's studies should fall on several days"
    first, last = ordered[0], ordered[len(ordered) // 2]  # about half of the studies
    in_range = [path for path, day in dates.items() if first <= day <= last]
    assert 0 < len(in_range) < len(files)

    folder = tmp_path / "same-files"
    for path in in_range:
        target = folder / path.relative_to(cohort)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    from_folder = ingest_flow(src_dir=str(folder), out_dir=str(tmp_path / "folder-dataset"),
                              labels=str(cohort / "labels.csv"), **INGEST)

    out = tmp_path / "pacs-dataset"
    result = ingest_dicomweb_flow(url=fresh_orthanc.dicomweb_url + "/", out_dir=str(out), study_date=f"{first}-{last}",
                                  labels=str(cohort / "labels.csv"), **INGEST)
    assert result["archive"] == {"found": len(in_range), "fetched": len(in_range), "already": 0}
    assert card(out).content_hash == card(tmp_path / "folder-dataset").content_hash
    assert (out / MANIFEST_FILE).read_bytes() == (tmp_path / "folder-dataset" / MANIFEST_FILE).read_bytes()
    assert result["card"]["n_images"] == from_folder["card"]["n_images"] == len(in_range)
    mirror = out / DICOMWEB_DIR
    assert (mirror / MIRROR_INDEX_FILE).stat().st_mode & 0o077 == 0
    assert len(list((mirror / MIRROR_FILES_DIR).rglob("*.dcm"))) == len(in_range)
    assert not (mirror / dicomweb.STAGING_DIR).exists()

    # Labels keyed on accession numbers (which only the archive's study records hold) label the same images.
    label_of = dict(csv.reader((cohort / "labels.csv").read_text().splitlines()))
    accession_labels = tmp_path / "accession-labels.csv"
    with open(accession_labels, "w", newline="") as handle:
        csv.writer(handle).writerows([("accession_number", "label"), *sorted(
            {(str(ds.AccessionNumber), label_of[str(ds.PatientID)]) for ds in map(pydicom.dcmread, files)})])
    by_accession = ingest_dicomweb_flow(url=fresh_orthanc.dicomweb_url, out_dir=str(tmp_path / "by-accession"),
                                        study_date=f"{first}-{last}", labels=str(accession_labels), **INGEST)
    assert by_accession["card"]["label_distribution"] == from_folder["card"]["label_distribution"]
    assert (tmp_path / "by-accession" / MANIFEST_FILE).read_bytes() == (out / MANIFEST_FILE).read_bytes()

    again = ingest_dicomweb_flow(url=fresh_orthanc.dicomweb_url, out_dir=str(out), study_date=f"{first}-{last}",
                                 labels=str(cohort / "labels.csv"), **INGEST)
    assert again["archive"] == {"found": len(in_range), "fetched": 0, "already": len(in_range)}
    assert again["skipped"] is True


def test_server_stopped_mid_retrieval_gives_one_sentence_and_no_dataset(fresh_orthanc: OrthancServer, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cohort = small_cohort(tmp_path / "cohort", seed=5)
    upload(fresh_orthanc.dicomweb_url, dicom_files(cohort))
    monkeypatch.setattr(dicomweb, "RETRY_DELAYS_S", [0.1, 0.1])
    retrieved = []
    plain_session = dicomweb.http_session

    def stopping_session(credentials: object) -> requests.Session:
        """The archive goes down after it has answered three instance retrievals."""
        session = plain_session(credentials)

        def after(response: requests.Response, *args: object, **kwargs: object) -> None:
            if "/instances/" in response.url:
                retrieved.append(response.url)
                if len(retrieved) == 3:
                    fresh_orthanc.stop()

        session.hooks["response"].append(after)
        return session

    monkeypatch.setattr(dicomweb, "http_session", stopping_session)
    out = tmp_path / "dataset"
    with pytest.raises(DicomWebError) as raised:
        ingest_dicomweb_flow(url=fresh_orthanc.dicomweb_url, out_dir=str(out), study_date="any", fetch_threads=1,
                             **INGEST)
    message = str(raised.value)
    assert fresh_orthanc.dicomweb_url in message and "no HTTP status" in message
    assert len(message.splitlines()) == 1 and message.endswith(").")
    assert len(retrieved) == 3
    assert not (out / DATASET_CARD_FILE).exists() and not (out / MANIFEST_FILE).exists()
    assert not (out / DICOMWEB_DIR / MIRROR_INDEX_FILE).exists()
    assert not list((out / DICOMWEB_DIR).glob(f"{MIRROR_FILES_DIR}/**/*.dcm"))


def test_refusal_names_url_and_http_status_without_retrying(fresh_orthanc: OrthancServer, tmp_path: Path) -> None:
    url = fresh_orthanc.url + "/no-such-service"
    with pytest.raises(DicomWebError, match=r"refused the study query \(HTTP 404") as raised:
        ingest_dicomweb_flow(url=url, out_dir=str(tmp_path / "dataset"), study_date="any", **INGEST)
    assert url in str(raised.value)
    assert not (tmp_path / "dataset" / DATASET_CARD_FILE).exists()


@pytest.mark.parametrize(("text", "expected"), [
    ("20260101", "20260101"), ("20260101-20260131", "20260101-20260131"), ("yesterday", "20261205"),
    ("today", "20261206"), ("any", None), (None, None),
])
def test_study_date_forms(text: str | None, expected: str | None) -> None:
    assert dicomweb.parse_study_date(text, today=date(2026, 12, 6)) == expected


@pytest.mark.parametrize("bad", ["2026-01-01", "20260131-20260101", "20261301", "last week", "2026010"])
def test_bad_study_date_lists_the_forms(bad: str) -> None:
    with pytest.raises(ValueError, match="YYYYMMDD, YYYYMMDD-YYYYMMDD, yesterday, today or any"):
        dicomweb.parse_study_date(bad)


def test_url_with_credentials_is_refused() -> None:
    with pytest.raises(ValueError, match="must not hold credentials"):
        dicomweb.check_dicomweb_url("http://user:secret@pacs:8042/dicom-web")
    assert dicomweb.check_dicomweb_url("http://pacs:8042/dicom-web/") == "http://pacs:8042/dicom-web"


def test_cli_ingests_from_a_url_and_refuses_bad_arguments_before_any_work(
        fresh_orthanc: OrthancServer, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.cli import main
    from tests.processes import free_port

    cohort = small_cohort(tmp_path / "cohort", seed=7)
    upload(fresh_orthanc.dicomweb_url, dicom_files(cohort))
    out = tmp_path / "dataset"
    assert main(["ingest", fresh_orthanc.dicomweb_url, "--out", str(out), "--study-date", "any", "--size", "32",
                 "--labels", str(cohort / "labels.csv"), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "12 instance(s) match, 12 fetched" in printed and "12 images from 6 patients" in printed

    refused = tmp_path / "refused"
    for argv, words in [(["--study-date", "2026-01-01"], "YYYYMMDD, YYYYMMDD-YYYYMMDD"),
                        (["--modality", "ct scan"], "--modality"), (["--study-list", str(tmp_path / "none.txt")],
                                                                     "does not exist")]:
        assert main(["ingest", fresh_orthanc.dicomweb_url, "--out", str(refused), *argv]) == 2
        error = capsys.readouterr().err
        assert words in error and len(error.strip().splitlines()) == 1, error
    assert main(["ingest", "http://user:pw@127.0.0.1:1/dicom-web", "--out", str(refused)]) == 2
    assert "must not hold credentials" in capsys.readouterr().err
    assert not refused.exists()

    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    monkeypatch.setattr(dicomweb, "RETRY_DELAYS_S", [0.1])
    assert main(["ingest", down, "--out", str(refused), "--study-date", "any"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"ctcompare ingest: the DICOMweb server at {down} cannot be reached for the study query "
                     "(no HTTP status: connection refused or broken).")
