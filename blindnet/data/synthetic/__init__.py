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

The package is layered like its pipeline: :mod:`.world` (the scene as 3D parts, from a seed) -> :mod:`.raster`
(projection into an object-id map) -> :mod:`.shading` (one function per appearance) -> :mod:`.dataset` (rendering
scenes and clips, writing datasets).
"""

from __future__ import annotations

from blindnet.data.synthetic.dataset import (
    APPEARANCES,
    LAYOUT_VERSION,
    ClipFiles,
    render_clip,
    render_scene,
    write_aligned_dataset,
    write_clip,
)
from blindnet.data.synthetic.style import ALL_APPEARANCES, LIGHTINGS, STYLES, Style

__all__ = [
    "ALL_APPEARANCES",
    "APPEARANCES",
    "LIGHTINGS",
    "STYLES",
    "Style",
    "LAYOUT_VERSION",
    "ClipFiles",
    "render_clip",
    "render_scene",
    "write_aligned_dataset",
    "write_clip",
]
