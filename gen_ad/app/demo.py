"""``gen-ad demo``: synthetic tissue -> every model family trained -> one benchmark report.

Steps (each printed as it runs):

1. Synthetic H&E-like patches (:func:`gen_ad.data.synthetic.write_folder`): ``data/train``
   (normal), ``data/val`` (normal, for calibration and the FID reference) and ``data/test``
   (half with planted anomalies, masks re-laid out as ``data/test_masks/anomalous/`` so
   :class:`~gen_ad.data.folders.PatchFolder` pairs them with their images).
2. Tiny models from the built-in ``<family>/demo`` configs (``configs/``, shipped inside the
   package) with the demo's data and step overrides: f-AnoGAN (WGAN-GP, then the izi_f
   encoder), StyleGAN2 and DDPM. A run that already exists is reused unless ``retrain``.
3. A benchmark config (``benchmark.yaml``, re-runnable with ``gen-ad benchmark``) listing
   f-AnoGAN, StyleGAN2 projection, AnoDDPM, AutoDDPM and the KNN baseline with a
   random-initialised extractor (labelled as such; the full demo uses the real ``vgg16-imagenet``
   when ``gen-ad weights install`` has installed it), then
   :func:`gen_ad.app.benchmark.run_benchmark` writes ``report.html`` and ``results.json``
   (a re-run reuses each method finished with the same settings, unless ``retrain``).

Offline, pretrained networks are replaced by random-initialised ones and the report says so:
the LPIPS trunk (StyleGAN2 projection, AutoDDPM) and, for FID/KID, Inception-v3 (then the
report shows a labelled Fréchet distance of random features, not FID).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gen_ad.config import builtin_config
from gen_ad.errors import WeightsNotFoundError
from gen_ad.utils.io import write_text


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is.

    Attributes:
        n_train / n_val / n_test: synthetic patches (the test set is half anomalous).
        size: patch side in pixels.
        steps: training steps per family stage (``None``: the demo config's own).
        knn_k / knn_tiny: KNN neighbours and whether to use the tiny extractor variant.
        proj_steps: StyleGAN2 projection steps per image.
        ddpm: keyword arguments of the DDPM run's scorers (fewer denoising steps); AutoDDPM's
            section goes only to ``autoddpm``.
        fid_n: generated samples for FID/KID.
        n_boot: bootstrap resamples.
        examples: example patches shown per method.
        fast: this is the smoke-test size.
    """

    n_train: int
    n_val: int
    n_test: int
    size: int
    steps: dict[str, int | None]
    knn_k: int
    knn_tiny: bool
    proj_steps: int
    ddpm: dict[str, Any]
    fid_n: int
    n_boot: int
    examples: int
    fast: bool = False


def demo_size(fast: bool = False) -> DemoSize:
    """The full demo (about 15 minutes on 2 CPU cores) or the fast smoke run (``fast``)."""
    if fast:
        return DemoSize(n_train=48, n_val=16, n_test=20, size=32,
                        steps={"wgan": 4, "wgan-encoder": 4, "stylegan2": 3, "ddpm": 4},
                        knn_k=8, knn_tiny=True, proj_steps=2,
                        ddpm={"steps": 2, "autoddpm": {"steps_inpaint": 2, "resample": 1}},
                        fid_n=8, n_boot=100, examples=4, fast=True)
    return DemoSize(n_train=512, n_val=64, n_test=128, size=32,
                    steps={"wgan": None, "wgan-encoder": None, "stylegan2": None, "ddpm": None},
                    knn_k=50, knn_tiny=False, proj_steps=20, ddpm={}, fid_n=64, n_boot=2000,
                    examples=6)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link, or a copy where the file system has none (FAT/exFAT drives, some network
    shares)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_data(root: Path, sz: DemoSize, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic train/val/test folders (skipped when already complete)."""
    from gen_ad.data.synthetic import write_folder

    sets = {"train": (sz.n_train, 0.0, seed), "val": (sz.n_val, 0.0, seed + 1),
            "test": (sz.n_test, 0.5, seed + 2)}
    paths = {}
    for name, (n, frac, s) in sets.items():
        d = root / name
        if not (d / "manifest.csv").is_file():
            write_folder(d, n, sz.size, s, frac)
        paths[name] = d
    masks = root / "test_masks" / "anomalous"
    masks.mkdir(parents=True, exist_ok=True)
    for p in sorted((paths["test"] / "masks").glob("*.png")):
        if not (masks / p.name).exists():
            _link_or_copy(p, masks / p.name)  # same bytes, the layout PatchFolder expects
    paths["masks"] = masks.parent
    return paths


def _config(family: str, name: str = "demo") -> Path:
    """The built-in config ``<family>/<name>`` (shipped inside the package)."""
    return builtin_config(f"{family}/{name}")


def _stages(runs: Path) -> list[tuple[str, str, str, list[str]]]:
    """``(run name, family, config name, extra overrides)`` in training order."""
    return [("wgan", "wgan", "demo", []),
            ("wgan-encoder", "wgan", "demo_encoder", [f"gan_run={runs / 'wgan'}"]),
            ("stylegan2", "stylegan2", "demo", []),
            ("ddpm", "ddpm", "demo", [])]


def train_all(runs: Path, data: dict[str, Path], sz: DemoSize, retrain: bool = False,
              log: Any = print) -> dict[str, Path]:
    """Train (or reuse) every demo run; returns ``{run name: run folder}``."""
    from gen_ad.app.train import train

    out = {}
    for name, family, config, extra in _stages(runs):
        run = runs / name
        if (run / "model" / "model.json").is_file() and not retrain:
            log(f"[demo] reusing {run} (pass --retrain to train again)")
            out[name] = run
            continue
        over = [f"out={run}", f"data.train={data['train']}", f"data.val={data['val']}",
                f"data.size={sz.size}", "train.fid_every=0", *extra]
        steps = sz.steps.get(name)
        if steps is not None:  # smoke run: no sample grids
            over += [f"train.max_steps={steps}", f"train.ckpt_every={steps}",
                     "train.sample_every=0", "train.log_every=1"]
        if run.exists():  # an unfinished or to-be-retrained demo run of this folder
            shutil.rmtree(run)
        t0 = time.perf_counter()
        log(f"[demo] training {name} ({family}) ...")
        out[name] = Path(train(family, _config(family, config), over))
        log(f"[demo] {name} trained in {time.perf_counter() - t0:.0f} s -> {out[name]}")
    return out


def _lpips_available() -> bool:
    """Whether LPIPS-VGG16 (projection) and LPIPS-squeeze or its AlexNet fallback (AutoDDPM) load:
    installed by `gen-ad weights install`, or in the torch cache."""
    import warnings

    from gen_ad.inversion.lpips_net import build_lpips

    try:
        build_lpips("vgg")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warning comes again when scoring
            build_lpips("squeeze", fallback="alex")
    except WeightsNotFoundError:
        return False
    return True


def _knn_method(sz: DemoSize, bank: str) -> dict[str, Any]:
    """KNN on real ImageNet VGG16 features when installed (full demo), else a random stand-in."""
    from gen_ad.weights.registry import find_installed

    if not sz.knn_tiny and find_installed("lpips-vgg16") is not None:
        # loaded at twice the patch side: at 32 px relu4_3 would be 4x4 (7x cheaper than 224 px)
        return {"name": "knn-vgg16-imagenet",
                "knn": {"extractor": "vgg16-imagenet", "k": sz.knn_k, "bank": bank,
                        "size": 2 * sz.size}}
    return {"name": "knn-resnet50-random-init" + ("-tiny" if sz.knn_tiny else ""),
            "knn": {"extractor": "resnet50", "random_init": True, "tiny": sz.knn_tiny,
                    "k": sz.knn_k, "bank": bank}}


def weights_line() -> str:
    """Which pretrained networks the demo runs on: installed real files or stand-ins."""
    from gen_ad.weights.registry import find_installed, weight_specs

    real = [n for n in weight_specs() if find_installed(n) is not None]
    missing = [n for n in weight_specs() if n not in real]
    line = f"real pretrained weights installed: {', '.join(real) or 'none'}"
    if missing:
        line += (f"; without {', '.join(missing)} the demo uses cached files if any, else "
                 "random-initialised stand-ins (labelled in the report; `gen-ad weights "
                 "install` fetches them)")
    return line


def benchmark_dict(out: Path, data: dict[str, Path], runs: dict[str, Path], sz: DemoSize,
                   lpips_ok: bool) -> dict[str, Any]:
    """The demo's benchmark config as plain data (written to ``benchmark.yaml``)."""
    lp: dict[str, Any] = {} if lpips_ok else {"lpips_random_init": True}  # labelled in the report
    methods: list[dict[str, Any]] = [
        {"name": "fanogan", "run": str(runs["wgan-encoder"]), "scorer": "fanogan"},
        {"name": "stylegan2", "run": str(runs["stylegan2"]), "scorer": "stylegan2",
         "kwargs": {"steps": sz.proj_steps, **lp},
         "note": f"projection shortened to {sz.proj_steps} steps per patch (reference: 1000)"},
        {"name": "anoddpm", "run": str(runs["ddpm"]), "scorer": "anoddpm",
         "kwargs": {k: v for k, v in sz.ddpm.items() if k != "autoddpm"}},
        {"name": "autoddpm", "run": str(runs["ddpm"]), "scorer": "autoddpm",
         "kwargs": {**sz.ddpm, **lp}},
        _knn_method(sz, str(data["train"])),
    ]
    return {
        "out": str(out / "benchmark"),
        "title": "gen_ad demo: synthetic tissue, tiny models" + (" (fast smoke run)"
                                                                if sz.fast else ""),
        "data": {"test": str(data["test"]), "val": str(data["val"]), "masks": str(data["masks"]),
                 "classes": ["normal", "anomalous"], "size": sz.size},
        "methods": [{k: v for k, v in m.items() if v is not None} for m in methods],
        "n_boot": sz.n_boot, "device": "auto", "examples": sz.examples,
        "fid": {"enabled": True, "n": sz.fid_n, "kid": True, "random_init_fallback": True},
    }


def run_demo(out: str | os.PathLike[str] = "checkpoints/demo", fast: bool = False,
             retrain: bool = False, log: Any = print) -> Path:
    """The whole demo; returns the path of ``report.html``.

    Args:
        out: demo folder (data, runs, benchmark).
        fast: tiny sizes and a few steps (smoke test, about 2-3 minutes on 2 CPU cores).
        retrain: train again even when runs exist, and evaluate every method afresh (otherwise
            a re-run reuses the runs and every benchmark method finished with equal settings).
        log: progress printer.
    """
    from gen_ad.app.benchmark import BenchmarkConfig, run_benchmark, summary_lines
    from gen_ad.config import from_dict

    t0 = time.perf_counter()
    root = Path(out)
    sz = demo_size(fast)
    log(f"[demo] {weights_line()}")
    log(f"[demo] synthetic data -> {root / 'data'}")
    data = make_data(root / "data", sz)
    runs = train_all(root / "runs", data, sz, retrain=retrain, log=log)
    cfg_dict = benchmark_dict(root, data, runs, sz, _lpips_available())
    write_text(root / "benchmark.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))
    log(f"[demo] benchmark config -> {root / 'benchmark.yaml'}")
    # a re-run takes each method finished with the same settings from its record
    results = run_benchmark(from_dict(BenchmarkConfig, cfg_dict), reuse=not retrain)
    for line in summary_lines(results):
        log(f"[demo] {line}")
    log(f"[demo] done in {time.perf_counter() - t0:.0f} s")
    return Path(results["report"])
