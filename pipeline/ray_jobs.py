"""What the Ray jobs (`sit encode`, `sit sample`) share: joining a cluster, and the environment
their workers get.

Storage settings reach the workers as ``runtime_env={"env_vars": ...}``: endpoints, regions,
profile names - never secrets. Ray records a job's runtime environment in its logs and state
API, so keys and tokens stay where they are: workers on a cluster use the cluster's own
credentials (instance profile, workload identity, a mounted secret), and a local Ray started by
the job inherits the driver's environment anyway.
"""

from __future__ import annotations

import os

WORKER_ENV_PREFIXES = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "FSSPEC_",
    "HF_",
    "STORAGE_EMULATOR_HOST",  # gcsfs: a GCS emulator
    "GCSFS_",
)
SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "ACCESS_KEY", "_KEY")


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (e.g. "auto"), or start a local Ray; no-op when connected."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


def worker_env() -> dict[str, str]:
    """The driver's non-secret storage settings, for ``runtime_env={"env_vars": worker_env()}``."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(WORKER_ENV_PREFIXES) and not any(word in k for word in SECRET_WORDS)
    }
