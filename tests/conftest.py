"""Shared fixtures.

* reference_dir: values computed from the released SiT code (tests/reference/).
* s3_endpoint / s3_bucket: a real S3 API - moto's server in its own process on 127.0.0.1,
  started once per test session; s3fs finds it through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.moto_s3 import s3_environment, start_moto_server

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def s3_endpoint():
    proc, endpoint = start_moto_server()
    env = s3_environment(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket; returns its s3:// URL."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"
