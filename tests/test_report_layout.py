"""The report reads in one screen, then details: the verdict coloured by its outcome, the warnings and the deciding
table first, every other section collapsed, no sentence said twice. Rendered from real results (report_fixtures)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_fixtures import SKIP_REASON, make_example_results

from data_schemas.report import ComparisonResults
from reports.first_screen import OUTCOMES, first_screen_context, report_banners
from reports.render import SECTION_IDS, render_report


class _Sections(HTMLParser):
    """Visible text per top-level block: 'first' before the first <details>, then one entry per details section."""

    def __init__(self) -> None:
        super().__init__()
        self.current, self.depth, self.hidden_depth = "first", 0, 0
        self.text: dict[str, list[str]] = {"first": []}
        self.open_attr: list[bool] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("script", "style"):
            self.hidden_depth += 1
        if tag == "details":
            if self.depth == 0:
                self.current = values.get("id") or f"details-{len(self.text)}"
                self.text[self.current] = []
                self.open_attr.append("open" in values)
            self.depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self.hidden_depth -= 1
        if tag == "details":
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if not self.hidden_depth:
            self.text[self.current].append(data)


def _sections(path: Path) -> _Sections:
    parser = _Sections()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _sentences(text: str) -> list[str]:
    """Sentences of at least 40 characters, whitespace normalised."""
    flat = " ".join(text.split())
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat) if len(s.strip()) >= 40]


@pytest.fixture(scope="module")
def two_arms(tmp_path_factory: pytest.TempPathFactory) -> tuple[ComparisonResults, Path]:
    results = make_example_results()  # cross-validated, 3 outer folds, data efficiency
    return results, render_report(results, tmp_path_factory.mktemp("two") / "run")["html"]


@pytest.fixture(scope="module")
def one_arm(tmp_path_factory: pytest.TempPathFactory) -> tuple[ComparisonResults, Path]:
    results = make_example_results(skip_imagenet=True, with_folds=False, with_data_efficiency=False)
    return results, render_report(results, tmp_path_factory.mktemp("one") / "run")["html"]


@pytest.mark.parametrize("which", ["two_arms", "one_arm"])
def test_first_screen_holds_the_verdict_the_deciding_table_and_the_warnings_only(
    which: str, request: pytest.FixtureRequest
) -> None:
    results, html = request.getfixturevalue(which)
    page = _sections(html)
    first = " ".join(" ".join(page.text["first"]).split())
    assert results.recommendation.headline in first
    for banner in report_banners(results):
        assert " ".join(banner.text.split()) in first
    for arm in results.arms:
        assert arm.name in first
        if arm.patient_metrics is not None:
            assert f"{arm.patient_metrics.roc_auc.value:.3f} (" in first
    raw = html.read_text(encoding="utf-8")
    head = raw[: raw.index("<details")]
    assert head.count('class="deciding"') == 1 and "<img" not in head  # no figure before the details
    assert not any(page.open_attr), "every section below the first screen starts collapsed"
    assert set(SECTION_IDS) <= set(page.text)  # each one a collapsed <details> of its own


def test_the_verdict_box_is_coloured_by_its_outcome(one_arm, two_arms) -> None:
    single, html = one_arm
    assert single.recommendation.basis == "single_arm"
    raw = html.read_text(encoding="utf-8")
    assert 'class="verdict verdict-no-comparison"' in raw and 'class="verdict verdict-decided"' not in raw
    background = dict(re.findall(r"\.verdict-([a-z-]+) \{ background: (#[0-9a-f]{6})", raw))
    assert len(set(background.values())) == len(background) == 4  # each outcome its own colour; green is decided's
    assert "No comparison possible" in raw
    results, html = two_arms
    kind = OUTCOMES[results.recommendation.basis][0]
    assert f'class="verdict verdict-{kind}"' in html.read_text(encoding="utf-8")
    assert (kind == "decided") == (results.recommendation.basis in ("significant", "non_inferior"))
    for basis in ("inconclusive", "none"):
        other = results.model_copy(
            update={"recommendation": results.recommendation.model_copy(update={"basis": basis})}
        )
        assert first_screen_context(other)["outcome"].kind not in ("decided",)


@pytest.mark.parametrize("which", ["two_arms", "one_arm"])
def test_no_sentence_is_said_in_two_sections(which: str, request: pytest.FixtureRequest) -> None:
    _, html = request.getfixturevalue(which)
    page = _sections(html)
    where: dict[str, set[str]] = {}
    for section, chunks in page.text.items():
        for sentence in _sentences(" ".join(chunks)):
            where.setdefault(sentence, set()).add(section)
    repeated = {s: sorted(w) for s, w in where.items() if len(w) > 1}
    assert not repeated, repeated


def test_a_skipped_arm_gives_its_reason_once_on_the_first_screen(one_arm) -> None:
    _, html = one_arm
    page = _sections(html)
    assert " ".join(page.text["first"]).count(SKIP_REASON) == 1
    assert sum(" ".join(chunks).count(SKIP_REASON) for chunks in page.text.values()) == 1


def test_cross_validated_table_shows_each_fold_beside_the_pooled_figure(two_arms) -> None:
    results, html = two_arms
    first = " ".join(" ".join(_sections(html).text["first"]).split())
    assert "Per outer fold: AUC at its threshold" in first
    for arm in results.completed_arms:
        folds = next(f for f in results.folds if f.arm == arm.name)
        cells = [
            f"{f.metrics['patient_roc_auc']:.2f} at {t:.2f}"
            for f, t in zip(folds.per_fold, arm.operating_point.patient_thresholds)
        ]
        assert " · ".join(cells) in first
    assert "ignore the variation between fold models" in html.read_text(encoding="utf-8")
