"""Drawing for the Secondary Capture: the heat-map blended over the windowed image,
contours, and a text banner sized to the image so that it reads on a 1 MP screen.

Text uses Pillow's built-in scalable font (no font files, works offline), which
has no em dash: the marking uses a hyphen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.chest_xray.overlay import render_overlay

#: Banner text height as a fraction of the image rows (about 2.7 %: ~53 px on a 1955-row CR).
TEXT_HEIGHT = 0.027
MIN_TEXT_PX = 12
#: Text height of the "not analysed" card, relative to its rows.
CARD_TEXT_HEIGHT = 0.06
HEADLINE_SCALE = 1.25
#: Space between lines as a fraction of the text height.
LINE_GAP = 0.35
ALERT = (255, 80, 60)
CALM = (120, 230, 120)
TEXT = (255, 255, 255)
NOTICE = (255, 215, 0)
BANNER_BG = (0, 0, 0)


@dataclass(frozen=True)
class BannerText:
    """What the banner says: a coloured headline, items packed into lines and notices at the top;
    the footer at the bottom."""

    headline: str
    alert: bool
    items: Sequence[str]
    notices: Sequence[str]
    footer: Sequence[str] = ()


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _pack(items: Sequence[str], font: ImageFont.FreeTypeFont, width: int, sep: str = "   |   ") -> list[str]:
    """Return ``items`` greedily packed into lines no wider than ``width`` pixels."""
    lines: list[str] = []
    for item in items:
        candidate = f"{lines[-1]}{sep}{item}" if lines else item
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(item)
    return lines


def _text_size(rows: int, usable: int, text: BannerText, text_height: float) -> int:
    """Return the body text height: ``text_height`` of ``rows``, reduced only where a line would not fit."""
    size = max(MIN_TEXT_PX, round(text_height * rows))
    needed = max([_font(size).getlength(s) for s in (*text.items, *text.notices, *text.footer)]
                 + [_font(round(size * HEADLINE_SCALE)).getlength(text.headline)])
    if needed > usable:  # text width grows linearly with size
        size = max(MIN_TEXT_PX, int(size * usable / needed))
    return size


def _band(draw: ImageDraw.ImageDraw, lines: list[tuple[str, ImageFont.FreeTypeFont, tuple[int, int, int]]],
          top: int | None, cols: int, rows: int, margin: int) -> None:
    """Draw ``lines`` on an opaque band across the image: from ``top``, or up from the bottom when None."""
    heights = [round(font.size * (1 + LINE_GAP)) for _, font, _ in lines]
    height = 2 * margin + sum(heights)
    y = top if top is not None else rows - height
    draw.rectangle((0, y, cols, y + height), fill=BANNER_BG)
    y += margin
    for (line, font, colour), step in zip(lines, heights, strict=True):
        draw.text((margin, y), line, font=font, fill=colour)
        y += step


def draw_banner(rgb: np.ndarray, text: BannerText, text_height: float = TEXT_HEIGHT) -> np.ndarray:
    """Return ``rgb`` with ``text`` burned in: headline, items and notices in a band across the top,
    the footer in a band across the bottom.

    Text height is ``text_height`` of the rows (headline :data:`HEADLINE_SCALE` times that),
    reduced only where a single line would not fit the width.
    """
    rows, cols = rgb.shape[:2]
    margin = max(4, cols // 60)
    usable = cols - 2 * margin
    size = _text_size(rows, usable, text, text_height)
    head_font, body_font = _font(round(size * HEADLINE_SCALE)), _font(size)
    top = [(text.headline, head_font, ALERT if text.alert else CALM)]
    top += [(line, body_font, TEXT) for line in _pack(text.items, body_font, usable)]
    top += [(line, body_font, NOTICE) for line in _pack(text.notices, body_font, usable)]
    bottom = [(line, body_font, TEXT) for line in _pack(text.footer, body_font, usable)]

    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    _band(draw, top, 0, cols, rows, margin)
    if bottom:
        _band(draw, bottom, None, cols, rows, margin)
    return np.asarray(image)


def overlay(display: np.ndarray, lung_mask: np.ndarray, heat: np.ndarray | None,
            regions: Sequence[np.ndarray], text: BannerText) -> np.ndarray:
    """Return the RGB overlay (uint8, H x W x 3): ``display`` in grey, ``heat`` blended within the lungs,
    the lung and region contours, and the banner."""
    return draw_banner(render_overlay(display, lung_mask, heat, regions), text)


def text_card(text: BannerText, shape: tuple[int, int] = (480, 640)) -> np.ndarray:
    """Return a dark RGB card (uint8, ``shape`` x 3) holding only ``text``, large enough to read when
    a viewer fits the card to its window."""
    return draw_banner(np.zeros((*shape, 3), np.uint8), text, text_height=CARD_TEXT_HEIGHT)
