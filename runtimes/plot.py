"""A small line plot written straight to PNG (zlib + struct), for the loss curve.

No plotting library: a loss curve needs axes, a polyline and three numbers, and
matplotlib would add tens of megabytes and a second import-time cost to every
training job. Numbers use a 3x5 pixel font, scaled up.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
AXIS: Color = (90, 90, 90)
GRID: Color = (225, 225, 225)
LINE: Color = (31, 119, 180)

_FONT = {  # 3x5 glyphs, one 3-bit row each, top to bottom
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7), "+": (0, 2, 7, 2, 0), " ": (0, 0, 0, 0, 0),
}


class Canvas:
    """An RGB pixel buffer with just enough drawing for a line plot."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i: i + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, thick: int = 1) -> None:
        """Bresenham's line, ``thick`` pixels wide."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(thick):
                for oy in range(thick):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: Color, scale: int = 2) -> None:
        """Draw digits (and ``.-e+``) with the top-left corner at ``x, y``."""
        for char in text:
            for row, bits in enumerate(_FONT.get(char, _FONT[" "])):
                for col in range(3):
                    if bits & (4 >> col):
                        for sx in range(scale):
                            for sy in range(scale):
                                self.set(x + col * scale + sx, y + row * scale + sy, color)
            x += 4 * scale

    def png(self) -> bytes:
        """The canvas as PNG bytes (8-bit RGB, no filtering)."""
        stride = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride])
                       for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _label(value: float) -> str:
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-2):
        return f"{value:.2e}"
    return f"{value:.3f}"


def line_plot_png(xs: Sequence[float], ys: Sequence[float], width: int = 640,
                  height: int = 360) -> bytes:
    """A PNG of ``ys`` against ``xs``: axes, light grid, the curve, min/max/last-x labels."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 90, width - 20, 20, height - 40
    points = [(x, y) for x, y in zip(xs, ys, strict=False)
              if math.isfinite(x) and math.isfinite(y)]
    for i in range(5):
        gy = top + i * (bottom - top) // 4
        canvas.line(left, gy, right, gy, GRID)
    canvas.line(left, top, left, bottom, AXIS)
    canvas.line(left, bottom, right, bottom, AXIS)
    if not points:
        return canvas.png()
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or 1.0

    def to_px(x: float, y: float) -> tuple[int, int]:
        return (left + round((x - x_lo) / x_span * (right - left)),
                bottom - round((y - y_lo) / y_span * (bottom - top)))

    pixels = [to_px(x, y) for x, y in points]
    for (x0, y0), (x1, y1) in zip(pixels, pixels[1:], strict=False):
        canvas.line(x0, y0, x1, y1, LINE, thick=2)
    if len(pixels) == 1:
        canvas.line(*pixels[0], *pixels[0], LINE, thick=3)
    canvas.text(4, top, _label(y_hi), AXIS)
    canvas.text(4, bottom - 10, _label(y_lo), AXIS)
    canvas.text(left, bottom + 12, _label(x_lo) if x_lo % 1 else str(int(x_lo)), AXIS)
    last = str(int(x_hi)) if not x_hi % 1 else _label(x_hi)
    canvas.text(right - 8 * len(last), bottom + 12, last, AXIS)
    return canvas.png()


def write_loss_plot(path: Path, steps: Sequence[float], losses: Sequence[float]) -> Path:
    """Write the loss curve PNG to ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(line_plot_png(steps, losses))
    tmp.replace(path)
    return path
