"""What the Ray jobs (`sit encode`, `sit sample`) share: joining a cluster, where Ray's own log
lines go, and the environment their workers get.

Ray's log lines are Ray's, not the user's: its Python loggers (``ray``, ``ray.data``: execution
plans, token and progress-bar notices) write to a log file (`ray_log_file`, printed by a failing
job), never to the terminal; workers' output stays in Ray's session logs (``log_to_driver=False``).
The job prints its own progress bar and summary. The core worker's error-level notice about
restartable actors ("max_restarts > 0") is avoided at its source: the jobs' actors are not
restarted by Ray (``max_restarts=0``, `NO_RESTARTS`); a lost worker fails the job naming it, and
running the same command again resumes from the committed shards or chunks.

Storage settings reach the workers as ``runtime_env={"env_vars": ...}``: endpoints, regions,
profile names - never secrets. Ray records a job's runtime environment in its logs and state
API, so keys and tokens stay where they are: workers on a cluster use the cluster's own
credentials (instance profile, workload identity, a mounted secret), and a local Ray started by
the job inherits the driver's environment anyway.
"""

from __future__ import annotations

import logging
import os
import tempfile

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


NO_RESTARTS = {"max_restarts": 0}  # actor options: exactly-once jobs resume by rerunning, not by Ray restarts
RAY_LOGGERS = ("ray", "ray._private", "ray.data")  # ray.init() empties "ray" itself: "ray._private" keeps its notices
_LOG_FILE: str | None = None
_HANDLER: logging.FileHandler | None = None


def ray_log_file() -> str:
    """The local file that receives Ray's Python log lines in this process (see the module docstring)."""
    global _LOG_FILE
    if _LOG_FILE is None:
        folder = os.environ.get("SIT_LOG_DIR") or os.path.join(tempfile.gettempdir(), "sit-logs")
        os.makedirs(folder, exist_ok=True)
        _LOG_FILE = os.path.join(folder, f"ray-{os.getpid()}.log")
    return _LOG_FILE


def route_ray_logs(path: str | None = None) -> str:
    """Send Ray's Python loggers to ``path`` (default `ray_log_file`) instead of the terminal; idempotent."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger (console + session file) on import

    global _LOG_FILE, _HANDLER
    _LOG_FILE = path or ray_log_file()
    if _HANDLER is None or _HANDLER.baseFilename != os.path.abspath(_LOG_FILE):
        if _HANDLER is not None:
            _HANDLER.close()
        _HANDLER = logging.FileHandler(_LOG_FILE, delay=True)  # created at the first line
        _HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s:%(lineno)d -- %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            console = isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler)
            if console or isinstance(old, logging.FileHandler):  # Ray Data's console handler, an earlier routing
                logger.removeHandler(old)
        logger.addHandler(_HANDLER)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    return _LOG_FILE


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (e.g. "auto"), or start a local Ray; no-op when connected.
    Ray's log lines go to `ray_log_file` either way."""
    import ray

    route_ray_logs(_LOG_FILE)
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    route_ray_logs(_LOG_FILE)  # again: ray.init() removed the "ray" logger's handlers


def worker_env() -> dict[str, str]:
    """The driver's non-secret storage settings, for ``runtime_env={"env_vars": worker_env()}``."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(WORKER_ENV_PREFIXES) and not any(word in k for word in SECRET_WORDS)
    }


def ray_error_cause(err: BaseException) -> str:
    """``Type: message`` of what failed inside a Ray task or actor method: a RayTaskError's
    original exception (not Ray's wrapper, whose text starts with its traceback), else ``err``."""
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {cause}"
