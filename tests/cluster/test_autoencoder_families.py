"""Every autoencoder family through the whole system: `sit encode` -> `sit train` -> `sit sample
--save-latents` on the session's Ray cluster, with a tiny random model of each (tests/conftest.py);
and `sit sample` refusing a --vae other than the one the export records."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from cluster.cli import main as sit
from latents.autoencoder import LatentTransform, load_autoencoder
from pipeline.synthetic import synthetic_images, write_imagefolder
from tests.conftest import FAMILY_SHAPES
from tests.latents.test_statistics_and_v1 import numpy_statistics
from trainer.export import read_export

CLASSES = {"sd": "AutoencoderKL", "flux1": "AutoencoderKL", "flux2": "AutoencoderKLFlux2", "dcae": "AutoencoderDC"}
CLASSES["rae"] = "AutoencoderRAE"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """8 good images of 2 classes in class folders."""
    url = str(tmp_path_factory.mktemp("families") / "src")
    write_imagefolder(url, synthetic_images(num_classes=2, per_class=4, seed=1, broken=0))
    return url


@pytest.fixture(scope="module")
def runs(ray_address, tiny_autoencoders, source, tmp_path_factory) -> dict:
    """family -> (dataset dir, export path): each family encoded and trained for 2 steps (lazily, once)."""
    out: dict = {}

    def get(family: str):
        if family not in out:
            root = tmp_path_factory.mktemp(family)
            vae, data, run = str(tiny_autoencoders[family]), root / "data", root / "run"
            assert sit(["encode", source, str(data), "--resolution", "64", "--vae", vae, "--address", ray_address,
                        "--shard-size", "4", "--micro-batch", "4", "--quiet"]) == 0  # fmt: skip
            # the model's latent shape from the card (0); the e2e test checks it is the model-space shape
            assert sit(["train", "--preset", "tiny-cpu", "--data", str(data), "--run-dir", str(run), "--steps", "2",
                        "--set", "model.in_channels=0", "--set", "model.input_size=0",
                        "--set", "model.num_classes=2", "--set", "data.global_batch_size=4",
                        "--set", "log.tensorboard=false", "--set", "log.progress=false"]) == 0  # fmt: skip
            out[family] = (data, run / "ema.safetensors")
        return out[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_SHAPES))
def test_encode_train_sample_end_to_end(family, runs, ray_address, tiny_autoencoders, tmp_path, capsys):
    data, export = runs(family)
    stored_shape, model_shape = FAMILY_SHAPES[family]
    card = json.loads((data / "card.json").read_text())
    ae = load_autoencoder(str(tiny_autoencoders[family]))
    assert card["format_version"] == 2 and card["latent_shape"] == list(stored_shape)
    assert card["autoencoder"] == {"class": CLASSES[family], "config_sha256": ae.identity["config_sha256"]}
    assert card["stored"] == ("posterior" if family in ("sd", "flux1", "flux2") else "latent")
    assert LatentTransform.from_dict(card["transform"]) == ae.own_transform()
    mean, std = numpy_statistics(str(data))  # the encode job's streaming float64 statistics, both flips
    np.testing.assert_allclose(card["channel_mean"], mean, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(card["channel_std"], std, rtol=1e-6)

    capsys.readouterr()
    assert sit(["inspect", str(data)]) == 0
    shown = capsys.readouterr().out
    assert CLASSES[family] in shown and f"model latents {model_shape}" in shown
    assert ("posterior mean+std stored" if card["stored"] == "posterior" else "latent stored") in shown

    config, _, extra = read_export(str(export))  # the export is the one record of the autoencoder and transform
    assert (config.in_channels, config.input_size, config.input_size) == model_shape
    assert extra["autoencoder"]["class"] == CLASSES[family] and extra["latent_transform"] == card["transform"]

    out = tmp_path / "samples"
    assert sit(["sample", str(export), str(out), "--vae", str(tiny_autoencoders[family]), "--num-samples", "2",
                "--mode", "ODE", "--method", "euler", "--steps", "2", "--save-latents", "--batch-size", "2",
                "--address", ray_address, "--quiet"]) == 0  # fmt: skip
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    with tarfile.open(out / "chunks" / "chunk-000000.tar") as tar:
        latents = [np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar if m.name.endswith(".npy")]
    assert len(latents) == 2 and all(x.shape[-3:] == model_shape for x in latents)


@pytest.mark.slow
def test_sample_refuses_another_autoencoder(runs, tiny_autoencoders, tmp_path, capsys):
    _, export = runs("flux1")
    other = str(tiny_autoencoders["sd"])
    capsys.readouterr()
    code = sit(["sample", str(export), str(tmp_path / "grid.png"), "--grid", "--vae", other, "--classes", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    flux1 = load_autoencoder(str(tiny_autoencoders["flux1"])).identity["config_sha256"][:12]
    sd = load_autoencoder(other).identity["config_sha256"][:12]
    assert f"--vae {other} is AutoencoderKL config {sd}" in err and f"AutoencoderKL config {flux1}" in err
    # with the override, the export's own transform decodes through the other autoencoder
    assert (
        sit(
            [
                "sample",
                str(export),
                str(tmp_path / "g.png"),
                "--grid",
                "--vae",
                other,
                "--classes",
                "0",
                "--per-class",
                "1",
                "--allow-vae-mismatch",
                "--mode",
                "ODE",
                "--method",
                "euler",
                "--steps",
                "2",
            ]
        )
        == 1
    )
    assert "latent shape" in capsys.readouterr().err  # 16 channels do not fit the SD VAE's 4: refused, named

    from diffusers import AutoencoderKL

    shifted = AutoencoderKL.from_pretrained(str(tiny_autoencoders["flux1"]))  # same weights, another shift_factor
    shifted.register_to_config(shift_factor=0.2)
    shifted.save_pretrained(tmp_path / "shifted")
    grid = ["sample", str(export), str(tmp_path / "s.png"), "--grid", "--vae", str(tmp_path / "shifted"), "--classes",
            "0", "--per-class", "1", "--mode", "ODE", "--method", "euler", "--steps", "2"]  # fmt: skip
    assert sit(grid) == 1 and "AutoencoderKL config" in capsys.readouterr().err
    assert sit([*grid, "--allow-vae-mismatch"]) == 0 and (tmp_path / "s.png").exists()
