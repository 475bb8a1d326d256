"""Cost of the report's visual section: GradCAM time per arm and the size of the HTML and Markdown fragments.

    .venv/bin/python benchmarks/saliency.py [--patients 40] [--slices 4] [--size 112] [--n-slices 16]
    .venv/bin/python benchmarks/saliency.py --dataset DATASET --run scratch=RUN_DIR --run imagenet=RUN_DIR

Without --dataset it writes a synthetic cohort, ingests it at --size, attaches its lesions and writes run folders
in the training stage's format holding an UNTRAINED ResNet-50 (random weights) for each network arm: GradCAM
costs one forward and one backward pass whatever the weights, so the time is that of a trained arm; the maps and
pointing-game numbers are meaningless and are not printed. Give real run folders to see real ones.

Prints, per network arm, the seconds for the n-slice panel (forward + backward + upsampling, batch of 8) and for
the pointing-game slices, and the bytes of the HTML fragment and of the Markdown fragment with its PNGs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_schemas.files import write_model_json, write_models_csv  # noqa: E402
from data_schemas.training import (  # noqa: E402
    BEST_FILE,
    CONFIG_FILE,
    PREDICTIONS_FILE,
    PredictionRow,
    RunConfig,
    resolve_train_config,
)
from tasks.ingest.dataset_store import load_dataset  # noqa: E402

NETWORK_ARMS = ("scratch", "imagenet")


def write_untrained_run(root: Path, arm: str, dataset_dir: Path, state: dict[str, torch.Tensor] | None,
                        model_size: int) -> Path:
    """A run folder in the training stage's format (config.json, predictions.csv, best.pt) for every image.

    Predictions are seeded random numbers and best.pt holds `state` (random weights): for timing and for tests
    of the visual section, never for results. No best.pt when state is None (the linear-probe arm).
    """
    run = Path(root) / arm
    run.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(dataset_dir, in_memory=False)
    train = resolve_train_config("smoke", arm).model_copy(update={"image_size": model_size})
    config = RunConfig(arm=arm, profile="smoke", seed=0, fold=0, folds=1, train=train,
                       dataset_hash=dataset.card.content_hash, dataset_image_size=dataset.card.image_size,
                       splits_path="splits.csv", splits_sha256="0" * 64, classes=["normal", "nodule"],
                       positive_label="nodule", n_train_images=0, n_val_images=0,
                       n_test_images=len(dataset.manifest), n_train_patients=0, n_val_patients=0,
                       n_test_patients=dataset.card.n_patients, patient_overlap=0, device="cpu", precision="fp32",
                       channels_last=False, num_threads=torch.get_num_threads(), torch_version=torch.__version__,
                       torchvision_version="untrained", config_hash="0" * 64, created_at="2026-01-01T00:00:00Z")
    write_model_json(run / CONFIG_FILE, config)
    rng = np.random.default_rng(len(arm))
    rows = [PredictionRow(image_key=r.image_key, patient_key=r.patient_key, label=r.label,
                          target=int(r.label == "nodule"), prob_positive=float(rng.uniform()))
            for r in dataset.manifest if r.label]
    write_models_csv(run / PREDICTIONS_FILE, rows, PredictionRow)
    if state is not None:
        torch.save({"state_dict": state, "epoch": 1, "val_auc": None, "arm": arm}, run / BEST_FILE)
    return run


def _demo(work: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """Synthetic cohort -> dataset at --size with lesions -> untrained run folders."""
    from data_schemas.visual import LESIONS_SIDECAR_FILE
    from flows.ingest import ingest_flow
    from tasks.demo.synth import synthesize_cohort
    from tasks.ingest.lesions import attach_lesions
    from tasks.training.models import build_resnet50

    started = time.perf_counter()
    cohort = synthesize_cohort(work / "cohort", patients=args.patients, slices_per_patient=args.slices, seed=0)
    dataset_dir = work / "dataset"
    ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(dataset_dir), labels=str(cohort.labels_path),
                size=args.size)
    attach_lesions(dataset_dir=dataset_dir, sidecar=cohort.out_dir / LESIONS_SIDECAR_FILE)
    torch.manual_seed(0)
    state = build_resnet50(in_channels=1, num_classes=2, weights=None).state_dict()
    runs = {arm: write_untrained_run(work / "runs", arm, dataset_dir, state, args.size) for arm in NETWORK_ARMS}
    runs["imagenet-linear"] = write_untrained_run(work / "runs", "imagenet-linear", dataset_dir, None, args.size)
    print(f"setup (synth, ingest, run folders): {time.perf_counter() - started:.1f} s")
    return dataset_dir, runs


def _isolated_state() -> Path:
    """A temp folder for Prefect and matplotlib state (set before either is imported) and the demo's files."""
    state = Path(tempfile.mkdtemp(prefix="ctcompare-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    os.environ.setdefault("MPLCONFIGDIR", str(state / "mpl"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--size", type=int, default=112, help="dataset and model input size (demo only)")
    parser.add_argument("--n-slices", type=int, default=16)
    parser.add_argument("--dataset", type=Path, help="an existing dataset folder (then give --run)")
    parser.add_argument("--run", action="append", default=[], metavar="ARM=RUN_DIR")
    args = parser.parse_args()
    work = _isolated_state() / "work"

    from reports.gallery import render_visual_html, render_visual_md
    from tasks.saliency.saliency import build_visual_summary

    if args.dataset:
        dataset_dir, runs = args.dataset, {k: Path(v) for k, v in (item.split("=", 1) for item in args.run)}
    else:
        dataset_dir, runs = _demo(work, args)
    print(f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs (shared machine: times are upper bounds)")
    started = time.perf_counter()
    summary = build_visual_summary(dataset_dir=dataset_dir, arm_runs=runs, n_slices=args.n_slices)
    total = time.perf_counter() - started
    html = render_visual_html(summary)
    md = render_visual_md(summary, work / "report" / "figures")
    png_bytes = sum(p.stat().st_size for p in (work / "report" / "figures").iterdir())
    for arm in summary.arms:
        if arm.available:
            game = f", pointing game on {arm.pointing_game.n_slices} slices" if arm.pointing_game else ""
            print(f"{arm.arm}: GradCAM on {len(arm.overlays)} slices {arm.seconds:.2f} s{game}")
    print(f"build_visual_summary total (dataset pictures, all arms, pointing game): {total:.1f} s")
    print(f"HTML fragment: {len(html.encode()) / 1024:.0f} KiB; Markdown {len(md.encode()) / 1024:.0f} KiB "
          f"+ {png_bytes / 1024:.0f} KiB of PNGs")


if __name__ == "__main__":
    main()
