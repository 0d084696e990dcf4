"""Patch folders: every image mode, bad files, validation, subsets and build_dataset."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gen_ad.config import DataConfig, from_dict
from gen_ad.data import (
    PatchFolder,
    build_dataset,
    image_to_tensor,
    load_image,
    read_rgb,
    split,
    subset,
    tensor_to_uint8,
)
from gen_ad.data.folders import discover_classes
from gen_ad.errors import DataError


def _rgb(seed: int, h: int = 12, w: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _folder(root: Path, counts: dict[str, int], size: int = 12, ext: str = ".png") -> Path:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(_rgb(i + 100 * len(cls), size, size)).save(root / cls / f"{i:03d}{ext}")
    return root


# ----------------------------------------------------------------------------- decoding


def test_every_mode_decodes_to_expected_rgb(tmp_path: Path) -> None:
    import tifffile

    g = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    rgb = _rgb(0, 6, 8)
    cases: dict[str, tuple[object, np.ndarray]] = {}
    cases["l.png"] = (Image.fromarray(g, "L"), np.stack([g] * 3, -1))
    alpha = np.where(np.arange(8) < 4, 255, 0).astype(np.uint8)[None].repeat(6, 0)
    la = Image.fromarray(np.stack([g, alpha], -1), "LA")
    cases["la.png"] = (la, np.where(alpha[..., None] > 0, np.stack([g] * 3, -1), 255))
    half = np.full((6, 8), 128, np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, half]), "RGBA")
    cases["rgba.png"] = (rgba, np.rint(rgb * (128 / 255) + 255 * (127 / 255)).astype(np.uint8))
    pal = Image.fromarray(rgb).quantize(colors=16)
    cases["p.png"] = (pal, np.asarray(pal.convert("RGB")))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cases["cmyk.tif"] = (cmyk, np.asarray(cmyk.convert("RGB")))
    g16 = (np.arange(48).reshape(6, 8) * 1365).astype(np.uint16)
    cases["i16.png"] = (Image.fromarray(g16), np.stack([np.rint(g16 / 257)] * 3, -1))
    cases["rgb.webp"] = (Image.fromarray(rgb), None)
    cases["rgb.bmp"] = (Image.fromarray(rgb), rgb)
    cases["rgb.JPG"] = (Image.fromarray(rgb), None)
    for name, (im, _) in cases.items():
        kw: dict[str, object] = {"lossless": True} if name.endswith("webp") else {}
        if name.endswith("JPG"):
            kw = {"quality": 100, "subsampling": 0}
        im.save(tmp_path / name, **kw)
    cases["rgb.webp"] = (None, rgb)
    rgb16 = (rgb.astype(np.uint16) * 257 + 100).clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    cases["rgb16.tif"] = (None, np.rint(rgb16 / 257).astype(np.uint8))
    f32 = (g16.astype(np.float32) / 65535)
    Image.fromarray(f32, "F").save(tmp_path / "f.tif")
    cases["f.tif"] = (None, np.stack([np.rint(f32 * 255)] * 3, -1).astype(np.uint8))
    for name, (_, want) in cases.items():
        out = read_rgb(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (6, 8, 3), name
        if want is not None:
            np.testing.assert_array_equal(out, want.astype(np.uint8), err_msg=name)
    jpg = read_rgb(tmp_path / "rgb.JPG").astype(int)
    assert np.abs(jpg - rgb).mean() < 8  # lossy, but the same picture


def test_tensor_round_trip_and_rounding() -> None:
    rgb = np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None].repeat(3, -1)
    t = image_to_tensor(rgb)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert t.min() == -1.0 and t.max() == 1.0
    back = tensor_to_uint8(t[None])
    assert back.shape == (1, 16, 16, 3) and back.dtype == torch.uint8
    np.testing.assert_array_equal(back[0].numpy(), rgb)
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 5.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    np.testing.assert_array_equal(tensor_to_uint8(x)[0, 0, :, 0].numpy(), [0, 0, 128, 255, 255])


def test_load_image_resizes_antialiased(tmp_path: Path) -> None:
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).save(tmp_path / "c.png")
    x = load_image(tmp_path / "c.png", 16)
    assert x.shape == (3, 16, 16)
    assert x.abs().max() < 0.1  # a 1-px checkerboard averages to grey, not aliasing
    with pytest.raises(DataError, match="cannot read image"):
        load_image(tmp_path / "missing.png", 16)


# ----------------------------------------------------------------------------- folders


def test_items_labels_and_classes(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"normal": 3, "tumor": 2}, size=20)
    ds = PatchFolder(root=root, size=8)
    assert len(ds) == 5 and ds.classes == ["normal", "tumor"]
    item = ds[4]
    assert set(item) == {"image", "label", "path", "cls"}
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert (item["label"], item["cls"]) == (1, "tumor")
    assert ds.labels == [0, 0, 0, 1, 1]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, 8, 8) and batch["label"].tolist() == ds.labels
    only = PatchFolder(root=root, size=8, classes=["tumor"], normal_classes=["tumor"])
    assert len(only) == 2 and only.labels == [0, 0]
    crop = PatchFolder(root=root, size=8, resize="center_crop")[0]["image"]
    want = image_to_tensor(read_rgb(root / "normal" / "000.png")[6:14, 6:14])
    torch.testing.assert_close(crop, want)


def test_flat_folder_is_one_class(tmp_path: Path) -> None:
    root = tmp_path / "normal"
    root.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(i)).save(root / f"{i}.png")
    (root / ".hidden.png").write_bytes(b"junk")
    ds = PatchFolder(root=root, size=8)
    assert ds.flat and ds.classes == ["normal"] and ds.labels == [0, 0, 0]


def test_missing_empty_and_unknown_class(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found.*nope"):
        PatchFolder(root=tmp_path / "nope", size=8)
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found in .*empty"):
        PatchFolder(root=tmp_path / "empty", size=8)
    root = _folder(tmp_path / "d", {"normal": 2})
    with pytest.raises(DataError, match="unknown class 'tumour'.*normal"):
        PatchFolder(root=root, size=8, classes=["tumour"])


def _add_bad(root: Path, n_good: int) -> list[Path]:
    corrupt = root / "normal" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    buf = root / "normal" / "full.jpg"
    Image.fromarray(_rgb(7, 64, 64)).save(buf, quality=95)
    truncated = root / "normal" / "truncated.jpg"
    truncated.write_bytes(buf.read_bytes()[: len(buf.read_bytes()) // 2])
    buf.unlink()
    return [corrupt, truncated]


def test_bad_files_skipped_with_one_warning(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"normal": 38})
    bad = _add_bad(root, 38)
    with pytest.warns(UserWarning) as rec:
        ds = PatchFolder(root=root, size=8, max_bad_fraction=0.1)
    msgs = [str(w.message) for w in rec if "unreadable" in str(w.message)]
    assert len(msgs) == 1
    assert "skipping 2 unreadable of 40" in msgs[0]
    assert all(str(p) in msgs[0] for p in bad)
    assert len(ds) == 38 and {Path(p) for p, _ in ds.bad_files} == set(bad)
    assert all("truncated" not in p for p in ds.paths)
    with pytest.raises(DataError, match="2 of 40 images .* unreadable .*max_bad_fraction"):
        PatchFolder(root=root, size=8, max_bad_fraction=0.04)


def test_all_bad_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "d" / "normal").mkdir(parents=True)
    _add_bad(tmp_path / "d", 0)
    with pytest.raises(DataError, match="none of the 2 images"):
        PatchFolder(root=tmp_path / "d", size=8, max_bad_fraction=1.0)


def test_masks(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"good": 2, "bad": 2}, size=16)
    masks = tmp_path / "m" / "bad"
    masks.mkdir(parents=True)
    m = np.zeros((16, 16), np.uint8)
    m[:8] = 200
    Image.fromarray(m).save(masks / "000_mask.png")
    with pytest.raises(DataError, match="1 anomalous images have no mask.*bad/001.png"):
        PatchFolder(root=root, size=8, normal_classes=["good"], mask_root=tmp_path / "m")
    ds = PatchFolder(root=root, size=8, normal_classes=["good"], mask_root=tmp_path / "m",
                     missing_mask="full")
    items = {(it["cls"], Path(it["path"]).stem): it for it in (ds[i] for i in range(len(ds)))}
    want = torch.zeros(8, 8)
    want[:4] = 1
    torch.testing.assert_close(items["bad", "000"]["mask"], want)
    assert items["bad", "001"]["mask"].eq(1).all() and items["good", "000"]["mask"].eq(0).all()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(masks / "001.png")
    with pytest.raises(DataError, match="mask .* is 5x5, image is 16x16"):
        PatchFolder(root=root, size=8, normal_classes=["good"], mask_root=tmp_path / "m",
                    max_bad_fraction=0.0)


# ----------------------------------------------------------------------------- subsets


def test_subset_and_split_are_seeded_and_disjoint() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(100))
    a, b = subset(data, 10, seed=3), subset(data, 10, seed=3)
    assert a.indices == b.indices and a.indices != subset(data, 10, seed=4).indices
    assert a.indices == sorted(a.indices) and len(set(a.indices)) == 10
    parts = split(data, [0.7, 0.2, 0.1], seed=1)
    assert [len(p) for p in parts] == [70, 20, 10]
    assert sorted(i for p in parts for i in p.indices) == list(range(100))
    assert [p.indices for p in parts] == [p.indices for p in split(data, [0.7, 0.2, 0.1], 1)]
    assert [len(p) for p in split(data, [0.5, 0.5 - 1e-12], seed=0)] == [50, 50]
    assert [len(p) for p in split(data, [30, 5], seed=0)] == [30, 5]
    assert [len(p) for p in split(torch.utils.data.TensorDataset(torch.arange(10)),
                                  [1 / 3, 1 / 3, 1 / 3])] == [4, 3, 3]
    with pytest.raises(DataError):
        subset(data, 101, seed=0)
    with pytest.raises(DataError):
        split(data, [0.8, 0.3])
    with pytest.raises(DataError):
        split(data, [90, 20])


def test_subset_indices_are_pinned() -> None:
    """numpy PCG64 draws, no Python hashing: the same seed gives these indices everywhere."""
    data = torch.utils.data.TensorDataset(torch.arange(50))
    assert subset(data, 7, 5).indices == [6, 17, 29, 30, 32, 39, 48]
    assert [p.indices for p in split(data, [3, 2], seed=9)] == [[18, 34, 49], [17, 48]]


# ----------------------------------------------------------------------------- build_dataset


def test_build_dataset_folder(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"normal": 6, "tumor": 3}, size=20)
    cfg = from_dict(DataConfig, {"train": str(root), "size": 16, "subset": 4})
    ds = build_dataset(cfg, "train", seed=0)
    assert len(ds) == 4 and all(ds[i]["label"] == 0 for i in range(4))
    assert ds[0]["image"].shape == (3, 16, 16)
    with pytest.raises(DataError, match="data.val is not set"):
        build_dataset(cfg, "val")
    flat = tmp_path / "patches"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(_rgb(i)).save(flat / f"{i}.png")
    cfg2 = from_dict(DataConfig, {"train": str(root), "val": str(flat), "size": 8})
    val = build_dataset(cfg2, "val")
    assert len(val) == 3 and {val[i]["label"] for i in range(3)} == {0}
    with pytest.raises(DataError, match="unknown data split"):
        build_dataset(cfg2, "test")


def test_build_dataset_synthetic() -> None:
    pytest.importorskip("gen_ad.data.synthetic")
    cfg = from_dict(DataConfig, {"train": "synthetic", "size": 16, "synthetic": 4})
    ds = build_dataset(cfg, "train", seed=0)
    item = ds[0]
    assert len(ds) == 4 and item["image"].shape == (3, 16, 16) and item["label"] == 0
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    val = build_dataset(cfg, "val", seed=0)
    assert len(val) == 4 and not torch.equal(val[0]["image"], item["image"])


def test_pcam_folder_loads(shared_data: Path) -> None:
    root = shared_data / "pcam" / "valid"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = PatchFolder(root=root, size=64, classes=["normal"])
    assert len(ds) == 1500
    x = ds[0]["image"]
    assert x.shape == (3, 64, 64) and -1 <= x.min() and x.max() <= 1 and x.std() > 0.05


def test_synth_layout_masks_inside_root(tmp_path: Path) -> None:
    """`gen-ad synth` output: masks/ beside normal/ and anomalous/, named like the images."""
    from gen_ad.data.synthetic import write_folder

    write_folder(tmp_path / "s", n=12, size=16, seed=1, anomaly_fraction=0.5)
    ds = PatchFolder(root=tmp_path / "s", size=16, mask_root=tmp_path / "s" / "masks")
    assert sorted(ds.classes) == ["anomalous", "normal"]
    n_anom = sum(int(ds[i]["label"]) for i in range(len(ds)))
    assert n_anom == len(list((tmp_path / "s" / "anomalous").iterdir()))
    for i in range(len(ds)):
        item = ds[i]
        assert (item["mask"].sum() > 0) == bool(item["label"])


def test_jpeg_masks_are_thresholded_not_dilated(tmp_path: Path) -> None:
    """JPEG rings around a mask's edges: any nonzero value grew a 30x30 square by a quarter;
    lossless 0/1 and 0/255 masks keep the nonzero rule."""
    from gen_ad.data.folders import read_mask

    m = np.zeros((64, 64), np.uint8)
    m[10:40, 20:50] = 255
    Image.fromarray(m).save(tmp_path / "m.jpg", quality=75)
    got = read_mask(tmp_path / "m.jpg")
    assert abs(int(got.sum()) - 900) <= 30 and got[10:40, 20:50].mean() > 0.97
    assert (np.asarray(Image.open(tmp_path / "m.jpg")) != 0).sum() > 1000  # the old rule's count
    Image.fromarray((m > 0).astype(np.uint8)).save(tmp_path / "m01.png")  # 0/1 label mask
    assert read_mask(tmp_path / "m01.png").sum() == 900


def test_8_bit_values_in_wider_types_keep_their_levels() -> None:
    """A uint16 or float array holding 0-255 values (numpy-written TIFFs) is 8-bit data: it was
    divided by 257 (near black) or min-max stretched (contrast changed)."""
    from gen_ad.data.folders import array_to_rgb8

    rgb = np.random.default_rng(0).integers(40, 231, (6, 8, 3)).astype(np.uint8)
    for wide in (rgb.astype(np.uint16), rgb.astype(np.int32), rgb.astype(np.float32)):
        np.testing.assert_array_equal(array_to_rgb8(wide), rgb, err_msg=str(wide.dtype))
    np.testing.assert_array_equal(array_to_rgb8(rgb.astype(np.uint16) * 257), rgb)  # 16-bit
    np.testing.assert_array_equal(array_to_rgb8(rgb.astype(np.float32) / 255), rgb)  # [0, 1]


def test_images_beside_class_folders_are_named_in_the_warning(tmp_path: Path) -> None:
    """``gen-ad synth`` writes contact_sheet.png into the data root: the warning names the
    ignored files (3, then how many more) with the right grammar."""
    root = _folder(tmp_path / "one", {"normal": 2, "tumor": 1})
    Image.fromarray(_rgb(1, 12, 12)).save(root / "contact_sheet.png")
    with pytest.warns(UserWarning) as rec:
        discover_classes(root)
    assert [str(w.message) for w in rec] == [
        f"1 image directly in {root} (contact_sheet.png) is ignored because it has class "
        "subfolders (normal, tumor)"]
    root = _folder(tmp_path / "five", {"normal": 2})
    for j in range(5):
        Image.fromarray(_rgb(j, 12, 12)).save(root / f"stray{j}.png")
    with pytest.warns(UserWarning, match=r"^5 images directly in .* \(stray0\.png, stray1\.png, "
                      r"stray2\.png and 2 more\) are ignored because"):
        discover_classes(root)


def test_a_synth_sets_own_contact_sheet_is_skipped_quietly(tmp_path: Path) -> None:
    """``gen-ad synth`` writes contact_sheet.png beside its set: listing that folder (every
    ``score`` of it) warns about nothing; the same file beside another manifest still warns."""
    from gen_ad.cli import main

    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--n", "6", "--size", "16",
                 "--anomaly-fraction", "0.5"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found, flat = discover_classes(out)
    assert not flat and sorted(found) == ["anomalous", "normal"]
    (out / "manifest.csv").write_text("slide,level,x,y,tissue_fraction,path\n")
    with pytest.warns(UserWarning, match=r"\(contact_sheet\.png\) is ignored"):
        discover_classes(out)
