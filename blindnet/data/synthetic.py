"""Procedural street scenes with 19-class Cityscapes train-id masks, rendered in several aligned appearances.

Every scene is a small 3D world (a straight street seen from a car: road with lane markings, sidewalks, buildings with
windows, walls, fences, trees, terrain, street lamps, traffic lights and signs, people, riders, cars, trucks, buses,
trams, motorcycles, bicycles) built from a seed, projected with a pinhole camera and rasterised once into an
object-id map. The class mask and every appearance are looked up from that one id map, so all appearances share the
EXACT same mask and only pixels differ:

* ``noon``   high white sun, blue sky with clouds, hard lambert shading.
* ``sunset`` low warm sun from one side (lit and unlit facades differ strongly), orange-to-purple sky, sun glow.
* ``night``  dark blue ambient, light only from emitters: street lamps with light pools, head/tail lights,
  lit windows, traffic lights; bloom around them; stars.
* ``fog``    depth-dependent exponential fog (per-pixel depth of the ground, facades and objects), grey sky.
* ``rain``   overcast, wet darker road with streaky mirrored reflections, rain streaks, slight haze.

Textures (fine grain and coarse blotches whose strength depends on the material) and sensor noise keep the classes
from being trivially separable by colour.

Aligned on-disk layout written by :func:`write_aligned_dataset` (read by
:class:`blindnet.data.datasets.AlignedAppearanceDataset`)::

    ROOT/<split>/labels/<scene>.png          uint8 train ids 0..18, 255 = ignore (one mask per scene)
    ROOT/<split>/<appearance>/<scene>.png    RGB image, one folder per appearance (noon, sunset, ...)
    ROOT/<split>/meta.json                   {"appearances": [...], "scenes": N, ...}; written last = complete

Every file is written to a temporary name and renamed into place, so a killed writer never leaves a truncated PNG,
and ``meta.json`` only exists once every scene is on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypedDict

import cv2
import numpy as np

APPEARANCES: tuple[str, ...] = ("noon", "sunset", "night", "fog", "rain")
LAYOUT_VERSION = 1

# Cityscapes train ids (kept local so this module has no dependency on the rest of the package).
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)

# Painter layers: everything in a lower layer is drawn first; inside a layer far objects are drawn first.
_L_GROUND, _L_STRIP, _L_MARK, _L_SIDE, _L_OBJ = range(5)
# How a part's per-pixel depth is computed (for fog): on the ground plane, on a plane X = const, or constant.
_S_CONST, _S_GROUND, _S_SIDE = range(3)
_SHIFT = 3  # sub-pixel bits for cv2 drawing, so thin far poles do not jitter by whole pixels
_Z_NEAR = 0.3


def _scene_seed(seed: int, index: int) -> int:
    """Independent per-scene seed (SeedSequence mixing, so nearby seeds give unrelated scenes)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------------------------------
# World description
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    polys: list[np.ndarray]  # each (n, 3) world X (right), Y (up), Z (forward); convex-ish polygons
    cls: int
    color: tuple[float, float, float]
    layer: int
    key: float  # painter depth of the whole object it belongs to
    normal: tuple[float, float, float] = (0.0, 0.0, -1.0)
    fine: float = 0.05  # fine grain texture amplitude
    coarse: float = 0.08  # blotchy texture amplitude
    emit: tuple[float, float, float] = (0.0, 0.0, 0.0)  # light emitted at night (headlights, lamps, windows)
    surf: int = _S_CONST
    line: float = 0.0  # > 0: draw polys as polylines this many metres thick (bike frames, wires)
    vz: float = 0.0  # metres per clip frame along Z (moving traffic)
    wet: bool = False  # mirror-like when it rains


@dataclass
class _World:
    parts: list[_Part]
    focal_rel: float  # focal length / image width
    horizon_rel: float  # horizon row / image height
    cam_h: float
    lamps: list[tuple[float, float, float]]  # (X, Z, radius) light pools on the ground at night
    heads: list[tuple[float, float, float]]  # (X, Z, vz) headlight beams at night
    sun_side: float  # -1 sun on the left, +1 on the right (sunset)
    fog_visibility: float
    tint: np.ndarray = field(default_factory=lambda: np.ones(3, np.float32))


@lru_cache(maxsize=32)
def _circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.cos(t), np.sin(t)


class _Builder:
    """Appends parts for street elements; all sizes in metres, camera at X = 0, Y = cam_h, looking along +Z."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        # colour jitter draws from a pre-drawn pool: hundreds of tiny rng calls per scene cost more than the drawing
        self._pool = rng.uniform(-1.0, 1.0, 2048).tolist()
        self._k = 0
        self.parts: list[_Part] = []
        self.lamps: list[tuple[float, float, float]] = []
        self.heads: list[tuple[float, float, float]] = []

    def add(self, polys, cls: int, color, layer: int = _L_OBJ, key: float = 0.0, **kw) -> None:
        if isinstance(polys, np.ndarray):
            polys = [polys]
        self.parts.append(_Part([np.asarray(p, np.float32) for p in polys], cls, tuple(color), layer, key, **kw))

    def jitter(self, color, amount: float = 0.08) -> tuple[float, float, float]:
        pool, k = self._pool, self._k
        self._k = (k + 4) % (len(pool) - 4)
        g = 1.0 + amount * pool[k]
        return tuple(min(1.0, max(0.0, float(c) * g + 0.03 * pool[k + 1 + i])) for i, c in enumerate(color))

    # -- primitive shapes -------------------------------------------------------------------------------------------
    @staticmethod
    def ground(x0, x1, z0, z1, y=0.0):
        return np.array([[x0, y, z0], [x1, y, z0], [x1, y, z1], [x0, y, z1]])

    @staticmethod
    def xplane(x, z0, z1, y0, y1):
        return np.array([[x, y0, z0], [x, y0, z1], [x, y1, z1], [x, y1, z0]])

    @staticmethod
    def zplane(z, x0, x1, y0, y1):
        return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]])

    @staticmethod
    def zellipse(z, cx, cy, rx, ry, n=12, jag=None):
        c, s = _circle(n)
        out = np.empty((n, 3), np.float32)
        r = 1.0 if jag is None else jag
        out[:, 0] = cx + rx * r * c
        out[:, 1] = cy + ry * r * s
        out[:, 2] = z
        return out

    @staticmethod
    def xellipse(x, cz, cy, rz, ry, n=12):
        c, s = _circle(n)
        out = np.empty((n, 3), np.float32)
        out[:, 0] = x
        out[:, 1] = cy + ry * s
        out[:, 2] = cz + rz * c
        return out

    def box(self, x0, x1, y0, y1, z0, z1, cls, color, key=None, vz=0.0, fine=0.03, coarse=0.05, front=None):
        """Visible faces of an axis-aligned box: the side facing the camera's X, the top if below eye height, and
        the face towards the camera (drawn last so it covers the others)."""
        key = z0 if key is None else key
        kw = dict(layer=_L_OBJ, key=key, vz=vz, fine=fine, coarse=coarse)
        if x0 > 0:
            self.add(self.xplane(x0, z0, z1, y0, y1), cls, np.asarray(color) * 0.8, normal=(-1, 0, 0), **kw)
        elif x1 < 0:
            self.add(self.xplane(x1, z0, z1, y0, y1), cls, np.asarray(color) * 0.8, normal=(1, 0, 0), **kw)
        if y1 < 1.5:
            self.add(self.ground(x0, x1, z0, z1, y1), cls, np.asarray(color) * 1.1, normal=(0, 1, 0), **kw)
        self.add(self.zplane(z0, x0, x1, y0, y1), cls, front if front is not None else color, normal=(0, 0, -1), **kw)

    # -- street elements --------------------------------------------------------------------------------------------
    def person(self, x, z, cls=PERSON, height=None, y0=0.0, key=None, vz=0.0, seated=False):
        """A pedestrian (or a seated rider) standing at ``(x, z)``: legs, torso, arms, head, maybe a bag.

        Long on purpose: the body parts share the proportions drawn at the top, read top to bottom.
        """
        r = self.rng
        h = height or r.uniform(1.55, 1.95)
        key = z if key is None else key
        skin = self.jitter(r.choice([(0.85, 0.65, 0.5), (0.55, 0.38, 0.28), (0.35, 0.24, 0.18)]))
        top = self.jitter(r.uniform(0.05, 0.9, 3))
        legs = self.jitter(r.uniform(0.05, 0.5, 3))
        kw = dict(layer=_L_OBJ, key=key, vz=vz, fine=0.05, coarse=0.08)
        s = h / 1.75
        hip = y0 + (0.55 if seated else 0.9) * s
        step = r.uniform(-0.18, 0.18) * s
        if seated:  # legs bent forward/down towards the pedals
            self.add(
                [
                    self.zplane(z, x - 0.2 * s, x - 0.05 * s, y0 + 0.1, hip),
                    self.zplane(z, x + 0.05 * s, x + 0.2 * s, y0 + 0.1, hip),
                ],
                cls,
                legs,
                **kw,
            )
        else:
            self.add(
                [
                    np.array(
                        [
                            [x - 0.17 * s + step, y0, z],
                            [x - 0.04 * s + step, y0, z],
                            [x - 0.01 * s, hip, z],
                            [x - 0.16 * s, hip, z],
                        ]
                    ),
                    np.array(
                        [
                            [x + 0.04 * s - step, y0, z],
                            [x + 0.17 * s - step, y0, z],
                            [x + 0.16 * s, hip, z],
                            [x + 0.01 * s, hip, z],
                        ]
                    ),
                ],
                cls,
                legs,
                **kw,
            )
        sh = hip + 0.58 * s
        self.add(
            np.array([[x - 0.16 * s, hip, z], [x + 0.16 * s, hip, z], [x + 0.22 * s, sh, z], [x - 0.22 * s, sh, z]]),
            cls,
            top,
            **kw,
        )
        sw = r.uniform(-0.1, 0.1) * s
        self.add(
            [
                np.array(
                    [
                        [x - 0.22 * s, sh, z],
                        [x - 0.15 * s, sh, z],
                        [x - 0.2 * s + sw, sh - 0.55 * s, z],
                        [x - 0.27 * s + sw, sh - 0.55 * s, z],
                    ]
                ),
                np.array(
                    [
                        [x + 0.15 * s, sh, z],
                        [x + 0.22 * s, sh, z],
                        [x + 0.27 * s - sw, sh - 0.55 * s, z],
                        [x + 0.2 * s - sw, sh - 0.55 * s, z],
                    ]
                ),
            ],
            cls,
            top,
            **kw,
        )
        self.add(self.zplane(z, x - 0.05 * s, x + 0.05 * s, sh - 0.02, sh + 0.06 * s), cls, skin, **kw)
        self.add(self.zellipse(z, x, sh + 0.16 * s, 0.1 * s, 0.12 * s, 10), cls, skin, **kw)
        if r.random() < 0.4:  # hair / hat changes the head silhouette colour
            self.add(
                self.zellipse(z, x, sh + 0.22 * s, 0.1 * s, 0.06 * s, 8), cls, self.jitter(r.uniform(0, 0.4, 3)), **kw
            )

    def two_wheeler(self, x, z, cls, facing=1.0, with_rider=True, key=None, vz=0.0):
        """A bicycle or motorcycle in profile (in a plane of constant Z), optionally ridden."""
        r = self.rng
        key = z if key is None else key
        moto = cls == MOTORCYCLE
        wr = 0.32 if moto else 0.34
        base = 1.45 if moto else 1.05
        color = self.jitter(r.uniform(0.05, 0.9, 3))
        kw = dict(layer=_L_OBJ, key=key, vz=vz, fine=0.03, coarse=0.04)
        xb, xf = x - facing * base / 2, x + facing * base / 2
        tyre = (0.06, 0.06, 0.07)
        if moto:
            for xc in (xb, xf):
                self.add(self.zellipse(z, xc, wr, wr, wr, 14), cls, tyre, **kw)
                self.add(self.zellipse(z, xc, wr, wr * 0.45, wr * 0.45, 10), cls, (0.5, 0.5, 0.52), **kw)
            body = np.array(
                [
                    [xb + facing * 0.2, 0.45, z],
                    [xf - facing * 0.25, 0.4, z],
                    [xf - facing * 0.05, 0.85, z],
                    [x, 0.95, z],
                    [xb, 0.8, z],
                ]
            )
            self.add(body, cls, color, **kw)
            self.add(
                self.zplane(z, min(xf, xf - facing * 0.12), max(xf, xf - facing * 0.12), 0.8, 1.1),
                cls,
                (0.15, 0.15, 0.15),
                **kw,
            )
        else:
            for xc in (xb, xf):
                self.add(self.zellipse(z, xc, wr, wr, wr, 14), cls, tyre, line=0.04, **kw)
            seat = (x - facing * 0.1, 0.95)
            bar = (xf - facing * 0.15, 1.0)
            frame = np.array([[xb, wr, z], [seat[0], seat[1], z], [x + facing * 0.05, wr, z], [xb, wr, z]])
            self.add(frame, cls, color, line=0.035, **kw)
            self.add(
                np.array([[x + facing * 0.05, wr, z], [bar[0], bar[1] - 0.1, z], [seat[0], seat[1] - 0.05, z]]),
                cls,
                color,
                line=0.035,
                **kw,
            )
            self.add(np.array([[xf, wr, z], [bar[0], bar[1], z]]), cls, color, line=0.03, **kw)
        if with_rider:
            self.person(
                x - facing * 0.1,
                z - 0.01,
                cls=RIDER,
                height=r.uniform(1.55, 1.85),
                y0=0.45 if moto else 0.35,
                key=key - 0.01,
                vz=vz,
                seated=True,
            )

    def _lamps(self, x, z0, left, right, width, y, height, cls, oncoming, vz, kw) -> None:
        """A pair of lamps on a vehicle's visible face: white headlights (oncoming, also registered as light sources
        for the night appearance) or red tail lights."""
        if oncoming:
            lights, emit = (0.95, 0.95, 0.85), (3.0, 2.9, 2.5)
            self.heads.append((x, z0, vz))
        else:
            lights, emit = (0.7, 0.05, 0.05), (2.0, 0.1, 0.05)
        self.add(
            [
                self.zplane(z0 - 0.02, left, left + width, y, y + height),
                self.zplane(z0 - 0.02, right - width, right, y, y + height),
            ],
            cls,
            lights,
            emit=emit,
            fine=0.0,
            coarse=0.0,
            **kw,
        )

    def vehicle(self, x, z, cls, oncoming=False, vz=0.0):
        """Car / truck / bus / tram seen from behind (same direction) or from the front (oncoming).

        Long on purpose: one vehicle's parts share a dozen dimensions drawn once at the top; splitting would pass
        them all around.
        """
        r = self.rng
        dims = {CAR: (1.8, 1.45, 4.4), TRUCK: (2.5, 3.4, 8.5), BUS: (2.55, 3.2, 12.0), TRAIN: (2.65, 3.5, 28.0)}[cls]
        w, h, length = dims[0] * r.uniform(0.93, 1.07), dims[1] * r.uniform(0.93, 1.1), dims[2] * r.uniform(0.9, 1.1)
        palettes = {
            CAR: [
                (0.75, 0.75, 0.78),
                (0.1, 0.1, 0.12),
                (0.55, 0.05, 0.05),
                (0.1, 0.2, 0.5),
                (0.9, 0.9, 0.9),
                (0.3, 0.32, 0.35),
            ],
            TRUCK: [(0.85, 0.85, 0.8), (0.7, 0.3, 0.05), (0.2, 0.35, 0.2)],
            BUS: [(0.85, 0.75, 0.1), (0.75, 0.1, 0.1), (0.1, 0.4, 0.7), (0.9, 0.9, 0.9)],
            TRAIN: [(0.85, 0.85, 0.85), (0.8, 0.15, 0.1), (0.1, 0.5, 0.4)],
        }
        color = np.asarray(self.jitter(palettes[cls][r.integers(len(palettes[cls]))]))
        x0, x1, z0, z1 = x - w / 2, x + w / 2, z, z + length
        key = z0
        kw = dict(layer=_L_OBJ, key=key, vz=vz)
        glass = (0.08, 0.1, 0.13)
        tyre = (0.05, 0.05, 0.05)
        if cls == CAR:
            self.box(x0, x1, 0.3, 0.95 * h * 0.62, z0, z1, cls, color, key=key, vz=vz)
            # cabin: a narrower box on top, set back from the ends
            cx0, cx1 = x0 + 0.12 * w, x1 - 0.12 * w
            cz0, cz1 = z0 + 0.22 * length, z1 - 0.25 * length
            yb = 0.95 * h * 0.62
            if x0 > 0:
                self.add(self.xplane(cx0, cz0, cz1, yb, h), cls, glass, normal=(-1, 0, 0), fine=0.02, coarse=0.02, **kw)
            elif x1 < 0:
                self.add(self.xplane(cx1, cz0, cz1, yb, h), cls, glass, normal=(1, 0, 0), fine=0.02, coarse=0.02, **kw)
            self.add(
                np.array([[x0 + 0.05, yb, z0 + 0.05], [x1 - 0.05, yb, z0 + 0.05], [cx1, h, cz0], [cx0, h, cz0]]),
                cls,
                glass,
                normal=(0, 0.5, -0.8),
                fine=0.02,
                coarse=0.02,
                **kw,
            )
            # wheels on the visible side, and the two at the near end
            side_x = x0 if x0 > 0 else (x1 if x1 < 0 else None)
            if side_x is not None:
                for wz in (z0 + 0.18 * length, z1 - 0.18 * length):
                    self.add(
                        self.xellipse(side_x, wz, 0.32, 0.33, 0.32, 12),
                        cls,
                        tyre,
                        normal=(-np.sign(side_x), 0, 0),
                        **kw,
                    )
            self.add(
                [
                    self.zplane(z0 - 0.01, x0 + 0.05, x0 + 0.3, 0.0, 0.35),
                    self.zplane(z0 - 0.01, x1 - 0.3, x1 - 0.05, 0.0, 0.35),
                ],
                cls,
                tyre,
                **kw,
            )
            self._lamps(x, z0, x0 + 0.08, x1 - 0.08, 0.27, 0.55 * h * 0.62 + 0.15, 0.15, cls, oncoming, vz, kw)
            self.add(
                self.zplane(z0 - 0.02, x - 0.25, x + 0.25, 0.35, 0.47),
                cls,
                (0.9, 0.9, 0.85),
                fine=0.0,
                coarse=0.0,
                **kw,
            )
            return
        # large vehicles: one box, window band on the visible side and on the near face
        self.box(x0, x1, 0.35, h, z0, z1, cls, color, key=key, vz=vz)
        side_x = x0 if x0 > 0 else (x1 if x1 < 0 else None)
        band = (0.55 * h, 0.85 * h) if cls != TRUCK else (0.62 * h, 0.85 * h)
        if side_x is not None:
            nwin = int(length / 1.6)
            zs = z0 + (np.arange(nwin) + 0.15) * length / nwin
            if cls == TRUCK:  # only the cab has a side window
                zs = zs[-1:] if oncoming is False else zs[:1]
            wins = [self.xplane(side_x, zz, zz + 0.7 * length / max(nwin, 1), band[0], band[1]) for zz in zs]
            self.add(
                wins,
                cls,
                glass,
                normal=(-np.sign(side_x), 0, 0),
                emit=(0.6, 0.55, 0.4) if cls != TRUCK else (0, 0, 0),
                fine=0.02,
                coarse=0.02,
                **kw,
            )
            for wz in (z0 + 1.2, z1 - 1.6):
                self.add(
                    self.xellipse(side_x, wz, 0.45, 0.5, 0.45, 12), cls, tyre, normal=(-np.sign(side_x), 0, 0), **kw
                )
        if cls == TRUCK and not oncoming:
            self.add(
                self.zplane(z0 - 0.01, x0 + 0.1, x1 - 0.1, 0.5, h - 0.1), cls, np.asarray(color) * 0.85, **kw
            )  # cargo doors
            self.add(self.zplane(z0 - 0.02, x - 0.02, x + 0.02, 0.5, h - 0.1), cls, (0.2, 0.2, 0.2), **kw)
        else:
            self.add(
                self.zplane(z0 - 0.01, x0 + 0.15, x1 - 0.15, band[0] - (0.25 if oncoming else 0), band[1]),
                cls,
                glass,
                fine=0.02,
                coarse=0.02,
                **kw,
            )
        if cls == TRAIN:
            self.add(
                [np.array([[x - 0.5, h, z0 + 3], [x + 0.2, h + 1.2, z0 + 4], [x + 0.9, h + 1.2, z0 + 4]])],
                cls,
                (0.2, 0.2, 0.2),
                line=0.05,
                **kw,
            )
        self._lamps(x, z0, x0 + 0.1, x1 - 0.1, 0.3, 0.35 + 0.45, 0.2, cls, oncoming, vz, kw)
        if cls == BUS:
            self.add(
                self.zplane(z0 - 0.02, x0 + 0.3, x1 - 0.3, band[1] + 0.05, h - 0.1),
                cls,
                (0.05, 0.05, 0.05),
                emit=(2.0, 1.2, 0.2),
                **kw,
            )

    def lamp(self, x, z, side):
        """Street lamp on the sidewalk edge: pole with an arm over the road and a light head (all class pole)."""
        h = self.rng.uniform(6.5, 9.0)
        col = self.jitter((0.35, 0.36, 0.38))
        kw = dict(layer=_L_OBJ, key=z, fine=0.03, coarse=0.05)
        self.add(self.zplane(z, x - 0.09, x + 0.09, 0.0, h), POLE, col, **kw)
        arm = x - side * 1.6
        self.add(np.array([[x, h - 0.1, z], [arm, h + 0.15, z], [arm, h + 0.28, z], [x, h + 0.05, z]]), POLE, col, **kw)
        self.add(
            self.zplane(z - 0.01, min(arm, arm - side * 0.6), max(arm, arm - side * 0.6), h + 0.05, h + 0.25),
            POLE,
            (0.8, 0.8, 0.7),
            emit=(3.0, 2.4, 1.4),
            **kw,
        )
        self.lamps.append((arm - side * 0.3, z, h * 0.9))

    def traffic_light(self, x, z, side, overhead=False):
        r = self.rng
        h = r.uniform(2.8, 3.6)
        kw = dict(layer=_L_OBJ, key=z, fine=0.03, coarse=0.04)
        pole_col = self.jitter((0.3, 0.3, 0.32))
        self.add(self.zplane(z, x - 0.07, x + 0.07, 0.0, h + (2.5 if overhead else 0.0)), POLE, pole_col, **kw)
        bx = x
        by = h
        if overhead:
            bx = x - side * r.uniform(2.5, 4.5)
            by = h + 2.5
            self.add(self.zplane(z, min(x, bx), max(x, bx), by + 0.9, by + 1.0), POLE, pole_col, **kw)
        self.add(self.zplane(z - 0.02, bx - 0.2, bx + 0.2, by, by + 0.95), LIGHT, self.jitter((0.08, 0.08, 0.08)), **kw)
        state = r.integers(3)
        for i, (col, em) in enumerate(
            [((0.9, 0.1, 0.1), (3, 0.3, 0.2)), ((0.9, 0.7, 0.1), (3, 2.2, 0.3)), ((0.1, 0.9, 0.3), (0.3, 3, 1.2))]
        ):
            on = i == state
            c = col if on else tuple(0.25 * v for v in col)
            self.add(
                self.zellipse(z - 0.04, bx, by + 0.78 - i * 0.3, 0.1, 0.1, 8),
                LIGHT,
                c,
                emit=em if on else (0, 0, 0),
                **kw,
            )

    def sign(self, x, z):
        r = self.rng
        h = r.uniform(2.0, 2.8)
        kw = dict(layer=_L_OBJ, key=z, fine=0.02, coarse=0.03)
        self.add(self.zplane(z, x - 0.05, x + 0.05, 0.0, h), POLE, self.jitter((0.5, 0.5, 0.52)), **kw)
        kind = r.integers(4)
        if kind == 0:  # round prohibition sign: red rim, white centre
            self.add(self.zellipse(z - 0.01, x, h + 0.35, 0.35, 0.35, 16), SIGN, (0.8, 0.05, 0.05), **kw)
            self.add(self.zellipse(z - 0.02, x, h + 0.35, 0.26, 0.26, 16), SIGN, (0.95, 0.95, 0.95), **kw)
        elif kind == 1:  # warning triangle
            self.add(
                np.array([[x - 0.4, h, z - 0.01], [x + 0.4, h, z - 0.01], [x, h + 0.7, z - 0.01]]),
                SIGN,
                (0.85, 0.05, 0.05),
                **kw,
            )
            self.add(
                np.array([[x - 0.27, h + 0.08, z - 0.02], [x + 0.27, h + 0.08, z - 0.02], [x, h + 0.55, z - 0.02]]),
                SIGN,
                (0.95, 0.95, 0.9),
                **kw,
            )
        elif kind == 2:  # blue mandatory / information rectangle
            self.add(self.zplane(z - 0.01, x - 0.35, x + 0.35, h, h + 0.6), SIGN, (0.05, 0.25, 0.7), **kw)
            self.add(self.zplane(z - 0.02, x - 0.2, x + 0.2, h + 0.25, h + 0.35), SIGN, (0.95, 0.95, 0.95), **kw)
        else:  # yellow diamond
            self.add(
                np.array(
                    [
                        [x, h, z - 0.01],
                        [x + 0.35, h + 0.35, z - 0.01],
                        [x, h + 0.7, z - 0.01],
                        [x - 0.35, h + 0.35, z - 0.01],
                    ]
                ),
                SIGN,
                (0.95, 0.8, 0.1),
                **kw,
            )

    def tree(self, x, z, scale=1.0, layer=_L_OBJ):
        r = self.rng
        h = r.uniform(3.0, 6.0) * scale
        kw = dict(layer=layer, key=z, fine=0.25, coarse=0.3)
        self.add(
            self.zplane(z, x - 0.15 * scale, x + 0.15 * scale, 0.0, h * 0.6),
            VEGETATION,
            self.jitter((0.3, 0.22, 0.15)),
            **kw,
        )
        rad = r.uniform(1.5, 2.8) * scale
        jag = 1.0 + 0.18 * r.standard_normal(18)
        green = self.jitter(r.choice([(0.25, 0.4, 0.12), (0.18, 0.32, 0.1), (0.35, 0.45, 0.15)]), 0.15)
        self.add(self.zellipse(z - 0.01, x, h * 0.6 + rad * 0.8, rad, rad * 1.1, 18, jag), VEGETATION, green, **kw)


@dataclass
class _Street:
    """The cross-section every stage of :func:`_build_world` builds on (x to the right, z forward, metres)."""

    lane: float  # lane width
    n_right: int  # lanes in the camera's direction
    n_left: int  # oncoming lanes
    xc: float  # centre line (the camera drives at x = 0 in one of the right-hand lanes)
    z_far: float  # end of the populated stretch
    z_back: float = -10.0
    terrain_col: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def right(self) -> float:
        return self.xc + self.n_right * self.lane

    @property
    def left(self) -> float:
        return self.xc - self.n_left * self.lane


def _build_world(seed: int, length: float = 0.0, ego_speed: float = 0.0) -> _World:
    """A random straight street. ``length`` extends the populated stretch for forward-moving clips; traffic ahead in
    the camera's own lane drives at least at ``ego_speed`` (metres per frame) so the camera never drives into it.

    The stages draw from one generator in a fixed order, so a seed always gives the same street.
    """
    rng = np.random.default_rng(seed)
    b = _Builder(rng)
    lane = rng.uniform(3.0, 3.6)
    n_right, n_left = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    xc = -lane / 2 - lane * int(rng.integers(0, n_right))  # camera drives in one of the right-hand lanes
    st = _Street(lane, n_right, n_left, xc, z_far=140.0 + length)
    _road(b, rng, st)
    _crossing_and_tram(b, rng, st)
    for side in (-1.0, 1.0):
        _roadside(b, rng, st, side, length)
    _traffic(b, rng, st, length, ego_speed)
    _skyline(b, rng, st)
    sun = float(rng.choice([-1.0, 1.0]))
    return _World(
        b.parts,
        float(rng.uniform(0.62, 0.82)),
        float(rng.uniform(0.38, 0.5)),
        float(rng.uniform(1.3, 1.7)),
        b.lamps,
        b.heads,
        sun,
        float(rng.uniform(22, 55)),
        rng.uniform(0.92, 1.08, 3).astype(np.float32),
    )


_GROUND_KW: dict[str, Any] = dict(surf=_S_GROUND, normal=(0, 1, 0))


def _road(b: _Builder, rng: np.random.Generator, st: _Street) -> None:
    """Terrain, the carriageway and its markings (markings are road, as in Cityscapes)."""
    left, right, z_back = st.left, st.right, st.z_back
    st.terrain_col = b.jitter((0.35, 0.45, 0.2), 0.15)
    b.add(
        b.ground(-600, 600, z_back, 3000), TERRAIN, st.terrain_col, layer=_L_GROUND, fine=0.2, coarse=0.3, **_GROUND_KW
    )
    road_col = b.jitter((0.3, 0.3, 0.32), 0.2)
    b.add(
        b.ground(left, right, z_back, 3000),
        ROAD,
        road_col,
        layer=_L_STRIP,
        fine=0.12,
        coarse=0.06,
        wet=True,
        **_GROUND_KW,
    )
    mark = (0.85, 0.85, 0.8)
    mk: dict[str, Any] = dict(layer=_L_MARK, fine=0.1, coarse=0.1, **_GROUND_KW)
    # solid edges, dashed lane dividers, centre line maybe yellow
    b.add(
        [b.ground(left + 0.2, left + 0.35, z_back, 3000), b.ground(right - 0.35, right - 0.2, z_back, 3000)],
        ROAD,
        mark,
        **mk,
    )
    dash, gap = rng.uniform(2.5, 4.0), rng.uniform(5.0, 9.0)
    zs = np.arange(z_back, st.z_far + 60, dash + gap)
    centre_col = (0.85, 0.7, 0.1) if rng.random() < 0.3 else mark
    b.add([b.ground(st.xc - 0.08, st.xc + 0.08, zz, zz + dash) for zz in zs], ROAD, centre_col, **mk)
    for k in list(range(1, st.n_right)) + [-k for k in range(1, st.n_left)]:
        xl = st.xc + k * st.lane
        b.add([b.ground(xl - 0.07, xl + 0.07, zz, zz + dash) for zz in zs], ROAD, mark, **mk)


def _crossing_and_tram(b: _Builder, rng: np.random.Generator, st: _Street) -> None:
    """Maybe a zebra crossing with pedestrians, maybe tram rails in the opposite lane with a tram on them."""
    mark = (0.85, 0.85, 0.8)
    mk: dict[str, Any] = dict(layer=_L_MARK, fine=0.1, coarse=0.1, **_GROUND_KW)
    left, right = st.left, st.right
    if rng.random() < 0.5:
        zc = rng.uniform(12, 45)
        b.add([b.ground(x, x + 0.5, zc, zc + 3.5) for x in np.arange(left + 0.5, right - 0.5, 1.0)], ROAD, mark, **mk)
        for _ in range(rng.integers(0, 3)):
            b.person(rng.uniform(left + 1, right - 1), zc + rng.uniform(0.5, 3.0))
    if rng.random() < 0.35:  # rails are road class
        xt = st.xc - st.lane / 2
        b.add(
            [b.ground(xt - 0.75, xt - 0.68, st.z_back, 3000), b.ground(xt + 0.68, xt + 0.75, st.z_back, 3000)],
            ROAD,
            (0.55, 0.55, 0.58),
            **mk,
        )
        b.vehicle(xt, rng.uniform(15, 60), TRAIN, oncoming=bool(rng.random() < 0.5))


def _roadside(b: _Builder, rng: np.random.Generator, st: _Street, side: float, length: float) -> None:
    """One side of the street: sidewalk and kerb, buildings or a park, street furniture, pedestrians, parked
    two-wheelers and cars."""
    edge = st.right if side > 0 else st.left
    z_back, z_far = st.z_back, st.z_far
    sw = rng.uniform(2.2, 5.0)
    outer = edge + side * sw
    b.add(
        b.ground(min(edge, outer), max(edge, outer), z_back, 3000),
        SIDEWALK,
        b.jitter((0.6, 0.58, 0.55), 0.15),
        layer=_L_STRIP,
        fine=0.1,
        coarse=0.08,
        wet=True,
        **_GROUND_KW,
    )
    b.add(
        b.ground(min(edge, edge + side * 0.25), max(edge, edge + side * 0.25), z_back, 3000),
        SIDEWALK,
        (0.72, 0.72, 0.7),
        layer=_L_MARK,
        fine=0.05,
        coarse=0.1,
        **_GROUND_KW,
    )  # kerb stones
    park = rng.random() < 0.3
    setback = 0.0 if (park or rng.random() < 0.5) else rng.uniform(1.0, 3.0)
    front = outer + side * setback
    if setback > 0:  # terrain strip, maybe behind a hedge or a low wall
        b.add(
            b.ground(min(outer, front), max(outer, front), z_back, 3000),
            TERRAIN,
            st.terrain_col,
            layer=_L_STRIP,
            fine=0.2,
            coarse=0.3,
            **_GROUND_KW,
        )
    if park:
        _park_side(b, outer, side, z_back, z_far)
    else:
        _building_side(b, front, side, z_back, z_far)
    pole_x = edge + side * 0.5  # street furniture along the kerb
    for zl in np.arange(rng.uniform(0, 15), z_far, rng.uniform(18, 30)):
        b.lamp(pole_x, zl, side)
    for _ in range(int(rng.integers(1, 3))):
        b.sign(pole_x + side * rng.uniform(0, 0.5), rng.uniform(6, 70))
    if rng.random() < 0.7:
        b.traffic_light(pole_x, rng.uniform(10, 60), side, overhead=bool(rng.random() < 0.4))
    if not park and rng.random() < 0.6:
        for zt in np.arange(rng.uniform(3, 12), z_far, rng.uniform(10, 20)):
            b.tree(edge + side * rng.uniform(1.0, sw - 0.5), zt)
    for _ in range(int(rng.integers(1, 6) + length / 30)):
        b.person(edge + side * rng.uniform(0.8, sw - 0.3), rng.uniform(4, 60 + length))
    for _ in range(int(rng.integers(0, 3))):  # parked bicycles / motorcycles on the sidewalk, in profile
        cls = BICYCLE if rng.random() < 0.6 else MOTORCYCLE
        b.two_wheeler(
            edge + side * rng.uniform(1.0, sw - 0.5),
            rng.uniform(5, 50),
            cls,
            facing=float(rng.choice([-1, 1])),
            with_rider=bool(rng.random() < 0.3),
        )
    for zp in rng.uniform(5, 80 + length, int(rng.integers(0, 4))):  # parked cars along the kerb
        if abs(edge - side * 1.2) > 2.2:  # not when the kerb lane is the camera's own lane
            b.vehicle(edge - side * 1.2, zp, CAR)


def _traffic(b: _Builder, rng: np.random.Generator, st: _Street, length: float, ego_speed: float) -> None:
    """Vehicles in the lanes (the camera's own lane keeps ahead of the camera) and cyclists near the right kerb."""
    lanes_same = [st.xc + st.lane / 2 + k * st.lane for k in range(st.n_right)]
    lanes_opp = [st.xc - st.lane / 2 - k * st.lane for k in range(st.n_left)]
    for _ in range(int(rng.integers(2, 8) + length / 20)):
        oncoming = rng.random() < 0.45
        xl = float(rng.choice(lanes_opp if oncoming else lanes_same)) + rng.uniform(-0.3, 0.3)
        z = rng.uniform(7, 90 + length)
        u = rng.random()
        cls = CAR if u < 0.7 else TRUCK if u < 0.82 else BUS if u < 0.94 else MOTORCYCLE
        vz = -rng.uniform(0.8, 1.5) if oncoming else rng.uniform(0.0, 0.6)
        if not oncoming and abs(xl) < 2.2:
            vz = max(vz, 1.1 * ego_speed)
        if cls == MOTORCYCLE:
            b.two_wheeler(xl, z, MOTORCYCLE, facing=float(rng.choice([-1, 1])), vz=vz)
        else:
            b.vehicle(xl, z, cls, oncoming=oncoming, vz=vz)
    if rng.random() < 0.8:
        right = st.right
        for _ in range(int(rng.integers(1, 3))):
            b.two_wheeler(
                right - 0.9,
                rng.uniform(8, 50),
                BICYCLE if rng.random() < 0.6 else MOTORCYCLE,
                facing=float(rng.choice([-1, 1])),
                vz=max(0.3, 1.1 * ego_speed) if abs(right - 0.9) < 2.2 else 0.3,
            )


def _skyline(b: _Builder, rng: np.random.Generator, st: _Street) -> None:
    """A distant row of buildings and trees closing the street."""
    z = st.z_far + 200
    for x in np.arange(-250, 250, 18.0):
        hh = rng.uniform(8, 45)
        cls = BUILDING if rng.random() < 0.75 else VEGETATION
        col = b.jitter((0.5, 0.48, 0.46), 0.2) if cls == BUILDING else b.jitter((0.2, 0.33, 0.12))
        b.add(b.zplane(z, x, x + 18.5, 0, hh), cls, col, layer=_L_SIDE, key=z, fine=0.15, coarse=0.2)


def _building_side(b: _Builder, front: float, side: float, z0: float, z_far: float) -> None:
    """One side of the street lined with facades from ``front`` outwards: buildings with windows and doors,
    walls, fences, poles and vegetation between them.

    Long on purpose: each facade's parts share its randomly drawn size; the loop reads as one building at a time.
    """
    r = b.rng
    z = z0
    while z < z_far:
        length = r.uniform(8, 28)
        if r.random() < 0.18:  # gap with a wall or a fence (and vegetation behind it)
            gap = r.uniform(4, 12)
            if r.random() < 0.5:
                b.add(
                    b.xplane(front, z, z + gap, 0, r.uniform(1.2, 2.8)),
                    WALL,
                    b.jitter((0.55, 0.52, 0.5), 0.2),
                    layer=_L_SIDE,
                    key=z,
                    surf=_S_SIDE,
                    normal=(-side, 0, 0),
                    fine=0.12,
                    coarse=0.2,
                )
            else:
                _fence(b, front, side, z, z + gap)
            b.tree(front + side * 3, z + gap / 2, scale=1.3, layer=_L_SIDE)
            z += gap
            continue
        h = r.uniform(7, 32)
        col = np.asarray(
            b.jitter(
                r.choice(
                    [(0.62, 0.55, 0.48), (0.55, 0.55, 0.55), (0.7, 0.62, 0.5), (0.5, 0.35, 0.3), (0.75, 0.72, 0.65)]
                ),
                0.15,
            )
        )
        kw: dict[str, Any] = dict(layer=_L_SIDE, key=z, fine=0.08, coarse=0.18)
        # near face (towards the camera) first so the facade and windows drawn after it stay on top where they meet
        b.add(
            b.zplane(z, min(front, front + side * 15), max(front, front + side * 15), 0, h),
            BUILDING,
            col * 0.85,
            normal=(0, 0, -1),
            **kw,
        )
        b.add(b.xplane(front, z, z + length, 0, h), BUILDING, col, surf=_S_SIDE, normal=(-side, 0, 0), **kw)
        # window grid on the facade: lit ones glow at night
        floor_h = r.uniform(2.8, 3.5)
        win_w = r.uniform(0.8, 1.6)
        pitch = win_w + r.uniform(0.8, 2.0)
        ys = np.arange(floor_h * 0.9 if r.random() < 0.5 else 0.8, h - 1.5, floor_h)
        zs = np.arange(z + 0.8, z + length - win_w - 0.3, pitch)
        if len(ys) and len(zs):
            yy, zz = np.meshgrid(ys, zs, indexing="ij")
            yy, zz = yy.ravel(), zz.ravel()
            lit = r.random(len(yy)) < r.uniform(0.15, 0.5)
            wh = floor_h * 0.5
            glass = np.asarray(b.jitter((0.18, 0.22, 0.28), 0.2))
            for sel, emit in ((~lit, (0.0, 0.0, 0.0)), (lit, (2.2, 1.7, 0.9))):
                polys = [
                    b.xplane(front + side * 0.01 * 0, z1, z1 + win_w, y1, y1 + wh) for y1, z1 in zip(yy[sel], zz[sel])
                ]
                if polys:
                    b.add(
                        polys,
                        BUILDING,
                        glass,
                        surf=_S_SIDE,
                        normal=(-side, 0, 0),
                        emit=emit,
                        layer=_L_SIDE,
                        key=z,
                        fine=0.03,
                        coarse=0.05,
                    )
        if r.random() < 0.5:  # shop front / door at street level
            zd = z + r.uniform(0.5, max(0.6, length - 3))
            b.add(
                b.xplane(front, zd, zd + 2.0, 0, 2.4),
                BUILDING,
                b.jitter((0.25, 0.2, 0.15)),
                surf=_S_SIDE,
                normal=(-side, 0, 0),
                emit=(1.2, 1.0, 0.7),
                layer=_L_SIDE,
                key=z,
                fine=0.03,
                coarse=0.05,
            )
        if r.random() < 0.25:  # low wall / hedge in front of the building
            if r.random() < 0.5:
                b.add(
                    b.xplane(front - side * 0.3, z, z + length, 0, r.uniform(0.6, 1.2)),
                    WALL,
                    b.jitter((0.6, 0.58, 0.55)),
                    layer=_L_SIDE,
                    key=z - 0.01,
                    surf=_S_SIDE,
                    normal=(-side, 0, 0),
                    fine=0.1,
                    coarse=0.2,
                )
            else:
                b.add(
                    b.xplane(front - side * 0.5, z, z + length, 0, r.uniform(0.8, 1.5)),
                    VEGETATION,
                    b.jitter((0.2, 0.35, 0.12)),
                    layer=_L_SIDE,
                    key=z - 0.01,
                    surf=_S_SIDE,
                    normal=(-side, 0, 0),
                    fine=0.3,
                    coarse=0.3,
                )
        z += length + (r.uniform(0.5, 3) if r.random() < 0.3 else 0.0)


def _fence(b: _Builder, x: float, side: float, z0: float, z1: float) -> None:
    r = b.rng
    h = r.uniform(1.0, 2.0)
    col = b.jitter(r.choice([(0.45, 0.4, 0.35), (0.35, 0.38, 0.35), (0.6, 0.6, 0.62)]))
    kw: dict[str, Any] = dict(layer=_L_SIDE, key=z0 - 0.02, surf=_S_SIDE, normal=(-side, 0, 0), fine=0.05, coarse=0.1)
    pitch = r.uniform(0.15, 0.4)
    slats = [b.xplane(x, zz, zz + pitch * 0.45, 0.05, h) for zz in np.arange(z0, z1, pitch)]
    b.add(slats, FENCE, col, **kw)
    b.add([b.xplane(x, z0, z1, h * f - 0.05, h * f + 0.05) for f in (0.25, 0.9)], FENCE, col, **kw)


def _park_side(b: _Builder, outer: float, side: float, z0: float, z_far: float) -> None:
    r = b.rng
    line = outer + side * r.uniform(0.0, 0.5)
    if r.random() < 0.6:
        _fence(b, line, side, z0, z_far)
    else:
        b.add(
            b.xplane(line, z0, z_far, 0, r.uniform(0.8, 2.0)),
            WALL,
            b.jitter((0.6, 0.57, 0.52)),
            layer=_L_SIDE,
            key=z0,
            surf=_S_SIDE,
            normal=(-side, 0, 0),
            fine=0.1,
            coarse=0.2,
        )
    for zt in np.arange(r.uniform(0, 8), z_far, r.uniform(6, 14)):
        b.tree(line + side * r.uniform(3, 15), zt, scale=r.uniform(1.0, 1.8), layer=_L_SIDE)


# --------------------------------------------------------------------------------------------------------------------
# Rasterisation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Raster:
    ids: np.ndarray  # H x W uint16 part id (0 = sky)
    cls: np.ndarray  # (P,) uint8
    color: np.ndarray  # (P, 3) float32 albedo
    normal: np.ndarray  # (P, 3)
    fine: np.ndarray  # (P,)
    coarse: np.ndarray  # (P,)
    emit: np.ndarray  # (P, 3)
    surf: np.ndarray  # (P,) int
    depth: np.ndarray  # (P,) constant depth / f*|X| for side planes
    wet: np.ndarray  # (P,) bool
    focal: float
    horizon: float
    cam_h: float
    cam_z: float


def _clip_near(poly: np.ndarray, zn: float) -> np.ndarray | None:
    """Sutherland-Hodgman clip of one polygon (n, 3) against the plane Z >= zn (camera coordinates)."""
    out = []
    n = len(poly)
    for i in range(n):
        a, c = poly[i], poly[(i + 1) % n]
        ina, inc = a[2] >= zn, c[2] >= zn
        if ina:
            out.append(a)
        if ina != inc:
            out.append(a + (c - a) * ((zn - a[2]) / (c[2] - a[2])))
    return np.array(out, np.float32) if len(out) >= 3 else None


def _flatten(world: _World) -> dict[str, np.ndarray]:
    """All polygon vertices of a world in one array, so a frame projects them with a handful of numpy calls."""
    cached = getattr(world, "_flat", None)
    if cached is not None:
        return cached
    verts, vz, poly_len, part_first, part_count = [], [], [], [], []
    n = 0
    for p in world.parts:
        part_first.append(n)
        part_count.append(len(p.polys))
        for poly in p.polys:
            verts.append(poly)
            vz.append(np.full(len(poly), p.vz, np.float32))
            poly_len.append(len(poly))
            n += 1
    lengths = np.asarray(poly_len, np.int64)
    flat: dict[str, np.ndarray] = {
        "verts": np.concatenate(verts).astype(np.float32),
        "vz": np.concatenate(vz),
        "poly_start": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
        "poly_len": lengths,
        "part_first": np.asarray(part_first, np.int64),
        "part_count": np.asarray(part_count, np.int64),
    }
    world._flat = flat  # type: ignore[attr-defined]
    return flat


def _rasterise(world: _World, height: int, width: int, cam_z: float = 0.0, frame: int = 0) -> _Raster:
    """Project every part with a pinhole camera at ``cam_z`` and paint part ids far to near (painter's
    algorithm) into an ``H x W`` id map, with per-part class, colour and shading tables.

    Long on purpose: the per-part loop is the renderer's hot path, and keeping its tables in one frame avoids a
    call per part.
    """
    f = world.focal_rel * width
    cx, vh = width / 2.0, world.horizon_rel * height
    scale = float(1 << _SHIFT)
    parts = world.parts
    order = sorted(range(len(parts)), key=lambda i: (parts[i].layer, -(parts[i].key + parts[i].vz * frame)))
    fl = _flatten(world)
    verts = fl["verts"]
    z = verts[:, 2] - cam_z + fl["vz"] * frame
    starts, lens = fl["poly_start"], fl["poly_len"]
    zmin = np.minimum.reduceat(z, starts)
    zmax = np.maximum.reduceat(z, starts)
    zs = np.maximum(z, _Z_NEAR)
    uv = np.empty((len(z), 2), np.float64)
    uv[:, 0] = cx + f * verts[:, 0] / zs
    uv[:, 1] = vh + f * (world.cam_h - verts[:, 1]) / zs
    pix = np.clip(uv * scale, -2e8, 2e8).astype(np.int32)
    visible = zmax >= _Z_NEAR
    needs_clip = visible & (zmin < _Z_NEAR)
    ids = np.zeros((height, width), np.uint16)
    n = len(order) + 1
    cls = np.full(n, SKY, np.uint8)
    color = np.zeros((n, 3), np.float32)
    normal = np.zeros((n, 3), np.float32)
    fine, coarse = np.zeros(n, np.float32), np.zeros(n, np.float32)
    emit = np.zeros((n, 3), np.float32)
    surf = np.zeros(n, np.int8)
    depth = np.full(n, 1e4, np.float32)
    wet = np.zeros(n, bool)
    pid = 0
    pf, pc = fl["part_first"].tolist(), fl["part_count"].tolist()
    starts_l, lens_l = starts.tolist(), lens.tolist()
    vis_l, clip_l, zmin_l = visible.tolist(), needs_clip.tolist(), zmin.tolist()
    for i in order:
        p = parts[i]
        pts = []
        near = 1e9
        for k in range(pf[i], pf[i] + pc[i]):
            if not vis_l[k]:
                continue
            s0, ln = starts_l[k], lens_l[k]
            if clip_l[k]:
                if p.line > 0:
                    continue
                q = verts[s0 : s0 + ln].copy()
                q[:, 2] = z[s0 : s0 + ln]
                q = _clip_near(q, _Z_NEAR)
                if q is None:
                    continue
                uvq = np.stack([cx + f * q[:, 0] / q[:, 2], vh + f * (world.cam_h - q[:, 1]) / q[:, 2]], 1)
                pts.append(np.clip(uvq * scale, -2e8, 2e8).astype(np.int32))
                near = _Z_NEAR
            else:
                pts.append(pix[s0 : s0 + ln])
                near = min(near, zmin_l[k])
        if not pts:
            continue
        pid += 1
        if p.line > 0:
            thick = max(1, int(round(f * p.line / max(near, _Z_NEAR))))
            closed = len(p.polys[0]) >= 8  # ellipses (wheels) are rings; short point lists are open strokes
            cv2.polylines(ids, pts, closed, pid, thick, cv2.LINE_8, _SHIFT)
        else:
            cv2.fillPoly(ids, pts, pid, cv2.LINE_8, _SHIFT)
        cls[pid] = p.cls
        color[pid] = p.color
        normal[pid] = p.normal
        fine[pid], coarse[pid] = p.fine, p.coarse
        emit[pid] = p.emit
        surf[pid] = p.surf
        wet[pid] = p.wet
        depth[pid] = f * abs(float(p.polys[0][0, 0])) if p.surf == _S_SIDE else max(near, _Z_NEAR)
    m = pid + 1
    return _Raster(
        ids,
        cls[:m],
        color[:m],
        normal[:m],
        fine[:m],
        coarse[:m],
        emit[:m],
        surf[:m],
        depth[:m],
        wet[:m],
        f,
        vh,
        world.cam_h,
        cam_z,
    )


# --------------------------------------------------------------------------------------------------------------------
# Shading
# --------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _noise_fields(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine grain, coarse blotches and rain streaks at twice the image size, made once from a fixed seed; each scene
    takes a window at a seeded offset, which costs nothing and stays deterministic."""
    rng = np.random.default_rng(12345)
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


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def _check_appearances(appearances: Sequence[str]) -> tuple[str, ...]:
    apps = tuple(appearances)
    bad = [a for a in apps if a not in APPEARANCES]
    if bad:
        raise KeyError(f"unknown appearance(s) {bad}; available: {', '.join(APPEARANCES)}")
    return apps


def _render_frame(world: _World, seed: int, height: int, width: int, apps: tuple[str, ...], cam_z: float, frame: int):
    r = _rasterise(world, height, width, cam_z, frame)
    mask = np.take(r.cls, r.ids)
    rng = np.random.default_rng([seed, frame, 7])
    fine_f, coarse_f, _ = _noise_fields(height, width)
    # one material texture for all appearances: the same surface has the same grain in every condition
    tex = np.take(r.fine, r.ids) * _window(fine_f, height, width, rng)
    tex += np.take(r.coarse, r.ids) * _window(coarse_f, height, width, rng)
    tex += 1.0
    sky = r.ids == 0
    sky_any = np.flatnonzero(sky.any(axis=1))
    sky_rows = int(sky_any[-1]) + 1 if len(sky_any) else 0
    sky1 = sky[:sky_rows].astype(np.float32)
    fr = _Frame(
        r,
        cv2.merge([tex, tex, tex]),
        sky_rows,
        cv2.merge([sky1, sky1, sky1]) if sky_rows else np.zeros((0, width, 3), np.float32),
    )
    images = {a: _shade(a, fr, world, np.random.default_rng([seed, frame, APPEARANCES.index(a)])) for a in apps}
    return images, mask


def render_scene(
    seed: int, height: int = 512, width: int = 1024, appearances: Sequence[str] = APPEARANCES
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Render one street scene in several appearances.

    Returns ``({appearance: H x W x 3 uint8 RGB}, mask)`` where ``mask`` is ``H x W`` uint8 Cityscapes train ids
    (0..18; 255 is never produced) shared exactly by every appearance. Deterministic in ``seed``.
    """
    if height < 8 or width < 8:
        raise ValueError(f"render_scene: image size must be at least 8 x 8, got {height} x {width}")
    apps = _check_appearances(appearances)
    world = _build_world(int(seed))
    return _render_frame(world, int(seed), height, width, apps, 0.0, 0)


def render_clip(
    seed: int,
    num_frames: int = 30,
    height: int = 256,
    width: int = 512,
    appearances: Sequence[str] = APPEARANCES,
    speed: float = 1.0,
    progress: bool | None = False,
) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray]]:
    """A forward-driving clip: the camera advances ``speed`` metres per frame through one world, other traffic moves.

    Returns ``({appearance: [H x W x 3 uint8 RGB] * num_frames}, [H x W uint8 train-id mask] * num_frames)``.
    ``progress`` None shows a bar over the frames on a terminal (tqdm's ``disable=None``), False never.
    """
    from tqdm import tqdm

    if num_frames < 1:
        raise ValueError(f"render_clip: num_frames must be >= 1, got {num_frames}")
    apps = _check_appearances(appearances)
    world = _build_world(int(seed), length=num_frames * speed, ego_speed=speed)
    frames: dict[str, list[np.ndarray]] = {a: [] for a in apps}
    masks = []
    steps = tqdm(
        range(num_frames), desc="render clip", unit="frame", leave=False, disable=True if progress is False else None
    )
    for t in steps:
        imgs, mask = _render_frame(world, int(seed), height, width, apps, t * speed, t)
        for a in apps:
            frames[a].append(imgs[a])
        masks.append(mask)
    return frames, masks


def _atomic_write_png(path: Path, image: np.ndarray) -> None:
    """cv2.imwrite to a temporary sibling, then rename: a killed writer never leaves a truncated PNG.

    Unlike :func:`blindnet.io.atomic_write` there is no fsync: scenes are regenerable, thousands are written per
    dataset, and a scene counts as complete only once its label (written last) exists.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    arr = image[:, :, ::-1] if image.ndim == 3 else image
    if not cv2.imwrite(str(tmp), np.ascontiguousarray(arr)):
        raise OSError(f"could not write {tmp}")
    os.replace(tmp, path)


def _write_scene(args: tuple) -> None:
    split_dir, name, sseed, height, width, apps = args
    images, mask = render_scene(sseed, height, width, apps)
    for a in apps:
        _atomic_write_png(split_dir / a / f"{name}.png", images[a])
    _atomic_write_png(split_dir / "labels" / f"{name}.png", mask)  # label last: its presence marks the scene complete


def write_aligned_dataset(
    root: str | Path,
    num_scenes: int,
    seed: int = 0,
    height: int = 512,
    width: int = 1024,
    appearances: Sequence[str] = APPEARANCES,
    split: str = "train",
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Render ``num_scenes`` scenes into the aligned layout (module docstring) and return ``ROOT/<split>``.

    Scene ``i`` uses seed ``SeedSequence([seed, i])``; scenes already on disk are kept, so an interrupted call can
    simply be repeated. ``meta.json`` is written last and marks the split complete.
    """
    from tqdm import tqdm

    apps = _check_appearances(appearances)
    if num_scenes < 1:
        raise ValueError(f"write_aligned_dataset: num_scenes must be >= 1, got {num_scenes}")
    split_dir = Path(root).expanduser() / split
    meta = {
        "layout_version": LAYOUT_VERSION,
        "generator": "blindnet.data.synthetic",
        "appearances": list(apps),
        "scenes": num_scenes,
        "seed": seed,
        "height": height,
        "width": width,
        "label_format": "trainids",
    }
    meta_path = split_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old == meta:
            return split_dir
        meta_path.unlink()  # different request: re-render (existing files with other parameters are overwritten)
        for a in apps:
            for p in (split_dir / a).glob("*.png"):
                p.unlink()
        for p in (split_dir / "labels").glob("*.png"):
            p.unlink()
    for sub in (*apps, "labels"):
        (split_dir / sub).mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(num_scenes):
        name = f"scene_{i:06d}"
        if (split_dir / "labels" / f"{name}.png").is_file() and all(
            (split_dir / a / f"{name}.png").is_file() for a in apps
        ):
            continue
        jobs.append((split_dir, name, _scene_seed(seed, i), height, width, apps))
    bar = tqdm(
        total=num_scenes, initial=num_scenes - len(jobs), desc=f"synthetic {split}", unit="scene", disable=not progress
    )
    if num_workers > 0 and len(jobs) > 1:
        import multiprocessing as mp

        # fork where the platform has it: workers need nothing but numpy/cv2, and spawn would re-import __main__
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(num_workers) as pool:
            for _ in pool.imap_unordered(_write_scene, jobs, chunksize=4):
                bar.update(1)
    else:
        for job in jobs:
            _write_scene(job)
            bar.update(1)
    bar.close()
    tmp = meta_path.with_name(".meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    return split_dir


class ClipFiles(TypedDict):
    """What :func:`write_clip` wrote: one video per appearance and one label PNG per frame."""

    videos: dict[str, Path]
    masks: list[Path]
    frames: int
    fps: int


def write_clip(
    out_dir: str | Path,
    seed: int = 0,
    num_frames: int = 30,
    height: int = 256,
    width: int = 512,
    appearances: Sequence[str] = APPEARANCES,
    fps: int = 10,
    speed: float = 1.0,
    progress: bool | None = False,
) -> ClipFiles:
    """Write ``<appearance>.mp4`` (mp4v) per appearance and ``masks/frame_NNNN.png`` per frame into ``out_dir``.

    Returns :class:`ClipFiles`: ``{"videos": {appearance: Path}, "masks": [Path], "frames": num_frames,
    "fps": fps}``. Each video is read back with cv2.VideoCapture and must contain ``num_frames`` frames, otherwise
    ``OSError`` is raised. ``progress`` as in :func:`render_clip`.
    """
    out = Path(out_dir).expanduser()
    (out / "masks").mkdir(parents=True, exist_ok=True)
    frames, masks = render_clip(seed, num_frames, height, width, appearances, speed, progress)
    videos: dict[str, Path] = {}
    for a, seq in frames.items():
        path = out / f"{a}.mp4"
        tmp = out / f".{a}.tmp.mp4"
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter.fourcc(*"mp4v"), float(fps), (width, height))
        if not writer.isOpened():
            raise OSError(f"cv2.VideoWriter could not open {tmp} with codec mp4v")
        for img in seq:
            writer.write(np.ascontiguousarray(img[:, :, ::-1]))
        writer.release()
        cap = cv2.VideoCapture(str(tmp))
        count = 0
        while cap.read()[0]:
            count += 1
        cap.release()
        if count != num_frames:
            raise OSError(f"{tmp}: wrote {num_frames} frames but cv2.VideoCapture read back {count}")
        os.replace(tmp, path)
        videos[a] = path
    mask_paths: list[Path] = []
    for t, m in enumerate(masks):
        p = out / "masks" / f"frame_{t:04d}.png"
        _atomic_write_png(p, m)
        mask_paths.append(p)
    return {"videos": videos, "masks": mask_paths, "frames": num_frames, "fps": fps}
