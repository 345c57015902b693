"""The reader at 200,000 samples: elastic resume from 4 ranks to 2 consumes the epoch exactly
once, and each rank (each worker) loads only the sample rows of its own streams' shards; no
reader process imports `pyarrow.dataset`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latents.dataset import LatentIndex
from latents.plan import epoch_streams, worker_streams
from latents.reader import LatentDataset, LatentLoader
from latents.writer import write_shard
from tests.latents import fast_shards

N, PER_SHARD, GLOBAL, STREAMS, SEED = 200_000, 2_000, 64, 8, 5
ROOT = Path(__file__).resolve().parents[2]


def test_fast_shards_are_the_writers_bytes(tmp_path):
    for index, first, n in ((0, 0, 7), (3, 123_456_789, 40)):
        data, info = fast_shards.build_shard(index, first, n)
        real = write_shard(str(tmp_path), index, fast_shards.samples(first, n), fast_shards.SPEC)
        assert (tmp_path / real.name).read_bytes() == data
        assert vars(info).keys() == vars(real).keys()
        for name, value in vars(real).items():
            assert np.array_equal(getattr(info, name), value), name


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("scale") / "ds")
    fast_shards.write_dataset(url, N, PER_SHARD)  # the real finalize, streaming
    return url


def loaders(url: str, world: int) -> list[LatentLoader]:
    return [
        LatentLoader(
            LatentDataset(
                url, GLOBAL // world, rank=r, world_size=world, seed=SEED, streams=STREAMS, shuffle_buffer_bytes=1 << 16
            )
        )
        for r in range(world)
    ]


@pytest.mark.slow
def test_resume_from_4_to_2_ranks_at_200k_samples(big):
    steps = N // GLOBAL
    old = loaders(big, 4)
    head = []
    for ld in old:
        for i, batch in enumerate(ld):
            head.extend(batch["keys"])
            if i + 1 == 1000:
                break
    state = old[0].state_dict()
    assert state["batch"] == 1000 and all(ld.state_dict() == state | {"workers": 1} for ld in old)
    tail = []
    for ld in loaders(big, 2):
        ld.load_state_dict(state)
        batches = list(ld)
        assert len(batches) == steps - 1000  # lockstep: every rank the rest of the epoch
        tail.extend(k for b in batches for k in b["keys"])
    keys = head + tail
    assert len(keys) == len(set(keys)) == steps * GLOBAL
    # exactly the epoch's samples: those the plan puts in the 8 streams (the rest, N mod 64, waits)
    index = LatentIndex.open(big)
    ds = old[0].dataset
    rows = epoch_streams(
        index.shard_column("first_sample"),
        index.shard_column("num_samples"),
        range(STREAMS),
        seed=SEED,
        epoch=0,
        num_streams=STREAMS,
        global_batch=GLOBAL,
        window=ds.window,
    )
    assert set(keys) == {fast_shards.key(r) for r in rows.ravel().tolist()}  # row r holds key r (written in order)


@pytest.mark.slow
def test_a_rank_loads_only_its_streams_rows(big):
    for world in (1, 2, 4, 8):
        ds = loaders(big, world)[world - 1].dataset
        rows = ds.load_rows(ds.plan(0), worker_streams(STREAMS, world, world - 1, 0, 1))
        loaded = len(rows.labels)
        assert loaded <= N / world + 2 * PER_SHARD, (world, loaded)  # its slice, plus the shards cut at its ends
        assert loaded >= N // GLOBAL * GLOBAL / world


def test_reading_never_imports_pyarrow_dataset(tmp_path):
    """Every rank and DataLoader worker opens the index and reads rows: through `pq.read_table`
    (which imports `pyarrow.dataset`) each process grew by ~5 MiB of imports and ~2 MiB of arrow's
    pool that it never gave back, at any dataset size and world size."""
    url = str(tmp_path / "ds")
    fast_shards.write_dataset(url, 256, 64)
    code = (
        "import sys\n"
        "from latents.reader import LatentDataset, LatentLoader\n"
        f"batch = next(iter(LatentLoader(LatentDataset({url!r}, 32, rank=1, world_size=2, seed=0))))\n"
        "assert batch['latents'].shape[0] == 32\n"
        "print(sorted(m for m in sys.modules if m.startswith('pyarrow.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    modules = done.stdout.strip()
    assert "pyarrow.parquet" in modules  # the check sees what the reader imports
    assert "pyarrow.dataset" not in modules, modules
