"""Atomic writes, folders swapped in as a whole, manifests, full disk, refused pickles."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import gen_ad.utils.io as gio
from gen_ad.errors import CheckpointError, DiskFullError


def test_temporary_names_are_unique_per_process(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = gio._write_file
    monkeypatch.setattr(gio, "_write_file", lambda p, d: (seen.append(p.name), real(p, d)))
    gio.write_text(tmp_path / "a.txt", "one")
    gio.write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert len(set(seen)) == 2 and all(n.startswith(f".a.txt.{os.getpid()}-") for n in seen)
    d1, d2 = gio.atomic_dir(tmp_path / "f"), gio.atomic_dir(tmp_path / "f")
    assert d1 != d2 and str(os.getpid()) in d1.name
    assert gio.unique_tag() != gio.unique_tag()


def test_disk_full_names_the_file_and_leaves_the_old_one(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    gio.write_text(tmp_path / "x.json", "old")

    def full(path: Path, data: bytes) -> None:
        path.write_bytes(data[:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gio, "_write_file", full)
    for write in (lambda: gio.write_text(tmp_path / "x.json", "new"),
                  lambda: gio.torch_save(tmp_path / "x.json", {"a": torch.ones(3)}),
                  lambda: gio.save_safetensors(tmp_path / "x.json", {"a": torch.ones(3)})):
        with pytest.raises(DiskFullError, match=rf"no space left .* {tmp_path / 'x.json'}$"):
            write()
    assert (tmp_path / "x.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # temporaries removed


def test_refused_pickle_and_damaged_files_are_one_line(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused") as e:
        gio.torch_load(tmp_path / "evil.pt")
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
    gio.torch_save(tmp_path / "ok.pt", {"x": torch.arange(4)})
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:40])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for bad, load in (("cut.pt", gio.torch_load), ("empty.safetensors", gio.load_safetensors)):
        with pytest.raises(CheckpointError, match="damaged") as e:
            load(tmp_path / bad)
        assert "\n" not in str(e.value)


def test_manifest_catches_every_kind_of_damage(tmp_path: Path) -> None:
    d = tmp_path / "state"
    (d / "models").mkdir(parents=True)
    (d / "models" / "G.bin").write_bytes(bytes(range(100)))
    (d / "meta.json").write_text("{}")
    m = gio.write_manifest(d, {"step": 3})
    assert set(m["files"]) == {"models/G.bin", "meta.json"} and m["step"] == 3
    assert gio.check_manifest(d)["step"] == 3
    g = d / "models" / "G.bin"
    cases = {"flip": bytes([1]) + g.read_bytes()[1:], "truncate": g.read_bytes()[:50]}
    for data in cases.values():
        good = g.read_bytes()
        g.write_bytes(data)
        with pytest.raises(CheckpointError, match="G.bin"):
            gio.check_manifest(d)
        g.write_bytes(good)
    g.unlink()
    with pytest.raises(CheckpointError, match="G.bin is missing"):
        gio.check_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        gio.check_manifest(d)
    for rel in ("../outside", "/etc/passwd"):
        with pytest.raises(CheckpointError, match="refusing the path"):
            gio.inside(d, rel)


def test_publish_swaps_whole_folders_and_recovers_a_killed_swap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "model"
    for version in ("v1", "v2"):
        tmp = gio.atomic_dir(final)
        (tmp / "w").write_text(version)
        gio.publish_dir(tmp, final)
        assert (final / "w").read_text() == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    tmp = gio.atomic_dir(final)
    (tmp / "w").write_text("v3")
    real, calls = os.replace, []

    def dies_on_second(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill between the two renames
        real(a, b)

    monkeypatch.setattr(gio.os, "replace", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        gio.publish_dir(tmp, final)
    monkeypatch.setattr(gio.os, "replace", real)
    assert not final.exists()
    with pytest.warns(UserWarning, match="interrupted swap"):
        assert gio.recover_dir(final) == final
    assert (final / "w").read_text() == "v2"  # the previous complete version is back
    gio.remove_dir(final)
    assert not final.exists() and not list(tmp_path.glob(".model.trash-*"))


def test_taking_a_folders_lock_sweeps_what_killed_writers_left(tmp_path: Path) -> None:
    """A killed export, file write, prune or swap leaves hidden temporaries; the next command
    that takes the folder's lock removes them (only gen_ad's own names), keeping a swap's
    previous version while its folder is missing (recover_dir still needs it)."""
    from gen_ad.utils.lock import folder_lock

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "G.safetensors").write_bytes(b"w")
    (run / "thresholds").mkdir()
    (run / "thresholds" / "x.json").write_text("{}")
    stale = [gio.atomic_dir(run / "model"),  # a killed export: .model.<pid>-<random>.tmp
             run / "thresholds" / ".x.json.123-abcd_123.tmp",  # a killed atomic file write
             run / ".samples.trash-77-0123abcd",  # a killed remove_dir
             run / ".model.old-77-89abcdef"]  # a swap killed after its second rename
    for p in stale[1:]:
        p.mkdir() if "trash" in p.name or "old" in p.name else p.write_text("partial")
    keep = [run / "state" / ".step-9.old-5-00112233",  # step-9 missing: recover_states' job
            run / ".notes.tmp", run / "my.1-2.tmp", run / "thresholds" / "x.json"]
    keep[0].mkdir(parents=True)
    for p in keep[1:3]:
        p.write_text("user file")
    with pytest.warns(UserWarning, match="removed 4 temporary file"), folder_lock(run):
        assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)
    assert (run / "model" / "G.safetensors").read_bytes() == b"w"
    import warnings

    with warnings.catch_warnings():  # nothing left: no message
        warnings.simplefilter("error")
        with folder_lock(run):
            pass
