"""Where the cost stage keeps what it measured once: this machine's calibration and the models' counts.

Both live in $CTCOMPARE_CACHE_DIR, else .ctcompare/ in the working folder; a missing or corrupt cache is measured
again, never fatal.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from data_schemas.cost import ModelCountsCache
from data_schemas.files import read_model_json, sha256_file, sha256_json, write_model_json
from tasks.common.paths import cache_folder


def calibration_cache_path() -> Path:
    """$CTCOMPARE_CACHE_DIR/calibration.json, else .ctcompare/calibration.json in the working folder
    (tasks.common.paths.cache_folder)."""
    return cache_folder() / "calibration.json"


def model_counts_cache_path() -> Path:
    """model_counts.json beside calibration.json (calibration_cache_path)."""
    return calibration_cache_path().parent / "model_counts.json"


@functools.lru_cache(maxsize=1)
def counting_code_version() -> str:
    """What counts depend on besides their arguments: torch's and torchvision's versions and the code that builds
    and counts the models (tasks/cost/flops.py and memory.py, tasks/training/models.py and model_defs.py,
    data_schemas/arms.py). A change to any re-counts."""
    import data_schemas.arms
    import tasks.training.model_defs
    import tasks.training.models

    here = Path(__file__).parent
    sources = (here / "flops.py", here / "memory.py", tasks.training.models.__file__,
               tasks.training.model_defs.__file__, data_schemas.arms.__file__)
    return sha256_json({
        "torch": metadata.version("torch"), "torchvision": metadata.version("torchvision"),
        "code": [sha256_file(Path(path)) for path in sources],
    })


def read_model_counts() -> ModelCountsCache:
    try:
        return read_model_json(model_counts_cache_path(), ModelCountsCache)
    except Exception:  # missing or corrupt: counted again, never fatal
        return ModelCountsCache()


def remember_model_counts(update: Callable[[ModelCountsCache], None]) -> None:
    """Add an entry to model_counts.json (read again first: another process may have added some meanwhile)."""
    cache = read_model_counts()
    update(cache)
    try:
        write_model_json(model_counts_cache_path(), cache)
    except OSError:  # a read-only working folder: the estimate is still right, only not cached
        pass
