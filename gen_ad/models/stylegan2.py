"""StyleGAN2 generator and discriminator (Karras et al. 2020) in pure PyTorch.

* Mapping network: ``mapping_layers`` (8) equalised-LR fully connected layers with a learning-rate
  multiplier of 0.01, and a running average of ``w`` (for truncation and projection).
* Synthesis network ("skip" generator): a learned constant, then per resolution a modulated +
  demodulated 3x3 convolution with 2x FIR upsampling and a second one at the same resolution, each
  with a per-layer noise input (learned strength) and a ``toRGB`` whose images are upsampled and
  summed. The modulated convolution runs as one grouped convolution over the batch
  (``fused=True``, the default outside training) or by scaling activations around a shared
  convolution (``fused=False``, used in training as in the reference code; same result).
* Discriminator ("resnet"): residual blocks with FIR-downsampling 3x3 convolutions and 1x1 skips,
  then minibatch standard deviation (group 4, 1 channel), a 3x3 conv and two fully connected layers.

Channels at resolution ``r`` are ``min(channel_base // r, channel_max)``: config F is
``channel_base=32768`` and config E (half the feature maps at high resolutions) ``16384``, both
with ``channel_max=512`` (as in the official ``stylegan2-ada-pytorch`` code). Resolutions are
``init_res * 2**k``: 64/128/256/512 use ``init_res=4``; 96-px PCam patches use ``init_res=3``
(3 -> 6 -> ... -> 96). On CUDA the ``num_fp16_res`` highest-resolution blocks (but none below 8 px)
run in float16 (or bfloat16) with activations clamped to ``+-conv_clamp``; on CPU everything is
float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Literal

import einops
import torch
import torch.nn.functional as F
from torch import nn

from gen_ad.models.fir import conv2d_resample, setup_filter, upsample2d

CHANNEL_BASE: Mapping[str, int] = MappingProxyType({"E": 16384, "F": 32768})
"""``channel_base`` of the paper's configs E and F (``channel_max`` 512)."""

NoiseMode = Literal["random", "const", "none"]
_LRELU_GAIN = math.sqrt(2.0)
_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float16": torch.float16, "bfloat16": torch.bfloat16})


def default_init_res(resolution: int) -> int:
    """Smallest start resolution: halve ``resolution`` while it stays even and above 4."""
    r = resolution
    while r % 2 == 0 and r > 4:
        r //= 2
    return r


def block_resolutions(resolution: int, init_res: int) -> list[int]:
    """``[init_res, 2*init_res, ..., resolution]``; raises if ``resolution`` is not reachable."""
    if init_res < 2 or resolution < 2 * init_res or resolution % init_res:
        raise ValueError(f"resolution {resolution} must be init_res ({init_res}) times a power "
                         f"of two >= 2, with init_res >= 2")
    n = resolution // init_res
    if n & (n - 1):
        raise ValueError(f"resolution {resolution} / init_res {init_res} = {n} is not a power of 2")
    return [init_res * 2 ** i for i in range(int(math.log2(n)) + 1)]


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    """Feature maps at resolution ``res``: ``min(channel_base // res, channel_max)``."""
    return max(1, min(channel_base // res, channel_max))


def fp16_min_resolution(resolution: int, num_fp16_res: int) -> int:
    """Lowest resolution whose blocks run in reduced precision (``> resolution`` when none)."""
    if num_fp16_res <= 0:
        return resolution * 2
    return max(resolution * 2 // 2 ** num_fp16_res, 8)


def bias_act(x: torch.Tensor, b: torch.Tensor | None, *, lrelu: bool, gain: float = 1.0,
             clamp: float | None = None) -> torch.Tensor:
    """Add a per-channel bias, apply leaky ReLU (0.2, gain sqrt 2) or identity, scale, clamp.

    Args:
        x: ``[B,C]`` or ``[B,C,H,W]`` activations (any float dtype; unbounded).
        b: ``[C]`` bias (cast to ``x``'s dtype) or ``None``.
        lrelu: leaky ReLU with slope 0.2 and gain ``sqrt(2)``, else identity.
        gain: extra scale after the activation.
        clamp: clamp the result to ``[-clamp, clamp]`` (``None``: unbounded).
    Returns:
        Same shape and dtype as ``x``.
    """
    if b is not None:
        # reshape, not einops: ``b`` is often a Parameter, and einops keys its backend cache on
        # the tensor type, a guard that recompiles torch.compile'd graphs (and x is 2-D or 4-D)
        x = x + b.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))
    if lrelu:
        x = F.leaky_relu(x, 0.2)
        gain = gain * _LRELU_GAIN
    if gain != 1.0:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row of ``[B,D]`` to unit mean square."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class FullyConnected(nn.Module):
    """Equalised-learning-rate linear layer (weights stored ``/ lr_mul``, scaled at run time)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 lrelu: bool = False, lr_mul: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        self.lrelu = lrelu
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,in] -> [B,out]``."""
        w = self.weight.to(x.dtype) * self.weight_gain
        b = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        x = x.matmul(w.t())
        return bias_act(x, b, lrelu=self.lrelu)


class Conv2dLayer(nn.Module):
    """Equalised-LR convolution with optional FIR 2x downsampling, bias, lrelu and clamping."""

    resample_filter: torch.Tensor  # buffer (register_buffer)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 bias: bool = True, lrelu: bool = True, down: bool = False,
                 conv_clamp: float | None = None, resample_filter: Sequence[float] = (1, 3, 3, 1),
                 ) -> None:
        super().__init__()
        self.lrelu, self.down, self.conv_clamp = lrelu, down, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter), persistent=False)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size ** 2)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """``[B,I,H,W] -> [B,O,H',W']`` (``H' = H/2`` when ``down``)."""
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(x, w, f=self.resample_filter, down=self.down)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias, lrelu=self.lrelu, gain=gain, clamp=clamp)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *,
                     demodulate: bool = True, up: bool = False, f: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None, fused: bool = True) -> torch.Tensor:
    """Modulated (and demodulated) convolution, batched over per-sample styles.

    Karras et al. 2020, Sec. 2.2: modulation scales the weight's input channels by the style,
    ``w'_oik = s_i w_oik`` (Eq. 1); demodulation divides each output channel by the norm of its
    modulated weight, ``w''_oik = w'_oik / sqrt(sum_{i,k} w'_oik^2 + 1e-8)`` (Eqs. 2-3: the
    expected output standard deviation for unit-variance inputs, then its inverse).

    Args:
        x: ``[B,I,H,W]`` activations.
        weight: ``[O,I,k,k]`` shared weight (already equalised).
        styles: ``[B,I]`` per-sample input-channel scales.
        demodulate: normalise each output channel's effective weight to unit norm.
        up: 2x FIR upsampling (needs ``f``).
        f: 1-D FIR filter.
        noise: optional ``[B|1,1,H',W']`` noise added after the convolution.
        fused: one grouped convolution (``groups=B``) with per-sample weights, or scale the
            activations before/after one shared convolution (mathematically the same).
    Returns:
        ``[B,O,H',W']``.
    """
    b, cin = styles.shape
    kh, kw = weight.shape[-2:]
    if x.dtype == torch.float16 and demodulate:  # keep float16 in range
        weight = weight * (1 / math.sqrt(cin * kh * kw)
                           / weight.abs().amax(dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.abs().amax(dim=1, keepdim=True)
    dcoefs = None
    if demodulate:
        wsq = (weight.unsqueeze(0) * einops.rearrange(styles, "b i -> b 1 i 1 1")).square()
        dcoefs = (wsq.sum(dim=[2, 3, 4]) + 1e-8).rsqrt()  # [B,O], Eq. 3's 1 / sigma_j (Eq. 2)
    if not fused:
        x = x * einops.rearrange(styles.to(x.dtype), "b i -> b i 1 1")
        x = conv2d_resample(x, weight.to(x.dtype), f=f, up=up)
        if dcoefs is not None:
            x = x * einops.rearrange(dcoefs.to(x.dtype), "b o -> b o 1 1")
        return x if noise is None else x + noise.to(x.dtype)
    w = weight.unsqueeze(0) * einops.rearrange(styles, "b i -> b 1 i 1 1")  # Eq. 1
    if dcoefs is not None:
        w = w * einops.rearrange(dcoefs, "b o -> b o 1 1 1")  # Eq. 3
    w = einops.rearrange(w, "b o i kh kw -> (b o) i kh kw").to(x.dtype)
    x = einops.rearrange(x, "b c h w -> 1 (b c) h w")
    x = conv2d_resample(x, w, f=f, up=up, groups=b)
    x = einops.rearrange(x, "1 (b c) h w -> b c h w", b=b)
    return x if noise is None else x + noise.to(x.dtype)


# ----------------------------------------------------------------------------- generator


class MappingNetwork(nn.Module):
    """``z -> w``: 2nd-moment normalisation then ``num_layers`` lrelu FC layers (lr x0.01)."""

    w_avg: torch.Tensor  # buffer (register_buffer)

    def __init__(self, *, z_dim: int, w_dim: int, num_layers: int = 8, lr_mul: float = 0.01,
                 w_avg_beta: float = 0.995) -> None:
        super().__init__()
        dims = [z_dim] + [w_dim] * num_layers
        self.layers = nn.ModuleList(
            FullyConnected(dims[i], dims[i + 1], lrelu=True, lr_mul=lr_mul)
            for i in range(num_layers))
        self.w_avg_beta = w_avg_beta
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, update_w_avg: bool = False) -> torch.Tensor:
        """``[B,z_dim] -> [B,w_dim]``; tracks the running mean of ``w`` when asked (training)."""
        x = normalize_2nd_moment(z.float())
        for layer in self.layers:
            x = layer(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        return x


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (+ optional 2x upsampling), noise input, bias, lrelu, clamp."""

    resample_filter: torch.Tensor  # buffers (register_buffer)
    noise_const: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int,
                 up: bool = False, conv_clamp: float | None = None,
                 resample_filter: Sequence[float] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.resolution, self.up, self.conv_clamp = resolution, up, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter), persistent=False)
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels * 9)

    def forward(self, x: torch.Tensor, w: torch.Tensor, *, noise: torch.Tensor | None = None,
                noise_mode: NoiseMode = "random", generator: torch.Generator | None = None,
                fused: bool = True) -> torch.Tensor:
        """``x [B,I,r',r']``, ``w [B,w_dim]`` -> ``[B,O,r,r]``; ``noise`` ``[B|1,1,r,r]``
        overrides ``noise_mode``."""
        styles = self.affine(w)
        b, r = x.shape[0], self.resolution
        if noise is None and noise_mode == "random":
            noise = torch.randn(b, 1, r, r, generator=generator, device=x.device)
        elif noise is None and noise_mode == "const":
            noise = einops.rearrange(self.noise_const, "h w -> 1 1 h w")
        if noise is not None:
            noise = noise * self.noise_strength
        weight = self.weight * self.weight_gain
        x = modulated_conv2d(x, weight, styles, up=self.up, f=self.resample_filter, noise=noise,
                             fused=fused)
        return bias_act(x, self.bias, lrelu=True, clamp=self.conv_clamp)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB (no demodulation) + bias, clamped."""

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int,
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """``x [B,I,r,r]`` features and ``w [B,w_dim]`` -> ``[B,3,r,r]`` RGB in ``x``'s dtype
        (unbounded image units, roughly ``[-1,1]`` once summed over resolutions; clamped to
        ``+-conv_clamp``)."""
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return bias_act(x, self.bias, lrelu=False, clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: (const | up-conv) -> conv -> toRGB (+ upsampled)."""

    resample_filter: torch.Tensor  # buffer (register_buffer)

    def __init__(self, in_channels: int, out_channels: int, *, w_dim: int, resolution: int,
                 img_channels: int, use_lowp: bool, conv_clamp: float | None,
                 resample_filter: Sequence[float] = (1, 3, 3, 1)) -> None:
        super().__init__()
        self.in_channels, self.resolution, self.use_lowp = in_channels, resolution, use_lowp
        self.register_buffer("resample_filter", setup_filter(resample_filter), persistent=False)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim,
                                        resolution=resolution, up=True, conv_clamp=conv_clamp,
                                        resample_filter=resample_filter)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim,
                                    resolution=resolution, conv_clamp=conv_clamp)
        self.torgb = ToRGB(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2

    def layers(self) -> list[SynthesisLayer]:
        """The noise-carrying layers of this block, in order."""
        return [self.conv1] if self.in_channels == 0 else [self.conv0, self.conv1]

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor, *,
                dtype: torch.dtype, noises: Sequence[torch.Tensor | None],
                noise_mode: NoiseMode, generator: torch.Generator | None, fused: bool,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ws [B,num_conv+1,w_dim]``; returns features ``[B,C,r,r]`` and image ``[B,3,r,r]``
        (float32)."""
        kw = {"noise_mode": noise_mode, "generator": generator, "fused": fused}
        if x is None:
            # [C,r,r] -> [B,C,r,r] (expand: einops would key its backend cache on the Parameter
            # type, a guard that recompiles torch.compile'd graphs)
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        x = x.to(dtype)
        for i, layer in enumerate(self.layers()):
            x = layer(x, ws[:, i], noise=noises[i], **kw)
        y = self.torgb(x, ws[:, self.num_conv], fused=fused).float()
        img = y if img is None else upsample2d(img, self.resample_filter) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """``ws [B,num_ws,w_dim] -> img [B,3,R,R]`` (skip architecture)."""

    def __init__(self, *, w_dim: int, resolution: int, init_res: int, img_channels: int,
                 channel_base: int, channel_max: int, num_fp16_res: int,
                 conv_clamp: float | None, lowp_dtype: str) -> None:
        super().__init__()
        self.w_dim, self.resolution = w_dim, resolution
        self.resolutions = block_resolutions(resolution, init_res)
        self.lowp_dtype = _DTYPES[lowp_dtype]
        lowp_from = fp16_min_resolution(resolution, num_fp16_res)
        self.blocks = nn.ModuleList()
        prev = 0
        for res in self.resolutions:
            ch = channels_at(res, channel_base, channel_max)
            self.blocks.append(SynthesisBlock(
                prev, ch, w_dim=w_dim, resolution=res, img_channels=img_channels,
                use_lowp=res >= lowp_from, conv_clamp=conv_clamp))
            prev = ch
        self.num_ws = sum(b.num_conv for b in self.blocks) + 1

    def noise_resolutions(self) -> list[int]:
        """Resolution of every noise input, in layer order."""
        return [layer.resolution for b in self.blocks for layer in b.layers()]

    def draw_noise(self, batch: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Fresh standard-normal ``[batch,1,r,r]`` maps for every noise layer, in layer order
        (``noise_mode="random"``; callers that run the synthesis compiled draw them with this)."""
        return [torch.randn(batch, 1, r, r, generator=generator, device=device)
                for r in self.noise_resolutions()]

    def forward(self, ws: torch.Tensor, *, noise: Sequence[torch.Tensor] | None = None,
                noise_mode: NoiseMode = "random", generator: torch.Generator | None = None,
                fused: bool | None = None, force_fp32: bool = False) -> torch.Tensor:
        """Args: ``ws [B,num_ws,w_dim]``; ``noise`` one ``[B|1,1,r,r]`` map per noise layer
        (overrides ``noise_mode``); ``fused`` defaults to grouped convolutions outside training.
        Returns ``[B,3,R,R]`` float32."""
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be [B,{self.num_ws},{self.w_dim}], got {tuple(ws.shape)}")
        n_noise = len(self.noise_resolutions())
        if noise is not None and len(noise) != n_noise:
            raise ValueError(f"expected {n_noise} noise maps, got {len(noise)}")
        if noise is None and noise_mode == "random":
            noise = self.draw_noise(ws.shape[0], generator, ws.device)
        noises = list(noise) if noise is not None else [None] * n_noise
        ws = ws.float()
        x = img = None
        w_idx = n_idx = 0
        for block in self.blocks:
            lowp = block.use_lowp and ws.device.type == "cuda" and not force_fp32
            dtype = self.lowp_dtype if lowp else torch.float32
            use_fused = fused if fused is not None else (not self.training and not lowp)
            n = block.num_conv
            x, img = block(x, img, ws[:, w_idx:w_idx + n + 1], dtype=dtype,
                           noises=noises[n_idx:n_idx + n], noise_mode=noise_mode,
                           generator=generator, fused=use_fused)
            w_idx += n
            n_idx += n
        return img


class Generator(nn.Module):
    """StyleGAN2 generator: mapping network + skip synthesis network.

    Args:
        resolution: output size ``R`` (``init_res * 2**k``; 64, 96, 128, 256, 512, ...).
        z_dim / w_dim: latent sizes (512 in the paper).
        channel_base / channel_max: feature maps ``min(channel_base // r, channel_max)``
            (config F: 32768/512, config E: 16384/512).
        mapping_layers: depth of the mapping network (8).
        mapping_lr_mul: learning-rate multiplier of the mapping network (0.01).
        init_res: resolution of the learned constant (default: :func:`default_init_res`).
        num_fp16_res: blocks (highest resolutions first, none below 8 px) in reduced precision
            on CUDA.
        conv_clamp: activation clamp (256; ``None`` disables).
        lowp_dtype: ``float16`` (reference) or ``bfloat16``.
        img_channels: 3.
        w_avg_beta: decay of the tracked mean of ``w``.
    """

    def __init__(self, *, resolution: int, z_dim: int = 512, w_dim: int = 512,
                 channel_base: int = 32768, channel_max: int = 512, mapping_layers: int = 8,
                 mapping_lr_mul: float = 0.01, init_res: int | None = None, num_fp16_res: int = 4,
                 conv_clamp: float | None = 256.0, lowp_dtype: str = "float16",
                 img_channels: int = 3, w_avg_beta: float = 0.995) -> None:
        super().__init__()
        if lowp_dtype not in _DTYPES:
            raise ValueError(f"lowp_dtype must be one of {sorted(_DTYPES)}, got {lowp_dtype!r}")
        self.resolution, self.z_dim, self.w_dim = resolution, z_dim, w_dim
        self.init_res = init_res or default_init_res(resolution)
        self.synthesis = SynthesisNetwork(
            w_dim=w_dim, resolution=resolution, init_res=self.init_res,
            img_channels=img_channels, channel_base=channel_base, channel_max=channel_max,
            num_fp16_res=num_fp16_res, conv_clamp=conv_clamp, lowp_dtype=lowp_dtype)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, w_dim=w_dim, num_layers=mapping_layers,
                                      lr_mul=mapping_lr_mul, w_avg_beta=w_avg_beta)

    def mapping_ws(self, z: torch.Tensor, *, truncation_psi: float = 1.0,
                   mix_z: torch.Tensor | None = None, mix_cutoff: int | None = None,
                   update_w_avg: bool | None = None) -> torch.Tensor:
        """``z [B,z_dim] -> ws [B,num_ws,w_dim]`` with optional style mixing from ``mix_z`` at
        layer ``mix_cutoff`` and truncation towards the tracked mean."""
        upd = self.training if update_w_avg is None else update_w_avg
        w = self.mapping(z, update_w_avg=upd)
        ws = einops.repeat(w, "b d -> b n d", n=self.num_ws)
        if mix_z is not None and mix_cutoff is not None and mix_cutoff < self.num_ws:
            w2 = einops.repeat(self.mapping(mix_z), "b d -> b n d", n=self.num_ws)
            layer = einops.rearrange(torch.arange(self.num_ws, device=ws.device), "n -> 1 n 1")
            keep = layer < mix_cutoff
            ws = torch.where(keep, ws, w2)
        if truncation_psi != 1.0:
            ws = self.mapping.w_avg.lerp(ws, truncation_psi)
        return ws

    def forward(self, z: torch.Tensor, *, truncation_psi: float = 1.0,
                mix_z: torch.Tensor | None = None, mix_cutoff: int | None = None,
                noise_mode: NoiseMode = "random", generator: torch.Generator | None = None,
                return_ws: bool = False, fused: bool | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``z [B,z_dim] -> img [B,3,R,R]`` (float32, roughly ``[-1,1]``).

        Returns ``(img, ws)`` when ``return_ws`` (``ws`` stays in the graph, for the path-length
        regulariser). Noise comes from ``generator`` (``noise_mode="random"``).
        """
        ws = self.mapping_ws(z, truncation_psi=truncation_psi, mix_z=mix_z, mix_cutoff=mix_cutoff)
        img = self.synthesis(ws, noise_mode=noise_mode, generator=generator, fused=fused)
        return (img, ws) if return_ws else img


# ----------------------------------------------------------------------------- discriminator


class DiscriminatorBlock(nn.Module):
    """Residual block: (fromRGB) -> conv3x3 -> conv3x3 down, plus a 1x1 down skip (x sqrt .5)."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, *,
                 img_channels: int, use_lowp: bool, conv_clamp: float | None) -> None:
        super().__init__()
        self.in_channels, self.use_lowp = in_channels, use_lowp
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, down=True, conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, lrelu=False, down=True)

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x [B,C,r,r] -> [B,O,r/2,r/2]`` in ``dtype``: images ``[B,3,r,r]`` in ``[-1,1]`` for
        the first block (``fromRGB``), else the previous block's features (unbounded; clamped to
        ``+-conv_clamp`` when set)."""
        x = x.to(dtype)
        if self.in_channels == 0:
            x = self.fromrgb(x)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y + x


def minibatch_stddev(x: torch.Tensor, group_size: int, num_channels: int = 1) -> torch.Tensor:
    """Append ``num_channels`` maps of the feature std. over groups of samples.

    The group is ``min(group_size, B)``, reduced to the largest divisor of ``B`` so that any batch
    size works. ``[B,C,H,W] -> [B,C+num_channels,H,W]``.
    """
    b, c, h, w = x.shape
    g = min(group_size, b)
    while b % g:
        g -= 1
    y = einops.rearrange(x.float(), "(g n) (f c) h w -> g n f c h w", g=g, f=num_channels)
    y = (y - y.mean(dim=0)).square().mean(dim=0)
    y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # [n, f]
    y = einops.repeat(y, "n f -> (g n) f h w", g=g, h=h, w=w)
    return torch.cat([x, y.to(x.dtype)], dim=1)


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator: ``img [B,3,R,R] -> logits [B,1]``.

    Args:
        resolution: input size ``R`` (``init_res * 2**k``).
        channel_base / channel_max: as in :class:`Generator`.
        init_res: resolution of the final (epilogue) stage (default: :func:`default_init_res`).
        mbstd_group / mbstd_channels: minibatch standard deviation (4, 1).
        num_fp16_res / conv_clamp / lowp_dtype / img_channels: as in :class:`Generator`.
    """

    def __init__(self, *, resolution: int, channel_base: int = 32768, channel_max: int = 512,
                 init_res: int | None = None, mbstd_group: int = 4, mbstd_channels: int = 1,
                 num_fp16_res: int = 4, conv_clamp: float | None = 256.0,
                 lowp_dtype: str = "float16", img_channels: int = 3) -> None:
        super().__init__()
        if lowp_dtype not in _DTYPES:
            raise ValueError(f"lowp_dtype must be one of {sorted(_DTYPES)}, got {lowp_dtype!r}")
        self.resolution = resolution
        self.init_res = init_res or default_init_res(resolution)
        self.lowp_dtype = _DTYPES[lowp_dtype]
        self.mbstd_group, self.mbstd_channels = mbstd_group, mbstd_channels
        res_list = block_resolutions(resolution, self.init_res)[::-1]
        lowp_from = fp16_min_resolution(resolution, num_fp16_res)
        ch = {r: channels_at(r, channel_base, channel_max) for r in res_list}
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(ch[r] if r < resolution else 0, ch[r], ch[r // 2],
                               img_channels=img_channels, use_lowp=r >= lowp_from,
                               conv_clamp=conv_clamp)
            for r in res_list[:-1])
        c4 = ch[self.init_res]
        self.conv = Conv2dLayer(c4 + mbstd_channels, c4, 3, conv_clamp=conv_clamp)
        self.fc = FullyConnected(c4 * self.init_res ** 2, c4, lrelu=True)
        self.out = FullyConnected(c4, 1)

    def features(self, img: torch.Tensor, force_fp32: bool = False,
                 mbstd_group: int | None = None) -> torch.Tensor:
        """Features before the last layer, ``[B,C]`` (for feature residuals).

        ``mbstd_group = 1`` computes the minibatch-std channel within each image alone (it is
        then constant), so an image's features do not depend on the rest of its batch.
        """
        if img.ndim != 4 or img.shape[-1] != self.resolution or img.shape[-2] != self.resolution:
            raise ValueError(f"expected images [B,C,{self.resolution},{self.resolution}], got "
                             f"{tuple(img.shape)}")
        x = img
        for block in self.blocks:
            lowp = block.use_lowp and x.device.type == "cuda" and not force_fp32
            x = block(x, self.lowp_dtype if lowp else torch.float32)
        x = x.float()
        if self.mbstd_channels > 0:
            x = minibatch_stddev(x, mbstd_group or self.mbstd_group, self.mbstd_channels)
        x = self.conv(x)
        return self.fc(einops.rearrange(x, "b c h w -> b (c h w)"))

    def forward(self, img: torch.Tensor, force_fp32: bool = False) -> torch.Tensor:
        """``[B,3,R,R] -> [B,1]`` float32 logits."""
        return self.out(self.features(img, force_fp32=force_fp32))


class LatentEncoder(nn.Module):
    """Image -> ``w+`` encoder that initialises projection: ``[B,3,R,R] -> [B,num_ws,w_dim]``.

    A residual discriminator-style trunk (no minibatch std.) and two FC layers predict an offset
    from ``w_avg`` (a buffer the trainer copies from the generator); the last layer starts at zero,
    so an untrained encoder returns ``w_avg`` for every layer (the reference projector's start).

    Args:
        resolution / init_res: as in :class:`Generator`.
        num_ws / w_dim: the generator's ``num_ws`` and ``w_dim``.
        channel_base / channel_max: trunk width (``min(channel_base // r, channel_max)``).
        img_channels: 3.
    """

    w_avg: torch.Tensor  # buffer (register_buffer)

    def __init__(self, *, resolution: int, num_ws: int, w_dim: int, channel_base: int = 8192,
                 channel_max: int = 256, init_res: int | None = None,
                 img_channels: int = 3) -> None:
        super().__init__()
        self.num_ws, self.w_dim = num_ws, w_dim
        self.init_res = init_res or default_init_res(resolution)
        res_list = block_resolutions(resolution, self.init_res)[::-1]
        ch = {r: channels_at(r, channel_base, channel_max) for r in res_list}
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(ch[r] if r < resolution else 0, ch[r], ch[r // 2],
                               img_channels=img_channels, use_lowp=False, conv_clamp=None)
            for r in res_list[:-1])
        c4 = ch[self.init_res]
        self.fc = FullyConnected(c4 * self.init_res ** 2, w_dim, lrelu=True)
        self.out = FullyConnected(w_dim, num_ws * w_dim)
        with torch.no_grad():
            self.out.weight.zero_()
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """``[B,3,R,R]`` in ``[-1,1]`` -> ``ws [B,num_ws,w_dim]``."""
        x = img.float()
        for block in self.blocks:
            x = block(x, torch.float32)
        delta = self.out(self.fc(einops.rearrange(x, "b c h w -> b (c h w)")))
        return self.w_avg + einops.rearrange(delta, "b (n d) -> b n d", n=self.num_ws)


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (works on the ``meta`` device)."""
    return sum(p.numel() for p in module.parameters())


__all__ = ["CHANNEL_BASE", "Generator", "Discriminator", "LatentEncoder", "MappingNetwork",
           "SynthesisNetwork", "modulated_conv2d", "minibatch_stddev", "default_init_res",
           "parameter_count"]
