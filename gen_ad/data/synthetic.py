"""Procedural H&E-like tissue with planted anomalies and exact pixel masks.

Tissue is modelled as hematoxylin (H) and eosin (E) concentration maps that are turned into RGB with
the Beer-Lambert law and per-patch jittered stain vectors, as in a real scanned slide:
``rgb = white * exp(-(H * h_vec + E * e_vec))``. Normal tissue mixes pink fibrous stroma with
spindle nuclei, sheets of parenchymal cells with round vesicular nuclei, scattered lymphocytes and
pale lumen / fat spaces. Three anomaly types are rendered as a second tissue inside a random blob:

- ``tumor``: crowded, enlarged, hyperchromatic, pleomorphic nuclei with nucleoli;
- ``necrosis``: pale homogeneous eosinophilic area with nuclear debris and ghost nuclei;
- ``inflammation``: densely packed small round dark nuclei (lymphocytes).

The anomaly is composited into the concentration maps inside its region only, so pixels outside the
mask are bit-identical to the same patch rendered without the anomaly. The mask is exactly the
anomaly region (the support of the blending weight).

Randomness is a stateless counter-based generator (the SplitMix64 finaliser applied to
``(seed, size, stream, patch index, call, element)``), so patch ``i`` depends only on
``(seed, i, size, anomaly settings)`` while every draw stays vectorised over the batch. Patches are
computed in fixed, index-aligned chunks, so a patch is always computed with the same tensor layout
(bit-identical whatever ``n`` is). No global RNG is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from gen_ad.data.folders import SYNTH_MANIFEST_HEADER as MANIFEST_HEADER
from gen_ad.data.folders import SYNTH_MANIFEST_NAME as MANIFEST_NAME
from gen_ad.data.folders import SYNTH_SHEET_NAME as SHEET_NAME
from gen_ad.data.folders import is_image_file
from gen_ad.errors import ConfigError, DataError
from gen_ad.utils.io import atomic_path, write_text

ANOMALY_TYPES: tuple[str, ...] = ("tumor", "necrosis", "inflammation")
_PENDING = ".synth-pending.csv"  # the files of a set being written, until its manifest is
_SET_FOLDERS = ("normal", "anomalous", "masks")

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_STREAM_NORMAL, _STREAM_ANOMALY, _STREAM_LABEL = 1, 2, 3
_PHI = 0.6180339887498949  # golden-ratio Weyl step: low-discrepancy anomaly assignment
_SQRT2M1 = 0.41421356237309515
# Optical-density stain vectors (Macenko reference for H, a pinker E); rows: H, E.
_STAINS = np.array([[0.60, 0.74, 0.30], [0.10, 0.92, 0.38]], dtype=np.float32)


# ----------------------------------------------------------------------------- randomness


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (array arithmetic wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _mix32(x: np.ndarray) -> np.ndarray:
    """A bijective 32-bit integer hash (xor-shift-multiply), in place on a uint32 array."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def _keys(seed: int, index: np.ndarray, size: int, stream: int) -> np.ndarray:
    """Per-patch uint64 keys for one stream. Shape ``[n]``."""
    base = _mix(np.array([seed], dtype=np.uint64) * _GOLD + np.array([stream], dtype=np.uint64))
    base = _mix(base ^ np.array([size], dtype=np.uint64) * _M1)
    return _mix(base + index.astype(np.uint64) * _GOLD)


class _Stream:
    """Counter-based random numbers for a batch of patches; call ``k`` uses sub-stream ``k``.

    Draw ``j`` of call ``k`` for patch ``i`` is a hash of ``(keys[i], k, j)``, so it does not
    depend on the other patches in the batch. Also memoises the (deterministic) interpolation
    matrices used while rendering one batch.

    Args:
        keys: per-patch uint64 keys ``[n]``.
    """

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        self.n = int(keys.shape[0])
        self._calls = 0
        self.memo: dict[tuple[int, float], torch.Tensor] = {}

    def _bits(self, count: int) -> np.ndarray:
        """``[n, count]`` uint32 hashes for the next call."""
        self._calls += 1
        salt = np.array([self._calls], dtype=np.uint64) * _M2
        base = _mix(self.keys ^ salt)
        lo = (base & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None]
        hi = (base >> np.uint64(32)).astype(np.uint32)[:, None]
        x = _mix32(np.arange(count, dtype=np.uint32)[None, :] + hi)  # bijective in j
        x ^= lo
        return _mix32(x)

    def uniform(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        """Uniform floats in ``[lo, hi)``, shape ``[n, *shape]`` (``[n, 1]`` without shape)."""
        shape = shape or (1,)
        u = (self._bits(math.prod(shape)) >> np.uint32(8)).astype(np.float32)
        u *= np.float32((hi - lo) * 2.0**-24)
        if lo:
            u += np.float32(lo)
        return torch.from_numpy(u.reshape(self.n, *shape))

    def normal(self, *shape: int) -> torch.Tensor:
        """Standard normal floats (Box-Muller), shape ``[n, *shape]``, float32."""
        u1 = 1.0 - self.uniform(*shape).double()
        u2 = self.uniform(*shape).double()
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).float()


# ----------------------------------------------------------------------------- fields


def _bspline(n_out: int, cell: float) -> torch.Tensor:
    """Cubic B-spline interpolation matrix ``[n_out, g]`` from a control grid with ``cell`` px,
    scaled to about unit output variance for unit-variance control points."""
    g = math.ceil(n_out / cell) + 3
    t = (np.arange(n_out)[:, None] + 0.5) / cell + 2.0 - np.arange(g)[None, :]  # [n_out, g]
    d = np.abs(t)
    w = np.where(d < 1, 4 - 6 * d**2 + 3 * d**3, np.where(d < 2, (2 - d) ** 3, 0.0)) / 6.0
    return torch.from_numpy((w / math.sqrt(0.479)).astype(np.float32))


def _noise(st: _Stream, size: int, cell: float, aniso: float = 1.0) -> torch.Tensor:
    """Smooth noise (about unit variance) with feature size ``cell`` px; ``aniso`` stretches it
    along x. Separable cubic B-spline of a random control grid, as two matmuls. ``[n,S,S]``."""
    for key in ((size, cell), (size, cell * aniso)):
        if key not in st.memo:
            st.memo[key] = _bspline(*key)
    ay, ax = st.memo[(size, cell)], st.memo[(size, cell * aniso)]
    g = st.uniform(ay.shape[1], ax.shape[1], lo=-math.sqrt(3.0), hi=math.sqrt(3.0))
    return ay @ g @ ax.T


def _fine(st: _Stream, size: int) -> torch.Tensor:
    """Fine grain, about unit variance, correlated over ~2 px (chromatin texture). ``[n,S,S]``."""
    return _noise(st, size, 1.6)


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _fibres(st: _Stream, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Wavy anisotropic stroma texture ``[n,S,S]`` (about N(0,1)) and the fibre angle ``[n,1]``."""
    n = st.n
    angle = st.uniform(lo=0.0, hi=math.pi)
    big = math.ceil(size * 1.45) + 2
    src = _noise(st, big, 2.2, aniso=10.0)[:, None]  # streaks along x, rotated below
    c, s = torch.cos(angle.double()).float()[:, 0], torch.sin(angle.double()).float()[:, 0]
    k = size / big
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([c * k, -s * k, zero], -1),
                         torch.stack([s * k, c * k, zero], -1)], 1)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    warp = torch.stack([_noise(st, size, 14.0), _noise(st, size, 14.0)], -1) * (3.0 / size)
    out = F.grid_sample(src, grid + warp, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out[:, 0], angle


def _at(field: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Sample ``field [n,S,S]`` at nearest pixels of centres ``[n,M]`` (clamped). ``[n,M]``."""
    s = field.shape[-1]
    ix = cx.floor().long().clamp(0, s - 1)
    iy = cy.floor().long().clamp(0, s - 1)
    return torch.gather(field.reshape(field.shape[0], -1), 1, iy * s + ix)


# ----------------------------------------------------------------------------- nuclei


def _grid_centres(st: _Stream, size: int, spacing: float, jitter: float,
                  scale: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Jittered-grid centres covering the patch plus a margin, the grid scaled per patch by a
    factor drawn from ``scale`` (so spacing varies). Each ``[n, M]``."""
    g = math.ceil((size + 4 * spacing) / spacing)
    base = (torch.arange(g, dtype=torch.float32) + 0.5) * spacing - 2 * spacing - size / 2
    by, bx = torch.meshgrid(base, base, indexing="ij")
    u = st.uniform(2 * g * g + 1)
    f = scale[0] + (scale[1] - scale[0]) * u[:, :1]
    j = (u[:, 1:].view(-1, 2, g * g) * 2.0 - 1.0) * (jitter * spacing)
    cx = (bx.reshape(1, -1) + j[:, 0]) * f + size / 2
    return cx, (by.reshape(1, -1) + j[:, 1]) * f + size / 2


def _random_centres(st: _Stream, size: int, per_px2: float, margin: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random centres, ``per_px2 * area`` candidates per patch. Each ``[n, M]``."""
    m = max(1, math.ceil(per_px2 * (size + 2 * margin) ** 2))
    c = st.uniform(2, m, lo=-margin, hi=size + margin)
    return c[:, 0], c[:, 1]


@dataclass
class _Nuclei:
    """Per-nucleus parameters, each ``[n, M]``: centre, semi-axes (px), angle, stain weight."""

    cx: torch.Tensor
    cy: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    angle: torch.Tensor
    weight: torch.Tensor
    pleo: torch.Tensor | None = None  # [n, M, 4] shape harmonics (cos2, sin2, cos3, sin3)
    rim: float = 0.0  # darker nuclear membrane (vesicular nuclei)
    nucleolus: float = 0.0  # stain weight of a central nucleolus
    edge: float = 0.7  # width (px) of the soft nuclear boundary


def _stamp(nuc: _Nuclei, size: int, k: int) -> torch.Tensor:
    """Render nuclei as soft ellipses in ``k x k`` windows summed onto the patch. ``[n,S,S]``.

    Only nuclei with a positive weight are drawn (the batch is compacted first).
    """
    n, m = nuc.cx.shape
    pad = k // 2 + 1
    sp = size + 2 * pad
    live = (nuc.weight > 0).reshape(-1).nonzero()[:, 0]

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n * m, *t.shape[2:])[live][:, None, None]

    cx, cy, a, b = pick(nuc.cx), pick(nuc.cy), pick(nuc.a), pick(nuc.b)
    ang = pick(nuc.angle).double()
    c, s = torch.cos(ang).float(), torch.sin(ang).float()
    off = torch.arange(k, dtype=torch.float32) - k // 2
    ix = cx.floor().clamp(-pad + k // 2, size + pad - k // 2 - 1)
    iy = cy.floor().clamp(-pad + k // 2, size + pad - k // 2 - 1)
    dx = ix + 0.5 - cx + off.view(1, 1, k)  # [L,1,k]
    dy = iy + 0.5 - cy + off.view(1, k, 1)  # [L,k,1]
    u = dx * (c / a) + dy * (s / a)  # [L,k,k]
    v = dy * (c / b) - dx * (s / b)
    r2 = u * u + v * v + 1e-6
    rho = torch.sqrt(r2)
    if nuc.pleo is not None:
        p = nuc.pleo.reshape(n * m, 4)[live][:, None, None, :]
        uu, vv, uv = u * u, v * v, u * v
        wobble = (p[..., 0] * (uu - vv) + p[..., 1] * 2 * uv) / r2 + (
            p[..., 2] * u * (uu - 3 * vv) + p[..., 3] * v * (3 * uu - vv)) / (r2 * rho)
        rho = rho / (1.0 + wobble)
    sharp = b / nuc.edge
    val = (sharp + 0.5 - rho * sharp).clamp(0.0, 1.0)
    if nuc.rim:
        val = val * (1.0 + nuc.rim * (r2 - 0.5).clamp(min=-0.5, max=0.5))
    if nuc.nucleolus:
        val = val + nuc.nucleolus * (1.0 - r2 * 12.0).clamp(min=0.0)
    row = ((live // m).view(-1, 1, 1) * sp + (iy + pad).long() + off.long().view(1, k, 1)) * sp
    col = (ix + pad).long() + off.long().view(1, 1, k)
    canvas = torch.zeros(n * sp * sp)
    canvas.index_add_(0, (row + col).reshape(-1), (val * pick(nuc.weight)).reshape(-1))
    canvas = canvas.view(n, sp, sp)[:, pad:pad + size, pad:pad + size]
    return canvas.clamp(max=2.2)


def _draw_nuclei(st: _Stream, cx: torch.Tensor, cy: torch.Tensor, accept: torch.Tensor,
                 radius: tuple[float, float], aspect: tuple[float, float],
                 weight: tuple[float, float], angle: torch.Tensor | None = None,
                 pleo: float = 0.0, **style: float) -> _Nuclei:
    """Random nuclei at candidate centres ``[n,M]``; each kept with probability ``accept``.

    Args:
        radius, aspect, weight: uniform ranges of the long semi-axis (px), short/long axis ratio
            and stain weight. ``angle`` ``[n,M]`` overrides the random orientation.
        pleo: amplitude of random shape harmonics (0 = plain ellipses).
        style: ``rim``, ``nucleolus`` and ``edge`` of :class:`_Nuclei`.
    """
    m = cx.shape[1]
    u = st.uniform(5, m)
    keep = (u[:, 0] < accept).float()
    a = radius[0] + (radius[1] - radius[0]) * u[:, 1]
    b = a * (aspect[0] + (aspect[1] - aspect[0]) * u[:, 2])
    ang = u[:, 3] * math.pi if angle is None else angle
    w = keep * (weight[0] + (weight[1] - weight[0]) * u[:, 4])
    harm = st.uniform(m, 4, lo=-pleo, hi=pleo) if pleo else None
    return _Nuclei(cx, cy, a, b, ang, w, harm, **style)


# ----------------------------------------------------------------------------- normal tissue


@dataclass
class _Tissue:
    """Concentration maps ``[n,S,S]`` (H, E) and per-patch stain parameters."""

    h: torch.Tensor
    e: torch.Tensor
    stains: torch.Tensor  # [n, 2, 3] optical-density vectors (rows H, E)
    white: torch.Tensor  # [n, 3] background intensity
    grain: torch.Tensor  # [n, S, S, 3] sensor noise in intensity units


def _structure(st: _Stream, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tissue presence ``T`` (0 = lumen/fat), parenchyma share ``P`` and fat share. ``[n,S,S]``."""
    fat_amount = st.uniform()[:, 0]
    fat_amount = torch.where(fat_amount < 0.8, torch.zeros_like(fat_amount),
                             (fat_amount - 0.8) * 5.0)[:, None, None]
    region = ((_noise(st, size, 40.0) * 0.5 + fat_amount * 2.5 - 1.2) / 0.4 + 0.5).clamp(0, 1)
    region = region * (fat_amount > 0)
    width = st.uniform(lo=0.12, hi=0.22)[:, :, None]
    membrane = (1.0 - _noise(st, size, 8.0).abs() / width).clamp(0.0, 1.0) * 1.3
    hole_thr = st.uniform(lo=1.4, hi=3.2)[:, :, None]
    hole = _smoothstep((_noise(st, size, 7.0) - hole_thr) / 0.35)
    presence = (1.0 - region * (1.0 - membrane)) * (1.0 - hole)
    par_thr = st.uniform(lo=-1.4, hi=1.4)[:, :, None]
    par = _smoothstep((_noise(st, size, 18.0) - par_thr) / 0.5 + 0.5)
    return presence, par, region


def _normal_tissue(st: _Stream, size: int) -> _Tissue:
    """Render anomaly-free tissue for a batch of patches."""
    presence, par, _ = _structure(st, size)
    fib, fib_angle = _fibres(st, size)
    e_base = st.uniform(lo=0.45, hi=0.85)[:, :, None]
    ridge = (1.0 - fib.abs() / 0.7).clamp(min=0.0)  # thin wavy fibres at zero crossings
    stroma_e = e_base * (0.55 + 0.75 * ridge + 0.15 * fib)
    stroma_e = stroma_e * (1.0 - 0.85 * _smoothstep((fib.abs() - 1.5) / 0.5))  # pale clefts
    grain = _fine(st, size)
    par_e = e_base * (0.7 + 0.08 * grain + 0.12 * _noise(st, size, 4.0))
    h_bg = st.uniform(lo=0.02, hi=0.12)[:, :, None]
    e = presence * (par * par_e + (1 - par) * stroma_e)
    h = presence * (h_bg + par * 0.1)
    h = h + presence * _normal_nuclei(st, size, presence, par, fib_angle, grain)
    return _Tissue(h=h, e=e, **_stain_params(st, size))


def _normal_nuclei(st: _Stream, size: int, presence: torch.Tensor, par: torch.Tensor,
                   fib_angle: torch.Tensor, grain: torch.Tensor) -> torch.Tensor:
    """Hematoxylin of normal nuclei: parenchymal, stromal spindle and lymphocytes. ``[n,S,S]``."""
    level = st.uniform(3)
    cx, cy = _grid_centres(st, size, 7.5, 0.25, scale=(0.9, 1.25))
    epi = _draw_nuclei(st, cx, cy, (0.6 + 0.35 * level[:, :1]) * _at(par * presence, cx, cy),
                       (2.6, 3.6), (0.7, 0.95), (0.55, 0.95), rim=0.5)
    cx, cy = _random_centres(st, size, 1 / 70, 4.0)
    angle = fib_angle + 0.3 * st.normal(cx.shape[1])
    spindle = _draw_nuclei(st, cx, cy, (0.3 + 0.7 * level[:, 1:2]) * _at((1 - par) * presence,
                           cx, cy), (3.0, 5.0), (0.25, 0.4), (0.8, 1.2), angle=angle)
    cx, cy = _random_centres(st, size, 1 / 90, 3.0)
    lymph = _draw_nuclei(st, cx, cy, 0.5 * level[:, 2:] ** 2 * _at(presence, cx, cy),
                         (1.7, 2.2), (0.85, 1.0), (1.2, 1.6))
    return (_stamp(epi, size, 9) * (1 + 0.3 * grain) + _stamp(spindle, size, 11)
            * (1 + 0.15 * grain) + _stamp(lymph, size, 7) * (1 + 0.1 * grain))


def _stain_params(st: _Stream, size: int) -> dict[str, torch.Tensor]:
    """Per-patch stain vectors, stain strengths, white point and sensor noise."""
    base = torch.from_numpy(_STAINS)[None]
    vec = base + 0.05 * st.normal(2, 3)
    vec = vec.clamp(min=0.02)
    vec = vec / vec.norm(dim=-1, keepdim=True)
    strength = st.uniform(2, lo=0.65, hi=1.35) * torch.tensor([[1.1, 0.95]])
    stains = vec * strength[:, :, None]
    white = st.uniform(lo=236.0, hi=252.0) + st.uniform(3, lo=-4.0, hi=4.0)
    sigma = st.uniform(lo=1.0, hi=2.5)[:, :, None, None]
    grain = st.uniform(size, size, 1, lo=-1.7, hi=1.7) * sigma
    return {"stains": stains, "white": white, "grain": grain}


# ----------------------------------------------------------------------------- anomalies


def _region(st: _Stream, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random blob: blending weight ``alpha`` in [0,1] and its support ``mask``. ``[n,S,S]``."""
    centre = st.uniform(2, lo=0.3 * size, hi=0.7 * size)
    radius = st.uniform(2, lo=0.2 * size, hi=0.33 * size)
    ang = st.uniform(lo=0.0, hi=math.pi)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx = xx[None] - centre[:, 0, None, None]
    dy = yy[None] - centre[:, 1, None, None]
    c = torch.cos(ang.double()).float()[:, :, None]
    s = torch.sin(ang.double()).float()[:, :, None]
    u = (dx * c + dy * s) / radius[:, 0, None, None]
    v = (dy * c - dx * s) / radius[:, 1, None, None]
    level = torch.sqrt(u * u + v * v) + 0.3 * _noise(st, size, max(6.0, size / 5))
    rmin = radius.min(1).values[:, None, None]
    alpha = ((1.0 - level) * rmin / 2.0).clamp(0.0, 1.0)
    return alpha, alpha > 0


def _tumor(st: _Stream, size: int, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tumour cell sheet: amphophilic cytoplasm and crowded atypical nuclei. (H, E) ``[n,S,S]``."""
    grain = _fine(st, size)
    e = st.uniform(lo=0.35, hi=0.55)[:, :, None] * (0.85 + 0.15 * _noise(st, size, 6.0))
    h = st.uniform(lo=0.12, hi=0.22)[:, :, None] + 0.03 * grain
    cx, cy = _grid_centres(st, size, 9.5, 0.3, scale=(0.9, 1.1))
    nuc = _draw_nuclei(st, cx, cy, 0.97 * _at(inside, cx, cy), (3.6, 5.4), (0.6, 1.0),
                       (1.1, 1.6), pleo=0.22, rim=0.4, nucleolus=0.8)
    return h + _stamp(nuc, size, 13) * (1.0 + 0.45 * grain), e


def _necrosis(st: _Stream, size: int, inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pale homogeneous eosinophilic area with karyorrhectic debris. (H, E) ``[n,S,S]``."""
    e = st.uniform(lo=0.4, hi=0.6)[:, :, None] * (0.9 + 0.12 * _noise(st, size, 9.0))
    h = st.uniform(lo=0.0, hi=0.04)[:, :, None].expand_as(e)
    cx, cy = _grid_centres(st, size, 8.0, 0.35)
    ghost = _draw_nuclei(st, cx, cy, torch.ones(()), (2.2, 3.2), (0.75, 1.0), (0.05, 0.15))
    cx, cy = _random_centres(st, size, 1 / 25, 2.0)
    debris = _draw_nuclei(st, cx, cy, 0.8 * _at(inside, cx, cy), (0.6, 1.4), (0.5, 1.0),
                          (1.2, 1.8), pleo=0.25, edge=0.5)
    return h + _stamp(ghost, size, 9) + _stamp(debris, size, 5), e


def _inflammation(st: _Stream, size: int, inside: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense infiltrate of small round dark lymphocytes. (H, E) ``[n,S,S]``."""
    grain = _fine(st, size)
    e = st.uniform(lo=0.25, hi=0.4)[:, :, None] * (0.85 + 0.2 * _noise(st, size, 5.0))
    h = st.uniform(lo=0.08, hi=0.15)[:, :, None].expand_as(e)
    cx, cy = _grid_centres(st, size, 4.6, 0.3, scale=(0.95, 1.1))
    nuc = _draw_nuclei(st, cx, cy, 0.95 * _at(inside, cx, cy), (1.6, 2.1), (0.85, 1.0),
                       (1.4, 1.9))
    return h + _stamp(nuc, size, 7) * (1.0 + 0.1 * grain), e


_RENDERERS = MappingProxyType(
    {"tumor": _tumor, "necrosis": _necrosis, "inflammation": _inflammation})


# ----------------------------------------------------------------------------- rendering


def _chunk_size(size: int) -> int:
    """Patches per internal chunk (a function of ``size`` only, so layouts never change)."""
    return max(1, min(256, 2**18 // (size * size)))


def _assign(seed: int, index: np.ndarray, fraction: float, types: Sequence[str]) -> list[str]:
    """Kind of each patch from golden-ratio (low-discrepancy) sequences: any prefix of ``n``
    patches holds ``n * fraction`` anomalies up to a small discrepancy; depends only on the
    index (and the seed)."""
    u = _mix(_keys(seed, np.arange(2), 0, _STREAM_LABEL)) >> np.uint64(11)
    off = u.astype(np.float64) * 2.0**-53
    idx = index.astype(np.float64)
    anomalous = np.mod(off[0] + idx * _PHI, 1.0) < fraction
    which = np.floor(np.mod(off[1] + idx * _SQRT2M1, 1.0) * len(types)).astype(np.int64)
    return [types[w] if a else "normal" for a, w in zip(anomalous, which)]


def _to_rgb(h: torch.Tensor, e: torch.Tensor, t: _Tissue) -> torch.Tensor:
    """Beer-Lambert: concentrations ``[n,S,S]`` -> uint8 RGB ``[n,S,S,3]``."""
    od = h[..., None] * t.stains[:, None, None, 0] + e[..., None] * t.stains[:, None, None, 1]
    rgb = t.white[:, None, None, :] * torch.exp(-od) + t.grain
    return rgb.round().clamp(0, 255).to(torch.uint8)


def _render_chunk(seed: int, size: int, start: int, count: int, fraction: float,
                  types: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render patches ``start .. start+count-1``: uint8 ``[c,S,S,3]``, bool ``[c,S,S]``, kinds."""
    index = np.arange(start, start + count)
    tissue = _normal_tissue(_Stream(_keys(seed, index, size, _STREAM_NORMAL)), size)
    kinds = _assign(seed, index, fraction, types)
    h, e = tissue.h.clone(), tissue.e.clone()
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for kind in ANOMALY_TYPES:
        sel = torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long)
        if sel.numel() == 0:
            continue
        stream = _STREAM_ANOMALY + 16 * (1 + ANOMALY_TYPES.index(kind))
        st = _Stream(_keys(seed, index[sel.numpy()], size, stream))
        alpha, mask = _region(st, size)
        ah, ae = _RENDERERS[kind](st, size, mask.float())
        h0, e0 = h[sel], e[sel]
        h[sel] = torch.where(mask, h0 + alpha * (ah - h0), h0)
        e[sel] = torch.where(mask, e0 + alpha * (ae - e0), e0)
        masks[sel] = mask
    return _to_rgb(h, e, tissue).numpy(), masks.numpy(), kinds


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops single-threaded, restoring the thread count afterwards.

    Rendering is many medium-sized ops for which intra-op threads cost more in synchronisation
    than they gain (parallelise with DataLoader workers instead), and a fixed thread count makes
    the float results, hence the uint8 images, independent of the caller's thread settings.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check(n: int, size: int, seed: int, fraction: float, types: Sequence[str]) -> None:
    if int(n) != n or n <= 0:
        raise ConfigError(f"synthetic: n must be a positive integer, got {n}")
    if int(size) != size or size < 16:
        raise ConfigError(f"synthetic: size must be an integer >= 16, got {size}")
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"synthetic: seed must be a non-negative integer, got {seed}")
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"synthetic: anomaly_fraction must be in [0, 1], got {fraction}")
    bad = [t for t in types if t not in ANOMALY_TYPES]
    if not types or bad:
        raise ConfigError(f"synthetic: anomaly_types must be a non-empty subset of "
                          f"{list(ANOMALY_TYPES)}, got {list(types)}")


@dataclass
class SyntheticBatch:
    """Synthetic patches with ground truth.

    Attributes:
        images: uint8 ``[N,H,W,3]`` RGB.
        masks: bool ``[N,H,W]``, the exact anomaly region (all False for normal patches).
        labels: int64 ``[N]``, 0 normal / 1 anomalous.
        kinds: ``"normal"`` or the anomaly type, per patch.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    kinds: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, key: slice | Sequence[int] | np.ndarray) -> SyntheticBatch:
        """Sub-batch by slice or index array."""
        if isinstance(key, slice):
            kinds = self.kinds[key]
        else:
            key = np.asarray(key, dtype=np.int64)
            kinds = [self.kinds[int(i)] for i in key]
        return SyntheticBatch(self.images[key], self.masks[key], self.labels[key], kinds)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SyntheticBatch):
            return NotImplemented
        return (self.kinds == other.kinds and np.array_equal(self.images, other.images)
                and np.array_equal(self.masks, other.masks)
                and np.array_equal(self.labels, other.labels))


def generate_range(start: int, stop: int, size: int = 64, seed: int = 0,
                   anomaly_fraction: float = 0.0,
                   anomaly_types: Sequence[str] = ANOMALY_TYPES) -> SyntheticBatch:
    """Patches ``start .. stop-1`` of the sequence defined by ``(seed, size, anomaly settings)``.

    Returns:
        The same patches as ``generate(stop, ...)[start:stop]``.
    """
    types = tuple(anomaly_types)
    _check(max(stop - start, 0) or 0, size, seed, anomaly_fraction, types)
    if start < 0:
        raise ConfigError(f"synthetic: start must be >= 0, got {start}")
    c = _chunk_size(size)
    imgs, masks, kinds = [], [], []
    for first in range(start // c * c, stop, c):  # index-aligned chunks: fixed tensor layouts
        with _one_thread():
            im, m, k = _render_chunk(seed, size, first, c, anomaly_fraction, types)
        lo, hi = max(start - first, 0), min(stop - first, c)
        imgs.append(im[lo:hi])
        masks.append(m[lo:hi])
        kinds += k[lo:hi]
    labels = np.array([k != "normal" for k in kinds], dtype=np.int64)
    return SyntheticBatch(np.concatenate(imgs), np.concatenate(masks), labels, kinds)


def generate(n: int, size: int = 64, seed: int = 0, anomaly_fraction: float = 0.0,
             anomaly_types: Sequence[str] = ANOMALY_TYPES) -> SyntheticBatch:
    """Generate ``n`` procedural H&E-like patches, a fraction of them with planted anomalies.

    Patch ``i`` depends only on ``(seed, i, size, anomaly_fraction, anomaly_types)``, so
    ``generate(10)[:5] == generate(5)``; with the same seed, normal tissue is identical whatever
    the anomaly settings (anomalies are composited inside their masks only).

    Args:
        n: number of patches (> 0).
        size: side in pixels (>= 16); the magnification is fixed (nuclei are 4-12 px wide).
        seed: non-negative integer.
        anomaly_fraction: share of anomalous patches in [0, 1] (exact up to a small discrepancy).
        anomaly_types: subset of ``("tumor", "necrosis", "inflammation")``.
    Returns:
        A :class:`SyntheticBatch` (images uint8 ``[n,size,size,3]``, masks bool ``[n,size,size]``).
    """
    return generate_range(0, n, size, seed, anomaly_fraction, anomaly_types)


# ----------------------------------------------------------------------------- dataset and files


class SyntheticTissue(torch.utils.data.Dataset):
    """A map-style dataset of synthetic patches, rendered lazily chunk by chunk and cached.

    Items are dicts: ``image`` float ``[3,H,W]`` in [-1,1], ``label`` int, ``path``
    ``"synthetic/<i>"``, ``cls`` (kind) and ``mask`` float ``[H,W]`` in {0,1}.
    """

    def __init__(self, n: int, size: int = 64, seed: int = 0, anomaly_fraction: float = 0.0,
                 anomaly_types: Sequence[str] = ANOMALY_TYPES) -> None:
        _check(n, size, seed, anomaly_fraction, tuple(anomaly_types))
        self.n, self.size, self.seed = int(n), int(size), int(seed)
        self.anomaly_fraction = float(anomaly_fraction)
        self.anomaly_types = tuple(anomaly_types)
        self._chunk = _chunk_size(self.size)
        self._cache: dict[int, SyntheticBatch] = {}

    def __len__(self) -> int:
        return self.n

    def _batch(self, chunk: int) -> SyntheticBatch:
        if chunk not in self._cache:
            if len(self._cache) >= 64:
                self._cache.pop(next(iter(self._cache)))
            start = chunk * self._chunk
            self._cache[chunk] = generate_range(start, min(start + self._chunk, self.n),
                                                self.size, self.seed, self.anomaly_fraction,
                                                self.anomaly_types)
        return self._cache[chunk]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} patches")
        i = i % self.n
        b = self._batch(i // self._chunk)
        j = i % self._chunk
        image = torch.from_numpy(rearrange(b.images[j], "h w c -> c h w").copy())
        return {"image": image.float() / 127.5 - 1.0, "label": int(b.labels[j]),
                "path": f"synthetic/{i}", "cls": b.kinds[j],
                "mask": torch.from_numpy(b.masks[j].astype(np.float32))}


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _set_files(out: Path, name: str) -> list[Path] | None:
    """The patches and masks a list of ours in ``out`` (``manifest.csv`` or the pending list)
    names, or ``None`` when that file is absent or not written by :func:`write_folder`."""
    p = out / name
    try:
        lines = p.read_text(encoding="utf-8").splitlines() if p.is_file() else []
    except UnicodeDecodeError:
        return None
    if not lines or lines[0] != MANIFEST_HEADER:
        return None
    files = []
    for line in lines[1:]:
        folder, _, fname = line.split(",")[0].partition("/")
        if folder not in ("normal", "anomalous") or "/" in fname or not fname.endswith(".png"):
            raise DataError(f"{p}: unexpected row {line!r}; not a manifest of gen-ad synth")
        files.append(out / folder / fname)
        if folder == "anomalous":
            files.append(out / "masks" / fname)
    return files


def _holds_images(out: Path) -> bool:
    """Whether any image file lies in ``out`` or below it."""

    return out.is_dir() and any(f.is_file() and is_image_file(f) for f in out.rglob("*"))


def clear_previous_set(out: Path) -> int:
    """Delete the synthetic set an earlier :func:`write_folder` left in ``out``: the files its
    ``manifest.csv`` (or an interrupted run's pending list) names, their masks, the default
    contact sheet and the manifest. No other file is touched. Returns the number deleted.

    Raises:
        DataError: ``out`` holds images but no list of ours (another data set, perhaps).
    """
    lists = [_set_files(out, name) for name in (MANIFEST_NAME, _PENDING)]
    if lists == [None, None]:
        if _holds_images(out):
            raise DataError(f"{out} holds images but no {MANIFEST_NAME} of gen-ad synth: "
                            "refusing to write a synthetic set among them; choose an empty or "
                            "new --out (or delete that folder's images)")
        return 0
    gone = [f for f in [*(lists[0] or []), *(lists[1] or []), out / SHEET_NAME] if f.is_file()]
    for f in gone:
        f.unlink()
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for d in _SET_FOLDERS:  # a folder the new set does not fill must not stay as an empty class
        if (out / d).is_dir() and not any((out / d).iterdir()):
            (out / d).rmdir()
    return len(gone)


def write_folder(out: Path, n: int, size: int = 64, seed: int = 0,
                 anomaly_fraction: float = 0.0,
                 anomaly_types: Sequence[str] = ANOMALY_TYPES) -> dict[str, int]:
    """Write a synthetic patch folder, replacing a set an earlier call wrote there.

    Layout: ``out/normal/<i>.png``, ``out/anomalous/<i>.png``, ``out/masks/<i>.png`` (mask of the
    anomalous image with the same name, 0/255) and ``out/manifest.csv`` (``path,label,kind``,
    paths relative to ``out``), written last. Every file is written atomically. An earlier set's
    files are deleted first (:func:`clear_previous_set`); a folder holding other images is
    refused. Until the manifest is written, a hidden pending list names the files of this set,
    so an interrupted call is cleaned up by the next.

    Returns:
        Counts: ``{"normal": ..., "anomalous": ..., "tumor": ..., ..., "replaced": ...}``, the
        last the number of files of an earlier set deleted (patches, masks, contact sheet).
    Raises:
        DataError: ``out`` holds images but no manifest of ours.
    """
    out = Path(out)
    types = tuple(anomaly_types)
    _check(n, size, seed, anomaly_fraction, types)
    kinds = _assign(seed, np.arange(n), anomaly_fraction, types)  # what generate_range renders
    rows = [MANIFEST_HEADER] + [
        f"{'normal' if k == 'normal' else 'anomalous'}/{i:06d}.png,{int(k != 'normal')},{k}"
        for i, k in enumerate(kinds)]
    replaced = clear_previous_set(out)
    write_text(out / _PENDING, "\n".join(rows) + "\n")
    counts = {"normal": 0, "anomalous": 0, **{t: 0 for t in types}}
    c = _chunk_size(size)
    for start in range(0, n, c):
        b = generate_range(start, min(start + c, n), size, seed, anomaly_fraction, types)
        for j, kind in enumerate(b.kinds):
            name = f"{start + j:06d}.png"
            folder = "normal" if kind == "normal" else "anomalous"
            _save_png(out / folder / name, b.images[j])
            if kind != "normal":
                _save_png(out / "masks" / name, b.masks[j].astype(np.uint8) * 255)
                counts[kind] += 1
            counts[folder] += 1
    write_text(out / MANIFEST_NAME, "\n".join(rows) + "\n")
    (out / _PENDING).unlink()
    return {**counts, "replaced": replaced}
