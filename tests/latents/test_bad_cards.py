"""Every bad card, index file and URL ends in one clear line naming the field or file - from
`sit inspect`, `sit verify` and the reader alike - never a traceback or a late crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster.cli import main
from latents.format import CARD_NAME, MANIFEST_NAME, REJECTS_NAME, SAMPLES_NAME, DatasetError
from latents.reader import LatentDataset
from latents.storage import StorageError

ROOT = Path(__file__).resolve().parents[2]
SIT = [sys.executable, "-m", "cluster.cli"]


def edit_card(**changes):
    def apply(path: Path) -> None:
        card = json.loads((path / CARD_NAME).read_text())
        card.update(changes)
        (path / CARD_NAME).write_text(json.dumps(card))

    return apply


def write(name: str, data: bytes):
    return lambda path: (path / name).write_bytes(data)


def drop_field(field: str):
    def apply(path: Path) -> None:
        card = json.loads((path / CARD_NAME).read_text())
        del card[field]
        (path / CARD_NAME).write_text(json.dumps(card))

    return apply


def parquet_of_other_schema(name: str):
    def apply(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"x": [1, 2]}), path / name)

    return apply


BAD = {
    "card is a JSON list": (write(CARD_NAME, b"[1, 2, 3]"), r"card\.json: must hold a JSON object, not a list"),
    "card is not JSON": (write(CARD_NAME, b"{'format': "), r"card\.json: not valid JSON"),
    "card is not UTF-8": (write(CARD_NAME, b"\xff\xfe{}"), r"card\.json: not valid JSON"),
    "latent_shape a string": (edit_card(latent_shape="4x8x8"), r"card\.json: latent_shape must be a list of 3"),
    "latent_shape of 2": (edit_card(latent_shape=[4, 8]), r"card\.json: latent_shape must be a list of 3"),
    "transform scale a string": (edit_card(transform={"scale": "0.5"}), r"card\.json: transform: bad transform"),
    "transform scale negative": (
        edit_card(transform={"scale": -0.5}),
        r"card\.json: transform: .*scale finite and >",
    ),
    "transform NaN shift": (edit_card(transform={"shift": float("nan")}), r"card\.json: transform: .*shift must be"),
    "transform unknown key": (edit_card(transform={"gain": 2}), r"card\.json: transform: a transform is an object"),
    "autoencoder a string": (edit_card(autoencoder="kl"), r"card\.json: autoencoder must be an object"),
    "num_classes zero": (edit_card(num_classes=0), r"card\.json: num_classes must be a positive integer"),
    "num_samples a float": (edit_card(num_samples=100.0), r"card\.json: num_samples must be a positive integer"),
    "flips a string": (edit_card(flips="yes"), r"card\.json: flips must be true or false"),
    "stored unknown": (edit_card(stored="mean"), r"card\.json: stored must be one of posterior, sample, latent"),
    "channel_std negative": (edit_card(channel_std=[1, -1, 1, 1]), r"card\.json: channel_std must not be negative"),
    "channel_mean of 3": (edit_card(channel_mean=[0, 0, 0]), r"card\.json: channel_mean must be a list of 4"),
    "extra a list": (edit_card(extra=[]), r"card\.json: extra must be a JSON object"),
    "unknown field": (edit_card(colour="red"), r"card\.json: missing fields \[\], unknown fields \['colour'\]"),
    "missing field": (drop_field("vae"), r"card\.json: missing fields \['vae'\]"),
    "other format": (edit_card(format="webdataset"), r"card\.json: format 'webdataset' is not 'sit-latents'"),
    "manifest garbage": (write(MANIFEST_NAME, b"not parquet"), r"manifest\.parquet: unreadable parquet"),
    "samples other schema": (parquet_of_other_schema(SAMPLES_NAME), r"samples\.parquet: schema"),
    "no card": (lambda p: (p / CARD_NAME).unlink(), r"dataset is incomplete: card\.json is missing"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from tests.latents.conftest import make_samples, write_dataset

    path = tmp_path_factory.mktemp("pristine") / "ds"
    write_dataset(str(path), make_samples(40))
    return path


def damaged(pristine: Path, tmp_path: Path, damage) -> Path:
    path = tmp_path / "ds"
    subprocess.run(["cp", "-r", str(pristine), str(path)], check=True)
    damage(path)
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_card_or_index(case, pristine, tmp_path, capsys):
    damage, message = BAD[case]
    url = str(damaged(pristine, tmp_path, damage))
    assert f"sit inspect: error: {url}" in one_line_error(capsys, ["inspect", url])
    err = one_line_error(capsys, ["verify", url, "--quiet"])
    assert __import__("re").search(message, err), err
    with pytest.raises(DatasetError, match=message):
        LatentDataset(url, 4)


BAD_URLS = {
    "unknown protocol": ("nope://bucket/ds", StorageError, r"nope://bucket/ds: unknown storage protocol 'nope'"),
    "nothing there": ("{tmp}/missing", DatasetError, r"/missing: no latent dataset here \(card\.json not found\)"),
}


@pytest.mark.parametrize("case", list(BAD_URLS))
def test_bad_url(case, tmp_path, capsys):
    url, error, message = BAD_URLS[case]
    url = url.format(tmp=tmp_path)
    for command in ("inspect", "verify"):
        assert __import__("re").search(message, one_line_error(capsys, [command, url]))
    with pytest.raises(error, match=message):
        LatentDataset(url, 4)


def test_bad_rejects_file_is_named(pristine, tmp_path, capsys):
    url = str(damaged(pristine, tmp_path, write(REJECTS_NAME, b"garbage")))
    assert "rejects.parquet: unreadable parquet" in one_line_error(capsys, ["inspect", url])
    assert main(["verify", url, "--quiet"]) == 1
    assert "rejects.parquet: unreadable parquet" in capsys.readouterr().err
    LatentDataset(url, 4)  # training does not need it


def test_rejects_are_reported(pristine, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from latents.format import REJECTS_SCHEMA

    rows = {"key": ["a", "b"], "source": ["x.jpg", "y.jpg"], "reason": ["decode", "decode"], "error": ["e", "e"]}
    url = damaged(pristine, tmp_path, lambda p: pq.write_table(pa.table(rows, schema=REJECTS_SCHEMA), p / REJECTS_NAME))
    assert main(["inspect", str(url)]) == 0
    assert "rejected      2 inputs (rejects.parquet): decode 2" in capsys.readouterr().out
    assert main(["verify", str(url), "--quiet"]) == 0
    assert "(2 inputs rejected by the encoder)" in capsys.readouterr().out


@pytest.mark.slow
def test_s3_without_credentials_is_one_line_and_not_retried(s3_bucket):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"],
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
    )
    for command in ("inspect", "verify"):
        out = subprocess.run([*SIT, command, f"{s3_bucket}/ds"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert "NoCredentialsError" in out.stderr and f"{s3_bucket}/ds/card.json" in out.stderr
        assert "retrying" not in out.stderr and "attempt" not in out.stderr
        debug = subprocess.run([*SIT, "--debug", command, f"{s3_bucket}/ds"], cwd=ROOT, env=env, capture_output=True)
        assert debug.returncode == 1 and b"Traceback" in debug.stderr


RUNS = 20  # per command in CI (each `sit` start imports torch: ~1.5 s of CPU); 100 each was run by hand


@pytest.mark.slow
def test_inspect_and_verify_exit_normally_again_and_again(pristine):
    """`sit inspect` used to abort at exit (SIGABRT) now and then: arrow released a buffer of a
    Python object during interpreter shutdown. Two processes at a time on 2 cores."""

    def run(command: str) -> int:
        return subprocess.run([*SIT, command, str(pristine)], cwd=ROOT, capture_output=True).returncode

    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(run, ["inspect"] * RUNS + ["verify"] * RUNS))
    assert codes == [0] * 2 * RUNS, {c: codes.count(c) for c in set(codes)}
