"""Weights & Biases logging for rank 0 (``--set log.wandb=true``), an optional dependency.

* One W&B run per training run: its id is created on the first start, kept in the checkpoint
  (`Trainer.local_state`'s ``wandb_run_id``) and passed back with ``resume="allow"`` after a
  preemption, so a resumed run appends to the same W&B run. Steps are the optimizer steps; a
  preempted run stops after its last logged step and the resumed one logs from the next, so
  every step appears once.
* The resolved config is sent once, on the first start (a resume does not send it again).
* Logged: every numeric value of the metrics log (loss, loss by time bin, throughput, MFU,
  gradient norm, evaluation points), which W&B draws as curves (the loss curve among them),
  and the EMA sample grids as images.
* Credentials: wandb reads its API key from its own environment or netrc; nothing here passes or
  logs it. The run's console output, code and git state are not captured (``console="off"``,
  ``save_code=False``, ``disable_git=True``), so no environment or command output reaches the
  W&B files beyond the command line and the config.

``log.wandb_mode``: online (needs ``WANDB_API_KEY`` or ``wandb login``) or offline (files
under ``<run_dir>/wandb``; upload later with ``wandb sync``).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import ConfigError

if TYPE_CHECKING:
    from trainer.config import TrainConfig


def require_wandb():
    """The wandb module; `ConfigError` (one line) if it is not installed."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "log.wandb=true but the wandb package is not installed: pip install 'sit-pipeline[wandb]' "
            "(or set log.wandb=false)"
        ) from None
    return wandb


class WandbLog:
    """A W&B run for rank 0: `log` numeric values at a step, `image` a PNG, `finish`."""

    def __init__(self, config: TrainConfig, run_id: str = ""):
        wandb = require_wandb()
        self.wandb = wandb
        g = config.log
        run_dir = Path(config.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        resumed = bool(run_id)
        self.run_id = run_id or uuid.uuid4().hex[:12]  # stored in the checkpoint by the trainer
        settings = wandb.Settings(console="off", save_code=False, disable_git=True, x_disable_stats=True)
        try:
            self.run = self._init(wandb, config, g, run_dir, resumed, settings)
        except Exception as err:
            if not type(err).__module__.startswith("wandb"):
                raise
            raise ConfigError(
                f"W&B could not start the run ({type(err).__name__}: {' '.join(str(err).split())}); log in with "
                "`wandb login` or WANDB_API_KEY, or set log.wandb_mode=offline"
            ) from None

    def _init(self, wandb, config: TrainConfig, g, run_dir: Path, resumed: bool, settings):
        return wandb.init(
            project=g.wandb_project,
            name=g.wandb_name or run_dir.name,
            tags=[t.strip() for t in g.wandb_tags.split(",") if t.strip()] or None,
            mode=g.wandb_mode,
            dir=str(run_dir),
            id=self.run_id,
            resume="allow",
            config=None if resumed else config.to_dict(),
            settings=settings,
        )

    def log(self, step: int, values: dict) -> None:
        numbers = {
            k: v
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if numbers:
            self.run.log(numbers, step=step)

    def image(self, step: int, key: str, path: Path) -> None:
        self.run.log({key: self.wandb.Image(str(path))}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a preempted one (exit code 75) is marked as preempting, to be resumed."""
        if exit_code:
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)
