"""``gen-ad knn fit`` refuses a k its normal images cannot serve before loading the extractor or
embedding anything, warns when k is a large share of the bank, and a failed fit leaves no bank
folder behind (the lock's folder it created)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_ad.app import knn as knn_app
from gen_ad.app.knn import fit_folder
from gen_ad.cli import main
from gen_ad.errors import DataError, WeightsNotFoundError

COMMON = ["--workers", "0", "--device", "cpu"]


@pytest.fixture
def normal16(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "train" / "normal"
    d.mkdir(parents=True)
    for j in range(16):
        Image.fromarray(rng.integers(60, 230, (16, 16, 3), dtype=np.uint8)).save(d / f"{j}.png")
    (tmp_path / "train" / "tumor").mkdir()  # another class: not counted
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "train" / "tumor" / "t.png")
    return tmp_path / "train"


def test_a_k_the_images_cannot_serve_is_refused_before_any_embedding(
        normal16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_extractor(*a: object, **kw: object) -> None:
        raise AssertionError("the extractor was built (and the patches would be embedded)")

    monkeypatch.setattr(knn_app, "build_extractor", no_extractor)
    out = tmp_path / "banks" / "b"
    with pytest.raises(DataError, match=r"holds 16 normal images; k=200 needs at least 201 "
                                        r"\(use more normal data or a smaller --k, e\.g\. --k 4\)"):
        fit_folder("colour-stats", normal16, out, k=200, workers=0, device="cpu")
    assert not (tmp_path / "banks").exists()  # the failed fit left no empty bank folder


def test_the_cli_says_one_line_and_leaves_no_folder(normal16: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bank"
    assert main(["knn", "fit", "--extractor", "colour-stats", "--normal", str(normal16),
                 "--out", str(out), *COMMON]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k=200 needs at least 201" in err[0], err
    assert not out.exists()


def test_missing_weights_leave_no_bank_folder(normal16: Path, tmp_path: Path) -> None:
    """Offline (the suite's default) and no UNI weights: the usual error, and no ``bank/``
    holding only ``.gen-ad.lock``; a folder that existed before stays."""
    out = tmp_path / "bank"
    with pytest.raises(WeightsNotFoundError):
        fit_folder("uni", normal16, out, k=4, workers=0, device="cpu")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(WeightsNotFoundError):
        fit_folder("uni", normal16, out, k=4, workers=0, device="cpu")
    assert (out / "notes.txt").read_text() == "mine"


def _fit_warnings(normal: Path, out: Path, k: int) -> list[str]:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        bank = fit_folder("colour-stats", normal, out, k=k, workers=0, device="cpu")
    assert bank.count == 16 and bank.settings["k"] == k
    return [str(w.message) for w in got if "normal images of" in str(w.message)]


def test_a_k_over_a_quarter_of_the_bank_is_one_warning(normal16: Path, tmp_path: Path) -> None:
    said = _fit_warnings(normal16, tmp_path / "b8", 8)
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith("k=8 is 50% of the 16 normal images of") and "--k, e.g. 4" in said[0]
    assert _fit_warnings(normal16, tmp_path / "b4", 4) == []  # a quarter: no warning
