"""The encode job on the test Ray cluster: verified output, exact rejects, every layout, S3, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cluster.cli import main as sit
from latents.autoencoder import load_autoencoder
from latents.format import CARD_NAME, REJECTS_NAME
from latents.verify import verify
from pipeline.job import RUN_NAME, EncodeError, run_encode
from pipeline.preprocess import preprocess, to_model_input
from tests.pipeline.conftest import RESOLUTION, assert_fp16_close, dataset_files, encode_config, read_latents


def test_folder_encode_verifies_with_exactly_the_broken_files_rejected(encoded_folder, sources, images):
    url, summary = encoded_folder.url, encoded_folder.summary
    assert "4 of 204 inputs rejected" in str(encoded_folder.first_error)
    assert REJECTS_NAME in str(encoded_folder.first_error)
    assert (summary.source_images, summary.encoded, summary.rejected) == (204, 200, 4)
    assert summary.shards == 13 and summary.shards_adopted == 13  # the failed run had committed every shard
    assert sit(["verify", url, "--quiet"]) == 0

    rejects = pq.read_table(f"{url}/{REJECTS_NAME}").to_pylist()
    _, by_key = sources["imagefolder"]
    expected = {k: im for k, im in by_key.items() if im.broken}
    assert [r["key"] for r in rejects] == sorted(expected)
    for r in rejects:
        assert r["reason"] == expected[r["key"]].broken and r["source"].endswith(expected[r["key"]].name)
        assert r["error"]
    card = json.loads(Path(url, CARD_NAME).read_text())
    assert card["extra"]["counts"]["source"] == 204 == card["num_samples"] + len(rejects)
    assert card["source_fingerprint"].startswith("imagefolder:204:")
    assert card["resolution"] == RESOLUTION and card["latent_shape"] == [4, 8, 8]

    stored = read_latents(url)
    assert set(stored) == {k for k, im in by_key.items() if not im.broken}
    vae = load_autoencoder(json.loads(Path(url, RUN_NAME).read_text())["vae"]).module
    for key in sorted(stored)[::37]:  # spread over shards and modes
        label, array = stored[key]
        assert label == by_key[key].label
        x = torch.from_numpy(to_model_input(preprocess(by_key[key].data, RESOLUTION)[None]))
        with torch.no_grad():
            for flip, image in enumerate((x, x.flip(-1))):
                posterior = vae.encode(image).latent_dist
                assert_fp16_close(array[flip, 0], posterior.mean[0].numpy())
                assert_fp16_close(array[flip, 1], posterior.std[0].numpy())


@pytest.mark.slow
def test_parquet_and_tars_give_the_same_latents(encoded_folder, sources, tiny_vae_dir, tmp_path):
    by_name = {im.name: lat for (k, im), lat in _named(sources["imagefolder"][1], read_latents(encoded_folder.url))}
    for layout in ("parquet", "wds"):
        src, keys = sources[layout]
        dst = str(tmp_path / layout)
        summary = run_encode(encode_config(src, dst, tiny_vae_dir, num_classes=4, max_reject_fraction=0.05))
        assert (summary.encoded, summary.rejected) == (200, 4)
        assert verify(dst).ok
        pairs = list(_named(keys, read_latents(dst)))
        assert len(pairs) == 200
        for (_, im), (label, array) in pairs:
            assert label == by_name[im.name][0]
            assert_fp16_close(array, by_name[im.name][1].astype(np.float32))  # both rounded: within 1 spacing
        reasons = sorted(r["reason"] for r in pq.read_table(f"{dst}/{REJECTS_NAME}").to_pylist())
        assert reasons == sorted(im.broken for im in keys.values() if im.broken)


def _named(keys: dict, stored: dict):
    return ((pair, stored[pair[0]]) for pair in keys.items() if pair[0] in stored)


def test_rerun_of_a_complete_dataset_changes_nothing(encoded_folder, sources, tiny_vae_dir):
    before = dataset_files(encoded_folder.url)
    cfg = encode_config(sources["imagefolder"][0], encoded_folder.url, tiny_vae_dir, max_reject_fraction=0.05)
    summary = run_encode(cfg)
    assert (summary.encoded, summary.rejected, summary.shards_adopted) == (200, 4, 13)
    assert dataset_files(encoded_folder.url) == before


@pytest.mark.parametrize(
    "change", [{"resolution": 32}, {"limit": 100}, {"stored": "sample"}, {"micro_batch": 4}, {"vae": "other"}]
)
def test_another_runs_destination_is_refused(encoded_folder, sources, tiny_vae_dir, tmp_path, change):
    if change.get("vae"):
        import shutil

        change = {"vae": str(shutil.copytree(tiny_vae_dir, tmp_path / "other-vae"))}
    cfg = encode_config(sources["imagefolder"][0], encoded_folder.url, tiny_vae_dir, **change)
    with pytest.raises(EncodeError, match="holds another encode run"):
        run_encode(cfg)


def test_a_foreign_dataset_is_refused(tmp_path, sources, tiny_vae_dir):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000000.tar").write_bytes(b"")
    with pytest.raises(EncodeError, match="not written by `sit encode`"):
        run_encode(encode_config(sources["imagefolder"][0], str(tmp_path), tiny_vae_dir))


def test_missing_vae_names_what_to_pass(sources, tmp_path):
    from latents.autoencoder import AutoencoderNotFoundError as VaeNotFoundError

    with pytest.raises(VaeNotFoundError, match="--vae"):
        run_encode(encode_config(sources["imagefolder"][0], str(tmp_path / "out"), tmp_path / "no-vae"))


@pytest.mark.slow
def test_s3_source_and_destination(encoded_folder, sources, tiny_vae_dir, s3_bucket):
    fs = fsspec.filesystem("s3")
    fs.put(sources["imagefolder"][0], f"{s3_bucket}/imagenet/train", recursive=True)
    dst = f"{s3_bucket}/latents-64"
    cfg = encode_config(f"{s3_bucket}/imagenet/train", dst, tiny_vae_dir, max_reject_fraction=0.05)
    summary = run_encode(cfg)
    assert (summary.encoded, summary.rejected) == (200, 4)
    assert verify(dst).ok
    local = dataset_files(encoded_folder.url)
    for name, data in local.items():
        if name.startswith("shards/") or name in ("samples.parquet", "manifest.parquet"):
            assert fs.cat_file(f"{dst}/{name}") == data, name  # same images, same bytes, wherever they live
    rejects = pq.read_table(fs.open(f"{dst}/{REJECTS_NAME}")).column("source").to_pylist()
    assert all(r.startswith(f"{s3_bucket}/imagenet/train/") for r in rejects)


def test_cli_errors_are_one_line(sources, tmp_path, capsys):
    src = sources["imagefolder"][0]
    assert sit(["encode", src, str(tmp_path / "out"), "--vae", str(tmp_path / "no-vae"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "error: VAE" in err and "--vae" in err and "\n" not in err
    assert sit(["encode", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--quiet"]) == 1
    assert "no files found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sit(["encode", src, str(tmp_path / "out"), "--format", "tiff"])
    assert "invalid choice" in capsys.readouterr().err
