"""The 3D world of one scene: a straight street seen from a car, built from a seed as painter-ordered parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from blindnet.classes import CLASS_NAMES

# The package's class table (blindnet.classes.CLASS_NAMES), named in its order for the scene builder.
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY) = range(11)
(PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(11, len(CLASS_NAMES))
if (CLASS_NAMES[POLE], CLASS_NAMES[SKY], CLASS_NAMES[BICYCLE]) != ("pole", "sky", "bicycle"):
    raise ImportError("blindnet.classes.CLASS_NAMES changed order; rename the scene builder's class ids")

# Painter layers: everything in a lower layer is drawn first; inside a layer far objects are drawn first.
_L_GROUND, _L_STRIP, _L_MARK, _L_SIDE, _L_OBJ = range(5)
# How a part's per-pixel depth is computed (for fog): on the ground plane, on a plane X = const, or constant.
_S_CONST, _S_GROUND, _S_SIDE = range(3)


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


# vehicle glass and tyres: one colour for every vehicle, so the classes differ by shape and paint
_GLASS = (0.08, 0.1, 0.13)
_TYRE = (0.05, 0.05, 0.05)


class _Body(NamedTuple):
    """A vehicle's placement and its randomly drawn size and paint, shared by all its parts (metres)."""

    x: float  # centre, left-right
    z0: float  # near end
    w: float
    h: float
    length: float
    color: np.ndarray
    cls: int
    oncoming: bool
    vz: float

    @property
    def bounds(self) -> tuple[float, float, float]:
        """``(x0, x1, z1)``: the left and right sides and the far end, from the centre, width and length."""
        return self.x - self.w / 2, self.x + self.w / 2, self.z0 + self.length


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
        """A pedestrian (or a seated rider) standing at ``(x, z)``: legs, torso, arms, head, maybe hair or a hat."""
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
        self._legs(x, z, s, y0, hip, step, seated, cls, legs, kw)
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

    def _legs(self, x, z, s, y0, hip, step, seated, cls, color, kw) -> None:
        """A person's two legs from ``y0`` to ``hip`` (``s``: body scale): bent to the pedals when ``seated``,
        else in mid-stride by ``step``."""
        if seated:  # legs bent forward/down towards the pedals
            self.add(
                [
                    self.zplane(z, x - 0.2 * s, x - 0.05 * s, y0 + 0.1, hip),
                    self.zplane(z, x + 0.05 * s, x + 0.2 * s, y0 + 0.1, hip),
                ],
                cls,
                color,
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
                color,
                **kw,
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
        """Car / truck / bus / tram seen from behind (same direction) or from the front (oncoming)."""
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
        body = _Body(x, z, w, h, length, color, cls, oncoming, vz)
        if cls == CAR:
            self._car(body)
        else:
            self._large_vehicle(body)

    def _car(self, body: _Body) -> None:
        """A car: body, glass cabin set back from the ends, wheels on the visible side, lamps and number plate."""
        x, z0, w, h, length, color, cls, oncoming, vz = body
        x0, x1, z1 = body.bounds
        kw: dict[str, Any] = dict(layer=_L_OBJ, key=z0, vz=vz)
        self.box(x0, x1, 0.3, 0.95 * h * 0.62, z0, z1, cls, color, key=z0, vz=vz)
        # cabin: a narrower box on top, set back from the ends
        cx0, cx1 = x0 + 0.12 * w, x1 - 0.12 * w
        cz0, cz1 = z0 + 0.22 * length, z1 - 0.25 * length
        yb = 0.95 * h * 0.62
        if x0 > 0:
            self.add(self.xplane(cx0, cz0, cz1, yb, h), cls, _GLASS, normal=(-1, 0, 0), fine=0.02, coarse=0.02, **kw)
        elif x1 < 0:
            self.add(self.xplane(cx1, cz0, cz1, yb, h), cls, _GLASS, normal=(1, 0, 0), fine=0.02, coarse=0.02, **kw)
        self.add(
            np.array([[x0 + 0.05, yb, z0 + 0.05], [x1 - 0.05, yb, z0 + 0.05], [cx1, h, cz0], [cx0, h, cz0]]),
            cls,
            _GLASS,
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
                    _TYRE,
                    normal=(-np.sign(side_x), 0, 0),
                    **kw,
                )
        self.add(
            [
                self.zplane(z0 - 0.01, x0 + 0.05, x0 + 0.3, 0.0, 0.35),
                self.zplane(z0 - 0.01, x1 - 0.3, x1 - 0.05, 0.0, 0.35),
            ],
            cls,
            _TYRE,
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

    def _large_vehicle(self, body: _Body) -> None:
        """Truck, bus or tram: one box with a window band on the visible side and on the near face."""
        x, z0, w, h, length, color, cls, oncoming, vz = body
        x0, x1, z1 = body.bounds
        kw: dict[str, Any] = dict(layer=_L_OBJ, key=z0, vz=vz)
        self.box(x0, x1, 0.35, h, z0, z1, cls, color, key=z0, vz=vz)
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
                _GLASS,
                normal=(-np.sign(side_x), 0, 0),
                emit=(0.6, 0.55, 0.4) if cls != TRUCK else (0, 0, 0),
                fine=0.02,
                coarse=0.02,
                **kw,
            )
            for wz in (z0 + 1.2, z1 - 1.6):
                self.add(
                    self.xellipse(side_x, wz, 0.45, 0.5, 0.45, 12), cls, _TYRE, normal=(-np.sign(side_x), 0, 0), **kw
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
                _GLASS,
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
    walls, fences, poles and vegetation between them, one at a time from ``z0`` to ``z_far``."""
    r = b.rng
    z = z0
    while z < z_far:
        length = r.uniform(8, 28)
        if r.random() < 0.18:  # gap with a wall or a fence (and vegetation behind it)
            z += _street_gap(b, front, side, z)
            continue
        _building(b, front, side, z, length)
        z += length + (r.uniform(0.5, 3) if r.random() < 0.3 else 0.0)


def _street_gap(b: _Builder, front: float, side: float, z: float) -> float:
    """A gap between buildings starting at ``z``: a wall or a fence with a tree behind it; returns its length."""
    r = b.rng
    gap = r.uniform(4, 12)
    if r.random() < 0.5:
        _street_strip(
            b,
            front,
            side,
            z,
            z + gap,
            r.uniform(1.2, 2.8),
            WALL,
            b.jitter((0.55, 0.52, 0.5), 0.2),
            key=z,
            fine=0.12,
            coarse=0.2,
        )
    else:
        _fence(b, front, side, z, z + gap)
    b.tree(front + side * 3, z + gap / 2, scale=1.3, layer=_L_SIDE)
    return gap


def _building(b: _Builder, front: float, side: float, z: float, length: float) -> None:
    """One building from ``z`` to ``z + length``: near face, facade, windows, maybe a door and a low wall or hedge."""
    r = b.rng
    h = r.uniform(7, 32)
    col = np.asarray(
        b.jitter(
            r.choice([(0.62, 0.55, 0.48), (0.55, 0.55, 0.55), (0.7, 0.62, 0.5), (0.5, 0.35, 0.3), (0.75, 0.72, 0.65)]),
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
    _windows(b, front, side, z, length, h)
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
        wall = r.random() < 0.5
        inset, low, high, cls, color, fine, coarse = (
            (0.3, 0.6, 1.2, WALL, (0.6, 0.58, 0.55), 0.1, 0.2)
            if wall
            else (0.5, 0.8, 1.5, VEGETATION, (0.2, 0.35, 0.12), 0.3, 0.3)
        )
        height = r.uniform(low, high)
        x = front - side * inset
        _street_strip(b, x, side, z, z + length, height, cls, b.jitter(color), key=z - 0.01, fine=fine, coarse=coarse)


def _windows(b: _Builder, front: float, side: float, z: float, length: float, h: float) -> None:
    """The window grid on a facade ``length`` long and ``h`` high starting at ``z``; lit ones glow at night."""
    r = b.rng
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
            polys = [b.xplane(front, z1, z1 + win_w, y1, y1 + wh) for y1, z1 in zip(yy[sel], zz[sel])]
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


def _street_strip(
    b: _Builder,
    x: float,
    side: float,
    z0: float,
    z1: float,
    height: float,
    cls: int,
    color: tuple[float, float, float],
    *,
    key: float,
    fine: float,
    coarse: float,
) -> None:
    """A wall or hedge facing the street: the plane X = ``x`` from ``z0`` to ``z1``, ``height`` metres high."""
    b.add(
        b.xplane(x, z0, z1, 0, height),
        cls,
        color,
        layer=_L_SIDE,
        key=key,
        surf=_S_SIDE,
        normal=(-side, 0, 0),
        fine=fine,
        coarse=coarse,
    )


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
        _street_strip(
            b,
            line,
            side,
            z0,
            z_far,
            r.uniform(0.8, 2.0),
            WALL,
            b.jitter((0.6, 0.57, 0.52)),
            key=z0,
            fine=0.1,
            coarse=0.2,
        )
    for zt in np.arange(r.uniform(0, 8), z_far, r.uniform(6, 14)):
        b.tree(line + side * r.uniform(3, 15), zt, scale=r.uniform(1.0, 1.8), layer=_L_SIDE)
