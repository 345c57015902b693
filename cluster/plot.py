"""Dependency-free plots (PIL only): the demo's loss curve, `sit sweep`'s bar chart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start)."""
    csum = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def line_plot(
    x: np.ndarray,
    series: dict[str, np.ndarray],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    marks: dict[str, float] | None = None,
    size: tuple[int, int] = (720, 420),
) -> Path:
    """Draw ``series`` (name -> y values over ``x``) with axes, ticks, a legend and vertical ``marks``."""
    colors = [(120, 160, 220), (20, 60, 160), (200, 60, 40), (40, 140, 60)]
    font = ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 70, 20, 36, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    x = np.asarray(x, dtype=np.float64)
    ys = np.concatenate([np.asarray(v, dtype=np.float64) for v in series.values()])
    ys = ys[np.isfinite(ys)]
    x0, x1 = float(x.min()), float(max(x.max(), x.min() + 1))
    y0, y1 = float(ys.min()), float(ys.max())
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def px(xv: float, yv: float) -> tuple[float, float]:
        return (
            left + (xv - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (yv - y0) / (y1 - y0) * (height - top - bottom),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for frac in np.linspace(0, 1, 5):
        xv, yv = x0 + frac * (x1 - x0), y0 + frac * (y1 - y0)
        tx, _ = px(xv, y0)
        _, ty = px(x0, yv)
        draw.line([tx, height - bottom, tx, height - bottom + 4], fill="black")
        draw.text((tx - 12, height - bottom + 6), f"{xv:.0f}", fill="black", font=font)
        draw.line([left - 4, ty, left, ty], fill="black")
        draw.text((6, ty - 6), f"{yv:.3g}", fill="black", font=font)
    for name, at in (marks or {}).items():
        mx, _ = px(at, y0)
        draw.line([mx, top, mx, height - bottom], fill=(150, 150, 150), width=1)
        draw.text((mx + 3, top + 3), name, fill=(90, 90, 90), font=font)
    for i, (name, values) in enumerate(series.items()):
        color = colors[i % len(colors)]
        points = [px(a, b) for a, b in zip(x, values, strict=True) if np.isfinite(b)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2 if i else 1)
        lx, ly = width - right - 200, top + 12 + 14 * i
        draw.line([lx, ly, lx + 16, ly], fill=color, width=2)
        draw.text((lx + 22, ly - 6), name, fill=color, font=font)
    draw.text((left, 10), title, fill="black", font=font)
    draw.text(((width - len(xlabel) * 6) / 2, height - 18), xlabel, fill="black", font=font)
    draw.text((6, top - 18), ylabel, fill="black", font=font)
    image.save(path)
    return Path(path)


def bar_chart(
    labels: list[str],
    values: list[float],
    path: str | Path,
    title: str,
    xlabel: str,
    groups: list[int] | None = None,
    bar: int = 14,
) -> Path:
    """Horizontal bars, one per label (top to bottom), with the value printed after each bar;
    ``groups`` picks each bar's colour (e.g. the sampler); values over more than two decades are
    drawn on a log scale (said in the axis label); non-finite values draw no bar."""
    colors = [(20, 60, 160), (200, 60, 40), (40, 140, 60), (150, 90, 200), (220, 150, 20), (90, 90, 90)]
    font = ImageFont.load_default()
    label_width = 8 + 6 * max(len(s) for s in labels)
    width, top, bottom, right = label_width + 520, 36, 40, 70
    height = top + bottom + bar * len(labels)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    finite = [v for v in values if np.isfinite(v) and v > 0]
    span = width - label_width - right
    log = bool(finite) and max(finite) / min(finite) > 100  # values over decades: log scale
    if log:
        lo, hi = np.floor(np.log10(min(finite))) - 0.3, np.log10(max(finite))
        xlabel += f" (log scale, from {10**lo:.3g})"

        def length(v: float) -> float:
            return span * (np.log10(v) - lo) / (hi - lo)
    else:
        vmax = max(finite) if finite else 1.0

        def length(v: float) -> float:
            return span * v / vmax

    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * bar
        draw.text((6, y + 1), label, fill="black", font=font)
        if np.isfinite(value) and value > 0:
            x1 = label_width + length(value)
            color = colors[(groups[i] if groups else 0) % len(colors)]
            draw.rectangle([label_width, y + 2, x1, y + bar - 2], fill=color)
            draw.text((x1 + 4, y + 1), f"{value:.3g}", fill="black", font=font)
        else:
            draw.text((label_width + 4, y + 1), "failed", fill=(200, 0, 0), font=font)
    draw.line([label_width, top, label_width, height - bottom], fill="black")
    draw.text((6, 10), title, fill="black", font=font)
    draw.text((label_width, height - bottom + 12), xlabel, fill="black", font=font)
    image.save(path)
    return Path(path)
