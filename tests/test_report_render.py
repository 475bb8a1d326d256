"""Tests of reports.render and the ComparisonResults schema, on synthetic results."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pydantic import ValidationError

from data_schemas.report import ArmResult, ComparisonResults, DeLongResult, PairedComparison, Recommendation
from reports.formatting import md_escape
from reports.wording import recommendation_sentences
from reports.render import SECTION_IDS, load_results, metrics_table, render_report, summary_markdown, update_index
from report_fixtures import SKIP_REASON, make_example_results

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
        assert link.startswith("#"), f"non-local link {link}"
    raw = paths["html"].read_text(encoding="utf-8")
    assert "http://" not in raw and "https://" not in raw and "url(" not in raw
    text = " ".join(page.text)
    assert results.recommendation.headline in text
    assert results.comparisons[0].plain_words in text
    assert raw.index('id="recommendation"') < raw.index('id="dataset"')


def test_markdown_and_figures(rendered: tuple[ComparisonResults, dict[str, Path]]) -> None:
    results, paths = rendered
    md = paths["markdown"].read_text(encoding="utf-8")
    for heading in ("## Recommendation", "## Dataset card", "## Split", "## Cost", "## Test metrics",
                    "## Paired comparisons", "## Learning curves", "## ROC curves", "## Calibration",
                    "## Confusion matrices", "## Convergence", "## Outer folds", "## Data efficiency",
                    "## Reproducibility", "## Evaluation", "## Per-patient results"):
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
    assert "imagenet: skipped" in text and SKIP_REASON in text
    assert "folds" not in page.ids and "data-efficiency" not in page.ids
    assert len(page.images) == 3  # roc, calibration, scratch's learning curves
    assert md_escape(SKIP_REASON) in paths["markdown"].read_text(encoding="utf-8")
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
    patients = [row.model_copy(update={"label": evil if row.label == "lesion" else row.label}) for row in results.patients]
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
        assert "Obuchowski 1997" in text and "Durkalski 2003" in text and "Holm" in text
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
    assert "| scratch | completed |" in md and md_escape(SKIP_REASON) in md
    rows = metrics_table(results)
    assert [r["arm"] for r in rows] == ["scratch", "imagenet"]
    assert rows[0]["roc_auc"].count("(") == 1 and rows[1]["roc_auc"] == "—"
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
    test = DeLongResult(auc_a=0.8 + diff, auc_b=0.8, diff=diff, z=1.0, p_value=p, p_holm=holm, ci_of_diff=(low, high), method="DeLong")
    return PairedComparison(arm_a="imagenet-linear", arm_b="imagenet", patient_delong=test, delong=test)


@pytest.mark.parametrize(
    "basis, pair, must, must_not",
    [
        ("non_inferior", _pair(-0.004, -0.015, 0.007, 0.4, 0.4), ["Prefer the cheaper imagenet-linear", "non-inferior", "0.02", "-0.015"], ["significantly"]),
        ("inconclusive", _pair(-0.10, -0.22, 0.02, 0.09, 0.09), ["Inconclusive", "-0.220", "400 patients", "margin"], ["Prefer", "Use "]),
        ("significant", _pair(-0.10, -0.18, -0.02, 0.01, 0.01), ["Use imagenet", "significantly higher", "AUC(imagenet) − AUC(imagenet-linear) = 0.100", "0.020 to 0.180"], ["Inconclusive"]),
    ],
)
def test_headline_agrees_with_its_interval(basis: str, pair: PairedComparison, must: list[str], must_not: list[str]) -> None:
    results = make_example_results(with_folds=False, with_data_efficiency=False)
    arms = [a.model_copy(update={"name": n}) for a, n in zip(results.completed_arms, ("imagenet-linear", "imagenet"))]
    preferred = {"non_inferior": "imagenet-linear", "significant": "imagenet"}.get(basis)
    rec = Recommendation(headline="", basis=basis, preferred_arm=preferred, best_arm="imagenet", margin=0.02,
                         patients_needed=400 if basis == "inconclusive" else None, deciding_arms=["imagenet-linear", "imagenet"])
    headline, details = recommendation_sentences(rec, arms, [pair], n_patients=36)
    for text in must:
        assert text in headline, (text, headline)
    for text in must_not:
        assert text not in headline, (text, headline)
    assert any("Holm-adjusted" in line for line in details) and any("−0.02" in line for line in details)
