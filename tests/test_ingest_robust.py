"""Files that used to stop an ingest: a decoder that kills its process, a file name that is not UTF-8.

The decoder-aborting file is real: gdcm aborts the process (C++ terminate) on it. A second kind of crash is
planted by patching the conversion before the decode processes fork, so that the pool's recovery is tested
whatever the installed decoders do.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import pytest
from pydicom.uid import JPEG2000Lossless

from data_schemas.dataset import (
    PRIVATE_INDEX_FILE,
    QUARANTINE_FILE,
    DatasetCard,
    PrivateIndexRow,
    QuarantineReason,
    QuarantineRow,
)
from data_schemas.files import printable_path, read_models_csv, sha256_file
from flows.ingest import ingest_flow
from tasks.ingest.decode import cache_path, decoding_marker, preprocessing_signature
from tasks.ingest.dicom_io import Rejected, decoding_plugins, read_ct_file
from tasks.ingest.discover import SourceFile
from tasks.ingest.preprocess import parse_window
from tests.dicom_factory import ct_variant, jpeg2000_crasher, non_utf8_name, raw_dataset

# The modules themselves (tasks.ingest re-exports a function named decode_pool).
decode = importlib.import_module("tasks.ingest.decode")
decode_pool = importlib.import_module("tasks.ingest.decode_pool")

SIZE = 32


def _source(path: Path, root: Path) -> SourceFile:
    return SourceFile(
        path=str(path), relative_path=printable_path(path.relative_to(root)), content_sha256=sha256_file(path)
    )


def test_decoder_abort_and_non_utf8_name_leave_the_ingest_going(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "dataset"
    good = [ct_variant(src / f"ct{i}.dcm", patient_id=f"P{i}") for i in range(3)]
    odd_name = ct_variant(non_utf8_name(src), patient_id="P9")
    jpeg2000_crasher(src / "crash.dcm")
    state = ingest_flow(src_dir=str(src), out_dir=str(out), size=SIZE, workers=1, return_state=True)
    assert state.is_completed()
    card = DatasetCard.model_validate(state.result()["card"])
    assert (card.n_files_seen, card.n_files_ingested, card.n_files_quarantined) == (5, 4, 1)
    quarantine = read_models_csv(out / QUARANTINE_FILE, QuarantineRow)
    assert [(row.relative_path, row.reason) for row in quarantine] == [("crash.dcm", QuarantineReason.DECODER_CRASHED)]
    assert "killed by SIGABRT" in quarantine[0].message
    indexed = {row.relative_path for row in read_models_csv(out / PRIVATE_INDEX_FILE, PrivateIndexRow)}
    assert indexed == {path.name for path in good} | {"bad\\xff\\xfename.dcm"}
    assert printable_path(odd_name.name) == "bad\\xff\\xfename.dcm"
    assert not list(out.rglob("*.decoding")), "a decoding marker was left behind"
    # The crash is remembered in the cache: a second run decodes nothing and gives the same dataset.
    again = ingest_flow(src_dir=str(src), out_dir=str(out), size=SIZE, workers=1)
    assert again["skipped"] and again["card"]["content_hash"] == card.content_hash


def _abort_on_boom(source: SourceFile, size: int, window: object) -> object:
    """convert_file, except that a file named boom* kills its process the way a crashing C decoder does."""
    if Path(source.relative_path).name.startswith("boom"):
        os.abort()
    return _real_convert_file(source, size, window)


_real_convert_file = decode.convert_file


@pytest.mark.parametrize("workers", [1, 2])
def test_a_dead_decode_process_costs_only_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    src = tmp_path / "src"
    paths = [ct_variant(src / f"ct{i:02d}.dcm", patient_id=f"P{i}") for i in range(12)]
    paths += [ct_variant(src / "boom1.dcm"), ct_variant(src / "boom2.dcm")]
    sources = sorted((_source(path, src) for path in paths), key=lambda s: s.relative_path)
    window = parse_window("lung")
    cache_dir = tmp_path / "cache" / preprocessing_signature(SIZE, window)
    monkeypatch.setattr(decode, "convert_file", _abort_on_boom)  # before the decode processes fork
    progress: list[int] = []
    with decode_pool.decode_pool(workers, decode.decode_files, progress.append) as pool:
        decode.decode_on_pool(pool, sources, str(cache_dir), SIZE, window)
        # The replaced pool still decodes.
        extra = _source(ct_variant(src / "late.dcm", patient_id="P99"), src)
        decode.decode_on_pool(pool, [extra], str(cache_dir), SIZE, window)
    files = decode.load_cached_files(sources + [extra], cache_dir)
    verdicts = {item.record.relative_path: item.record for item in files}
    assert sum(progress) == len(sources) + 1
    for name in ("boom1.dcm", "boom2.dcm"):
        assert verdicts[name].reason is QuarantineReason.DECODER_CRASHED and "SIGABRT" in verdicts[name].message
    assert all(record.accepted for name, record in verdicts.items() if not name.startswith("boom"))
    assert not list(cache_dir.rglob("*.decoding"))


def test_a_file_left_half_decoded_by_a_killed_run_is_decoded_alone_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    sources = [_source(ct_variant(src / f"ct{i}.dcm", patient_id=f"P{i}"), src) for i in range(3)]
    window = parse_window("lung")
    cache_dir = tmp_path / "cache"
    marker = decoding_marker(cache_path(cache_dir, sources[1].content_sha256))
    marker.parent.mkdir(parents=True)
    marker.touch()  # what a run killed while decoding ct1 leaves
    alone: list[str] = []
    real_decode_alone = decode.decode_alone

    def recording_decode_alone(source: SourceFile, *args: object) -> object:
        alone.append(source.relative_path)
        return real_decode_alone(source, *args)

    monkeypatch.setattr(decode, "decode_alone", recording_decode_alone)
    decoded = decode.decode_in_children(sources, str(cache_dir), SIZE, window)
    assert alone == ["ct1.dcm"]
    assert all(item.record.accepted for item in decoded.values()) and len(decoded) == 3
    assert not marker.exists()


def test_jpeg2000_tries_openjpeg_before_gdcm_and_refusals_are_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = decoding_plugins(JPEG2000Lossless)
    assert plugins[0] == "pylibjpeg" and "gdcm" in plugins[1:]
    # A codestream every plugin refuses, without crashing any: the JPEG 2000 marker and a few bytes.
    path = jpeg2000_crasher(tmp_path / "refused.dcm", seed=4)
    caplog.set_level(logging.DEBUG)
    try:
        read_ct_file(path, "refused.dcm")
    except Rejected as rejected:
        assert rejected.reason is QuarantineReason.DECODE_ERROR
        assert "\n" not in rejected.message and " at 0x" not in rejected.message
        assert all(f"{name}: " in rejected.message for name in plugins)
    else:
        pytest.fail("a corrupt JPEG 2000 codestream was accepted")
    assert not [record for record in caplog.records if record.name.startswith("pydicom")], "pydicom logged a traceback"


@pytest.mark.parametrize("implicit", [True, False])
def test_a_raw_data_set_without_file_meta_is_read_like_its_full_file(tmp_path: Path, implicit: bool) -> None:
    full = ct_variant(tmp_path / "full.dcm")
    raw = raw_dataset(full, tmp_path / "raw.dcm", implicit=implicit)
    assert raw.read_bytes()[128:132] != b"DICM"
    decoded = read_ct_file(raw, "raw.dcm")
    assert decoded.record.transfer_syntax == ("Implicit VR Little Endian" if implicit else "Explicit VR Little Endian")
    assert (decoded.hu_frames == read_ct_file(full, "full.dcm").hu_frames).all()


def test_trailing_padding_is_read_and_a_cut_is_still_truncated_with_the_right_sizes(tmp_path: Path) -> None:
    full = ct_variant(tmp_path / "full.dcm")
    data = full.read_bytes()
    padded = tmp_path / "padded.dcm"
    padded.write_bytes(data + b"\x00" * 16)
    assert (read_ct_file(padded, "padded.dcm").hu_frames == read_ct_file(full, "full.dcm").hu_frames).all()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-100])
    with pytest.raises(Rejected) as refused:
        read_ct_file(cut, "cut.dcm")
    assert refused.value.reason is QuarantineReason.TRUNCATED
    assert f"({len(data) - 100} bytes; its last element needs {len(data)})" in refused.value.message


def test_a_source_folder_whose_name_is_not_utf8_is_ingested_through_the_command_line(tmp_path: Path) -> None:
    from flows.cli import main

    src = non_utf8_name(tmp_path).with_suffix("")  # the folder itself: b'bad\xff\xfename'
    for i in range(2):
        ct_variant(src / f"ct{i}.dcm", patient_id=f"P{i}")
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/out\xff"))
    assert main(["ingest", str(src), "--out", str(out), "--size", str(SIZE), "--workers", "1"]) == 0
    assert (out / "dataset.json").is_file() and len(read_models_csv(out / PRIVATE_INDEX_FILE, PrivateIndexRow)) == 2
