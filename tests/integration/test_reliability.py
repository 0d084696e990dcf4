"""Issue 16 on the shared loop (toy family, seconds each): damaged states are skipped, exports are
checked, nothing non-finite is published, a full disk is one clear error, re-saves and prunes
never leave a published folder incomplete, and resuming applies the config's optimiser settings.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import gen_ad.utils.io as gio
from gen_ad.config import load_config
from gen_ad.errors import CheckpointError, TrainingDivergedError
from gen_ad.training import checkpoint as ckpt
from gen_ad.training.loop import run_training
from gen_ad.utils.io import load_safetensors

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from toy_family import ToyConfig, ToyFamily  # noqa: E402


def _train(out: Path, *overrides: str, resume: str | None = None,
           family: type[ToyFamily] = ToyFamily) -> ToyFamily:
    cfg = load_config(ToyConfig, None, [f"out={out}", "train.log_every=1",
                                        "train.sample_every=0", "train.cpu=true", *overrides])
    fam = family(cfg)
    run_training(fam, resume=resume)
    return fam


def _weights(state: Path) -> dict[str, torch.Tensor]:
    return {f"{f.stem}.{k}": v for f in sorted((state / "models").glob("*.safetensors"))
            for k, v in load_safetensors(f).items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished toy run with states 3 and 4 (checkpoint every step, keep 2)."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    _train(out, "train.max_steps=4", "train.ckpt_every=1", "train.keep_last=2")
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    (dst / ".gen-ad.lock").unlink(missing_ok=True)
    return dst


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "delete"])
@pytest.mark.parametrize("name", ["models/net.safetensors", "models/net_ema.safetensors",
                                  "optim/net.pt", "sched/net.pt", "family.pt", "rng-0.pt",
                                  "meta.json", "manifest.json"])
def test_damaged_newest_state_is_skipped(finished: Path, tmp_path: Path, name: str,
                                         damage: str) -> None:
    run = _copy(finished, tmp_path)
    f = run / "state" / "step-4" / name
    data = f.read_bytes()
    if damage == "flip":
        f.write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    elif damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        f.unlink()
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step-4"):
        assert ckpt.resolve_resume(run, "latest").name == "step-3"
    with pytest.raises(CheckpointError):
        ckpt.resolve_resume(run, str(run / "state" / "step-4"))  # an explicit path is refused


def test_resume_past_a_damaged_state_equals_the_uninterrupted_run(finished: Path,
                                                                  tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    f = run / "state" / "step-4" / "models" / "net.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the weights
    f.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        _train(run, "train.max_steps=4", "train.ckpt_every=1", "train.keep_last=2",
               resume="latest")
    assert _same(_weights(run / "state" / "step-4"), _weights(finished / "state" / "step-4"))
    ckpt.verify_state(run / "state" / "step-4")


def test_resaving_a_finished_run_keeps_complete_states(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    _train(run, "train.max_steps=4", "train.ckpt_every=1", "train.keep_last=2", resume="latest")
    assert [s for s, _ in ckpt.list_states(run)] == [3, 4]
    for _, p in ckpt.list_states(run):
        ckpt.verify_state(p)
    assert _same(_weights(run / "state" / "step-4"), _weights(finished / "state" / "step-4"))
    assert not list((run / "state").glob(".step-*")) and not list(run.glob(".model*"))


def test_half_deleted_state_never_counts(finished: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "state" / "step-4" / "optim")  # what a killed non-atomic prune left
    with pytest.warns(UserWarning, match="optim/.* is missing"):
        assert ckpt.newest_complete(run).name == "step-3"


def _toy_families(monkeypatch: pytest.MonkeyPatch) -> None:
    from gen_ad.training.registry import families

    assert "toy" in families()  # ToyFamily registers next to its definition (toy_family.py)


def test_load_run_refuses_mixed_or_damaged_exports(finished: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from gen_ad.training.runs import load_run

    _toy_families(monkeypatch)
    run = _copy(finished, tmp_path)
    assert load_run(run).step == 4
    older = tmp_path / "older"
    _train(older, "train.max_steps=2")
    shutil.copy(older / "model" / "net.safetensors", run / "model" / "net.safetensors")
    with pytest.raises(CheckpointError, match="mixed export .*net.safetensors"):
        load_run(run)  # G of one step with D of another: refused
    shutil.copy(finished / "model" / "net.safetensors", run / "model" / "net.safetensors")
    (run / "model" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_run(run)
    manifest = json.loads((finished / "model" / "manifest.json").read_text())
    manifest["files"]["../../outside"] = {"size": 1, "sha256": "0" * 64}
    (run / "model" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside the folder"):
        load_run(run)


def test_nonfinite_weights_are_never_published(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import gen_ad.training.loop as loop

    orig = loop.train_one_step

    def poisoning(state, batch):  # a weight turns NaN just before the step-4 checkpoint
        logs = orig(state, batch)
        if state.counters.step == 4:
            with torch.no_grad():
                state.models["net"].enc.weight[0, 0, 0, 0] = float("nan")
        return logs

    monkeypatch.setattr(loop, "train_one_step", poisoning)
    with pytest.raises(TrainingDivergedError, match=r"enc.weight of model 'net' is not finite "
                       r"at step 4: .*newest complete checkpoint is .*step-2"):
        _train(tmp_path / "r", "train.max_steps=6", "train.ckpt_every=2")
    assert [s for s, _ in ckpt.list_states(tmp_path / "r")] == [2]
    for f in [*(tmp_path / "r").rglob("*.safetensors")]:
        assert all(torch.isfinite(v).all() for v in load_safetensors(f).values()), f


def test_nan_loss_names_the_finite_checkpoint_kept(tmp_path: Path) -> None:
    with pytest.raises(TrainingDivergedError, match=r"'loss_net' is nan at step 3.*newest "
                       r"complete checkpoint is .*step-2 \(its tensors are finite\)"):
        _train(tmp_path / "r", "train.max_steps=6", "train.ckpt_every=2", "nan_at_step=3")


def test_disk_full_names_the_file_and_the_kept_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real = gio._write_file

    def full(path: Path, data: bytes) -> None:
        if ".step-4." in str(path.parent) or ".step-4." in str(path.parent.parent):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(gio, "_write_file", full)
    with pytest.raises(CheckpointError, match=r"no space left on the device while writing "
                       r".*\.step-4\..*; step 4 was not completely saved; the newest complete "
                       r"checkpoint is .*step-2$"):
        _train(tmp_path / "r", "train.max_steps=6", "train.ckpt_every=2")
    monkeypatch.setattr(gio, "_write_file", real)
    assert [s for s, _ in ckpt.list_states(tmp_path / "r")] == [2]
    assert not list((tmp_path / "r" / "state").glob(".step-*"))
    _train(tmp_path / "r", "train.max_steps=4", "train.ckpt_every=2", resume="latest")


class _LowerLr(ToyFamily):
    def build_optimizers(self, models):
        opts = super().build_optimizers(models)
        for o in opts.values():
            for g in o.param_groups:
                g["lr"] = 1e-3
        return opts


def test_resume_applies_the_configs_optimiser_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _train(tmp_path / "r", "train.max_steps=2", "train.ckpt_every=0")
    capsys.readouterr()
    fam = _train(tmp_path / "r", "train.max_steps=4", "train.ckpt_every=0", resume="latest",
                 family=_LowerLr)
    err = capsys.readouterr().err
    assert "the config's optimiser settings replace the checkpoint's" in err
    assert "net.lr: 0.01 -> 0.001" in err and "critic.lr: 0.01 -> 0.001" in err
    stats = [json.loads(line) for line in (tmp_path / "r" / "stats.jsonl").read_text().splitlines()]
    # LambdaLR warm-up min(1, (s+1)/3): the schedule keeps its position on the new base rate
    assert [r["lr_net"] for r in stats] == pytest.approx([0.01 * 2 / 3, 0.01, 0.001, 0.001])
    assert fam is not None
