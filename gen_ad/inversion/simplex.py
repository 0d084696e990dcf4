"""Batched 2-D simplex noise (fractal, several octaves) as AnoDDPM uses it to corrupt images.

AnoDDPM (Wyatt et al. 2022) replaces the Gaussian noise of a DDPM by fractal simplex noise, which
is spatially correlated and so hides larger anomalies. Its reference code sums octaves of
OpenSimplex noise sampled at pixel coordinates divided by ``frequency`` (``x / frequency``) and, at
each further octave, halves ``frequency`` and multiplies the amplitude by ``persistence``
(defaults: 6 octaves, persistence 0.8, frequency 64). The same convention is kept here (trained
runs use it): ``frequency`` is the lattice spacing in pixels of the first octave, halved every
octave; with 64 at 64x64 the first octave spans one lattice cell of the image.

The same ``frequency`` does **not** give the reference's spatial scale: this 2-D simplex is about
2.2x finer (2.0-2.4 measured) than the reference's 3-D OpenSimplex slices. Measured on 256x256
fields as the lag along x where the autocorrelation falls to 0.5: one octave, reference 16.5 px
at frequency 32 (17.5 px with another field set) and 30.8 px at 64, here 7.5 px and 15.1 px;
the default six octaves at frequency 64, reference 13.2-14.4 px (two field sets), here 6.3 px.
To reproduce the reference's scale, multiply its frequency by about 2.2: here 70-74 matches its
32 (16.6-17.6 px), about 130 its one-octave 64 (30.8 px) and 136-150 its six-octave default
(13.1-14.5 px).

Differences from the reference, on purpose:

* 2-D classic simplex noise (Gustavson) per channel instead of 3-D OpenSimplex slices at
  ``z = t / frequency``; RGB channels get independent noise (the reference is greyscale and shares
  one field across the batch).
* Everything random (a permutation table, 256 random unit gradients, a random hash offset and a
  random placement per octave) is drawn for every image-channel, from a ``torch.Generator`` (or,
  in the scorers, from the image's own stream, :mod:`gen_ad.inversion.noise`), so a draw is
  reproducible and each image and channel gets its own field.
* Simplex noise is exactly 0 at lattice vertices, and with wavelengths halving every octave a
  vertex of the first octave is a vertex of all of them: sampled at ``x / frequency`` alone, the
  same pixels ((0, 0), (37, 37), ... at the defaults) would get almost no noise in every image
  (per-pixel std 0.16-0.18 against 1.0 elsewhere), and an anomaly there would escape the
  corruption. A random shift per octave shared by the fields of a draw is not enough: the weak
  pixels then coincide for all images of the draw, and with per-image streams for every image of
  a dataset (per-pixel std over 2,000 images of one draw 0.59 to 1.24). So every field places
  every octave on its own: octave ``k`` of field ``f`` samples pixel ``p`` at
  ``(p + c[f, k]) / wavelength_k + s_k``, with ``c`` a random integer pixel offset uniform over
  one lattice cell scaled to a whole number of cells and at least 16 px (:func:`pixel_offsets`:
  each pixel's position relative to the lattice is uniform over fields) and ``s_k`` a fixed
  translation (:func:`octave_shift`: no field's offsets put the vertices of two octaves exactly
  on top of each other). Per-pixel std over 1,024 fields of one draw: 0.91-1.10 (seeds 0-2).
  Integer offsets let an octave be computed once on a grid larger by the offsets' span, with
  geometry shared by all fields, each field reading its window; where that grid would exceed 16
  image areas (``frequency`` far above the image size) the octave is evaluated per field (same
  values).
* The result is normalised to zero mean and unit variance **per image and channel** (hence per
  image), so it can stand in for ``N(0, I)`` noise in the DDPM forward process. The reference does
  not normalise (its scale is the raw octave sum).

All work is batched tensor code on the generator's device (no per-image Python loop).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from einops import rearrange

from gen_ad.config import check
from gen_ad.errors import ConfigError

_F2 = 0.5 * (math.sqrt(3.0) - 1.0)  # skew factor for 2-D simplex grids
_G2 = (3.0 - math.sqrt(3.0)) / 6.0  # unskew factor
_SCALE = 70.0  # brings single-octave values into about [-1, 1]
_MIN_SPAN = 16.0  # least extent in pixels of the random placement of an octave
_MAX_GROWTH = 16.0  # largest shared grid in image areas (measured: faster than per-field
#                     at 9, slower at 25, batch 64 at 64 px)


@dataclass
class SimplexConfig:
    """Fractal simplex noise parameters (AnoDDPM's defaults).

    Attributes:
        octaves: number of octaves summed.
        persistence: amplitude factor from one octave to the next, in ``(0, 1]``.
        frequency: wavelength in pixels of the first octave (halved every octave); AnoDDPM's
            convention, though its 3-D OpenSimplex is ~2.2x coarser at the same value.
    """

    octaves: int = 6
    persistence: float = 0.8
    frequency: float = 64.0

    def validate(self, prefix: str) -> None:
        check(1 <= self.octaves <= 16, f"{prefix}.octaves",
              f"must be in [1, 16], got {self.octaves}")
        check(0.0 < self.persistence <= 1.0, f"{prefix}.persistence", "must be in (0, 1]")
        check(self.frequency > 0.0, f"{prefix}.frequency", "must be positive")


@dataclass
class SimplexTables:
    """The random part of a draw, for ``N`` independent fields.

    Attributes:
        perm: ``[N,512]`` long, a permutation of ``0..255`` repeated twice.
        grad: ``[N,256,2]`` float unit gradients.
        offset: ``[N,octaves,2]`` long lattice offsets in ``[0, 256)`` (shift the hash, i.e.
            re-label each octave's vertices; the vertices stay where they are).
        place: ``[N,octaves,2]`` float uniforms in ``[0, 1)``: where each octave of each field
            sits on its lattice (:func:`pixel_offsets`; moves the vertices, where the noise is 0).
    """

    perm: torch.Tensor
    grad: torch.Tensor
    offset: torch.Tensor
    place: torch.Tensor


def cell_shift(u: torch.Tensor) -> torch.Tensor:
    """Map uniforms ``[...,2]`` in ``[0, 1)`` to a translation (lattice units) uniform over one
    simplex lattice cell, the unskewed unit square (bounding box ``[-G2, 1 - G2)`` per axis)."""
    return u - u.sum(dim=-1, keepdim=True) * _G2


def octave_shift(octave: int) -> tuple[float, float]:
    """Fixed sub-lattice translation ``s_k`` of octave ``k`` in lattice units: ``sqrt(k + 2)``
    times two constants, mod 1. Integer pixel offsets alone would, in the fields whose offsets
    differ by a suitable integer vector, put the vertices of octave ``k`` exactly onto those of
    octave ``k + j``; that needs ``wavelength_(k+j) * (2^j s_k - s_(k+j))`` to be integral along
    both diagonals, which these translations avoid (checked for 18 frequencies from 8 to 1024:
    0.02 px away at the closest; a linear ``(k + 1) * alpha`` gives ``2 s_0 - s_1 = 0``)."""
    r = math.sqrt(octave + 2.0)
    return r * 0.7548776662 % 1.0, r * 0.5698402910 % 1.0


def octave_span(wavelength: float) -> float:
    """Extent in pixels of an octave's random placement: a whole number of lattice cells, at
    least ``_MIN_SPAN`` pixels (so fine octaves get many distinct sub-lattice positions)."""
    return wavelength * max(1, math.ceil(_MIN_SPAN / wavelength))


def pixel_offsets(place: torch.Tensor, span: float) -> torch.Tensor:
    """Integer pixel translations ``[...,2]`` in ``[0, ceil(span))`` from uniforms ``place``:
    uniform over a lattice cell scaled to ``span`` pixels (a whole number of cells), so every
    pixel's position relative to the octave's lattice is (up to the pixel grid) uniform."""
    c = torch.floor(span * (cell_shift(place) + _G2))  # cell + G2: bounding box [0, 1)
    return c.long().clamp(0, math.ceil(span) - 1)


def lattice_shift(tables: SimplexTables, frequency: float) -> torch.Tensor:
    """Each field's translation ``[N,octaves,2]`` of each octave in lattice units: octave ``k``
    of field ``f`` samples pixel ``(x, y)`` at ``(x, y) / wavelength_k + shift[f, k]``."""
    out = torch.empty(tables.place.shape, dtype=torch.float64)
    wavelength = float(frequency)
    for k in range(tables.place.shape[1]):
        c = pixel_offsets(tables.place[:, k], octave_span(wavelength)).double().cpu()
        out[:, k] = c / wavelength + torch.tensor(octave_shift(k), dtype=torch.float64)
        wavelength /= 2.0
    return out


def draw_tables(n: int, octaves: int, generator: torch.Generator,
                dtype: torch.dtype = torch.float32) -> SimplexTables:
    """Draw the random tables of ``n`` fields from ``generator`` (on its device)."""
    dev = generator.device
    perm = torch.argsort(torch.rand(n, 256, generator=generator, device=dev), dim=1)
    angle = torch.rand(n, 256, generator=generator, device=dev, dtype=dtype) * (2 * math.pi)
    grad = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    offset = torch.randint(0, 256, (n, octaves, 2), generator=generator, device=dev)
    place = torch.rand(n, octaves, 2, generator=generator, device=dev, dtype=dtype)
    return SimplexTables(torch.cat([perm, perm], dim=1), grad, offset, place)


def _corner_weights(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Corners ``ci, cj`` (long) and offsets ``dx, dy`` ``[...,3]`` of points ``(x, y)``."""
    s = (x + y) * _F2
    i = torch.floor(x + s)
    j = torch.floor(y + s)
    t = (i + j) * _G2
    x0 = x - (i - t)
    y0 = y - (j - t)
    i1 = (x0 > y0).to(x.dtype)  # lower triangle: corner (1,0); upper: (0,1)
    j1 = 1.0 - i1
    dx = torch.stack([x0, x0 - i1 + _G2, x0 - 1.0 + 2.0 * _G2], dim=-1)
    dy = torch.stack([y0, y0 - j1 + _G2, y0 - 1.0 + 2.0 * _G2], dim=-1)
    ci = torch.stack([i, i + i1, i + 1.0], dim=-1).long()
    cj = torch.stack([j, j + j1, j + 1.0], dim=-1).long()
    return ci, cj, dx, dy


@dataclass
class OctaveGeometry:
    """Where every pixel sits in one octave's simplex lattice (shared by all fields).

    Attributes:
        vi, vj: ``[ni]``, ``[nj]`` long lattice coordinates spanning the box of vertices used
            (``V = ni * nj`` vertices, ``i``-major).
        col: ``[P,3]`` long index into ``0..V-1`` of each pixel's three simplex corners.
        dx, dy: ``[P,3]`` float offsets of the pixel from each corner.
        w: ``[P,3]`` float radial weights ``max(0, 0.5 - |d|^2)^4``.
    """

    vi: torch.Tensor
    vj: torch.Tensor
    col: torch.Tensor
    dx: torch.Tensor
    dy: torch.Tensor
    w: torch.Tensor


def octave_geometry(x: torch.Tensor, y: torch.Tensor) -> OctaveGeometry:
    """Simplex corners, offsets and weights for points ``(x, y)`` ``[P]`` (lattice units)."""
    ci, cj, dx, dy = _corner_weights(x, y)
    i0, j0 = int(ci.min()), int(cj.min())
    ni, nj = int(ci.max()) - i0 + 1, int(cj.max()) - j0 + 1
    col = (ci - i0) * nj + (cj - j0)
    w = (0.5 - dx * dx - dy * dy).clamp_min(0.0) ** 4
    return OctaveGeometry(torch.arange(ni, device=x.device) + i0,
                          torch.arange(nj, device=x.device) + j0, col, dx, dy, w)


def vertex_gradients(tables: SimplexTables, geo: OctaveGeometry, octave: int) -> torch.Tensor:
    """Hashed gradients ``[V*2,N]`` (vertex-major, then x / y) of every field at the octave's
    lattice vertices, ``grad[perm[(i + oi) & 255 + perm[(j + oj) & 255]]]``, laid out for the
    sparse product (flat int32 lookups in field-minor tables: no transpose of a large tensor)."""
    n, dev, i32 = tables.perm.shape[0], tables.perm.device, torch.int32
    f = torch.arange(n, device=dev, dtype=i32)
    off = tables.offset[:, octave].to(i32)  # [N,2]
    perm = tables.perm[:, :256].T.contiguous().to(i32).reshape(-1)  # [256*N]: (value, field)
    grad = tables.grad.permute(1, 2, 0).reshape(-1)  # [256*2*N]: (entry, x / y, field)
    ii = (geo.vi.to(i32)[:, None] + off[:, 0]) & 255  # [ni,N]
    pj = perm.index_select(0, (((geo.vj.to(i32)[:, None] + off[:, 1]) & 255) * n + f).reshape(-1))
    h = perm.index_select(0, (((ii[:, None] + pj.view(1, -1, n)) & 255) * n + f).reshape(-1))
    xy = torch.arange(2, device=dev, dtype=i32)[:, None]
    return grad.index_select(0, ((h.view(-1, 1, n) * 2 + xy) * n + f).reshape(-1)).view(-1, n)


def _octave_windows(tables: SimplexTables, octave: int, height: int, width: int,
                    wavelength: float, amp: float, c: torch.Tensor, pad: int) -> torch.Tensor:
    """The octave ``[N,H*W]`` computed once on a grid larger by ``pad``, with geometry shared by
    all fields (a sparse ``[P', 2V]`` matrix of corner weights times the ``[2V, N]`` hashed
    gradients); each field reads its window at its offset ``c`` ``[N,2]``."""
    dev, dtype = tables.grad.device, tables.grad.dtype
    pw = width + pad
    yy, xx = torch.meshgrid(torch.arange(height + pad, device=dev, dtype=dtype),
                            torch.arange(pw, device=dev, dtype=dtype), indexing="ij")
    sx, sy = octave_shift(octave)
    geo = octave_geometry(xx.reshape(-1) / wavelength + sx, yy.reshape(-1) / wavelength + sy)
    # columns (2 per vertex: x, y) already ascend within a row: a pixel's corners are col,
    # col + (nj or 1) and col + nj + 1
    col = torch.stack([2 * geo.col, 2 * geo.col + 1], dim=-1).flatten(1)  # [P', 6]
    val = torch.stack([geo.w * geo.dx, geo.w * geo.dy], dim=-1).flatten(1) * amp
    p, k = col.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        a = torch.sparse_csr_tensor(torch.arange(0, p * k + 1, k, device=dev), col.reshape(-1),
                                    val.reshape(-1), size=(p, 2 * len(geo.vi) * len(geo.vj)),
                                    dtype=dtype)
        full = a @ vertex_gradients(tables, geo, octave)  # [P', N]
    n = c.shape[0]  # full is [P', N]: element (q, f) at q * N + f
    idx = torch.int32 if full.numel() < 2**31 else torch.int64  # int32: half the index traffic
    rows = (torch.arange(height, device=dev)[:, None] * pw + torch.arange(width, device=dev)) * n
    start = (c[:, 1] * pw + c[:, 0]) * n + torch.arange(n, device=dev)
    index = start.to(idx)[:, None] + rows.to(idx).reshape(1, -1)  # [N, H*W]
    return full.reshape(-1).index_select(0, index.reshape(-1)).view(n, -1)


def _octave_per_field(tables: SimplexTables, octave: int, height: int, width: int,
                      wavelength: float, amp: float, c: torch.Tensor) -> torch.Tensor:
    """The same octave ``[N,H*W]`` evaluated directly at every field's own points (for
    offsets spanning much more than the image, where the shared grid would be too large)."""
    dev, dtype = tables.grad.device, tables.grad.dtype
    yy, xx = torch.meshgrid(torch.arange(height, device=dev, dtype=dtype),
                            torch.arange(width, device=dev, dtype=dtype), indexing="ij")
    sx, sy = octave_shift(octave)
    ci, cj, dx, dy = _corner_weights((xx.reshape(1, -1) + c[:, :1]) / wavelength + sx,
                                     (yy.reshape(1, -1) + c[:, 1:]) / wavelength + sy)
    off = tables.offset[:, octave, :, None, None]  # [N,2,1,1]
    ii, jj = (ci + off[:, 0]) & 255, (cj + off[:, 1]) & 255  # [N,P,3]
    n = c.shape[0]
    h = tables.perm.gather(1, (ii + tables.perm.gather(1, jj.reshape(n, -1)).view_as(jj))
                           .reshape(n, -1))
    g = tables.grad.gather(1, h[..., None].expand(-1, -1, 2)).view(*dx.shape, 2)
    w = (0.5 - dx * dx - dy * dy).clamp_min(0.0) ** 4
    return (w * (g[..., 0] * dx + g[..., 1] * dy)).sum(dim=-1) * amp


def octave_noise(tables: SimplexTables, octave: int, height: int, width: int,
                 wavelength: float, amp: float) -> torch.Tensor:
    """One octave times ``amp``, ``[N,H*W]``, of every field, translated by its own pixel offset
    (:func:`pixel_offsets`): by windows of one shared larger grid unless that grid would exceed
    ``_MAX_GROWTH`` times the image, else per field (same values up to float rounding)."""
    span = octave_span(wavelength)
    c = pixel_offsets(tables.place[:, octave], span)  # [N,2]
    pad = math.ceil(span)
    if (height + pad) * (width + pad) <= _MAX_GROWTH * height * width:
        return _octave_windows(tables, octave, height, width, wavelength, amp, c, pad)
    return _octave_per_field(tables, octave, height, width, wavelength, amp, c)


def fractal_from_tables(tables: SimplexTables, height: int, width: int, octaves: int,
                        persistence: float, frequency: float) -> torch.Tensor:
    """Un-normalised fractal noise ``[N,H,W]`` for given tables (deterministic).

    Octave ``k`` of field ``f`` samples pixel ``(x, y)`` at ``(x, y) / wavelength_k +
    lattice_shift(tables, frequency)[f, k]``, ``wavelength_k = frequency / 2^k``.
    """
    out = octave_noise(tables, 0, height, width, float(frequency), _SCALE)
    for k in range(1, octaves):  # octaves only; every field and pixel is batched
        out += octave_noise(tables, k, height, width, frequency / 2**k, _SCALE * persistence**k)
    return out.view(-1, height, width)


def standardize(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean, unit (population) variance over the last two dims of ``[...,H,W]``."""
    mean = v.mean(dim=(-2, -1), keepdim=True)
    std = v.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (v - mean) / (std + eps)


def simplex_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, *,
                  octaves: int = 6, persistence: float = 0.8, frequency: float = 64.0,
                  dtype: torch.dtype = torch.float32, normalize: bool = True) -> torch.Tensor:
    """Fractal simplex noise, one independent field per image and channel.

    Args:
        shape: ``(B, C, H, W)``.
        generator: source of every random draw; the result is on its device.
        octaves: number of octaves (AnoDDPM: 6).
        persistence: amplitude ratio between octaves (AnoDDPM: 0.8).
        frequency: wavelength in pixels of the first octave, halved per octave (AnoDDPM: 64).
        dtype: float dtype of the result.
        normalize: standardise each image-channel to zero mean and unit variance.
    Returns:
        ``[B,C,H,W]`` noise; same generator state gives identical noise.
    """
    if len(shape) != 4:
        raise ConfigError(f"simplex noise shape must be (B, C, H, W), got {tuple(shape)}")
    b, c, h, w = (int(s) for s in shape)
    if octaves < 1 or not 0.0 < persistence <= 1.0 or frequency <= 0:
        raise ConfigError(f"bad simplex parameters: octaves={octaves}, persistence={persistence},"
                          f" frequency={frequency}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    tables = draw_tables(b * c, octaves, generator, dtype=work)
    # full precision even when called under autocast (a bf16 training step)
    with torch.autocast(generator.device.type, enabled=False):
        v = fractal_from_tables(tables, h, w, octaves, persistence, frequency)
    if normalize:
        v = standardize(v)
    return rearrange(v, "(b c) h w -> b c h w", b=b).to(dtype)


def simplex_like(x: torch.Tensor, generator: torch.Generator,
                 cfg: SimplexConfig | None = None) -> torch.Tensor:
    """Normalised simplex noise shaped like ``x`` ``[B,C,H,W]`` (on ``x``'s device and dtype)."""
    cfg = cfg or SimplexConfig()
    v = simplex_noise(x.shape, generator, octaves=cfg.octaves, persistence=cfg.persistence,
                      frequency=cfg.frequency)
    return v.to(device=x.device, dtype=x.dtype)
