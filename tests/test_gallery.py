"""The visual section end to end: synthetic cohort -> ingest -> lesions -> run folders -> summary -> HTML and
Markdown."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.saliency import write_untrained_run
from data_schemas.files import read_model_json, read_models_csv, write_models_csv
from data_schemas.synth import IdentifiersFile
from data_schemas.visual import LESIONS_SIDECAR_FILE, ImageLesionRow, LesionSidecarRow, VisualSummary
from flows.ingest import ingest_flow
from reports.gallery import render_visual_html, render_visual_md
from tasks.demo.synth import synthesize_cohort
from tasks.ingest.dataset_store import load_dataset
from tasks.ingest.lesions import attach_lesions
from tasks.saliency.saliency import build_visual_summary
from tasks.training.models import build_resnet50

NETWORK_ARMS = ("scratch", "imagenet")
MODEL_SIZE = 64  # ResNet-50's layer4 is 2 x 2 here: the smallest size with a map that is not flat


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return synthesize_cohort(tmp_path_factory.mktemp("cohort") / "c", patients=8, slices_per_patient=2, seed=4,
                             matrix_sizes=(64,))


@pytest.fixture(scope="module")
def dataset_dir(cohort, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dataset") / "d"
    ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(out), labels=str(cohort.labels_path), size=64)
    attach_lesions(dataset_dir=out, sidecar=cohort.out_dir / LESIONS_SIDECAR_FILE)
    return out


@pytest.fixture(scope="module")
def arm_runs(dataset_dir, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    state = build_resnet50(in_channels=1, num_classes=2, weights=None).state_dict()
    root = tmp_path_factory.mktemp("runs")
    runs = {arm: write_untrained_run(root, arm, dataset_dir, state, MODEL_SIZE) for arm in NETWORK_ARMS}
    runs["imagenet-linear"] = write_untrained_run(root, "imagenet-linear", dataset_dir, None, MODEL_SIZE)
    return runs


@pytest.fixture(scope="module")
def summary(dataset_dir, arm_runs) -> VisualSummary:
    return build_visual_summary(dataset_dir=dataset_dir, arm_runs=arm_runs, n_slices=8, seed=3)


def test_lesions_land_on_the_nodules_and_the_dataset_file_is_keyed_by_image_key(cohort, dataset_dir):
    sidecar = read_models_csv(cohort.out_dir / LESIONS_SIDECAR_FILE, LesionSidecarRow)
    lesions = read_models_csv(dataset_dir / "lesions.csv", ImageLesionRow)
    assert sidecar and len(lesions) == len(sidecar)
    assert (dataset_dir / "lesions.csv").read_text().splitlines()[
        0
    ] == "image_key,lesion,center_row,center_col,radius_px"
    dataset = load_dataset(dataset_dir)
    index_of = {row.image_key: i for i, row in enumerate(dataset.manifest)}
    labels = {row.image_key: row.label for row in dataset.manifest}
    assert {labels[lesion.image_key] for lesion in lesions} == {"nodule"}
    centre_values = [float(dataset.images[index_of[le.image_key], 0, round(le.center_row), round(le.center_col)])
                     for le in lesions]
    lung_values = np.median(dataset.images[:, 0, 16:48, 8:24])  # around the lungs, mostly air-filled tissue
    assert np.median(centre_values) > lung_values + 0.15  # the nodule core is denser than the lung around it


def test_attach_lesions_refuses_a_sidecar_that_matches_nothing(dataset_dir, tmp_path):
    bad = tmp_path / "lesions.csv"
    write_models_csv(bad, [LesionSidecarRow(path="elsewhere/IM0001.dcm", center_row=1, center_col=1, radius_px=2)],
                     LesionSidecarRow)
    with pytest.raises(ValueError, match="matches an ingested file"):
        attach_lesions(dataset_dir=dataset_dir, sidecar=bad)


def test_summary_has_one_panel_per_network_arm_on_the_same_slices(summary):
    assert [arm.arm for arm in summary.arms] == [*NETWORK_ARMS, "imagenet-linear"]
    assert len(summary.slices) == len(summary.images) == 8
    for arm in summary.arms:
        if arm.arm in NETWORK_ARMS:
            assert arm.available and len(arm.overlays) == len(arm.probs) == 8 and arm.target_layer == "layer4"
            keys = [re.search(r"image (\w+)$", t.caption).group(1) for t in arm.overlays]
            assert keys == [s.image_key[:8] for s in summary.slices]
            assert arm.pointing_game is not None and 0 <= arm.pointing_game.hit_rate <= 1
        else:
            assert not arm.available and "linear" in arm.note and not arm.overlays
    assert summary.lesions_known
    assert summary.dataset.grouped_by == "label and manufacturer"
    assert {g.label for g in summary.dataset.groups} == {"nodule", "normal"}
    assert all(len(t.data_uri) < 40_000 for t in summary.images)  # 8-bit PNG thumbnails, not raw floats


def test_fragments_show_every_panel_and_no_identifier(summary, cohort, tmp_path):
    html = render_visual_html(summary)
    md = render_visual_md(summary, tmp_path / "figures")
    for arm in NETWORK_ARMS:
        assert html.count(f'<td data-arm="{arm}">') == len(summary.slices)
        assert md.count(f"visual_saliency_{arm}_") == len(summary.slices)
    assert "data-arm=\"imagenet-linear\"" not in html and "No map is shown for the linear-probe arm" in html
    assert "Pointing game" in html and "pointing-game hit rate" in md
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures and all(re.fullmatch(r"visual_[a-z_\-0-9]+\.png", name) for name in figures)
    private = read_model_json(cohort.identifiers_path, IdentifiersFile)
    texts = [html, md, " ".join(figures), summary.model_dump_json()]
    for identifier in private.identifiers + [p.study_instance_uid for p in private.patients]:
        assert not any(identifier in text for text in texts), "an identifier reached the visual section"


def test_text_is_escaped_in_both_fragments(summary, tmp_path):
    hostile = summary.model_copy(deep=True)
    hostile.images[0].caption = "<script>alert(1)</script> | [x](http://evil)"
    html = render_visual_html(hostile)
    md = render_visual_md(hostile, tmp_path / "figures")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<script>" not in md and "](http://evil)" not in md
    with pytest.raises(ValueError):
        type(hostile.images[0]).model_validate({"data_uri": "javascript:alert(1)", "caption": "x"})


def test_no_run_folder_is_refused_before_any_work(dataset_dir):
    with pytest.raises(ValueError, match="at least one arm"):
        build_visual_summary(dataset_dir=dataset_dir, arm_runs={})


def test_saliency_grid_puts_arms_in_columns_and_fills_the_width(summary):
    """Slices as rows and arms as columns, several slices per row so that the thumbnails fill the width."""
    from reports.gallery import THUMBNAILS_PER_ROW, slices_per_row

    html = render_visual_html(summary)
    network = [arm.arm for arm in summary.arms if arm.available]
    per_row = slices_per_row(len(network), len(summary.slices))
    assert per_row == THUMBNAILS_PER_ROW // (1 + len(network)) and per_row > 1
    grid = html[html.index('<table class="saliency grid">'):]
    grid = grid[: grid.index("</table>")]
    body_rows = grid.split("<tbody>")[1].count("<tr>")
    assert body_rows == -(-len(summary.slices) // per_row)  # ceil: every slice once
    header = grid.split("</thead>")[0]
    assert header.count('class="slice"') == per_row and all(header.count(f'data-arm="{a}"') == per_row for a in network)
    assert "table-layout: fixed" in html and "width: 100%" in html
