"""Scale-out: the ingest flow on its local process pool and on a Dask LocalCluster gives the very same bytes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import flows.runners
from data_schemas.dataset import IMAGES_FILE, MANIFEST_FILE, QUARANTINE_FILE
from flows.ingest import ingest_flow
from tasks.ingest.decode_pool import DecodePool
from tests.dicom_factory import ct_variant, write_bad_inputs


@pytest.mark.timeout(400)
def test_process_pool_and_local_dask_cluster_write_byte_identical_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    monkeypatch.setenv("CTCOMPARE_HMAC_KEY", "fixed-key-for-the-comparison")  # same pseudonyms in both datasets
    src = tmp_path / "src"
    for patient in range(12):  # 36 files: enough for the flow to use its process pool (32 or more)
        for instance in range(3):
            ct_variant(
                src / f"p{patient:02d}" / f"{instance}.dcm", patient_id=f"PAT{patient}", InstanceNumber=instance + 1
            )
    write_bad_inputs(src / "junk")  # quarantine decisions must not depend on where the chunks ran

    pools: list[DecodePool] = []
    opened = flows.runners.decode_pool

    @contextmanager
    def recorded_pool(*args: object, **kwargs: object) -> Iterator[DecodePool]:
        with opened(*args, **kwargs) as pool:
            pools.append(pool)
            yield pool

    monkeypatch.setattr(flows.runners, "decode_pool", recorded_pool)
    local = ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "local"), size=32, workers=2)
    assert [(pool.workers, pool._executor is not None) for pool in pools] == [(2, True)]  # decoded by 2 processes

    # Real worker processes (not threads): the chunks and their Prefect task runs leave the flow's process.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1", worker_dashboard_address=None) as cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:
            dask = ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "dask"), size=32, workers=2,
                               dask_address=cluster.scheduler_address)
    # Every decode chunk ran on the cluster's workers (Dask keys are named after the task function).
    decoded_on_cluster = [t for t in stream.data if str(t["key"]).startswith("decode_chunk-") and t["worker"]]
    assert len(decoded_on_cluster) >= 2, [t["key"] for t in stream.data]
    assert len(pools) == 1  # the Dask run opened no local pool

    for name in (IMAGES_FILE, MANIFEST_FILE, QUARANTINE_FILE):
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert dask["card"]["content_hash"] == local["card"]["content_hash"]
    assert local["card"]["n_images"] >= 36  # (+ junk/dup/a.dcm, a valid file)
