"""MODEL_CARD.md of a model package, rendered from its validated metadata (data_schemas.package) only.

Like every report, the card is built from the shareable part alone: counts, fingerprint, settings and metrics.
No path, key or identifier of the training data reaches it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from data_schemas.arms import parse_arm
from data_schemas.package import DeploymentCost, ModelPackageMeta, PackageMetrics
from reports.formatting import fmt, fmt_ci, fmt_si

TEMPLATES_DIR = Path(__file__).parent / "templates"
CARD_TEMPLATE = "model_card.md.j2"
CARD_SECTIONS: tuple[str, ...] = (
    "Intended use", "Limits that follow from the data", "Training data", "Evaluation", "Operating point",
    "Known failure modes", "Preprocessing", "Deployment cost", "How to reproduce",
)


def _metric_rows(metrics: PackageMetrics | None) -> list[dict[str, str]]:
    """One row per metric name: patient- and slice-level value with its interval."""
    if metrics is None:
        return []
    names = list(dict.fromkeys([*metrics.patient, *metrics.slice]))
    return [
        {"name": name, "patient": fmt_ci(metrics.patient.get(name)), "slice": fmt_ci(metrics.slice.get(name))}
        for name in names
    ]


def _limits(meta: ModelPackageMeta) -> list[str]:
    """Plain limits that follow from the training data's fingerprint and recipe."""
    data, fingerprint, recipe = meta.training_data, meta.training_data.fingerprint, meta.recipe
    scanners = ", ".join(f"{name} ({count})" for name, count in fingerprint.manufacturers.items()) or "unknown"
    matrices = ", ".join(fingerprint.matrix_sizes) or "unknown"
    labels = ", ".join(f"{name}: {count}" for name, count in data.label_distribution.items())
    return [
        f"Trained on {data.n_images} images of {data.n_patients} patients; labels {labels}. Figures from so few "
        "patients carry wide intervals, and prevalence elsewhere will differ.",
        f"One scanner mix: manufacturers {scanners}; matrix sizes {matrices}. Other scanners, reconstruction "
        "kernels or slice thicknesses were not seen.",
        f"Input must be CT (grayscale) converted with the {recipe.window.name} window at "
        f"{recipe.ingest_image_size} px then {recipe.train_image_size} px; `ctcompare predict` refuses other recipes.",
        f"Two classes only ({', '.join(meta.classes)}): the model cannot say that an image is neither.",
        "Metrics from one dataset (synthetic or single-site) do not show that the model works on other patients: "
        "it is a research artefact, not a medical device.",
    ]


def _context(meta: ModelPackageMeta, package_bytes: int | None, cost: DeploymentCost | None) -> dict[str, Any]:
    """Everything the template reads."""
    train = meta.run_config
    overrides = " ".join(f"--set {key}={value}" for key, value in sorted(train.overrides.items()))
    return {
        "meta": meta, "run": train, "data": meta.training_data, "fingerprint": meta.training_data.fingerprint,
        "recipe": meta.recipe, "op": meta.operating_point, "metrics": meta.metrics,
        "metric_rows": _metric_rows(meta.metrics), "limits": _limits(meta),
        "arm_description": parse_arm(meta.arm).description,
        "package_size": fmt_si(package_bytes, "B") if package_bytes else "—", "cost": cost,
        "overrides": overrides, "fmt": fmt, "fmt_si": fmt_si,
    }


def render_model_card(meta: ModelPackageMeta, *, package_bytes: int | None = None,
                      cost: DeploymentCost | None = None) -> str:
    """The model card as Markdown; `cost` adds the measured deployment figures when known."""
    return _card_environment().get_template(CARD_TEMPLATE).render(**_context(meta, package_bytes, cost))


@lru_cache(maxsize=1)
def _card_environment() -> jinja2.Environment:
    """One Jinja environment per process, so the card's template is compiled once (a package's card is rendered
    once when written and again with its deployment cost)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
