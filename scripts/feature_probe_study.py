"""What does a KNN on frozen features actually use? Colour, or tissue structure?

A question the PCam results raise: a KNN on the features of a *random-init* ResNet-50 beats the
ImageNet VGG16 and every generative method there, about as well as a KNN on 15 colour statistics.
This study re-runs the KNN (bank of normal patches, k nearest, mean distance) with each extractor on
the same patches under input probes that remove one kind of information:

* ``rgb``: the patches as they are;
* ``gray``: luminance replicated to three channels (removes hue/stain colour; keeps intensity and
  structure);
* ``shuffled``: every patch's pixels permuted at random (keeps each patch's exact colour
  histogram; destroys all spatial structure: cells, nuclei, texture);
* ``standardised``: each channel of each patch shifted and scaled to a fixed mean and spread
  (removes the global colour and intensity moments; keeps structure and relative contrast).

A feature that separates tumour from normal on ``shuffled`` patches about as well as on ``rgb``
ones is reading the colour distribution, not the tissue. One JSON line per (extractor, seed,
probe): AUROC and AUPR with stratified-bootstrap 95 % intervals, and the wall time.

    python scripts/feature_probe_study.py --pcam ../shared/data/pcam --bank 1000 --test 200 \\
        --extractors resnet50:random:0 resnet50:random:1 colour-stats vgg16-imagenet \\
        --probes rgb gray shuffled standardised --out study.jsonl

The patches: the first ``--bank`` (sorted) of ``train/normal``, the first ``--test`` of
``test/normal`` and of ``test/tumor``. ``NAME:random:SEED`` builds ``NAME`` random-initialised
from ``SEED``; a plain name loads its installed weights (``gen-ad weights install``) and is skipped
with a message when they are absent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gen_ad.baselines.extractors import FeatureExtractor, build_extractor
from gen_ad.baselines.knn import KNNScorer, embed_batches
from gen_ad.data.folders import load_image
from gen_ad.errors import GenAdError
from gen_ad.metrics.detection import bootstrap_metrics

PROBES = ("rgb", "gray", "shuffled", "standardised")
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def probe(x: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """Apply one input probe to ``x`` ``[B,3,H,W]`` in ``[-1,1]``; returns the same shape/range."""
    if kind == "rgb":
        return x
    if kind == "gray":
        return (x * _LUMA).sum(dim=1, keepdim=True).expand_as(x).contiguous()
    if kind == "shuffled":  # one random permutation of pixel positions per image
        g = torch.Generator().manual_seed(seed)
        flat = x.flatten(2)
        perm = torch.stack([torch.randperm(flat.shape[2], generator=g) for _ in range(len(x))])
        return flat.gather(2, perm[:, None].expand_as(flat)).view_as(x)
    if kind == "standardised":  # per image and channel: mean 0, std 0.25 (4 sigma inside [-1,1])
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        return ((x - mean) / std * 0.25).clamp(-1, 1)
    raise ValueError(f"unknown probe {kind!r}; choose from {PROBES}")


def load_split(pcam: Path, n_bank: int, n_test: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                np.ndarray]:
    """Bank ``[n_bank,3,96,96]``, test images ``[2 n_test,3,96,96]`` and their labels (1 tumour)."""
    def first(folder: Path, n: int) -> torch.Tensor:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:n]
        if len(files) < n:
            raise SystemExit(f"{folder}: {len(files)} images, {n} needed")
        return torch.stack([load_image(p, 96) for p in files])

    bank = first(pcam / "train" / "normal", n_bank)
    test = torch.cat([first(pcam / "test" / "normal", n_test), first(pcam / "test" / "tumor",
                                                                       n_test)])
    return bank, test, np.r_[np.zeros(n_test), np.ones(n_test)].astype(np.int64)


def parse_extractor(text: str) -> FeatureExtractor:
    """``NAME`` (installed weights) or ``NAME:random:SEED`` -> a frozen CPU extractor."""
    name, _, rest = text.partition(":")
    if rest:
        kind, _, seed = rest.partition(":")
        if kind != "random":
            raise SystemExit(f"--extractors: {text!r}: expected NAME or NAME:random:SEED")
        return build_extractor(name, random_init=True, seed=int(seed or 0))
    return build_extractor(name)


def embed(ext: FeatureExtractor, x: torch.Tensor, batch: int = 50) -> np.ndarray:
    """``[N,3,H,W]`` -> ``[N,D]`` float32 features (the KNN baseline's own embedding loop)."""
    return np.concatenate([f for f, _, _ in embed_batches(ext, x.split(batch))])


def run_one(ext: FeatureExtractor, bank: torch.Tensor, test: torch.Tensor, labels: np.ndarray,
            kind: str, k: int) -> dict[str, object]:
    """KNN scores of the probed test patches against the probed bank; metrics with 95 % CIs."""
    t = time.perf_counter()
    feats_bank = embed(ext, probe(bank, kind, seed=1))
    feats_test = embed(ext, probe(test, kind, seed=2))
    scores = KNNScorer(ext, bank=feats_bank, k=k).score_features(feats_test)
    m = bootstrap_metrics(scores, labels, n_boot=2000, seed=0)
    return {"probe": kind, "auroc": m["auroc"].value, "auroc_ci": [m["auroc"].low, m["auroc"].high],
            "aupr": m["aupr"].value, "aupr_ci": [m["aupr"].low, m["aupr"].high],
            "wall_s": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pcam", type=Path, required=True, help="the PCam folder (train/, test/)")
    p.add_argument("--bank", type=int, default=1000)
    p.add_argument("--test", type=int, default=200, help="patches per class")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--extractors", nargs="+", default=["resnet50:random:0", "colour-stats"])
    p.add_argument("--probes", nargs="+", default=list(PROBES), choices=PROBES)
    p.add_argument("--out", type=Path, default=None, help="also append the lines to this file")
    a = p.parse_args(argv)
    bank, test, labels = load_split(a.pcam, a.bank, a.test)
    for spec in a.extractors:
        try:
            ext = parse_extractor(spec)
        except GenAdError as e:
            print(f"skipped {spec}: {e}", file=sys.stderr)
            continue
        for kind in a.probes:
            rec = {"study": "feature_probe", "extractor": spec, "weights": ext.weights_source,
                   "bank": a.bank, "test_per_class": a.test, "k": a.k,
                   "threads": torch.get_num_threads(), **run_one(ext, bank, test, labels, kind,
                                                                a.k)}
            line = json.dumps(rec)
            print(line, flush=True)
            if a.out is not None:
                with a.out.open("a", encoding="utf-8") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
