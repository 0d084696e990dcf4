"""Deterministic mode on CUDA: a training run repeats bitwise, and so do its scores; the operations
gen_ad knows to lack a deterministic CUDA kernel are refused up front or named.

Without the mode two CUDA runs differ in the last bits (atomic-add backward kernels, cuDNN
autotuning; see ``test_families_gpu.py``). Marked ``gpu``: skipped without CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gen_ad.config import load_config
from gen_ad.data.synthetic import generate
from gen_ad.errors import ConfigError
from gen_ad.training.ddpm import DDPMConfig, DDPMFamily
from gen_ad.training.grid_sample import grid_sample
from gen_ad.training.loop import run_training
from gen_ad.training.runs import load_run
from gen_ad.training.stylegan2 import StyleGAN2Config, StyleGAN2Family
from gen_ad.training.wgan import WGANConfig, WGANFamily
from gen_ad.utils import determinism as det

pytestmark = pytest.mark.gpu
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
COMMON = ["train.sample_every=0", "train.log_every=1", "train.fid_every=0", "train.ckpt_every=3",
          "train.max_steps=3", "train.cpu=false", "train.deterministic=true"]
COLOUR_ONLY = "augment.transforms=[brightness, contrast, lumaflip, hue, saturation]"
FAMILIES = {  # tiny models; attention on in the DDPM (its backward runs through SDPA)
    "ddpm": (DDPMConfig, DDPMFamily, "ddpm/demo.yaml", [
        "data.synthetic=16", "data.size=32", "train.batch_size=4", "optim.warmup_steps=1",
        "model.block_out_channels=[16, 32]", "model.attention_levels=[false, true]",
        "sample.steps=2", "train.mixed_precision=bf16"]),
    "stylegan2": (StyleGAN2Config, StyleGAN2Family, "stylegan2/demo.yaml", [
        "data.synthetic=16", "data.size=32", "train.batch_size=4", "model.channel_base=64",
        "model.channel_max=8", "model.z_dim=8", "model.w_dim=8", "loss.r1_interval=2",
        "loss.pl_interval=2", "augment.ada=false", "augment.p=0.5", COLOUR_ONLY]),
    "wgan": (WGANConfig, WGANFamily, "wgan/demo.yaml", [
        "data.synthetic=24", "train.batch_size=10"]),
}


@pytest.fixture(autouse=True)
def _restore_determinism() -> Iterator[None]:
    """The flags are process-wide: put them back after each test."""
    flags = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2:]


def _train(family: str, out: Path, *extra: str) -> Path:
    cfg_cls, fam_cls, yaml, tiny = FAMILIES[family]
    over = [*COMMON, *tiny, f"out={out}", *extra]
    return run_training(fam_cls(load_config(cfg_cls, CONFIGS / yaml, over)))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        out.update({f"{f.stem}.{k}": v for k, v in load_file(f).items()})
    return out


def _scores(family: str, run: Path) -> dict[str, torch.Tensor]:
    batch = generate(4, 32, seed=3, anomaly_fraction=0.5)
    x = (torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).cuda()
    kw = {"ddpm": {"steps": 3, "lpips_random_init": True, "anoddpm": {"t": 20},
                   "autoddpm": {"t_recon": 20, "t_inpaint": 4, "steps_inpaint": 2,
                                "resample": 2}},
          "stylegan2": {"steps": 5, "lpips_random_init": True}, "wgan": {}}[family]
    out = {}
    with det.deterministic_mode(True, f"{det.ENV_VAR}=1"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-init LPIPS nets
        for name, scorer in load_run(run, "cuda").scorers(**kw).items():
            scorer.fit([x[:2]])
            out[name] = scorer.score(x).scores.cpu()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_training_and_scores_repeat_bitwise(family: str, tmp_path: Path) -> None:
    a, b = _train(family, tmp_path / "a"), _train(family, tmp_path / "b")
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]
    sa, sb = _scores(family, a), _scores(family, b)
    assert sa.keys() == sb.keys() and sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa), {k: (sa[k], sb[k]) for k in sa}


def test_cuda_ada_geometric_augmentation_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="augment.transforms"):
        _train("stylegan2", tmp_path / "r", "augment.transforms=[xflip, rotate]")
    assert not (tmp_path / "r" / "state").exists()


def test_cuda_grid_sample_backward_is_named_with_its_gen_ad_use() -> None:
    """What the ADA refusal rests on: PyTorch has no deterministic CUDA grid_sample backward (when
    a release adds one, this fails: drop StyleGAN2Family.deterministic_conflicts)."""
    x = torch.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    grid = torch.rand(2, 8, 8, 2, device="cuda") * 2 - 1
    with pytest.raises(det.NondeterministicOpError, match="ADA"):
        with det.deterministic_mode(True):
            grid_sample(x, grid, padding_mode="reflection").sum().backward()


def test_cublas_workspace_is_set_for_the_process() -> None:
    with det.deterministic_mode(True):
        assert os.environ[det.CUBLAS_VAR] in det.CUBLAS_DETERMINISTIC
        a = torch.randn(64, 64, device="cuda")
        assert torch.equal(a @ a, a @ a)
