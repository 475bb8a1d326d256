"""Saliency with MONAI GradCAM, the shared slice selection, the pointing game and the lesion geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from data_schemas.training import PredictionRow
from data_schemas.visual import ImageLesionRow
from tasks.ingest.lesions import lesion_mask
from tasks.ingest.preprocess import pad_to_square, resize_square, source_point_to_image
from tasks.saliency.saliency import pointing_game, saliency_maps, select_slices
from tasks.training.models import build_resnet50

SIDE = 32
DISC_RADIUS = 3.0


def test_gradcam_maps_have_the_input_size_and_are_finite_in_unit_range():
    torch.manual_seed(0)
    model = build_resnet50(in_channels=1, num_classes=2, weights=None)
    with torch.no_grad():  # a fresh ResNet starts with zeroed residual branches: its maps would be flat
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    images = torch.randn(3, 1, 96, 64)
    maps = saliency_maps(model, images, "layer4")
    assert maps.shape == (3, 96, 64)
    assert sum(m.max() == 1.0 and m.min() == 0.0 for m in maps) >= 2  # not flat: the comparison below means something
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # the frozen-for-speed flags are restored
    np.testing.assert_allclose(maps, _reference_gradcam(model, images), atol=1e-4)


def _reference_gradcam(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """GradCAM written out by hand (full backward pass, no MONAI), rescaled to [0, 1] per map."""
    store: dict[str, torch.Tensor] = {}
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: store.update(acts=out))
    logits = model(images)
    handle.remove()
    grads = torch.autograd.grad(logits[:, 1].sum(), store["acts"])[0]
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * store["acts"]).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.flatten(1).min(1).values[:, None, None]
    high = cam.flatten(1).max(1).values[:, None, None]
    return np.nan_to_num(((cam - low) / (high - low)).detach().numpy(), nan=0.0)  # a flat map is all zeros


class TinyCNN(nn.Module):
    """Three 3x3 convolutions at full resolution, global average pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.ReLU())
        self.last = nn.Sequential(nn.Conv2d(16, 16, 5, padding=2), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.features(x)).mean(dim=(2, 3)))


def _disc_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Noisy images; the positive half carry a bright disc at a random place. Returns images, targets, masks."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.08, (n, 1, SIDE, SIDE)).astype(np.float32)
    targets = np.arange(n) % 2
    masks = np.zeros((n, SIDE, SIDE), dtype=bool)
    rows, cols = np.ogrid[:SIDE, :SIDE]
    for i in np.flatnonzero(targets):
        r, c = rng.uniform(DISC_RADIUS + 1, SIDE - DISC_RADIUS - 2, 2)
        masks[i] = (rows - r) ** 2 + (cols - c) ** 2 <= DISC_RADIUS ** 2
        images[i, 0][masks[i]] += 0.6
    return torch.from_numpy(images), torch.from_numpy(targets), masks


def test_pointing_game_of_a_tiny_cnn_that_learned_the_disc_is_far_above_the_disc_area():
    torch.manual_seed(0)
    x, y, _ = _disc_set(160, seed=1)
    model = TinyCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        for start in range(0, len(x), 16):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start:start + 16]), y[start:start + 16]).backward()
            optimizer.step()
    x_test, y_test, masks = _disc_set(60, seed=2)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.9  # the model has learned the disc: the check below is about where it looks

    positives = np.flatnonzero(y_test.numpy())
    maps = saliency_maps(model, x_test[positives], "last")
    patients = [f"p{i // 2}" for i in range(len(positives))]  # two slices per patient
    game = pointing_game(maps, masks[positives], patients, n_bootstrap=200)
    area = math.pi * DISC_RADIUS ** 2 / SIDE ** 2
    assert game.area_fraction == pytest.approx(area, rel=0.2)
    assert game.hit_rate >= 0.8 and game.ci_low > 5 * game.area_fraction
    assert game.ci_low <= game.hit_rate <= game.ci_high
    assert game.mass_inside > 2 * game.area_fraction
    assert game.n_slices == len(positives) and game.n_patients == len(set(patients))


def test_pointing_game_counts_a_flat_map_as_a_miss_and_a_peak_in_the_lesion_as_a_hit():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[:, 2:4, 2:4] = True
    maps = np.zeros((2, 8, 8), dtype=np.float32)
    maps[1, 3, 3] = 1.0
    game = pointing_game(maps, masks, ["a", "b"], n_bootstrap=50)
    assert game.hit_rate == 0.5 and game.mass_inside == 0.5 and game.area_fraction == pytest.approx(4 / 64)


def _predictions(seed: int, n: int = 60) -> list[PredictionRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        target = i % 2
        prob = float(np.clip(rng.normal(0.35 + 0.3 * target, 0.25), 0, 1))
        rows.append(PredictionRow(image_key=f"img{i:03d}", patient_key=f"pat{i // 3:02d}",
                                  label="nodule" if target else "normal", target=target, prob_positive=prob))
    return rows


def test_slice_selection_is_deterministic_and_one_selection_for_every_arm():
    arms = {"scratch": _predictions(1), "imagenet": _predictions(2), "imagenet-linear": _predictions(3)}
    first = select_slices(arms, n=16, seed=7)
    reversed_arms = {name: list(reversed(rows)) for name, rows in reversed(list(arms.items()))}
    assert select_slices(reversed_arms, n=16, seed=7) == first
    assert len(first) == 16 and len({s.image_key for s in first}) == 16
    reasons = [s.reason for s in first]
    assert reasons.count("confident_tp") == reasons.count("worst_fp") == reasons.count("worst_fn") == 4
    mean = {s.image_key: s.mean_prob_positive for s in first}
    tp = [s for s in first if s.reason == "confident_tp"]
    assert all(s.target == 1 and s.mean_prob_positive >= 0.5 for s in tp)
    fp = [s for s in first if s.reason == "worst_fp"]
    negatives_left = [k for k, v in mean.items() if k not in {s.image_key for s in fp}]
    assert all(s.target == 0 for s in fp) and negatives_left
    assert all(s.target == 1 for s in first if s.reason == "worst_fn")
    assert select_slices(arms, n=16, seed=8) != first  # the random part follows the seed
    with pytest.raises(ValueError, match="at least 1"):
        select_slices(arms, n=0)


@pytest.mark.parametrize("rows, cols, size", [(40, 60, 32), (60, 40, 96), (50, 50, 32)])
def test_lesion_moves_with_padding_and_resize_onto_the_bright_disc(rows: int, cols: int, size: int):
    centre, radius = (rows * 0.3, cols * 0.7), 5.0
    rr, cc = np.ogrid[:rows, :cols]
    image = (((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) <= radius ** 2).astype(np.float32)
    square, pads = pad_to_square(image)
    out = resize_square(square, size)
    row, col, scale = source_point_to_image(centre[0], centre[1], rows=rows, pads=pads, size=size)
    weights = out / out.sum()
    grid_r, grid_c = np.mgrid[:size, :size]
    assert (weights * grid_r).sum() == pytest.approx(row, abs=0.35)
    assert (weights * grid_c).sum() == pytest.approx(col, abs=0.35)
    assert out[int(round(row)), int(round(col))] == out.max() or out[int(round(row)), int(round(col))] > 0.9
    mask = lesion_mask([ImageLesionRow(image_key="k", lesion=0, center_row=row, center_col=col,
                                       radius_px=radius * scale)], size)
    assert out[mask].sum() / out.sum() > 0.8  # the transformed disc covers the moved nodule
