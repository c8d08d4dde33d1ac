"""Legends and titles drawn into pictures, and the demo's legend table built from the same entries."""

from __future__ import annotations

import numpy as np

from blindnet.classes import palette
from blindnet.demo.views import legend_frame
from blindnet.legend import draw_legend, legend_entries, with_legend
from blindnet.segment import contact_sheet


def _labels() -> np.ndarray:
    labels = np.zeros((20, 30), np.uint8)  # road
    labels[:5] = 10  # sky: a quarter
    labels[5:7, :3] = 13  # car: 6 pixels
    return labels


def test_entries_are_the_classes_present_largest_first() -> None:
    entries = legend_entries(_labels())
    assert [e.name for e in entries] == ["road", "sky", "car"]
    assert entries[1].share == 0.25 and entries[1].colour == tuple(int(v) for v in palette(19)[10])


def test_the_drawn_legend_shows_each_colour_as_a_swatch() -> None:
    band = draw_legend(legend_entries(_labels()), 300)
    assert band.shape[1] == 300 and band.dtype == np.uint8
    colours = {tuple(c) for c in band.reshape(-1, 3)}
    for e in legend_entries(_labels()):
        assert e.colour in colours  # each swatch is filled with its class colour
    # a narrow picture wraps the entries onto more rows
    assert draw_legend(legend_entries(_labels()), 90).shape[0] > band.shape[0]


def test_overlay_with_legend_keeps_the_picture_and_adds_a_band() -> None:
    picture = np.full((20, 30, 3), 7, np.uint8)
    out = with_legend(picture, _labels())
    assert out.shape[1] == 30 and out.shape[0] > 20 and np.array_equal(out[:20], picture)


def test_contact_sheet_has_titles_above_and_legend_below() -> None:
    rgb = np.full((20, 30, 3), 7, np.uint8)
    pred, truth = _labels(), np.full((20, 30), 13, np.uint8)
    sheet = contact_sheet([(rgb, pred, truth), (rgb, truth, pred)], 19)
    grid_h, width = 2 * 20 + 4, 3 * 30 + 2 * 4
    assert sheet.shape[1] == width and sheet.shape[0] > grid_h
    title_rows = next(i for i in range(sheet.shape[0]) if (sheet[i, :30] == 7).all())
    assert title_rows > 0 and (sheet[:title_rows] != 255).any()  # text drawn in the band above the first row
    below = sheet[title_rows + grid_h :]
    assert below.shape[0] > 0 and tuple(palette(19)[13]) in {tuple(c) for c in below.reshape(-1, 3)}


def test_the_demo_table_lists_the_same_entries_in_the_same_order() -> None:
    entries = legend_entries(_labels())
    frame = legend_frame({e.name: e.share for e in reversed(entries)}, 19)
    assert list(frame["class"]) == [e.name for e in entries]
    assert list(frame["colour"]) == ["#{:02x}{:02x}{:02x}".format(*e.colour) for e in entries]
