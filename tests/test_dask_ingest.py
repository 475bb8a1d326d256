"""Scale-out: the ingest flow's decode chunks on an existing Dask cluster give the very same dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_schemas.dataset import QUARANTINE_FILE
from flows.ingest import ingest_flow
from tasks.dataset_store import load_dataset
from tests.dicom_factory import ct_variant, write_bad_inputs


@pytest.mark.timeout(400)
def test_ingest_on_a_local_dask_cluster_equals_the_default_runner(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    src = tmp_path / "src"
    for patient in range(3):
        for instance in range(3):
            ct_variant(src / f"p{patient}" / f"{instance}.dcm", patient_id=f"PAT{patient}", InstanceNumber=instance + 1)
    write_bad_inputs(src / "junk")  # quarantine decisions must not depend on where the chunks ran

    local = ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "local"), size=32, workers=1)
    # Real worker processes (not threads): the chunks and their Prefect task runs leave the flow's process.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1", worker_dashboard_address=None) as cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:
            dask = ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "dask"), size=32, workers=2,
                               dask_address=cluster.scheduler_address)
    # Every decode chunk ran on the cluster's workers (Dask keys are named after the task function).
    decoded_on_cluster = [t for t in stream.data if str(t["key"]).startswith("decode_chunk-") and t["worker"]]
    assert len(decoded_on_cluster) >= 2, [t["key"] for t in stream.data]

    assert dask["card"]["content_hash"] == local["card"]["content_hash"]
    for key in ("n_images", "n_patients", "n_files_seen", "n_files_quarantined", "quarantine_reasons"):
        assert dask["card"][key] == local["card"][key], key
    a, b = load_dataset(tmp_path / "local"), load_dataset(tmp_path / "dask")
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert [row.model_dump() for row in a.manifest] == [row.model_dump() for row in b.manifest]
    assert (tmp_path / "local" / QUARANTINE_FILE).read_text() == (tmp_path / "dask" / QUARANTINE_FILE).read_text()
