"""Reading a gan run's export (encoder stages, load_run): one verified reading, never two
exports mixed; an encoder-stage config whose networks differ from the gan run's is refused
naming the key and both values."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, BinaryIO

import pytest
import torch
from torch import nn

import gen_ad.utils.io as gio
from gen_ad.config import from_dict, save_config
from gen_ad.errors import CheckpointError, ConfigError
from gen_ad.models.ema import ema_copy
from gen_ad.training.export import export_models
from gen_ad.training.stylegan2 import StyleGAN2Config, StyleGAN2Family
from gen_ad.training.wgan import WGANConfig, WGANFamily

WGAN: dict[str, Any] = {"data": {"size": 16}, "model": {"base_dim": 4, "latent_dim": 16},
                        "train": {"batch_size": 10, "cpu": True}}
SG2: dict[str, Any] = {"data": {"size": 16}, "train": {"batch_size": 4, "cpu": True},
                       "model": {"channel_base": 32, "channel_max": 4, "z_dim": 4, "w_dim": 4,
                                 "mapping_layers": 2, "encoder_channel_base": 32,
                                 "encoder_channel_max": 4}}


def _merge(base: dict[str, Any], **over: Any) -> dict[str, Any]:
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    return d


def _wgan_run(out: Path, seed: int, **over: Any) -> Path:
    """A wgan gan-stage run folder with a ``model/`` export, weights drawn with ``seed`` (and an
    EMA of G, offset from G, with ``model.ema``)."""
    torch.manual_seed(seed)
    cfg = from_dict(WGANConfig, _merge(WGAN, out=str(out), **over))
    fam = WGANFamily(cfg)
    save_config(cfg, out / "config.yaml")
    models = fam.build_models()
    ema = {n: ema_copy(models[n]) for n in fam.ema_models()}
    for p in (p for m in ema.values() for p in m.parameters()):
        p.add_(0.5)
    export_models(out / "model", family=fam, models=models, ema=ema,
                  counters=SimpleNamespace(step=seed, kimg=0.01 * seed))
    return out


def _sg2_run(out: Path, **over: Any) -> tuple[Path, nn.Module]:
    """A stylegan2 gan-stage export with an EMA of G (what the encoder stage loads)."""
    torch.manual_seed(0)
    cfg = from_dict(StyleGAN2Config, _merge(SG2, out=str(out), **over))
    fam = StyleGAN2Family(cfg)
    models = fam.build_models()
    g_ema = ema_copy(models["G"])
    for p in g_ema.parameters():
        p.add_(0.5)  # unlike G: the EMA copy must be the one loaded
    export_models(out / "model", family=fam, models=models, ema={"G": g_ema},
                  counters=SimpleNamespace(step=1, kimg=0.004))
    return out, g_ema


def _encoder(gan: Path, **over: Any) -> tuple[WGANFamily, dict[str, nn.Module]]:
    fam = WGANFamily(from_dict(WGANConfig, _merge(WGAN, stage="encoder", gan_run=str(gan),
                                                  **over)))
    return fam, fam.build_models()


def _publish_copy(src: Path, dst: Path) -> None:
    """Publish a copy of the export ``src`` as ``dst`` (what a training's checkpoint does)."""
    tmp = gio.atomic_dir(dst)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    gio.publish_dir(tmp, dst)


class _ThenOnClose:
    """A file that runs ``then`` once it is closed (a read finished)."""

    def __init__(self, f: BinaryIO, then: Callable[[], None]) -> None:
        self._f, self._then = f, then

    def __enter__(self) -> _ThenOnClose:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()
        self._then()

    def read(self, *args: int) -> bytes:
        return self._f.read(*args)

    def fileno(self) -> int:
        return self._f.fileno()


def replace_during_load(monkeypatch: pytest.MonkeyPatch, when: str, watched: str,
                        replace: Callable[[], None]) -> list[bool]:
    """Run ``replace`` once: after the first network's ``load_state_dict`` (``"loaded"``), or
    once a gen_ad read of the file ``watched`` ends (``"read"``). Returns the done flag."""
    done: list[bool] = []

    def once() -> None:
        if not done:
            done.append(True)
            replace()

    if when == "loaded":
        real = nn.Module.load_state_dict

        def loading(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            out = real(self, *args, **kwargs)
            once()
            return out

        monkeypatch.setattr(nn.Module, "load_state_dict", loading)
    else:
        def opening(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            f = open(file, mode, *args, **kwargs)  # noqa: SIM115 - closed by the wrapper
            return _ThenOnClose(f, once) if Path(file).name == watched and "r" in mode else f

        monkeypatch.setattr(gio, "open", opening, raising=False)
    return done


@pytest.mark.parametrize("when", ["loaded", "read"])
def test_a_gan_export_published_anew_meanwhile_is_never_mixed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """The gan run publishes a new export while the encoder stage reads it (after G was checked,
    or after G was loaded): G and D come from one export, or a clear error (G of one step with
    D of another was loaded when the files were opened again by name after the check)."""
    gan = _wgan_run(tmp_path / "gan", seed=1)
    newer = _wgan_run(tmp_path / "newer", seed=2)
    exports = {p: {n: gio.load_safetensors(p / "model" / f"{n}.safetensors") for n in "GD"}
               for p in (gan, newer)}
    done = replace_during_load(monkeypatch, when, "G.safetensors",
                               lambda: _publish_copy(newer / "model", gan / "model"))
    fam, models = _encoder(gan)
    try:
        fam.setup(models, torch.device("cpu"))
    except CheckpointError as e:  # a clear refusal is allowed, a mix is not
        assert "mixed export" in str(e)
        return
    assert done
    sources = [{p for p, w in exports.items()
                if all(torch.equal(v, models[n].state_dict()[k]) for k, v in w[n].items())}
               for n in "GD"]
    assert sources[0] & sources[1], "G and D were loaded from two different exports"


@pytest.mark.parametrize("when", ["loaded", "read"])
def test_load_run_never_mixes_an_export_published_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """load_run checked the manifest, then opened every file again by name: a training
    publishing meanwhile gave G of one step with D of another (and the first's model.json)."""
    from gen_ad.training.runs import load_run

    gan = _wgan_run(tmp_path / "gan", seed=1, model={"ema": True})
    newer = _wgan_run(tmp_path / "newer", seed=2, model={"ema": True})
    exports = {step: {n: gio.load_safetensors(p / "model" / f"{f}.safetensors")
                      for n, f in (("G", "G_ema"), ("D", "D"))}
               for step, p in ((1, gan), (2, newer))}
    done = replace_during_load(monkeypatch, when, "G_ema.safetensors",
                               lambda: _publish_copy(newer / "model", gan / "model"))
    try:
        run = load_run(gan)
    except CheckpointError as e:  # a clear refusal is allowed, a mix is not
        assert "mixed export" in str(e)
        return
    assert done
    for n in "GD":  # every network from the export whose step the run reports
        sd = run.models[n].state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in exports[run.step][n].items()), n


def test_the_gan_stage_is_read_from_its_export_and_its_config(tmp_path: Path) -> None:
    gan = _wgan_run(tmp_path / "gan", seed=1)
    fam, models = _encoder(_wgan_run(tmp_path / "enc-run", seed=3, stage="encoder",
                                     gan_run=str(gan)))
    with pytest.raises(CheckpointError, match="encoder-stage run; point to the gan run"):
        fam.setup(models, torch.device("cpu"))
    (gan / "model" / "D.safetensors").write_bytes(b"not weights")
    fam, models = _encoder(gan)
    with pytest.raises(CheckpointError, match="mixed export .*D.safetensors"):
        fam.setup(models, torch.device("cpu"))


@pytest.mark.parametrize(("over", "said"), [
    ({"model": {"mapping_lr_mul": 0.1}}, "model.mapping_lr_mul is 0.1 here, 0.01 in the gan run"),
    ({"model": {"w_dim": 8}}, "model.w_dim is 8 here, 4 in the gan run"),
    ({"data": {"size": 32}}, "data.size is 32 here, 16 in the gan run"),
])
def test_stylegan2_encoder_stage_refuses_other_networks(tmp_path: Path, over: dict[str, Any],
                                                        said: str) -> None:
    """A shape-neutral key (the mapping network's lr multiplier scales its weights at run time)
    loaded silently before; a shape change failed in load_state_dict without naming a key."""
    gan, _ = _sg2_run(tmp_path / "gan")
    cfg = from_dict(StyleGAN2Config, _merge(SG2, stage="encoder", gan_run=str(gan), **over))
    fam = StyleGAN2Family(cfg)
    with pytest.raises(ConfigError, match=said):
        fam.setup(fam.build_models(), torch.device("cpu"))


def test_stylegan2_encoder_stage_loads_the_ema_generator(tmp_path: Path) -> None:
    gan, g_ema = _sg2_run(tmp_path / "gan")
    cfg = from_dict(StyleGAN2Config, _merge(SG2, stage="encoder", gan_run=str(gan),
                                            model={"encoder_channel_max": 8}))  # E's own key
    fam = StyleGAN2Family(cfg)
    models = fam.build_models()
    fam.setup(models, torch.device("cpu"))
    sd = models["G"].state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in g_ema.state_dict().items())
    assert not any(p.requires_grad for p in models["G"].parameters())
