"""A dependency-free loss-curve PNG: train and val loss against step, drawn on a numpy canvas and written
with zlib. Axis ticks carry numbers in a tiny built-in 3x5 pixel font (scaled 2x).

>>> write_loss_curve("loss.png", [(0, 8.3), (10, 6.1)], [(0, 8.2), (10, 6.3)])
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from .fileio import atomic_write

# 3x5 glyphs, rows top to bottom, 3 bits per row (MSB = left pixel)
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "k": (4, 5, 6, 5, 5), "e": (7, 5, 7, 4, 7),
    "t": (2, 7, 2, 2, 3), "r": (0, 6, 5, 4, 4), "a": (0, 3, 5, 5, 3), "i": (2, 0, 2, 2, 2), "n": (0, 6, 5, 5, 5),
    "v": (0, 5, 5, 5, 2), "l": (2, 2, 2, 2, 3), "s": (0, 3, 6, 1, 6), "o": (0, 2, 5, 5, 2), "p": (0, 6, 5, 6, 4),
}
TRAIN_RGB, VAL_RGB, AXIS_RGB = (31, 119, 180), (255, 127, 14), (60, 60, 60)


def _text(img: np.ndarray, x: int, y: int, s: str, rgb, scale: int = 2) -> None:
    for ch in s:
        rows = _FONT.get(ch)
        if rows:
            for r, bits in enumerate(rows):
                for c in range(3):
                    if bits >> (2 - c) & 1:
                        y0, x0 = y + r * scale, x + c * scale
                        img[max(y0, 0):y0 + scale, max(x0, 0):x0 + scale] = rgb
        x += 4 * scale


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, rgb, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    H, W, _ = img.shape
    for dx in range(width):
        for dy in range(width):
            ok = (xs + dx < W) & (ys + dy < H) & (xs + dx >= 0) & (ys + dy >= 0)
            img[ys[ok] + dy, xs[ok] + dx] = rgb


def _fmt(v: float) -> str:
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def _png(img: np.ndarray) -> bytes:
    H, W, _ = img.shape
    raw = b"".join(b"\0" + img[y].tobytes() for y in range(H))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_loss_curve(path, train: list[tuple[int, float]], val: list[tuple[int, float]] | None = None,
                     width: int = 800, height: int = 480) -> None:
    """Plot (step, loss) series: train in blue, val in orange (with dots), y ticks at 5 levels."""
    val = val or []
    pts = [p for p in train + val if np.isfinite(p[1])]
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 20, 40
    if pts:
        steps = [p[0] for p in pts]
        losses = [p[1] for p in pts]
        x_lo, x_hi = min(steps), max(max(steps), min(steps) + 1)
        y_lo, y_hi = min(losses), max(losses)
        pad = 0.05 * (y_hi - y_lo or 1.0)
        y_lo, y_hi = y_lo - pad, y_hi + pad

        def X(s: float) -> float:
            return left + (s - x_lo) / (x_hi - x_lo) * (width - left - right)

        def Y(v: float) -> float:
            return top + (y_hi - v) / (y_hi - y_lo) * (height - top - bottom)

        for i in range(5):  # y grid and labels
            v = y_lo + (y_hi - y_lo) * i / 4
            y = int(Y(v))
            img[y, left:width - right] = (225, 225, 225)
            _text(img, 4, y - 5, _fmt(v), AXIS_RGB)
        for i in range(5):  # x labels
            s = x_lo + (x_hi - x_lo) * i / 4
            _text(img, int(X(s)) - 10, height - bottom + 10, str(int(round(s))), AXIS_RGB)
        _text(img, width - right - 200, height - bottom + 26, "step", AXIS_RGB)
        for i, (name, rgb) in enumerate((("train loss", TRAIN_RGB), ("val loss", VAL_RGB))):
            y = top + 8 + 16 * i
            img[y:y + 8, width - right - 110:width - right - 98] = rgb
            _text(img, width - right - 92, y - 1, name, AXIS_RGB)
        for series, rgb in ((train, TRAIN_RGB), (val, VAL_RGB)):
            good = [(s, v) for s, v in series if np.isfinite(v)]
            for (s0, v0), (s1, v1) in zip(good, good[1:]):
                _line(img, X(s0), Y(v0), X(s1), Y(v1), rgb)
            if rgb == VAL_RGB:
                for s, v in good:
                    img[max(int(Y(v)) - 3, 0):int(Y(v)) + 4, max(int(X(s)) - 3, 0):int(X(s)) + 4] = rgb
    img[top:height - bottom, left] = AXIS_RGB
    img[height - bottom, left:width - right] = AXIS_RGB
    with atomic_write(path) as f:
        f.write(_png(img))
