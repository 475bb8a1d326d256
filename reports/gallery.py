"""The report's visual section as an HTML fragment and a Markdown fragment, from a VisualSummary.

Imports data_schemas, jinja2 and matplotlib only. Every text is escaped (HTML autoescape; Markdown table cells
through md_cell); images are the summary's PNG data URIs (validated to be nothing else). The Markdown fragment
writes its PNGs into figures_dir under names built from positions and arm names, never from keys or captions.

Integration: render_visual_html(v) goes inside a collapsed section of report.html, which gives it its heading; its
saliency grid has the arms as columns and the slices as rows, several slices side by side so that the thumbnails
fill the width. render_visual_md(v, out_dir / "figures") goes into report.md, whose figure links are relative to
the report folder.
"""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from pathlib import Path

import jinja2

from data_schemas.files import atomic_write_bytes
from data_schemas.visual import PNG_DATA_URI_PREFIX, SELECTION_REASON_TEXT, Thumbnail, VisualSummary
from reports.formatting import fmt, fmt_pct

TEMPLATES_DIR = Path(__file__).with_name("templates")
HTML_TEMPLATE = "visual.html.j2"
MD_TEMPLATE = "visual.md.j2"
THUMBNAILS_PER_ROW = 8  # about 125 px each across a 1000 px report column


def md_cell(value: object) -> str:
    """Text safe inside a Markdown table cell or image alt text (no markup, no line break, no link syntax)."""
    text = str(value).replace("\n", " ")
    for char in "\\|[]()<>*_`#!":
        text = text.replace(char, "\\" + char)
    return text


@lru_cache(maxsize=2)
def _environment(autoescape: bool) -> jinja2.Environment:
    """Jinja environment of the visual section; one per autoescape setting and process (templates compiled once)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=autoescape,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, fmt_pct=fmt_pct, md=md_cell)
    env.globals.update(reason_text=SELECTION_REASON_TEXT)
    return env


def _safe(name: str) -> str:
    """A file-name-safe version of an arm name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def histogram_png(v: VisualSummary) -> bytes:
    """Pixel-value histogram per class (share of pixels per bin), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.6), dpi=90)
    ax = fig.add_subplot()
    for cls in v.dataset.classes:
        centres = [(a + b) / 2 for a, b in zip(cls.bin_edges[:-1], cls.bin_edges[1:])]
        ax.plot(centres, cls.density, label=f"{cls.label} (n={cls.n_images})", linewidth=1.4)
    ax.set_xlabel("pixel value after windowing [0, 1]")
    ax.set_ylabel("share of pixels")
    ax.set_yscale("log")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    FigureCanvasAgg(fig)  # attaches the Agg canvas that savefig draws on
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _png_bytes(thumbnail: Thumbnail) -> bytes:
    return base64.b64decode(thumbnail.data_uri[len(PNG_DATA_URI_PREFIX):])


def slices_per_row(n_network_arms: int, n_slices: int) -> int:
    """How many slices share one row of the saliency grid: each slice takes 1 + n_network_arms thumbnails, and a
    row holds about THUMBNAILS_PER_ROW of them across the full width."""
    return max(1, min(n_slices, THUMBNAILS_PER_ROW // (1 + n_network_arms)))


def _context(v: VisualSummary, histogram_src: str) -> dict[str, object]:
    network = [arm for arm in v.arms if arm.available]
    return {"v": v, "network_arms": network, "other_arms": [arm for arm in v.arms if not arm.available],
            "rows": list(range(len(v.slices))), "histogram_src": histogram_src,
            "per_row": slices_per_row(len(network), len(v.slices)),
            "games": [arm for arm in network if arm.pointing_game is not None]}


def render_visual_html(v: VisualSummary) -> str:
    """The visual section as a self-contained HTML fragment (a <section> with its own scoped style)."""
    src = PNG_DATA_URI_PREFIX + base64.b64encode(histogram_png(v)).decode("ascii") if v.dataset.classes else ""
    return _environment(True).get_template(HTML_TEMPLATE).render(**_context(v, src))


def _write_figures(v: VisualSummary, figures_dir: Path) -> dict[str, str]:
    """Write every picture as figures_dir/visual_*.png; returns {slot: link relative to the report folder}."""
    links: dict[str, str] = {}

    def put(slot: str, file_name: str, png: bytes) -> None:
        atomic_write_bytes(figures_dir / file_name, png)
        links[slot] = f"{figures_dir.name}/{file_name}"

    for g, group in enumerate(v.dataset.groups):
        for t, thumb in enumerate(group.thumbnails):
            put(f"example:{g}:{t}", f"visual_example_{g:02d}_{t:02d}.png", _png_bytes(thumb))
    for c, cls in enumerate(v.dataset.classes):
        put(f"mean:{c}", f"visual_mean_{c:02d}.png", _png_bytes(cls.mean_image))
    if v.dataset.classes:
        put("histogram", "visual_histogram.png", histogram_png(v))
    for i, thumb in enumerate(v.images):
        put(f"slice:{i}", f"visual_slice_{i:02d}.png", _png_bytes(thumb))
    for arm in v.arms:
        for i, thumb in enumerate(arm.overlays):
            put(f"overlay:{arm.arm}:{i}", f"visual_saliency_{_safe(arm.arm)}_{i:02d}.png", _png_bytes(thumb))
    return links


def render_visual_md(v: VisualSummary, figures_dir: Path) -> str:
    """The visual section as Markdown; its PNGs are written into figures_dir (links are 'figures/visual_*.png')."""
    links = _write_figures(v, Path(figures_dir))
    context = _context(v, links.get("histogram", ""))
    return _environment(False).get_template(MD_TEMPLATE).render(links=links, **context)
