"""No host sync per micro-batch: the step helper keeps logged values on the device.

A CUDA-free proxy: every way a tensor is read back to the host in Python (``.item()``,
``float()``, ``int()``, ``bool()``, ``.tolist()``) is counted during one training step. With
gradient accumulation the count must not grow with the number of micro-batches (per-step reads
such as the NaN guard, ADA's statistics and the optimisers' own bookkeeping stay).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gen_ad.config import from_dict, load_config
from gen_ad.training.loop import build_run, train_one_step

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from toy_family import ToyConfig, ToyFamily  # noqa: E402

READS = ("item", "__float__", "__int__", "__bool__", "tolist")


def _count_reads(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], object]) -> int:
    calls = [0]
    for name in READS:
        orig = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: object, _orig: Callable = orig, **k: object) -> object:
            calls[0] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return calls[0]


def _reads_per_step(monkeypatch: pytest.MonkeyPatch, family: object) -> int:
    state, _ = build_run(family)  # type: ignore[arg-type]
    b = family.cfg.train.batch_size  # type: ignore[attr-defined]
    batch = torch.rand(b, 3, family.cfg.data.size, family.cfg.data.size) * 2 - 1  # type: ignore
    train_one_step(state, batch)  # first step: lazy optimiser state
    return _count_reads(monkeypatch, lambda: train_one_step(state, batch))


def _toy(tmp: Path, accum: int) -> ToyFamily:
    return ToyFamily(load_config(ToyConfig, None, [
        f"out={tmp}", "train.cpu=true", "train.batch_size=8", f"train.grad_accum={accum}"]))


def _wgan(tmp: Path, accum: int, stage_over: dict[str, object]) -> object:
    from gen_ad.training.wgan import WGANConfig, WGANFamily

    cfg = from_dict(WGANConfig, {
        "out": str(tmp), "data": {"size": 16}, "model": {"latent_dim": 8, "base_dim": 4},
        "train": {"batch_size": 8, "grad_accum": accum, "cpu": True},
        "gan": {"n_critic": 2, "critic_batches": "reuse"}, **stage_over})
    return WGANFamily(cfg)


def _stylegan2(tmp: Path, accum: int) -> object:
    from gen_ad.training.stylegan2 import StyleGAN2Config, StyleGAN2Family

    cfg = from_dict(StyleGAN2Config, {
        "out": str(tmp), "data": {"size": 16},
        "model": {"channel_base": 64, "channel_max": 16, "z_dim": 16, "w_dim": 16,
                  "mapping_layers": 2, "mbstd_group": 2},
        "train": {"batch_size": 8, "grad_accum": accum, "cpu": True}})
    return StyleGAN2Family(cfg)


def _ddpm(tmp: Path, accum: int) -> object:
    from gen_ad.training.ddpm import DDPMConfig, DDPMFamily

    cfg = from_dict(DDPMConfig, {
        "out": str(tmp), "data": {"size": 16},
        "model": {"name": "tiny", "block_out_channels": [8, 8], "layers_per_block": 1,
                  "attention_levels": [False, False], "norm_num_groups": 4,
                  "mid_attention": False},
        "train": {"batch_size": 8, "grad_accum": accum, "cpu": True}})
    return DDPMFamily(cfg)


@pytest.mark.parametrize("make", [
    pytest.param(lambda t, a: _toy(t, a), id="toy"),
    pytest.param(lambda t, a: _wgan(t, a, {}), id="wgan"),
    pytest.param(lambda t, a: _stylegan2(t, a), id="stylegan2"),
    pytest.param(lambda t, a: _ddpm(t, a), id="ddpm"),
])
def test_host_reads_do_not_grow_with_micro_batches(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   make: Callable[[Path, int], object]) -> None:
    one = _reads_per_step(monkeypatch, make(tmp_path / "a1", 1))
    four = _reads_per_step(monkeypatch, make(tmp_path / "a4", 4))
    assert four == one, (one, four)  # 4 micro-batches: not a single extra read


class SyncingToy(ToyFamily):
    """The old style: ``float(loss)`` on every micro-batch (the counter must see it)."""

    def train_step(self, ctx, batch):  # type: ignore[no-untyped-def]
        net = ctx.models["net"]

        def net_loss(chunk: torch.Tensor):  # type: ignore[no-untyped-def]
            loss = (net(chunk) - chunk).pow(2).mean()
            self.seen = float(loss)
            return loss, {"loss_net": loss}

        ctx.phase("net", net, batch, net_loss)
        return ctx.logs


def test_counter_sees_a_read_per_micro_batch(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def make(out: Path, accum: int) -> SyncingToy:
        return SyncingToy(_toy(out, accum).cfg)

    one = _reads_per_step(monkeypatch, make(tmp_path / "s1", 1))
    four = _reads_per_step(monkeypatch, make(tmp_path / "s4", 4))
    assert four == one + 3
