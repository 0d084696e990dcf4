"""Adaptive discriminator augmentation (ADA, Karras et al. 2020b) in batched, differentiable torch.

Every image shown to the discriminator (real and generated alike) goes through the same random
pipeline; each transform is applied to a sample with probability ``p``:

* geometric, one 2-D affine resampling per image (bilinear ``grid_sample`` with reflection
  padding, through :mod:`gen_ad.training.grid_sample` on every device: double-differentiable
  w.r.t. the image, so R1 works through it on CUDA too). As in the reference implementation, a
  batch with any non-integer transform is resampled **anti-aliased**: reflect-padded, upsampled
  2x with the symlet-6 low-pass filter, sampled at twice the resolution, low-pass filtered and
  decimated back (the up/down pair alone is the identity, tested), so rotations and down-scaling
  do not alias; a batch of integer transforms only (flips, 90-degree turns, whole-pixel shifts)
  is sampled directly and stays an exact pixel permutation. Transforms: x-flip, 90-degree
  rotations, integer
  translation (up to 1/8 of the size), isotropic scaling (log2-normal, std 0.2), arbitrary rotation
  (probability ``1 - sqrt(1 - p)`` before and after the anisotropic scaling, as in the paper),
  anisotropic scaling (std 0.2), fractional translation (normal, std 1/8);
* colour, one 4x4 affine colour matrix per image: brightness (normal, std 0.2), contrast
  (log2-normal, std 0.5), luma flip, hue rotation (uniform angle), saturation (log2-normal, std 1).

:class:`AdaptiveAugment` holds ``p`` and adjusts it every ``interval`` discriminator steps from the
overfitting heuristic ``r_t = E[sign(D(real))]`` towards ``target`` (0.6), at a speed that lets
``p`` go from 0 to 1 in ``speed_kimg`` (500) thousand images. All random draws come from the
caller's ``torch.Generator`` (exact resume).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gen_ad.models.fir import downsample2d, setup_filter, upsample2d
from gen_ad.training.grid_sample import grid_sample

GEOMETRIC = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOUR = ("brightness", "contrast", "lumaflip", "hue", "saturation")
#: Daubechies symlet-6 scaling (low-pass) filter, the standard wavelet table values; the
#: reference implementation's anti-aliasing filter for geometric augmentation.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036,
        -0.007800708325034148)


@dataclass
class AugmentSpec:
    """Which transforms are enabled (multipliers of ``p``; the default is ADA's ``bgc``)."""

    xflip: float = 1.0
    rotate90: float = 1.0
    xint: float = 1.0
    scale: float = 1.0
    rotate: float = 1.0
    aniso: float = 1.0
    xfrac: float = 1.0
    brightness: float = 1.0
    contrast: float = 1.0
    lumaflip: float = 1.0
    hue: float = 1.0
    saturation: float = 1.0


def _eye(b: int, n: int, ref: torch.Tensor) -> torch.Tensor:
    return torch.eye(n, device=ref.device, dtype=torch.float32).expand(b, n, n).clone()


def _gate(p: float, b: int, gen: torch.Generator | None, dev: torch.device) -> torch.Tensor:
    """``[B]`` bool: which samples get a transform applied with probability ``p``."""
    return torch.rand(b, generator=gen, device=dev) < p


def _mat2(a: torch.Tensor, b: torch.Tensor, tx: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
          ty: torch.Tensor) -> torch.Tensor:
    """Batch of 3x3 affine matrices ``[[a, b, tx], [c, d, ty], [0, 0, 1]]``."""
    z, o = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, z, z, o], dim=1).reshape(-1, 3, 3)


def _rot(theta: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(theta)
    return _mat2(theta.cos(), -theta.sin(), z, theta.sin(), theta.cos(), z)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(sx)
    return _mat2(sx, z, z, z, sy, z)


def _trans(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    o, z = torch.ones_like(tx), torch.zeros_like(tx)
    return _mat2(o, z, tx, z, o, ty)


def geometric_matrix(b: int, size: int, p: float, spec: AugmentSpec,
                     gen: torch.Generator | None, dev: torch.device) -> torch.Tensor:
    """``[B,3,3]`` output-to-input maps in normalised ``[-1,1]`` coordinates (identity where a
    transform is not drawn)."""
    one = torch.ones(b, device=dev)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=dev)

    def nrm(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev)

    m = _eye(b, 3, one)
    s = torch.where(_gate(p * spec.xflip, b, gen, dev), 1 - 2 * torch.floor(rnd(b) * 2), one)
    m = m @ _scale(s, one)
    k = torch.where(_gate(p * spec.rotate90, b, gen, dev), torch.floor(rnd(b) * 4), 0 * one)
    m = m @ _rot(-math.pi / 2 * k)
    t = torch.round((rnd(b, 2) * 2 - 1) * 0.125 * size) * 2 / size  # whole pixels
    t = torch.where(_gate(p * spec.xint, b, gen, dev)[:, None], t, 0 * t)
    m = m @ _trans(t[:, 0], t[:, 1])
    s = torch.where(_gate(p * spec.scale, b, gen, dev), torch.exp2(nrm(b) * 0.2), one)
    m = m @ _scale(s, s)
    p_rot = 1 - math.sqrt(max(1 - min(p * spec.rotate, 1.0), 0.0))
    th = torch.where(_gate(p_rot, b, gen, dev), (rnd(b) * 2 - 1) * math.pi, 0 * one)
    m = m @ _rot(-th)
    s = torch.where(_gate(p * spec.aniso, b, gen, dev), torch.exp2(nrm(b) * 0.2), one)
    m = m @ _scale(s, 1 / s)
    th = torch.where(_gate(p_rot, b, gen, dev), (rnd(b) * 2 - 1) * math.pi, 0 * one)
    m = m @ _rot(-th)
    t = nrm(b, 2) * 0.125 * 2
    t = torch.where(_gate(p * spec.xfrac, b, gen, dev)[:, None], t, 0 * t)
    return m @ _trans(t[:, 0], t[:, 1])


def colour_matrix(b: int, p: float, spec: AugmentSpec, gen: torch.Generator | None,
                  dev: torch.device) -> torch.Tensor:
    """``[B,4,4]`` affine colour transforms on RGB in ``[-1,1]`` (identity where not drawn)."""
    one = torch.ones(b, device=dev)
    eye = _eye(b, 4, one)
    v = torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev) / math.sqrt(3)
    vv = torch.outer(v, v)
    c = eye.clone()
    bright = torch.where(_gate(p * spec.brightness, b, gen, dev),
                         torch.randn(b, generator=gen, device=dev) * 0.2, 0 * one)
    t = eye.clone()
    t[:, :3, 3] = bright[:, None]
    c = t @ c
    con = torch.where(_gate(p * spec.contrast, b, gen, dev),
                      torch.exp2(torch.randn(b, generator=gen, device=dev) * 0.5), one)
    c = torch.diag_embed(torch.stack([con, con, con, one], dim=1)) @ c
    flip = torch.where(_gate(p * spec.lumaflip, b, gen, dev),
                       torch.floor(torch.rand(b, generator=gen, device=dev) * 2), 0 * one)
    c = (eye - 2 * vv * flip[:, None, None]) @ c
    th = torch.where(_gate(p * spec.hue, b, gen, dev),
                     (torch.rand(b, generator=gen, device=dev) * 2 - 1) * math.pi, 0 * one)
    c = _rotate_about(v[:3], th) @ c
    sat = torch.where(_gate(p * spec.saturation, b, gen, dev),
                      torch.exp2(torch.randn(b, generator=gen, device=dev)), one)
    c = (vv + (eye - vv) * sat[:, None, None]) @ c
    return c


def _rotate_about(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``[B,4,4]`` rotations by ``theta`` about the unit 3-vector ``axis`` (Rodrigues)."""
    b = theta.shape[0]
    x, y, z = axis.tolist()
    k = torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], device=theta.device)
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    eye3 = torch.eye(3, device=theta.device)
    r = eye3 * cos + sin * k + (1 - cos) * torch.outer(axis, axis)
    out = _eye(b, 4, theta)
    out[:, :3, :3] = r
    return out


def _integer_transforms(m: torch.Tensor, size: int) -> bool:
    """Whether every ``[B,3,3]`` map is a flip / 90-degree turn / whole-pixel shift."""
    lin, t = m[:, :2, :2], m[:, :2, 2] * size / 2
    return bool(((lin - lin.round()).abs().max() < 1e-6) & ((t - t.round()).abs().max() < 1e-4))


def _fine_grid(m: torch.Tensor, h: int, w: int, pad: int, margin: int) -> torch.Tensor:
    """Sampling grid ``[B, 2(H+2pad), 2(W+2pad), 2]`` at twice the resolution over the output
    extended by ``pad`` pixels, in the normalised coordinates of the upsampled input padded by
    ``margin``.

    FIR upsampling by 2 puts fine pixel ``j`` at coarse position ``j / 2`` (pixel centres at
    integers), a quarter pixel off the centre-of-cell convention; the output's fine pixels are
    placed with the same convention, so the transform turns about the true image centre (the
    reference's ``translate2d(-0.5, -0.5)`` conjugation at twice the resolution).

    Args:
        m: ``[B,3,3]`` output-to-input maps in the unpadded ``[-1,1]`` coordinates.
    """
    dev, dtype = m.device, m.dtype

    def centres(n: int) -> torch.Tensor:  # fine pixel centres of the padded output, normalised
        fine = torch.arange(2 * (n + 2 * pad), device=dev, dtype=dtype)
        return 2 * ((fine + 1) / 2 - pad) / n - 1

    gy, gx = torch.meshgrid(centres(h), centres(w), indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)
    src = torch.einsum("bij,hwj->bhwi", m[:, :2, :], pts)  # input points, unpadded coords
    size = torch.tensor([w, h], device=dev, dtype=dtype)
    # unpadded normalised -> pixels of the padded input, less the upsampling's quarter pixel
    px = (src + 1) * size / 2 + margin - 0.25
    return 2 * px / (size + 2 * margin) - 1


def _resample(x: torch.Tensor, m: torch.Tensor, antialias: bool) -> torch.Tensor:
    """Sample ``x`` ``[B,C,H,W]`` at ``m`` (normalised output-to-input maps ``[B,3,3]``),
    directly or anti-aliased: the input reflect-padded and upsampled 2x, the output (padded by
    the filter's reach) sampled at twice the resolution, low-pass filtered, decimated, cropped."""
    b, c, h, w = x.shape
    pad = len(SYM6) // 4  # the filter's reach at the lower resolution
    if not antialias or min(h, w) <= 2 * pad:  # reflect padding needs a few pixels
        grid = F.affine_grid(m[:, :2, :].to(x.dtype), [b, c, h, w], align_corners=False)
        return grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                           align_corners=False)
    f = setup_filter(SYM6)
    up = upsample2d(F.pad(x, [2 * pad] * 4, mode="reflect"), f)
    grid = _fine_grid(m.to(x.dtype), h, w, pad, 2 * pad)
    fine = grid_sample(up, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return downsample2d(fine, f.flip(0))[..., pad:pad + h, pad:pad + w]


def augment(x: torch.Tensor, p: float, generator: torch.Generator | None = None,
            spec: AugmentSpec | None = None) -> torch.Tensor:
    """Apply the ADA pipeline with probability ``p`` per transform and sample.

    Args:
        x: ``[B,3,H,W]`` images in ``[-1,1]`` (square).
        p: augmentation probability in ``[0,1]`` (``0`` returns ``x`` unchanged).
        generator: source of every random draw.
        spec: enabled transforms (default: all).
    Returns:
        ``[B,3,H,W]``, differentiable w.r.t. ``x`` (twice).
    """
    if p <= 0:
        return x
    spec = spec or AugmentSpec()
    b, c, h, w = x.shape
    dev = x.device
    if any(getattr(spec, k) > 0 for k in GEOMETRIC):
        m = geometric_matrix(b, w, p, spec, generator, dev)
        if not torch.equal(m, _eye(b, 3, m)):
            x = _resample(x, m, antialias=not _integer_transforms(m, w))
    if c == 3 and any(getattr(spec, k) > 0 for k in COLOUR):
        cm = colour_matrix(b, p, spec, generator, dev).to(x.dtype)
        x = torch.einsum("bij,bjhw->bihw", cm[:, :3, :3], x) + cm[:, :3, 3, None, None]
    return x


class AdaptiveAugment:
    """ADA's probability ``p`` and its controller (plain state, saved through ``state_dict``).

    Args:
        target: desired ``r_t = E[sign(D(real))]`` (0.6).
        interval: adjust every this many discriminator steps (4).
        speed_kimg: thousand images for ``p`` to go from 0 to 1 (500).
        p: initial probability.
        spec: enabled transforms.
    """

    def __init__(self, *, target: float = 0.6, interval: int = 4, speed_kimg: float = 500.0,
                 p: float = 0.0, spec: AugmentSpec | None = None) -> None:
        self.target, self.interval, self.speed_kimg = target, interval, speed_kimg
        self.spec = spec or AugmentSpec()
        self.p = float(p)
        self.sign_sum = 0.0
        self.count = 0.0
        self.rt = 0.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return augment(x, self.p, generator, self.spec)

    def accumulate(self, real_signs_sum: float, n: float) -> None:
        """Add ``sum(sign(D(real)))`` over ``n`` real images (already summed over processes)."""
        self.sign_sum += float(real_signs_sum)
        self.count += float(n)

    def maybe_adjust(self, d_step: int, batch_size: int) -> bool:
        """After discriminator step ``d_step`` (0-based): every ``interval`` steps move ``p`` by
        ``sign(r_t - target) * batch_size * interval / (speed_kimg * 1000)``, clamped to [0,1].

        Returns:
            Whether ``p`` was adjusted.
        """
        if (d_step + 1) % self.interval or self.count == 0:
            return False
        self.rt = self.sign_sum / self.count
        step = batch_size * self.interval / (self.speed_kimg * 1000.0)
        direction = (self.rt > self.target) - (self.rt < self.target)
        self.p = min(max(self.p + direction * step, 0.0), 1.0)
        self.sign_sum = self.count = 0.0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p, "sign_sum": self.sign_sum, "count": self.count, "rt": self.rt}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.p = float(state["p"])
        self.sign_sum = float(state.get("sign_sum", 0.0))
        self.count = float(state.get("count", 0.0))
        self.rt = float(state.get("rt", 0.0))
