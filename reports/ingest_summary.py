"""Markdown and table views of a dataset card, for the ingest flow's Prefect artifacts and the terminal."""

from __future__ import annotations

from data_schemas.dataset import DatasetCard, NumericSummary
from reports.formatting import md_escape


def _fmt(summary: NumericSummary, unit: str) -> str:
    if summary.count == 0:
        return "not recorded"
    return f"median {summary.median:g} {unit} (5-95%: {summary.p05:g} to {summary.p95:g}; n = {summary.count})"


def dataset_card_markdown(card: DatasetCard) -> str:
    """A short markdown summary of a dataset card: counts, quarantine reasons, labels, fingerprint."""
    fp = card.fingerprint
    lines = [
        "# CT dataset ingested",
        "",
        f"- **Images**: {card.n_images} from {card.n_patients} patients, {card.n_studies} studies, {card.n_series} "
        "series",
        f"- **Files**: {card.n_files_seen} seen, {card.n_files_ingested} ingested, {card.n_files_quarantined} "
        "quarantined",
        f"- **Conversion**: {card.image_size} x {card.image_size}, window {card.window.name}; {card.value_mapping}",
        f"- **Dataset hash**: `{card.content_hash[:16]}`",
        "",
        "## Labels",
        "",
        "| label | images |",
        "| --- | ---: |",
        *[f"| {md_escape(label)} | {count} |" for label, count in card.label_distribution.items()],
        f"| (unlabelled) | {card.n_unlabeled_images} |",
        "",
        "## Quarantine",
        "",
        "| reason | files |",
        "| --- | ---: |",
        *[f"| {md_escape(reason)} | {count} |" for reason, count in card.quarantine_reasons.items()],
        "",
        "## Fingerprint",
        "",
        f"- Matrix sizes: {', '.join(f'{md_escape(k)} ({v})' for k, v in fp.matrix_sizes.items())}",
        f"- Pixel spacing: {_fmt(fp.pixel_spacing_mm, 'mm')}",
        f"- Slice thickness: {_fmt(fp.slice_thickness_mm, 'mm')}",
        f"- HU (pixel sample): {_fmt(fp.hounsfield_units, 'HU')}",
        f"- kVp: {_fmt(fp.kvp, 'kV')}",
        f"- Manufacturers: {', '.join(f'{md_escape(k)} ({v})' for k, v in fp.manufacturers.items())}",
        f"- Transfer syntaxes: {', '.join(f'{md_escape(k)} ({v})' for k, v in fp.transfer_syntaxes.items())}",
    ]
    return "\n".join(lines) + "\n"


def quarantine_table(card: DatasetCard) -> list[dict[str, object]]:
    """Rows (reason, files) for a Prefect table artifact."""
    return [{"reason": reason, "files": count} for reason, count in card.quarantine_reasons.items()]
