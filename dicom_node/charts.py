"""Plain SVG charts for the quality report: a histogram against a reference, horizontal bars and
lines. Each returns an ``<svg>`` element to inline in HTML (no scripts, no external fetches)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 44
PALETTE = ("#3b6ea5", "#d1762b", "#4b9a5b", "#a0479e", "#8c6d31", "#5f6b7a")
FONT = 'font-family="sans-serif" font-size="11"'


def _svg(body: list[str], title: str, height: int = HEIGHT) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}">'
            f'<text x="{LEFT}" y="16" {FONT} font-weight="bold">{escape(title)}</text>'
            + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {FONT} {extra}>{escape(text)}</text>'


def nice_ceiling(value: float) -> float:
    """Return the smallest of 1, 2, 2.5, 4, 5 or 10 times a power of ten that is at least ``value`` (> 0);
    a quarter of it makes round ticks."""
    power = 10 ** math.floor(math.log10(value))
    return next(power * m for m in (1, 2, 2.5, 4, 5, 10) if power * m >= value * (1 - 1e-9))


def _y_axis(top: float, y_max: float, label: str, scale: float = 1.0) -> list[str]:
    """Return the y axis from 0 to ``y_max`` with four gridlines, tick labels multiplied by ``scale``."""
    bottom, body = HEIGHT - BOTTOM, []
    for step in range(5):
        value = y_max * step / 4 * scale
        y = bottom - (bottom - top) * step / 4
        body.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        body.append(_text(LEFT - 4, y + 4, f"{value:.4g}", "end"))
    body.append(_text(12, (top + bottom) / 2, label, extra=f'transform="rotate(-90 12 {(top + bottom) / 2:.1f})"'))
    return body


def _legend(names: Sequence[str], colours: Sequence[str], dashed: Sequence[bool]) -> list[str]:
    body, x = [], WIDTH - RIGHT
    for name, colour, dash in reversed(list(zip(names, colours, dashed))):
        x -= 14 + 6.5 * len(name)
        style = ' stroke-dasharray="4 3"' if dash else ""
        body.append(f'<line x1="{x:.1f}" x2="{x + 10:.1f}" y1="12" y2="12" stroke="{colour}" '
                    f'stroke-width="3"{style}/>')
        body.append(_text(x + 13, 16, name, "start"))
        x -= 10
    return body


def histogram(edges: Sequence[float], shares: Sequence[float], reference: tuple[Sequence[float], Sequence[float]]
              | None, *, title: str, threshold: float | None = None, reference_name: str = "reference") -> str:
    """Return the density of ``shares`` over bins ``edges`` (of [0, 1]) as bars, the ``reference``
    (its edges and shares) as a dashed step line, and ``threshold`` as a vertical line."""
    def densities(bin_edges: Sequence[float], bin_shares: Sequence[float]) -> list[float]:
        return [s / (b - a) for a, b, s in zip(bin_edges, bin_edges[1:], bin_shares)]

    observed = densities(edges, shares)
    expected = densities(*reference) if reference else []
    top, bottom = TOP + 4, HEIGHT - BOTTOM
    y_max = nice_ceiling(max([*observed, *expected, 1.0]) * 1.05)

    def x_of(score: float) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * score

    def y_of(density: float) -> float:
        return bottom - (bottom - top) * density / y_max

    body = _y_axis(top, y_max, "density")
    for a, b, d in zip(edges, edges[1:], observed):
        body.append(f'<rect x="{x_of(a) + 1:.1f}" y="{y_of(d):.1f}" width="{x_of(b) - x_of(a) - 2:.1f}" '
                    f'height="{bottom - y_of(d):.1f}" fill="{PALETTE[0]}" fill-opacity="0.8"/>')
    if reference:
        ref_edges = reference[0]
        points = []
        for a, b, d in zip(ref_edges, ref_edges[1:], expected):
            points += [f"{x_of(a):.1f},{y_of(d):.1f}", f"{x_of(b):.1f},{y_of(d):.1f}"]
        body.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{PALETTE[1]}" '
                    f'stroke-width="2.5" stroke-dasharray="6 4"/>')
    if threshold is not None:
        body.append(f'<line x1="{x_of(threshold):.1f}" x2="{x_of(threshold):.1f}" y1="{top}" y2="{bottom}" '
                    f'stroke="#c0392b" stroke-width="1.5"/>')
        body.append(_text(x_of(threshold) - 3, top + 10, f"threshold {threshold:g}", "end", 'fill="#c0392b"'))
    for tick in range(11):
        body.append(_text(x_of(tick / 10), bottom + 14, f"{tick / 10:.1f}"))
    body.append(_text((LEFT + WIDTH - RIGHT) / 2, bottom + 32, "score"))
    names, colours, dashed = ["this window"], [PALETTE[0]], [False]
    if reference:
        names, colours, dashed = [*names, reference_name], [*colours, PALETTE[1]], [*dashed, True]
    return _svg(body + _legend(names, colours, dashed), title)


def horizontal_bars(values: Mapping[str, float], *, title: str) -> str:
    """Return one bar per label of ``values``, largest first, each with its value written after it."""
    rows = sorted(values.items(), key=lambda item: (-item[1], item[0]))
    row_height, label_width = 22, 380
    height = TOP + 8 + row_height * max(len(rows), 1)
    most = max([v for _, v in rows] or [1]) or 1
    span = WIDTH - RIGHT - label_width - 60
    body = []
    for index, (label, value) in enumerate(rows):
        y = TOP + 8 + index * row_height
        shown = label if len(label) <= 64 else label[:63] + "…"
        body.append(_text(label_width - 6, y + 14, shown, "end", f'data-label="{escape(label)}"'))
        width = span * value / most
        body.append(f'<rect x="{label_width}" y="{y + 3}" width="{width:.1f}" height="{row_height - 6}" '
                    f'fill="{PALETTE[0]}"/>')
        body.append(_text(label_width + width + 4, y + 14, f"{value:g}", "start"))
    if not rows:
        body.append(_text(WIDTH / 2, TOP + 20, "none in this window"))
    return _svg(body, title, height)


def lines(x_labels: Sequence[str], series: Mapping[str, Sequence[float | None]], *, title: str,
          y_label: str, y_max: float | None = None, percent: bool = False) -> str:
    """Return one line per entry of ``series`` over the ``x_labels`` (None: a gap), with markers."""
    top, bottom = TOP + 4, HEIGHT - BOTTOM
    values = [v for ys in series.values() for v in ys if v is not None]
    ceiling = y_max or nice_ceiling(max(values or [1.0]) * 1.05 or 1.0)
    n = max(len(x_labels) - 1, 1)

    def x_of(index: int) -> float:
        return LEFT + 8 + (WIDTH - LEFT - RIGHT - 16) * index / n

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * value / ceiling

    body = _y_axis(top, ceiling, y_label, 100 if percent else 1)
    every = max(1, len(x_labels) // 8)
    for i, label in enumerate(x_labels):
        if i % every == 0:
            body.append(_text(x_of(i), bottom + 14, label))
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    for colour, ys in zip(colours, series.values()):
        segment: list[str] = []
        for i, v in enumerate([*ys, None]):
            if v is not None:
                segment.append(f"{x_of(i):.1f},{y_of(v):.1f}")
                body.append(f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="2.5" fill="{colour}"/>')
            elif segment:
                body.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{colour}" stroke-width="2"/>')
                segment = []
    return _svg(body + _legend(list(series), colours, [False] * len(series)), title)
