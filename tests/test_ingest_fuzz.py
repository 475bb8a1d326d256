"""Fuzzing ingest with real, broken DICOM files: one bad file never stops a run, never crashes, never retries.

From pydicom's CT_small.dcm, over 500 seeded mutants are written: every header element ingest reads (and a few
it does not) set to empty, NaN, inf, negative, huge, multi-valued, a wrong VR or garbage bytes; plus random
byte flips in the header and truncations anywhere. Every mutant goes through the per-file validation function;
a seeded sample goes through the whole ingest flow beside good files.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from data_schemas.dataset import (
    PRIVATE_INDEX_FILE,
    QUARANTINE_FILE,
    DatasetCard,
    DecodedFileRecord,
    PrivateIndexRow,
    QuarantineReason,
    QuarantineRow,
)
from data_schemas.files import printable_path, read_models_csv, sha256_file
from flows.ingest import ingest_flow
from tasks.ingest.decode import convert_file
from tasks.ingest.dicom_io import MAX_MATRIX_SIDE
from tasks.ingest.discover import SourceFile
from tasks.ingest.preprocess import parse_window
from tests.dicom_factory import (
    BINARY_VRS,
    ct_variant,
    deflated_ct,
    jpeg2000_crasher,
    multiframe_ct,
    non_utf8_name,
    pydicom_file,
    raw_dataset,
    with_raw_element,
)

SEED = 20261130
SIZE = 32
FLOW_SAMPLE = 60
N_BYTE_FLIPS = 150
N_TRUNCATIONS = 130

# (keyword, VR in the data dictionary): every element ingest reads, then some the issue names that it does not.
READ_ELEMENTS = [
    ("SOPClassUID", "UI"), ("Modality", "CS"), ("PhotometricInterpretation", "CS"), ("SamplesPerPixel", "US"),
    ("Rows", "US"), ("Columns", "US"), ("NumberOfFrames", "IS"), ("BitsAllocated", "US"), ("BitsStored", "US"),
    ("HighBit", "US"), ("PixelRepresentation", "US"), ("RescaleSlope", "DS"), ("RescaleIntercept", "DS"),
    ("InstanceNumber", "IS"), ("PixelSpacing", "DS"), ("SliceThickness", "DS"), ("KVP", "DS"), ("PatientID", "LO"),
    ("StudyInstanceUID", "UI"), ("SeriesInstanceUID", "UI"), ("SOPInstanceUID", "UI"), ("Manufacturer", "LO"),
    ("ManufacturerModelName", "LO"), ("BurnedInAnnotation", "CS"), ("TransferSyntaxUID", "UI"),
]
UNREAD_ELEMENTS = [("StudyDate", "DA"), ("WindowCenter", "DS"), ("WindowWidth", "DS")]
MUTATIONS = ["empty", "nan", "inf", "negative", "huge", "multi", "wrong_vr", "garbage"]


@dataclass(frozen=True)
class Mutant:
    """One mutated file and what was done to it (keyword is empty for byte flips and truncations)."""

    path: Path
    kind: str
    keyword: str = ""
    payload: bytes = b""


def _binary(vr: str, mutation: str, rng: random.Random) -> tuple[str, bytes]:
    """Raw value for an element stored in binary (US): NaN, inf and negatives need another VR to exist at all."""
    return {
        "empty": (vr, b""),
        "nan": ("FD", struct.pack("<d", math.nan)),
        "inf": ("FD", struct.pack("<d", math.inf)),
        "negative": ("SS", struct.pack("<h", -5)),
        "huge": (vr, struct.pack("<H", 65535)),
        "multi": (vr, struct.pack("<HHH", 1, 2, 3)),
        "wrong_vr": ("LO", b"abc"),
        "garbage": (vr, rng.randbytes(rng.choice([1, 3, 6, 9]))),
    }[mutation]


def _text(vr: str, mutation: str, rng: random.Random) -> tuple[str, bytes]:
    """Raw value for an element stored as text (IS, DS, CS, LO, UI, DA)."""
    return {
        "empty": (vr, b""),
        "nan": (vr, b"NaN"),
        "inf": (vr, b"1e999"),
        "negative": (vr, b"-5"),
        "huge": (vr, b"1e300" if vr == "DS" else b"99999999999" if vr == "IS" else b"9" * 200),
        "multi": (vr, b"1\\2\\3"),
        "wrong_vr": ("US", struct.pack("<H", 7)),
        "garbage": (vr, rng.randbytes(rng.randint(1, 16))),
    }[mutation]


def _header_end(raw: bytes) -> int:
    """Offset of the pixel data element in CT_small: byte flips land before it, in the header."""
    return raw.index(b"\xe0\x7f\x10\x00")


def write_mutants(folder: Path, rng: random.Random) -> list[Mutant]:
    """Element mutations, byte flips and truncations of CT_small.dcm, all seeded."""
    folder.mkdir(parents=True, exist_ok=True)
    mutants = []
    for keyword, vr in READ_ELEMENTS + UNREAD_ELEMENTS:
        for mutation in MUTATIONS:
            vr_written, payload = (_binary if vr in BINARY_VRS else _text)(vr, mutation, rng)
            path = with_raw_element(folder / f"{keyword}-{mutation}.dcm", keyword, vr_written, payload)
            mutants.append(Mutant(path=path, kind=mutation, keyword=keyword, payload=payload))
    raw = pydicom_file("CT_small.dcm").read_bytes()
    end = _header_end(raw)
    for i in range(N_BYTE_FLIPS):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(end + 16)] ^= 1 << rng.randrange(8)
        path = folder / f"flip-{i:03d}.dcm"
        path.write_bytes(bytes(data))
        mutants.append(Mutant(path=path, kind="byte_flip"))
    for i in range(N_TRUNCATIONS):
        path = folder / f"cut-{i:03d}.dcm"
        path.write_bytes(raw[: rng.randrange(1, len(raw))])
        mutants.append(Mutant(path=path, kind="truncation"))
    return mutants


def write_good_files(folder: Path) -> list[Path]:
    """Files that must be accepted: CT_small variants, a deflated one, a multi-frame one."""
    good = [ct_variant(folder / f"ct-{i}.dcm", patient_id=f"GOOD{i % 3}", InstanceNumber=i) for i in range(4)]
    good.append(deflated_ct(folder / "deflated.dcm", PatientID="GOOD3"))
    good.append(multiframe_ct(folder / "multi.dcm", frames=2))
    return good


def assert_sane(record: DecodedFileRecord, images: np.ndarray, hu_sample: np.ndarray) -> None:
    """An accepted file's values are within what a CT can be and its images are finite and in [0, 1]."""
    DecodedFileRecord.model_validate_json(record.model_dump_json())
    assert 1 <= record.rows <= MAX_MATRIX_SIDE and 1 <= record.columns <= MAX_MATRIX_SIDE and record.n_frames >= 1
    assert images.shape == (record.n_frames, SIZE, SIZE)
    assert np.isfinite(images).all() and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert hu_sample.size > 0 and np.isfinite(hu_sample).all()
    for value in (record.pixel_spacing_mm, record.slice_thickness_mm, record.kvp):
        assert value is None or (math.isfinite(value) and value >= 0)
    assert record.photometric_interpretation in {"MONOCHROME1", "MONOCHROME2"}


def assert_quarantined_well(mutant: Mutant, record: DecodedFileRecord) -> None:
    """A rejected file has a reason code and a message that names it and, for a header value, the element only."""
    assert isinstance(record.reason, QuarantineReason)
    assert record.message.startswith(f"{record.relative_path}: ")
    text = record.message.split(": ", 1)[1]
    if mutant.keyword and record.reason is QuarantineReason.INVALID_HEADER and "header element" in text:
        assert mutant.keyword in text, f"{mutant.path.name}: {text}"
    printable = mutant.payload.decode("latin-1").strip()
    if len(printable) >= 3:
        assert printable not in text, f"{mutant.path.name} shows its value: {text}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Mutant], list[Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    mutants = write_mutants(root / "mutants", random.Random(SEED))
    return mutants, write_good_files(root / "good")


def test_every_mutant_is_accepted_sane_or_quarantined_with_a_reason(corpus: tuple[list[Mutant], list[Path]]) -> None:
    mutants, good = corpus
    assert len(mutants) >= 500
    window = parse_window("lung")
    verdicts: dict[str, int] = {}
    for mutant in mutants:
        source = SourceFile(
            path=str(mutant.path), relative_path=mutant.path.name, content_sha256=sha256_file(mutant.path)
        )
        converted = convert_file(source, SIZE, window)  # must never raise
        if converted.record.accepted:
            assert_sane(converted.record, converted.images, converted.hu_sample)
            verdicts["accepted"] = verdicts.get("accepted", 0) + 1
        else:
            assert_quarantined_well(mutant, converted.record)
            verdicts[converted.record.reason.value] = verdicts.get(converted.record.reason.value, 0) + 1
    for path in good:
        source = SourceFile(path=str(path), relative_path=path.name, content_sha256=sha256_file(path))
        assert convert_file(source, SIZE, window).record.accepted, path.name
    # The corpus really exercises the guard: many files quarantined for their header, many still accepted.
    assert verdicts.get("invalid_header", 0) >= 100 and verdicts.get("accepted", 0) >= 50, verdicts


def test_ingest_flow_on_mutants_beside_good_files_completes_without_retries(
    corpus: tuple[list[Mutant], list[Path]], tmp_path: Path
) -> None:
    mutants, good = corpus
    src = tmp_path / "src"
    sample = random.Random(SEED).sample(mutants, FLOW_SAMPLE)
    (src / "mutants").mkdir(parents=True)
    for mutant in sample:
        shutil.copy(mutant.path, src / "mutants" / mutant.path.name)
    shutil.copytree(good[0].parent, src / "good")
    out = tmp_path / "dataset"
    state = ingest_flow(src_dir=str(src), out_dir=str(out), size=SIZE, workers=1, return_state=True)
    assert state.is_completed()
    card = DatasetCard.model_validate(state.result()["card"])
    quarantine = {row.relative_path: row for row in read_models_csv(out / QUARANTINE_FILE, QuarantineRow)}
    assert card.n_files_seen == FLOW_SAMPLE + len(good) == card.n_files_ingested + card.n_files_quarantined
    assert not any(path.startswith("good/") for path in quarantine), "a good file was quarantined"
    assert all(row.message.startswith(f"{path}: ") for path, row in quarantine.items())
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert task_runs and all(run.run_count == 1 and run.state.is_completed() for run in task_runs), (
        "a chunk failed or was retried"
    )


HOSTILE_SEED = 23
N_HOSTILE_MUTANTS = 20


def write_hostile_corpus(root: Path, rng: random.Random) -> set[str]:
    """Good files in every form a real archive holds, beside what a hostile or broken source sends: a JPEG 2000
    file that aborts gdcm, one every decoder refuses, seeded byte flips, truncations and header mutants, an empty
    file, text, a pipe and a dangling link. Returns the good files' relative paths (as ingest shows them)."""
    good = [ct_variant(root / f"good/ct{i}.dcm", patient_id=f"GOOD{i % 3}", InstanceNumber=i) for i in range(5)]
    good.append(deflated_ct(root / "good/deflated.dcm", PatientID="GOOD3"))
    good.append(multiframe_ct(root / "good/multi.dcm", frames=2))
    good.append(ct_variant(non_utf8_name(root / "good"), patient_id="GOOD4"))
    good.append(
        raw_dataset(ct_variant(root / "raw-source.dcm", patient_id="GOOD5"), root / "good/raw-implicit", implicit=True)
    )
    (root / "raw-source.dcm").unlink()
    padded = ct_variant(root / "good/padded.dcm", patient_id="GOOD6")
    padded.write_bytes(padded.read_bytes() + b"\x00" * 16)
    good.append(padded)
    jpeg2000_crasher(root / "hostile/j2k-abort.dcm", seed=1)
    jpeg2000_crasher(root / "hostile/j2k-refused.dcm", seed=4)
    raw = pydicom_file("CT_small.dcm").read_bytes()
    end = _header_end(raw)
    for i in range(N_HOSTILE_MUTANTS):
        kind = rng.choice(["flip", "cut", "element"])
        path = root / f"hostile/{kind}-{i:02d}.dcm"
        if kind == "element":
            keyword, vr = rng.choice(READ_ELEMENTS)
            vr_written, payload = (_binary if vr in BINARY_VRS else _text)(vr, rng.choice(MUTATIONS), rng)
            with_raw_element(path, keyword, vr_written, payload)
            continue
        data = bytearray(raw)
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(end + 16)] ^= 1 << rng.randrange(8)
        else:
            data = data[: rng.randrange(1, len(raw))]
        path.write_bytes(bytes(data))
    (root / "hostile/empty.dcm").write_bytes(b"")
    (root / "hostile/notes.txt").write_text("not an image\n")
    os.mkfifo(root / "hostile/fifo")
    (root / "hostile/dangling").symlink_to(root / "does-not-exist")
    return {printable_path(path.relative_to(root)) for path in good}


def test_hostile_corpus_ingests_with_every_file_accounted_for(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "dataset"
    good = write_hostile_corpus(src, random.Random(HOSTILE_SEED))
    n_files = sum(1 for path in src.rglob("*") if path.is_symlink() or not path.is_dir())
    # Enough files for the process pool: a worker killed by the aborting file is replaced.
    state = ingest_flow(src_dir=str(src), out_dir=str(out), size=SIZE, workers=2, return_state=True)
    assert state.is_completed()
    card = DatasetCard.model_validate(state.result()["card"])
    quarantine = {row.relative_path: row.reason for row in read_models_csv(out / QUARANTINE_FILE, QuarantineRow)}
    indexed = {row.relative_path for row in read_models_csv(out / PRIVATE_INDEX_FILE, PrivateIndexRow)}
    assert card.n_files_seen == n_files == card.n_files_ingested + card.n_files_quarantined
    assert len(indexed) == card.n_files_ingested and not indexed & set(quarantine)
    assert good <= indexed, f"good files quarantined: {sorted(good - indexed)}"
    assert quarantine["hostile/j2k-abort.dcm"] is QuarantineReason.DECODER_CRASHED
    assert quarantine["hostile/j2k-refused.dcm"] is QuarantineReason.DECODE_ERROR
