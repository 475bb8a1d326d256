"""Building real DICOM files for tests from the files pydicom ships (offline), including broken ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

BINARY_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "OB", "OW", "OF", "OD", "OL", "UN", "AT"}


def pydicom_file(name: str) -> Path:
    """Path of a file shipped inside pydicom (never the network)."""
    return Path(pydicom.data.get_testdata_file(name))


def ct_variant(dest: Path, *, patient_id: str = "PAT001", sop_uid: str | None = None, **changes: object) -> Path:
    """Write CT_small.dcm with a new SOP Instance UID, a patient ID and any attribute changes."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def multiframe_ct(dest: Path, frames: int = 3) -> Path:
    """A multi-frame CT (NumberOfFrames > 1) built from CT_small's pixels, each frame shifted in value."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    base = ds.pixel_array.astype(np.int16)
    stack = np.stack([base + 50 * i for i in range(frames)]).astype(base.dtype)
    ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def write_bad_inputs(root: Path) -> dict[str, str]:
    """One file per kind of bad input; returns relative path -> expected quarantine reason code."""
    expected: dict[str, str] = {}

    def put(rel: str, reason: str) -> Path:
        expected[rel] = reason
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    put("bad/notes.txt", "not_dicom").write_text("Referring physician notes, not an image\n")
    put("bad/empty.dcm", "empty_file").write_bytes(b"")
    raw = pydicom_file("CT_small.dcm").read_bytes()
    put("bad/truncated.dcm", "truncated").write_bytes(raw[: len(raw) // 2])
    ct_variant(put("bad/no_pixels.dcm", "no_pixel_data"))
    ds = pydicom.dcmread(root / "bad/no_pixels.dcm")
    del ds.PixelData
    ds.save_as(root / "bad/no_pixels.dcm", enforce_file_format=True)
    shutil.copy(pydicom_file("MR_small.dcm"), put("bad/mr.dcm", "not_ct"))
    ct_variant(put("bad/colour.dcm", "not_grayscale"), PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    ct_variant(put("bad/palette.dcm", "not_grayscale"), PhotometricInterpretation="PALETTE COLOR")
    nodecoder = ct_variant(put("bad/mpeg2.dcm", "no_decoder"))
    ds = pydicom.dcmread(nodecoder)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists for it
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.save_as(nodecoder, enforce_file_format=True)
    short = ct_variant(put("bad/short.dcm", "pixel_data_short"))
    ds = pydicom.dcmread(short)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(short, enforce_file_format=True)
    ct_variant(put("bad/huge.dcm", "absurd_size"), Rows=60000, Columns=60000)
    uid = generate_uid()
    ct_variant(root / "dup/a.dcm", sop_uid=uid)
    ct_variant(put("dup/b.dcm", "duplicate_sop_instance"), sop_uid=uid, PatientName="OTHER^COPY")
    put("bad/dangling", "unreadable").symlink_to(root / "does-not-exist")
    os.mkfifo(put("bad/fifo", "unreadable"))
    put("loops/up", "symlink_loop").symlink_to(root / "loops", target_is_directory=True)
    put("loops/self", "symlink_loop").symlink_to(root / "loops/self")
    shutil.copy(pydicom_file("DICOMDIR"), put("DICOMDIR", "dicomdir"))
    return expected


def with_raw_element(dest: Path, keyword: str, vr: str, raw: bytes, source: Path | None = None) -> Path:
    """Write a CT file (CT_small, or `source`) whose element `keyword` holds exactly these bytes under this VR.

    The bytes bypass pydicom's value checks on writing, so a file can hold what a broken writer would produce:
    'NaN' in an IS, garbage in a US, a string where a number belongs.
    """
    ds = pydicom.dcmread(source or pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    tag = Tag(tag_for_keyword(keyword))
    if len(raw) % 2:
        raw += b"\x00" if vr in BINARY_VRS else b" "
    target = ds.file_meta if tag.group == 0x0002 else ds
    target[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def deflated_ct(dest: Path, **changes: object) -> Path:
    """CT_small re-encoded as Deflated Explicit VR Little Endian (the whole dataset zlib-compressed)."""
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest
