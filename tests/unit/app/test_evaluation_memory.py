"""Scoring keeps nothing per batch: each image's path, class, label, score and score terms go
into arrays allocated once for the whole set (:func:`gen_ad.app.evaluate.score_dataset`).

The engine used to keep a list of every batch's score tensors: small C-heap blocks allocated
among the batch's megabyte-sized temporaries and kept when those were freed. They pinned glibc's
heap: the freed blocks around them became holes too small for the next batch, and the heap
grew, in bursts, by up to about 3 KB per scored image (390 MiB after 128,000 images of 32 px,
all of it free heap that ``malloc_trim`` returned). These tests check the mechanism, not the
resident memory: the traced memory (numpy-owned scores, so tracemalloc sees what the C heap
held) and the live tensors do not grow from batch to batch, and the results are bitwise those
of concatenating the batches.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from gen_ad.app import evaluate as ev
from gen_ad.scoring.base import AnomalyScorer, ScoreBatch

N, BATCH, SIZE = 2000, 2, 4
FIRST = 100  # the batch from which nothing may grow


class _Items(Dataset):
    """``n`` tiny images; paths and classes are the dataset's own strings (as a patch folder's:
    nothing is created per item that the scored set must then hold)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.paths = [f"p/{i:05d}.png" for i in range(n)]
        self.classes = ["tumor" if i % 4 == 0 else "normal" for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = torch.full((3, SIZE, SIZE), (i % 17) / 17.0 - 0.5)
        return {"image": img, "label": int(i % 4 == 0), "path": self.paths[i],
                "cls": self.classes[i]}


class _Probe(AnomalyScorer):
    """Scores and a score term in numpy-owned buffers; at batch ``first`` (after torch's and the
    loader's first-call allocations) and at the last batch it records the traced memory and the
    number of live tensors."""

    name = "probe"

    def __init__(self, n_batches: int, first: int = FIRST) -> None:
        self.marks = {first: "first", n_batches: "last"}
        self.calls = 0
        self.traced: dict[str, int] = {}
        self.tensors: dict[str, int] = {}

    def score(self, x: torch.Tensor) -> ScoreBatch:
        self.calls += 1
        mark = self.marks.get(self.calls)
        if mark is not None:
            gc.collect()
            self.tensors[mark] = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
            self.traced[mark] = tracemalloc.get_traced_memory()[0]
        s = np.array(x.mean(dim=(1, 2, 3)).numpy(), dtype=np.float32)  # numpy-owned
        return ScoreBatch(torch.from_numpy(s), terms={"twice": torch.from_numpy(2 * s)})


@pytest.fixture(scope="module")
def probed() -> tuple[_Probe, ev.ScoredSet, _Items]:
    """``N`` images scored in batches of ``BATCH`` under tracemalloc (once for the module)."""
    ds = _Items(N)
    probe = _Probe(-(-N // BATCH))
    tracemalloc.start()
    try:
        scored = ev.score_dataset(probe, ds, batch_size=BATCH, progress=False)
    finally:
        tracemalloc.stop()
    return probe, scored, ds


def test_scoring_memory_does_not_grow_per_image(
        probed: tuple[_Probe, ev.ScoredSet, _Items]) -> None:
    """From batch ``FIRST`` to the last (1,800 images) the traced memory grows by less than
    32 KB: the per-image arrays were allocated up front and no batch leaves anything behind
    (the old list of batches grew by about 400 bytes per image here, 700 KB; what remains is
    torch's own bookkeeping in the loader, about 8 KB, and it does not grow with the images)."""
    probe, scored, _ = probed
    assert probe.calls == N // BATCH and len(scored.scores) == N
    grown = probe.traced["last"] - probe.traced["first"]
    images = N - FIRST * BATCH
    assert grown < 32 * 1024, f"traced memory grew {grown} B over {images} images " \
                               f"({grown / images:.1f} B per image)"


def test_scoring_keeps_no_tensor_per_batch(probed: tuple[_Probe, ev.ScoredSet, _Items]) -> None:
    probe = probed[0]
    kept = probe.tensors["last"] - probe.tensors["first"]
    assert kept <= 2, f"{kept} more live tensors at the last batch than at batch {FIRST} " \
                      f"({N // BATCH} batches)"


def test_kept_state_is_compact_arrays(probed: tuple[_Probe, ev.ScoredSet, _Items]) -> None:
    """Per image: two list slots (path and class, the dataset's own strings), an int64 label
    and a float32 score and term, in arrays of length ``N``."""
    _, scored, ds = probed
    assert scored.paths == ds.paths and all(a is b for a, b in zip(scored.paths, ds.paths))
    assert scored.classes == ds.classes
    assert scored.labels.dtype == np.int64 and scored.labels.shape == (N,)
    assert scored.scores.dtype == np.float32 and scored.scores.shape == (N,)
    assert list(scored.terms) == ["twice"] and scored.terms["twice"].dtype == np.float32
    np.testing.assert_array_equal(scored.labels, [int(i % 4 == 0) for i in range(N)])
    np.testing.assert_array_equal(scored.terms["twice"], 2 * scored.scores)


class _Uneven(AnomalyScorer):
    """Batches that differ: float64 scores in the second batch, a term missing from the third,
    a term that only the later batches give."""

    name = "uneven"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, x: torch.Tensor) -> ScoreBatch:
        self.calls += 1
        s = x.flatten(1).mean(1) * 1.1 + 0.3
        if self.calls == 2:
            s = s.double() / 3.0
        terms = {"z": s.float() * 0.7, "a": (s * s).float()}
        if self.calls != 3:
            terms["gone"] = s.float() - 1.0
        if self.calls > 1:
            terms["late"] = s.float() + 1.0
        return ScoreBatch(s, terms=terms)


def test_results_are_bitwise_those_of_concatenated_batches() -> None:
    n, batch = 11, 4
    ds = _Items(n)
    scored = ev.score_dataset(_Uneven(), ds, batch_size=batch, progress=False)
    ref_scorer = _Uneven()
    parts = [ref_scorer.score(torch.stack([ds[i]["image"] for i in range(a, min(a + batch, n))]))
             for a in range(0, n, batch)]
    ref = ScoreBatch.cat(parts)
    assert scored.scores.dtype == np.float64 == ref.scores.numpy().dtype
    assert scored.scores.tobytes() == ref.scores.numpy().tobytes()
    assert list(scored.terms) == list(ref.terms) == ["a", "z"]
    for key, values in ref.terms.items():
        assert scored.terms[key].dtype == values.numpy().dtype
        assert scored.terms[key].tobytes() == values.numpy().tobytes(), key
    assert scored.paths == ds.paths and scored.classes == ds.classes
    np.testing.assert_array_equal(scored.labels, [int(i % 4 == 0) for i in range(n)])
