"""The weightless noise schedule (diffusers) and the maths shared by training and reconstruction
(the reverse steps against diffusers' own: tests/unit/inversion/test_diffusion.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from gen_ad.errors import ConfigError
from gen_ad.models import schedule
from gen_ad.models.schedule import add_noise, alpha_bar, build_scheduler


def test_schedules_are_linear_t1000() -> None:
    s = build_scheduler("ddpm")
    assert isinstance(s, DDPMScheduler) and s.config.num_train_timesteps == 1000
    assert torch.isclose(s.betas[0], torch.tensor(1e-4)) and torch.isclose(s.betas[-1],
                                                                           torch.tensor(0.02))
    assert torch.allclose(s.betas, torch.linspace(1e-4, 0.02, 1000))
    d = build_scheduler("ddim")
    assert isinstance(d, DDIMScheduler) and torch.allclose(d.alphas_cumprod, s.alphas_cumprod)
    with pytest.raises(ConfigError, match="scheduler kind"):
        build_scheduler("euler")  # type: ignore[arg-type]


def test_alpha_bar_is_one_for_the_clean_image() -> None:
    s = build_scheduler("ddpm")
    assert alpha_bar(s, -1) == 1.0 and alpha_bar(s, 0) == float(s.alphas_cumprod[0])


def test_add_noise_takes_one_timestep_or_one_per_image() -> None:
    """Training (a ``[B]`` tensor of timesteps) and reconstruction (one int) use the same
    function; both are diffusers' ``add_noise`` bit for bit."""
    s = build_scheduler("ddpm")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(add_noise(s, x0, t, eps), s.add_noise(x0, eps, t))
    assert torch.equal(add_noise(s, x0, 7, eps), s.add_noise(x0, eps, torch.full((3,), 7)))
    assert add_noise(s, x0, -1, eps) is x0


def test_schedule_module_imports_no_config_schemas() -> None:
    tree = ast.parse(Path(schedule.__file__).read_text(encoding="utf-8"))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "gen_ad.config" not in names
