"""Appearances: one shading function per lighting condition over a rasterised frame (sky, sun, lamps, fog, rain)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from blindnet.data.synthetic.raster import _Z_NEAR, _Raster
from blindnet.data.synthetic.world import _S_CONST, _S_GROUND, _S_SIDE, CAR, SKY, _circle, _World


@lru_cache(maxsize=4)
def _noise_fields(height: int, width: int, seed: int = 12345) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine grain, coarse blotches and rain streaks at twice the image size, made once per seed; each scene takes a
    window at a seeded offset, which costs nothing and stays deterministic. A style's texture uses its own seed."""
    rng = np.random.default_rng(seed)
    h2, w2 = 2 * height, 2 * width
    fine = rng.standard_normal((h2, w2), dtype=np.float32)
    fine = 0.6 * fine + 0.4 * cv2.GaussianBlur(fine, (0, 0), 1.2) * 2.5
    small = rng.standard_normal((max(h2 // 24, 4), max(w2 // 24, 4)), dtype=np.float32)
    coarse = cv2.resize(small, (w2, h2), interpolation=cv2.INTER_CUBIC)
    coarse = (coarse / (coarse.std() + 1e-6)).astype(np.float32)
    streaks: np.ndarray = np.zeros((h2, w2), np.float32)
    n = int(h2 * w2 / 700)
    x = rng.uniform(0, w2, n)
    y = rng.uniform(0, h2, n)
    ln = rng.uniform(0.02, 0.06, n) * height
    val = rng.uniform(0.3, 1.0, n)
    for xi, yi, li, vi in zip(x, y, ln, val):
        cv2.line(streaks, (int(xi), int(yi)), (int(xi + 0.18 * li), int(yi + li)), float(vi), 1, cv2.LINE_AA)
    streaks = cv2.GaussianBlur(streaks, (3, 3), 0.6)
    return fine, coarse, streaks


def _window(field_: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    oy, ox = int(rng.integers(0, height)), int(rng.integers(0, width))
    return field_[oy : oy + height, ox : ox + width]


def _take3(lut: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``lut[ids]`` for a (P, 3) table as H x W x 3 float32: three 1-D np.take + cv2.merge are several times faster
    than numpy fancy indexing with a trailing channel axis."""
    return cv2.merge([np.take(np.ascontiguousarray(lut[:, c], dtype=np.float32), ids) for c in range(3)])


def _rgb(plane: np.ndarray, color: Sequence[float]) -> np.ndarray:
    """H x W plane times an RGB colour -> H x W x 3 (avoids numpy's slow broadcast over a trailing axis)."""
    return cv2.merge([plane * float(c) for c in color])


@dataclass
class _Frame:
    """Per-frame data shared by every appearance (computed once)."""

    r: _Raster
    tex3: np.ndarray  # H x W x 3 multiplicative material texture
    sky_rows: int  # rows [0, sky_rows) contain all sky pixels
    sky3: np.ndarray  # sky_rows x W x 3 float32 1 where sky
    _depth: np.ndarray | None = None

    def depth(self) -> np.ndarray:
        if self._depth is None:
            self._depth = _depth_map(self.r, self.r.ids.shape[1])
        return self._depth


def _depth_map(r: _Raster, width: int) -> np.ndarray:
    """Per-pixel depth (metres along the view axis) for fog: analytic on the ground and on side facades."""
    h = r.ids.shape[0]
    rows = np.arange(h, dtype=np.float32)[:, None] - r.horizon
    ground_rows = (r.focal * r.cam_h / np.maximum(rows, 0.5)).astype(np.float32)
    inv_cols = (1.0 / np.maximum(np.abs(np.arange(width, dtype=np.float32) - width / 2.0), 0.5))[None, :]
    g = np.take((r.surf == _S_GROUND).astype(np.float32), r.ids)
    sd = np.take(np.where(r.surf == _S_SIDE, r.depth, 0).astype(np.float32), r.ids)
    cd = np.take(np.where(r.surf == _S_CONST, np.where(r.cls == SKY, 1e4, r.depth), 0).astype(np.float32), r.ids)
    return cd + sd * inv_cols + g * ground_rows


def _sky_image(rows: int, width: int, horizon: float, top: Sequence[float], bottom: Sequence[float]) -> np.ndarray:
    """``rows x width x 3`` sky gradient from ``top`` to ``bottom`` at the horizon (empty when nothing shows sky)."""
    if rows <= 0:  # buildings or a tram can hide the sky entirely
        return np.zeros((0, width, 3), np.float32)
    t = np.clip(np.arange(rows, dtype=np.float32) / max(horizon, 1.0), 0, 1) ** 0.7
    grad = np.asarray(top, np.float32)[None] * (1 - t[:, None]) + np.asarray(bottom, np.float32)[None] * t[:, None]
    return cv2.resize(grad[:, None, :], (width, rows), interpolation=cv2.INTER_NEAREST)


def _fill_sky(img: np.ndarray, fr: _Frame, sky_img: np.ndarray) -> None:
    if fr.sky_rows:
        top = img[: fr.sky_rows]
        top += fr.sky3 * (sky_img - top)


_APPEARANCE_LIGHT = {
    # direction towards the sun, sun colour, ambient colour
    "noon": ((0.25, 0.9, -0.3), (1.0, 0.97, 0.9), (0.38, 0.42, 0.5)),
    "sunset": ((0.9, 0.15, 0.3), (1.25, 0.62, 0.28), (0.22, 0.17, 0.3)),
    "night": ((0.0, 1.0, 0.0), (0.0, 0.0, 0.0), (0.06, 0.065, 0.1)),
    "fog": ((0.0, 1.0, 0.0), (0.25, 0.25, 0.25), (0.6, 0.62, 0.64)),
    "rain": ((0.0, 1.0, 0.0), (0.25, 0.25, 0.27), (0.38, 0.4, 0.45)),
}


def _shade(app: str, fr: _Frame, world: _World, rng: np.random.Generator) -> np.ndarray:
    r = fr.r
    h, w = r.ids.shape
    fine_f, coarse_f, streaks_f = _noise_fields(h, w)
    sun_dir, sun_col, amb = _APPEARANCE_LIGHT[app]
    sd = np.asarray(sun_dir, np.float32)
    if app == "sunset":
        sd = sd * np.array([world.sun_side, 1, 1], np.float32)
    sd = sd / np.linalg.norm(sd)
    lam = np.clip(r.normal @ sd, 0, None)[:, None]
    # lighting is per part (flat shading), so it is computed on the (P, 3) table, not per pixel
    light = np.asarray(amb, np.float32)[None] + lam * np.asarray(sun_col, np.float32)[None]
    albedo = r.color * world.tint[None]
    if app == "rain":  # wet surfaces are darker
        albedo = np.where(r.wet[:, None], albedo * 0.55, albedo * 0.85)
    lut = albedo * light
    if app == "night":
        lut = lut + r.emit
    elif app in ("rain", "fog"):  # vehicle lights stay on in bad weather
        lut = lut + 0.35 * r.emit * (r.cls[:, None] >= CAR)
    img = _take3(lut, r.ids)
    img *= fr.tex3
    hs, vh = fr.sky_rows, r.horizon
    if app == "noon":
        sky = _sky_image(hs, w, vh, (0.25, 0.45, 0.85), (0.7, 0.8, 0.92))
        if hs:
            clouds = np.clip(_window(coarse_f, hs, w, rng) - 0.3, 0, None) * 0.35
            sky += cv2.merge([clouds, clouds, clouds])
        _fill_sky(img, fr, sky)
    elif app == "sunset":
        sky = _sky_image(hs, w, vh, (0.25, 0.2, 0.45), (1.0, 0.55, 0.25))
        if hs:
            sx = 0.5 + 0.35 * world.sun_side
            yy, xx = np.ogrid[:32, :64]
            glow = np.exp(-(((xx / 64 - sx) / 0.15) ** 2 + ((yy / 32 * hs - vh * 0.9) / (0.2 * h)) ** 2)).astype(
                np.float32
            )
            glow = cv2.resize(glow, (w, hs), interpolation=cv2.INTER_LINEAR)
            sky += _rgb(glow, (0.8, 0.6, 0.3))
        _fill_sky(img, fr, sky)
    elif app == "night":
        sky = _sky_image(hs, w, vh, (0.01, 0.01, 0.03), (0.06, 0.06, 0.1))
        if hs:
            stars = (_window(fine_f, hs, w, rng) > 3.3).astype(np.float32) * 0.7
            sky += cv2.merge([stars, stars, stars])
        _fill_sky(img, fr, sky)
        pool = _night_lights(r, world, w, h)  # H x W irradiance on the ground
        lit = _take3(albedo, r.ids)
        lit *= fr.tex3
        lit *= _rgb(pool, (1.0, 0.8, 0.5))
        img += lit
        img += _bloom(r.emit, r.ids, 6.0, 0.6)
        img += _rgb(_window(fine_f, h, w, rng), (0.012, 0.012, 0.012))  # sensor noise is visible in the dark
    elif app == "fog":
        t = np.exp(-fr.depth() / world.fog_visibility)
        img *= cv2.merge([t, t, t])
        img += _rgb(1.0 - t, (0.72, 0.74, 0.76))
        img += _bloom(0.35 * r.emit * (r.cls[:, None] >= CAR), r.ids, 4.0, 0.5)
    elif app == "rain":
        _fill_sky(img, fr, _sky_image(hs, w, vh, (0.35, 0.37, 0.4), (0.55, 0.56, 0.58)))
        wet = np.take(r.wet.astype(np.float32) * 0.35, r.ids)
        rows = np.clip(2 * int(vh) - np.arange(0, h, 2), 0, h - 1)
        # mirrored about the horizon and smeared vertically: streaky reflections on the wet road (at half size)
        refl: np.ndarray = cv2.resize(cv2.blur(img[rows, ::2], (3, 13)), (w, h), interpolation=cv2.INTER_LINEAR)
        refl *= cv2.merge([wet, wet, wet])
        img += refl
        t = np.exp(-fr.depth() / (world.fog_visibility * 4))
        img *= cv2.merge([t, t, t])
        img += _rgb(1.0 - t, (0.5, 0.52, 0.55))
        s = _window(streaks_f, h, w, rng) * 0.28
        img += cv2.merge([s, s, s])
    np.clip(img, 0.0, 1.0, out=img)
    return cv2.convertScaleAbs(img, alpha=255.0)


def _bloom(emit_lut: np.ndarray, ids: np.ndarray, sigma: float, gain: float) -> np.ndarray:
    """Glow around light sources, computed at quarter resolution for speed."""
    h, w = ids.shape
    small = _take3(emit_lut * gain, np.ascontiguousarray(ids[::4, ::4]))
    small = cv2.GaussianBlur(small, (0, 0), sigma)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _night_lights(r: _Raster, world: _World, width: int, height: int) -> np.ndarray:
    """Light pools of street lamps and headlight beams on the ground (additive irradiance, H x W)."""
    s = 4
    small: np.ndarray = np.zeros((max(height // s, 1), max(width // s, 1)), np.float32)
    f, cx, vh = r.focal / s, width / 2 / s, r.horizon / s

    def ground_poly(pts):
        pts = np.asarray(pts, np.float32)
        pts = pts[pts[:, 1] > _Z_NEAR]
        if len(pts) < 3:
            return None
        u = cx + f * pts[:, 0] / pts[:, 1]
        v = vh + f * r.cam_h / pts[:, 1]
        return np.clip(np.stack([u, v], 1) * 8, -2e8, 2e8).astype(np.int32)

    c, sn = _circle(16)
    for x, z, rad in world.lamps:
        z = z - r.cam_z
        if z < -rad:
            continue
        poly = ground_poly(np.stack([x + rad * 0.7 * c, z + rad * 0.9 * sn], 1))
        if poly is not None:
            cv2.fillPoly(small, [poly], 0.45, cv2.LINE_8, 3)
    for x, z, _vz in world.heads:
        z = z - r.cam_z
        if z < 1:
            continue
        poly = ground_poly([(x - 0.9, z), (x + 0.9, z), (x + 3, max(z - 25, 0.5)), (x - 3, max(z - 25, 0.5))])
        if poly is not None:
            cv2.fillPoly(small, [poly], 0.6, cv2.LINE_8, 3)
    small = cv2.GaussianBlur(small, (0, 0), 2.0)
    small *= np.take((r.surf == _S_GROUND).astype(np.float32), np.ascontiguousarray(r.ids[::s, ::s]))[
        : small.shape[0], : small.shape[1]
    ]
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
