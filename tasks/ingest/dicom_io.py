"""Reading, validating and decoding one DICOM file into HU frames, or a quarantine reason.

Checks run cheapest first and before anything large is allocated: size, DICOM-ness, DICOMDIR, modality,
pixel data presence, photometric interpretation, claimed matrix size and bit layout, decoder availability,
pixel data length; only then is the pixel data decoded. Every header value is converted by `header_value`,
so a malformed value quarantines its file (`invalid_header`, naming the element, never the value) instead of
stopping the run.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import re
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_rescale, get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

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
KNOWN_PHOTOMETRIC = GRAYSCALE | {
    "PALETTE COLOR",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
    "XYB",
}
# Secondary Capture (single- and multi-frame): screenshots and derived pictures that may carry burned-in text.
SECONDARY_CAPTURE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
}
# Plausible ranges of the header values ingest uses; a value outside is a broken header, not a scanner setting.
CT_BITS_ALLOCATED = (8, 16, 32)
SPACING_RANGE_MM = (1e-3, 100.0)
THICKNESS_RANGE_MM = (0.0, 1000.0)
KVP_RANGE = (1.0, 1000.0)
SLOPE_LIMIT = 1e4
INTERCEPT_LIMIT = 1e5
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
HeaderT = TypeVar("HeaderT")
# Decoding plugins tried first, in this order, where pydicom offers them; the others follow in pydicom's order.
# pylibjpeg (OpenJPEG) before gdcm for JPEG 2000: gdcm aborts the whole process (C++ terminate) on some corrupt
# codestreams that OpenJPEG refuses with an error, and OpenJPEG decodes JPEG 2000 faster.
PREFERRED_PLUGINS = ("pylibjpeg",)
JPEG_2000_SYNTAXES = {
    pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEG2000, pydicom.uid.HTJ2KLossless, pydicom.uid.HTJ2KLosslessRPCL,
    pydicom.uid.HTJ2K,
}
DECODER_DETAIL_CHARS = 100
MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object reprs in decoder messages: differ from run to run


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


def _is_multi(value: object) -> bool:
    return isinstance(value, (list, tuple, MultiValue, Sequence, Dataset, bytes, bytearray))


def _single(value: object) -> object:
    """The value itself; a multi-valued, sequence or binary value where one value belongs is invalid."""
    if _is_multi(value):
        raise ValueError("more than one value")
    return value


def one_of(choices: tuple[int, ...]) -> Callable[[object], int]:
    """Converter to a whole number among `choices`."""

    def convert(value: object) -> int:
        number = integer_in(min(choices), max(choices))(value)
        if number not in choices:
            raise ValueError("not an allowed value")
        return number

    return convert


def integer_in(low: int, high: int) -> Callable[[object], int]:
    """Converter to a whole number in [low, high] (IS strings such as '12' or '12.0' included)."""

    def convert(value: object) -> int:
        value = _single(value)
        number = value if isinstance(value, int) else float(value)  # type: ignore[arg-type]
        if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
            raise ValueError("not a whole number")
        if not low <= int(number) <= high:
            raise ValueError("out of range")
        return int(number)

    return convert


def real_in(low: float, high: float, *, multi: bool = False) -> Callable[[object], float]:
    """Converter to a finite number in [low, high] (the first of several when multi; every one is checked)."""

    def convert(value: object) -> float:
        values = (
            list(value)
            if multi and _is_multi(value) and not isinstance(value, (bytes, bytearray))
            else [_single(value)]
        )
        numbers = [float(item) for item in values]  # type: ignore[arg-type]
        if not numbers or not all(math.isfinite(n) and low <= n <= high for n in numbers):
            raise ValueError("not a finite number in range")
        return numbers[0]

    return convert


def text_up_to(max_length: int) -> Callable[[object], str]:
    """Converter to one printable string of at most max_length characters, stripped."""

    def convert(value: object) -> str:
        text = _single(value)
        if not isinstance(text, str):
            raise ValueError("not text")
        text = text.strip().rstrip("\x00").strip()
        if len(text) > max_length or not text.isprintable():
            raise ValueError("not printable text of a valid length")
        return text

    return convert


def uid(value: object) -> str:
    """Converter to a DICOM UID: digits and dots, at most 64 characters."""
    text = text_up_to(64)(value)
    if not UID_PATTERN.match(text):
        raise ValueError("not a UID")
    return text


def header_value(
    ds: Dataset, keyword: str, convert: Callable[[object], HeaderT], relative_path: str, *, required: bool = False
) -> HeaderT | None:
    """Read and convert one header element under one guard; None when absent or empty (unless required).

    Any failure - pydicom cannot parse the bytes, or the value is not what `convert` accepts - quarantines the
    file as invalid_header with a message naming the element, never its value (values may identify a patient).
    """
    try:
        value = ds.get(keyword)  # pydicom parses the raw bytes on first access: this itself can raise
        empty = value is None or (isinstance(value, (str, bytes, list, MultiValue, Sequence)) and len(value) == 0)
    except Exception:
        raise Rejected(
            QuarantineReason.INVALID_HEADER, f"{relative_path}: header element {keyword} cannot be parsed"
        ) from None
    if empty:
        if required:
            raise Rejected(QuarantineReason.INVALID_HEADER, f"{relative_path}: header element {keyword} is missing or "
                                                            "empty")
        return None
    try:
        return convert(value)
    except Exception:
        raise Rejected(QuarantineReason.INVALID_HEADER, f"{relative_path}: header element {keyword} has an invalid "
                                                        "value") from None


def _text(ds: Dataset, keyword: str, relative_path: str, max_length: int = 64) -> str:
    return header_value(ds, keyword, text_up_to(max_length), relative_path) or ""


def _pixel_spacing(ds: Dataset, relative_path: str) -> float | None:
    """Row spacing in mm from PixelSpacing, or from the shared functional groups of an enhanced CT."""
    spacing = real_in(*SPACING_RANGE_MM, multi=True)
    if "PixelSpacing" in ds:
        return header_value(ds, "PixelSpacing", spacing, relative_path)
    measures = _shared_pixel_measures(ds, relative_path)
    return None if measures is None else header_value(measures, "PixelSpacing", spacing, relative_path)


def _slice_thickness(ds: Dataset, relative_path: str) -> float | None:
    """Slice thickness in mm, from the image or the shared functional groups of an enhanced CT."""
    thickness = real_in(*THICKNESS_RANGE_MM)
    if "SliceThickness" in ds:
        return header_value(ds, "SliceThickness", thickness, relative_path)
    measures = _shared_pixel_measures(ds, relative_path)
    return None if measures is None else header_value(measures, "SliceThickness", thickness, relative_path)


def _shared_pixel_measures(ds: Dataset, relative_path: str) -> Dataset | None:
    """The Pixel Measures item of an enhanced CT's shared functional groups, if there is one."""
    if "SharedFunctionalGroupsSequence" not in ds:
        return None
    try:
        return ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    except Exception:
        raise Rejected(
            QuarantineReason.INVALID_HEADER, f"{relative_path}: header element SharedFunctionalGroupsSequence cannot "
                                             "be parsed"
        ) from None


def _check_parsed_to_end(ds: Dataset, file_size: int, relative_path: str) -> None:
    """pydicom stops quietly at a cut; a file whose last element ends beyond end-of-file is truncated."""
    if not len(ds):
        return
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # offsets count inflated bytes, not file bytes; zlib itself refuses a cut stream
    last = ds.get_item(max(ds.keys()))
    value_tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if value_tell is None or length is None or length == 0xFFFFFFFF:
        return  # already parsed or undefined length (encapsulated): nothing to compare
    # Bytes after the last element (padding some archives add) are ignored, as dcmtk does; only a cut is refused.
    if value_tell + length > file_size:
        raise Rejected(
            QuarantineReason.TRUNCATED,
            f"{relative_path}: file is truncated ({file_size} bytes; its last element needs {value_tell + length})",
        )


def read_header(path: Path, relative_path: str) -> Dataset:
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
    except zlib.error:
        raise Rejected(QuarantineReason.TRUNCATED, f"{relative_path}: deflated data set is cut or corrupt") from None
    except (EOFError, OSError) as error:
        raise Rejected(QuarantineReason.TRUNCATED, f"{relative_path}: file ends inside the DICOM header "
                                                   f"({type(error).__name__})") from None
    except Exception as error:  # pydicom raises many kinds of errors on corrupt headers
        raise Rejected(QuarantineReason.INVALID_HEADER, f"{relative_path}: unreadable DICOM header "
                                                        f"({type(error).__name__})") from None
    try:
        ds = pydicom.dcmread(path, force=True)
        if (
            "SOPClassUID" in ds
            and "SOPInstanceUID" in ds
            and "PixelData" in ds
            or "Modality" in ds
            and "SOPClassUID" in ds
        ):
            _check_parsed_to_end(ds, size, relative_path)
            return _with_inferred_transfer_syntax(ds)
    except Rejected:
        raise
    except Exception:
        pass
    raise Rejected(QuarantineReason.NOT_DICOM, f"{relative_path}: not a DICOM file")


def _with_inferred_transfer_syntax(ds: Dataset) -> Dataset:
    """A raw data set (no preamble, no file meta, as old archives hold) gets the transfer syntax its bytes were read
    in: pydicom's forced read tells implicit from explicit VR and the byte order from the first elements, as dcmtk
    does. Without it, decoding would not know how the pixel data is encoded."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little_endian = ds.original_encoding
    if implicit is None or little_endian is None:
        return ds
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian if implicit
        else pydicom.uid.ExplicitVRLittleEndian if little_endian else pydicom.uid.ExplicitVRBigEndian
    )
    return ds


def _sop_class(ds: Dataset, relative_path: str) -> str:
    """SOP Class UID from the dataset, else from the file meta information."""
    sop_class = header_value(ds, "SOPClassUID", uid, relative_path)
    meta = getattr(ds, "file_meta", None)
    if not sop_class and meta is not None:
        sop_class = header_value(meta, "MediaStorageSOPClassUID", uid, relative_path)
    return sop_class or ""


def _check_image_header(ds: Dataset, relative_path: str) -> str:
    """Reject non-image, non-CT and colour files from the header alone; return the SOP Class UID."""
    sop_class = _sop_class(ds, relative_path)
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise Rejected(QuarantineReason.DICOMDIR, f"{relative_path}: DICOMDIR (a media index, not an image)")
    modality = _text(ds, "Modality", relative_path, 16).upper()
    if modality != "CT" and sop_class not in CT_SOP_CLASSES:
        shown = (
            "missing"
            if not modality
            else modality
            if modality.isalnum() and len(modality) <= 4
            else "not a modality code"
        )
        raise Rejected(QuarantineReason.NOT_CT, f"{relative_path}: modality is {shown}, not CT")
    if "PixelData" not in ds:
        raise Rejected(QuarantineReason.NO_PIXEL_DATA, f"{relative_path}: CT object without pixel data")
    photometric = _text(ds, "PhotometricInterpretation", relative_path, 16).upper()
    samples = header_value(ds, "SamplesPerPixel", integer_in(1, 4), relative_path) or 1
    if photometric not in GRAYSCALE or samples != 1:
        shown = photometric if photometric in KNOWN_PHOTOMETRIC else "unknown"
        raise Rejected(
            QuarantineReason.NOT_GRAYSCALE,
            f"{relative_path}: {shown or 'unknown'} image with {samples} samples per pixel; only grayscale CT is used",
        )
    return sop_class


@dataclass(frozen=True)
class PixelLayout:
    """The checked pixel geometry of a file: what the decoder is asked for."""

    rows: int
    columns: int
    frames: int
    bits_allocated: int


def _pixel_layout(ds: Dataset, relative_path: str) -> PixelLayout:
    """Rows, columns, frames and bit layout, each converted under the guard; absurd sizes rejected before allocating."""
    rows = header_value(ds, "Rows", integer_in(0, 65535), relative_path, required=True)
    cols = header_value(ds, "Columns", integer_in(0, 65535), relative_path, required=True)
    frames = header_value(ds, "NumberOfFrames", integer_in(-(2**31), 2**31 - 1), relative_path)
    frames = 1 if frames is None else frames
    if (
        rows < 1
        or cols < 1
        or frames < 1
        or max(rows, cols) > MAX_MATRIX_SIDE
        or rows * cols * frames > MAX_TOTAL_PIXELS
    ):
        raise Rejected(
            QuarantineReason.ABSURD_SIZE,
            f"{relative_path}: header claims {frames} frame(s) of {rows} x {cols}; "
            f"the limit is {MAX_MATRIX_SIDE} per side and {MAX_TOTAL_PIXELS} pixels per file",
        )
    bits_allocated = header_value(ds, "BitsAllocated", one_of(CT_BITS_ALLOCATED), relative_path, required=True)
    bits_stored = header_value(ds, "BitsStored", integer_in(1, bits_allocated), relative_path, required=True)
    header_value(ds, "HighBit", integer_in(bits_stored - 1, bits_allocated - 1), relative_path)
    header_value(ds, "PixelRepresentation", integer_in(0, 1), relative_path, required=True)
    return PixelLayout(rows=rows, columns=cols, frames=frames, bits_allocated=bits_allocated)


def _transfer_syntax(ds: Dataset, relative_path: str) -> UID:
    """The file's transfer syntax (Implicit VR Little Endian when there is no file meta information)."""
    meta = getattr(ds, "file_meta", None)
    value = None if meta is None else header_value(meta, "TransferSyntaxUID", uid, relative_path)
    return UID(value) if value else pydicom.uid.ImplicitVRLittleEndian


def _check_pixel_data(ds: Dataset, layout: PixelLayout, syntax: UID, relative_path: str) -> None:
    """Reject missing decoders and native pixel data shorter than the header promises."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise Rejected(
            QuarantineReason.NO_DECODER, f"{relative_path}: no decoder for transfer syntax {syntax}"
        ) from None
    if not decoder.is_available:
        raise Rejected(
            QuarantineReason.NO_DECODER,
            f"{relative_path}: no installed decoder for transfer syntax {syntax.name or syntax}",
        )
    try:
        data = ds.PixelData  # reads the deferred value now that its size is known to be sane
    except Exception as error:
        raise Rejected(QuarantineReason.TRUNCATED, f"{relative_path}: pixel data cannot be read "
                                                   f"({type(error).__name__})") from None
    if not syntax.is_compressed:
        expected = layout.rows * layout.columns * layout.frames * layout.bits_allocated // 8
        if not isinstance(data, (bytes, bytearray)) or len(data) < expected:
            got = len(data) if isinstance(data, (bytes, bytearray)) else 0
            raise Rejected(
                QuarantineReason.PIXEL_DATA_SHORT,
                f"{relative_path}: pixel data has {got} bytes, the header needs {expected}",
            )


def _yes_or_no(value: object) -> bool:
    """Converter for a YES/NO flag such as BurnedInAnnotation; anything else is invalid (so never taken as NO)."""
    flag = text_up_to(3)(value).upper()
    if flag not in {"YES", "NO"}:
        raise ValueError("not YES or NO")
    return flag == "YES"


def _slope(value: object) -> float:
    """Converter for Rescale Slope: finite, non-zero, within SLOPE_LIMIT."""
    slope = real_in(-SLOPE_LIMIT, SLOPE_LIMIT)(value)
    if slope == 0:
        raise ValueError("zero slope")
    return slope


def _integer_rescale(ds: Dataset, pixels: np.ndarray, slope: float | None, intercept: float | None) -> bool:
    """True when the modality LUT is a rescale by an integer slope and intercept (no Modality LUT Sequence) of
    16-bit or smaller integer pixels, for which pixel x slope + intercept is exact in float32: |pixel| <= 2**16,
    |slope| <= 2**7, |intercept| <= 2**22, so every product and sum stays below 2**24."""
    if "ModalityLUTSequence" in ds or slope is None or intercept is None:
        return False
    if pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2:
        return False
    return (
        float(slope).is_integer() and float(intercept).is_integer() and abs(slope) <= 2**7 and abs(intercept) <= 2**22
    )


def decoding_plugins(syntax: UID) -> list[str]:
    """The installed decoding plugins for a compressed transfer syntax, in the order they are tried (see
    PREFERRED_PLUGINS); empty for native (uncompressed) pixel data, which needs no plugin."""
    available = list(get_decoder(syntax).available_plugins) if syntax.is_compressed else []
    if syntax not in JPEG_2000_SYNTAXES:
        return available
    return [name for name in PREFERRED_PLUGINS if name in available] + [
        n for n in available if n not in PREFERRED_PLUGINS
    ]


def _decoder_detail(plugin: str, error: Exception) -> str:
    """One short printable line for a plugin's failure (pydicom wraps it as 'plugin: detail' in a longer text)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[-1] if lines else type(error).__name__
    detail = MEMORY_ADDRESS.sub("", detail.removeprefix(f"{plugin}: "))
    detail = "".join(char if char.isprintable() else "?" for char in detail)
    return f"{plugin}: {detail[:DECODER_DETAIL_CHARS]}"


def decode_pixels(ds: Dataset, syntax: UID, relative_path: str) -> np.ndarray:
    """The pixel array, trying each decoding plugin in turn (decoding_plugins); a file that every plugin refuses is
    rejected as decode_error with one line naming each plugin's complaint."""
    plugins = decoding_plugins(syntax)
    if not plugins:
        try:
            return ds.pixel_array
        except Exception as error:
            raise Rejected(QuarantineReason.DECODE_ERROR, f"{relative_path}: pixel data could not be decoded "
                                                          f"({type(error).__name__})") from None
    failures = []
    for plugin in plugins:
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except Exception as error:
            failures.append(_decoder_detail(plugin, error))
    raise Rejected(QuarantineReason.DECODE_ERROR, f"{relative_path}: pixel data could not be decoded "
                                                  f"({'; '.join(failures)})")


def _decode_hounsfield(ds: Dataset, layout: PixelLayout, syntax: UID, relative_path: str) -> np.ndarray:
    """Decode the pixels and apply the modality LUT; the result is (frames, rows, cols) finite float32 HU."""
    slope = header_value(ds, "RescaleSlope", _slope, relative_path)
    intercept = header_value(ds, "RescaleIntercept", real_in(-INTERCEPT_LIMIT, INTERCEPT_LIMIT), relative_path)
    pixels = decode_pixels(ds, syntax, relative_path)
    try:
        pixels = pixels.reshape(layout.frames, layout.rows, layout.columns)
        if _integer_rescale(ds, pixels, slope, intercept):
            # Exact in float32 (integers below 2**24), so the same values as pydicom's float64 result, with a
            # third of the memory traffic: the usual CT header (slope 1, intercept -1024) takes this path.
            hu = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        else:
            hu = apply_rescale(pixels, ds).astype(np.float32, copy=False)
    except Exception as error:
        raise Rejected(QuarantineReason.DECODE_ERROR, f"{relative_path}: pixel data could not be decoded "
                                                      f"({type(error).__name__})") from None
    if not np.isfinite(hu).all():
        raise Rejected(
            QuarantineReason.INVALID_HEADER,
            f"{relative_path}: header elements RescaleSlope and RescaleIntercept give non-finite Hounsfield units",
        )
    return hu


def _file_record(
    ds: Dataset, layout: PixelLayout, syntax: UID, sop_class: str, relative_path: str
) -> DecodedFileRecord:
    """The accepted file's metadata, every element converted under the guard."""
    instance = header_value(ds, "InstanceNumber", integer_in(-(2**31), 2**31 - 1), relative_path)
    return DecodedFileRecord(
        relative_path=relative_path,
        accepted=True,
        patient_id=_text(ds, "PatientID", relative_path),
        study_instance_uid=header_value(ds, "StudyInstanceUID", uid, relative_path) or "",
        series_instance_uid=header_value(ds, "SeriesInstanceUID", uid, relative_path) or "",
        sop_instance_uid=header_value(ds, "SOPInstanceUID", uid, relative_path) or "",
        instance_number=instance,
        n_frames=layout.frames,
        rows=layout.rows,
        columns=layout.columns,
        pixel_spacing_mm=_pixel_spacing(ds, relative_path),
        slice_thickness_mm=_slice_thickness(ds, relative_path),
        manufacturer=_text(ds, "Manufacturer", relative_path),
        model_name=_text(ds, "ManufacturerModelName", relative_path),
        kvp=header_value(ds, "KVP", real_in(*KVP_RANGE), relative_path),
        transfer_syntax=syntax.name if syntax else "",
        photometric_interpretation=_text(ds, "PhotometricInterpretation", relative_path, 16).upper(),
        burned_in_annotation=header_value(ds, "BurnedInAnnotation", _yes_or_no, relative_path) is True,
        secondary_capture=sop_class in SECONDARY_CAPTURE_SOP_CLASSES,
    )


@contextlib.contextmanager
def values_never_logged() -> Iterator[None]:
    """Keep pydicom from logging or warning about invalid values (its messages quote the value, which may identify)
    and from logging a traceback for each decoding plugin that fails (the file's quarantine line says it once)."""
    previous = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom_logger = logging.getLogger("pydicom")  # its child loggers (the decoders) inherit the level
    level = pydicom_logger.level
    pydicom_logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom.config.settings.reading_validation_mode = previous
        pydicom_logger.setLevel(level)


def read_ct_file(path: Path, relative_path: str) -> DecodedFile:
    """Validate and decode one CT file into HU frames; raise Rejected with a reason otherwise.

    Every header value is read through header_value (one guard, element named on failure), header checks run
    before the pixel data is touched, and the record is complete before the (costly) decode.
    """
    with values_never_logged():
        return _read_ct_file(path, relative_path)


def _read_ct_file(path: Path, relative_path: str) -> DecodedFile:
    """read_ct_file's checks and decode, in order."""
    ds = read_header(path, relative_path)
    sop_class = _check_image_header(ds, relative_path)
    layout = _pixel_layout(ds, relative_path)
    syntax = _transfer_syntax(ds, relative_path)
    _check_pixel_data(ds, layout, syntax, relative_path)
    record = _file_record(ds, layout, syntax, sop_class, relative_path)
    return DecodedFile(record=record, hu_frames=_decode_hounsfield(ds, layout, syntax, relative_path))
