"""The ship-arms stage alone, again, on a comparison that benchmarks/rerun.py kept: where its time goes.

    PYTHONPATH=. .venv/bin/python benchmarks/ship_again.py KEPT_DIR [--repeat 2] [--pieces]

KEPT_DIR is a `benchmarks/rerun.py --keep KEPT_DIR` folder. Each round copies its report folder without the
packages, bundles and compressed variants, then runs the stage's own function (flows.compare_stages.ship_arms, its
log lines printed) in this process, after importing what the compare flow has imported by then (torch,
torchvision, training, evaluation) and checking the weights file as the command does (recorded in KEPT_DIR/cache).
It prints the stage's wall time, this process's CPU time, and how much of the wall time the timed forwards took
(tasks.packaging.deploy_cost._time_model: the latency and throughput measurement itself, which depends on the load
and the time budget); --pieces adds the wall and CPU time of each packaging step (CPU: the thread that ran it).

Run it from two checkouts on the same KEPT_DIR, alternately, to compare code side by side: the outputs are written
under KEPT_DIR/ship-again-<round>, and the deployment figures other than timings are the same for the same code.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PIECES = ("tasks.packaging.package.write_package", "tasks.packaging.package.source_files",
          "tasks.packaging.package.tensors_sha256", "tasks.packaging.package.save_package_file",
          "tasks.packaging.package._linear_probe_state", "tasks.packaging.bundle.traced_network",
          "tasks.packaging.deploy_cost.package_cost",
          "tasks.packaging.quantize.quantize_state", "tasks.packaging.deploy_cost.evaluate_compression",
          "torch.jit.save")
WALL: dict[str, float] = collections.defaultdict(float)
CPU: dict[str, float] = collections.defaultdict(float)


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """function, adding its wall and thread CPU seconds to WALL[name] and CPU[name]."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            WALL[name] += time.perf_counter() - wall
            CPU[name] += time.thread_time() - cpu
    return wrapper


def instrument(specs: tuple[str, ...]) -> None:
    """Replace each module.function in specs (and every project module's own reference to it) by a timed one."""
    for spec in specs:
        module_name, name = spec.rsplit(".", 1)
        module = importlib.import_module(module_name)
        original = getattr(module, name)
        wrapper = timed(name, original)
        for loaded in list(sys.modules.values()):
            if getattr(loaded, name, None) is original and (loaded is module or loaded.__name__.startswith(
                    ("tasks.", "flows."))):
                setattr(loaded, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kept", type=Path, help="a benchmarks/rerun.py --keep folder")
    parser.add_argument("--repeat", type=int, default=2, help="rounds in this process")
    parser.add_argument("--pieces", action="store_true", help="print each packaging step's time too")
    args = parser.parse_args(argv)
    kept = args.kept.resolve()
    os.environ["CTCOMPARE_CACHE_DIR"] = str(kept / "cache")
    os.environ.setdefault("MPLCONFIGDIR", str(kept / "mpl"))
    import tasks.evaluation.evaluate  # noqa: F401  (what the compare flow has imported before the stage)
    import tasks.training.linear_arm  # noqa: F401
    import tasks.training.network_arm  # noqa: F401
    import tasks.training.train  # noqa: F401
    from data_schemas.plan import RunEnvironment, read_plan
    from data_schemas.report import ComparisonResults
    from flows import compare_stages
    from tasks.training.weights_check import check_weights_file

    logging.basicConfig(level=logging.INFO, format="  %(message)s", force=True)
    compare_stages.get_run_logger = lambda: logging.getLogger("ship-arms")  # the stage outside a flow run
    instrument(("tasks.packaging.deploy_cost._time_model",) + (PIECES if args.pieces else ()))
    weights = next(kept.glob("resnet50-*.pth"))
    check_weights_file(weights, "resnet50")
    for round_ in range(args.repeat):
        report = kept / f"ship-again-{round_}" / "report"
        shutil.rmtree(report.parent, ignore_errors=True)
        shutil.copytree(kept / "report", report, ignore=shutil.ignore_patterns(
            "package", "bundle", "package-compressed", "bundle.partial", "figures"))
        results = ComparisonResults.model_validate_json((report / "results.json").read_text())
        unshipped = [arm.model_copy(update={"deployment": None, "package_dir": None}) for arm in results.arms]
        results = results.model_copy(update={"arms": unshipped, "compression": None, "compression_package_dir": None})
        WALL.clear()
        CPU.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        shipped = compare_stages.ship_arms.fn(plan=read_plan(report / "plan.json"),
                                              environment=RunEnvironment(weights=weights, started_at=time.time()),
                                              results=results, report_dir=report, dataset_dir=kept / "report-dataset")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        (report / "results.json").write_text(shipped.model_dump_json(indent=2))
        print(f"round {round_ + 1}: ship-arms {wall:.2f} s wall, {cpu:.2f} s CPU (this process), timed forwards "
              f"{WALL['_time_model']:.2f} s wall; load average {os.getloadavg()[0]:.1f}")
        if args.pieces:
            print("  " + "; ".join(f"{name} {WALL[name]:.2f} s wall / {CPU[name]:.2f} s CPU" for name in WALL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
