"""The small shared edge helpers: artifact kinds, counts in words, the torch thread policy."""

from __future__ import annotations

import json

import pytest

from latents.artifacts import ArtifactError, Kind, detect, require_output
from latents.threads import default_threads, usable_cpus
from latents.words import plural, tally
from tests.trainer.conftest import write_toy_dataset


def test_each_kind_of_artifact_is_told_apart(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.jpg").write_bytes(b"x")
    write_toy_dataset(str(tmp_path / "ds"), n=4)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "encode-run.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run2" / "config.json").write_text(json.dumps({"total_steps": 3}))
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "run.json").write_text(json.dumps({"format": "sit-samples"}))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo-size.json").write_text("{}")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    expected = {
        "missing": Kind.NOTHING, "file.txt": Kind.FILE, "empty": Kind.EMPTY, "other": Kind.FOLDER,
        "ds": Kind.LATENT_DATASET, "partial": Kind.LATENT_DATASET, "run": Kind.TRAIN_RUN, "run2": Kind.TRAIN_RUN,
        "samples": Kind.SAMPLES, "demo": Kind.DEMO, "vae": Kind.MODEL,
    }  # fmt: skip
    assert {name: detect(str(tmp_path / name)) for name in expected} == expected
    assert detect(f"file://{tmp_path}/ds") is Kind.LATENT_DATASET


def test_an_output_of_another_kind_or_below_a_file_is_refused(tmp_path):
    write_toy_dataset(str(tmp_path / "ds"), n=4)
    (tmp_path / "file.txt").write_text("x")
    assert require_output(str(tmp_path / "ds"), Kind.LATENT_DATASET, "DST") is Kind.LATENT_DATASET  # a rerun
    assert require_output(str(tmp_path / "new" / "deeper"), Kind.SAMPLES, "OUT") is Kind.NOTHING
    with pytest.raises(ArtifactError, match=r"OUT .*/ds is a latent dataset .*not a sample output"):
        require_output(str(tmp_path / "ds"), Kind.SAMPLES, "OUT")
    with pytest.raises(ArtifactError, match=r"file\.txt is a file, so nothing can be created below it"):
        require_output(str(tmp_path / "file.txt" / "a" / "b"), Kind.SAMPLES, "OUT")


def test_counts_are_said_in_words():
    assert [plural(n, "shard") for n in (0, 1, 2, 1024)] == ["0 shards", "1 shard", "2 shards", "1,024 shards"]
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"
    assert tally({"not-an-image": 2, "empty": 1}) == "1 empty, 2 not-an-image" and tally({}) == "none"


def test_thread_policy(monkeypatch):
    monkeypatch.delenv("SIT_TORCH_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == max(1, usable_cpus() // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun sets it for several ranks
    assert default_threads() == 1
    monkeypatch.setenv("SIT_TORCH_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("SIT_TORCH_THREADS", "0")
    with pytest.raises(ValueError, match="SIT_TORCH_THREADS='0'"):
        default_threads()
