import pytest

from latents.dataset import LatentIndex
from latents.format import CARD_NAME, DatasetError, IncompleteDatasetError, shard_name
from latents.storage import TEMP_MARK, Root
from latents.writer import finalize, read_shard_info, write_shard
from tests.latents.conftest import SPEC, make_samples, write_dataset


def files(root: Root) -> dict[str, bytes]:
    return {name: root.read_bytes(name) for name in root.list("")}


def test_same_input_same_bytes(tmp_path, samples):
    a, b = Root(str(tmp_path / "a")), Root(str(tmp_path / "b"))
    write_dataset(a.url, samples)
    write_dataset(b.url, samples)
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb) and len(fa) == 3 + 6  # card, manifest, samples + 6 shards of <= 17
    assert all(fa[n] == fb[n] for n in fa)
    assert not any(TEMP_MARK in n for n in fa)


def test_card_written_last_and_only_on_success(tmp_path, samples):
    url = str(tmp_path / "ds")
    with pytest.raises(RuntimeError, match="encoder died"), _writer(url) as w:
        for i, (key, (label, array)) in enumerate(samples.items()):
            if i == 40:
                raise RuntimeError("encoder died")
            w.add(key, label, array)
    root = Root(url)
    assert not root.exists(CARD_NAME)
    assert root.list("shards") == [shard_name(0), shard_name(1)]  # two full shards were committed
    with pytest.raises(IncompleteDatasetError, match="still being written"):
        LatentIndex.open(url)


def _writer(url):
    from latents.writer import DatasetWriter

    return DatasetWriter(url, SPEC, resolution=64, vae="v", scaling_factor=0.5, num_classes=10, samples_per_shard=17)


def test_rerun_adopts_committed_shards(tmp_path, samples):
    url = str(tmp_path / "ds")
    with pytest.raises(RuntimeError), _writer(url) as w:
        for i, (key, (label, array)) in enumerate(samples.items()):
            if i == 60:
                raise RuntimeError("preempted")
            w.add(key, label, array)
    root = Root(url)
    committed = {n: root.read_bytes(n) for n in root.list("shards")}
    assert len(committed) == 3
    writer = write_dataset(url, samples)
    assert writer.adopted == [0, 1, 2]
    assert all(root.read_bytes(n) == data for n, data in committed.items())
    fresh = Root(str(tmp_path / "fresh"))
    write_dataset(fresh.url, samples)
    assert files(root) == files(fresh)  # the resumed dataset is byte-identical to a clean run


def test_rerun_with_other_samples_is_refused(tmp_path, samples):
    url = str(tmp_path / "ds")
    write_shard(url, 0, [(k, lab, a) for k, (lab, a) in list(samples.items())[:17]], SPEC)
    other = make_samples(100, seed=1)
    renamed = {f"other/{i:05d}": v for i, v in enumerate(other.values())}
    with pytest.raises(DatasetError, match="committed with other samples"):
        write_dataset(url, renamed)


def test_complete_dataset_is_not_overwritten(dataset, samples):
    with pytest.raises(DatasetError, match="already there"):
        write_dataset(dataset, samples)


def test_parallel_path_and_duplicate_keys(tmp_path, samples):
    url = str(tmp_path / "ds")
    items = [(k, lab, a) for k, (lab, a) in samples.items()]
    infos = [write_shard(url, i, items[i * 50 : (i + 1) * 50], SPEC) for i in (1, 0)]  # any order
    card = finalize(url, infos, spec=SPEC, resolution=64, vae="v", scaling_factor=0.5, num_classes=10)
    assert card.num_samples == 100 and card.num_shards == 2
    again = read_shard_info(url, 1, SPEC)
    assert again.keys == infos[0].keys and again.sha256 == infos[0].sha256 and again.offsets == infos[0].offsets
    dup = write_shard(str(tmp_path / "dup"), 0, items[:3] + items[:1], SPEC)
    with pytest.raises(DatasetError, match=r"duplicate sample keys: \['img/00000'\]"):
        finalize(str(tmp_path / "dup"), [dup], spec=SPEC, resolution=64, vae="v", scaling_factor=0.5, num_classes=10)
    with pytest.raises(DatasetError, match="shard indices"):
        finalize(url, infos[:1], spec=SPEC, resolution=64, vae="v", scaling_factor=0.5, num_classes=10)
    with pytest.raises(DatasetError, match="got shard 1 where shard 0 was due"):  # a stream must come in order
        finalize(url, iter(infos), spec=SPEC, resolution=64, vae="v", scaling_factor=0.5, num_classes=10)


def test_card_statistics(tmp_path):
    import numpy as np

    samples = make_samples(60)
    card = write_dataset(str(tmp_path / "ds"), samples).card
    means = np.stack([a[:, 0] for _, a in samples.values()]).astype(np.float64)  # (N, F, C, H, W)
    stds = np.stack([a[:, 1] for _, a in samples.values()]).astype(np.float64)
    expected_std = np.sqrt(means.var(axis=(0, 1, 3, 4)) + (stds**2).mean(axis=(0, 1, 3, 4)))
    assert np.allclose(card.channel_mean, means.mean(axis=(0, 1, 3, 4)), atol=1e-5)
    assert np.allclose(card.channel_std, expected_std, atol=1e-5)
    assert card.num_samples == 60 and card.source_fingerprint == "synthetic"


def test_publication_order_card_last(tmp_path, samples, monkeypatch):
    published = []
    real_bytes, real_file = Root.publish_bytes, Root.publish_file

    def recording(real):
        def publish(self, name, data):
            real(self, name, data)
            published.append(name)

        return publish

    monkeypatch.setattr(Root, "publish_bytes", recording(real_bytes))
    monkeypatch.setattr(Root, "publish_file", recording(real_file))  # samples.parquet: streamed from a file
    write_dataset(str(tmp_path / "ds"), samples)
    assert published[:6] == [shard_name(i) for i in range(6)]
    assert published[6:] == ["samples.parquet", "manifest.parquet", CARD_NAME]


def test_duplicate_keys_across_shards_are_found_in_bounded_buckets(tmp_path, samples, monkeypatch):
    import latents.keys

    monkeypatch.setattr(latents.keys, "HASHES_PER_BUCKET", 7)  # 100 hashes: 15 buckets
    items = [(k, lab, a) for k, (lab, a) in samples.items()]
    items[90] = (items[3][0], *items[90][1:])  # shard 4 repeats a key of shard 0
    url = str(tmp_path / "ds")
    infos = (write_shard(url, i, items[i * 20 : (i + 1) * 20], SPEC) for i in range(5))  # streamed, once
    with pytest.raises(DatasetError, match=r"duplicate sample keys: \['img/00003'\] \(1 in all\)"):
        finalize(url, infos, spec=SPEC, resolution=64, vae="v", scaling_factor=0.5, num_classes=10)
