"""Building real DICOM files for tests from the files pydicom ships (offline), including broken ones."""

from __future__ import annotations

import io
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

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
    ct_variant(
        put("bad/colour.dcm", "not_grayscale"),
        PhotometricInterpretation="RGB",
        SamplesPerPixel=3,
        PlanarConfiguration=0,
    )
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    if tag.group == 0x0002:  # pydicom will not write a broken file meta: encode it here
        body = io.BytesIO()
        ds.save_as(body, enforce_file_format=True)
        meta_end = 132 + 12 + int.from_bytes(body.getvalue()[140:144], "little")
        meta = {t: (e.VR, bytes(e.value, "ascii") if isinstance(e.value, str) else bytes(e.value))
                for t, e in ds.file_meta.items() if t != 0x00020000}
        meta[tag] = (vr, raw)
        dest.write_bytes(b"\x00" * 128 + b"DICM" + _explicit_le_group(meta) + body.getvalue()[meta_end:])
        return dest
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    # Encoding given explicitly: pydicom need not check the raw value against the file meta.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(dest, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return dest


def _explicit_le_group(elements: dict[int, tuple[str, bytes]]) -> bytes:
    """File meta elements in Explicit VR Little Endian, led by their group length."""
    encoded = b""
    for tag, (vr, value) in sorted(elements.items()):
        if len(value) % 2:
            value += b"\x00"
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
        long_form = vr in {"OB", "OW", "OF", "OD", "OL", "SQ", "UC", "UN", "UR", "UT"}
        encoded += (
            head + (b"\x00\x00" + struct.pack("<I", len(value)) if long_form else struct.pack("<H", len(value))) + value
        )
    return struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<HI", 4, len(encoded)) + encoded


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


def jpeg2000_crasher(dest: Path, seed: int = 1) -> Path:
    """A CT file in JPEG 2000 Lossless whose one fragment is a JPEG 2000 start marker and random bytes: OpenJPEG
    refuses it, and gdcm (tried next) aborts the whole process with a C++ terminate."""
    import random

    ct_variant(dest, patient_id="CRASH")
    ds = pydicom.dcmread(dest)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + random.Random(seed).randbytes(2000)])
    ds["PixelData"].VR = "OB"
    ds.save_as(dest, enforce_file_format=True)
    return dest


def non_utf8_name(folder: Path, stem: bytes = b"bad\xff\xfename") -> Path:
    """A path in `folder` whose file name is not valid UTF-8 (as os.listdir gives it back: with surrogates)."""
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), stem + b".dcm")))


def raw_dataset(source: Path, dest: Path, *, implicit: bool = True) -> Path:
    """The data set of `source` alone: no preamble, no 'DICM', no file meta, as old archives store it."""
    ds = pydicom.dcmread(source)
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    dest.write_bytes(buffer.getvalue())
    return dest
