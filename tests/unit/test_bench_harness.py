"""The benches' shared harness (``bench/_common.py``) and the fairness rules of the side-by-side
benches: interleaved rounds, competent peers, the same per-step work on both sides."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / ".ref" / "stylegan2-ada-pytorch"  # a local stylegan2-ada-pytorch, if any


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
stepping\t: 1
microcode\t: 0x1000065

processor\t: 1
vendor_id\t: GenuineIntel
"""


def test_cpu_ids_read_the_first_processor() -> None:
    ids = _bench("_common").cpu_ids(CPUINFO)
    assert ids == {"vendor": "AuthenticAMD", "family": "25", "model": "1", "stepping": "1",
                   "microcode": "0x1000065"}
    assert _bench("_common").cpu_ids("") == {}


def test_commit_is_this_checkouts_and_none_for_a_folder_inside_it(tmp_path: Path) -> None:
    common = _bench("_common")
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = None
    if head is not None:
        assert common.git_commit() == head
    # a reference copied under this checkout is not a checkout of its own
    assert common.git_commit(ROOT / "bench", own_checkout=True) is None
    assert common.git_commit(tmp_path, own_checkout=True) is None
    hw = common.machine()
    assert {"cpu", "cpu_ids", "cpu_count", "threads", "commit", "load_avg"} <= set(hw)


def test_tree_digest_names_a_copy_without_git(tmp_path: Path) -> None:
    common = _bench("_common")
    assert common.tree_digest(tmp_path) is None  # nothing to name
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    first = common.tree_digest(tmp_path)
    assert first is not None and first == common.tree_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("changed")  # only .py files count
    assert common.tree_digest(tmp_path) == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert common.tree_digest(tmp_path) != first
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "b.py")  # a rename counts too
    assert common.tree_digest(tmp_path) not in (None, first)


def test_rounds_interleave_the_methods_and_keep_each_ones_best() -> None:
    common = _bench("_common")
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("ours", "peer")}
    seconds = common.interleaved_rounds(fns, 3, torch.device("cpu"))
    assert calls == ["ours", "peer"] * 3
    assert all(len(v) == 3 for v in seconds.values())
    assert common.best({"a": [3.0, 1.0, 2.0]}) == {"a": 1.0}


def _mem_row(n: int, peaks: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"n": n}
    for v, peak in peaks.items():
        row[v] = {"peak_increase_mib": peak * n / 1000, "anon_rss_end_mib": 0.0, "seconds": 1.0}
    return row


def test_memory_ratio_is_against_the_best_competent_peer() -> None:
    memory = _bench("memory")
    peaks = {"folder": 5.0, "cache_build": 30.0, "cache": 25.0, "preallocated_uint8": 20.0,
             "preallocated_float32": 60.0, "stacked_float32": 100.0}
    out = memory._summary([_mem_row(1000, peaks), _mem_row(4000, peaks)])
    assert out["peer"]["variant"] == "preallocated_uint8"
    assert out["ratio"] == pytest.approx(25 / 20, abs=1e-3)
    assert out["stacked_float32_list"]["ratio"] == pytest.approx(0.25, abs=1e-3)
    assert out["growth_mib_per_1k"]["cache"] == pytest.approx(25.0, abs=0.01)


def test_knn_plain_peer_is_one_fused_product_and_exact_here() -> None:
    knn = _bench("knn")
    dev = torch.device("cpu")
    bank = knn.clustered_torch(2000, 16, 0, dev)
    q = knn.clustered_torch(20, 16, 1, dev)
    setup = knn._peers(bank, dev, 10)
    ref = knn.float64_reference(q, bank, 10)
    assert torch.equal(setup["fns"]["plain_matmul_topk"](q), ref)
    assert torch.equal(setup["fns"]["ours"](q), ref)
    assert setup["settings"]["ours"]["memory_budget_bytes"] == 1 << 40


def test_diffusion_bf16_peer_and_the_timed_configuration_check() -> None:
    """The bf16 + channels-last plain loop runs (here on CPU, forced) and scores as the fp32
    loop within its stated tolerance; the timed ``ours`` is checked against our fp32 eager
    scorer with the same image streams."""
    diffusion = _bench("diffusion")
    out = diffusion.bench_peers("tiny", 16, 2, 2, torch.device("cpu"), rounds=2, repeat=1,
                                peer_bf16=True)
    assert set(out["ms_per_image"]) == {"ours", "ours_fp32_eager", "plain_fp32_loop",
                                        "plain_bf16_channels_last_loop"}
    assert out["faster_peer"].startswith("plain_")
    checks = out["score_checks"]
    assert checks["ours_vs_ours_fp32_eager"]["max_rel_diff"] == 0.0  # CPU: ours is fp32 eager
    assert checks["plain_bf16_vs_plain_fp32_loop"]["rtol"] == 5e-2
    assert out["scores_within_rtol"] and set(out["warmup_s"]) == set(out["ms_per_image"])


def test_stylegan2_gen_ad_step_updates_g_ema_and_keeps_a_fixed_p(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """gen_ad's timed step is its loop's: the family's step, then the G_ema update."""
    sg = _bench("stylegan2")
    updated: list[float] = []
    real = sg.ema_update
    monkeypatch.setattr(sg, "ema_update", lambda e, m, d: (updated.append(d), real(e, m, d)))
    model = {"channel_base": 32, "channel_max": 4, "z_dim": 4, "w_dim": 4, "mapping_layers": 2}
    step, fam = sg.gen_ad_trainer(16, "E", 4, model, cpu=True, ada=False)
    step()
    step()
    assert len(updated) == 2 and updated[1] > 0  # G only; ramped-up decay after step 0
    assert fam.ada.p == sg.AUGMENT_P and not fam.cfg.augment.ada
    assert fam.cfg.loss.ema_rampup == sg.EMA_RAMPUP


@pytest.mark.skipif(not (REFERENCE / "training" / "networks.py").is_file(),
                    reason="no stylegan2-ada-pytorch checkout under .ref/")
def test_stylegan2_reference_comparison_interleaves_same_work(
        run_bench: Callable[..., dict[str, Any]]) -> None:
    # in a subprocess: the reference's top-level packages (training, metrics) go on its path
    rec = run_bench("stylegan2.py", "--smoke", "--cpu", "--reference", str(REFERENCE),
                    "--rounds", "2", one_line=False)
    assert rec["settings"]["rounds"] == 2 and rec["ada_adapts"] == {"gen_ad": False,
                                                                    "reference": False}
    assert "commit" in rec["reference_checkout"] and rec["hardware"]["cpu_count"]
    row = rec["rows"][0]
    assert row["rounds"] == 2 and all(len(v) == 2 for v in row["round_img_per_s"].values())
    assert row["ada_p_end"]["gen_ad"] == pytest.approx(row["ada_p_end"]["reference"])
    assert rec["ratio"] == pytest.approx(row["gen_ad_img_per_s"] / row["reference_img_per_s"])
