"""Projection and rasterisation of a world into an object-id map (one per frame), with per-pixel depth and surface facts."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from blindnet.data.synthetic.world import _S_SIDE, SKY, _World

_SHIFT = 3  # sub-pixel bits for cv2 drawing, so thin far poles do not jitter by whole pixels
_Z_NEAR = 0.3


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
