"""The main job end to end on the smoke profile: DICOM folder -> dataset -> cost -> arms -> report, plus privacy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import markupsafe
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.sorting import FlowRunSort

from data_schemas.dataset import ManifestRow
from data_schemas.files import read_models_csv
from data_schemas.plan import read_plan
from data_schemas.report import ComparisonResults
from data_schemas.training import EpochMetrics, PredictionRow
from data_schemas.visual import LESIONS_SIDECAR_FILE
from flows.cli import EXIT_NO_ARM, EXIT_PARTIAL, main
from reports.render import SECTION_IDS
from tasks.demo.synth import synthesize_cohort
from tasks.ingest.lesions import attach_lesions
from tasks.packaging.package import load_package


def package_parameters(package) -> int:
    """Parameters of a package's float network (+ a linear probe's coefficients), counted independently."""
    from tasks.packaging.package import float_architecture

    count = sum(p.numel() for p in float_architecture(package.meta).parameters())
    return count + (len(package.meta.linear_probe.coef) + 1 if package.meta.linear_probe is not None else 0)

SHAREABLE_SUFFIXES = {".html", ".md", ".json", ".csv", ".txt"}
ALWAYS_PRESENT_SECTIONS = [s for s in SECTION_IDS if s not in {"folds", "data-efficiency"}]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(values["id"])
        if tag == "img":
            self.images.append(values.get("src") or "")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return synthesize_cohort(tmp_path_factory.mktemp("cohort"), patients=15, slices_per_patient=2, seed=3)


# The arm of the end-to-end cases whose subject is not the network (folds, partial results, report folders): the same
# pipeline with ResNet-18, which trains and ships in about half the time of ResNet-50 (the full_run fixture and the
# imagenet arms keep ResNet-50).
SMALL_SCRATCH = "resnet18:scratch"


def full_run_argv(cohort, weights: Path, out: Path) -> list[str]:
    """The command of the full_run fixture: every arm, smoke profile, a third of the patients tested."""
    return [
        "compare", str(cohort.dicom_dir), "--labels", str(cohort.labels_path), "--out", str(out), "--profile", "smoke",
        "--weights", str(weights), "--no-calibrate", "--bootstrap", "50", "--set", "download_weights=false",
        "--set", "test_fraction=0.34",  # a third of the patients: at least two of each class in the test part
    ]


@pytest.fixture(scope="module")
def full_run(cohort, resnet50_weights_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reports") / "run-all-arms"
    code = main(full_run_argv(cohort, resnet50_weights_file, out))
    assert code == 0
    return out


async def _compare_run_of(client, out: Path):
    """The latest compare flow run that wrote its report to `out`: the session's Prefect API holds the runs of every
    test process, so "the latest compare run" may be another test's."""
    runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["compare"])),
                                       sort=FlowRunSort.START_TIME_DESC, limit=200)
    return next(r for r in runs if Path(str(r.parameters.get("out_dir"))).resolve() == out.resolve())


def compare_state_of(out: Path) -> tuple[str, str]:
    """(state type, state name) of the latest compare flow run that wrote its report to `out`."""
    async def read() -> tuple[str, str]:
        async with get_client() as client:
            run = await _compare_run_of(client, out)
            return run.state.type.value, run.state.name
    return asyncio.run(read())


def dataset_of(report_dir: Path) -> Path:
    """Where compare ingests a DICOM source: beside the report folder, never inside it."""
    return report_dir.parent / f"{report_dir.name}-dataset"


def shareable_files(root: Path) -> list[Path]:
    """Every text file a reviewer may receive: all but the dataset's private part and quarantine list."""
    return [
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in SHAREABLE_SUFFIXES and "private" not in p.parts and p.name != "quarantine.csv"
    ]


def test_compare_writes_a_complete_report(full_run: Path) -> None:
    results = ComparisonResults.model_validate_json((full_run / "results.json").read_text())
    assert {arm.name: arm.status for arm in results.arms} == {
        "scratch": "completed",
        "imagenet": "completed",
        "imagenet-linear": "completed",
    }
    assert results.split.no_patient_overlap
    assert len(results.comparisons) == 3
    for comparison in results.comparisons:
        assert comparison.delong is not None and 0 <= comparison.delong.p_value <= 1
        assert comparison.mcnemar is not None and comparison.plain_words
    for arm in results.arms:
        auc = arm.test_metrics.roc_auc
        assert auc.ci_low is None or auc.ci_low <= auc.value <= auc.ci_high
    assert results.dataset.positive_class == "nodule"

    parser = _Collector()
    parser.feed((full_run / "report.html").read_text())
    assert set(ALWAYS_PRESENT_SECTIONS) <= parser.ids
    assert len(parser.images) >= 4 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert (full_run / "report.md").is_file()
    assert "run-all-arms" in (full_run.parent / "index.html").read_text()
    cost = json.loads((full_run / "cost.json").read_text())
    assert {a["arm"] for a in cost["arms"]} == {"scratch", "imagenet", "imagenet-linear"}
    # the plan prices the main run's training images and the imagenet arm's head-only warm-up
    plan = read_plan(full_run / "plan.json")
    main_config = json.loads((full_run / "runs" / "scratch" / "main" / "config.json").read_text())
    assert plan.cost is not None and plan.cost.n_images == main_config["n_train_images"]
    assert plan.cost.head_warmup_epochs == plan.main_run("imagenet").config.freeze_epochs == 1
    assert compare_state_of(full_run) == ("COMPLETED", "Completed")


def test_every_completed_arm_is_packaged_costed_and_linked(full_run: Path) -> None:
    results = ComparisonResults.model_validate_json((full_run / "results.json").read_text())
    html, md = (full_run / "report.html").read_text(), (full_run / "report.md").read_text()
    for arm in results.arms:
        assert arm.package_dir == f"runs/{arm.name}/main/package" and arm.deployment is not None
        package = load_package(full_run / arm.package_dir)
        # the package carries the threshold the evaluation chose on the main run's validation patients
        assert package.meta.operating_point.threshold == arm.operating_point.patient_thresholds[0]
        assert package.meta.operating_point.aggregation == results.evaluation.aggregation
        assert package.meta.metrics.patient["roc_auc"] == arm.patient_metrics.roc_auc
        assert arm.deployment.parameters == package_parameters(package) and arm.deployment.latency_ms_median > 0
        assert f'href="{arm.package_dir}/MODEL_CARD.md"' in html and f"({arm.package_dir}/MODEL_CARD.md)" in md
        assert (full_run / arm.package_dir / "MODEL_CARD.md").is_file()
    assert "What it costs to run" in html and "Quick timing (smoke profile)" in html
    preferred = results.recommendation.preferred_arm or results.recommendation.best_arm
    compression = results.compression
    assert compression is not None and compression.full.arm == compression.compressed.arm == preferred
    assert compression.compressed.package_bytes < compression.full.package_bytes
    assert str(markupsafe.escape(compression.statement)) in html  # as the template escapes it
    assert compression.level == "patient" and "patient-level test AUC" in compression.statement
    scored = results.arm(preferred).patient_metrics.roc_auc.value
    if results.evaluation.mode == "holdout":  # the int8 line's full-precision AUC is the one in the metric tables
        assert compression.auc_full == pytest.approx(scored, abs=1e-12)
    assert load_package(full_run / results.compression_package_dir).meta.weights_variant in {"int8", "bf16"}


def test_an_unchanged_rerun_keeps_every_stage_s_output(full_run: Path, cohort, resnet50_weights_file: Path) -> None:
    """The same command again: nothing is trained, packaged, measured, evaluated or rendered again, and the
    report says the same."""
    kept = [full_run / "results.json", full_run / "report.html", full_run / "report_inputs.json",
            *full_run.glob("runs/*/main/package*/model.pt"), *full_run.glob("runs/*/main/package*/deploy_cost.json"),
            *full_run.glob("runs/*/main/best.pt")]
    assert len(kept) >= 8
    before = {path: path.stat().st_mtime_ns for path in kept}
    results = (full_run / "results.json").read_text()
    assert main(full_run_argv(cohort, resnet50_weights_file, full_run)) == 0
    assert {path: path.stat().st_mtime_ns for path in kept} == before
    assert (full_run / "results.json").read_text() == results


# Run as a command of its own: prints the exit code, then which of the libraries a kept report needs none of it loaded.
RERUN_PROBE = """
import sys
from flows.cli import main
code = main(sys.argv[1:])
print("EXIT", code, *sorted(m for m in ("torch", "torchvision", "scipy", "sklearn", "matplotlib") if m in sys.modules))
"""


def test_an_unchanged_rerun_decides_without_torch_or_plotting_libraries(full_run: Path, cohort,
                                                                         resnet50_weights_file: Path) -> None:
    """The same command in a new process (as a user re-runs it) checks the weights file, finds every run completed and
    keeps the report without importing torch, torchvision, scipy, scikit-learn or matplotlib."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "INFO"}
    results = (full_run / "results.json").read_text()
    done = subprocess.run([sys.executable, "-c", RERUN_PROBE, *full_run_argv(cohort, resnet50_weights_file, full_run)],
                          env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert "Nothing the report is made from has changed" in output, output[-3000:]
    assert output.count("already holds a completed run with this configuration") == 3
    assert done.stdout.splitlines()[-1] == "EXIT 0", output[-3000:]
    assert (full_run / "results.json").read_text() == results

def test_visual_section_shows_each_network_arm_on_the_same_slices(full_run: Path) -> None:
    raw = json.loads((full_run / "results.json").read_text())
    assert "visual" not in raw and "data:image/png" not in (full_run / "results.json").read_text()
    parser = _Collector()
    parser.feed((full_run / "report.html").read_text())
    assert "visual" in parser.ids
    html = (full_run / "report.html").read_text()
    for arm in ("scratch", "imagenet"):
        assert html.count(f'<td data-arm="{arm}">') >= 1
    assert html.count('<td data-arm="scratch">') == html.count('<td data-arm="imagenet">')
    assert "No map is shown for the linear-probe arm" in html
    md = (full_run / "report.md").read_text()
    assert (
        "visual_saliency_scratch_00.png" in md and (full_run / "figures" / "visual_saliency_scratch_00.png").is_file()
    )


async def _flow_run_data(out: Path) -> tuple[dict[str, str], list[str]]:
    """The keyed artifacts and the log messages of the latest compare flow run that wrote its report to `out`."""
    async with get_client() as client:
        run = await _compare_run_of(client, out)
        artifacts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return {a.key: json.dumps(a.data) if not isinstance(a.data, str) else a.data for a in artifacts if a.key}, [
        log.message for log in logs
    ]


def test_prefect_artifacts_attached_and_nothing_identifies_a_patient(full_run: Path, cohort) -> None:
    artifacts, logs = asyncio.run(_flow_run_data(full_run))
    assert {"ctcompare-summary", "ctcompare-metrics", "ctcompare-report-link"} <= set(artifacts)
    identifiers = [value for value in cohort.identifiers if len(value) >= 4]
    assert identifiers, "the synthetic cohort must carry identifiers for this test to mean anything"
    # nothing private under the report folder: the dataset (and its private part) lies beside it
    assert not [p for p in full_run.rglob("*") if p.name in {"private", "quarantine.csv", "hmac.key", "index.csv"}]
    assert (dataset_of(full_run) / "private").is_dir()
    texts = {
        str(p): p.read_text(errors="replace") for p in shareable_files(full_run) + shareable_files(dataset_of(full_run))
    }
    assert any(p.endswith("manifest.csv") for p in texts) and any(p.endswith("report.html") for p in texts)
    assert any(p.endswith("plan.json") for p in texts) and any(p.endswith("val_predictions.csv") for p in texts)
    texts.update({f"artifact {key}": data for key, data in artifacts.items()})
    texts["logs of the compare flow run"] = "\n".join(logs)
    # the model packages, their cards and cost files, and the visual section's figures are covered too
    assert any(p.endswith("MODEL_CARD.md") for p in texts) and any(p.endswith("deploy_cost.json") for p in texts)
    texts["file names under the report folder"] = "\n".join(str(p.relative_to(full_run)) for p in full_run.rglob("*"))
    assert "figures/visual_saliency_scratch_00.png" in texts["file names under the report folder"]
    leaks = [(where, value) for where, text in texts.items() for value in identifiers if value in text]
    assert not leaks, f"identifiers found in shareable outputs: {leaks[:5]}"


def test_pretrained_arm_without_weights_is_reported_as_skipped(full_run: Path, cohort, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    dataset = dataset_of(full_run)
    attach_lesions(dataset_dir=dataset, sidecar=cohort.out_dir / LESIONS_SIDECAR_FILE)  # the shortcut check too
    out = tmp_path / "reports" / "no-weights"
    capsys.readouterr()
    code = main([
        "compare", str(dataset), "--out", str(out), "--profile", "smoke", "--arms", SMALL_SCRATCH, "imagenet",
        "--no-calibrate", "--bootstrap", "20", "--set", "download_weights=false",
    ])
    assert code == EXIT_PARTIAL == 3
    assert compare_state_of(out) == ("CANCELLED", "Partial")  # grey in the UI: not the green of a full comparison
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Partial result: imagenet (skipped) did not complete; report: ") and "scratch" not in last
    assert last.endswith("report.html")
    results = ComparisonResults.model_validate_json((out / "results.json").read_text())
    imagenet = results.arm("imagenet")
    assert imagenet.status == "skipped" and "--weights" in imagenet.reason and imagenet.deployment is None
    html = (out / "report.html").read_text()
    assert "skipped" in html and "--weights" in html and 'class="banner banner-partial"' in html
    assert results.recommendation.basis == "single_arm"
    assert results.arm(SMALL_SCRATCH).deployment is not None and results.compression is not None
    assert "Pointing game" in html and f'<td data-arm="{SMALL_SCRATCH}">' in html


def test_an_arm_that_fails_mid_training_is_reported_and_the_others_compared(
        full_run: Path, resnet50_weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The imagenet arm raises in its second epoch (after its head-only epoch finished and was saved), also on the
    task's one retry: the comparison still ends Partial with a report that names the failure and its reason, and the
    scratch arm's results are complete (a ResNet-18 from scratch beside the ResNet-50 imagenet arm)."""
    import tasks.training.loop as train_loop

    real_epoch = train_loop.train_one_epoch
    reason = "simulated accelerator fault in the second epoch"

    def fail_after_head_phase(setup, x_train, y_train, epoch, progress=None):
        if setup.head_epochs > 0 and epoch >= setup.head_epochs:  # only a pretrained arm has a head-only phase
            raise RuntimeError(reason)
        return real_epoch(setup, x_train, y_train, epoch, progress)

    monkeypatch.setattr(train_loop, "train_one_epoch", fail_after_head_phase)
    out = tmp_path / "reports" / "one-arm-fails"
    capsys.readouterr()
    code = main(
        [
            "compare",
            str(dataset_of(full_run)),
            "--out",
            str(out),
            "--profile",
            "smoke",
            "--arms",
            SMALL_SCRATCH,
            "imagenet",
            "--weights",
            str(resnet50_weights_file),
            "--no-calibrate",
            "--bootstrap",
            "20",
            "--set",
            "download_weights=false",
        ]
    )
    assert code == EXIT_PARTIAL == 3
    assert compare_state_of(out) == ("FAILED", "Partial")  # red in the UI: an arm failed
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Partial result: imagenet (failed) did not complete; report: ") and "scratch" not in last
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    results = ComparisonResults.model_validate_json((out / "results.json").read_text())
    imagenet = results.arm("imagenet")
    assert imagenet.status == "failed" and reason in imagenet.reason
    assert imagenet.test_metrics is None and imagenet.deployment is None
    plan = read_plan(out / "plan.json")
    imagenet_dir = out / next(r.run_dir for r in plan.runs if r.arm == "imagenet")
    assert len(read_models_csv(imagenet_dir / "metrics.csv", EpochMetrics)) == 1  # it failed after one finished epoch
    scratch = results.arm(SMALL_SCRATCH)
    assert scratch.status == "completed" and scratch.test_metrics is not None and scratch.deployment is not None
    assert [a.name for a in results.completed_arms] == [SMALL_SCRATCH] and results.recommendation.basis == "single_arm"
    html = (out / "report.html").read_text()
    assert 'class="banner banner-partial"' in html and "failed" in html and reason in html
    assert f'<td data-arm="{SMALL_SCRATCH}">' in html


def test_no_completed_arm_fails_the_flow_run(
    full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "reports" / "nothing"
    capsys.readouterr()
    code = main([
        "compare", str(dataset_of(full_run)), "--out", str(out), "--profile", "smoke", "--arms", "imagenet",
        "--no-calibrate", "--bootstrap", "20", "--set", "download_weights=false",
    ])
    assert code == EXIT_NO_ARM == 1
    assert compare_state_of(out) == ("FAILED", "Failed")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("No arm completed: imagenet (skipped) did not complete; report: ")
    results = ComparisonResults.model_validate_json((out / "results.json").read_text())
    assert not results.completed_arms and results.compression is None
    html = (out / "report.html").read_text()
    assert "No model package was written" in html and 'id="visual"' not in html


def test_bad_arguments_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--profile", "smoke"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "src").mkdir()
    assert main(["compare", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--arms", "resnet18"]) == 2
    assert "choose from scratch, imagenet, imagenet-linear" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--set", "epochz=3"]) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_folds_and_data_efficiency_curve(full_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "folds"
    code = main([
        "compare", str(dataset_of(full_run)), "--out", str(out), "--profile", "smoke", "--arms", SMALL_SCRATCH,
        "--folds", "2", "--fractions", "0.5,1.0", "--no-calibrate", "--bootstrap", "20",
    ])
    assert code == 0
    results = ComparisonResults.model_validate_json((out / "results.json").read_text())
    (folds,) = results.folds
    assert folds.arm == SMALL_SCRATCH and [f.fold for f in folds.per_fold] == [0, 1]
    assert (
        min(f.metrics["roc_auc"] for f in folds.per_fold)
        <= folds.mean["roc_auc"]
        <= max(f.metrics["roc_auc"] for f in folds.per_fold)
    )
    points = sorted(results.data_efficiency, key=lambda p: p.fraction)
    assert [p.fraction for p in points] == [0.5, 1.0]
    assert points[0].n_train_patients < points[1].n_train_patients
    parser = _Collector()
    parser.feed((out / "report.html").read_text())
    assert {"folds", "data-efficiency"} <= parser.ids
    assert main(["compare", str(dataset_of(full_run)), "--out", str(out), "--fractions", "0,2"]) == 2

    # cross-validated: the two outer folds' test parts partition every labelled patient
    plan = read_plan(out / "plan.json")
    assert plan.split.mode == "cross-validated" and [r.run_dir for r in plan.pooled_runs(SMALL_SCRATCH)] == [
        "runs/resnet18-scratch/main",
        "runs/resnet18-scratch/fold-1",
    ]
    labelled = {r.patient_key for r in read_models_csv(dataset_of(full_run) / "manifest.csv", ManifestRow) if r.label}
    fold_of: dict[str, int] = {}
    for k, run in enumerate(plan.pooled_runs(SMALL_SCRATCH)):
        for row in read_models_csv(out / run.run_dir / "predictions.csv", PredictionRow):
            assert fold_of.setdefault(row.patient_key, k) == k  # a patient's images are all in one test fold
    assert set(fold_of) == labelled  # every labelled patient tested, each in exactly one outer fold

    # The package ships one fold's model at that same fold's threshold: the weights are the best epoch of the run it
    # names (the main run, outer fold 0), and the threshold is the one chosen on that run's validation patients.
    (arm,) = [a for a in results.arms if a.name == SMALL_SCRATCH]
    package = load_package(out / arm.package_dir)
    shipped = package.meta.run_config.fold
    assert shipped == 0 and plan.pooled_runs(SMALL_SCRATCH)[shipped] == plan.main_run(SMALL_SCRATCH)
    shipped_run = out / plan.pooled_runs(SMALL_SCRATCH)[shipped].run_dir
    best = torch.load(shipped_run / "best.pt", weights_only=True)["state_dict"]
    assert package.state_dict.keys() == best.keys()
    assert all(torch.equal(package.state_dict[key], best[key]) for key in best)
    assert package.meta.operating_point.threshold == pytest.approx(arm.operating_point.patient_thresholds[shipped])


def test_new_folder_per_run_keeps_every_report(full_run: Path, tmp_path: Path) -> None:
    from flows.compare import compare_flow

    root = tmp_path / "weekly"
    first = compare_flow(source=str(dataset_of(full_run)), out_dir=str(root), profile="smoke", arms=[SMALL_SCRATCH],
                         bootstrap=20, calibrate=False, new_folder_per_run=True)
    report_dir = Path(first["report_dir"])
    assert report_dir.parent == root and (report_dir / "results.json").is_file()
    assert report_dir.name in (root / "index.html").read_text()
