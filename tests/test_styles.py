"""Styles of the synthetic world: aligned with the lightings (one mask), deterministic, and a real shift."""

from __future__ import annotations

import numpy as np
import pytest

from blindnet.data.synthetic import ALL_APPEARANCES, APPEARANCES, STYLES, render_clip, render_scene
from blindnet.data.synthetic.style import Style, affine_r2, apply_camera, split_appearance

H, W = 96, 192


def test_every_style_and_lighting_shares_one_mask_and_differs_in_pixels() -> None:
    images, mask = render_scene(5, H, W, appearances=ALL_APPEARANCES)
    assert set(images) == set(ALL_APPEARANCES) and len(ALL_APPEARANCES) == len(APPEARANCES) * len(STYLES)
    # The mask is one array for all of them; rendering a subset gives the same mask.
    _, mask_b = render_scene(5, H, W, appearances=("b-fog",))
    np.testing.assert_array_equal(mask, mask_b)
    for lighting in APPEARANCES:
        a, b = images[lighting].astype(int), images[f"b-{lighting}"].astype(int)
        assert a.shape == b.shape == (H, W, 3)
        assert np.abs(a - b).mean() > 5  # style b changes the picture in every lighting, not a few pixels


def test_style_a_is_the_plain_lighting_and_its_camera_is_the_identity() -> None:
    plain, _ = render_scene(9, H, W, appearances=("noon",))
    img = plain["noon"]
    assert apply_camera(img, STYLES["a"], np.random.default_rng(0)) is img
    assert split_appearance("noon") == ("a", "noon") and split_appearance("b-rain") == ("b", "rain")
    with pytest.raises(KeyError, match="unknown appearance 'c-noon'"):
        split_appearance("c-noon")
    with pytest.raises(KeyError, match="unknown appearance"):
        render_scene(9, H, W, appearances=("b-snow",))


def test_styled_rendering_and_the_camera_are_deterministic_per_seed() -> None:
    one, _ = render_scene(11, H, W, appearances=("b-noon", "b-night"))
    two, _ = render_scene(11, H, W, appearances=("b-noon", "b-night"))
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])
    other, _ = render_scene(12, H, W, appearances=("b-noon",))
    assert not np.array_equal(one["b-noon"], other["b-noon"])
    frame = one["b-noon"]
    cam = Style(sensor_noise=0.05, jpeg_quality=50, blur_sigma=1.0, gamma=0.8)
    np.testing.assert_array_equal(
        apply_camera(frame, cam, np.random.default_rng(3)), apply_camera(frame, cam, np.random.default_rng(3))
    )
    assert not np.array_equal(
        apply_camera(frame, cam, np.random.default_rng(3)), apply_camera(frame, cam, np.random.default_rng(4))
    )


def test_styled_clips_keep_one_mask_per_frame() -> None:
    frames, masks = render_clip(2, 3, H, W, appearances=("noon", "b-noon"))
    assert len(masks) == 3 and all(len(frames[a]) == 3 for a in ("noon", "b-noon"))
    single, masks_b = render_clip(2, 3, H, W, appearances=("b-noon",))
    for m, mb in zip(masks, masks_b):
        np.testing.assert_array_equal(m, mb)
    np.testing.assert_array_equal(single["b-noon"][2], frames["b-noon"][2])


def test_affine_r2_has_known_answers_and_style_b_is_not_a_colour_gain() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, 32, 3))
    # An exact per-channel gain and offset is fully explained; independent noise is not (float64: exact to 1e-12).
    assert affine_r2(x, x * np.array([0.5, 1.2, 0.9]) + np.array([10.0, -3.0, 7.0])) == pytest.approx(1.0, abs=1e-12)
    assert affine_r2(x, rng.uniform(0, 255, (32, 32, 3))) < 0.05  # E[R^2] ~ 1/n for n = 1024 pixels per channel
    images, _ = render_scene(21, H, W, appearances=("noon", "b-noon"))
    assert affine_r2(images["noon"], images["b-noon"]) < 0.8
