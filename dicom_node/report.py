"""The quality report: one static HTML page of what the node did over a window (see
:mod:`dicom_node.quality`), its charts inline as SVG, nothing fetched from elsewhere.

Sections: drift and flags per finding, score distribution against the validation reference, flag
rate over time, gate skip reasons, arrival-to-result latency, volume per sending AE, feedback
agreement. No patient data: findings, rates, fixed reason texts, AE titles and times only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape

from dicom_node import __version__
from dicom_node.charts import histogram, horizontal_bars, lines
from dicom_node.quality import (
    MIN_WINDOW_SCORES,
    PSI_MAJOR,
    PSI_MODERATE,
    FindingFigures,
    ReaderAgreement,
    Window,
    bin_shares,
    percentile,
    time_buckets,
)

#: The bins of the score histograms: 20 of 0.05.
SCORE_EDGES = tuple(i / 20 for i in range(21))
LATENCY_PERCENTILES = (50, 90, 95, 99)
NO_FEEDBACK = "No feedback recorded in this window."

SECTIONS = {
    "drift": "Drift and flags per finding",
    "scores": "Score distribution against the validation reference",
    "flag-rate": "Flag rate over time",
    "skips": "Gate skip reasons",
    "latency": "Arrival-to-result latency",
    "volume": "Volume per sending AE",
    "feedback": "Feedback agreement",
}

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1000px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
.major { background: #f6c6c0; } .moderate { background: #fbe6b8; }
.note { font-size: 12px; color: #555; } figure { margin: 8px 0; }
"""


def psi_reading(value: float | None) -> str:
    """Return the usual reading of a population stability index."""
    if value is None:
        return "no reference"
    return "major shift" if value > PSI_MAJOR else "moderate shift" if value > PSI_MODERATE else "stable"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], row_classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{row_classes[index]}"' if index < len(row_classes) and row_classes[index] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _index(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _reference_above(figures: FindingFigures, threshold: float) -> float | None:
    """The reference's share at or above ``threshold`` when a bin edge falls on it."""
    ref = figures.reference
    if ref is None or not any(abs(edge - threshold) < 1e-9 for edge in ref.edges):
        return None
    return sum(share for edge, share in zip(ref.edges, ref.shares) if edge >= threshold - 1e-9)


def drift_section(window: Window, previous: Window | None) -> str:
    rows, classes = [], []
    for key, figures in window.findings.items():
        threshold = figures.scores[0].threshold
        value = figures.psi
        rows.append([f"{figures.display_name} ({figures.pipeline})", len(figures.scores),
                     f"{sum(figures.probabilities) / len(figures.scores):.3f}", f"{threshold:g}",
                     _share(figures.above_threshold_rate), _share(_reference_above(figures, threshold)),
                     "experimental: never flagged" if figures.experimental else _share(figures.flag_rate),
                     _index(value), psi_reading(value),
                     _index(figures.psi_against(previous.findings.get(key) if previous else None))])
        classes.append("major" if value is not None and value > PSI_MAJOR else
                       "moderate" if value is not None and value > PSI_MODERATE else "")
    if not rows:
        return "<p>No image was analysed in this window.</p>"
    table = _table(["finding", "images", "mean score", "threshold", "at or above threshold",
                    "reference at or above", "flagged", "PSI", "reading", "PSI vs previous window"],
                   rows, classes)
    sources = "".join(f"<li>{escape(f.display_name)} ({escape(f.pipeline)}): {escape(f.reference.source)}</li>"
                      for f in window.findings.values() if f.reference is not None)
    return table + (
        f'<p class="note">PSI: population stability index of the window\'s scores over the reference\'s bins '
        f"(below {PSI_MODERATE} stable, {PSI_MODERATE}–{PSI_MAJOR} moderate, above {PSI_MAJOR} a major shift). "
        f"References:</p><ul class=\"note\">{sources or '<li>none</li>'}</ul>"
        '<p class="note">A reference made from the validation split\'s figures has that split\'s prevalence: '
        "a site with fewer positives shows a PSI from that alone. Read its trend from week to week rather than "
        "its level, and the PSI against the previous window of the same length (10 bins of 0.1, shown from "
        f"{MIN_WINDOW_SCORES} scores in each): a site's own drift. A manifest's "
        "<code>validation.score_histogram</code> gives a finer reference.</p>")


def scores_section(window: Window) -> str:
    charts = []
    for figures in window.findings.values():
        reference = (figures.reference.edges, figures.reference.shares) if figures.reference else None
        charts.append("<figure>" + histogram(
            SCORE_EDGES, bin_shares(figures.probabilities, SCORE_EDGES), reference,
            title=f"{figures.display_name} ({figures.pipeline}): {len(figures.scores)} images",
            threshold=figures.scores[0].threshold, reference_name="validation reference") + "</figure>")
    return "".join(charts) or "<p>No image was analysed in this window.</p>"


def _label(moment: datetime, hourly: bool) -> str:
    return moment.strftime("%d %b %H:00" if hourly else "%d %b")


def flag_rate_section(window: Window) -> str:
    flaggable = [f for f in window.findings.values() if not f.experimental]
    if not flaggable:
        return "<p>No finding that may be flagged was scored in this window.</p>"
    width, starts = time_buckets(window.since, window.until)
    series: dict[str, list[float | None]] = {}
    for figures in flaggable:
        buckets: dict[int, list[bool]] = defaultdict(list)
        for score in figures.scores:
            buckets[int((score.received_at - starts[0]) / width)].append(score.flagged)
        series[figures.display_name] = [sum(b) / len(b) if (b := buckets.get(i)) else None
                                        for i in range(len(starts))]
    hourly = width.total_seconds() < 86400
    return "<figure>" + lines([_label(s, hourly) for s in starts], series, y_max=1.0, percent=True,
                              title=f"Share of analysed images flagged, per {'hour' if hourly else 'day'}",
                              y_label="% flagged") + "</figure>"


def skips_section(window: Window) -> str:
    counts = ", ".join(f"{verdict}: {count}" for verdict, count in sorted(window.verdicts.items()))
    return (f"<p>Instances received: {sum(window.verdicts.values())} ({escape(counts or 'none')}).</p>"
            + "<figure>" + horizontal_bars(dict(window.skip_reasons), title="Instances skipped, by reason")
            + "</figure>")


def latency_section(window: Window) -> str:
    seconds = sorted(s for _, s in window.latencies)
    if not seconds:
        return "<p>No result was delivered for an image received in this window.</p>"
    table = _table(["images", *(f"p{q}" for q in LATENCY_PERCENTILES), "max"],
                   [[len(seconds), *(f"{percentile(seconds, q):.1f} s" for q in LATENCY_PERCENTILES),
                     f"{seconds[-1]:.1f} s"]])
    width, starts = time_buckets(window.since, window.until)
    buckets: dict[int, list[float]] = defaultdict(list)
    for received_at, value in window.latencies:
        buckets[int((received_at - starts[0]) / width)].append(value)
    series = {f"p{q}": [percentile(sorted(b), q) if (b := buckets.get(i)) else None for i in range(len(starts))]
              for q in (50, 95)}
    hourly = width.total_seconds() < 86400
    return (table + '<p class="note">From an instance\'s arrival to the last of its results delivered.</p>'
            + "<figure>" + lines([_label(s, hourly) for s in starts], series, y_label="seconds",
                                 title=f"Arrival to result, per {'hour' if hourly else 'day'} of arrival")
            + "</figure>")


def volume_section(window: Window) -> str:
    return "<figure>" + horizontal_bars(dict(window.volume_by_ae), title="Instances received, by calling AE") \
        + "</figure>"


def feedback_section(rows: Sequence[ReaderAgreement]) -> str:
    """Return the agreement of the readers' verdicts per finding, or :data:`NO_FEEDBACK`."""
    if not rows:
        return f"<p>{NO_FEEDBACK}</p>"
    by_finding: dict[tuple[str, str], list[ReaderAgreement]] = defaultdict(list)
    for row in rows:
        by_finding[(row.pipeline, row.finding)].append(row)
    table = []
    for (pipeline, finding), verdicts in sorted(by_finding.items()):
        flagged = [v for v in verdicts if v.flagged]
        unflagged = [v for v in verdicts if not v.flagged]
        table.append([f"{finding} ({pipeline})", len(verdicts),
                      _share(sum(v.agrees for v in verdicts) / len(verdicts)),
                      _share(sum(v.agrees for v in flagged) / len(flagged) if flagged else None),
                      _share(sum(v.agrees for v in unflagged) / len(unflagged) if unflagged else None)])
    return _table(["finding", "verdicts", "agreement", "on flagged images", "on unflagged images"], table)


def render(window: Window, feedback: Sequence[ReaderAgreement] = (), *, previous: Window | None = None,
           generated_at: datetime) -> str:
    """Return the report of ``window`` as one HTML page, with the drift from the ``previous`` window
    and the readers' ``feedback`` of it."""
    bodies = {
        "drift": drift_section(window, previous), "scores": scores_section(window), "flag-rate": flag_rate_section(window),
        "skips": skips_section(window), "latency": latency_section(window), "volume": volume_section(window),
        "feedback": feedback_section(feedback),
    }
    sections = "".join(f'<section id="{key}"><h2>{escape(SECTIONS[key])}</h2>{body}</section>'
                       for key, body in bodies.items())
    period = f"{window.since:%Y-%m-%d %H:%M} to {window.until:%Y-%m-%d %H:%M} UTC"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>dicom-node quality report</title><style>{STYLE}</style></head><body>"
        f"<h1>dicom-node quality report</h1><p>Instances received {escape(period)}. Generated "
        f"{generated_at:%Y-%m-%d %H:%M} UTC by dicom-node {escape(__version__)}. AI results, not for diagnosis.</p>"
        f"{sections}</body></html>")
