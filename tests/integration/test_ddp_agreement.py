"""Two CPU processes (``accelerate launch``, gloo) agree: on when to stop after a signal, on the
state to resume from, and on who builds the patch cache (``ddp_probe.py``, ~20 s each)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen_ad.config import load_config
from gen_ad.training import checkpoint as ckpt
from gen_ad.training.loop import run_training

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from toy_family import ToyConfig, ToyFamily  # noqa: E402

COMMON = ("train.sample_every=0", "train.cpu=true", "train.batch_size=4", "train.log_every=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_tree(pid: int) -> None:
    import psutil  # an accelerate dependency

    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        p.kill()


def _launch(env: dict[str, str], out: Path, *args: str, timeout: float = 120) -> str:
    """Run ``ddp_probe.py`` on 2 CPU processes; a hang is killed (whole group) and fails.
    Returns stdout + stderr."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(HERE / "ddp_probe.py"), str(out), *COMMON, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        text, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)  # the workers run in sessions of their own
        _, err = proc.communicate()
        pytest.fail(f"the 2-process run hung (killed after {timeout} s): {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return text + err


def _probes(out: Path) -> list[dict]:
    return [json.loads((out / f"probe-{r}.json").read_text()) for r in (0, 1)]


def _same_replicas(out: Path) -> None:
    r0 = torch.load(out / "replica-0.pt", weights_only=True)
    r1 = torch.load(out / "replica-1.pt", weights_only=True)
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)


@pytest.fixture
def env(checkout_env: Callable[..., dict[str, str]]) -> dict[str, str]:
    return checkout_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")


def test_a_signal_reaching_ranks_a_step_apart_stops_all_at_the_same_step(
        tmp_path: Path, env: dict[str, str]) -> None:
    """Rank 0 flags SIGTERM after step 3, rank 1 after step 4: both stop after step 3 and
    checkpoint it (each rank checking only its own flag deadlocked: one in the checkpoint's
    collective, the other in the next step's)."""
    out = tmp_path / "sig"
    said = _launch(env, out, "--signal-at", "3,4", "train.max_steps=50", "train.ckpt_every=0")
    assert "signal 15 received: checkpointing at step 3" in said
    assert [s for s, _ in ckpt.list_states(out)] == [3]
    _same_replicas(out)


def test_every_rank_resumes_the_state_the_main_process_repaired(
        tmp_path: Path, env: dict[str, str]) -> None:
    """A kill between the two renames of step 4's re-save left it as ``.step-4.old-*``; rank 0
    repairs it under its lock (slowly here). Every rank must resume from step 4, not rank 1
    from step 2 on its own (which it resolved before the repair)."""
    out = tmp_path / "res"
    cfg = load_config(ToyConfig, None, [f"out={out}", *COMMON, "train.max_steps=4",
                                        "train.ckpt_every=2"])
    run_training(ToyFamily(cfg))
    (out / "state" / "step-4").rename(out / "state" / ".step-4.old-1-deadbeef")
    _launch(env, out, "--resume", "latest", "--slow-repair", "3", "train.max_steps=6",
            "train.ckpt_every=2")
    assert [p["loaded"] for p in _probes(out)] == [str(out / "state" / "step-4")] * 2
    assert [s for s, _ in ckpt.list_states(out)][-1] == 6
    _same_replicas(out)


def test_one_process_builds_the_patch_cache(tmp_path: Path, env: dict[str, str]) -> None:
    """Under DDP the main process builds ``data.cache``; the other waits and opens it (each
    built its own before: N x the temporary disk, and a rename race that killed the launch)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "patches"
    data.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out, cache = tmp_path / "run", tmp_path / "cache"
    _launch(env, out, "--slow-build", "2", f"data.train={data}", f"data.cache={cache}",
            "data.size=16", "train.max_steps=1")
    assert sum(p["builds"] for p in _probes(out)) == 1
    assert len(list(cache.iterdir())) == 1  # one cache, no temporary folder left
    _same_replicas(out)
