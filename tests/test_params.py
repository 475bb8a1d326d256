"""A bad argument is refused before any work: exit 2, one line on stderr, no traceback, nothing created, no Prefect.

The cases run through the real console script (flows.cli.main) in one separate process without the test session's
Prefect harness, each in a fresh working folder whose only new entry may be the CLI's own .ctcompare; Prefect
announces a temporary API server on stderr when it starts one, so a case that started it would show that line.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dicom_factory import ct_variant

ROOT = Path(__file__).resolve().parents[1]

# Runs every case in one process (the imports are paid once); prints {case: {code, stderr, stdout, created}}.
DRIVER = """
import contextlib, io, json, os, sys, traceback
from pathlib import Path
from flows.cli import main
results = {}
for case, (folder, argv) in json.loads(sys.argv[1]).items():
    os.chdir(folder)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        except BaseException:
            code = "raised"
            traceback.print_exc()
    results[case] = {"code": code, "stderr": err.getvalue(), "stdout": out.getvalue(),
                     "created": sorted(p.name for p in Path(folder).iterdir())}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty folder, a folder holding one (non-DICOM) file with labels.csv beside it, a DICOM folder with
    labels.csv inside, a dataset folder and a truncated weights file."""
    base = tmp_path_factory.mktemp("inputs")
    (base / "empty").mkdir()
    (base / "dicom").mkdir()
    (base / "dicom" / "a.dcm").write_bytes(b"not read: refused before any decode")
    (base / "labels.csv").write_text("patient_id,label\nP1,nodule\n")
    (base / "truncated.pth").write_bytes(b"PK\x03\x04" + b"\0" * 200)
    (base / "scan").mkdir()
    (base / "scan" / "x.dcm").write_bytes(b"x")
    (base / "scan" / "labels.csv").write_text("patient_id,label\n")
    (base / "dataset").mkdir()
    (base / "dataset" / "dataset.json").write_text("{}")  # train checks only that it is there before the weights
    for i in range(4):  # real CT headers: two patients of each class in two-class.csv
        ct_variant(base / "ct" / f"ct{i}.dcm", patient_id=f"P{i}")
    labels_files = {
        "two-class": "patient_id,label\nP0,nodule\nP1,nodule\nP2,normal\nP3,normal\n",
        "one-class": "patient_id,label\nP0,nodule\nP1,nodule\n",
        "conflict": "patient_id,label\nP0,nodule\nP0,normal\n",
        "no-key": "name,label\nP0,nodule\n",
        "no-match": "patient_id,label\nQ7,nodule\nQ8,normal\n",
    }
    for name, text in labels_files.items():
        (base / f"{name}.csv").write_text(text)
    # A pickle (protocol 4) of something that is not a state dict: torch warns about the protocol before refusing.
    (base / "protocol4.pth").write_bytes(pickle.dumps({"conv1.weight": [1, 2]}, protocol=4))
    (base / "weights-dir").mkdir()
    (base / "weights-dir" / "resnet50-0123abcd.pth").write_bytes(b"not a state dict")
    (base / "reports" / "r1").mkdir(parents=True)
    (base / "reports" / "r1" / "report.html").write_text("<html>an earlier report</html>")
    return base


LABELLED = ["--labels", "{in}/labels.csv"]
CASES: dict[str, tuple[list[str], str]] = {
    "arms typo": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--arms", "scrach"],
        "unknown arm(s) scrach; choose from scratch",
    ),
    "arms empty": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--arms", ","], "unknown arm(s) (none given)"),
    "parallel-arms 0": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--parallel-arms", "0"],
        "--parallel-arms must be a whole number from 1 to 16",
    ),
    "seed -1": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--seed", "-1"],
        "--seed must be a whole number from 0",
    ),
    "folds 1": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--folds", "1"],
        "--folds must be a whole number from 2 to 20",
    ),
    "bootstrap 0": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--bootstrap", "0"], "--bootstrap must be"),
    "lr Infinity": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--set", "lr=Infinity"], "'lr'"),
    "fractions sum": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--set", "val_fraction=0.9", "--set", "test_fraction=0.9"],
        "val_fraction + test_fraction must be below 1",
    ),
    "image_size 16": (["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--set", "image_size=16"], "'image_size'"),
    "sizes 16": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--sizes", "16,64"],
        "--sizes must be a list of whole numbers from 32",
    ),
    "fractions 0": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--fractions", "0,0.5"],
        "--fractions must be",
    ),
    "empty source": (["compare", "{in}/empty", "--out", "rep", *LABELLED], "holds no file"),
    "no labels": (["compare", "{in}/dicom", "--out", "rep"], "needs --labels"),
    "truncated weights": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--weights", "{in}/truncated.pth"],
        "--weights",
    ),
    "demo truncated weights": (["demo", "--out", "rep", "--weights", "{in}/truncated.pth"], "--weights"),
    "demo patients": (["demo", "--out", "rep", "--patients", "1"], "--patients must be"),
    "ingest workers": (
        ["ingest", "{in}/dicom", "--out", "rep", "--workers", "-1"],
        "--workers must be a whole number from 0 to 256",
    ),
    "ingest size": (
        ["ingest", "{in}/dicom", "--out", "rep", "--size", "16"],
        "--size must be a whole number from 32 to 1024",
    ),
    "ingest window": (
        ["ingest", "{in}/dicom", "--out", "rep", "--window", "lungs"],
        "valid choices are lung, mediastinal, bone, none",
    ),
    "ingest empty source": (["ingest", "{in}/empty", "--out", "rep"], "holds no file"),
    "labels inside the source": (["compare", "{in}/scan", "--out", "rep"], "/scan/labels.csv is there: add --labels"),
    "compare missing labels": (
        ["compare", "{in}/dicom", "--out", "rep", "--labels", "{in}/missing.csv"],
        "labels file {in}/missing.csv does not exist",
    ),
    "compare missing weights": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--weights", "{in}/missing.pth"],
        "{in}/missing.pth does not exist",
    ),
    "compare under a report": (
        ["compare", "{in}/dicom", "--out", "{in}/reports/r1/sub", *LABELLED],
        "lies inside the report folder {in}/reports/r1",
    ),
    "ingest under a report": (
        ["ingest", "{in}/dicom", "--out", "{in}/reports/r1/sub-dataset"],
        "inside the report folder {in}/reports/r1",
    ),
    "compare labels wrong columns": (
        ["compare", "{in}/ct", "--out", "rep", "--labels", "{in}/no-key.csv"],
        "must have exactly one key column",
    ),
    "compare labels conflict": (
        ["compare", "{in}/ct", "--out", "rep", "--labels", "{in}/conflict.csv"],
        "rows 2 and 3 give the same patient_id different labels",
    ),
    "compare one class": (["compare", "{in}/ct", "--out", "rep", "--labels", "{in}/one-class.csv"], "one class only"),
    "compare labels match nothing": (
        ["compare", "{in}/ct", "--out", "rep", "--labels", "{in}/no-match.csv"],
        "matches any of the 4 file(s)",
    ),
    "ingest one class": (["ingest", "{in}/ct", "--out", "rep", "--labels", "{in}/one-class.csv"], "one class only"),
    "ingest labels match nothing": (
        ["ingest", "{in}/ct", "--out", "rep", "--labels", "{in}/no-match.csv"],
        "matches any of the 4 file(s)",
    ),
    "folds per class": (
        ["compare", "{in}/ct", "--out", "rep", "--labels", "{in}/two-class.csv", "--folds", "3"],
        "--folds 3 needs at least 3 labelled patients of each class",
    ),
    "compare on a file": (["compare", "{in}/labels.csv", "--out", "rep"], "is a file; give a DICOM folder"),
    "train deployment without a server": (
        ["compare", "{in}/ct", "--out", "rep", "--labels", "{in}/two-class.csv", "--train-deployment", "nope/nope"],
        "needs the Prefect server",
    ),
    "dask address unreachable": (
        ["ingest", "{in}/ct", "--out", "rep", "--dask-address", "tcp://127.0.0.1:9"],
        "--dask-address tcp://127.0.0.1:9 does not answer",
    ),
    "train fake weights in weights-dir": (
        ["train", "{in}/dataset", "--arm", "imagenet", "--out", "run", "--weights-dir", "{in}/weights-dir"],
        "--weights-dir: weights file",
    ),
    "protocol-4 pickle as weights": (
        ["compare", "{in}/dicom", "--out", "rep", *LABELLED, "--weights", "{in}/protocol4.pth"],
        "is not a readable PyTorch state dict",
    ),
    "train truncated weights": (
        ["train", "{in}/dataset", "--arm", "imagenet", "--out", "run", "--weights", "{in}/truncated.pth"],
        "--weights",
    ),
}


@pytest.fixture(scope="module")
def outcomes(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case of CASES run once through flows.cli.main in a separate process."""
    cases = {}
    for case, (argv, _) in CASES.items():
        folder = tmp_path_factory.mktemp("case")
        cases[case] = (str(folder), [word.replace("{in}", str(inputs)) for word in argv])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], env=env, capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_argument_is_one_sentence_before_any_work(case: str, outcomes: dict[str, dict], inputs: Path) -> None:
    argv, expected = CASES[case]
    expected = expected.replace("{in}", str(inputs))
    outcome = outcomes[case]
    lines = outcome["stderr"].strip().splitlines()
    assert outcome["code"] == 2, outcome
    assert len(lines) == 1 and lines[0].startswith(f"ctcompare {argv[0]}: "), outcome["stderr"]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in outcome["stderr"] and "temporary" not in outcome["stderr"]
    assert outcome["stdout"] == ""
    assert set(outcome["created"]) <= {".ctcompare"}, outcome["created"]  # no rep/, rep-dataset/ or run/
    assert [path.name for path in (inputs / "reports" / "r1").iterdir()] == ["report.html"]  # nothing under a report


def test_version_writes_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MPLCONFIGDIR"))}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "flows.cli", "--version"], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ctcompare ") and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_help_shows_the_flow_parameters_descriptions_and_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main
    from flows.compare import compare_flow
    from flows.ingest import ingest_flow

    texts = {}
    for command in ("compare", "ingest"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())
    assert "whole number from 1 to 16" in texts["compare"]
    assert " ".join(compare_flow.parameters.properties["parallel_arms"]["description"].split()) in texts["compare"]
    assert "Not the training input size" in texts["ingest"]
    assert " ".join(ingest_flow.parameters.properties["workers"]["description"].split()) in texts["ingest"]


@pytest.mark.parametrize(
    "flow_path",
    [
        "flows.compare:compare_flow",
        "flows.ingest:ingest_flow",
        "flows.cost:cost_flow",
        "flows.train:train_flow",
        "flows.predict:predict_flow",
        "flows.synth:synth_flow",
    ],
)
def test_every_flow_parameter_has_a_description(flow_path: str) -> None:
    import importlib

    module, name = flow_path.split(":")
    flow = getattr(importlib.import_module(module), name)
    properties = flow.parameters.model_dump()["properties"]
    assert properties
    missing = [key for key, schema in properties.items() if not schema.get("description")]
    assert not missing, f"{flow_path}: no description for {missing}"


def _form_fields(schema: dict) -> dict[str, dict]:
    """Each parameter of a run form as the field a person fills in: an optional parameter's non-null branch."""
    fields = {}
    for name, prop in schema["properties"].items():
        branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
        assert len(branches) == 1, (name, prop)
        fields[name] = {**prop, **branches[0]}
    return fields


def _fillable(field: dict) -> bool:
    """A field the UI's form draws as an input: text, number, switch, a list of those, or a text-to-text map."""
    if "$ref" in field or "allOf" in field:
        return False
    if field.get("type") == "array":
        return _fillable(field.get("items") or {})
    if field.get("type") == "object":
        return (field.get("additionalProperties") or {}).get("type") == "string" and "properties" not in field
    return field.get("type") in {"string", "integer", "number", "boolean"}


def test_every_deployments_run_form_is_one_a_person_fills_in() -> None:
    """The form `prefect deploy` stores for each deployment of prefect.yaml (parameter_schema, as `prefect deploy`
    builds it from the flow's signature): only inputs a person can fill in (no nested model such as a run plan),
    arms a list of choices, plain-text descriptions that say how a relative path resolves."""
    import importlib

    import yaml
    from prefect.utilities.callables import parameter_schema

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    forms = {}
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        schema = parameter_schema(flow).model_dump_for_openapi()
        forms[f"{flow.name}/{deployment['name']}"] = schema
        fields = _form_fields(schema)
        assert not schema.get("definitions"), (deployment["name"], sorted(schema["definitions"]))
        assert not [name for name, field in fields.items() if not _fillable(field)], deployment["name"]
        assert not [name for name, field in fields.items() if re.search(r"<|\.py\b|Error\b", field["description"])]
        for name in deployment.get("parameters") or {}:
            assert name in fields, (deployment["name"], name)
    compare = _form_fields(forms["compare/on-demand"])
    assert "plan" not in compare and "source" in compare and "out_dir" in compare
    assert compare["arms"]["type"] == "array" and {"scratch", "imagenet", "resnet18:imagenet"} <= set(
        compare["arms"]["items"]["enum"])
    for name in ("source", "out_dir", "labels", "weights"):
        assert "relative path resolves against" in compare[name]["description"], name
