"""The HU -> image recipe, function by function, against hand arithmetic and PIL (fast: no Prefect, tiny arrays)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_schemas.dataset import WindowSpec
from tasks.ingest.preprocess import (
    hu_frame_to_image,
    pad_to_square,
    parse_window,
    resize_square,
    source_point_to_image,
    window_level_width,
    window_to_unit_range,
)


@pytest.mark.parametrize(("text", "name", "level", "width"), [
    ("lung", "lung", -600.0, 1500.0),
    ("mediastinal", "mediastinal", 40.0, 400.0),
    ("bone", "bone", 400.0, 1800.0),
    ("  Lung ", "lung", -600.0, 1500.0),
    ("-600,1500", "custom", -600.0, 1500.0),
    (" -12.5 , 80.25 ", "custom", -12.5, 80.25),
    ("0,1", "custom", 0.0, 1.0),
])
def test_parse_window_gives_the_documented_level_and_width(text: str, name: str, level: float, width: float) -> None:
    window = parse_window(text)
    assert (window.name, window.level, window.width) == (name, level, width)


@pytest.mark.parametrize("bad", ["40,0", "40,0.0", "40,-1", "40;400", "40,400,1", "lung2", "x40,400"])
def test_parse_window_refuses_what_is_not_a_window(bad: str) -> None:
    with pytest.raises(
        ValueError, match=r"unknown window .*valid choices are lung, mediastinal, bone, none, WL,WW"
    ) as refused:
        parse_window(bad)
    assert str(refused.value).endswith("(e.g. '-600,1500': level and a positive width in HU)")


def test_none_window_maps_the_full_12_bit_range() -> None:
    window = parse_window("none")
    assert (window.name, window.level, window.width) == ("none", None, None)
    assert window_level_width(window) == (1024.0, 4096.0)
    values = window_to_unit_range(np.array([-2000.0, -1024.0, 1024.0, 3072.0, 5000.0]), window)
    np.testing.assert_allclose(values, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    # A window with only one of level/width set is not a usable window either: the full range applies.
    assert window_level_width(WindowSpec(name="custom", level=40.0, width=None)) == (1024.0, 4096.0)
    assert window_level_width(WindowSpec(name="custom", level=None, width=400.0)) == (1024.0, 4096.0)


def test_window_is_linear_between_its_edges() -> None:
    """Mediastinal (40, 400): edges at -160 and 240 HU; 0 HU -> 160/400 = 0.4."""
    window = WindowSpec(name="mediastinal", level=40.0, width=400.0)
    values = window_to_unit_range(np.array([-161.0, -160.0, 0.0, 140.0, 240.0, 241.0], dtype=np.int16), window)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, [0.0, 0.0, 0.4, 0.75, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize(("shape", "pads"), [
    ((3, 8), (2, 3, 0, 0)),  # 5 rows short: floor half on top
    ((8, 3), (0, 0, 2, 3)),
    ((6, 8), (1, 1, 0, 0)),
    ((1, 2), (0, 1, 0, 0)),
])
def test_pad_to_square_centres_with_zeros(shape: tuple[int, int], pads: tuple[int, int, int, int]) -> None:
    image = np.full(shape, 0.7, dtype=np.float32)
    square, got = pad_to_square(image)
    side = max(shape)
    assert got == pads and square.shape == (side, side)
    top, _, left, _ = pads
    np.testing.assert_array_equal(square[top:top + shape[0], left:left + shape[1]], image)
    assert float(square.sum()) == pytest.approx(0.7 * image.size)  # everything else is 0


def test_square_image_is_returned_unpadded() -> None:
    image = np.arange(9, dtype=np.float32).reshape(3, 3)
    square, pads = pad_to_square(image)
    assert pads == (0, 0, 0, 0) and square is image


def test_resize_matches_pil_bicubic_and_stays_in_unit_range() -> None:
    """Same filter as PIL's antialiased bicubic (float 'F' images), then clipped to [0, 1]."""
    rng = np.random.default_rng(3)
    image = rng.random((48, 48)).astype(np.float32)
    image[:, :24] = 1.0  # a hard edge: bicubic overshoots above 1 next to it before the clip
    for size in (16, 20, 96):
        ours = resize_square(image, size)
        pil = np.asarray(Image.fromarray(image, mode="F").resize((size, size), Image.Resampling.BICUBIC))
        assert ours.shape == (size, size) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, np.clip(pil, 0.0, 1.0), atol=2e-3)
        assert float(ours.min()) >= 0.0 and float(ours.max()) <= 1.0
    assert float(np.asarray(Image.fromarray(image, mode="F").resize((96, 96), Image.Resampling.BICUBIC)).max()) > 1.0


def test_resize_to_the_same_size_keeps_values_and_gives_float32() -> None:
    image = np.linspace(0.0, 1.0, 16, dtype=np.float64).reshape(4, 4)
    same = resize_square(image, 4)
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, image.astype(np.float32))


def test_resize_of_a_float64_image_gives_float32() -> None:
    image = np.linspace(0.0, 1.0, 64, dtype=np.float64).reshape(8, 8)
    resized = resize_square(image, 4)
    assert resized.dtype == np.float32 and resized.shape == (4, 4)


def test_source_point_lands_where_pad_and_resize_put_it() -> None:
    """rows 30, pads (10, 10, 0, 0): side 50, size 25 -> scale 0.5; (0, 0) -> ((0+10+0.5)*0.5-0.5,
    (0+0+0.5)*0.5-0.5)."""
    row, col, scale = source_point_to_image(0.0, 0.0, rows=30, pads=(10, 10, 0, 0), size=25)
    assert (row, col, scale) == pytest.approx((4.75, -0.25, 0.5))
    row, col, scale = source_point_to_image(7.0, 3.0, rows=40, pads=(0, 0, 5, 7), size=80)
    assert (row, col, scale) == pytest.approx(((7.5) * 2.0 - 0.5, (8.5) * 2.0 - 0.5, 2.0))
    # Uneven padding (pad_to_square puts the odd row at the bottom): rows 3, pads (2, 3, 0, 0) -> side 8, size 16.
    row, col, scale = source_point_to_image(1.0, 4.0, rows=3, pads=(2, 3, 0, 0), size=16)
    assert (row, col, scale) == pytest.approx(((1 + 2 + 0.5) * 2.0 - 0.5, (4 + 0 + 0.5) * 2.0 - 0.5, 2.0))


def test_a_bright_dot_is_found_where_source_point_says() -> None:
    hu = np.full((30, 50), -1000.0, dtype=np.float32)
    hu[12, 31] = 3000.0
    image, pads = hu_frame_to_image(hu, WindowSpec(name="none", level=None, width=None), 100, monochrome1=False)
    row, col, _ = source_point_to_image(12.0, 31.0, rows=30, pads=pads, size=100)
    peak = np.unravel_index(int(np.argmax(image)), image.shape)
    assert abs(peak[0] - row) <= 1.0 and abs(peak[1] - col) <= 1.0


def test_monochrome1_inverts_the_whole_window_before_padding() -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1400.0, 200.0, size=(16, 16)).astype(np.float32)
    window = WindowSpec(name="lung", level=-600.0, width=1500.0)
    normal, pads = hu_frame_to_image(hu, window, 16, monochrome1=False)
    inverted, pads1 = hu_frame_to_image(hu, window, 16, monochrome1=True)
    assert pads == pads1 == (0, 0, 0, 0)
    np.testing.assert_allclose(inverted, 1.0 - normal, atol=1e-6)
    np.testing.assert_allclose(normal, window_to_unit_range(hu, window), atol=1e-6)
