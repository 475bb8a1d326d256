"""The pacs-nightly deployment: inactive, yesterday's CT studies, no secret among its parameters (fast, no server)."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.ingest import ingest_dicomweb_flow

ROOT = Path(__file__).resolve().parents[2]


def test_pacs_nightly_takes_yesterdays_studies_and_shows_no_secret() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (nightly,) = [d for d in config["deployments"] if d["name"] == "pacs-nightly"]
    assert nightly["entrypoint"] == "flows/ingest.py:ingest_dicomweb_flow"
    assert [s["active"] for s in nightly["schedules"]] == [False]
    assert nightly["parameters"]["study_date"] == "yesterday" and nightly["parameters"]["modality"] == "CT"
    assert "@" not in nightly["parameters"]["url"]
    # The UI's form: every parameter described; credentials only by the name of a Secret block.
    properties = ingest_dicomweb_flow.parameters.properties
    assert not [name for name, schema in properties.items() if not schema.get("description", "").strip()]
    assert not [name for name in properties if any(word in name for word in ("password", "token", "user"))]
    assert "Secret block" in properties["credentials_block"]["description"]
    assert properties["study_date"]["default"] == "yesterday"
