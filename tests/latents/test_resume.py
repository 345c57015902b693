"""Exact resume: interrupt anywhere, resume from state_dict(), get the same remaining batches
(keys, flips and noise, bit for bit) as the uninterrupted run - with DataLoader workers; and
elastic resume: with another world size and worker count, the batches before and after hold
exactly the epoch's samples, none twice."""

import random

import pytest
import torch

from latents.reader import LatentDataset, LatentLoader
from tests.latents.conftest import make_samples, write_dataset

BATCH = 4


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("resume") / "ds")
    write_dataset(url, make_samples(150), samples_per_shard=13)
    return url


def loader(url: str, workers: int) -> LatentLoader:
    ds = LatentDataset(url, BATCH, rank=1, world_size=2, seed=11, shuffle_buffer_bytes=3000)
    return LatentLoader(ds, num_workers=workers)


def run(ld: LatentLoader, batches: int) -> list[dict]:
    """The next ``batches`` batches, across epoch boundaries."""
    out = []
    while len(out) < batches:
        for batch in ld:
            out.append(batch)
            if len(out) == batches:
                break
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["keys"] == y["keys"] and torch.equal(x["flips"], y["flips"]) and torch.equal(x["latents"], y["latents"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_at_random_points_matches_uninterrupted(url, workers):
    per_epoch = len(loader(url, workers))
    total = 2 * per_epoch + 3  # into a third epoch
    reference = run(loader(url, workers), total)
    assert len({k for b in reference[:per_epoch] for k in b["keys"]}) == per_epoch * BATCH
    points = {0, 1, per_epoch - 1, per_epoch, per_epoch + 1} | set(random.Random(workers).sample(range(total), 4))
    for k in sorted(points):
        first = loader(url, workers)
        head = run(first, k)
        state = first.state_dict()
        resumed = loader(url, workers)
        resumed.load_state_dict(state)
        tail = run(resumed, total - k)
        assert same(head + tail, reference), f"interrupted after {k} batches"


def test_state_is_small_and_names_the_layout(url):
    ld = loader(url, 2)
    run(ld, 3)
    state = ld.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 3 and state["workers"] == 2 and state["world_size"] == 2


GLOBAL, STREAMS = 12, 12  # 150 samples: 12 steps per epoch, 6 samples wait


def rank_loaders(url: str, world: int, workers: int) -> list[LatentLoader]:
    return [
        LatentLoader(
            LatentDataset(
                url, GLOBAL // world, rank=r, world_size=world, seed=11, streams=STREAMS, shuffle_buffer_bytes=3000
            ),
            num_workers=workers,
        )
        for r in range(world)
    ]


def consumed(loaders: list[LatentLoader], steps: int | None = None) -> list[tuple[str, bool, torch.Tensor]]:
    """(key, flip, latent) of every sample the ranks consume in the next ``steps`` steps (all: the epoch's rest)."""
    out = []
    for ld in loaders:
        for i, batch in enumerate(ld):
            out.extend(zip(batch["keys"], batch["flips"].tolist(), batch["latents"], strict=True))
            if steps is not None and i + 1 == steps:
                break
    return out


@pytest.mark.parametrize(
    "before,after",
    [((4, 0), (2, 0)), ((2, 2), (3, 0)), ((4, 3), (2, 2)), ((3, 2), (1, 4)), ((2, 0), (4, 2))],
)
def test_elastic_resume_consumes_the_epoch_exactly_once(url, before, after):
    epoch = {k: (f, z) for k, f, z in consumed(rank_loaders(url, 1, 0))}
    assert len(epoch) == 150 // GLOBAL * GLOBAL
    for steps in sorted(set(random.Random(str(before + after)).sample(range(1, 12), 3))):
        old = rank_loaders(url, *before)
        head = consumed(old, steps)
        states = [ld.state_dict() for ld in old]
        assert all(s == states[0] | {"workers": s["workers"]} for s in states)  # one state for every rank
        new = rank_loaders(url, *after)
        for ld in new:
            ld.load_state_dict(states[0])
        tail = consumed(new)
        keys = [k for k, _, _ in head + tail]
        assert len(keys) == len(set(keys)) == len(epoch), f"{before} -> {after} after {steps} steps"
        assert set(keys) == set(epoch)
        # flips and noise are functions of (seed, epoch, key): identical whoever reads the sample
        assert all(f == epoch[k][0] and torch.equal(z, epoch[k][1]) for k, f, z in head + tail)


def test_resume_that_cannot_keep_the_order_is_refused(url):
    saved = rank_loaders(url, 2, 0)[0].state_dict()
    other_batch = LatentLoader(LatentDataset(url, 12, rank=0, world_size=2, seed=11, streams=STREAMS))
    with pytest.raises(ValueError, match="global_batch: saved 12, now 24"):
        other_batch.load_state_dict(saved)
    with pytest.raises(ValueError, match="12 logical streams cannot be shared by 5 ranks"):
        LatentLoader(LatentDataset(url, 12, rank=0, world_size=5, seed=11, streams=12))
    with pytest.raises(ValueError, match="global batch 2 x 3 = 6 is not a multiple of the 12 logical streams"):
        LatentLoader(LatentDataset(url, 3, rank=0, world_size=2, seed=11, streams=12))
