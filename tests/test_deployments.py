"""Operating ctcompare the Prefect way, end to end on a real local stack (no test harness, no ephemeral API).

One `prefect server` on a free loopback port with its own temporary PREFECT_HOME, the process work pool and every
deployment of prefect.yaml (through scripts/prefect_local.sh, as `make server/deploy/worker` do), one process worker;
then `prefect deployment run` as a user would type it, and the checks through the server's REST API. Every process
is stopped by its PID at the end of the module, whatever happens.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from flows.cli import SERVER_FILE
from tests.dicom_factory import ct_variant
from tests.prefect_server import ROOT, PrefectStack

REPORT_ARTIFACT_KEYS = {"ctcompare-summary", "ctcompare-metrics", "ctcompare-report-link"}

pytestmark = pytest.mark.timeout(600)  # the first test also starts the stack: minutes on a loaded machine


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    prefect = PrefectStack(tmp_path_factory.mktemp("prefect-stack"))
    try:
        prefect.start_server()
        prefect.start_worker()  # polls until the pool exists; starting it now overlaps its start-up with the deploy
        prefect.deploy()
        yield prefect
    finally:
        prefect.stop()


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, str):
        yield node


def test_prefect_yaml_is_portable_with_inactive_schedules() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    absolute = [s for s in _strings(config) if s.startswith(("/", "~")) or str(ROOT) in s]
    assert not absolute, f"absolute paths in prefect.yaml: {absolute}"
    assert config["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $CTCOMPARE_ROOT "
                                                                                                "}}"}}]
    deployments = {(d["entrypoint"].split(":")[1], d["name"]): d for d in config["deployments"]}
    nightly = deployments["ingest_flow", "nightly"]
    weekly = deployments["compare_flow", "weekly"]
    on_demand = deployments["compare_flow", "on-demand"]
    assert [(s["cron"], s["active"]) for s in nightly["schedules"]] == [("0 2 * * *", False)]
    assert [(s["cron"], s["active"]) for s in weekly["schedules"]] == [("0 3 * * 0", False)]
    assert not on_demand.get("schedules")
    for deployment in config["deployments"]:
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["work_pool"]["name"] == "ctcompare-local"
        for value in (deployment.get("parameters") or {}).values():
            assert not (isinstance(value, str) and value.startswith("/"))


def test_every_entrypoint_in_prefect_yaml_is_a_flow_of_this_checkout() -> None:
    """A renamed or moved flow module fails here (fast, no server) instead of the end-to-end tests being skipped."""
    from prefect import Flow

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        assert (ROOT / path).is_file(), f"{deployment['name']}: entrypoint file {path} does not exist"
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, function, None), Flow), f"{deployment['name']}: {path} has no flow {function}"


def test_the_operations_guide_lists_every_deployment() -> None:
    """docs/operations.md names each deployment `make deploy` creates, as `flow/deployment`."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        assert f"`{flow.name}/{deployment['name']}`" in guide, f"{flow.name}/{deployment['name']} not in operations.md"


def test_make_deploy_ends_by_naming_make_worker_and_not_prefects_generic_worker(stack: PrefectStack) -> None:
    """`make deploy` names every deployment it made, then `make worker` once as its last line; Prefect's generic
    hints (`prefect worker start ...`, `prefect deployment run ...`) are left out, even wrapped at 80 columns."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    output = stack.deploy_output
    lines = [line for line in output.splitlines() if line.strip()]
    assert "make worker" in lines[-1], lines[-5:]
    assert "prefect worker start" not in output and "prefect deployment run" not in output, output[-2000:]
    assert "pulls work from" not in output, output[-2000:]  # no stray end of a wrapped hint either
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)
        assert f"'{flow.name}/{deployment['name']}'" in output, (flow.name, deployment["name"], output[-2000:])


def test_a_command_records_its_run_on_the_running_project_server(stack: PrefectStack, tmp_path: Path) -> None:
    """A user's shell (no PREFECT_API_URL) finds the server `make server` recorded in PREFECT_HOME and runs there."""
    recorded = json.loads((stack.state_dir / "prefect" / SERVER_FILE).read_text())
    assert recorded["api_url"] == stack.api_url
    result = subprocess.run([sys.executable, "-m", "flows.cli", "synth", str(tmp_path / "cohort"), "--patients", "2",
                             "--slices-per-patient", "2"],
                            cwd=tmp_path, env=stack.user_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "temporary" not in result.stderr, result.stderr
    runs = [run for run in stack.post("/flow_runs/filter", {"flows": {"name": {"any_": ["synth"]}}})
            if run["parameters"]["out_dir"] == str(tmp_path / "cohort")]
    assert [run["state"]["type"] for run in runs] == ["COMPLETED"], runs


def test_deployments_registered_without_this_checkouts_path(stack: PrefectStack) -> None:
    pool = stack.get(f"/work_pools/{stack.pool}")
    assert pool["type"] == "process"
    nightly = stack.deployment("ingest/nightly")
    assert nightly["enforce_parameter_schema"] is True
    assert [(s["schedule"]["cron"], s["active"]) for s in nightly["schedules"]] == [("0 2 * * *", False)]
    # The pull step keeps its placeholder: each worker fills in its own checkout at run time.
    assert (
        nightly["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
        == "{{ $CTCOMPARE_ROOT }}"
    )
    assert str(ROOT) not in json.dumps(nightly)
    # The form in the UI: typed fields with bounds and defaults.
    size = nightly["parameter_openapi_schema"]["properties"]["size"]
    assert (size["minimum"], size["maximum"], size["default"]) == (32, 1024, 224)
    assert "Not the training input size" in size["description"]
    on_demand = stack.deployment("compare/on-demand")
    assert on_demand["schedules"] == []
    assert set(on_demand["parameter_openapi_schema"]["properties"]["profile"]["enum"]) >= {"smoke", "cpu", "full"}
    weekly = stack.deployment("compare/weekly")
    assert [(s["schedule"]["cron"], s["active"]) for s in weekly["schedules"]] == [("0 3 * * 0", False)]


def test_every_parameter_of_the_form_has_a_description_and_its_bounds(stack: PrefectStack) -> None:
    """The compare and ingest forms, read back from the server: a description for every parameter, bounds where
    the flow's signature has them (e.g. parallel_arms 1..16, workers 0..256, every list of sizes per item)."""
    bounded = {"compare/on-demand": {"seed", "folds", "ingest_size", "image_size", "bootstrap", "parallel_arms"},
               "ingest/nightly": {"size", "workers"}}
    for name, expected in bounded.items():
        properties = stack.deployment(name)["parameter_openapi_schema"]["properties"]
        assert not [key for key, schema in properties.items() if not schema.get("description", "").strip()], name
        for key in expected:
            schema = properties[key]
            branch = next((b for b in schema.get("anyOf", []) if b.get("type") != "null"), schema)
            assert "minimum" in branch and "maximum" in branch, (name, key, schema)
    compare = stack.deployment("compare/on-demand")["parameter_openapi_schema"]["properties"]
    assert "imagenet" in compare["arms"]["items"]["enum"] and "resnet18:scratch" in compare["arms"]["items"]["enum"]
    for name in ("compare/on-demand", "ingest/nightly"):  # plain text (a form eats <...>), relative paths explained
        properties = stack.deployment(name)["parameter_openapi_schema"]["properties"]
        assert not [key for key, schema in properties.items() if "<" in schema.get("description", "")], name
        assert "worker's checkout" in properties["source" if name.startswith("compare") else "src_dir"]["description"]
    sizes = next(b for b in compare["sizes"]["anyOf"] if b.get("type") == "array")["items"]
    assert (sizes["minimum"], sizes["maximum"]) == (32, 1024)
    assert compare["parallel_arms"]["minimum"] == 1 and compare["parallel_arms"]["maximum"] == 16


def test_bad_parameter_is_refused_with_a_readable_message(stack: PrefectStack) -> None:
    before = len(stack.flow_runs_of("ingest/nightly"))
    result, flow_run_id = stack.run_deployment("ingest/nightly", {"size": "-5"})
    assert result.returncode != 0 and flow_run_id is None, result.stdout
    assert "Validation failed for field 'size'" in result.stdout and "minimum of 32" in result.stdout, result.stdout
    result, flow_run_id = stack.run_deployment("ingest/nightly", {"window": "lungs"})
    assert result.returncode != 0 and flow_run_id is None, result.stdout
    assert "'window'" in result.stdout, result.stdout
    assert len(stack.flow_runs_of("ingest/nightly")) == before  # refused before any run was even created
    before = len(stack.flow_runs_of("compare/on-demand"))
    result, flow_run_id = stack.run_deployment("compare/on-demand", {"arms": '["scrach"]'})  # a typo of scratch
    assert result.returncode != 0 and flow_run_id is None, result.stdout
    assert "'arms[0]'" in result.stdout and "'scrach' is not one of ['scratch'" in result.stdout, result.stdout
    assert len(stack.flow_runs_of("compare/on-demand")) == before


def test_shipped_defaults_are_refused_in_one_sentence(stack: PrefectStack) -> None:
    """Right after `make deploy` nothing is in data/incoming or data/dataset: each default run fails in one sentence
    that says what to give, with no traceback in its log."""
    for name, needle in (("ingest/nightly", "data/incoming"), ("compare/weekly", "data/dataset")):
        result, flow_run_id = stack.run_deployment(name, {})
        assert result.returncode == 0 and flow_run_id, result.stdout
        flow_run = stack.wait_for_flow_run(flow_run_id, timeout_s=180)
        assert flow_run["state"]["type"] == "FAILED", (name, flow_run["state"])
        message = flow_run["state"]["message"]
        assert needle in message and "does not exist" in message, message
        # the engine's traceback line, when there is one, follows its "Finished in state" line in the same batch
        messages = stack.wait_for_log(flow_run_id, "Finished in state Failed")
        assert not [line for line in messages if "Traceback" in line], name


def test_a_bad_weights_file_is_refused_before_any_training_in_the_forms_words(stack: PrefectStack,
                                                                               tmp_path: Path) -> None:
    source = tmp_path / "dicom"
    source.mkdir()
    (source / "1.dcm").write_bytes(b"not read: the weights file is refused first")
    (tmp_path / "labels.csv").write_text("patient_id,label\nP1,nodule\n", encoding="utf-8")
    (tmp_path / "resnet50.pth").write_bytes(b"\x80\x02 not a state dict")
    result, flow_run_id = stack.run_deployment("compare/on-demand", {
        "source": str(source), "labels": str(tmp_path / "labels.csv"), "out_dir": str(tmp_path / "out"),
        "weights": str(tmp_path / "resnet50.pth")})
    assert result.returncode == 0 and flow_run_id, result.stdout
    flow_run = stack.wait_for_flow_run(flow_run_id, timeout_s=180)
    message = flow_run["state"]["message"]
    assert flow_run["state"]["type"] == "FAILED" and message.startswith("weights: weights file "), message
    assert message.endswith(").") and "--weights" not in message, message  # one whole sentence, the form's word
    assert not (tmp_path / "out").exists() and not stack.final_task_runs(flow_run_id, timeout_s=0)


def test_unlabelled_nightly_warns_and_the_weekly_names_the_labels_to_give(stack: PrefectStack, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    for patient in range(3):
        for instance in range(2):
            ct_variant(
                incoming / f"p{patient}" / f"{instance}.dcm", patient_id=f"PAT{patient}", InstanceNumber=instance + 1
            )
    parameters = {"src_dir": str(incoming), "out_dir": str(tmp_path / "dataset"), "size": "32", "labels": "null"}
    states = []
    for _ in range(2):
        result, flow_run_id = stack.run_deployment("ingest/nightly", parameters)
        assert result.returncode == 0 and flow_run_id, result.stdout
        flow_run = stack.wait_for_flow_run(flow_run_id, timeout_s=180)
        assert flow_run["state"]["type"] == "COMPLETED", stack.log_tail("worker")
        chunks = stack.final_task_runs(flow_run_id, "decode-chunk")
        assert chunks
        states.append({t["state"]["name"] for t in chunks})
    assert states[0] == {"Completed"}
    assert states[1] == {"Cached"}, states  # the second run on unchanged input decodes nothing
    warnings = stack.wait_for_log(flow_run_id, "6 of 6 image(s) have no label", level=30)
    assert any("6 of 6 image(s) have no label" in message for message in warnings), warnings

    result, flow_run_id = stack.run_deployment("compare/weekly", {"source": str(tmp_path / "dataset"),
                                                                   "out_dir": str(tmp_path / "weekly")})
    assert result.returncode == 0 and flow_run_id, result.stdout
    flow_run = stack.wait_for_flow_run(flow_run_id, timeout_s=180)
    message = flow_run["state"]["message"]
    assert flow_run["state"]["type"] == "FAILED" and "no labelled image" in message, message
    assert "labels parameter of the ingest/nightly deployment" in message, message
    assert not (tmp_path / "weekly").exists()  # refused before any work


def test_nightly_then_weekly_tells_the_truth_and_links_the_report(stack: PrefectStack, tmp_path: Path) -> None:
    """The two scheduled deployments chained through a real worker, the weekly comparison with one arm skipped (no
    ImageNet weights): the skipped arm's task run and the comparison are not green, the link artifact is an http
    address on the report server that returns the report, and the training published its progress. The completed arm is
    a ResNet-18 from scratch: chaining, states and links are the same for every model."""
    import httpx

    from tasks.demo.synth import synthesize_cohort

    cohort = synthesize_cohort(tmp_path / "cohort", patients=8, slices_per_patient=2, seed=0, matrix_sizes=(64,))
    dataset = tmp_path / "dataset"
    result, flow_run_id = stack.run_deployment("ingest/nightly", {
        "src_dir": str(cohort.dicom_dir), "labels": str(cohort.labels_path), "out_dir": str(dataset), "size": "64"})
    assert result.returncode == 0 and flow_run_id, result.stdout
    assert stack.wait_for_flow_run(flow_run_id, timeout_s=180)["state"]["type"] == "COMPLETED", stack.log_tail("worker")

    out_dir = stack.reports_root / "weekly"
    result, flow_run_id = stack.run_deployment("compare/weekly", {
        "source": str(dataset), "out_dir": str(out_dir), "profile": "smoke",
        "arms": '["resnet18:scratch", "imagenet"]',
        "bootstrap": "10", "calibrate": "false", "settings": '{"download_weights": "false"}',
    })
    assert result.returncode == 0 and flow_run_id, result.stdout
    flow_run = stack.wait_for_flow_run(flow_run_id, timeout_s=300)
    state = flow_run["state"]
    assert (state["type"], state["name"]) == ("CANCELLED", "Partial"), (state, stack.log_tail("worker"))
    tasks = {t["name"]: t["state"] for t in stack.final_task_runs(flow_run_id, "train-")}
    assert (tasks["train-imagenet-main"]["type"], tasks["train-imagenet-main"]["name"]) == ("CANCELLED", "Skipped")
    assert "weights" in tasks["train-imagenet-main"]["message"]
    assert tasks["train-resnet18-scratch-main"]["type"] == "COMPLETED"

    artifacts = stack.artifacts(flow_run_id)
    keyed = {a["key"]: a for a in artifacts if a.get("key")}
    assert REPORT_ARTIFACT_KEYS <= set(keyed), sorted(keyed)
    link = str(keyed["ctcompare-report-link"]["data"]).split("](", 1)[1].split(")", 1)[0]  # stored as [text](url)
    assert link.startswith(stack.reports_url) and link.endswith("/report.html"), link
    page = httpx.get(link, timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert f"Report: {link}" in state["message"]  # the engine's last log line and --watch's end carry it
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert any(a["data"] == 100 and "scratch" in (a.get("description") or "") for a in progress), progress

    messages = stack.wait_for_log(flow_run_id, f"Report: {link}")
    assert f"Report: {link}" in messages[-3:], messages[-5:]
    messages = stack.wait_for_log(flow_run_id, "Finished in state Partial")
    assert not [m for m in messages if "Traceback" in m], "a partial comparison is not a crash"
    # the prediction and the calibration it used, once, in the comparison's own run (not only in its cost subflow)
    assert sum(m.startswith("Predicted wall time of this comparison") for m in messages) == 1, messages[:20]
    assert sum(m.startswith("The wall-time prediction used ") for m in messages) == 1, messages[:20]
    finished = "train-resnet18-scratch-main: Finished in state Completed"
    assert any(m.startswith(finished) for m in messages), messages[-20:]
    assert any("epoch 1/" in message for message in messages), messages[-20:]
    identifiers = [value for value in cohort.identifiers if len(value) >= 6]
    leaked = [value for value in identifiers if any(value in message for message in messages)]
    assert not leaked, "identifiers in the run's logs"


def test_comparison_hands_each_arm_to_the_pool_as_its_own_flow_run(stack: PrefectStack, tmp_path: Path) -> None:
    """The arm is a ResNet-18: the subject is the hand-over to the pool, which is the same for every model."""
    from tasks.demo.synth import synthesize_cohort

    cohort = synthesize_cohort(tmp_path / "cohort", patients=8, slices_per_patient=2, seed=1, matrix_sizes=(64,))
    out_dir = tmp_path / "reports" / "on-pool"
    before = {run["id"] for run in stack.flow_runs_of("train/arm")}
    result, flow_run_id = stack.run_deployment("compare/on-demand", {
        "source": str(cohort.dicom_dir), "labels": str(cohort.labels_path), "out_dir": str(out_dir),
        "profile": "smoke", "arms": '["resnet18:scratch"]', "image_size": "64", "bootstrap": "10", "calibrate": "false",
        "train_deployment": "train/arm",
    })
    assert result.returncode == 0 and flow_run_id, result.stdout
    flow_run = stack.wait_for_flow_run(flow_run_id, timeout_s=300)
    assert flow_run["state"]["type"] == "COMPLETED", stack.log_tail("worker")
    train_runs = [run for run in stack.flow_runs_of("train/arm") if run["id"] not in before]
    assert len(train_runs) == 1 and train_runs[0]["state"]["type"] == "COMPLETED"
    assert train_runs[0]["parameters"]["run"] == "runs/resnet18-scratch/main"
    results = json.loads((out_dir / "results.json").read_text())
    assert [arm["status"] for arm in results["arms"]] == ["completed"]
