"""Shard sidecars: what a worker publishes before its shard, so that adoption and finalize never
read shard bytes back; `iter_shard_infos` streams them in index order."""

from __future__ import annotations

import numpy as np
import pytest

from latents.format import ShardError, shard_name
from latents.storage import Root
from latents.writer import (
    finalize,
    iter_shard_infos,
    read_shard_info,
    read_sidecar,
    sidecar_name,
    write_empty_shard_info,
    write_shard,
)
from tests.latents.conftest import SPEC, make_samples

REJECT = ("k_bad", "/src/bad.JPEG", "truncated", "OSError: image file is truncated")


def _triples(n: int, seed: int = 0) -> list[tuple[str, int, np.ndarray]]:
    return [(k, lab, a) for k, (lab, a) in make_samples(n, seed=seed).items()]


def test_sidecar_is_the_shards_info_exactly(tmp_path):
    root = Root(str(tmp_path / "ds"))
    info = write_shard(root, 0, _triples(20), SPEC, sidecar=True, rejects=[REJECT], plan="p0")
    side = read_sidecar(root, 0)
    back = read_shard_info(root, 0, SPEC)  # rebuilt from the shard's bytes
    for got in (side, back):
        for name in ("index", "num_bytes", "sha256", "keys", "labels", "offsets", "sizes", "flip_offsets", "count"):
            assert getattr(got, name) == getattr(info, name), name
        for name in ("sum_mean", "sum_sq", "sum_var"):
            assert np.array_equal(getattr(got, name), getattr(info, name)), name  # float64, bit for bit
    assert side.rejects == [REJECT] and side.plan == "p0"
    assert root.list("shard-info") == [sidecar_name(0)]


def test_a_shard_of_rejects_has_a_sidecar_and_no_tar(tmp_path):
    root = Root(str(tmp_path / "ds"))
    write_empty_shard_info(root, 3, SPEC, [REJECT], plan="p3")
    info = read_sidecar(root, 3)
    assert (info.num_samples, info.rejects, info.plan) == (0, [REJECT], "p3")
    assert not root.exists(shard_name(3))


def test_iter_shard_infos_streams_in_index_order_and_finalizes_like_a_list(tmp_path):
    triples = _triples(60)
    a, b = Root(str(tmp_path / "a")), Root(str(tmp_path / "b"))
    infos = {}
    for i in (2, 0, 1):  # written in any order
        infos[i] = write_shard(a, i, triples[i * 20 : (i + 1) * 20], SPEC, sidecar=True)
        write_shard(b, i, triples[i * 20 : (i + 1) * 20], SPEC)
    stream = iter_shard_infos(a, 3, SPEC, prefetch=2)
    assert iter(stream) is stream  # a generator: consumed once, never a list of every shard
    assert [s.keys for s in stream] == [infos[i].keys for i in range(3)]
    kw = {"spec": SPEC, "resolution": 64, "vae": "v", "num_classes": 10, "scaling_factor": 0.5}
    card_a = finalize(a, iter_shard_infos(a, 3, SPEC), **kw)
    card_b = finalize(b, [infos[i] for i in range(3)], **kw)
    assert card_a.to_json() == card_b.to_json()
    for name in ("samples.parquet", "manifest.parquet"):
        assert a.read_bytes(name) == b.read_bytes(name), name


def test_a_damaged_sidecar_is_named(tmp_path):
    root = Root(str(tmp_path / "ds"))
    write_shard(root, 0, _triples(5), SPEC, sidecar=True)
    root.publish_bytes(sidecar_name(0), b'{"index": 0')
    with pytest.raises(ShardError, match=r"shard-info/000000\.json"):
        read_sidecar(root, 0)
