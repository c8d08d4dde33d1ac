"""The public API: render scenes and clips in aligned appearances, and write them as datasets on disk."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import cv2
import numpy as np

from blindnet.data.synthetic.raster import _Raster, _rasterise
from blindnet.data.synthetic.shading import _Frame, _noise_fields, _shade, _window
from blindnet.data.synthetic.style import (
    ALL_APPEARANCES,
    LIGHTINGS,
    STYLES,
    Style,
    apply_camera,
    split_appearance,
    styled_albedo,
)
from blindnet.data.synthetic.world import _build_world, _World
from blindnet.io import atomic_write, write_text

#: The appearances of style ``a`` (the renderer's own look), one per lighting; other styles: ``ALL_APPEARANCES``.
APPEARANCES: tuple[str, ...] = LIGHTINGS
LAYOUT_VERSION = 1


def _scene_seed(seed: int, index: int) -> int:
    """Independent per-scene seed (SeedSequence mixing, so nearby seeds give unrelated scenes)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _check_appearances(appearances: Sequence[str]) -> tuple[str, ...]:
    apps = tuple(appearances)
    bad = [a for a in apps if a not in ALL_APPEARANCES]
    if bad:
        raise KeyError(f"unknown appearance(s) {bad}; available: {', '.join(ALL_APPEARANCES)}")
    return apps


def _styled_frame(r: _Raster, seed: int, frame: int, style: Style) -> _Frame:
    """What every lighting of one style shares in a frame: the albedo table and the material texture."""
    height, width = r.ids.shape
    if style.palette_seed is not None:
        r = dataclasses.replace(r, color=styled_albedo(r.color, r.cls, style))
    rng = np.random.default_rng([seed, frame, 7])
    fine_f, coarse_f, _ = _noise_fields(height, width, style.noise_seed)
    # one material texture for all lightings: the same surface has the same grain in every condition
    tex = np.take(r.fine * style.texture_gain, r.ids) * _window(fine_f, height, width, rng)
    tex += np.take(r.coarse * style.texture_gain, r.ids) * _window(coarse_f, height, width, rng)
    tex += 1.0
    sky = r.ids == 0
    sky_any = np.flatnonzero(sky.any(axis=1))
    sky_rows = int(sky_any[-1]) + 1 if len(sky_any) else 0
    sky1 = sky[:sky_rows].astype(np.float32)
    return _Frame(
        r,
        cv2.merge([tex, tex, tex]),
        sky_rows,
        cv2.merge([sky1, sky1, sky1]) if sky_rows else np.zeros((0, width, 3), np.float32),
    )


def _render_frame(
    world: _World, seed: int, height: int, width: int, apps: tuple[str, ...], cam_z: float, frame: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    r = _rasterise(world, height, width, cam_z, frame)
    mask = np.take(r.cls, r.ids)
    frames: dict[str, _Frame] = {}
    images: dict[str, np.ndarray] = {}
    for a in apps:
        style_name, lighting = split_appearance(a)
        style = STYLES[style_name]
        if style_name not in frames:
            frames[style_name] = _styled_frame(r, seed, frame, style)
        img = _shade(
            lighting, frames[style_name], world, np.random.default_rng([seed, frame, LIGHTINGS.index(lighting)])
        )
        images[a] = apply_camera(img, style, np.random.default_rng([seed, frame, 11, ALL_APPEARANCES.index(a)]))
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


def _write_png(path: Path, image: np.ndarray) -> None:
    """A PNG through the I/O floor's atomic write, without fsync: scenes are regenerable, thousands are written per
    dataset, and a scene counts as complete only once its label (written last) exists."""
    arr = image[:, :, ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.tobytes()), durable=False)


def _write_scene(args: tuple) -> None:
    split_dir, name, sseed, height, width, apps = args
    images, mask = render_scene(sseed, height, width, apps)
    for a in apps:
        _write_png(split_dir / a / f"{name}.png", images[a])
    _write_png(split_dir / "labels" / f"{name}.png", mask)  # label last: its presence marks the scene complete


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
    write_text(meta_path, json.dumps(meta, indent=2))
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
        _write_png(p, m)
        mask_paths.append(p)
    return {"videos": videos, "masks": mask_paths, "frames": num_frames, "fps": fps}
