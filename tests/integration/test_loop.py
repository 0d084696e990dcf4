"""The shared training loop: exact resume, atomic checkpoints, NaN guard, mismatch, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gen_ad.config import load_config
from gen_ad.errors import CheckpointError, TrainingDivergedError
from gen_ad.training import checkpoint as ckpt
from gen_ad.training.loop import make_accelerator, release_other_state, run_training
from gen_ad.utils.io import load_safetensors, read_jsonl

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from toy_family import ToyConfig, ToyFamily  # noqa: E402


def _train(out: Path, *overrides: str, resume: str | None = None) -> ToyFamily:
    # train.cpu: these tests check bitwise resume and signal handling (CPU semantics)
    cfg = load_config(ToyConfig, None, [f"out={out}", "train.log_every=1",
                                        "train.sample_every=0", "train.cpu=true", *overrides])
    fam = ToyFamily(cfg)
    run_training(fam, resume=resume)
    return fam


def _state_tensors(state_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((state_dir / "models").glob("*.safetensors")):
        for k, v in load_safetensors(f).items():
            out[f"{f.stem}.{k}"] = v
    for sub in ("optim", "sched"):
        for f in sorted((state_dir / sub).glob("*.pt")):
            sd = ckpt.torch_load(f)
            for k, v in _flatten(sd):
                out[f"{sub}/{f.stem}/{k}"] = v
    out["family.running"] = ckpt.torch_load(state_dir / "family.pt")["running"]
    return out


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}{i}.")
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (int, float)):
        yield prefix, torch.tensor(obj)


def test_exact_resume_is_bitwise(tmp_path: Path) -> None:
    """N steps in one go == N/2 + resume + N/2, for weights, EMA, optimisers, schedules, state."""
    _train(tmp_path / "a", "train.max_steps=6", "train.grad_accum=2")
    _train(tmp_path / "b", "train.max_steps=3", "train.grad_accum=2")
    _train(tmp_path / "b", "train.max_steps=6", "train.grad_accum=2", resume="latest")
    a = _state_tensors(tmp_path / "a" / "state" / "step-6")
    b = _state_tensors(tmp_path / "b" / "state" / "step-6")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the stats of the resumed half equal those of the uninterrupted run
    sa = [r["loss_net"] for r in read_jsonl(tmp_path / "a" / "stats.jsonl")]
    sb = [r["loss_net"] for r in read_jsonl(tmp_path / "b" / "stats.jsonl")]
    assert sa == sb


def test_the_last_step_is_logged_whatever_log_every(tmp_path: Path) -> None:
    """The first and last steps are logged even off the interval (the progress bar and
    stats.jsonl end on the last step's values), then every log_every steps."""
    _train(tmp_path / "a", "train.max_steps=7", "train.log_every=3")
    assert [r["step"] for r in read_jsonl(tmp_path / "a" / "stats.jsonl")] == [1, 3, 6, 7]
    _train(tmp_path / "b", "train.max_steps=7", "train.log_every=3", "train.max_minutes=1e-9")
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "stats.jsonl")] == [1]  # stopped at 1


def test_max_minutes_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    """A wall-clock budget stops after the step that exhausts it; resuming ends bitwise equal."""
    _train(tmp_path / "a", "train.max_steps=4")
    first = _train(tmp_path / "b", "train.max_steps=4", "train.max_minutes=1e-9")
    assert [s for s, _ in ckpt.list_states(tmp_path / "b")] == [1]
    resumed = _train(tmp_path / "b", "train.max_steps=4", resume="latest")
    assert not first.setup_resuming and resumed.setup_resuming  # setup is told it resumes
    a = _state_tensors(tmp_path / "a" / "state" / "step-4")
    b = _state_tensors(tmp_path / "b" / "state" / "step-4")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="max_minutes"):
        _train(tmp_path / "c", "train.max_minutes=0")


def test_progress_total_follows_the_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar's total is max_steps, or the step max_kimg or the wall-clock budget ends it at."""
    from gen_ad.training import loop

    def state(step: int, max_minutes: float | None, max_kimg: float | None = None,
              batch: int = 8) -> types.SimpleNamespace:
        train = types.SimpleNamespace(max_steps=1000, max_minutes=max_minutes,
                                      max_kimg=max_kimg, batch_size=batch)
        return types.SimpleNamespace(family=types.SimpleNamespace(cfg=types.SimpleNamespace(
            train=train)), counters=types.SimpleNamespace(step=step, images=step * batch))

    monkeypatch.setattr(loop.time, "perf_counter", lambda: 110.0)  # 10 s after t0 = 100 s
    # 10 steps in 10 s, 1 minute budget: 50 s left at 1 step/s -> ends near step 61
    assert loop._budget_total(state(10, 1.0), 100.0, 0) == 61
    assert loop._budget_total(state(10, None), 100.0, 0) == 1000
    assert loop._budget_total(state(10, 60.0), 100.0, 0) == 1000  # steps end it first
    assert loop._budget_total(state(5, 1.0), 100.0, 5) == 1000  # no rate yet
    assert loop._budget_total(state(10, 0.1), 100.0, 0) == 11  # budget already spent
    # max_kimg: 0.1 kimg at batch 8 is 13 steps (the bar said 5/100 when it stopped there)
    assert loop._budget_total(state(0, None, 0.1), 100.0, 0) == 13
    assert loop._budget_total(state(10, None, 0.1), 100.0, 0) == 13
    assert loop._budget_total(state(10, None, 100.0), 100.0, 0) == 1000  # steps first
    assert loop._budget_total(state(10, 1.0, 0.1), 100.0, 0) == 13  # kimg before the clock


def test_keep_last_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _train(tmp_path / "r", "train.max_steps=5", "train.ckpt_every=1", "train.keep_last=2")
    assert [s for s, _ in ckpt.list_states(tmp_path / "r")] == [4, 5]
    assert (tmp_path / "r" / "config.yaml").is_file()
    from gen_ad.training.runs import load_run

    run = load_run(tmp_path / "r")
    assert run.step == 5 and set(run.models) == {"net", "critic"}
    assert run.path == tmp_path / "r" == load_run(tmp_path / "r" / "model").path  # the run folder
    ema = load_safetensors(tmp_path / "r" / "model" / "net_ema.safetensors")
    assert torch.equal(run.models["net"].enc.weight, ema["enc.weight"])  # EMA under plain name
    x = run.sample(5, seed=3, batch_size=2)
    assert x.shape == (5, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, run.sample(5, seed=3, batch_size=2))


def test_each_start_records_its_environment(tmp_path: Path) -> None:
    """``environment.jsonl`` has one line per start (a resumed run may have moved to another
    machine or library version) and the export names the code that wrote it."""
    import gen_ad

    _train(tmp_path / "r", "train.max_steps=2")
    _train(tmp_path / "r", "train.max_steps=4", resume="latest")
    lines = read_jsonl(tmp_path / "r" / "environment.jsonl")
    assert [ln["step"] for ln in lines] == [0, 2]
    for ln in lines:
        assert ln["gen_ad"] == gen_ad.__version__ and ln["device"] == "cpu"
        assert ln["processes"] == 1 and ln["mixed_precision"] == "no"
        assert ln["packages"]["torch"] and ln["packages"]["accelerate"]
    meta = json.loads((tmp_path / "r" / "model" / "model.json").read_text(encoding="utf-8"))
    assert meta["environment"]["gen_ad"] == gen_ad.__version__
    assert meta["environment"]["packages"] == lines[-1]["packages"]


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    _train(tmp_path / "r", "train.max_steps=2")
    with pytest.raises(CheckpointError, match="--resume latest"):
        _train(tmp_path / "r", "train.max_steps=2")


def test_checkpoint_config_mismatch(tmp_path: Path) -> None:
    _train(tmp_path / "r", "train.max_steps=2")
    with pytest.raises(CheckpointError, match="does not match the config"):
        _train(tmp_path / "r", "train.max_steps=4", "width=6", resume="latest")


def test_nan_guard_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingDivergedError, match=r"'loss_net' is nan at step 3"):
        _train(tmp_path / "r", "train.max_steps=6", "train.ckpt_every=2", "nan_at_step=3")
    assert [s for s, _ in ckpt.list_states(tmp_path / "r")] == [2]
    _train(tmp_path / "r", "train.max_steps=3", resume="latest")  # the good state still loads


_KILL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, {here!r})
from gen_ad.training import checkpoint as ckpt
import gen_ad.training.loop as loop
orig = ckpt.save_safetensors
calls = []
def dying(path, tensors, metadata=None):
    calls.append(path)
    if "step-4" in str(path) and len(calls) > 1:
        os.kill(os.getpid(), signal.SIGKILL)   # die in the middle of writing step 4
    orig(path, tensors, metadata)
ckpt.save_safetensors = dying
import toy_family
toy_family.main([{out!r}, "train.max_steps=6", "train.ckpt_every=2", "train.sample_every=0",
                  "train.cpu=true"])
"""


def test_sigkill_while_checkpointing_leaves_previous_loadable(tmp_path: Path) -> None:
    out = tmp_path / "r"
    code = _KILL_SCRIPT.format(here=str(HERE), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [s for s, _ in ckpt.list_states(out)] == [2]
    assert list((out / "state").glob(".step-4*")), "the torn state stays a temporary folder"
    _train(out, "train.max_steps=4", resume="latest")
    assert [s for s, _ in ckpt.list_states(out)][-1] == 4
    assert not list((out / "state").glob(".step-*")), "stale temporary folders are cleaned"


def test_sigterm_checkpoints_and_stops(tmp_path: Path) -> None:
    out = tmp_path / "r"
    code = (f"import sys, os, signal; sys.path.insert(0, {str(HERE)!r});"
            "import gen_ad.training.loop as loop;"
            "orig = loop.train_one_step\n"
            "def step(state, batch):\n"
            "    logs = orig(state, batch)\n"
            "    if state.counters.step == 3: os.killpg(os.getpgid(0), signal.SIGTERM)\n"
            "    return logs\n"
            "loop.train_one_step = step\n"
            "import toy_family\n"
            f"toy_family.main([{str(out)!r}, 'train.max_steps=50', 'train.ckpt_every=0',"
            " 'data.num_workers=1', 'train.cpu=true'])")  # signal timing: CPU semantics
    # the whole process group (main + data worker) is signalled, as a job scheduler does
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [s for s, _ in ckpt.list_states(out)] == [3]


def test_two_process_cpu_replicas_identical(tmp_path: Path,
                                            checkout_env: Callable[..., dict[str, str]]) -> None:
    out = tmp_path / "ddp"
    env = checkout_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")  # CPU forced
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "29517",
           str(HERE / "toy_family.py"), str(out), "train.max_steps=3", "train.sample_every=0",
           "train.cpu=true", "train.batch_size=8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(out / "replica-0.pt", weights_only=True)
    r1 = torch.load(out / "replica-1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    meta = ckpt.list_states(out)[-1][1] / "meta.json"
    text = meta.read_text()
    assert '"world": 2' in text and '"images": 24' in text


def test_samples_and_periodic_fid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sample grids are written; FID is skipped with one warning offline; results -> fid.jsonl."""
    import gen_ad.metrics.fid as fid

    with pytest.warns(Warning, match="(?i)inception") as rec:
        _train(tmp_path / "off", "train.max_steps=4", "train.sample_every=2",
               "train.fid_every=2", "train.fid_n=6")
    assert len([w for w in rec if "nception" in str(w.message)]) == 1
    assert not (tmp_path / "off" / "fid.jsonl").exists()
    grids = sorted((tmp_path / "off" / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-0000002.png", "step-0000004.png"]
    _train(tmp_path / "end", "train.max_steps=3", "train.sample_every=2")  # + a final grid
    grids = sorted((tmp_path / "end" / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-0000002.png", "step-0000003.png"]
    # a time budget that ends the run ends it: no final grid (minutes on a CPU for a big UNet)
    _train(tmp_path / "budget", "train.max_steps=3", "train.sample_every=2",
           "train.max_minutes=1e-9")
    assert not (tmp_path / "budget" / "samples").exists() or \
        not list((tmp_path / "budget" / "samples").glob("*.png"))

    seen = []

    def fake_compute(self, step, sample_fn):  # the loop hands a working seeded sampler
        g = torch.Generator().manual_seed(0)
        x = sample_fn(3, g)
        seen.append((step, tuple(x.shape)))
        return {"fid": 1.5, "kid_mean": 0.1}

    monkeypatch.setattr(fid.FIDMonitor, "compute", fake_compute)
    _train(tmp_path / "on", "train.max_steps=4", "train.fid_every=2", "train.fid_n=6")
    rows = read_jsonl(tmp_path / "on" / "fid.jsonl")
    assert [r["step"] for r in rows] == [2, 4] and rows[0]["fid"] == 1.5
    assert seen == [(2, (3, 3, 16, 16)), (4, (3, 3, 16, 16))]


def test_a_later_run_may_ask_for_another_precision_in_the_same_process(tmp_path: Path) -> None:
    """Accelerate keeps one state per process and refused a second run with another precision
    (or a CPU run after a CUDA one: seen on a GPU machine when tests share a process)."""
    from accelerate import Accelerator

    release_other_state(cpu=True, mixed_precision="bf16")  # whatever earlier tests left
    assert Accelerator(cpu=True, mixed_precision="bf16").state.mixed_precision == "bf16"
    with pytest.raises(ValueError, match="already been initialized"):  # accelerate alone refuses
        Accelerator(cpu=True, mixed_precision="no")
    acc = make_accelerator(types.SimpleNamespace(cpu=True, mixed_precision="no"), tmp_path)
    assert acc.state.mixed_precision == "no" and acc.device.type == "cpu"
    again = make_accelerator(types.SimpleNamespace(cpu=True, mixed_precision="no"), tmp_path)
    assert again.state.mixed_precision == "no"  # an unchanged request keeps the state


def test_resuming_an_older_state_sets_the_abandoned_branch_aside(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rolled back to step 4 of 8: the newer states are moved (not deleted) into
    ``state/abandoned-after-step-4-*``, so pruning keeps the new branch and ``latest`` follows
    it (keep-last kept the old branch's higher steps and deleted the new ones before)."""
    out = tmp_path / "r"
    _train(out, "train.max_steps=8", "train.ckpt_every=2", "train.keep_last=3")
    old8 = _state_tensors(out / "state" / "step-8")
    capsys.readouterr()
    _train(out, "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=1",
           resume=str(out / "state" / "step-4"))
    assert "the newer states step-6, step-8 (rolled back from" in capsys.readouterr().err
    assert [s for s, _ in ckpt.list_states(out)] == [6]
    assert ckpt.resolve_resume(out, "latest") == out / "state" / "step-6"
    (aside,) = (out / "state").glob("abandoned-after-step-4-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-6", "step-8"]
    kept8 = _state_tensors(aside / "step-8")
    assert all(torch.equal(old8[k], kept8[k]) for k in old8)
    ckpt.verify_state(aside / "step-8")
    assert json.loads((out / "model" / "model.json").read_text())["step"] == 6  # the new branch
    _train(out, "train.max_steps=7", "train.keep_last=1", resume="latest")  # continues the branch
    assert [s for s, _ in ckpt.list_states(out)] == [7]
    assert len(list((out / "state").glob("abandoned-*"))) == 1


def test_resume_with_another_batch_size_continues_the_data_stream(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """3 steps of batch 4 consumed 12 images: with batch 8 the stream continues at image 12
    (3 x 8 = 24 skipped 12 images before), and a line says the batch size changed."""
    from gen_ad.training import loop

    starts: list[int] = []
    real = loop.make_loader

    def recording(dataset, **kw):  # type: ignore[no-untyped-def]
        starts.append(kw["start"])
        return real(dataset, **kw)

    monkeypatch.setattr(loop, "make_loader", recording)
    _train(tmp_path / "r", "train.max_steps=3", "train.batch_size=4")
    capsys.readouterr()
    _train(tmp_path / "r", "train.max_steps=5", "train.batch_size=8", resume="latest")
    assert starts == [0, 12]
    assert "train.batch_size is now 8 (the checkpoint consumed 12 images in 3 steps)" \
        in capsys.readouterr().err
    meta = ckpt.list_states(tmp_path / "r")[-1][1] / "meta.json"
    assert '"images": 28' in meta.read_text()


def test_grad_accum_must_divide_the_per_process_batch() -> None:
    """12 over 2 processes = 6 per process, in 4 micro-batches: torch.chunk gives 3 chunks each
    divided by 4 (gradients x0.75). Refused at start-up, naming the keys and the processes."""
    from gen_ad.config import ConfigError, TrainConfig
    from gen_ad.training.loop import per_process_batch

    cfg = TrainConfig(batch_size=12, grad_accum=4)
    assert per_process_batch(cfg, 1) == 12
    with pytest.raises(ConfigError, match=r"'train.batch_size' and 'train.grad_accum': the "
                       r"per-process batch 12 / 2 processes = 6 is not divisible by "
                       r"train.grad_accum=4; use a train.batch_size divisible by 8"):
        per_process_batch(cfg, 2)
    with pytest.raises(ConfigError, match="not divisible by the number of processes"):
        per_process_batch(TrainConfig(batch_size=12, grad_accum=1), 5)


def test_fid_sampling_runs_in_eval_mode_and_leaves_buffers_alone() -> None:
    """FID samples from a generator with BatchNorm: eval mode (running statistics used, not
    updated), and the previous mode restored (train mode updated the running mean before)."""
    from gen_ad.training.monitor import _maybe_fid

    gen = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)).train()
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    modes: list[bool] = []

    class Family:
        def sample(self, models, n, generator):  # type: ignore[no-untyped-def]
            modes.append(models["G"].training)
            return models["G"](torch.randn(n, 3, 4, 4, generator=generator))

    class Monitor:
        def maybe_compute(self, step, sample_fn):  # type: ignore[no-untyped-def]
            sample_fn(8, torch.Generator().manual_seed(0))
            return None

    state = types.SimpleNamespace(
        models={"G": gen}, ema={}, family=Family(), fid_monitor=Monitor(),
        accelerator=types.SimpleNamespace(is_main_process=True),
        counters=ckpt.Counters(step=2))
    _maybe_fid(state)  # type: ignore[arg-type]
    assert modes == [False] and gen.training
    after = gen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_process_reads_its_stop_flags_without_a_device_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gen_ad.training import loop

    state = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(num_processes=1),
        family=types.SimpleNamespace(cfg=types.SimpleNamespace(
            train=types.SimpleNamespace(max_minutes=None))), stop_signal=[])
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("host read"))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("host read"))
    assert loop._stop_reason(state, 0.0) is None
    state.stop_signal.append(15)
    assert loop._stop_reason(state, 0.0) == "signal 15 received"
    state.family.cfg.train.max_minutes = 1e-9
    assert loop._stop_reason(state, 0.0) == "train.max_minutes=1e-09 reached"


def test_resume_refuses_a_changed_model_definition_and_lists_other_changes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A resume used to take any changed config silently (config.yaml then overwritten): the
    state records its config; a change to what the model is refused, others listed."""
    out = tmp_path / "r"
    _train(out, "train.max_steps=2")
    meta = json.loads((ckpt.list_states(out)[-1][1] / "meta.json").read_text())
    assert meta["family"] == "toy" and meta["config"]["data"]["size"] == 16
    with pytest.raises(CheckpointError, match=r"data\.size: 16 -> 32.*another folder"):
        _train(out, "train.max_steps=4", "data.size=32", resume="latest")
    capsys.readouterr()
    _train(out, "train.max_steps=4", "train.log_every=2", resume="latest")
    err = capsys.readouterr().err
    assert "resume: the config differs from the checkpoint's in 2 key(s)" in err
    assert "train.log_every: 1 -> 2" in err and "train.max_steps: 2 -> 4" in err
    capsys.readouterr()
    _train(out, "train.max_steps=5", "train.log_every=2", resume="latest")
    assert "train.max_steps: 4 -> 5" in capsys.readouterr().err  # compared with the new state


def test_synthetic_data_and_an_exhausted_budget_are_said(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config without data.train trained on synthetic tissue without a word; a resume whose
    max_steps is not above the checkpoint's step silently did nothing."""
    out = tmp_path / "r"
    _train(out, "train.max_steps=2")
    assert "data: 24 synthetic tissue patches" in capsys.readouterr().err
    _train(out, "train.max_steps=2", resume="latest")
    assert ("the checkpoint is at step 2 and train.max_steps is 2: nothing to train"
            in capsys.readouterr().err)


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(path)]


def test_a_resume_sets_aside_the_log_lines_past_its_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Killed at step 5 with its state at 3, the run had logged steps 4-5 (stats.jsonl and
    fid.jsonl are appended to): resumed from 3, both logs equal an uninterrupted run's, steps
    strictly increasing (step 4 appeared twice before); the lines set aside are kept in
    ``<name>.abandoned.jsonl``. A roll-back to an older state sets its branch's lines aside too."""
    import gen_ad.metrics.fid as fid

    monkeypatch.setattr(fid.FIDMonitor, "compute", lambda self, step, fn: {"fid": float(step)})
    fid_on = ["train.fid_every=1", "train.fid_n=6"]
    whole = tmp_path / "whole"
    _train(whole, "train.max_steps=6", *fid_on)
    out = tmp_path / "r"
    with pytest.raises(TrainingDivergedError):  # dies in its 5th step, after logging step 4
        _train(out, "train.max_steps=6", "train.ckpt_every=3", "nan_at_step=4", *fid_on)
    assert [s for s, _ in ckpt.list_states(out)] == [3] and _steps(out / "stats.jsonl")[-1] == 4
    capsys.readouterr()
    _train(out, "train.max_steps=6", *fid_on, resume="latest")
    for name in ("stats.jsonl", "fid.jsonl"):
        assert _steps(out / name) == _steps(whole / name) == [1, 2, 3, 4, 5, 6], name
        assert _steps(out / name.replace(".jsonl", ".abandoned.jsonl")) == [4], name
    err = capsys.readouterr().err
    assert "1 line(s) of stats.jsonl, 1 line(s) of fid.jsonl (logged past step 3" in err
    assert ([r["loss_net"] for r in read_jsonl(out / "stats.jsonl")]
            == [r["loss_net"] for r in read_jsonl(whole / "stats.jsonl")])

    _train(out, "train.max_steps=5", *fid_on, resume=str(out / "state" / "step-3"))
    assert _steps(out / "stats.jsonl") == [1, 2, 3, 4, 5]  # the roll-back's branch only
    assert _steps(out / "stats.abandoned.jsonl") == [4, 4, 5, 6]


@pytest.mark.parametrize("stop_step", [3, 4])
def test_a_stop_signal_checkpoints_before_any_sample_grid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_step: int) -> None:
    """A launcher kills its workers soon after forwarding a signal: the step that sees the
    signal checkpoints at once, drawing neither its sample grid (step 3 is a sample step) nor
    the final one (step 4 is not); a sample grid drawn first lost the checkpoint under DDP."""
    from gen_ad.training import loop, monitor

    grids: list[int] = []
    orig_step = loop.train_one_step

    def step(state: Any, batch: torch.Tensor) -> dict[str, Any]:
        logs = orig_step(state, batch)
        if state.counters.step == stop_step:
            state.stop_signal.append(15)
        return logs

    monkeypatch.setattr(loop, "train_one_step", step)
    monkeypatch.setattr(monitor, "save_samples",
                        lambda state, n=64: grids.append(state.counters.step))
    out = tmp_path / "r"
    _train(out, "train.max_steps=50", "train.ckpt_every=0", "train.sample_every=3")
    assert [s for s, _ in ckpt.list_states(out)] == [stop_step]
    assert grids == ([] if stop_step == 3 else [3])
    steps = [r["step"] for r in read_jsonl(out / "stats.jsonl")]
    assert steps == list(range(1, stop_step + 1))  # the stopping step is still logged


def test_the_run_says_how_many_processes_train_and_logs_their_mean(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One start line names the processes, device and batch split (``accelerate launch --cpu
    --num_processes 2`` starts one process, and nothing said so); logged scalars are the mean
    over the processes (each logged its own share of the batch)."""
    from gen_ad.training.monitor import mean_over_processes

    _train(tmp_path / "r", "train.max_steps=1", "train.grad_accum=2", "train.batch_size=8")
    err = capsys.readouterr().err
    assert "train toy: 1 process on cpu, batch 8 (2 micro-batches), mixed precision no" in err

    class TwoProcesses:  # rank 0's view of a 2-process reduction; rank 1 logged 3.0 and 5.0
        num_processes, device = 2, torch.device("cpu")

        def reduce(self, t: torch.Tensor, reduction: str) -> torch.Tensor:
            assert reduction == "mean"
            return (t + torch.tensor([3.0, 5.0])) / 2

    logs = {"loss": torch.tensor(1.0), "img_per_s": 7.0}
    assert mean_over_processes(TwoProcesses(), logs) == {"loss": 2.0, "img_per_s": 6.0}


def test_a_resume_hides_the_tensorboard_points_past_its_state(tmp_path: Path) -> None:
    """TensorBoard's curves of a run killed at step 5 with its state at 3, then resumed, show
    each step once, with the resumed branch's values (the JSON logs set theirs aside; the event
    files cannot be rewritten, so the resumed writer purges the points past step 3)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    with pytest.raises(TrainingDivergedError):  # dies in its 5th step, after logging step 4
        _train(out, "train.max_steps=6", "train.ckpt_every=3", "nan_at_step=4")
    _train(out, "train.max_steps=6", resume="latest")
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    points = [(e.step, e.value) for e in acc.Scalars("loss_net")]
    assert [s for s, _ in points] == [1, 2, 3, 4, 5, 6]
    logged = [r["loss_net"] for r in read_jsonl(out / "stats.jsonl")]
    assert [v for _, v in points] == pytest.approx(logged, rel=1e-6)
