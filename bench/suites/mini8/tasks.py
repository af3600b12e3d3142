"""The eight procedural image-classification tasks of mini8.

Each task is an offline analogue of one dataset of the real eight-task benchmark, with its
own label space and visual statistics. A generator maps (n, torch.Generator) to uint8 RGB
images of shape (n, 3, 32, 32) and int64 labels; it is batched (signed-distance fields on a
pixel grid) and deterministic given the generator's seed. The drawing arithmetic runs in the ``dtype`` of
:func:`generate`: in float32 CPUs whose vector kernels round differently (torch's generic kernels, an AVX2-only
AMD EPYC) draw some pixels differently; in float64 the bytes measured the same under every kernel tried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

SIZE = 32


def _grid(dtype):
    return torch.meshgrid(torch.arange(SIZE, dtype=dtype) + 0.5, torch.arange(SIZE, dtype=dtype) + 0.5, indexing="ij")


# the pixel grid of the running generate() call, in its dtype
_Y, _X = _grid(torch.float32)


# ---------------------------------------------------------------- random helpers
def _u(g, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _randint(g, n, hi):
    return torch.randint(0, hi, (n,), generator=g)


def _colors(g, n, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(n, 3, generator=g)


def _b(t):  # (n,) -> (n, 1, 1) for broadcasting over the pixel grid
    return t.view(-1, 1, 1)


def _smooth_noise(g, n, cells, channels=1):
    """Low-frequency noise in [0, 1]: random values on a coarse grid, bilinearly upsampled."""
    coarse = torch.rand(n, channels, cells, cells, generator=g)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------- drawing primitives (coverage in [0, 1])
def _cover(sdf):
    return (0.5 - sdf).clamp(0, 1)


def _local(cx, cy, angle=None):
    x, y = _X - _b(cx), _Y - _b(cy)
    if angle is None:
        return x, y
    c, s = torch.cos(_b(angle)), torch.sin(_b(angle))
    return c * x + s * y, -s * x + c * y


def _circle(cx, cy, r):
    x, y = _local(cx, cy)
    return _cover(torch.sqrt(x * x + y * y) - _b(r))


def _ring(cx, cy, r, w):
    x, y = _local(cx, cy)
    return _cover((torch.sqrt(x * x + y * y) - _b(r)).abs() - _b(w))


def _box(cx, cy, hw, hh, angle=None):
    x, y = _local(cx, cy, angle)
    return _cover(torch.maximum(x.abs() - _b(hw), y.abs() - _b(hh)))


def _ngon(cx, cy, r, sides, angle):
    """Regular polygon as the intersection of half-planes."""
    x, y = _local(cx, cy)
    d = None
    for i in range(sides):
        a = _b(angle) + 2 * math.pi * i / sides
        di = x * torch.cos(a) + y * torch.sin(a) - _b(r) * math.cos(math.pi / sides)
        d = di if d is None else torch.maximum(d, di)
    return _cover(d)


def _segment_dist(ax, ay, bx, by):
    px, py = _X - _b(ax), _Y - _b(ay)
    dx, dy = _b(bx - ax), _b(by - ay)
    t = ((px * dx + py * dy) / (dx * dx + dy * dy + 1e-6)).clamp(0, 1)
    return torch.sqrt((px - t * dx) ** 2 + (py - t * dy) ** 2)


def _paint(img, alpha, color):
    """Alpha-composite a (n, 3) color with coverage (n, H, W) onto img (n, 3, H, W)."""
    a = alpha.unsqueeze(1)
    return img * (1 - a) + color.view(-1, 3, 1, 1) * a


def _fill(color):
    return color.view(-1, 3, 1, 1).expand(-1, 3, SIZE, SIZE).clone()


def _to_uint8(img, g, noise=0.03):
    img = img + noise * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- seven-segment digits
# Segments on a unit cell (x in [0,1], y in [0,2]): a top, b top-right, c bottom-right,
# d bottom, e bottom-left, f top-left, g middle.
_SEGMENTS = torch.tensor([[0, 0, 1, 0], [1, 0, 1, 1], [1, 1, 1, 2], [0, 2, 1, 2],
                          [0, 1, 0, 2], [0, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.float32)
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]
_DIGIT_MASK = torch.tensor([[ch in segs for ch in "abcdefg"] for segs in _DIGIT_SEGMENTS])


def _digit_coverage(g, digits, cx, cy, height):
    """Hand-drawn-looking seven-segment digits: jittered, sheared, variable stroke width."""
    n = digits.numel()
    width = height * _u(g, n, 0.45, 0.6)
    shear = _u(g, n, -0.35, 0.35)
    thick = _u(g, n, 1.0, 2.2) * height / 20
    pts = _SEGMENTS.to(_X.dtype).view(1, 7, 2, 2).expand(n, 7, 2, 2).clone()
    pts = pts + 0.08 * torch.randn(pts.shape, generator=g)
    ys = (pts[..., 1] - 1) * _b(height / 2).view(-1, 1, 1)[:, :, :1]
    xs = (pts[..., 0] - 0.5) * width.view(-1, 1, 1) - shear.view(-1, 1, 1) * ys
    xs, ys = xs + cx.view(-1, 1, 1), ys + cy.view(-1, 1, 1)
    dist = torch.stack([_segment_dist(xs[:, s, 0], ys[:, s, 0], xs[:, s, 1], ys[:, s, 1]) for s in range(7)], 1)
    on = _DIGIT_MASK[digits].view(n, 7, 1, 1)
    dist = torch.where(on, dist, torch.full_like(dist, 1e3)).min(1).values
    return _cover(dist - _b(thick))


def digits(n, g):
    """MNIST analogue: one white digit on black."""
    y = _randint(g, n, 10)
    a = _digit_coverage(g, y, _u(g, n, 13, 19), _u(g, n, 13, 19), _u(g, n, 16, 24))
    img = a.unsqueeze(1).expand(-1, 3, -1, -1)
    return _to_uint8(img, g, 0.05), y


def house_numbers(n, g):
    """SVHN analogue: a colored digit on a textured, colored background (house-number plates)."""
    y = _randint(g, n, 10)
    bg, fg = _colors(g, n), _colors(g, n)
    fg = torch.where((fg - bg).abs().sum(1, keepdim=True) < 1.2, 1 - bg, fg)
    img = _fill(bg) * (0.85 + 0.3 * _smooth_noise(g, n, 4))
    img = _paint(img, _digit_coverage(g, y, _u(g, n, 15, 17), _u(g, n, 15, 17), _u(g, n, 22, 27)), fg)
    return _to_uint8(img, g, 0.06), y


def signs(n, g):
    """GTSRB analogue: 4 sign shapes (circle, triangle, inverted triangle, diamond) x 2 rim colors on a
    cluttered background, with a random inner symbol."""
    y = _randint(g, n, 8)
    shape, red_rim, symbol = y // 2, y % 2, _randint(g, n, 3)
    img = _fill(_colors(g, n, 0.1, 0.7)) * (0.5 + _smooth_noise(g, n, 6, 3))
    cx, cy, r = _u(g, n, 13, 19), _u(g, n, 13, 19), _u(g, n, 9, 13)
    rim = torch.where(red_rim.view(-1, 1) == 1, torch.tensor([0.85, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.85]))
    rim = rim * _u(g, n, 0.6, 1.1).view(-1, 1)
    spin = _u(g, n, -0.12, 0.12)
    outer = torch.stack([_circle(cx, cy, r), _ngon(cx, cy, r, 3, spin - math.pi / 2),
                         _ngon(cx, cy, r, 3, spin + math.pi / 2), _ngon(cx, cy, r, 4, spin)], 1)
    inner = torch.stack([_circle(cx, cy, r * 0.72), _ngon(cx, cy, r * 0.6, 3, spin - math.pi / 2),
                         _ngon(cx, cy, r * 0.6, 3, spin + math.pi / 2), _ngon(cx, cy, r * 0.68, 4, spin)], 1)
    pick = F.one_hot(shape, 4).to(_X.dtype).view(n, 4, 1, 1)
    img = _paint(img, (outer * pick).sum(1), rim)
    img = _paint(img, (inner * pick).sum(1), _colors(g, n, 0.85, 1.0))
    s = r * 0.45
    bar = _box(cx, cy + r * 0.1, s, s * 0.3)
    dot = _circle(cx, cy + r * 0.1, s * 0.6)
    cross = torch.maximum(_box(cx, cy + r * 0.1, s, s * 0.25), _box(cx, cy + r * 0.1, s * 0.25, s))
    sym = torch.stack([bar, dot, cross], 1) * F.one_hot(symbol, 3).to(_X.dtype).view(n, 3, 1, 1)
    img = _paint(img, sym.sum(1), _colors(g, n, 0.0, 0.25))
    return _to_uint8(img * _u(g, n, 0.6, 1.2).view(-1, 1, 1, 1), g, 0.05), y


def textures(n, g):
    """DTD analogue: 8 texture families with random colors, scale, orientation and phase."""
    y = _randint(g, n, 8)
    c0, c1 = _colors(g, n), _colors(g, n)
    theta = _u(g, n, 0, math.pi)
    freq = _u(g, n, 0.5, 0.75)
    phase = _u(g, n, 0, 2 * math.pi)
    x, yy = _local(torch.full((n,), 16.0), torch.full((n,), 16.0), theta)
    f, p = _b(freq), _b(phase)
    r = torch.sqrt(x * x + yy * yy)
    blob = _smooth_noise(g, n, 5)[:, 0]
    fib = F.interpolate(torch.rand(n, 1, 16, 3, generator=g), size=(SIZE, SIZE), mode="bilinear")[:, 0]
    patterns = torch.stack([
        torch.sin(f * x + p) > 0,                                           # stripes
        (torch.sin(f * x + p) > 0) ^ (torch.sin(f * yy + p) > 0),           # checkerboard
        (torch.sin(f * x + p) * torch.sin(f * yy + p)) > 0.55,              # dots
        (torch.sin(f * x + p).abs() < 0.3) | (torch.sin(f * yy + p).abs() < 0.3),  # grid
        torch.sin(1.3 * f * r + p) > 0,                                     # concentric rings
        torch.sin(f * x + 2.0 * torch.sin(0.5 * f * yy) + p) > 0,           # waves
        blob > 0.5,                                                         # blotches
        fib > 0.5,                                                          # fibrous
    ], 1).to(_X.dtype)
    a = (patterns * F.one_hot(y, 8).to(_X.dtype).view(n, 8, 1, 1)).sum(1)
    img = _paint(_fill(c0), a, c1)
    return _to_uint8(img, g, 0.05), y


def landcover(n, g):
    """EuroSAT analogue: 10 land-cover classes seen from above, by palette and layout."""
    y = _randint(g, n, 10)
    jitter = lambda c: (torch.tensor(c) + 0.08 * torch.randn(n, 3, generator=g)).clamp(0, 1)  # noqa: E731
    noise = _smooth_noise(g, n, 8)[:, 0]
    fine = torch.rand(n, SIZE, SIZE, generator=g)
    theta = _u(g, n, 0, math.pi)
    x, yy = _local(_u(g, n, 8, 24), _u(g, n, 8, 24), theta)
    f = _b(_u(g, n, 0.5, 0.9))
    layers = []
    # 0 forest: dark green, blotchy canopy
    layers.append(_paint(_fill(jitter([0.1, 0.3, 0.1])), (noise > 0.55).to(_X.dtype), jitter([0.05, 0.2, 0.05])))
    # 1 river: curved blue band across green
    band = ((yy + 4 * torch.sin(0.2 * x)).abs() < _b(_u(g, n, 2, 4))).to(_X.dtype)
    layers.append(_paint(_fill(jitter([0.3, 0.5, 0.2])), band, jitter([0.1, 0.3, 0.6])))
    # 2 sea/lake: blue with gentle waves
    layers.append(_fill(jitter([0.05, 0.25, 0.5])) * (0.85 + 0.3 * noise.unsqueeze(1)))
    # 3 residential: many small gray-red houses
    houses = ((torch.sin(f * x * 1.6) > 0.3) & (torch.sin(f * yy * 1.6) > 0.3)).to(_X.dtype)
    layers.append(_paint(_fill(jitter([0.4, 0.45, 0.35])), houses, jitter([0.7, 0.55, 0.5])))
    # 4 industrial: few large gray blocks
    blocks = ((torch.sin(0.35 * f * x) > 0) & (torch.sin(0.35 * f * yy) > -0.2)).to(_X.dtype)
    layers.append(_paint(_fill(jitter([0.45, 0.45, 0.45])), blocks, jitter([0.75, 0.75, 0.78])))
    # 5 highway: straight gray road across vegetation
    road = (yy.abs() < _b(_u(g, n, 1.5, 3))).to(_X.dtype)
    layers.append(_paint(_fill(jitter([0.35, 0.45, 0.25])), road, jitter([0.55, 0.55, 0.55])))
    # 6 pasture: smooth light green
    layers.append(_fill(jitter([0.45, 0.65, 0.3])) * (0.9 + 0.2 * noise.unsqueeze(1)))
    # 7 annual crop: parallel field stripes of two colors
    layers.append(_paint(_fill(jitter([0.6, 0.55, 0.25])), (torch.sin(f * x) > 0).to(_X.dtype), jitter([0.35, 0.5, 0.2])))
    # 8 permanent crop: rows of dots (orchards)
    dots = ((torch.sin(1.5 * f * x) * torch.sin(1.5 * f * yy)) > 0.5).to(_X.dtype)
    layers.append(_paint(_fill(jitter([0.55, 0.5, 0.3])), dots, jitter([0.15, 0.35, 0.1])))
    # 9 herbaceous vegetation: fine mixed yellow-green speckle
    layers.append(_paint(_fill(jitter([0.4, 0.5, 0.2])), (fine > 0.5).to(_X.dtype), jitter([0.6, 0.6, 0.3])))
    img = (torch.stack(layers, 1) * F.one_hot(y, 10).to(_X.dtype).view(n, 10, 1, 1, 1)).sum(1)
    return _to_uint8(img * _u(g, n, 0.8, 1.2).view(-1, 1, 1, 1), g, 0.04), y


def scenes(n, g):
    """SUN397 analogue: 10 outdoor scene categories built from sky, ground and objects."""
    y = _randint(g, n, 10)
    horizon = _b(_u(g, n, 12, 20))
    sky_top, sky_bottom = _colors(g, n, 0.4, 1.0), _colors(g, n, 0.4, 1.0)
    t = (_Y / SIZE).unsqueeze(0)
    sky = sky_top.view(-1, 3, 1, 1) * (1 - t.unsqueeze(1)) + sky_bottom.view(-1, 3, 1, 1) * t.unsqueeze(1)
    ground_mask = (_Y > horizon).to(_X.dtype)
    cx = _u(g, n, 6, 26)
    palette = torch.tensor([
        [0.85, 0.75, 0.5],   # 0 beach: sand
        [0.15, 0.4, 0.15],   # 1 forest
        [0.9, 0.7, 0.4],     # 2 desert
        [0.35, 0.35, 0.35],  # 3 city street
        [0.95, 0.95, 0.98],  # 4 snowfield
        [0.05, 0.05, 0.1],   # 5 night city
        [0.5, 0.7, 0.2],     # 6 meadow
        [0.1, 0.3, 0.6],     # 7 lake
        [0.6, 0.3, 0.2],     # 8 sunset canyon
        [0.3, 0.25, 0.2],    # 9 mountains
    ])
    ground = (palette[y] + 0.07 * torch.randn(n, 3, generator=g)).clamp(0, 1)
    img = _paint(sky, ground_mask, ground)
    obj = torch.zeros(n, 10, SIZE, SIZE)
    obj[:, 0] = ((_Y > horizon) & (_Y < horizon + 4)).to(_X.dtype)                                   # sea band
    obj[:, 1] = sum(_ngon(_u(g, n, 2, 30), horizon.view(-1) - 3, _u(g, n, 4, 7), 3, -math.pi / 2 * torch.ones(n)) for _ in range(3)).clamp(0, 1)
    obj[:, 2] = _circle(cx, horizon.view(-1) - 8, _u(g, n, 2, 4))                               # sun disc
    obj[:, 3] = sum(_box(_u(g, n, 2, 30), horizon.view(-1) - 5, _u(g, n, 2, 4), _u(g, n, 4, 9)) for _ in range(3)).clamp(0, 1)
    obj[:, 4] = _ngon(cx, horizon.view(-1), _u(g, n, 8, 12), 3, -math.pi / 2 * torch.ones(n))  # white peak
    obj[:, 5] = ((torch.rand(n, SIZE, SIZE, generator=g) > 0.93) & (_Y < horizon)).to(_X.dtype)   # lit windows
    obj[:, 6] = ((torch.rand(n, SIZE, SIZE, generator=g) > 0.9) & (_Y > horizon)).to(_X.dtype)    # flowers
    obj[:, 7] = _box(cx, horizon.view(-1) + 2, _u(g, n, 5, 10), _u(g, n, 0.6, 1.2))             # shoreline
    obj[:, 8] = (_Y < horizon - 2).to(_X.dtype) * 0.5                                                 # dusk haze
    obj[:, 9] = _ngon(cx, horizon.view(-1) + 1, _u(g, n, 9, 14), 3, -math.pi / 2 * torch.ones(n))  # dark peak
    obj_color = torch.tensor([[0.1, 0.35, 0.7], [0.05, 0.25, 0.05], [1.0, 0.95, 0.6], [0.55, 0.5, 0.45],
                              [1.0, 1.0, 1.0], [1.0, 0.9, 0.3], [0.9, 0.3, 0.5], [0.3, 0.5, 0.2],
                              [1.0, 0.45, 0.1], [0.25, 0.2, 0.2]])[y]
    img = _paint(img, (obj * F.one_hot(y, 10).to(_X.dtype).view(n, 10, 1, 1)).sum(1), obj_color)
    return _to_uint8(img, g, 0.05), y


def vehicles(n, g):
    """Stanford Cars analogue: fine-grained side views of 10 vehicle types (body proportions, roof, wheels)."""
    y = _randint(g, n, 10)
    # per type: body length, body height, cabin start, cabin length, cabin height, wheel radius, wheels
    spec = torch.tensor([
        [22, 5, 0.30, 0.45, 4, 2.2, 2],   # sedan
        [17, 5, 0.35, 0.55, 4, 2.2, 2],   # hatchback
        [21, 7, 0.25, 0.60, 5, 2.8, 2],   # SUV
        [26, 9, 0.00, 0.25, 0, 2.5, 3],   # truck (cab only, tall box)
        [28, 10, 0.05, 0.90, 0, 2.3, 2],  # bus
        [22, 9, 0.15, 0.80, 0, 2.3, 2],   # van
        [24, 5, 0.15, 0.35, 5, 2.6, 2],   # pickup
        [22, 3.5, 0.40, 0.35, 3, 2.0, 2],  # sports car
        [28, 5, 0.25, 0.55, 4, 2.0, 2],   # limousine
        [22, 7, 0.15, 0.75, 3, 2.3, 2],   # minivan
    ])[y]
    s = _u(g, n, 0.95, 1.05)
    length, height = spec[:, 0] * s, spec[:, 1] * s
    cx, ground = _u(g, n, 14, 18), _u(g, n, 22, 26)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    img = _fill(_colors(g, n, 0.5, 1.0))
    img = _paint(img, (_Y > _b(ground)).to(_X.dtype), _colors(g, n, 0.2, 0.5))
    paint = _colors(g, n)
    body_cy = ground - spec[:, 5] * s - height / 2 + 1
    img = _paint(img, _box(cx, body_cy, length / 2, height / 2), paint)
    cab_len = spec[:, 3] * length
    cab_cx = cx + flip * (-length / 2 + spec[:, 2] * length + cab_len / 2)
    cab_h = spec[:, 4] * s
    cabin = _box(cab_cx, body_cy - height / 2 - cab_h / 2, cab_len / 2, cab_h / 2)
    img = _paint(img, cabin, paint * 0.8)
    img = _paint(img, _box(cab_cx, body_cy - height / 2 - cab_h / 2, cab_len / 2 - 1, cab_h / 2 - 1), torch.tensor([0.6, 0.8, 0.95]).expand(n, 3))
    wheels = torch.zeros(n, SIZE, SIZE)
    for k in range(3):
        frac = torch.where(spec[:, 6] == 3, torch.tensor([0.15, 0.55, 0.85])[k], torch.tensor([0.2, 0.8, 0.8])[k])
        wx = cx + flip * (-length / 2 + frac * length)
        wheels = torch.maximum(wheels, _circle(wx, ground - spec[:, 5] * s, spec[:, 5] * s))
    img = _paint(img, wheels, torch.tensor([0.08, 0.08, 0.08]).expand(n, 3))
    return _to_uint8(img, g, 0.04), y


def aerial(n, g):
    """RESISC45 analogue: 10 aerial scene layouts (runways, tanks, courts, roundabouts, ...)."""
    y = _randint(g, n, 10)
    base = _colors(g, n, 0.25, 0.6)
    img = _fill(base) * (0.8 + 0.4 * _smooth_noise(g, n, 6))
    theta = _u(g, n, 0, math.pi)
    cx, cy = _u(g, n, 12, 20), _u(g, n, 12, 20)
    x, yy = _local(cx, cy, theta)
    light = _colors(g, n, 0.7, 1.0)
    one = torch.ones(n)
    shapes = torch.stack([
        (yy.abs() < 3).to(_X.dtype),                                                            # 0 runway
        sum(_circle(cx + dx, cy + dy, 3.5 * one) for dx, dy in [(-6, -6), (6, -6), (-6, 6), (6, 6)]).clamp(0, 1),  # 1 storage tanks
        _box(cx, cy, 9 * one, 5 * one, theta) - _box(cx, cy, 8 * one, 4 * one, theta) * 0.7,   # 2 tennis court
        _ring(cx, cy, 8 * one, 1.5 * one),                                                 # 3 roundabout
        ((torch.sin(0.9 * yy) > 0.2) & (x.abs() < 12)).to(_X.dtype),                            # 4 parking lot rows
        _ring(cx, cy, 10 * one, 3 * one) * (x.abs() < 6).to(_X.dtype) + _ring(cx, cy, 10 * one, 3 * one) * 0.5,  # 5 stadium
        _circle(cx, cy, 11 * one) * (torch.sin(0.8 * x) > 0).to(_X.dtype),                      # 6 circular farmland
        ((x.abs() < 1.5) | (yy.abs() < 1.5)).to(_X.dtype),                                      # 7 intersection
        _ngon(cx, cy, 8 * one, 4, theta + math.pi / 4),                                    # 8 baseball diamond
        ((torch.sin(0.5 * x) > 0.6) & (torch.sin(0.5 * yy) > 0.6)).to(_X.dtype),                # 9 dense buildings
    ], 1)
    a = (shapes * F.one_hot(y, 10).to(_X.dtype).view(n, 10, 1, 1)).sum(1).clamp(0, 1)
    img = _paint(img, a, light)
    return _to_uint8(img, g, 0.05), y


def generic_shapes(n, g):
    """Pretraining only: a generic mixture of shapes, colors and textures (16 classes), not one of the eight tasks."""
    y = _randint(g, n, 16)
    kind, hue = y // 4, y % 4
    palette = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.8, 0.2]])
    img = _fill(_colors(g, n, 0.0, 0.6)) * (0.6 + 0.6 * _smooth_noise(g, n, 4, 3))
    cx, cy, r = _u(g, n, 9, 23), _u(g, n, 9, 23), _u(g, n, 5, 10)
    one = torch.ones(n)
    shapes = torch.stack([_circle(cx, cy, r), _box(cx, cy, r, r * 0.6, _u(g, n, 0, 3)),
                          _ngon(cx, cy, r, 5, _u(g, n, 0, 3)), _ring(cx, cy, r, one * 1.5)], 1)
    a = (shapes * F.one_hot(kind, 4).to(_X.dtype).view(n, 4, 1, 1)).sum(1)
    img = _paint(img, a, (palette[hue] + 0.1 * torch.randn(n, 3, generator=g)).clamp(0, 1))
    return _to_uint8(img, g, 0.05), y


@dataclass(frozen=True)
class TaskSpec:
    name: str
    analogue: str          # the real-benchmark dataset this task stands in for
    num_classes: int
    generate: Callable


TASKS = [
    TaskSpec("scenes", "SUN397", 10, scenes),
    TaskSpec("vehicles", "StanfordCars", 10, vehicles),
    TaskSpec("aerial", "RESISC45", 10, aerial),
    TaskSpec("landcover", "EuroSAT", 10, landcover),
    TaskSpec("house_numbers", "SVHN", 10, house_numbers),
    TaskSpec("signs", "GTSRB", 8, signs),
    TaskSpec("digits", "MNIST", 10, digits),
    TaskSpec("textures", "DTD", 8, textures),
]
GENERIC = TaskSpec("generic_shapes", "pretraining mixture", 16, generic_shapes)


def generate(spec: TaskSpec, n: int, seed: int, batch: int = 2048, dtype: torch.dtype = torch.float32):
    """Deterministic images and labels for one task (generated in batches to bound memory), drawn in ``dtype``
    (float32, or float64: the same bytes on every CPU)."""
    global _X, _Y
    saved = torch.get_default_dtype(), _X, _Y
    torch.set_default_dtype(dtype)  # random draws and literals of the generators in the same dtype
    _Y, _X = _grid(dtype)
    try:
        g = torch.Generator().manual_seed(seed)
        xs, ys = [], []
        for start in range(0, n, batch):
            x, y = spec.generate(min(batch, n - start), g)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)
    finally:
        default, _X, _Y = saved
        torch.set_default_dtype(default)
