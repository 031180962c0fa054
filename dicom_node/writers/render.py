"""Drawing for the Secondary Capture: the pipeline's overlay (its renderer) over the
windowed image at viewing contrast, and text bands above and below the image (never
over it), sized to the image so that they read on a 1 MP screen.

Text uses Pillow's built-in scalable font (no font files, works offline), which
has no em dash: the marking uses a hyphen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.base import OverlayRenderer

#: Banner text height as a fraction of the image rows (about 2.7 %: ~53 px on a 1955-row CR).
TEXT_HEIGHT = 0.027
MIN_TEXT_PX = 12
#: Text height of the "not analysed" card, relative to its rows.
CARD_TEXT_HEIGHT = 0.06
HEADLINE_SCALE = 1.25
#: Share of the width the banner's lines may take, centred.
TEXT_WIDTH = 0.64
#: Fewer grey levels than this between a display's 0.5 and 99.5 % points: stretched for viewing.
FLAT_SPREAD = 160
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


def _band(lines: list[tuple[str, ImageFont.FreeTypeFont, tuple[int, int, int]]], cols: int, margin: int) -> np.ndarray:
    """Return an opaque band ``cols`` wide holding ``lines``, each centred."""
    heights = [round(font.size * (1 + LINE_GAP)) for _, font, _ in lines]
    image = Image.new("RGB", (cols, 2 * margin + sum(heights)), BANNER_BG)
    draw = ImageDraw.Draw(image)
    y = margin
    for (line, font, colour), step in zip(lines, heights, strict=True):
        draw.text(((cols - font.getlength(line)) / 2, y), line, font=font, fill=colour)
        y += step
    return np.asarray(image)


def _lines(text: BannerText, rows: int, usable: int, text_height: float) -> tuple[list, list]:
    """Return the (top, bottom) lines of ``text``, sized for an image of ``rows`` rows."""
    size = _text_size(rows, usable, text, text_height)
    head_font, body_font = _font(round(size * HEADLINE_SCALE)), _font(size)
    top = [(text.headline, head_font, ALERT if text.alert else CALM)]
    top += [(line, body_font, TEXT) for line in _pack(text.items, body_font, usable)]
    top += [(line, body_font, NOTICE) for line in _pack(text.notices, body_font, usable)]
    bottom = [(line, body_font, TEXT) for line in _pack(text.footer, body_font, usable)]
    return top, bottom


def framed(rgb: np.ndarray, text: BannerText) -> np.ndarray:
    """Return ``rgb`` between two opaque bands, headline, items and notices above and the footer
    below: no image pixel is covered.

    Text height is :data:`TEXT_HEIGHT` of the image rows (headline :data:`HEADLINE_SCALE`
    times that), reduced only where a line would not fit; lines keep to the middle
    :data:`TEXT_WIDTH` of the width, clear of the corners where viewers draw their own text.
    """
    rows, cols = rgb.shape[:2]
    margin = max(4, cols // 60)
    top, bottom = _lines(text, rows, int(cols * TEXT_WIDTH), TEXT_HEIGHT)
    return np.concatenate([_band(top, cols, margin), rgb, *([_band(bottom, cols, margin)] if bottom else [])])


def viewing_contrast(display: np.ndarray) -> np.ndarray:
    """Return ``display`` stretched to its 0.5-99.5 % grey levels when they span fewer than
    :data:`FLAT_SPREAD`: the source's window then covered a range the image does not use (a
    full-range window), which looks flat; otherwise ``display`` unchanged."""
    low, high = (float(v) for v in np.percentile(display, [0.5, 99.5]))
    if high - low >= FLAT_SPREAD or high <= low:
        return display
    return np.clip(np.round((display.astype(np.float32) - low) * 255 / (high - low)), 0, 255).astype(np.uint8)


def overlay(render: OverlayRenderer, display: np.ndarray, masks: Mapping[str, np.ndarray],
            heat: np.ndarray | None, regions: Sequence[np.ndarray], text: BannerText) -> np.ndarray:
    """Return the RGB overlay (uint8, H' x W x 3): what the pipeline's ``render`` draws over ``display``
    at viewing contrast (the chest's: ``heat`` within the lungs, lung and region contours), framed by
    the banner."""
    return framed(render(viewing_contrast(display), masks, heat, regions), text)


def text_card(text: BannerText, shape: tuple[int, int] = (480, 640)) -> np.ndarray:
    """Return a dark RGB card (uint8, ``shape`` x 3) holding only ``text`` from its top, large enough to
    read when a viewer fits the card to its window."""
    rows, cols = shape
    top, bottom = _lines(text, rows, cols - 2 * max(4, cols // 60), CARD_TEXT_HEIGHT)
    card = np.zeros((rows, cols, 3), np.uint8)
    band = _band(top + bottom, cols, max(4, cols // 60))[:rows]
    card[: band.shape[0]] = band
    return card
