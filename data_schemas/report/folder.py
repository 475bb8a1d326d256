"""The files of a report folder, and what makes a folder one (nothing private may be written under it)."""

from __future__ import annotations

from pathlib import Path

RESULTS_FILE = "results.json"
REPORT_HTML_FILE = "report.html"
REPORT_MD_FILE = "report.md"
# Configuration dumps, package versions and seeds: linked from the report, kept out of its way.
REPORT_APPENDIX_HTML_FILE = "report-appendix.html"
REPORT_APPENDIX_MD_FILE = "report-appendix.md"
FIGURES_DIR = "figures"
REPORT_LOCK_FILE = ".write.lock"  # held by the one comparison writing into a report folder
# What makes a folder a report folder: a written report, or plan.json (a comparison at work there).
REPORT_FOLDER_FILES = (REPORT_HTML_FILE, REPORT_MD_FILE, RESULTS_FILE, "plan.json")


def outermost_report_folder(path: Path) -> Path | None:
    """The outermost of `path` and its parents that is a report folder (holds one of REPORT_FOLDER_FILES); None
    when none is. Whatever lies under it is shared with the report, so nothing private may be written there."""
    found = None
    for folder in [Path(path), *Path(path).parents]:
        if any((folder / name).is_file() for name in REPORT_FOLDER_FILES):
            found = folder
    return found
