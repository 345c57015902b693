"""Shared fixtures.

* reference_dir: values computed from the released SiT code (tests/reference/).
* s3_endpoint / s3_bucket: a real S3 API - moto's server in its own process on 127.0.0.1,
  started once per test session; s3fs finds it through AWS_ENDPOINT_URL.
* gcs_endpoint / gcs_bucket / gcs_faults: a real GCS API - fake-gcs-server on 127.0.0.1 behind
  a fault-injecting proxy (tests/gcs.py), started once per test session; gcsfs finds it through
  STORAGE_EMULATOR_HOST (anonymous, FSSPEC_GS_TOKEN=anon).
* ray_address: one local Ray cluster per test session (2 CPUs, a small object store); the
  test process is connected to it and subprocesses join it with `--address`; its workers see
  the moto server's endpoint and credentials and the GCS emulator.
* tiny_vae_dir: a tiny randomly initialised `diffusers.AutoencoderKL` with the SD VAE's
  structure (downsampling by 8, 4 latent channels), saved with `save_pretrained`.

torch runs on one thread in the test process: on a 2-core machine more threads only contend
with the other processes a test starts (Ray workers, torchrun ranks, moto).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.gcs import FaultProxy, gcs_environment, start_gcs_server
from tests.moto_s3 import s3_environment, start_moto_server

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
# gcsfs reads this once, at import: without it every new bucket costs a 60 s gRPC probe, which
# the GCS emulator cannot answer (tests only ever talk to the emulator)
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

torch.set_num_threads(1)


def set_environment(env: dict[str, str | None]) -> dict[str, str | None]:
    """Set (or, for None, remove) these variables; returns their previous values, to restore with the same call."""
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return saved


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def s3_endpoint():
    proc, endpoint = start_moto_server()
    env = s3_environment(endpoint)
    saved = set_environment(env)
    yield endpoint
    proc.terminate()
    proc.wait(10)
    set_environment(saved)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket; returns its s3:// URL."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def gcs_proxy():
    """The session's GCS emulator behind its fault proxy; the environment points gcsfs at the proxy."""
    import fsspec.config

    proxy = FaultProxy()
    proc, upstream = start_gcs_server(proxy.url)
    proxy.start(upstream)
    env = gcs_environment(proxy.url)
    saved = set_environment(env)
    saved_conf = fsspec.config.conf.get("gs")
    fsspec.config.conf["gs"] = {**(saved_conf or {}), "token": "anon"}  # fsspec read FSSPEC_* at import
    yield proxy
    proxy.stop()
    proc.terminate()
    proc.wait(10)
    set_environment(saved)
    if saved_conf is None:
        fsspec.config.conf.pop("gs", None)
    else:
        fsspec.config.conf["gs"] = saved_conf


@pytest.fixture(scope="session")
def gcs_endpoint(gcs_proxy) -> str:
    return gcs_proxy.url


@pytest.fixture
def gcs_faults(gcs_proxy) -> FaultProxy:
    """The proxy with no faults scripted (and none left behind after the test)."""
    gcs_proxy.clear()
    yield gcs_proxy
    gcs_proxy.clear()


@pytest.fixture
def gcs_bucket(gcs_endpoint) -> str:
    """A fresh, empty bucket; returns its gs:// URL."""
    import gcsfs

    name = f"test-{uuid.uuid4().hex[:12]}"
    gcsfs.GCSFileSystem(skip_instance_cache=True).mkdir(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def ray_address(s3_endpoint, gcs_endpoint) -> str:
    """The GCS address of the session's local Ray cluster (this process is its driver).

    Started after the moto server and the GCS emulator, so that its workers inherit their
    endpoints and the dummy credentials, as a real cluster's workers have their own (the jobs
    never ship secrets).
    """
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def wait_for_free_cpus(timeout: float = 60.0) -> None:
    """Wait until every CPU of the session's Ray cluster is free: after a test SIGKILLs a job's
    driver, Ray kills that job's actors once it sees the driver gone; a rerun started in the test
    process waits for that, so the killed job cannot still be writing while the rerun runs."""
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"the cluster's CPUs still held after {timeout:.0f} s"
        time.sleep(0.1)


def save_tiny_vae(path: Path, seed: int = 0) -> Path:
    """A tiny random AutoencoderKL shaped like the SD VAE (x8 downsampling, 4 channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


# ---- one tiny random autoencoder per family (latents.autoencoder), all for 64 px images ---------------

FAMILY_SHAPES = {  # family -> (stored (C, H, W) at 64 px, model-space (C, H, W))
    "sd": ((4, 8, 8), (4, 8, 8)),
    "flux1": ((16, 8, 8), (16, 8, 8)),
    "flux2": ((8, 8, 8), (32, 4, 4)),
    "dcae": ((8, 8, 8), (8, 8, 8)),
    "rae": ((64, 4, 4), (64, 4, 4)),
}


def save_tiny_autoencoder(family: str, path: Path, seed: int = 0) -> Path:
    """A tiny randomly initialised autoencoder of ``family`` (see FAMILY_SHAPES), saved with save_pretrained.

    flux1: AutoencoderKL with FLUX.1's scaling and shift factors and no quant convs; flux2: its
    batch-norm statistics set to random non-trivial values; dcae: deterministic, f8; rae: a one-layer
    DINOv2 encoder (32 px input, 8 px patches: a 4 x 4 grid) and a 16 px-patch decoder (64 px out),
    with per-channel latents_mean/std.
    """
    import diffusers

    torch.manual_seed(seed)
    kl = {
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 8, 16, 16),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
    }
    if family == "sd":
        return save_tiny_vae(path, seed)
    if family == "flux1":
        model = diffusers.AutoencoderKL(
            **kl, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False,
        )  # fmt: skip
    elif family == "flux2":
        model = diffusers.AutoencoderKLFlux2(**kl, latent_channels=8)
        with torch.no_grad():
            model.bn.running_mean.copy_(0.3 * torch.randn(32))
            model.bn.running_var.copy_(torch.rand(32) + 0.5)
    elif family == "dcae":
        model = diffusers.AutoencoderDC(
            in_channels=3, latent_channels=8, attention_head_dim=8,
            encoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
            encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
            encoder_qkv_multiscales=((), (), (), (5,)), decoder_qkv_multiscales=((), (), (), (5,)),
            scaling_factor=0.41407,
        )  # fmt: skip
    elif family == "rae":
        g = torch.Generator().manual_seed(seed)
        model = diffusers.AutoencoderRAE(
            encoder_type="dinov2", encoder_hidden_size=64, encoder_patch_size=8, encoder_num_hidden_layers=1,
            decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=64, patch_size=16, encoder_input_size=32,
            latents_mean=(0.2 * torch.randn(64, 1, 1, generator=g)).tolist(),
            latents_std=(torch.rand(64, 1, 1, generator=g) + 0.5).tolist(),
        )  # fmt: skip
    else:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILY_SHAPES)}")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_autoencoders(tmp_path_factory) -> dict[str, Path]:
    """family -> directory of its tiny autoencoder (the sd one is tiny_vae_dir's twin)."""
    root = tmp_path_factory.mktemp("autoencoders")
    return {family: save_tiny_autoencoder(family, root / family) for family in FAMILY_SHAPES}
