"""Procedural H&E tissue: determinism, prefix property, exact masks, dataset, folder, CLI, bench."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen_ad.cli import main
from gen_ad.data.synthetic import (
    ANOMALY_TYPES,
    SyntheticTissue,
    generate,
    generate_range,
    write_folder,
)
from gen_ad.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def _od_red(images: np.ndarray) -> np.ndarray:
    """Optical density of the red channel: mostly hematoxylin (eosin barely absorbs red)."""
    return -np.log((images[..., 0].astype(np.float64) + 1.0) / 256.0)


def test_same_seed_identical_different_seed_differs() -> None:
    a = generate(6, 32, seed=0, anomaly_fraction=0.5)
    b = generate(6, 32, seed=0, anomaly_fraction=0.5)
    c = generate(6, 32, seed=1, anomaly_fraction=0.5)
    assert a == b
    assert a.images.dtype == np.uint8 and a.images.shape == (6, 32, 32, 3)
    assert a.masks.dtype == bool and a.masks.shape == (6, 32, 32)
    assert a.labels.dtype == np.int64 and a.labels.shape == (6,)
    assert not np.array_equal(a.images, c.images)
    # patches within a batch differ from each other too
    assert len({im.tobytes() for im in a.images}) == 6


def test_prefix_property_and_ranges() -> None:
    big = generate(300, 16, seed=3, anomaly_fraction=0.5)  # crosses a chunk boundary at 16 px
    assert big[:5] == generate(5, 16, seed=3, anomaly_fraction=0.5)
    assert big[250:300] == generate_range(250, 300, 16, seed=3, anomaly_fraction=0.5)
    assert generate(10, 40, seed=7)[:4] == generate(4, 40, seed=7)


def test_masks_exact_outside_identical_inside_changed() -> None:
    with_anom = generate(24, 48, seed=2, anomaly_fraction=1.0)
    clean = generate(24, 48, seed=2, anomaly_fraction=0.0)
    assert with_anom.labels.tolist() == [1] * 24 and clean.labels.tolist() == [0] * 24
    assert not clean.masks.any()
    m = with_anom.masks
    assert m.any(axis=(1, 2)).all() and (~m).any(axis=(1, 2)).all()
    changed = (with_anom.images != clean.images).any(-1)
    assert not (changed & ~m).any(), "pixels outside the mask must equal the clean rendering"
    assert changed[m].mean() > 0.85, "the anomaly must change (almost) every masked pixel"


@pytest.mark.parametrize(("kind", "sign"), [("tumor", 1), ("inflammation", 1), ("necrosis", -1)])
def test_anomaly_changes_hematoxylin_in_expected_direction(kind: str, sign: int) -> None:
    anom = generate(16, 48, seed=5, anomaly_fraction=1.0, anomaly_types=(kind,))
    clean = generate(16, 48, seed=5)
    assert set(anom.kinds) == {kind}
    diff = _od_red(anom.images)[anom.masks].mean() - _od_red(clean.images)[anom.masks].mean()
    assert sign * diff > 0.05, f"{kind}: hematoxylin change {diff:.3f} has the wrong sign/size"


def test_anomaly_fraction_and_types_respected() -> None:
    for fraction in (0.0, 0.3, 0.5, 1.0):
        b = generate(200, 16, seed=11, anomaly_fraction=fraction)
        assert abs(int(b.labels.sum()) - fraction * 200) <= 3
        assert b.labels.tolist() == [int(k != "normal") for k in b.kinds]
        assert set(b.kinds) <= {"normal", *ANOMALY_TYPES}
        assert not b.masks[b.labels == 0].any()
        assert b.masks[b.labels == 1].any(axis=(1, 2)).all()
    b = generate(200, 16, seed=11, anomaly_fraction=0.5)
    assert {k for k in b.kinds if k != "normal"} == set(ANOMALY_TYPES)
    b = generate(60, 16, seed=11, anomaly_fraction=0.5, anomaly_types=("necrosis",))
    assert set(b.kinds) == {"normal", "necrosis"}


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": 4, "size": 8}, {"n": 4, "seed": -1},
                                    {"n": 4, "anomaly_fraction": 1.5},
                                    {"n": 4, "anomaly_types": ("bogus",)},
                                    {"n": 4, "anomaly_types": ()}])
def test_bad_values_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="synthetic"):
        generate(**kwargs)


def test_dataset_items() -> None:
    ds = SyntheticTissue(10, size=32, seed=1, anomaly_fraction=0.5)
    ref = generate(10, 32, seed=1, anomaly_fraction=0.5)
    assert len(ds) == 10
    for i in (0, 3, 9, -1):
        item = ds[i]
        j = i % 10
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
        expect = torch.from_numpy(ref.images[j]).permute(2, 0, 1).float() / 127.5 - 1.0
        assert torch.equal(item["image"], expect)
        assert item["label"] == int(ref.labels[j]) and item["cls"] == ref.kinds[j]
        assert item["path"] == f"synthetic/{j}"
        assert item["mask"].shape == (32, 32)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(item["mask"].bool(), torch.from_numpy(ref.masks[j]))
    with pytest.raises(IndexError):
        ds[10]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 32, 32)


def test_write_folder_layout(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    counts = write_folder(out, n=12, size=16, seed=4, anomaly_fraction=0.5)
    ref = generate(12, 16, seed=4, anomaly_fraction=0.5)
    assert counts["normal"] + counts["anomalous"] == 12
    assert counts["anomalous"] == int(ref.labels.sum()) == sum(counts[t] for t in ANOMALY_TYPES)
    normal = sorted(p.name for p in (out / "normal").glob("*.png"))
    anomalous = sorted(p.name for p in (out / "anomalous").glob("*.png"))
    assert len(normal) == counts["normal"] and len(anomalous) == counts["anomalous"]
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == anomalous
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(rows[0]) == {"path", "label", "kind"}
    for i, row in enumerate(rows):
        assert row["kind"] == ref.kinds[i] and int(row["label"]) == ref.labels[i]
        img = np.asarray(Image.open(out / row["path"]))
        assert np.array_equal(img, ref.images[i])
        if row["kind"] != "normal":
            mask = np.asarray(Image.open(out / "masks" / Path(row["path"]).name))
            assert np.array_equal(mask > 127, ref.masks[i])
    assert not list(out.rglob("*.tmp"))


def test_cli_synth_writes_folder_and_sheet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    rc = main(["synth", "--out", str(out), "--n", "6", "--size", "16",
               "--anomaly-fraction", "0.5", "--seed", "2"])
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("synth: wrote")
    assert (out / "contact_sheet.png").is_file() and (out / "manifest.csv").is_file()


def _pngs(out: Path) -> dict[str, set[str]]:
    return {d: {p.name for p in (out / d).glob("*.png")} for d in ("normal", "anomalous", "masks")}


def test_cli_synth_replaces_an_earlier_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A smaller set written over a larger one leaves only its own patches (and masks), all at
    the new size; a file the manifest does not list stays; empty class folders go."""
    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--n", "40", "--size", "32",
                 "--anomaly-fraction", "0.5"]) == 0
    assert "replaced" not in capsys.readouterr().out
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "normal" / "mine.png")
    n_masks = len(list((out / "masks").glob("*.png")))
    assert main(["synth", "--out", str(out), "--n", "10", "--size", "16",
                 "--anomaly-fraction", "0.5", "--seed", "1"]) == 0
    # 40 patches, their masks and the contact sheet were deleted; mine.png was not
    assert f"({40 + n_masks + 1} files deleted)" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "manifest.csv", newline="")))
    files = _pngs(out)
    assert {f"{d}/{n}" for d in ("normal", "anomalous") for n in files[d]} == \
        {r["path"] for r in rows} | {"normal/mine.png"}
    assert files["masks"] == files["anomalous"] and len(rows) == 10
    assert all(Image.open(out / r["path"]).size == (16, 16) for r in rows)
    assert Image.open(out / "contact_sheet.png").size != (0, 0)
    assert main(["synth", "--out", str(out), "--n", "5", "--size", "16"]) == 0  # no anomalies
    assert not (out / "anomalous").exists() and not (out / "masks").exists()
    assert _pngs(out)["normal"] == {f"{i:06d}.png" for i in range(5)} | {"mine.png"}
    assert not list(out.glob(".synth-pending*"))


def test_cli_synth_refuses_a_folder_of_other_images(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "data"
    (out / "normal").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "normal" / "000000.png")
    (out / "manifest.csv").write_text("slide,level,x,y,tissue_fraction,path\n")  # not ours
    assert main(["synth", "--out", str(out), "--n", "4", "--size", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gen-ad: error:") and "holds images" in err and "\n" not in err
    assert np.asarray(Image.open(out / "normal" / "000000.png")).shape == (8, 8, 3)
    assert (out / "manifest.csv").read_text().startswith("slide,")
    assert not (out / "contact_sheet.png").exists()


def test_an_interrupted_write_is_cleaned_up_by_the_next(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import gen_ad.data.synthetic as synthetic

    out = tmp_path / "s"
    real, calls = synthetic._save_png, []

    def failing(path: Path, array: np.ndarray) -> None:
        calls.append(path)
        if len(calls) > 20:
            raise OSError("disk full")
        real(path, array)

    monkeypatch.setattr(synthetic, "_save_png", failing)
    with pytest.raises(OSError):
        write_folder(out, n=30, size=16, anomaly_fraction=0.5)
    monkeypatch.setattr(synthetic, "_save_png", real)
    assert not (out / "manifest.csv").exists()
    write_folder(out, n=3, size=16)
    assert _pngs(out)["normal"] == {"000000.png", "000001.png", "000002.png"}
    assert not (out / "anomalous").exists() and not (out / "masks").exists()


@pytest.mark.parametrize("bad", [["--n", "0"], ["--n", "4", "--size", "8"],
                                 ["--n", "4", "--anomaly-fraction", "1.5"],
                                 ["--n", "4", "--anomaly-fraction", "-0.1"]])
def test_cli_synth_bad_values_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                     bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["synth", "--out", str(tmp_path / "x"), *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "error" in err and len(err.splitlines()) == 1


def test_cli_synth_negative_seed_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture
                                                ) -> None:
    assert main(["synth", "--out", str(tmp_path / "x"), "--n", "2", "--seed", "-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gen-ad: error:") and len(err.splitlines()) == 1


def test_bench_smoke_prints_json(run_bench: Callable[..., dict]) -> None:
    record = run_bench("synthetic.py", timeout=300)
    assert record["bench"] == "synthetic" and record["threads"] == 1
    speeds = next(iter(record["results"].values()))
    assert speeds["patches_per_s_cpu"] > 0 and speeds["patches_per_s_wall"] > 0
