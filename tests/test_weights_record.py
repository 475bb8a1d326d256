"""A weights file that passed its check is not loaded again while it is unchanged; a changed file is checked again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tasks.training.weights as weights_module
from tasks.training.weights import WeightsFileError, read_weights_file
from tasks.training.weights_check import check_weights_file
from tasks.training.weights_record import recorded_check, weights_checks_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def checked_copy(tmp_path: Path, resnet50_weights_file: Path) -> Path:
    """A private copy of the session's ResNet-50 file (its own identity), checked once."""
    copy = tmp_path / resnet50_weights_file.name
    shutil.copyfile(resnet50_weights_file, copy)
    read_weights_file(copy)
    return copy


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """torch.load in the weights reader replaced by a recorder that refuses: any load shows up in the list."""
    loads: list[Path] = []

    def refuse(path, *args, **kwargs):
        loads.append(Path(path))
        raise RuntimeError("loaded")

    monkeypatch.setattr(weights_module.torch, "load", refuse)
    return loads


def test_an_unchanged_checked_file_is_not_loaded_again(checked_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = _no_loading(monkeypatch)
    info = check_weights_file(checked_copy)
    assert loads == []
    assert info.sha256.startswith(checked_copy.name.split("-")[1].split(".")[0])
    assert info.hash_checked and info.file_name == checked_copy.name
    assert weights_checks_path().is_file()


def test_a_changed_file_is_checked_again(checked_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(checked_copy.read_bytes())
    data[-100] ^= 0xFF  # same size, same name: only the content (and so the file's times) differ
    checked_copy.write_bytes(bytes(data))
    assert recorded_check(checked_copy) is None
    with pytest.raises(WeightsFileError, match="fails its hash check"):
        check_weights_file(checked_copy)


def test_a_touched_file_is_loaded_again(checked_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stat = checked_copy.stat()
    os.utime(checked_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    loads = _no_loading(monkeypatch)
    with pytest.raises(WeightsFileError):
        check_weights_file(checked_copy)
    assert loads == [checked_copy]


def test_a_bad_file_is_never_recorded(tmp_path: Path) -> None:
    bad = tmp_path / "resnet50-bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    for _ in range(2):
        with pytest.raises(WeightsFileError, match="not a torchvision ResNet-50 state dict"):
            check_weights_file(bad)
    assert recorded_check(bad) is None


def test_checking_a_recorded_file_imports_no_torch(checked_copy: Path) -> None:
    code = ("import sys; from tasks.training.weights_check import check_weights_file; "
            f"print(check_weights_file({str(checked_copy)!r}).sha256); print('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    digest, torch_imported = done.stdout.split()
    assert digest == recorded_check(checked_copy).sha256
    assert torch_imported == "False"
