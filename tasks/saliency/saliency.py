"""What the models looked at: GradCAM maps with MONAI on a fixed slice selection, and a shortcut check.

Method. GradCAM (Selvaraju et al. 2017, monai.visualize.GradCAM) at the last convolutional stage ('layer4' of
the ResNet-50 arms, 1/32 of the input side): the positive ("nodule") logit's gradient, averaged over space, weights
each feature channel; the ReLU of the weighted sum is upsampled (bilinear) to the input size and rescaled to [0, 1]
per slice. MONAI's default rescaling flips the map (max -> 0); ours keeps bright = high.

Slices. One selection for every arm (select_slices), scored by the positive probability averaged over the arms:
the most confident true positives, the highest-scored normal slices (false positives first), the lowest-scored
nodule slices (false negatives first), and seeded random slices.

Shortcut check (only with <dataset>/lesions.csv, see tasks/ingest/lesions.py). Pointing game (Zhang et al. 2018): a
positive slice is a hit when its map's maximum lies inside a lesion disc; the hit rate gets a 95% percentile
bootstrap interval resampling patients (tasks.evaluation.statistics.bootstrap_ci). Chance level: a maximum placed
uniformly
at random hits with probability equal to the lesions' area fraction, given beside the share of map mass inside.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from data_schemas.arms import parse_arm
from data_schemas.files import read_model_json, read_models_csv
from data_schemas.training import BEST_FILE, CONFIG_FILE, PREDICTIONS_FILE, PredictionRow, RunConfig
from data_schemas.visual import (
    LINEAR_PROBE_NO_MAP,
    SELECTION_REASON_TEXT,
    ArmSaliency,
    ImageLesionRow,
    PointingGame,
    SelectedSlice,
    VisualSummary,
)
from tasks.evaluation.statistics import bootstrap_ci
from tasks.ingest.dataset_store import load_dataset
from tasks.ingest.lesions import lesion_mask, load_lesions
from tasks.saliency.thumbnails import dataset_gallery, gray_thumbnail, overlay_thumbnail, resize_to, short_key
from tasks.training.augment import images_to_tensor, normalise
from tasks.training.models import build_model, probe_depths

POSITIVE_CLASS = 1
N_BOOTSTRAP = 2000


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Rescale each map to [0, 1] (bright = high); a flat or non-finite map becomes all zeros."""
    flat = torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp(min=1e-12), torch.zeros_like(flat))
    return scaled.view_as(maps)


@contextmanager
def _gradients_only_through(model: torch.nn.Module, target_layer: str) -> Iterator[None]:
    """Let only the target layer's weights require gradients while inside, then restore every flag.

    GradCAM needs the gradient at the target layer's output only. With the earlier layers frozen, backward stops
    there instead of running through the whole network: the maps are identical and the backward much shorter. A
    target layer without weights keeps the full pass.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    own = {f"{target_layer}.{name}" for name, _ in model.get_submodule(target_layer).named_parameters()}
    try:
        if own:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name in own)
        with warnings.catch_warnings():
            # expected here: MONAI's full backward hook fires on the layer's output since no input needs a gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])


def saliency_maps(model: torch.nn.Module, images: torch.Tensor, target_layer: str, *,
                  class_index: int = POSITIVE_CLASS, batch_size: int = 8) -> np.ndarray:
    """GradCAM maps (N, H, W) in [0, 1] at the input's spatial size, for the class `class_index`.

    images: (N, C, H, W), exactly what the model takes (normalised). The model is left in eval mode.
    """
    # imported where it runs: every command that imports this module would otherwise load MONAI at start-up
    from monai.visualize import GradCAM

    model.eval()
    cam = GradCAM(nn_module=model, target_layers=target_layer, postprocessing=_unit_range)
    out = []
    with torch.enable_grad(), _gradients_only_through(model, target_layer):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].detach().float()
            out.append(cam(x=batch, class_idx=class_index).detach()[:, 0].numpy())
    maps = np.concatenate(out) if out else np.zeros((0, *images.shape[-2:]), dtype=np.float32)
    return np.nan_to_num(maps.astype(np.float32), nan=0.0)


def _pick(candidates: list[tuple[str, float]], count: int, taken: set[str]) -> list[str]:
    chosen = [key for key, _ in candidates if key not in taken][:count]
    taken.update(chosen)
    return chosen


def select_slices(predictions: Mapping[str, Sequence[PredictionRow]], *, n: int = 16, seed: int = 0,
                  threshold: float = 0.5) -> list[SelectedSlice]:
    """A fixed selection of test slices shared by every arm (see module docstring); deterministic for a seed.

    Only slices every arm predicted are eligible; ties are broken by image_key, so the order of arms and rows
    does not matter. Quotas: n // 4 each of confident_tp, worst_fp, worst_fn; the rest random.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    if not predictions:
        raise ValueError("select_slices needs the predictions of at least one arm.")
    per_arm = [{row.image_key: row for row in rows} for rows in predictions.values()]
    common = sorted(set.intersection(*(set(rows) for rows in per_arm)))
    mean = {key: float(np.mean([rows[key].prob_positive for rows in per_arm])) for key in common}
    first = per_arm[0]
    positives = [(k, mean[k]) for k in common if first[k].target == 1]
    negatives = [(k, mean[k]) for k in common if first[k].target == 0]
    quota = n // 4
    taken: set[str] = set()
    picks: list[tuple[str, str]] = []
    tp = sorted((c for c in positives if c[1] >= threshold), key=lambda c: (-c[1], c[0]))
    picks += [(k, "confident_tp") for k in _pick(tp, quota, taken)]
    picks += [(k, "worst_fp") for k in _pick(sorted(negatives, key=lambda c: (-c[1], c[0])), quota, taken)]
    picks += [(k, "worst_fn") for k in _pick(sorted(positives, key=lambda c: (c[1], c[0])), quota, taken)]
    rest = [k for k in common if k not in taken]
    rng = np.random.default_rng([seed, 1_212])
    random_keys = sorted(rng.choice(rest, size=min(n - len(picks), len(rest)), replace=False).tolist()) if rest else []
    picks += [(k, "random") for k in random_keys]
    return [SelectedSlice(image_key=k, patient_key=first[k].patient_key, label=first[k].label, target=first[k].target,
                          reason=reason, mean_prob_positive=round(mean[k], 6)) for k, reason in picks]


def read_run_predictions(run_dir: Path) -> list[PredictionRow]:
    """The test predictions of one run folder."""
    return read_models_csv(Path(run_dir) / PREDICTIONS_FILE, PredictionRow)


def load_network(run_dir: Path) -> tuple[torch.nn.Module, RunConfig] | None:
    """The trained network of a run folder (best.pt = {"state_dict", "epoch", ...}) and its config; None for a
    linear-probe run, whose classifier is not a network. The one place that knows the run-folder format."""
    config = read_model_json(Path(run_dir) / CONFIG_FILE, RunConfig)
    spec = parse_arm(config.arm)
    if spec.mode == "imagenet-linear":
        return None
    # Scratch and imagenet arms of a model share its architecture; the checkpoint replaces every weight, so no
    # ImageNet file is read, and the network is built on the meta device (no random initialisation to throw away).
    with torch.device("meta"):
        model = build_model(spec.model, num_classes=2, dropout=config.train.dropout, weights=None)
    best = torch.load(Path(run_dir) / BEST_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(best["state_dict"], assign=True)
    return model.eval(), config


def target_layer(arm: str) -> str:
    """The module GradCAM reads for an arm: its model's deepest block (stride 32), the last the head sees."""
    return probe_depths(parse_arm(arm).model)[-1]


def pointing_game(maps: np.ndarray, masks: np.ndarray, patient_keys: Sequence[str], *,
                  n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> PointingGame:
    """Hit rate of the maps' maxima in the lesion masks (bootstrap by patient), mass inside, area fraction."""
    if maps.shape != masks.shape or maps.shape[0] != len(patient_keys) or maps.shape[0] == 0:
        raise ValueError(f"maps {maps.shape}, masks {masks.shape} and {len(patient_keys)} patient keys must match.")
    flat_maps, flat_masks = maps.reshape(len(maps), -1), masks.reshape(len(masks), -1)
    has_signal = flat_maps.max(axis=1) > 0  # a flat map points nowhere: a miss
    peak = flat_maps.argmax(axis=1)
    hits = (has_signal & flat_masks[np.arange(len(maps)), peak]).astype(int)
    totals = flat_maps.sum(axis=1)
    mass = np.where(totals > 0, (flat_maps * flat_masks).sum(axis=1) / np.where(totals > 0, totals, 1), 0.0)
    interval = bootstrap_ci(hits, hits.astype(float), list(patient_keys), metrics=lambda y, _p: float(np.mean(y)),
                            n_resamples=n_bootstrap, seed=seed)["metric"]
    return PointingGame(n_slices=len(maps), n_patients=len(set(patient_keys)), hit_rate=float(hits.mean()),
                        ci_low=interval.ci_low, ci_high=interval.ci_high, mass_inside=float(mass.mean()),
                        area_fraction=float(flat_masks.mean()))


def network_maps(model: torch.nn.Module, images: np.ndarray, model_size: int, target_layer: str) -> np.ndarray:
    """GradCAM maps of dataset images (N, 1, S, S) in [0, 1], computed at the model's input size, returned at S."""
    x = normalise(images_to_tensor(images, model_size))
    maps = saliency_maps(model, x, target_layer)
    side = images.shape[-1]
    return np.stack([np.clip(resize_to(m, side), 0, 1) for m in maps]) if len(maps) else maps


def _pointing_keys(rows: Sequence[PredictionRow], lesions: Mapping[str, list[ImageLesionRow]], limit: int,
                   seed: int) -> list[PredictionRow]:
    """Positive test slices with a known lesion: all of them, or `limit` drawn with the seed."""
    eligible = sorted((r for r in rows if r.target == 1 and r.image_key in lesions), key=lambda r: r.image_key)
    if len(eligible) <= limit:
        return eligible
    picked = np.random.default_rng([seed, 1_213]).choice(len(eligible), size=limit, replace=False)
    return [eligible[i] for i in sorted(picked.tolist())]


def _arm_panel(arm: str, run_dir: Path, *, images: np.ndarray, slices: list[SelectedSlice],
               probs: list[float], pointing: tuple[np.ndarray, np.ndarray, list[str]] | None,
               seed: int) -> ArmSaliency:
    """One arm's overlays on the selected slices and, when lesions are known, its pointing game."""
    loaded = load_network(run_dir)
    if loaded is None:
        return ArmSaliency(arm=arm, available=False, note=LINEAR_PROBE_NO_MAP, probs=probs)
    model, config = loaded
    started = time.perf_counter()
    layer = target_layer(config.arm)
    maps = network_maps(model, images, config.train.image_size, layer)
    seconds = time.perf_counter() - started
    overlays = [overlay_thumbnail(np.asarray(images[i, 0], dtype=np.float32), maps[i],
                                  f"{arm} · p(nodule) = {probs[i]:.2f} · image {short_key(s.image_key)}")
                for i, s in enumerate(slices)]
    game = None
    if pointing is not None:
        point_images, masks, patients = pointing
        point_maps = network_maps(model, point_images, config.train.image_size, layer)
        game = pointing_game(point_maps, masks, patients, seed=seed)
    return ArmSaliency(arm=arm, available=True, target_layer=layer, overlays=overlays, probs=probs,
                       seconds=round(seconds, 3), pointing_game=game)


def build_visual_summary(*, dataset_dir: Path, arm_runs: dict[str, Path], n_slices: int = 16, seed: int = 0,
                         n_pointing: int = 64) -> VisualSummary:
    """The report's visual section: dataset pictures, saliency per arm on one slice selection, shortcut check.

    arm_runs: arm name -> run folder with config.json, predictions.csv and (network arms) best.pt.
    n_pointing: at most this many positive test slices with known lesions enter the pointing game.
    """
    if not arm_runs:
        raise ValueError("build_visual_summary needs at least one arm's run folder.")
    finished = {arm: Path(run) for arm, run in arm_runs.items() if (Path(run) / PREDICTIONS_FILE).is_file()}
    if not finished:
        raise ValueError(f"none of the run folders of {', '.join(arm_runs)} holds test predictions "
                         f"({PREDICTIONS_FILE}).")
    dataset = load_dataset(Path(dataset_dir), in_memory=False)
    index_of = {row.image_key: i for i, row in enumerate(dataset.manifest)}
    predictions = {arm: read_run_predictions(run) for arm, run in finished.items()}
    slices = select_slices(predictions, n=n_slices, seed=seed)
    images = np.asarray(dataset.images[[index_of[s.image_key] for s in slices]], dtype=np.float32)
    lesions = load_lesions(Path(dataset_dir))
    pointing = None
    if lesions:
        rows = _pointing_keys(next(iter(predictions.values())), lesions, n_pointing, seed)
        if rows:
            size = dataset.card.image_size
            pointing = (np.asarray(dataset.images[[index_of[r.image_key] for r in rows]], dtype=np.float32),
                        np.stack([lesion_mask(lesions[r.image_key], size) for r in rows]),
                        [r.patient_key for r in rows])
    arms = []
    for arm in arm_runs:
        if arm not in finished:
            arms.append(ArmSaliency(arm=arm, available=False, note=f"No map for {arm}: its run has no test "
                                                                   "predictions."))
            continue
        run_dir = finished[arm]
        by_key = {row.image_key: row.prob_positive for row in predictions[arm]}
        arms.append(_arm_panel(arm, Path(run_dir), images=images, slices=slices,
                               probs=[round(by_key[s.image_key], 4) for s in slices], pointing=pointing, seed=seed))
    layers = ", ".join(sorted({a.target_layer for a in arms if a.target_layer})) or "each model's deepest block"
    thumbs = [gray_thumbnail(images[i, 0], f"{s.label} · {SELECTION_REASON_TEXT[s.reason]} · image "
                                           f"{short_key(s.image_key)}")
              for i, s in enumerate(slices)]
    return VisualSummary(dataset=dataset_gallery(dataset.images, dataset.manifest, seed=seed), slices=slices,
                         images=thumbs, arms=arms, lesions_known=pointing is not None,
                         method=f"GradCAM (monai.visualize) at {layers}, positive class", seed=seed)
