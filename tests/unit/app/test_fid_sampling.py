"""`gen-ad fid RUN`: the sample set is a function of the seed alone, not of --batch-size."""

from __future__ import annotations

import torch

from gen_ad.app.fid import run_images


class _Run:
    """Samples as a trained run does: one generator per call, batches drawn from it in turn."""

    def sample(self, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([torch.rand(min(batch_size, n - i), 3, 4, 4, generator=gen) * 2 - 1
                          for i in range(0, n, batch_size)])


def _draw(sizes: list[int], seed: int = 7) -> torch.Tensor:
    sample = run_images(_Run(), chunk=6)
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([sample(n, gen) for n in sizes])


def test_images_do_not_depend_on_the_batch_sizes_asked_for() -> None:
    """A plain sampler draws one seed per call: batches of 5 and of 3 gave other images (and
    another FID); here image i is the same however the 15 are asked for."""
    a, b, c = _draw([5, 5, 5]), _draw([3] * 5), _draw([15])
    assert a.shape == (15, 3, 4, 4) and torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, _draw([15], seed=8))  # another seed, another sample set
    assert len({tuple(x.flatten()[:3].tolist()) for x in a}) == 15  # no image repeated


def test_a_new_computation_starts_the_stream_afresh() -> None:
    sample = run_images(_Run(), chunk=4)
    first = torch.cat([sample(3, g) for g in [torch.Generator().manual_seed(1)] * 3])
    again = torch.cat([sample(3, g) for g in [torch.Generator().manual_seed(1)] * 3])
    assert torch.equal(first, again)


def test_the_network_generates_at_most_the_batch_size_at_once() -> None:
    """The seeded chunks of 32 were generated 32 at a time whatever --batch-size said (a 512 px
    StyleGAN2 on a small GPU ran out of memory); now a smaller batch caps each piece."""
    asked: list[int] = []

    class Recording(_Run):
        def sample(self, n: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
            asked.append(batch_size)
            return super().sample(n, seed, batch_size)

    sample = run_images(Recording(), chunk=8, batch_size=3)
    assert sample(10, torch.Generator().manual_seed(0)).shape == (10, 3, 4, 4)
    assert asked == [3, 3]  # two chunks of 8 images, each generated 3 at a time
    asked.clear()
    run_images(Recording(), chunk=8, batch_size=64)(10, torch.Generator().manual_seed(0))
    assert asked == [8, 8]  # a batch above the chunk changes nothing
