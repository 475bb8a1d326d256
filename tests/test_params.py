"""A bad argument is refused before any work: exit 2, one line on stderr, no traceback, nothing created, no Prefect.

Each case runs the real console script in its own process (so that "Prefect did not start" can be seen: no
temporary-server note, no flow run), in a fresh working folder whose only new entry may be the CLI's own .ctcompare.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty folder, a folder holding one (non-DICOM) file with labels.csv beside it, and a truncated weights file."""
    base = tmp_path_factory.mktemp("inputs")
    (base / "empty").mkdir()
    (base / "dicom").mkdir()
    (base / "dicom" / "a.dcm").write_bytes(b"not read: refused before any decode")
    (base / "labels.csv").write_text("patient_id,label\nP1,nodule\n")
    (base / "truncated.pth").write_bytes(b"PK\x03\x04" + b"\0" * 200)
    return base


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


LABELLED = ["--labels", "{in}/labels.csv"]
CASES: dict[str, tuple[list[str], str]] = {
    "parallel-arms 0": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--parallel-arms", "0"], "--parallel-arms must be a whole number from 1 to 16"),
    "seed -1": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--seed", "-1"], "--seed must be a whole number from 0"),
    "folds 1": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--folds", "1"], "--folds must be a whole number from 2 to 20"),
    "bootstrap 0": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--bootstrap", "0"], "--bootstrap must be"),
    "lr Infinity": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--set", "lr=Infinity"], "'lr'"),
    "fractions sum": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--set", "val_fraction=0.9", "--set", "test_fraction=0.9"],
                      "val_fraction + test_fraction must be below 1"),
    "image_size 16": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--set", "image_size=16"], "'image_size'"),
    "sizes 16": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--sizes", "16,64"], "--sizes must be a list of whole numbers from 32"),
    "fractions 0": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--fractions", "0,0.5"], "--fractions must be"),
    "empty source": (["compare", "{in}/empty", "--out", "rep", *LABELLED], "holds no file"),
    "no labels": (["compare", "{in}/dicom", "--out", "rep"], "needs --labels"),
    "truncated weights": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--weights", "{in}/truncated.pth"], "--weights"),
    "demo truncated weights": (["demo", "--out", "rep", "--weights", "{in}/truncated.pth"], "--weights"),
    "demo patients": (["demo", "--out", "rep", "--patients", "1"], "--patients must be"),
    "ingest workers": (["ingest", "{in}/dicom", "--out", "rep", "--workers", "-1"], "--workers must be a whole number from 0 to 256"),
    "ingest size": (["ingest", "{in}/dicom", "--out", "rep", "--size", "16"], "--size must be a whole number from 32 to 1024"),
    "ingest window": (["ingest", "{in}/dicom", "--out", "rep", "--window", "lungs"], "--window 'lungs' is not valid"),
    "ingest empty source": (["ingest", "{in}/empty", "--out", "rep"], "holds no file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_argument_is_one_sentence_before_any_work(case: str, inputs: Path, tmp_path: Path) -> None:
    argv, expected = CASES[case]
    result = _cli([word.replace("{in}", str(inputs)) for word in argv], cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"ctcompare {argv[0]}: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout and "temporary" not in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ctcompare"]  # no rep/, no rep-dataset/
    assert not (tmp_path / ".ctcompare" / "prefect" / "prefect.db").exists()  # no Prefect database: no flow ran


def test_labels_file_inside_the_source_is_named(inputs: Path, tmp_path: Path) -> None:
    source = tmp_path / "scan"
    source.mkdir()
    (source / "x.dcm").write_bytes(b"x")
    (source / "labels.csv").write_text("patient_id,label\n")
    result = _cli(["compare", str(source), "--out", str(tmp_path / "rep")], cwd=tmp_path)
    assert result.returncode == 2
    assert f"add --labels {source / 'labels.csv'}" in result.stderr
    assert not (tmp_path / "rep").exists()


def test_help_shows_the_flow_parameters_descriptions_and_bounds() -> None:
    from flows.compare import compare_flow
    from flows.ingest import ingest_flow

    compare_help = _cli(["compare", "--help"], cwd=ROOT).stdout
    ingest_help = _cli(["ingest", "--help"], cwd=ROOT).stdout
    flat = " ".join(compare_help.split())
    assert "whole number from 1 to 16" in flat
    assert " ".join(compare_flow.parameters.properties["parallel_arms"]["description"].split()) in flat
    assert "Not the training input size" in " ".join(ingest_help.split())
    assert " ".join(ingest_flow.parameters.properties["workers"]["description"].split()) in " ".join(ingest_help.split())


@pytest.mark.parametrize("flow_path", ["flows.compare:compare_flow", "flows.ingest:ingest_flow", "flows.cost:cost_flow",
                                       "flows.train:train_flow", "flows.predict:predict_flow", "flows.synth:synth_flow"])
def test_every_flow_parameter_has_a_description(flow_path: str) -> None:
    import importlib

    module, name = flow_path.split(":")
    flow = getattr(importlib.import_module(module), name)
    properties = flow.parameters.model_dump()["properties"]
    assert properties
    missing = [key for key, schema in properties.items() if not schema.get("description")]
    assert not missing, f"{flow_path}: no description for {missing}"
