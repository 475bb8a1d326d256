"""Test-wide settings: every piece of state (Prefect, matplotlib, torch hub) stays in a temp dir, never in $HOME.

The suite runs in parallel (`make test`: pytest-xdist). Each worker is its own process and imports this file itself,
so each gets its own state folder (PREFECT_HOME, matplotlib and torch caches) and its own basetemp for tmp_path.
They share two things, as a team's processes on one machine do: the session's Prefect API (tests/prefect_db.py),
where a test finds its own flow runs by their ids or parameters, never as "the latest run", and the machine caches
(CTCOMPARE_CACHE_DIR, written atomically).

Every test process, and every process a test starts, runs torch (OpenMP, MKL) on one thread: the suite already runs
about one process per core, and more compute threads than cores make OpenMP's spinning threads compete with each
other (docs/benchmarks.md gives the measured cost). One thread also makes every tiny model a test trains the same on
a machine with any number of cores.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
_STATE = Path(tempfile.mkdtemp(prefix=f"ctcompare-tests-{_WORKER}-"))
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)  # when this test process ends, after its servers stop
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["MPLCONFIGDIR"] = str(_STATE / "matplotlib")
os.environ["TORCH_HOME"] = str(_STATE / "torch")
os.environ["CTCOMPARE_HMAC_KEY"] = "test-secret-not-for-production"
os.environ.pop("PREFECT_API_URL", None)
for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_threads] = "1"


import pytest  # noqa: E402

# The files whose tests take longest, longest first (measure with `pytest --durations=0`). They run first, so that
# under `--dist loadfile` no worker starts a long file while the others have nothing left to do.
SLOW_FILES_FIRST = (
    "test_deployments.py", "test_compare.py", "test_train.py", "test_startup.py", "test_ingest.py",
    "test_ship_every_model.py", "test_arch_train.py", "test_dataset_store.py", "test_reproducible.py",
    "test_deploy_cost.py", "test_dicomweb_ingest.py", "test_cost.py", "test_params.py", "test_dask_ingest.py",
    "test_monai_bundle.py", "test_ingest_keys.py", "test_report_render.py", "test_models.py", "test_predict.py",
    "test_dicom_sr.py", "test_package.py", "test_non_finite.py", "test_late_failures.py", "test_ingest_fuzz.py",
    "test_reuse.py", "test_wall_time.py", "test_ingest_robust.py", "test_learning.py", "test_gallery.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow files first, in the order above; every other file after them, in collection order."""
    rank = {name: position for position, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


_SESSION_API = pytest.StashKey[object]()  # the SessionPrefectAPI of this process, if it started one


def _without_prefect_api() -> bool:
    # Mutation runs (scripts/mutation.sh) start a fresh pytest session per mutant and select unit tests only: a
    # server start per mutant would dominate. State still stays under the temp PREFECT_HOME above.
    return os.environ.get("CTCOMPARE_TESTS_NO_PREFECT_HARNESS") == "1"


def pytest_configure(config: pytest.Config) -> None:
    """The process that hands out the tests (or runs them all) starts the session's Prefect API in the background,
    before the test processes start: they inherit its address (tests/prefect_db.py)."""
    if hasattr(config, "workerinput"):
        return
    # The machine caches (calibration, model counts, hardware probe, weights checks) of this session, in a fresh
    # folder shared by its test processes, never the working folder's: every session counts afresh (a mutation run's
    # session per mutant included, so no mutant reads another's counts).
    os.environ["CTCOMPARE_CACHE_DIR"] = str(_STATE / "machine-cache")
    if _without_prefect_api() or config.option.collectonly or config.option.help:
        return
    from tests.prefect_db import SessionPrefectAPI

    api = SessionPrefectAPI(_STATE / "session-api")
    os.environ.update(api.environment())
    api.start()
    config.stash[_SESSION_API] = api


def pytest_unconfigure(config: pytest.Config) -> None:
    api = config.stash.get(_SESSION_API, None)
    if api is not None:
        api.stop()


@pytest.fixture(scope="session", autouse=True)
def prefect_backend():
    """Every test process sends its flow runs to the session's Prefect API (one real server with a throw-away
    database), once it answers; every other Prefect server of the session starts from a copy of its database."""
    if _without_prefect_api():
        yield
        return
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.prefect_db import wait_until_ready

    url = wait_until_ready()
    if url is None:
        raise RuntimeError("no session Prefect API: pytest_configure in tests/conftest.py starts it")
    with temporary_settings(updates={PREFECT_API_URL: url}):
        # the process-wide settings too, as prefect_test_harness does: contexts copied earlier see the server
        with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            yield
            APILogWorker.drain_all()  # this process's logs and events reach the server before it stops
            EventsWorker.drain_all()


@pytest.fixture(scope="session")
def resnet50_weights_file(tmp_path_factory: pytest.TempPathFactory):
    """A torchvision-format ResNet-50 state dict named like torchvision's files (SHA-256 prefix in the name).

    Random weights: no test touches the network, and the loading code is the same as for the real file.
    """
    from tests.weights_files import random_torchvision_file

    return random_torchvision_file(tmp_path_factory.mktemp("weights"), "resnet50", seed=7)
