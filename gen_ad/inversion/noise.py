"""Per-image random streams: the noise a scorer draws for an image depends on the image and the
seed alone, not on the batch it is scored in.

A ``torch.Generator`` draws one tensor for a whole batch, so an image's noise depends on its
position and on the batch size. :class:`ImageStreams` gives every image its own counter-based
stream instead, still drawn for the whole batch at once (a few elementwise integer kernels per
draw):

* the image's **key** hashes its float32 pixel bits, their positions and the seed
  (:func:`image_keys`);
* draw number ``c`` of element ``j`` of image ``b`` is ``mix(mix(key_b ^ mix(c)) + j * phi)``,
  with ``mix`` the "lowbias32" integer hash (C. Wellons, 2018; bias 0.17 against 0.21 for
  MurmurHash3's finaliser) evaluated twice, so neighbouring counters decorrelate;
* uniforms take the top 24 bits (``(u + 0.5) / 2^24``, never 0 or 1), normals come from the
  Box-Muller transform of two uniforms.

All integer work is exact int64 tensor arithmetic (32-bit products split into 16-bit halves, so
nothing overflows), hence the bits, and the uniforms, are identical on CPU and CUDA; normals agree
to the float32 rounding of ``log`` and ``cos``. Every image of a batch makes the same sequence of
draws, so draw ``c`` means the same thing for all of them. Simplex noise takes every table of an
image's fields, each octave's lattice placement included, from the image's stream, so the
weak-noise points (the lattice vertices) of different images fall at independent pixels. Two
identical images get identical noise.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from gen_ad.errors import ConfigError
from gen_ad.inversion.simplex import (
    SimplexConfig,
    SimplexTables,
    fractal_from_tables,
    standardize,
)

M32 = 0xFFFFFFFF
_PHI = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive element indices


def _mul32(v: torch.Tensor, c: int) -> torch.Tensor:
    """``(v * c) mod 2^32`` for int64 ``v`` in ``[0, 2^32)`` and ``c < 2^32``, without overflow."""
    lo, hi = v & 0xFFFF, v >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & M32


def mix32(v: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash of int64 values in ``[0, 2^32)`` (same range out)."""
    v = v ^ (v >> 16)
    v = _mul32(v, 0x7FEB352D)
    v = v ^ (v >> 15)
    v = _mul32(v, 0x846CA68B)
    return v ^ (v >> 16)


def _scalar(v: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(v & M32, dtype=torch.int64, device=device)


def image_keys(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One key ``[B]`` int64 in ``[0, 2^32)`` per image of ``x`` ``[B, ...]``: a hash of its
    float32 pixel bits with their positions, and of ``seed``."""
    flat = x.detach().float().contiguous().reshape(x.shape[0], -1)
    bits = flat.view(torch.int32).to(torch.int64) & M32
    pos = mix32((torch.arange(flat.shape[1], device=x.device, dtype=torch.int64)
                 + _scalar(seed, x.device)) & M32)
    h = mix32(bits ^ pos).sum(dim=1) & M32  # < N * 2^32: no overflow below 2^31 elements
    return mix32(h ^ mix32(_scalar(seed * 2 + 1, x.device)))


class ImageStreams:
    """A counter-based random stream per image (see the module docstring).

    Args:
        keys: ``[B]`` int64 image keys (:func:`image_keys`).
        seed: the seed the keys were made with.
    """

    def __init__(self, keys: torch.Tensor, seed: int) -> None:
        self.keys = keys
        self.seed = int(seed)
        self.counter = 0

    @classmethod
    def for_images(cls, x: torch.Tensor, seed: int) -> ImageStreams:
        """Streams keyed by the images ``x`` ``[B, ...]`` themselves."""
        return cls(image_keys(x, seed), seed)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def _bits(self, n: int) -> torch.Tensor:
        """``[B, n]`` int64 hash values of the next draw."""
        c = self.counter
        self.counter += 1
        s = mix32(self.keys ^ mix32(_scalar(c, self.device)))
        j = torch.arange(n, device=self.device, dtype=torch.int64) * _PHI
        return mix32(mix32((s[:, None] + j) & M32))

    def uniform(self, n: int) -> torch.Tensor:
        """``[B, n]`` float32 uniforms in ``(0, 1)``."""
        return ((self._bits(n) >> 8).float() + 0.5) * (1.0 / (1 << 24))

    def normal(self, n: int) -> torch.Tensor:
        """``[B, n]`` standard normals (Box-Muller)."""
        m = (n + 1) // 2
        u = self.uniform(2 * m)
        r = torch.sqrt(-2.0 * torch.log(u[:, :m]))
        angle = (2.0 * math.pi) * u[:, m:]
        return torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=1)[:, :n]

    def simplex(self, like: torch.Tensor, cfg: SimplexConfig) -> torch.Tensor:
        """Normalised fractal simplex noise shaped like ``like`` ``[B,C,H,W]``: every table of
        each image's fields (lattice placements included) from the image's own stream."""
        b, c, h, w = like.shape
        o = cfg.octaves
        perm = torch.argsort(rearrange(self.uniform(c * 256), "b (c k) -> (b c) k", c=c),
                             dim=1, stable=True)
        angle = rearrange(self.uniform(c * 256), "b (c k) -> (b c) k", c=c) * (2 * math.pi)
        offset = (rearrange(self.uniform(c * o * 2), "b (c o t) -> (b c) o t", c=c, o=o)
                  * 256).long().clamp_max(255)
        place = rearrange(self.uniform(c * o * 2), "b (c o t) -> (b c) o t", c=c, o=o)
        tables = SimplexTables(torch.cat([perm, perm], dim=1),
                               torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1),
                               offset, place)
        with torch.autocast(self.device.type, enabled=False):
            v = standardize(fractal_from_tables(tables, h, w, o, cfg.persistence, cfg.frequency))
        return rearrange(v, "(b c) h w -> b c h w", b=b)

    def draw(self, kind: str, like: torch.Tensor,
             simplex: SimplexConfig | None = None) -> torch.Tensor:
        """Noise shaped like ``like`` ``[B,C,H,W]`` (``gaussian`` or normalised ``simplex``),
        on its device and dtype."""
        if like.shape[0] != len(self.keys):
            raise ConfigError(f"{len(self.keys)} image streams cannot draw for a batch of "
                              f"{like.shape[0]}")
        if kind == "gaussian":
            n = self.normal(int(like[0].numel())).reshape(like.shape)
        elif kind == "simplex":
            n = self.simplex(like, simplex or SimplexConfig())
        else:
            raise ConfigError(f"unknown noise kind '{kind}' (choose gaussian or simplex)")
        return n.to(device=like.device, dtype=like.dtype)
