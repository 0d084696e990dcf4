"""Batched 2-D simplex noise (fractal, several octaves) as AnoDDPM uses it to corrupt images.

AnoDDPM (Wyatt et al. 2022) replaces the Gaussian noise of a DDPM by fractal simplex noise, which
is spatially correlated and so hides larger anomalies. Its reference code sums octaves of
OpenSimplex noise sampled at pixel coordinates divided by ``frequency`` (``x / frequency``) and, at
each further octave, halves ``frequency`` and multiplies the amplitude by ``persistence``
(defaults: 6 octaves, persistence 0.8, frequency 64). ``frequency`` is therefore a *wavelength*
in pixels of the first octave: with 64 at 64x64 the first octave spans one lattice cell of the
image and the sixth has features of about 2 pixels. The same convention is kept here, so the
defaults mean the same thing.

Differences from the reference, on purpose:

* 2-D classic simplex noise (Gustavson) per channel instead of 3-D OpenSimplex slices at
  ``z = t / frequency``; RGB channels get independent noise (the reference is greyscale and shares
  one field across the batch).
* Everything random (a permutation table, 256 random unit gradients and a random lattice offset per
  octave, for every image-channel; a random sub-lattice shift per octave, shared by the fields of
  one draw) is drawn from a ``torch.Generator``, so a draw is reproducible and each image and
  channel gets its own field.
* Simplex noise is exactly 0 at lattice vertices, and with wavelengths halving every octave a
  vertex of the first octave is a vertex of all of them: sampled at ``x / frequency`` alone, the
  same pixels ((0, 0), (37, 37), ... at the defaults) would get almost no noise in every image
  (per-pixel std 0.16-0.18 against 1.0 elsewhere), and an anomaly there would escape the
  corruption. Each octave is therefore translated by a continuous random shift in ``[0, 1)``
  lattice cells, drawn per call: the vertices of different octaves no longer coincide and their
  positions move from draw to draw. (The hash offsets alone only re-label the lattice.)
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


@dataclass
class SimplexConfig:
    """Fractal simplex noise parameters (AnoDDPM's defaults).

    Attributes:
        octaves: number of octaves summed.
        persistence: amplitude factor from one octave to the next, in ``(0, 1]``.
        frequency: wavelength in pixels of the first octave (halved every octave).
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
        shift: ``[octaves,2]`` float sub-lattice translation of each octave in ``[0, 1)`` lattice
            cells, shared by the ``N`` fields (moves the vertices, where the noise is 0).
    """

    perm: torch.Tensor
    grad: torch.Tensor
    offset: torch.Tensor
    shift: torch.Tensor


def draw_tables(n: int, octaves: int, generator: torch.Generator,
                dtype: torch.dtype = torch.float32) -> SimplexTables:
    """Draw the random tables of ``n`` fields from ``generator`` (on its device)."""
    dev = generator.device
    perm = torch.argsort(torch.rand(n, 256, generator=generator, device=dev), dim=1)
    angle = torch.rand(n, 256, generator=generator, device=dev, dtype=dtype) * (2 * math.pi)
    grad = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    offset = torch.randint(0, 256, (n, octaves, 2), generator=generator, device=dev)
    shift = torch.rand(octaves, 2, generator=generator, device=dev, dtype=dtype)
    return SimplexTables(torch.cat([perm, perm], dim=1), grad, offset, shift)


@dataclass
class OctaveGeometry:
    """Where every pixel sits in one octave's simplex lattice (shared by all fields).

    Attributes:
        vi, vj: ``[V]`` long lattice coordinates of the bounding box of vertices used.
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
    s = (x + y) * _F2
    i = torch.floor(x + s)
    j = torch.floor(y + s)
    t = (i + j) * _G2
    x0 = x - (i - t)
    y0 = y - (j - t)
    i1 = (x0 > y0).to(x.dtype)  # lower triangle: corner (1,0); upper: (0,1)
    j1 = 1.0 - i1
    dx = torch.stack([x0, x0 - i1 + _G2, x0 - 1.0 + 2.0 * _G2], dim=1)
    dy = torch.stack([y0, y0 - j1 + _G2, y0 - 1.0 + 2.0 * _G2], dim=1)
    ci = torch.stack([i, i + i1, i + 1.0], dim=1).long()
    cj = torch.stack([j, j + j1, j + 1.0], dim=1).long()
    i0, j0 = int(ci.min()), int(cj.min())
    ni, nj = int(ci.max()) - i0 + 1, int(cj.max()) - j0 + 1
    col = (ci - i0) * nj + (cj - j0)
    grid_i, grid_j = torch.meshgrid(torch.arange(ni, device=x.device) + i0,
                                    torch.arange(nj, device=x.device) + j0, indexing="ij")
    w = (0.5 - dx * dx - dy * dy).clamp_min(0.0) ** 4
    return OctaveGeometry(grid_i.reshape(-1), grid_j.reshape(-1), col, dx, dy, w)


def vertex_gradients(tables: SimplexTables, geo: OctaveGeometry, octave: int) -> torch.Tensor:
    """Hashed gradients ``[N,V,2]`` of every field at the octave's lattice vertices."""
    off = tables.offset[:, octave]
    ii = (geo.vi[None] + off[:, :1]) & 255
    jj = (geo.vj[None] + off[:, 1:]) & 255
    h = tables.perm.gather(1, ii + tables.perm.gather(1, jj)) & 255
    return torch.stack([tables.grad[..., 0].gather(1, h), tables.grad[..., 1].gather(1, h)], -1)


def fractal_from_tables(tables: SimplexTables, height: int, width: int, octaves: int,
                        persistence: float, frequency: float) -> torch.Tensor:
    """Un-normalised fractal noise ``[N,H,W]`` for given tables (deterministic).

    Every pixel's value is a fixed linear combination of the hashed gradients at its three
    simplex corners per octave, so all octaves are written as one sparse ``[P, sum 2V]`` matrix
    (shared by all fields) times the ``[sum 2V, N]`` gradients of the ``N`` fields.
    """
    dev, dtype = tables.grad.device, tables.grad.dtype
    yy, xx = torch.meshgrid(torch.arange(height, device=dev, dtype=dtype),
                            torch.arange(width, device=dev, dtype=dtype), indexing="ij")
    px, py = xx.reshape(-1), yy.reshape(-1)
    cols, vals, grads = [], [], []
    amp, wavelength, base = 1.0, float(frequency), 0
    for k in range(octaves):  # octaves only; every field and pixel is batched
        geo = octave_geometry(px / wavelength + tables.shift[k, 0],
                              py / wavelength + tables.shift[k, 1])
        g = vertex_gradients(tables, geo, k)  # [N,V,2]
        scale = _SCALE * amp * geo.w
        cols += [base + 2 * geo.col, base + 2 * geo.col + 1]
        vals += [scale * geo.dx, scale * geo.dy]
        grads.append(rearrange(g, "n v c -> (v c) n"))
        base += 2 * geo.vi.numel()
        wavelength /= 2.0
        amp *= persistence
    col = torch.cat(cols, dim=1)  # [P, 6 * octaves]
    val = torch.cat(vals, dim=1)
    col, order = col.sort(dim=1)
    val = val.gather(1, order)
    p, k = col.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        a = torch.sparse_csr_tensor(torch.arange(0, p * k + 1, k, device=dev), col.reshape(-1),
                                    val.reshape(-1), size=(p, base), dtype=dtype)
        out = a @ torch.cat(grads, dim=0)  # [P, N]
    return rearrange(out, "(h w) n -> n h w", h=height)


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
    # full precision even when called under autocast (a bf16 training step): the sparse product
    # would otherwise run in bf16 (CUDA) or fail (CPU has no bf16 sparse kernel)
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
