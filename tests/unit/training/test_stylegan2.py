"""StyleGAN2 family: R1 / path length vs hand computations, lazy Adam, EMA, resume, encoder."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gen_ad.config import from_dict
from gen_ad.errors import ConfigError
from gen_ad.training.loop import run_training
from gen_ad.training.stylegan2 import (
    StyleGAN2Config,
    StyleGAN2Family,
    default_r1_gamma,
    path_lengths,
    r1_penalty,
)
from gen_ad.utils.io import load_safetensors, torch_load

TINY_MODEL = {"channel_base": 32, "channel_max": 4, "z_dim": 4, "w_dim": 4, "mapping_layers": 2,
              "encoder_channel_base": 32, "encoder_channel_max": 4}


def _cfg(out: Path, steps: int, size: int = 16, **extra: object) -> StyleGAN2Config:
    data = {
        "out": str(out),
        "data": {"train": "synthetic", "synthetic": 16, "size": size},
        "train": {"batch_size": 4, "max_steps": steps, "log_every": 1, "sample_every": 0,
                  "ckpt_every": 0, "cpu": True, "seed": 3},
        "model": TINY_MODEL,
        "loss": {"r1_interval": 2, "pl_interval": 2},
        "augment": {"p": 0.2, "interval": 1, "speed_kimg": 0.05},
    }
    data.update(extra)
    return from_dict(StyleGAN2Config, data)


class _Linear(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).sum(dim=[1, 2, 3]).unsqueeze(1) ** 2


def test_r1_penalty_equals_hand_computation() -> None:
    torch.manual_seed(0)
    w = torch.randn(1, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4)
    pen, logits = r1_penalty(_Linear(w), x)
    s = (x * w).sum(dim=[1, 2, 3])  # D = s^2, grad = 2 s w
    expected = (2 * s) ** 2 * w.square().sum()
    torch.testing.assert_close(pen, expected)
    assert logits.shape == (2, 1)
    pen.sum().backward()  # differentiable w.r.t. the discriminator


def test_path_lengths_equal_hand_computation() -> None:
    torch.manual_seed(0)
    a = torch.randn(3 * 4 * 4, 5)
    ws = torch.randn(2, 3, 5, requires_grad=True)
    img = (ws.sum(dim=1) @ a.t()).reshape(2, 3, 4, 4)  # img = A (sum over layers of w)
    got = path_lengths(img, ws, torch.Generator().manual_seed(7))
    y = torch.randn(img.shape, generator=torch.Generator().manual_seed(7)) / 4.0
    g = y.reshape(2, -1) @ a  # J^T y, identical for every layer
    expected = g.square().sum(dim=1).sqrt()  # sqrt(mean over layers of |g|^2)
    torch.testing.assert_close(got, expected)


def test_lazy_adam_ema_and_gamma_defaults(tmp_path: Path) -> None:
    fam = StyleGAN2Family(_cfg(tmp_path, 1))
    models = fam.build_models()
    opt = fam.build_optimizers(models)
    c_g, c_d = 2 / 3, 2 / 3
    assert opt["G"].param_groups[0]["lr"] == pytest.approx(0.0025 * c_g)
    assert opt["D"].param_groups[0]["betas"][1] == pytest.approx(0.99 ** c_d)
    assert fam.r1_gamma == pytest.approx(default_r1_gamma(16, 4)) == pytest.approx(0.0002 * 64)
    assert fam.ema_decay(0, 0.0) == 0.0  # ramp-up: the first EMA is a copy
    ema_nimg = 4 * 10 / 32 * 1000
    assert fam.ema_decay(10, 1000.0) == pytest.approx(0.5 ** (4 / ema_nimg))
    with pytest.raises(ConfigError, match="data.size"):
        _cfg(tmp_path, 1, data={"train": "synthetic", "size": 48, "synthetic": 4},
             model={"init_res": 5})


def _train(out: Path, steps: int, resume: str | None = None) -> Path:
    return run_training(StyleGAN2Family(_cfg(out, steps)), resume=resume)


def test_resume_is_exact_including_ada_p_and_path_length_mean(tmp_path: Path) -> None:
    full = _train(tmp_path / "full", 4)
    _train(tmp_path / "half", 2)
    half = _train(tmp_path / "half", 4, resume="latest")
    for name in ("G", "D", "G_ema"):
        a = load_safetensors(full / "model" / f"{name}.safetensors")
        b = load_safetensors(half / "model" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    fa = torch_load(full / "state" / "step-4" / "family.pt")
    fb = torch_load(half / "state" / "step-4" / "family.pt")
    assert fa["ada"] == fb["ada"] and torch.equal(fa["pl_mean"], fb["pl_mean"])
    assert fa["ada"]["p"] != 0.2 and float(fa["pl_mean"]) > 0  # both adapted during the run


def test_encoder_stage_trains_and_offers_both_scorers(tmp_path: Path) -> None:
    gan = run_training(StyleGAN2Family(_cfg(tmp_path / "gan", 1, 32)))
    cfg = _cfg(tmp_path / "enc", 2, 32, stage="encoder", gan_run=str(gan),
               encoder={"lpips": "none"})
    run = run_training(StyleGAN2Family(cfg))
    from gen_ad.training.runs import load_run

    loaded = load_run(run)
    assert set(loaded.models) == {"G", "D", "E"}
    g_gan = load_safetensors(gan / "model" / "G_ema.safetensors")
    assert all(torch.equal(g_gan[k], v) for k, v in loaded.models["G"].state_dict().items())
    from gen_ad.inversion.lpips_net import build_lpips

    scorers = loaded.scorers(lpips_net=build_lpips("alex", random_init=True), steps=2)
    assert set(scorers) == {"stylegan2", "stylegan2-enc"}
    x = loaded.sample(2, seed=0)
    out = scorers["stylegan2-enc"].score(x)
    assert out.scores.shape == (2,) and out.maps.shape == (2, 32, 32) and (out.maps >= 0).all()


def test_bench_smoke_prints_one_json_line(run_bench: Callable[..., dict]) -> None:
    rec = run_bench("stylegan2.py", one_line=False)
    assert rec["bench"] == "stylegan2" and rec["train_img_per_s"]["E16"] > 0
    assert rec["projection"]["plain_ms_per_image"] > 0


@pytest.mark.slow  # compiles the tiny nets (about 1.5 min on 2 CPU cores)
def test_bench_compile_times_both_modes(run_bench: Callable[..., dict]) -> None:
    rec = run_bench("stylegan2.py", "--smoke", "--compile", one_line=False)
    t = rec["train_img_per_s"]
    assert t["E16"] > 0 and t["E16_compiled"] > 0 and t["E16_compiled_first_step_s"] > 0


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_safetensors(run / "model" / f"{n}.safetensors") for n in ("G", "D", "G_ema")}


def test_compile_train_plumbing_keeps_the_eager_step(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``speed.compile_train`` routes Gmain/Dmain through the compiled views and draws the noise
    maps outside them: with ``torch.compile`` replaced by the identity, the run must equal the
    eager run bitwise (same random stream, same ops), which pins the noise order and shapes."""
    compiled: list[nn.Module] = []

    def identity(module: nn.Module) -> nn.Module:
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", identity)
    eager = _train(tmp_path / "eager", 3)
    fam = StyleGAN2Family(_cfg(tmp_path / "routed", 3, speed={"compile_train": True}))
    routed = run_training(fam)
    assert [type(m).__name__ for m in compiled] == ["SynthesisNetwork", "Discriminator"]
    a, b = _weights(eager), _weights(routed)
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def test_compile_train_is_ignored_with_a_warning_under_ddp(tmp_path: Path) -> None:
    from types import SimpleNamespace

    fam = StyleGAN2Family(_cfg(tmp_path, 1, speed={"compile_train": True}))
    ctx = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2), models={})
    with pytest.warns(UserWarning, match="multi-process"):
        assert fam._fast(ctx) == {}  # type: ignore[arg-type]
    assert StyleGAN2Family(_cfg(tmp_path, 1))._fast(ctx) == {}  # type: ignore[arg-type]


@pytest.mark.slow  # inductor compiles C++ kernels on CPU: about 1.5 min on 2 cores even this tiny
def test_compiled_training_equals_eager_and_resumes_exactly(tmp_path: Path) -> None:
    """The real ``torch.compile``: 3 steps (G, path length, D, R1, ADA) give the eager weights to
    float32 rounding (tolerance: the compiled kernels fuse and reorder float32 sums; measured max
    abs difference 2.4e-7 after 3 steps, weights up to ~240), and a compiled run stopped after
    2 steps and resumed equals the uninterrupted compiled run bitwise."""
    eager = _train(tmp_path / "eager", 3)
    speed = {"speed": {"compile_train": True}}
    fam = StyleGAN2Family(_cfg(tmp_path / "compiled", 3, **speed))
    run = run_training(fam)
    assert fam._compiled is not None and set(fam._compiled) == {"synthesis", "D"}
    a, b = _weights(eager), _weights(run)
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(b[name][k], a[name][k], rtol=1e-5, atol=1e-5)
    run_training(StyleGAN2Family(_cfg(tmp_path / "half", 2, **speed)))
    half = run_training(StyleGAN2Family(_cfg(tmp_path / "half", 3, **speed)), resume="latest")
    c = _weights(half)
    for name in b:
        assert all(torch.equal(b[name][k], c[name][k]) for k in b[name]), name


def _ctx(fam: StyleGAN2Family | None, models: dict[str, nn.Module], step: int = 0):  # type: ignore[no-untyped-def]
    from accelerate import Accelerator

    from gen_ad.training.family import StepContext

    opts = fam.build_optimizers(models) if fam is not None else {
        "w": torch.optim.Adam(models["w"].parameters(), lr=1e-3, betas=(0.0, 0.99))}
    return StepContext(Accelerator(cpu=True), models, opts, {}, {}, step, 0.0,
                       torch.Generator().manual_seed(step))


@pytest.mark.parametrize("sanitise", [False, True])
def test_phase_sanitises_non_finite_gradients_as_the_reference(sanitise: bool) -> None:
    # stylegan2-ada-pytorch replaces NaN/inf gradients before every step (its float16 layers
    # train without loss scaling); without it one overflow makes a weight NaN for good
    net = _Linear(torch.ones(1, 3, 1, 1))
    ctx = _ctx(None, {"w": net})
    k = torch.tensor([1.0, float("inf"), 1.0]).reshape(1, 3, 1, 1)

    def loss_fn(chunk: torch.Tensor):  # type: ignore[no-untyped-def]
        loss = (net.w * k * chunk).sum()
        return loss, {"loss": loss.detach().clamp(-1e9, 1e9)}

    ctx.phase("w", net, torch.ones(2, 1, 1, 1), loss_fn, nan_to_num=sanitise)
    w = net.w.detach().flatten()
    if sanitise:
        assert torch.isfinite(w).all()
        assert w[0] == w[2] != 1.0 and w[1] < 1.0  # +inf -> 1e5: a finite step down
    else:
        assert torch.isnan(w[1])  # Adam with beta1 = 0: inf / inf


def test_ada_statistics_count_the_r1_phase_reals(tmp_path: Path) -> None:
    # the reference reports sign(D(real)) in Dmain and in Dreg: lazy-R1 steps add a second batch
    fam = StyleGAN2Family(_cfg(tmp_path, 2, augment={"p": 0.2, "interval": 4,
                                                     "speed_kimg": 0.05}))
    models = fam.build_models()
    fam.setup(models, torch.device("cpu"))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    fam.train_step(_ctx(fam, models, 0), x)  # step 0: R1 (interval 2)
    assert fam.ada.count == 8
    fam.train_step(_ctx(fam, models, 1), x)  # step 1: no R1
    assert fam.ada.count == 12


def test_path_length_mean_is_one_value_on_every_process(tmp_path: Path) -> None:
    """Under DDP the mean is averaged after each update, so the value rank 0 saves is every
    process's and a resume restores all of them exactly."""
    from types import SimpleNamespace

    fam = StyleGAN2Family(_cfg(tmp_path, 1))
    fam.pl_mean = torch.tensor(1.0)
    seen: list[str] = []

    def reduce(t: torch.Tensor, reduction: str) -> torch.Tensor:
        seen.append(reduction)
        return (t + 3.0) / 2  # the other process holds 3.0

    fam._sync_pl_mean(SimpleNamespace(num_processes=2, reduce=reduce))
    assert fam.pl_mean.item() == 2.0 and seen == ["mean"]
    fam._sync_pl_mean(SimpleNamespace(num_processes=1))  # one process: nothing to agree on
    assert fam.pl_mean.item() == 2.0


def test_encoder_stage_adam_betas_are_config_keys(tmp_path: Path) -> None:
    """E's Adam betas were hard-coded (0.9, 0.99), so never recorded with the run: now
    ``encoder.betas`` with that default, validated; the LPIPS net is declared up front."""
    fam = StyleGAN2Family(_cfg(tmp_path, 1, stage="encoder", gan_run=str(tmp_path / "gan")))
    assert fam.cfg.encoder.betas == [0.9, 0.99] and fam._lpips is None
    assert fam.build_optimizers(fam.build_models())["E"].param_groups[0]["betas"] == (0.9, 0.99)
    cfg = _cfg(tmp_path, 1, stage="encoder", gan_run="g", encoder={"betas": [0.5, 0.9]})
    opt = StyleGAN2Family(cfg).build_optimizers(StyleGAN2Family(cfg).build_models())
    assert opt["E"].param_groups[0]["betas"] == (0.5, 0.9)
    with pytest.raises(ConfigError, match="encoder.betas"):
        _cfg(tmp_path, 1, encoder={"betas": [0.9, 1.0]})


# ----------------------------------------------------------------------------- learning

# No augmentation (p = 0 draws nothing), so a phase's random draws are z, the mixing z, the host's
# mixing cut-off and coin, then the noise maps: all replayable from the step's seeds.
NO_AUG = {"p": 0.0, "ada": False}


def _learning_setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    fam = StyleGAN2Family(_cfg(tmp_path, 1, augment=NO_AUG))
    torch.manual_seed(0)
    models = fam.build_models()
    fam.setup(models, torch.device("cpu"))
    return fam, models, fam.build_optimizers(models)  # one Adam state across the steps


def _step_ctx(models: dict[str, nn.Module], opts: dict[str, torch.optim.Optimizer], step: int):  # type: ignore[no-untyped-def]
    from accelerate import Accelerator

    from gen_ad.training.family import StepContext

    return StepContext(Accelerator(cpu=True), models, opts, {}, {}, step, 0.0,
                       torch.Generator().manual_seed(step), host_rng=random.Random(step))


def _fixed() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed real batch and fixed latents (4 images: one minibatch-std group)."""
    real = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return real, torch.randn(4, 4, generator=torch.Generator().manual_seed(2))


def _fakes(G: nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return G(z, generator=torch.Generator().manual_seed(3))  # fixed noise maps too


def test_discriminator_phases_raise_the_real_fake_gap(tmp_path: Path) -> None:
    """With G fixed, Dmain steps (minimising ``-log(1 - sigmoid(D(G(z)))) - log sigmoid(D(x))``)
    raise ``mean D(x) - mean D(G(z))`` on a fixed real batch and fixed z, and leave G alone."""
    fam, models, opts = _learning_setup(tmp_path)
    G, D = models["G"], models["D"]
    real, z = _fixed()
    g_before = copy.deepcopy(G.state_dict())

    def gap() -> float:
        with torch.no_grad():
            return float(D(real).mean() - D(_fakes(G, z)).mean())

    before = gap()
    for s in range(10):
        fam.discriminator_main(_step_ctx(models, opts, s), real)
    after = gap()
    assert after > before + 0.03, (before, after)  # measured: 0.005 -> 0.070, rising each step
    assert all(torch.equal(v, g_before[k]) for k, v in G.state_dict().items()
               if k != "mapping.w_avg")


def test_generator_phases_raise_d_of_the_fakes(tmp_path: Path) -> None:
    """With D fixed, Gmain steps (minimising ``-log sigmoid(D(G(z)))``, the non-saturating loss)
    raise ``mean D(G(z))`` for a fixed z, and leave D alone."""
    fam, models, opts = _learning_setup(tmp_path)
    G, D = models["G"], models["D"]
    D.requires_grad_(False)  # as train_step does around Gmain
    real, z = _fixed()
    d_before = copy.deepcopy(D.state_dict())

    def d_fake() -> float:
        with torch.no_grad():
            return float(D(_fakes(G, z)).mean())

    before = d_fake()
    for s in range(10):
        fam.generator_main(_step_ctx(models, opts, s), real)
    after = d_fake()
    assert after > before + 0.01, (before, after)  # measured: -0.005 -> 0.011, rising each step
    assert all(torch.equal(v, d_before[k]) for k, v in D.state_dict().items())


def _replayed_fakes(fam: StyleGAN2Family, G: nn.Module, step: int) -> torch.Tensor:
    """The images a phase of step ``step`` generates, from its seeds: z and the mixing z from the
    step's generator, the cut-off layer and the mixing coin from the host RNG, then the noise."""
    gen, host = torch.Generator().manual_seed(step), random.Random(step)
    z = torch.randn(4, fam.cfg.model.z_dim, generator=gen)
    z2 = torch.randn(4, fam.cfg.model.z_dim, generator=gen)
    cut = host.randrange(1, G.num_ws)
    mix = host.random() < fam.cfg.loss.style_mixing
    return G(z, mix_z=z2, mix_cutoff=cut if mix else None, generator=gen)


def test_logged_losses_are_the_non_saturating_losses_of_a_replay(tmp_path: Path) -> None:
    """``loss_g = -log sigmoid(D(G(z)))`` and ``loss_d = -log(1 - sigmoid(D(G(z))))
    - log sigmoid(D(x))`` (Goodfellow et al. 2014; StyleGAN2's ``Gmain`` / ``Dmain``), batch
    means, recomputed on copies of the networks from before each phase with its random draws
    replayed."""
    fam, models, opts = _learning_setup(tmp_path)
    G, D = models["G"], models["D"]
    real, _ = _fixed()
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    D.requires_grad_(False)
    ctx = _step_ctx(models, opts, 5)
    fam.generator_main(ctx, real)
    with torch.no_grad():
        want_g = -F.logsigmoid(D0(_replayed_fakes(fam, G0, 5))).mean()
    torch.testing.assert_close(ctx.logs["loss_g"], want_g, rtol=1e-5, atol=1e-6)

    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    D.requires_grad_(True)
    ctx = _step_ctx(models, opts, 6)
    fam.discriminator_main(ctx, real)
    with torch.no_grad():
        lf, lr = D0(_replayed_fakes(fam, G0, 6)), D0(real)
    want_d = -F.logsigmoid(-lf).mean() - F.logsigmoid(lr).mean()
    torch.testing.assert_close(ctx.logs["loss_d"], want_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ctx.logs["d_real"], lr.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ctx.logs["d_fake"], lf.mean(), rtol=1e-5, atol=1e-6)
