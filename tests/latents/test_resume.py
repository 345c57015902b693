"""Exact resume: interrupt anywhere, resume from state_dict(), get the same remaining batches
(keys, flips and noise, bit for bit) as the uninterrupted run - with DataLoader workers."""

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


def test_resume_with_another_layout_is_refused(url):
    ld = loader(url, 2)
    run(ld, 3)
    other = loader(url, 3)
    with pytest.raises(ValueError, match="workers: saved 2, now 3"):
        other.load_state_dict(ld.state_dict())
