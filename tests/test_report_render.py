"""Tests of reports.render and the ComparisonResults schema, on synthetic results."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pydantic import ValidationError
from report_fixtures import SKIP_REASON, make_example_results

from data_schemas.metrics import MetricValue
from data_schemas.report import ArmResult, ArmWeights, ComparisonResults, DeLongResult, PairedComparison, Recommendation
from reports.figures import learning_plot
from reports.first_screen import report_banners
from reports.formatting import md_escape
from reports.render import (
    SECTION_IDS,
    load_results,
    metrics_table,
    render_report,
    summary_markdown,
    update_index,
)
from reports.wording import recommendation_sentences

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Collector(HTMLParser):
    """Collects element ids, <img> sources, <a> links, every attribute value and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.attr_values: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.append(values["id"] or "")
        if tag == "img":
            self.images.append(values)
        if tag == "a" and values.get("href"):
            self.links.append(values["href"] or "")
        self.attr_values.extend(v for v in values.values() if v)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def raw_first_screen(path: Path) -> str:
    """report.html up to its first collapsed section."""
    raw = path.read_text(encoding="utf-8")
    return raw[: raw.index("<details")]


def _parse(path: Path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text(encoding="utf-8"))
    collector.close()
    return collector


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[ComparisonResults, dict[str, Path]]:
    results = make_example_results()
    return results, render_report(results, tmp_path_factory.mktemp("report") / "run1")


def test_html_has_every_section_and_embedded_plots(rendered: tuple[ComparisonResults, dict[str, Path]]) -> None:
    results, paths = rendered
    page = _parse(paths["html"])
    for section in SECTION_IDS:
        assert section in page.ids, f"section #{section} missing"
    assert len(page.ids) == len(set(page.ids)), "duplicate ids"
    # roc, calibration, one learning-curve figure per arm, data efficiency
    assert len(page.images) == 3 + len(results.completed_arms)
    for img in page.images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
        assert img.get("alt")
    for link in page.links:
        assert link.startswith("#") or link == "report-appendix.html", f"non-local link {link}"
    raw = paths["html"].read_text(encoding="utf-8")
    assert "http://" not in raw and "https://" not in raw and "url(" not in raw
    text = " ".join(page.text)
    assert results.recommendation.headline in text
    assert results.comparisons[0].plain_words in text
    assert raw.index('id="recommendation"') < raw.index('id="dataset"')


def test_markdown_and_figures(rendered: tuple[ComparisonResults, dict[str, Path]]) -> None:
    results, paths = rendered
    md = paths["markdown"].read_text(encoding="utf-8")
    for heading in (
        "## Verdict",
        "## How the verdict was reached",
        "## Dataset card",
        "## Split",
        "## Cost",
        "## Test metrics",
        "## Paired comparisons",
        "## Learning curves",
        "## ROC curves",
        "## Calibration",
        "## Confusion matrices",
        "## Convergence",
        "## Outer folds",
        "## Data efficiency",
        "## Reproducibility",
        "## Evaluation",
        "## Per-patient results",
    ):
        assert heading in md
    figures = [p for k, p in paths.items() if k.startswith("figure:")]
    assert figures and all(p.read_bytes().startswith(PNG_MAGIC) for p in figures)
    for fig in figures:
        assert f"(figures/{fig.name})" in md
    assert results.dataset.card.content_hash in md


def test_results_json_round_trips(rendered: tuple[ComparisonResults, dict[str, Path]]) -> None:
    results, paths = rendered
    assert load_results(paths["results"]) == results
    data = json.loads(paths["results"].read_text(encoding="utf-8"))
    assert data["schema_version"] == "2.0"
    assert "patient_key" not in paths["results"].read_text(encoding="utf-8")


def test_skipped_arm_shows_its_reason(tmp_path: Path) -> None:
    results = make_example_results(skip_imagenet=True, with_folds=False, with_data_efficiency=False)
    paths = render_report(results, tmp_path / "run")
    page = _parse(paths["html"])
    text = " ".join(page.text)
    assert text.count(SKIP_REASON) == 1  # said once, in the deciding table on the first screen
    assert raw_first_screen(paths["html"]).count(SKIP_REASON) == 1
    assert "folds" not in page.ids and "data-efficiency" not in page.ids
    assert len(page.images) == 3  # roc, calibration, scratch's learning curves
    md = paths["markdown"].read_text(encoding="utf-8")
    assert md.count(md_escape(SKIP_REASON)) == 1 and md.index(md_escape(SKIP_REASON)) < md.index("## How the verdict")
    assert "reason under" not in md and "reason under" not in text
    assert results.recommendation.basis == "single_arm"


def test_text_is_escaped(tmp_path: Path) -> None:
    results = make_example_results(skip_imagenet=True, with_folds=False, with_data_efficiency=False)
    arms = [results.arms[0], ArmResult(name="imagenet", status="failed", reason="<script>alert(1)</script> & co")]
    paths = render_report(results.model_copy(update={"arms": arms}), tmp_path / "run")
    raw = paths["html"].read_text(encoding="utf-8")
    assert "<script>alert(1)" not in raw and "&lt;script&gt;alert(1)" in raw
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "<script>" not in md and md_escape("<script>alert(1)</script> & co") in md and "&lt;script&gt;" in md


def test_markdown_escapes_user_supplied_names(tmp_path: Path) -> None:
    """A class name with Markdown and HTML in it stays text in report.md and in the Prefect summary."""
    results = make_example_results(with_folds=False, with_data_efficiency=False)
    evil = "lesion|<b>x</b>*"
    card = results.dataset.card.model_copy(update={"label_distribution": {"normal": 1, evil: 2}})
    dataset = results.dataset.model_copy(update={"classes": ["normal", evil], "positive_class": evil, "card": card})
    patients = [
        row.model_copy(update={"label": evil if row.label == "lesion" else row.label}) for row in results.patients
    ]
    evil_results = results.model_copy(update={"dataset": dataset, "patients": patients})
    md = render_report(evil_results, tmp_path / "run")["markdown"].read_text(encoding="utf-8")
    assert evil not in md and "<b>" not in md
    assert "lesion\\|&lt;b&gt;x&lt;/b&gt;\\*" in md
    assert "<b>" not in summary_markdown(evil_results.model_copy(update={"title": "A <b>title</b>"}))


def test_report_states_evaluation_operating_point_and_patient_table(
    rendered: tuple[ComparisonResults, dict[str, Path]]
) -> None:
    results, paths = rendered
    raw = paths["html"].read_text(encoding="utf-8")
    md = paths["markdown"].read_text(encoding="utf-8")
    assert results.evaluation.mode == "cross-validated"
    for text in (raw, md):
        assert "cross-validated" in text and "youden" in text
        assert "Bandos et al. 2005" in text and "Durkalski et al. 2003" in text and "Holm" in text
        assert "continuity corrected" not in text  # the clustered test has no continuity correction
        for arm in results.completed_arms:
            for threshold in arm.operating_point.slice_thresholds:
                assert f"{threshold:.3f}" in text
    page = _parse(paths["html"])
    assert "patient-table" in page.ids and 'class="sortable"' in raw
    for row in results.patients[:3]:
        assert row.pseudonym in raw and f"`{row.pseudonym}`" in md
    assert len(results.patients) == len({row.pseudonym for row in results.patients})


def test_index_lists_runs(tmp_path: Path) -> None:
    first = make_example_results(run_id="run-a", created_at="2025-01-01T10:00:00+00:00")
    second = make_example_results(run_id="run-b", created_at="2025-02-01T10:00:00+00:00", skip_imagenet=True,
                                  with_folds=False, with_data_efficiency=False)
    render_report(first, tmp_path / "dataset1" / "run-a")
    render_report(second, tmp_path / "run-b")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.json").write_text("{}", encoding="utf-8")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text('{"schema_version": "1.0"}', encoding="utf-8")
    index = update_index(tmp_path)
    page = _parse(index)
    assert page.links == ["run-b/report.html", "dataset1/run-a/report.html"]  # newest first
    for link in page.links:
        assert (tmp_path / link).is_file()
    text = " ".join(page.text)
    assert "imagenet skipped" in text and "junk" in text and "schema 1.0; this version reads 2.0" in text
    raw = index.read_text(encoding="utf-8")
    assert "http://" not in raw and "https://" not in raw


def test_summary_markdown_and_metrics_table() -> None:
    results = make_example_results(skip_imagenet=True, with_folds=False, with_data_efficiency=False)
    md = summary_markdown(results)
    assert md.startswith("## ") and md_escape(results.recommendation.headline) in md
    scratch = results.arm("scratch").patient_metrics.roc_auc
    assert f"| scratch | {scratch.value:.3f} (" in md and md.count(md_escape(SKIP_REASON)) == 1
    assert "Recommendation" not in md  # no pointer to a heading the summary does not have
    rows = metrics_table(results)
    assert [r["arm"] for r in rows] == ["scratch", "imagenet"]
    # the deciding figures first: the patient-level AUC the recommendation compares, then cost and status
    assert list(rows[0])[:5] == ["arm", "patient_roc_auc", "auc_difference", "train_time", "status"]
    assert rows[0]["patient_roc_auc"].startswith(f"{scratch.value:.3f} (") and rows[1]["patient_roc_auc"] == "—"
    assert rows[0]["slice_roc_auc"].count("(") == 1 and rows[1]["slice_roc_auc"] == "—"
    assert rows[1]["note"] == SKIP_REASON


def test_schema_guards() -> None:
    results = make_example_results(with_folds=False, with_data_efficiency=False)
    data = results.model_dump()
    with pytest.raises(ValidationError, match="identifier"):
        bad = json.loads(json.dumps(data))
        bad["arms"][0]["config"]["patient_key"] = "abc"
        ComparisonResults.model_validate(bad)
    with pytest.raises(ValidationError, match="extra"):
        ComparisonResults.model_validate({**data, "predictions": []})
    with pytest.raises(ValidationError, match="valid arms"):
        ComparisonResults.model_validate(
            {**data, "comparisons": [PairedComparison(arm_a="imagenet", arm_b="nope").model_dump()]}
        )
    with pytest.raises(ValidationError, match="no test_metrics"):
        ArmResult(name="x", status="completed")
    with pytest.raises(ValidationError, match="reason"):
        ArmResult(name="x", status="skipped")
    with pytest.raises(ValueError, match="valid arms"):
        results.arm("resnet18")


def _pair(diff: float, low: float, high: float, p: float, holm: float) -> PairedComparison:
    test = DeLongResult(
        auc_a=0.8 + diff, auc_b=0.8, diff=diff, z=1.0, p_value=p, p_holm=holm, ci_of_diff=(low, high), method="DeLong"
    )
    return PairedComparison(arm_a="imagenet-linear", arm_b="imagenet", patient_delong=test, delong=test)


@pytest.mark.parametrize(
    "basis, pair, must, must_not",
    [
        (
            "non_inferior",
            _pair(-0.004, -0.015, 0.007, 0.4, 0.4),
            ["Prefer the cheaper imagenet-linear", "non-inferior", "0.02", "-0.015"],
            ["significantly"],
        ),
        (
            "inconclusive",
            _pair(-0.10, -0.22, 0.02, 0.09, 0.09),
            ["Inconclusive", "-0.220", "400 test patients", "margin"],
            ["Prefer", "Use "],
        ),
        (
            "significant",
            _pair(-0.10, -0.18, -0.02, 0.01, 0.01),
            ["Use imagenet", "significantly higher", "AUC(imagenet) − AUC(imagenet-linear) = 0.100", "0.020 to 0.180"],
            ["Inconclusive"],
        ),
    ],
)
def test_headline_agrees_with_its_interval(
    basis: str, pair: PairedComparison, must: list[str], must_not: list[str]
) -> None:
    results = make_example_results(with_folds=False, with_data_efficiency=False)
    arms = [a.model_copy(update={"name": n}) for a, n in zip(results.completed_arms, ("imagenet-linear", "imagenet"))]
    preferred = {"non_inferior": "imagenet-linear", "significant": "imagenet"}.get(basis)
    rec = Recommendation(
        headline="",
        basis=basis,
        preferred_arm=preferred,
        best_arm="imagenet",
        margin=0.02,
        patients_needed=400 if basis == "inconclusive" else None,
        deciding_arms=["imagenet-linear", "imagenet"],
    )
    headline, details = recommendation_sentences(rec, arms, [pair], n_patients=36)
    for text in must:
        assert text in headline, (text, headline)
    for text in must_not:
        assert text not in headline, (text, headline)
    assert any("Holm-adjusted" in line for line in details) and any("−0.02" in line for line in details)


def test_completed_arms_without_a_test_auc_are_not_called_not_completed() -> None:
    """A test part of one class leaves completed arms without an AUC: the headline says so, not "No arm completed"."""
    results = make_example_results(with_folds=False, with_data_efficiency=False)
    rec = Recommendation(headline="", basis="none", preferred_arm=None, best_arm=None, margin=0.02)
    headline, _ = recommendation_sentences(rec, results.completed_arms, [], n_patients=8)
    names = [arm.name for arm in results.completed_arms]
    assert headline.startswith(f"{', '.join(names)} completed, but no test AUC could be computed"), headline
    assert "one class" in headline and "No arm completed" not in headline
    skipped = [arm.model_copy(update={"status": "skipped", "reason": "no weights", "test_metrics": None,
                                      "patient_metrics": None}) for arm in results.completed_arms[:1]]
    headline, _ = recommendation_sentences(rec, skipped, [], n_patients=8)
    assert headline == "No arm completed, so there is nothing to recommend."


# ---------------------------------------------------------------- banners, appendix, command, readability


def _with_arms(results: ComparisonResults, **updates_by_arm: dict) -> ComparisonResults:
    """results with arm fields replaced, e.g. _with_arms(r, imagenet={"profile": "cpu"})."""
    arms = [arm.model_copy(update=updates_by_arm.get(arm.name.replace("-", "_"), {})) for arm in results.arms]
    return results.model_copy(update={"arms": arms})


def _banner_kinds(results: ComparisonResults) -> list[str]:
    return [b.kind for b in report_banners(results)]


UNCHECKED = ArmWeights(file_name="random_resnet50.pt", sha256="9f" * 32, source="file", hash_checked=False)
CHECKED = ArmWeights(file_name="resnet50-11ad3fa6.pth", sha256="11ad3fa6" + "0" * 56, source="file", hash_checked=True)


def test_banners_name_what_makes_numbers_less_than_they_seem() -> None:
    base = make_example_results(with_folds=False, with_data_efficiency=False)
    assert {arm.profile for arm in base.arms} == {"smoke"}  # from each run's config.json
    real = _with_arms(base, scratch={"profile": "cpu"}, imagenet={"profile": "cpu", "weights": CHECKED})
    assert "smoke" in _banner_kinds(base) and "smoke" not in _banner_kinds(real)
    assert "weights" not in _banner_kinds(real)  # a checked torchvision file is not flagged

    unverified = _with_arms(real, imagenet={"weights": UNCHECKED})
    (banner,) = [b for b in report_banners(unverified) if b.kind == "weights"]
    assert "random_resnet50.pt" in banner.text and UNCHECKED.sha256 in banner.text and "imagenet" in banner.text
    random_init = _with_arms(real, imagenet={"weights": None})
    assert "randomly initialised" in [b for b in report_banners(random_init) if b.kind == "weights"][0].text

    chance_auc = MetricValue(value=0.56, ci_low=0.41, ci_high=0.70)
    scratch = real.arm("scratch")
    near_chance = _with_arms(
        real, scratch={"patient_metrics": scratch.patient_metrics.model_copy(update={"roc_auc": chance_auc})}
    )
    (chance,) = [b for b in report_banners(near_chance) if b.kind == "chance"]
    assert "scratch" in chance.text and "0.41 to 0.70" in chance.text and "imagenet" not in chance.text
    clear = _with_arms(real, scratch={"patient_metrics": scratch.patient_metrics.model_copy(
        update={"roc_auc": MetricValue(value=0.9, ci_low=0.51, ci_high=0.97)})})
    assert "chance" not in _banner_kinds(clear)

    partial = make_example_results(skip_imagenet=True, with_folds=False, with_data_efficiency=False)
    (part,) = [b for b in report_banners(partial) if b.kind == "partial"]
    assert "imagenet (skipped)" in part.text and "1 of 2" in part.text
    assert "partial" not in _banner_kinds(base)


def test_banners_open_report_markdown_and_summary(tmp_path: Path) -> None:
    base = make_example_results(skip_imagenet=True, with_folds=False, with_data_efficiency=False)
    evil = ArmWeights(file_name="<b>w</b>.pt", sha256="ab" * 32, hash_checked=False)
    results = _with_arms(base, scratch={"profile": "smoke"})
    results = results.model_copy(
        update={
            "arms": [results.arms[0].model_copy(update={"name": "imagenet-linear", "weights": evil}), results.arms[1]]
        }
    )
    kinds = _banner_kinds(results)
    assert kinds == ["smoke", "weights", "partial"] or kinds == ["smoke", "weights", "chance", "partial"]
    paths = render_report(results, tmp_path / "run")
    raw = paths["html"].read_text(encoding="utf-8")
    assert raw.count('class="banner ') == len(kinds)
    assert raw.index("for testing: numbers not meaningful") < raw.index('id="recommendation"')
    assert "&lt;b&gt;w&lt;/b&gt;.pt" in raw and "<b>w</b>" not in raw and "ab" * 32 in raw
    md = paths["markdown"].read_text(encoding="utf-8")
    assert md.index("for testing: numbers not meaningful") < md.index("## How the verdict was reached")
    assert "<b>" not in md and "imagenet (skipped)" in md
    summary = summary_markdown(results, report_link="http://127.0.0.1:8765/run/report.html")
    assert summary.index("for testing: numbers not meaningful") < summary.index("| Arm |")
    assert "<b>" not in summary and "ab" * 32 in summary
    assert summary.rstrip().endswith("(http://127.0.0.1:8765/run/report.html)")


def test_configuration_dumps_live_in_the_appendix(rendered: tuple[ComparisonResults, dict[str, Path]]) -> None:
    results, paths = rendered
    md = paths["markdown"].read_text(encoding="utf-8")
    raw = paths["html"].read_text(encoding="utf-8")
    for text in (md, raw):
        assert '"weight_decay"' not in text and "```json" not in text  # no config dump in the report itself
    assert "(report-appendix.md)" in md and 'href="report-appendix.html"' in raw
    appendix_md = paths["appendix_markdown"].read_text(encoding="utf-8")
    appendix_html = paths["appendix_html"].read_text(encoding="utf-8")
    assert paths["appendix_markdown"].parent == paths["markdown"].parent
    for arm in results.arms:
        assert f"### {arm.name}" in appendix_md and f"<h3>{arm.name} " in appendix_html
    assert appendix_md.count('"weight_decay"') == len(results.arms) and "numpy" in appendix_html


def test_reproducibility_command_is_shown_as_given(tmp_path: Path) -> None:
    base = make_example_results(with_folds=False, with_data_efficiency=False)
    command = ("ctcompare compare 'scans/chest ct' --labels labels.csv --out reports/trial-1 --profile cpu "
               "--arms scratch imagenet --seed 0 --weights resnet50-11ad3fa6.pth --set 'lr=0.0005'")
    results = _with_arms(base, imagenet={"weights": CHECKED}).model_copy(
        update={"reproducibility": base.reproducibility.model_copy(update={"command": command})})
    paths = render_report(results, tmp_path / "run")
    md = paths["markdown"].read_text(encoding="utf-8")
    assert f"```sh\n{command}\n```" in md
    assert f"{md_escape(CHECKED.file_name)}, SHA-256 `{CHECKED.sha256}` (hash checked)" in md
    page = _parse(paths["html"])
    assert command in page.text and CHECKED.sha256 in page.text


def _png_width(path: Path) -> int:
    """Pixel width from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big")


def test_figures_are_wide_enough_and_epochs_are_whole(rendered: tuple[ComparisonResults, dict[str, Path]]) -> None:
    results, paths = rendered
    figures = [p for k, p in paths.items() if k.startswith("figure:")]
    assert len(figures) == 3 + len(results.completed_arms)
    for fig in figures:
        assert _png_width(fig) >= 700, fig.name
    plot = learning_plot(results.completed_arms[0], "#1f77b4")
    for ax in plot.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        legend = ax.get_legend()
        assert legend is not None and min(t.get_fontsize() for t in legend.get_texts()) >= 10


@pytest.mark.parametrize("name, shown", [("dataset", None), ("lung-cohort-2024", "lung-cohort-2024")])
def test_header_names_the_dataset_once(tmp_path: Path, name: str, shown: str | None) -> None:
    base = make_example_results(with_folds=False, with_data_efficiency=False)
    results = base.model_copy(update={"dataset": base.dataset.model_copy(update={"name": name})})
    paths = render_report(results, tmp_path / "run")
    for path, end in ((paths["markdown"], "## Verdict"), (paths["html"], '<section id="verdict">')):
        text = path.read_text(encoding="utf-8")
        header = " ".join(text[: text.index(end)].replace("`", "").lower().split())
        assert "dataset dataset" not in header
        if shown:
            assert f"dataset {shown}" in header


def test_index_shows_the_report_folder_name(tmp_path: Path) -> None:
    results = make_example_results(skip_imagenet=True, with_folds=False, with_data_efficiency=False)
    render_report(results, tmp_path / "trial-lr-0.0005")
    page = _parse(update_index(tmp_path))
    assert page.links == ["trial-lr-0.0005/report.html"]
    assert "trial-lr-0.0005" in page.text and "Report folder" in page.text
