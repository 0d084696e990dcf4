"""f-AnoGAN training: config checks, gradient penalty, critic/generator steps, encoder stage."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from gen_ad.config import from_dict, save_config
from gen_ad.errors import CheckpointError, ConfigError
from gen_ad.training.export import export_models
from gen_ad.training.family import StepContext
from gen_ad.training.wgan import WGANConfig, WGANFamily, gradient_penalty

TINY: dict[str, Any] = {"data": {"size": 16}, "model": {"base_dim": 4, "latent_dim": 16},
                        "train": {"batch_size": 10, "cpu": True}, "gan": {"n_critic": 5}}


def _cfg(**over: Any) -> WGANConfig:
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for k, v in over.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return from_dict(WGANConfig, d)


def _ctx(models: dict[str, nn.Module], opts: dict[str, Any], step: int) -> StepContext:
    acc = Accelerator(cpu=True)
    return StepContext(acc, models, opts, {}, {}, step=step, kimg=0.0,
                       generator=torch.Generator().manual_seed(1000 + step))


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth structured 'real' images in [-1,1] (blobs on a tinted background)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    c = torch.rand(n, 2, 1, 1, generator=g) - 0.5
    blob = torch.exp(-((xx - c[:, :1]) ** 2 + (yy - c[:, 1:]) ** 2) * 6)
    tint = torch.tensor([0.6, -0.2, 0.4]).view(1, 3, 1, 1)
    return (tint - blob * torch.tensor([1.2, 0.4, 1.0]).view(1, 3, 1, 1)).clamp(-1, 1)


# ----------------------------------------------------------------------------- config


def test_config_defaults_follow_fanogan() -> None:
    cfg = from_dict(WGANConfig, {"train": {"batch_size": 160}})
    g = cfg.gan
    assert (g.n_critic, g.gp_weight, g.lr_g, g.lr_d, g.betas) == (5, 10.0, 2e-4, 2e-4, [0.0, 0.9])
    assert cfg.model.latent_dim == 128 and cfg.data.size == 64 and cfg.encoder.kappa == 1.0
    assert cfg.stage == "gan" and WGANFamily(cfg).ema_models() == []
    ema = from_dict(WGANConfig, {"train": {"batch_size": 160}, "model": {"ema": True}})
    assert WGANFamily(ema).ema_models() == ["G"]


@pytest.mark.parametrize(("data", "key"), [
    ({"stage": "encoder"}, "gan_run"),
    ({"train": {"batch_size": 12}}, "train.batch_size"),
    ({"data": {"size": 48}}, "data.size"),
    ({"gan": {"betas": [0.0]}}, "gan.betas"),
    ({"gan": {"n_critic": 0}}, "gan.n_critic"),
    ({"encoder": {"kappa": -1.0}}, "encoder.kappa"),
    ({"gan": {"critic_batches": "some"}}, "gan.critic_batches"),
])
def test_config_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(WGANConfig, {"train": {"batch_size": 10}, **data} if "train" not in data
                  else data)


def test_reuse_mode_accepts_any_batch() -> None:
    cfg = from_dict(WGANConfig, {"train": {"batch_size": 12}, "gan": {"critic_batches": "reuse"}})
    assert cfg.gan.critic_batches == "reuse"


# ----------------------------------------------------------------------------- gradient penalty


def test_gradient_penalty_linear_critic_matches_hand_computation() -> None:
    """D(x) = <w, x>: grad_x D = w everywhere, so GP = (||w|| - 1)^2 and
    dGP/dw = 2 (||w|| - 1) w / ||w||."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(1, 3, 4, 4) * 0.5)

    def critic(x: torch.Tensor) -> torch.Tensor:
        return (x * w).sum(dim=(1, 2, 3))

    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    gp = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1))
    norm = w.detach().norm()
    torch.testing.assert_close(gp, (norm - 1) ** 2)
    gp.backward()
    torch.testing.assert_close(w.grad, 2 * (norm - 1) * w.detach() / norm)


def test_gradient_penalty_quadratic_critic_uses_per_sample_interpolates() -> None:
    """D(x) = ||x||^2 / 2: grad = x_hat = real + a (fake - real) with a ~ U[0,1) per sample."""
    real, fake = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    gp = gradient_penalty(lambda x: 0.5 * x.square().sum(dim=(1, 2, 3)), real, fake,
                          torch.Generator().manual_seed(7))
    a = torch.rand(6, 1, 1, 1, generator=torch.Generator().manual_seed(7))
    x_hat = real + a * (fake - real)
    expected = (x_hat.flatten(1).norm(dim=1) - 1).square().mean()
    torch.testing.assert_close(gp, expected)
    with pytest.raises(ValueError, match="same shape"):
        gradient_penalty(lambda x: x.sum(dim=(1, 2, 3)), real, fake[:2])


# ----------------------------------------------------------------------------- gan stage


def test_critic_updates_raise_wasserstein_estimate() -> None:
    """With G fixed, 8 critic updates raise E[D(x)] - E[D(G(z))] on a fixed real batch and fixed z
    (and the critic loss of the last update is below that of the first)."""
    torch.manual_seed(0)
    fam = WGANFamily(_cfg(gan={"lr_d": 1e-3}))
    models = fam.build_models()
    opts = fam.build_optimizers(models)
    G, D = models["G"], models["D"]
    real = _images(8)
    z = torch.randn(8, 16)

    def w_est() -> float:
        with torch.no_grad():
            G.train()
            return float(D(real).mean() - D(G(z)).mean())

    before, g_before = w_est(), {k: v.clone() for k, v in G.state_dict().items()}
    logs = []
    for s in range(8):
        ctx = _ctx(models, opts, s)
        fam.critic_phase(ctx, real)
        logs.append(ctx.logs)
    after = w_est()
    assert after > before + 0.5, (before, after)
    assert logs[-1]["loss_d"] < logs[0]["loss_d"]
    assert all(set(lg) == {"loss_d", "w_dist", "gp"} for lg in logs)
    for k, v in G.state_dict().items():  # critic updates do not touch G's weights
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, g_before[k]), k


def test_train_step_updates_both_and_is_deterministic() -> None:
    def run() -> tuple[dict[str, nn.Module], list[dict[str, float]]]:
        torch.manual_seed(0)
        fam = WGANFamily(_cfg())
        models = fam.build_models()
        opts = fam.build_optimizers(models)
        logs = [fam.train_step(_ctx(models, opts, s), _images(10, seed=s)) for s in range(2)]
        assert all(p.grad is None for p in models["D"].parameters())
        return models, logs

    torch.manual_seed(0)
    init = {k: m.state_dict() for k, m in WGANFamily(_cfg()).build_models().items()}
    m1, logs1 = run()
    m2, logs2 = run()
    assert logs1 == logs2 and set(logs1[0]) == {"loss_d", "w_dist", "gp", "loss_g"}
    for name in ("G", "D"):
        sd1, sd2 = m1[name].state_dict(), m2[name].state_dict()
        assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)  # bitwise reproducible
        assert any(not torch.equal(sd1[k], init[name][k]) for k in sd1)  # and trained


def _replay_critic_phase(G: nn.Module, D: nn.Module, real: torch.Tensor,
                         step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_dist, gp)`` of a critic phase of step ``step``, recomputed from Gulrajani et al. 2017
    (Algorithm 1) on copies of the networks from before it, its draws replayed from the step's
    seed: ``z ~ N(0, I)``, then one ``a ~ U[0, 1)`` per image;
    ``gp = mean (|grad D(real + a (fake - real))| - 1)^2``."""
    gen = torch.Generator().manual_seed(1000 + step)  # _ctx's seed
    z = torch.randn(real.shape[0], 16, generator=gen)
    with torch.no_grad():
        fake = G.train()(z)
    w = D(real).mean() - D(fake).mean()
    a = torch.rand(real.shape[0], 1, 1, 1, generator=gen)
    x_hat = (real + a * (fake - real)).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat).sum(), [x_hat])
    gp = (grad.flatten(1).norm(dim=1) - 1).square().mean()
    return w.detach(), gp


def test_critic_loss_is_minus_w_dist_plus_weighted_penalty() -> None:
    """One critic phase logs ``loss_d = -w_dist + gp_weight * gp`` (WGAN-GP's critic loss) with
    ``w_dist`` and ``gp`` those of a replay; a weight other than the default 10 shows that the
    configured one is used."""
    torch.manual_seed(0)
    fam = WGANFamily(_cfg(gan={"gp_weight": 3.0}))
    models = fam.build_models()
    opts = fam.build_optimizers(models)
    G0, D0 = copy.deepcopy(models["G"]), copy.deepcopy(models["D"])
    real = _images(2)
    ctx = _ctx(models, opts, 0)
    fam.critic_phase(ctx, real)
    w, gp = _replay_critic_phase(G0, D0, real, 0)
    logs = ctx.logs
    torch.testing.assert_close(logs["w_dist"], w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["gp"], gp, rtol=1e-5, atol=1e-6)
    assert float(gp) > 0.01  # the penalty term is not negligible here
    torch.testing.assert_close(logs["loss_d"], -w + 3.0 * gp, rtol=1e-5, atol=1e-6)


def test_gradient_penalty_weight_changes_the_critic_update() -> None:
    """The same two critic phases from the same start end with other critic weights at
    gp_weight 0 than at 10 (and 10 than 3): the penalty's weight reaches the gradient."""
    def critic_after(gp_weight: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        fam = WGANFamily(_cfg(gan={"gp_weight": gp_weight}))
        models = fam.build_models()
        opts = fam.build_optimizers(models)
        for s in range(2):
            fam.critic_phase(_ctx(models, opts, s), _images(2, seed=s))
        return models["D"].state_dict()

    d0, d3, d10 = critic_after(0.0), critic_after(3.0), critic_after(10.0)
    for other in (d0, d3):
        diff = max(float((other[k] - d10[k]).abs().max()) for k in d10)
        assert diff > 1e-4, diff  # measured: 9e-4 (Adam moves each weight by about lr = 2e-4)


def test_generator_phases_raise_the_critic_on_fakes() -> None:
    """With D fixed, generator phases (loss ``-E[D(G(z))]``) raise ``mean D(G(z))`` for a fixed
    z, leave D alone, and log ``loss_g = -mean D(G(z))`` of a replay of the phase's z."""
    torch.manual_seed(0)
    fam = WGANFamily(_cfg())
    models = fam.build_models()
    opts = fam.build_optimizers(models)
    G, D = models["G"], models["D"]
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    d_before = copy.deepcopy(D.state_dict())

    def d_fake() -> float:
        with torch.no_grad():
            return float(D(G.train()(z)).mean())

    before = d_fake()
    for s in range(8):
        G0 = copy.deepcopy(G)
        ctx = _ctx(models, opts, s)
        fam.generator_phase(ctx, 8)
        z_s = torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 + s))
        with torch.no_grad():
            torch.testing.assert_close(ctx.logs["loss_g"], -D(G0.train()(z_s)).mean(),
                                       rtol=1e-5, atol=1e-6)
    after = d_fake()
    assert after > before + 0.01, (before, after)  # measured: 0.270 -> 0.296, rising each step
    assert all(torch.equal(v, d_before[k]) for k, v in D.state_dict().items())
    assert all(p.grad is None for p in D.parameters())  # cleared with G's


def test_sample_shape_and_range() -> None:
    fam = WGANFamily(_cfg())
    models = fam.build_models()
    x = fam.sample({k: m.eval() for k, m in models.items()}, 5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 16, 16) and x.abs().max() <= 1


# ----------------------------------------------------------------------------- encoder stage


def _fake_gan_run(tmp_path: Path, **over: Any) -> tuple[Path, dict[str, nn.Module]]:
    """A gan-stage run folder with a model/ export (as the loop writes it)."""
    torch.manual_seed(1)
    cfg = _cfg(out=str(tmp_path / "gan"), **over)
    fam = WGANFamily(cfg)
    models = fam.build_models()
    models["G"].train()(torch.randn(8, cfg.model.latent_dim))  # non-trivial BN buffers
    save_config(cfg, tmp_path / "gan" / "config.yaml")
    export_models(tmp_path / "gan" / "model", family=fam, models=models, ema={},
                  counters=SimpleNamespace(step=1, kimg=0.008))
    return tmp_path / "gan", models


def test_encoder_stage_freezes_g_and_d_bitwise(tmp_path: Path) -> None:
    gan_dir, gan_models = _fake_gan_run(tmp_path)
    fam = WGANFamily(_cfg(stage="encoder", gan_run=str(gan_dir), train={"batch_size": 6}))
    torch.manual_seed(0)
    models = fam.build_models()
    fam.setup(models, torch.device("cpu"))
    for k in ("G", "D"):
        assert not any(p.requires_grad for p in models[k].parameters())
        sd = models[k].state_dict()
        assert all(torch.equal(v, sd[n]) for n, v in gan_models[k].state_dict().items())
    before = {k: {n: v.clone() for n, v in models[k].state_dict().items()} for k in models}
    opts = fam.build_optimizers(models)
    assert set(opts) == {"E"}
    logs = [fam.train_step(_ctx(models, opts, s), _images(6, seed=s)) for s in range(3)]
    assert set(logs[0]) == {"loss_e", "mse_img", "mse_feat"}
    assert all(abs(lg["loss_e"] - lg["mse_img"] - lg["mse_feat"]) < 1e-5 for lg in logs)
    for k in ("G", "D"):  # parameters and BN buffers bitwise unchanged
        sd = models[k].state_dict()
        assert all(torch.equal(before[k][n], sd[n]) for n in sd), k
    sd_e = models["E"].state_dict()
    assert any(not torch.equal(before["E"][n], sd_e[n]) for n in sd_e)
    scorers = fam.scorers({k: m.eval() for k, m in models.items()})
    assert list(scorers) == ["fanogan"] and scorers["fanogan"].mode == "izif"


def _izif(x: torch.Tensor, E: nn.Module, G: nn.Module, D: nn.Module,
          kappa: float) -> torch.Tensor:
    """f-AnoGAN's izi_f loss written out: ``MSE(x, G(E(x))) + kappa * MSE(f(x), f(G(E(x))))``,
    ``f`` the critic's features (Schlegl et al. 2019, eq. for L_izi_f)."""
    with torch.no_grad():
        r = G(E(x))
        return ((x - r) ** 2).mean() + kappa * ((D.features(x) - D.features(r)) ** 2).mean()


def test_encoder_stage_uses_its_kappa_and_lowers_the_izif_loss(tmp_path: Path) -> None:
    """``encoder.kappa`` = 0.7 reaches the stage's loss (``loss_e = mse_img + 0.7 * mse_feat``,
    each term that of a replay on E before the step), and 40 steps on a fixed batch lower the
    izi_f loss recomputed by hand."""
    gan_dir, _ = _fake_gan_run(tmp_path)
    fam = WGANFamily(_cfg(stage="encoder", gan_run=str(gan_dir), train={"batch_size": 6},
                          encoder={"kappa": 0.7}))
    torch.manual_seed(0)
    models = fam.build_models()
    fam.setup(models, torch.device("cpu"))
    opts = fam.build_optimizers(models)
    E, G, D = models["E"], models["G"].eval(), models["D"].eval()
    x = _images(6)
    E0 = copy.deepcopy(E)
    logs = fam.train_step(_ctx(models, opts, 0), x)
    with torch.no_grad():
        r = G(E0(x))
        img = ((x - r) ** 2).mean()
        feat = ((D.features(x) - D.features(r)) ** 2).mean()
    torch.testing.assert_close(logs["mse_img"], img, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["mse_feat"], feat, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["loss_e"], img + 0.7 * feat, rtol=1e-5, atol=1e-7)
    assert float(feat) > 0.01  # the feature term weighs in
    before = float(_izif(x, E0, G, D, 0.7))
    for s in range(1, 40):
        fam.train_step(_ctx(models, opts, s), x)
    after = float(_izif(x, E, G, D, 0.7))
    assert after < 0.95 * before, (before, after)  # measured: 0.207 -> 0.186


def test_encoder_stage_errors(tmp_path: Path) -> None:
    fam = WGANFamily(_cfg(stage="encoder", gan_run=str(tmp_path / "missing")))
    with pytest.raises(CheckpointError, match="model/"):
        fam.setup(fam.build_models(), torch.device("cpu"))
    gan_dir, _ = _fake_gan_run(tmp_path, model={"base_dim": 8})
    fam = WGANFamily(_cfg(stage="encoder", gan_run=str(gan_dir)))
    with pytest.raises(ConfigError, match="model.base_dim is 4 here, 8 in the gan run"):
        fam.setup(fam.build_models(), torch.device("cpu"))


@pytest.mark.parametrize(("gan", "enc", "said"), [
    ({"model": {"base_dim": 8}}, {}, "model.base_dim is 4 here, 8 in the gan run"),
    ({"model": {"prior": "uniform"}}, {}, "model.prior is 'normal' here, 'uniform' in the gan"),
    ({"model": {"critic_norm": "none"}}, {}, "model.critic_norm is 'layer' here, 'none' in"),
    ({}, {"data": {"size": 32}}, "data.size is 32 here, 16 in the gan run"),
])
def test_encoder_stage_refuses_networks_other_than_the_gan_runs(
        tmp_path: Path, gan: dict[str, Any], enc: dict[str, Any], said: str) -> None:
    """The encoder stage rebuilds G and D from its own config: a model key or data.size other
    than the gan run's export records is named with both values before any weight is loaded
    (a shape-neutral key such as model.prior was accepted silently; others failed later in
    load_state_dict with no key named)."""
    gan_dir, _ = _fake_gan_run(tmp_path, **gan)
    fam = WGANFamily(_cfg(stage="encoder", gan_run=str(gan_dir), **enc))
    with pytest.raises(ConfigError, match=said):
        fam.setup(fam.build_models(), torch.device("cpu"))


def test_encoder_stage_may_differ_in_its_own_keys(tmp_path: Path) -> None:
    gan_dir, gan_models = _fake_gan_run(tmp_path)
    fam = WGANFamily(_cfg(stage="encoder", gan_run=str(gan_dir),
                          model={"encoder_norm": "batch", "encoder_output": "linear"}))
    models = fam.build_models()
    fam.setup(models, torch.device("cpu"))
    assert all(torch.equal(v, models["G"].state_dict()[k])
               for k, v in gan_models["G"].state_dict().items())


def test_gan_only_run_offers_iterative_scorer() -> None:
    fam = WGANFamily(_cfg())
    models = {k: m.eval() for k, m in fam.build_models().items()}
    scorers = fam.scorers(models, steps=2)
    assert list(scorers) == ["anogan"]
    out = scorers["anogan"].score(_images(3))
    assert out.scores.shape == (3,) and out.maps.shape == (3, 16, 16)


def test_bench_smoke_prints_one_json_line(run_bench: Callable[..., dict]) -> None:
    rec = run_bench("wgan.py", one_line=False)
    res = rec["results"]["cpu"]
    assert rec["bench"] == "wgan" and res["gan_img_per_s"] > 0 and res["score_izif_img_per_s"] > 0


def test_a_per_process_batch_that_does_not_split_into_critic_batches_is_an_error() -> None:
    # the config checks the global batch; under DDP each process splits its own share, and
    # torch.chunk would silently give fewer or unequal critic batches (10 processes x 16 images)
    fam = WGANFamily(_cfg())
    models = fam.build_models()
    opts = fam.build_optimizers(models)
    n = fam.cfg.gan.n_critic
    with pytest.raises(ConfigError, match=f"does not split into gan.n_critic={n}"):
        fam.train_step(_ctx(models, opts, 0), _images(n * 2 + 1))


def test_izif_loss_is_the_scorers_izif_terms_and_equals_the_old_formula(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """izif_loss is the batch mean of inversion.encoder.izif_terms (one izi_f formula for
    training and scoring), equal to ``MSE(x, G(E(x))) + kappa * MSE(f(x), f(G(E(x))))`` in value
    and in E's gradients."""
    import gen_ad.training.wgan as wgan
    from gen_ad.inversion import encoder as inv
    from gen_ad.models.wgan import Critic, Encoder, Generator

    torch.manual_seed(0)
    G = Generator(latent_dim=8, resolution=16, channels=3, base_dim=4).eval().requires_grad_(False)
    D = Critic(resolution=16, channels=3, base_dim=4, norm="layer").eval().requires_grad_(False)
    E = Encoder(latent_dim=8, resolution=16, channels=3, base_dim=4, norm="layer",
                output="tanh")
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    calls = []
    monkeypatch.setattr(wgan, "izif_terms",
                        lambda *a, **k: calls.append(1) or inv.izif_terms(*a, **k))
    loss, img, fts = wgan.izif_loss(x, E, G, D, kappa=0.7)
    assert calls == [1]
    grads = torch.autograd.grad(loss, list(E.parameters()))
    recon = G(E(x))
    with torch.no_grad():
        fx = D.features(x)
    old_img = torch.nn.functional.mse_loss(recon, x)
    old_fts = torch.nn.functional.mse_loss(D.features(recon), fx)
    old = old_img + 0.7 * old_fts
    torch.testing.assert_close((loss, img, fts), (old, old_img, old_fts))
    for g, h in zip(grads, torch.autograd.grad(old, list(E.parameters())), strict=True):
        torch.testing.assert_close(g, h)
