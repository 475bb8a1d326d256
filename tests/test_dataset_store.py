"""A dataset folder as a place: one writer at a time, no stale temp files, a private part that stays private,
an order that does not depend on the pseudonymization key, and one sentence when it cannot be written."""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from filelock import FileLock
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL

from data_schemas.dataset import (
    DATASET_LOCK_FILE,
    IMAGES_FILE,
    MANIFEST_FILE,
    PRIVATE_DIR,
    QUARANTINE_FILE,
    DatasetCard,
    ManifestRow,
)
from data_schemas.files import read_models_csv
from flows.ingest import ingest_flow
from tasks.ingest.dataset_store import dataset_content_hash, load_dataset
from tasks.ingest.errors import OutputWriteError
from tests.dicom_factory import ct_variant

REPO = Path(__file__).resolve().parents[1]
KEY_COLUMNS = {"image_key", "patient_key", "study_key", "series_key"}


def small_cohort(src: Path, n: int = 6) -> Path:
    """n CT_small variants of three patients, with distinct pixels so that the order is by content."""
    import pydicom

    for i in range(n):
        path = ct_variant(src / f"p{i % 3}/{i}.dcm", patient_id=f"PATIENT{i % 3}", InstanceNumber=i)
        ds = pydicom.dcmread(path)
        ds.PixelData = (ds.pixel_array + 7 * i).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return src


def assert_consistent(out: Path) -> DatasetCard:
    """The card describes the files beside it: size, row count and content hash."""
    dataset = load_dataset(out)
    assert dataset.images.shape[-1] == dataset.card.image_size
    assert dataset_content_hash(out / IMAGES_FILE, out / MANIFEST_FILE) == dataset.card.content_hash
    assert not list(out.glob(".*.tmp")) and not list((out / PRIVATE_DIR).glob(".*.tmp"))
    return dataset.card


# The real CLI, with pauses around writing images.npy that make two unlocked writers interleave for sure: the
# 32 px run writes its images first and its manifest and card last, the 48 px run writes everything in between.
# Unlocked, the card would describe 32 px images beside 48 px ones; locked, the second run waits its turn.
SLOW_WRITER = """
import sys, time
import tasks.ingest.dataset_store as store
write, first = store.write_images_npy, sys.argv[sys.argv.index("--size") + 1] == "32"
def slow_write(path, images):
    time.sleep(0 if first else 3)
    write(path, images)
    time.sleep(8 if first else 0)
store.write_images_npy = slow_write
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_concurrent_ingests_of_different_sizes_end_in_one_consistent_dataset(tmp_path: Path) -> None:
    src = small_cohort(tmp_path / "src")
    out = tmp_path / "dataset"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                SLOW_WRITER,
                "ingest",
                str(src),
                "--out",
                str(out),
                "--size",
                str(size),
                "--workers",
                "1",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for size in (32, 48)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    card = assert_consistent(out)
    assert card.image_size in (32, 48) and card.n_images == 6
    assert all("Dataset written" in output for output in outputs)


def test_a_second_writer_waits_for_the_lock_or_refuses_with_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.ingest.assemble

    src = small_cohort(tmp_path / "src", n=2)
    out = tmp_path / "dataset"
    (out / PRIVATE_DIR).mkdir(parents=True)
    holder = FileLock(out / DATASET_LOCK_FILE, thread_local=False)  # released by the timer thread below
    holder.acquire()
    monkeypatch.setattr(tasks.ingest.assemble, "DATASET_LOCK_TIMEOUT_S", 0.5)
    with pytest.raises(OutputWriteError, match=rf"^dataset folder {re.escape(str(out))} is being written by another "
                                               r"ctcompare run \(waited 0.5 s\); run again when it has finished\.$"):
        ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    assert not (out / "dataset.json").exists()
    monkeypatch.setattr(tasks.ingest.assemble, "DATASET_LOCK_TIMEOUT_S", 120.0)
    released = threading.Event()
    entered_after_release: list[bool] = []
    assemble = tasks.ingest.assemble._assemble_locked

    def spy(*args: object, **kwargs: object) -> object:
        entered_after_release.append(released.is_set())
        return assemble(*args, **kwargs)

    def release() -> None:
        released.set()
        holder.release()

    monkeypatch.setattr(tasks.ingest.assemble, "_assemble_locked", spy)
    releaser = threading.Timer(1.0, release)
    releaser.start()
    ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    releaser.join()
    assert entered_after_release == [True]  # it waited for the holder, then wrote
    assert_consistent(out)


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    src = small_cohort(tmp_path / "src", n=2)
    out = tmp_path / "dataset"
    ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid, host = int(dead.stdout), socket.gethostname()
    cache = next((out / "private/cache").iterdir())
    stale = [
        out / f".images.npy.0123456789ab.{dead_pid}@{host}.tmp",
        out / ".images.npy.tmp",
        out / PRIVATE_DIR / f".index.csv.0123456789ab.{dead_pid}@{host}.tmp",
        cache / f".x.npz.0123456789ab.{dead_pid}@{host}.tmp",
    ]
    live = cache / f".y.npz.0123456789ab.1@{host}.tmp"  # pid 1 runs: a concurrent decoder's write in progress
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    small_cohort(tmp_path / "src", n=3)  # a new file: the dataset is rewritten
    ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
    assert [path.exists() for path in stale] == [False] * len(stale)
    assert live.exists()
    assert_consistent(out)


def documented_private_table() -> dict[str, str]:
    """docs/ingest.md's table of what is private: file -> 'shareable' or 'private'."""
    text = (REPO / "docs" / "ingest.md").read_text()
    section = text.split("## What is private, what can be shared", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in section.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = "private" if "private" in cells[1] else "shareable"
    return rows


def test_private_part_is_placed_and_permissioned_as_the_docs_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CTCOMPARE_HMAC_KEY")
    src = small_cohort(tmp_path / "src", n=2)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "dataset"
    (out / PRIVATE_DIR).mkdir(parents=True, mode=0o755)
    os.chmod(out / PRIVATE_DIR, 0o755)  # an existing, too open private folder, and an old shared quarantine list
    (out / "quarantine.csv").write_text("relative_path,reason,message\nJOHN_DOE/x.dcm,not_dicom,x\n")
    (out / PRIVATE_DIR / "notes-from-before.txt").write_text("x")
    os.chmod(out / PRIVATE_DIR / "notes-from-before.txt", 0o644)
    summary = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)

    assert (out / PRIVATE_DIR).stat().st_mode & 0o777 == 0o700
    private_files = [p for p in (out / PRIVATE_DIR).rglob("*") if p.is_file()]
    assert private_files and all(p.stat().st_mode & 0o777 == 0o600 for p in private_files)
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in (out / PRIVATE_DIR).rglob("*") if p.is_dir())
    assert not (out / "quarantine.csv").exists() and (out / QUARANTINE_FILE).is_file()
    assert summary["card"]["quarantine_reasons"] == {"not_dicom": 1}  # the shareable count, no path

    table = documented_private_table()
    for name, kind in table.items():
        path = out / name.rstrip("/")
        assert path.exists(), f"docs/ingest.md lists {name}, which ingest does not write"
        assert (PRIVATE_DIR in Path(name).parts) == (kind == "private"), f"docs/ingest.md says {name} is {kind}"
    top_level = {p.name for p in out.iterdir()} - {PRIVATE_DIR}
    assert top_level == {name for name, kind in table.items() if kind == "shareable"}
    assert "JOHN_DOE" not in "".join(p.read_text(errors="ignore") for p in out.iterdir() if p.is_file())


def test_row_order_and_images_do_not_depend_on_the_pseudonymization_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = small_cohort(tmp_path / "src", n=6)
    manifests = []
    for key in ("first-secret", "second-secret"):
        monkeypatch.setenv("CTCOMPARE_HMAC_KEY", key)
        out = tmp_path / key
        ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1)
        manifests.append(read_models_csv(out / MANIFEST_FILE, ManifestRow))
    assert (tmp_path / "first-secret" / IMAGES_FILE).read_bytes() == (
        tmp_path / "second-secret" / IMAGES_FILE
    ).read_bytes()
    first, second = ([row.model_dump(exclude=KEY_COLUMNS) for row in rows] for rows in manifests)
    assert first == second
    assert [r.patient_key for r in manifests[0]] != [r.patient_key for r in manifests[1]]  # the keys did change
    patients = [r.patient_key for r in manifests[0]]
    assert patients == sorted(patients, key=patients.index)  # each patient's rows are contiguous


def test_a_refused_ingest_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    src = small_cohort(tmp_path / "src", n=1)
    out = tmp_path / "new" / "dataset"
    assert main(["ingest", str(src), "--out", str(out), "--window", "lungs"]) == 2
    assert "valid choices" in capsys.readouterr().err
    with pytest.raises(ValueError, match="labels file .* does not exist"):
        ingest_flow(src_dir=str(src), out_dir=str(out), labels=str(tmp_path / "missing.csv"), size=32, workers=1)
    assert not (tmp_path / "new").exists()


def test_disk_full_while_writing_the_dataset_is_one_sentence_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tasks.ingest.dataset_store
    from flows.cli import main

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    src = small_cohort(tmp_path / "src", n=2)
    out = tmp_path / "dataset"
    monkeypatch.setattr(tasks.ingest.dataset_store, "write_images_npy", disk_full)
    assert main(["ingest", str(src), "--out", str(out), "--size", "32", "--workers", "1"]) == 1
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [f"ctcompare ingest: cannot write the dataset into {out.resolve()} (No space left on device)."]
    assert not (out / "dataset.json").exists()


def test_disk_full_while_decoding_is_one_sentence_and_never_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasks.ingest.decode

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    src = small_cohort(tmp_path / "src", n=2)
    out = tmp_path / "dataset"
    monkeypatch.setattr(tasks.ingest.decode, "atomic_write_bytes", disk_full)
    state = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, workers=1, return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, OutputWriteError)
    assert re.fullmatch(rf"cannot write decoded images into {re.escape(str(out.resolve()))}/private/cache/\w+ \(No "
                        r"space left on device\)\.", str(error))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert runs and all(run.run_count == 1 for run in runs), "a chunk that cannot be written was retried"
