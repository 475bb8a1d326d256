"""Ingest on real DICOM: pydicom's own test files, files built here, and every kind of bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_schemas.dataset import QUARANTINE_FILE, DatasetCard, ManifestRow, QuarantineRow, WindowSpec
from data_schemas.files import read_models_csv
from flows.ingest import ingest_flow
from flows.run_logs import InputRefused
from tasks.ingest.dataset_store import load_dataset
from tasks.ingest.errors import IngestError
from tasks.ingest.preprocess import hu_frame_to_image, pad_to_square, parse_window, window_to_unit_range
from tests.dicom_factory import ct_variant, deflated_ct, multiframe_ct, pydicom_file, with_raw_element, write_bad_inputs


def quarantine_reasons(dataset: Path) -> dict[str, str]:
    return {row.relative_path: row.reason.value for row in read_models_csv(dataset / QUARANTINE_FILE, QuarantineRow)}


def test_window_maps_level_and_edges_to_unit_range() -> None:
    """Lung window (-600, 1500): -1350 HU -> 0, -600 -> 0.5, 150 -> 1, outside clipped."""
    window = parse_window("lung")
    values = window_to_unit_range(np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0]), window)
    np.testing.assert_allclose(values, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    custom = parse_window("40,400")
    assert (custom.level, custom.width) == (40.0, 400.0)


@pytest.mark.parametrize("bad", ["lungs", "40", "40,-10", "", "a,b"])
def test_bad_window_lists_valid_choices(bad: str) -> None:
    with pytest.raises(ValueError, match="lung, mediastinal, bone, none"):
        parse_window(bad)


def test_monochrome1_is_inverted_and_padding_recorded() -> None:
    hu = np.full((40, 60), -600.0, dtype=np.float32)
    hu[:, :10] = 150.0
    window = WindowSpec(name="lung", level=-600.0, width=1500.0)
    normal, pads = hu_frame_to_image(hu, window, 30, monochrome1=False)
    inverted, _ = hu_frame_to_image(hu, window, 30, monochrome1=True)
    assert pads == (10, 10, 0, 0)
    assert normal.shape == (30, 30) and normal.dtype == np.float32
    # Interior pixels: inversion maps v to 1 - v (the zero padding is not part of the image and stays 0).
    np.testing.assert_allclose(inverted[15, 15], 1.0 - normal[15, 15], atol=1e-5)
    assert pad_to_square(np.zeros((5, 5)))[1] == (0, 0, 0, 0)


def test_pydicom_test_files_ct_accepted_everything_else_quarantined(tmp_path: Path) -> None:
    """pydicom's shipped files: the CT ones (incl. JPEG 2000) become images, MR/US/RT/SR/DICOMDIR do not."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "MR_small.dcm", "MR_truncated.dcm",
                 "examples_jpeg2k.dcm", "rtplan.dcm", "rtdose.dcm", "rtstruct.dcm",
                 "test-SR.dcm", "examples_palette.dcm", "SC_rgb_rle.dcm"]:
        shutil.copy(pydicom_file(name), src / name)
    shutil.copy(pydicom_file("DICOMDIR"), src / "DICOMDIR")
    out = tmp_path / "dataset"
    summary = ingest_flow(src_dir=str(src), out_dir=str(out), size=64, workers=1)
    card = DatasetCard.model_validate(summary["card"])
    assert card.n_images == 3
    assert card.n_files_seen == 13 and card.n_files_quarantined == 10
    reasons = quarantine_reasons(out)
    assert reasons["DICOMDIR"] == "dicomdir"
    assert reasons["MR_small.dcm"] == "not_ct"
    assert reasons["MR_truncated.dcm"] in {"not_ct", "truncated"}
    assert reasons["rtplan.dcm"] == "not_ct"
    assert set(reasons) | {"CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"} == {
        p.name for p in src.iterdir()
    }
    dataset = load_dataset(out)
    assert dataset.images.shape == (3, 1, 64, 64) and dataset.images.dtype == np.float16
    assert 0.0 <= float(dataset.images.min()) and float(dataset.images.max()) <= 1.0
    assert "JPEG 2000 Image Compression" in card.fingerprint.transfer_syntaxes
    assert card.fingerprint.hounsfield_units.min < -500  # lung/air present in real CT


def test_every_bad_input_gets_its_own_reason_and_the_run_goes_on(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ct_variant(src / "good/ct1.dcm", patient_id="P1")
    multiframe_ct(src / "good/multi", frames=3)
    expected = write_bad_inputs(src)
    out = tmp_path / "dataset"
    summary = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    reasons = quarantine_reasons(out)
    for rel, reason in expected.items():
        assert reasons.get(rel) == reason, f"{rel}: expected {reason}, got {reasons.get(rel)}"
    card = DatasetCard.model_validate(summary["card"])
    # ct1 + the kept copy of the duplicate (1 image each) + 3 frames of the multi-frame file.
    assert card.n_images == 5
    manifest = read_models_csv(out / "manifest.csv", ManifestRow)
    assert sorted(row.frame for row in manifest) == [0, 0, 0, 1, 2]
    assert card.n_files_seen == card.n_files_ingested + card.n_files_quarantined
    assert len({row.image_key for row in manifest}) == 5
    assert [row.index for row in manifest] == list(range(5))


def write_labels(path: Path, rows: list[tuple[str, str]], key: str = "patient_id") -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key, "label"])
        writer.writerows(rows)
    return path


def test_labels_are_matched_and_unlabeled_images_listed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i, patient in enumerate(["P1", "P1", "P2", "P3"]):
        ct_variant(src / f"{patient}_{i}.dcm", patient_id=patient)
    labels = write_labels(tmp_path / "labels.csv", [("P1", "nodule"), ("P2", "normal"), ("P9", "normal")])
    out = tmp_path / "dataset"
    summary = ingest_flow(src_dir=str(src), out_dir=str(out), labels=str(labels), size=32, workers=1)
    card = DatasetCard.model_validate(summary["card"])
    assert card.label_distribution == {"nodule": 2, "normal": 1}
    assert card.n_unlabeled_images == 1
    assert (out / "private/unlabeled.csv").read_text().splitlines() == ["relative_path", "P3_3.dcm"]


# The flow refuses a bad labels file before any work: InputRefused from a direct call, IngestError from the check.
REFUSED = (IngestError, InputRefused)


def test_label_file_errors_are_one_sentence(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ct_variant(src / "a.dcm", patient_id="P1")
    bad_key = write_labels(tmp_path / "k.csv", [("P1", "x")], key="mrn")
    with pytest.raises(REFUSED, match="exactly one key column, one of patient_id"):
        ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "o1"), labels=str(bad_key), size=32, workers=1)
    conflict = write_labels(tmp_path / "c.csv", [("P1", "nodule"), ("P1", "normal")])
    with pytest.raises(REFUSED, match=r"rows 2 and 3 give the same patient_id different labels"):
        ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "o2"), labels=str(conflict), size=32, workers=1)
    nomatch = write_labels(tmp_path / "n.csv", [("P7", "nodule")])
    with pytest.raises(REFUSED, match=r"matches any of the 1 file\(s\) found: its 1 label\(s\) were checked "
                                          r"against the headers, before decoding"):
        ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "o3"), labels=str(nomatch), size=32, workers=1)


def test_incremental_reingest_decodes_only_new_files_and_equals_a_clean_run(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(4):
        ct_variant(src / f"first/{i}.dcm", patient_id=f"P{i % 2}", InstanceNumber=i)
    out = tmp_path / "incremental"
    ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    cache_files = {p: p.stat().st_mtime_ns for p in (out / "private/cache").rglob("*.npz")}
    assert len(cache_files) == 4
    for i in range(3):
        ct_variant(src / f"second/{i}.dcm", patient_id=f"Q{i}", InstanceNumber=i)
    second = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    after = {p: p.stat().st_mtime_ns for p in (out / "private/cache").rglob("*.npz")}
    assert len(after) == 7
    assert all(after[p] == mtime for p, mtime in cache_files.items()), "old files were decoded again"
    clean = tmp_path / "clean"
    ingest_flow(src_dir=str(src), out_dir=str(clean), size=32, workers=1)
    assert (out / "manifest.csv").read_bytes() == (clean / "manifest.csv").read_bytes()
    assert np.array_equal(np.load(out / "images.npy"), np.load(clean / "images.npy"))
    assert second["card"]["content_hash"] == json.loads((clean / "dataset.json").read_text())["content_hash"]
    third = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    assert third["skipped"] is True


def test_no_image_at_all_fails_with_one_sentence(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "readme.txt").write_text("nothing here")
    with pytest.raises(IngestError, match=r"no CT image could be ingested from 1 file\(s\)"):
        ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "out"), size=32, workers=1)
    assert (tmp_path / "out" / QUARANTINE_FILE).is_file() and not (tmp_path / "out/quarantine.csv").exists()


def test_hmac_key_file_is_private_when_no_env_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTCOMPARE_HMAC_KEY")
    src = tmp_path / "src"
    ct_variant(src / "a.dcm", patient_id="P1")
    out = tmp_path / "dataset"
    ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    key = out / "private/hmac.key"
    assert key.stat().st_mode & 0o777 == 0o600
    first = (out / "manifest.csv").read_text()
    ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "other"), size=32, workers=1)
    assert (tmp_path / "other/manifest.csv").read_text() != first  # another dataset, another secret


def test_private_part_is_owner_only_and_shareable_files_are_readable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ct_variant(src / "a.dcm", patient_id="P1")
    out = tmp_path / "dataset"
    ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    assert (out / "private").stat().st_mode & 0o077 == 0
    assert (out / "manifest.csv").stat().st_mode & 0o044 == 0o044


def test_cli_exit_codes_and_one_sentence_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    src = tmp_path / "src"
    ct_variant(src / "a.dcm", patient_id="P1")
    assert main(["ingest", str(src), "--out", str(tmp_path / "o"), "--window", "lungs"]) == 2
    err = capsys.readouterr().err
    assert "valid choices are lung, mediastinal, bone, none" in err and "Traceback" not in err
    (tmp_path / "file").write_text("x")
    assert main(["ingest", str(src), "--out", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["ingest", str(src), "--out", str(tmp_path / "ok"), "--size", "32", "--workers", "1"]) == 0
    assert "1 images from 1 patients" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    assert main(["ingest", str(empty), "--out", str(tmp_path / "none")]) == 1
    assert "no CT image could be ingested" in capsys.readouterr().out


def test_a_crash_while_rewriting_leaves_no_card_that_readers_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.ingest.dataset_store as store

    src = tmp_path / "src"
    ct_variant(src / "a.dcm", patient_id="P1")
    out = tmp_path / "dataset"
    ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    ct_variant(src / "b.dcm", patient_id="P2")

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed while writing the manifest")

    monkeypatch.setattr(store, "write_models_csv", crash)
    with pytest.raises(BaseException):
        ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    with pytest.raises(FileNotFoundError, match="run 'ctcompare ingest' first"):
        load_dataset(out)
    monkeypatch.undo()
    summary = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    assert summary["card"]["n_images"] == 2 and load_dataset(out).images.shape[0] == 2


def test_a_malformed_header_value_quarantines_its_file_naming_the_element(tmp_path: Path) -> None:
    """NaN, 1e999 and text in numeric elements: that file is quarantined as invalid_header, the run goes on."""
    src = tmp_path / "src"
    ct_variant(src / "good.dcm", patient_id="P1")
    bad = {
        "nan_instance.dcm": ("InstanceNumber", "IS", b"NaN"),
        "inf_instance.dcm": ("InstanceNumber", "IS", b"1e999"),
        "text_slope.dcm": ("RescaleSlope", "DS", b"abc"),
        "garbage_rows.dcm": ("Rows", "US", b"\x01\x02\x03"),
        "long_patient_id.dcm": ("PatientID", "LO", b"SECRET" * 20),
    }
    for name, (keyword, vr, raw) in bad.items():
        with_raw_element(src / name, keyword, vr, raw)
    out = tmp_path / "dataset"
    summary = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    assert summary["card"]["n_images"] == 1 and summary["card"]["quarantine_reasons"] == {"invalid_header": 5}
    rows = {row.relative_path: row for row in read_models_csv(out / QUARANTINE_FILE, QuarantineRow)}
    for name, (keyword, _, raw) in bad.items():
        assert rows[name].reason.value == "invalid_header"
        assert f"header element {keyword}" in rows[name].message
        assert raw.decode("latin-1").strip() not in rows[name].message.split(":", 1)[1]


def test_deflated_explicit_vr_little_endian_is_accepted(tmp_path: Path) -> None:
    """Offsets in a deflated file count inflated bytes: the end-of-file check must not call it truncated."""
    src = tmp_path / "src"
    deflated_ct(src / "deflated.dcm", PatientID="P1")
    plain = ct_variant(src / "plain.dcm", patient_id="P2")
    cut = deflated_ct(tmp_path / "whole.dcm").read_bytes()
    (src / "deflated_cut.dcm").write_bytes(cut[: len(cut) - 400])
    out = tmp_path / "dataset"
    summary = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    assert summary["card"]["n_images"] == 2
    assert quarantine_reasons(out) == {"deflated_cut.dcm": "truncated"}
    assert "Deflated Explicit VR Little Endian" in summary["card"]["fingerprint"]["transfer_syntaxes"]
    images = load_dataset(out).images
    assert plain.is_file() and np.array_equal(images[0], images[1])  # same pixels, whatever the encoding


def test_burned_in_annotation_and_secondary_capture_are_quarantined_unless_allowed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ct_variant(src / "plain.dcm", patient_id="P1")
    ct_variant(src / "burned.dcm", patient_id="P2", BurnedInAnnotation="YES")
    ct_variant(src / "screenshot.dcm", patient_id="P3", SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    out = tmp_path / "dataset"
    summary = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    assert summary["card"]["n_images"] == 1
    assert quarantine_reasons(out) == {"burned.dcm": "burned_in_annotation", "screenshot.dcm": "secondary_capture"}
    allowed = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1, allow_burned_in=True)
    assert allowed["card"]["n_images"] == 3 and allowed["card"]["n_files_quarantined"] == 0
    assert not read_models_csv(out / QUARANTINE_FILE, QuarantineRow)


def test_fingerprint_keeps_a_fixed_total_of_hu_values_whatever_the_archive_size() -> None:
    """The HU fingerprint's sample is a fixed total shared by the files (memory flat as the archive grows)."""
    from tasks.ingest.decode import HU_SAMPLE_BUDGET, hu_values_per_file, thin_hu_sample

    sample = np.arange(4096, dtype=np.float32)  # one 512 x 512 frame sampled every 8th pixel
    assert thin_hu_sample(sample, 4096) is sample  # small archives keep every value
    for n_files in (1_500, 15_000, 150_000):
        keep = hu_values_per_file(n_files)
        thinned = thin_hu_sample(sample, keep)
        assert thinned.size <= keep and n_files * thinned.size <= HU_SAMPLE_BUDGET
        step = -(-4096 // keep)  # evenly strided from the first value: independent of the function's arithmetic
        assert np.array_equal(thinned, np.arange(0, 4096, step, dtype=np.float32))
        assert thinned.base is None  # a copy: the whole sample is not kept alive by a view
    assert hu_values_per_file(1_500) >= 4096 and hu_values_per_file(15_000) == HU_SAMPLE_BUDGET // 15_000
    assert hu_values_per_file(10**9) == 1
