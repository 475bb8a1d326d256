"""Re-runs skip packaging work whose inputs are unchanged: the package, its deployment cost and the compressed
variant with its comparison are kept, and made again when an input or the files change; packages of the same network
shipped together share one timing and one TorchScript trace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from data_schemas.arms import parse_arm
from data_schemas.package import DEPLOY_COST_FILE, MODEL_CARD_FILE, PACKAGE_FILE
from tasks.packaging.bundle import ProbabilityNetwork, write_bundle
from tasks.packaging.deploy_cost import package_cost
from tasks.packaging.package import LoadedPackage, float_model, load_package, tensors_sha256
from tasks.packaging.ship import COMPRESSION_FILE, SameNetworkWork, compress_and_compare, ship_run
from tests.ship_fixtures import ShippedRun, shared_shipped_run

BUDGET_S = 0.1


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> ShippedRun:
    return shared_shipped_run(tmp_path_factory)


def _stamp(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_unchanged_inputs_keep_the_package_and_its_cost(shipped: ShippedRun, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(shipped.run_dir, run_dir, ignore=shutil.ignore_patterns("package*"))
    settings = {
        "run_dir": run_dir,
        "dataset_dir": shipped.dataset_dir,
        "threshold_rule": "fixed",
        "aggregation": "mean",
        "metrics": None,
        "weights_path": None,
        "budget_seconds": BUDGET_S,
    }
    first = ship_run(threshold=0.5, **settings)
    model, cost = first.package_dir / PACKAGE_FILE, first.package_dir / DEPLOY_COST_FILE
    written = (_stamp(model), _stamp(cost))
    again = ship_run(threshold=0.5, **settings)
    assert (_stamp(model), _stamp(cost)) == written and again.cost == first.cost  # nothing redone

    changed = ship_run(threshold=0.6, **settings)  # a new operating point: a new package, measured again
    assert load_package(changed.package_dir).meta.operating_point.threshold == 0.6
    assert _stamp(model) != written[0] and changed.cost.inputs_sha256 != first.cost.inputs_sha256

    (changed.package_dir / MODEL_CARD_FILE).write_text("edited by hand\n")  # no longer what SHA256SUMS says
    stamp = _stamp(model)
    repaired = ship_run(threshold=0.6, **settings)
    assert _stamp(model) != stamp and "edited by hand" not in (repaired.package_dir / MODEL_CARD_FILE).read_text()
    load_package(repaired.package_dir)  # whole again


def test_unchanged_inputs_keep_the_compressed_variant_and_its_comparison(shipped: ShippedRun, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(shipped.run_dir, run_dir, ignore=shutil.ignore_patterns("package*"))
    full = ship_run(run_dir=run_dir, dataset_dir=shipped.dataset_dir, threshold=0.5, threshold_rule="fixed",
                    aggregation="mean", metrics=None, weights_path=None, budget_seconds=BUDGET_S)
    settings = {"full_package": full.package_dir, "dataset_dir": shipped.dataset_dir, "full_cost": full.cost,
                "budget_seconds": BUDGET_S, "tolerance": 0.02, "aggregation": "mean", "n_bootstrap": 20, "seed": 0}
    comparison, folder = compress_and_compare(**settings)
    written = (_stamp(folder / PACKAGE_FILE), _stamp(folder / COMPRESSION_FILE))
    again, _ = compress_and_compare(**settings)
    assert again == comparison and (_stamp(folder / PACKAGE_FILE), _stamp(folder / COMPRESSION_FILE)) == written
    other, _ = compress_and_compare(**{**settings, "seed": 1})  # another bootstrap seed: compared again, not quantized
    assert _stamp(folder / PACKAGE_FILE) == written[0] and _stamp(folder / COMPRESSION_FILE) != written[1]
    assert other.compressed.inputs_sha256 == comparison.compressed.inputs_sha256


def test_packages_of_the_same_network_share_one_timing_and_one_trace(shipped: ShippedRun, tmp_path: Path) -> None:
    first = load_package(shipped.package_dir)
    other_dir = tmp_path / "other"
    shutil.copytree(shipped.package_dir, other_dir, ignore=shutil.ignore_patterns(DEPLOY_COST_FILE))
    # the same network with other weights, as another arm of the same model would have
    other = load_package(other_dir)
    other_arm = f"{parse_arm(first.meta.arm).model}:imagenet"
    other = LoadedPackage(meta=other.meta.model_copy(update={"arm": other_arm}), path=other.path, sha256=other.sha256,
                          state_dict={k: v * 1.5 if v.is_floating_point() else v for k, v in other.state_dict.items()})
    shared = SameNetworkWork()
    timed = package_cost(first, "fp32", 1, budget_seconds=BUDGET_S, timings=shared.timings, reuse=False)
    reused = package_cost(other, "fp32", 1, budget_seconds=BUDGET_S, timings=shared.timings, reuse=False)
    assert timed.timed_on is None and reused.timed_on == first.meta.arm and reused.arm == other_arm
    assert reused.latency_ms_median == timed.latency_ms_median and reused.timed_runs == timed.timed_runs
    assert f"Timed on the {first.meta.arm} arm's package" in (other_dir / MODEL_CARD_FILE).read_text()

    write_bundle(first, tmp_path / "bundle-first", traces=shared.traces)
    second = write_bundle(other, tmp_path / "bundle-other", traces=shared.traces)
    size = other.meta.recipe.train_image_size
    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ProbabilityNetwork(float_model(other.meta, other.state_dict), other.meta).eval()(x)
        got = torch.jit.load(str(second / "models" / "model.ts"))(x)
        firsts = torch.jit.load(str(tmp_path / "bundle-first" / "models" / "model.ts"))(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, firsts)  # the shared trace carries each package's own weights
    # and was given them without writing into the first package's tensors, which it was traced with
    assert tensors_sha256(first.state_dict) == first.meta.weights_sha256
