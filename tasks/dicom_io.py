"""Reading, validating and decoding one DICOM file into HU frames, or a quarantine reason.

Checks run cheapest first and before anything large is allocated: size, DICOM-ness, DICOMDIR, modality,
pixel data presence, photometric interpretation, claimed matrix size, decoder availability, pixel data
length; only then is the pixel data decoded.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale, get_decoder
from pydicom.uid import UID

from data_schemas.dataset import DecodedFileRecord, QuarantineReason

CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Reject claimed sizes beyond any CT scanner's output before allocating a byte for them.
MAX_MATRIX_SIDE = 4096
MAX_TOTAL_PIXELS = 2_000 * 1024 * 1024 // 2  # 2 GiB of 16-bit samples per file
GRAYSCALE = {"MONOCHROME1", "MONOCHROME2"}


class Rejected(Exception):
    """A file that cannot become an image, with its stable reason code and a human message."""

    def __init__(self, reason: QuarantineReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class DecodedFile:
    """An accepted file: its metadata record and its frames in Hounsfield units."""

    record: DecodedFileRecord
    hu_frames: np.ndarray  # (F, rows, cols) float32


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _float_or_none(value: object) -> float | None:
    try:
        return None if value in (None, "") else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _pixel_spacing(ds: pydicom.Dataset) -> float | None:
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        try:
            spacing = shared[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError, TypeError, KeyError):
            return None
    try:
        return float(spacing[0])
    except (TypeError, ValueError, IndexError):
        return None


def _slice_thickness(ds: pydicom.Dataset) -> float | None:
    value = _float_or_none(ds.get("SliceThickness"))
    if value is None:
        try:
            value = _float_or_none(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness)
        except (AttributeError, IndexError, TypeError, KeyError):
            return None
    return value


def _check_parsed_to_end(ds: pydicom.Dataset, file_size: int, relative_path: str) -> None:
    """pydicom stops quietly at a cut; a file whose last element does not end at end-of-file is truncated."""
    if not len(ds):
        return
    last = ds.get_item(max(ds.keys()))
    value_tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if value_tell is None or length is None or length == 0xFFFFFFFF:
        return  # already parsed or undefined length (encapsulated): nothing to compare
    if value_tell + length != file_size:
        raise Rejected(
            QuarantineReason.TRUNCATED,
            f"{relative_path}: file is truncated ({file_size} bytes; its last element needs {value_tell + length})",
        )


def read_header(path: Path, relative_path: str) -> pydicom.Dataset:
    """Parse a file; pixel data stays raw bytes until the checks have passed."""
    try:
        size = path.stat().st_size
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise Rejected(QuarantineReason.SYMLINK_LOOP, f"{relative_path}: symbolic link loop") from None
        raise Rejected(QuarantineReason.UNREADABLE, f"{relative_path}: cannot be read ({error.strerror})") from None
    if size == 0:
        raise Rejected(QuarantineReason.EMPTY_FILE, f"{relative_path}: empty file (0 bytes)")
    try:
        # Read whole (bounded by the file's real size); nothing is allocated from the header's claims until the
        # checks below have passed.
        ds = pydicom.dcmread(path)
        _check_parsed_to_end(ds, size, relative_path)
        return ds
    except InvalidDicomError:
        pass  # no preamble/'DICM': accept only if a forced read finds real SOP identity tags
    except PermissionError as error:
        raise Rejected(QuarantineReason.UNREADABLE, f"{relative_path}: cannot be read ({error.strerror})") from None
    except Rejected:
        raise
    except (EOFError, OSError) as error:
        raise Rejected(QuarantineReason.TRUNCATED, f"{relative_path}: file ends inside the DICOM header ({type(error).__name__})") from None
    except Exception as error:  # pydicom raises many kinds of errors on corrupt headers
        raise Rejected(QuarantineReason.INVALID_HEADER, f"{relative_path}: unreadable DICOM header ({type(error).__name__})") from None
    try:
        ds = pydicom.dcmread(path, force=True)
        if "SOPClassUID" in ds and "SOPInstanceUID" in ds and "PixelData" in ds or "Modality" in ds and "SOPClassUID" in ds:
            return ds
    except Exception:
        pass
    raise Rejected(QuarantineReason.NOT_DICOM, f"{relative_path}: not a DICOM file")


def _check_image_header(ds: pydicom.Dataset, relative_path: str) -> None:
    """Reject non-image, non-CT, colour and absurdly sized files from the header alone."""
    sop_class = _text(ds, "SOPClassUID") or _text(getattr(ds, "file_meta", pydicom.Dataset()), "MediaStorageSOPClassUID")
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise Rejected(QuarantineReason.DICOMDIR, f"{relative_path}: DICOMDIR (a media index, not an image)")
    modality = _text(ds, "Modality").upper()
    if modality != "CT" and sop_class not in CT_SOP_CLASSES:
        shown = modality or "missing"
        raise Rejected(QuarantineReason.NOT_CT, f"{relative_path}: modality is {shown}, not CT")
    if "PixelData" not in ds:
        raise Rejected(QuarantineReason.NO_PIXEL_DATA, f"{relative_path}: CT object without pixel data")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in GRAYSCALE or samples != 1:
        raise Rejected(
            QuarantineReason.NOT_GRAYSCALE,
            f"{relative_path}: {photometric or 'unknown'} image with {samples} samples per pixel; only grayscale CT is used",
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise Rejected(QuarantineReason.INVALID_HEADER, f"{relative_path}: Rows, Columns or NumberOfFrames missing or invalid") from None
    if rows < 1 or cols < 1 or frames < 1 or max(rows, cols) > MAX_MATRIX_SIDE or rows * cols * frames > MAX_TOTAL_PIXELS:
        raise Rejected(
            QuarantineReason.ABSURD_SIZE,
            f"{relative_path}: header claims {frames} frame(s) of {rows} x {cols}; "
            f"the limit is {MAX_MATRIX_SIDE} per side and {MAX_TOTAL_PIXELS} pixels per file",
        )


def _check_pixel_data(ds: pydicom.Dataset, relative_path: str) -> None:
    """Reject missing decoders and native pixel data shorter than the header promises."""
    syntax = UID(_text(ds.file_meta, "TransferSyntaxUID") if hasattr(ds, "file_meta") else "") or pydicom.uid.ImplicitVRLittleEndian
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise Rejected(QuarantineReason.NO_DECODER, f"{relative_path}: no decoder for transfer syntax {syntax}") from None
    if not decoder.is_available:
        raise Rejected(
            QuarantineReason.NO_DECODER,
            f"{relative_path}: no installed decoder for transfer syntax {syntax.name or syntax}",
        )
    try:
        data = ds.PixelData  # reads the deferred value now that its size is known to be sane
    except Exception as error:
        raise Rejected(QuarantineReason.TRUNCATED, f"{relative_path}: pixel data cannot be read ({type(error).__name__})") from None
    if not syntax.is_compressed:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("BitsAllocated", 16)) // 8
        if data is None or len(data) < expected:
            got = 0 if data is None else len(data)
            raise Rejected(
                QuarantineReason.PIXEL_DATA_SHORT,
                f"{relative_path}: pixel data has {got} bytes, the header needs {expected}",
            )


def read_ct_file(path: Path, relative_path: str) -> DecodedFile:
    """Validate and decode one CT file into HU frames; raise Rejected with a reason otherwise."""
    ds = read_header(path, relative_path)
    _check_image_header(ds, relative_path)
    _check_pixel_data(ds, relative_path)
    try:
        pixels = ds.pixel_array
    except Exception as error:
        raise Rejected(QuarantineReason.DECODE_ERROR, f"{relative_path}: pixel data could not be decoded ({type(error).__name__})") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = pixels.reshape(frames, int(ds.Rows), int(ds.Columns))
    hu = apply_rescale(pixels, ds).astype(np.float32, copy=False)
    syntax = UID(_text(ds.file_meta, "TransferSyntaxUID")) if hasattr(ds, "file_meta") else UID("")
    instance = _float_or_none(ds.get("InstanceNumber"))
    record = DecodedFileRecord(
        relative_path=relative_path,
        accepted=True,
        patient_id=_text(ds, "PatientID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        instance_number=None if instance is None else int(instance),
        n_frames=frames,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing_mm=_pixel_spacing(ds),
        slice_thickness_mm=_slice_thickness(ds),
        manufacturer=_text(ds, "Manufacturer"),
        model_name=_text(ds, "ManufacturerModelName"),
        kvp=_float_or_none(ds.get("KVP")),
        transfer_syntax=syntax.name if syntax else "",
        photometric_interpretation=_text(ds, "PhotometricInterpretation").upper(),
    )
    return DecodedFile(record=record, hu_frames=hu)

