"""Spike and NaN rollback: back to the newest complete checkpoint, past the data that caused it.

With ``rollback.enabled`` (off in every preset), a step is a *spike* when its loss or gradient
norm is not finite, or when its loss (the global mean, the same float64 on every rank after
the statistics all-reduce) is above ``spike_factor`` x the median of the last ``window``
accepted losses (looked for once the window is full). The ranks all-reduce the verdict (max),
so they act identically. A spike updates nothing; instead every rank (`roll_back`):

1. waits for a pending asynchronous checkpoint, then loads the newest complete checkpoint that
   verifies (`CheckpointManager.restore`, falling back past damaged ones): model, EMA,
   optimizer, step, images seen, reader position, generators and the loss window of that step;
2. skips the data window: every batch drawn since that checkpoint - the steps after it up to
   and including the spike, plus any window an earlier rollback to the same checkpoint skipped -
   by moving the reader's position forward (nothing is read). Those samples are not trained on
   in this epoch; the steps after the checkpoint are trained again on the batches that follow.
   (The whole window rather than the last batch, as PaLM did - it restarted ~100 steps before a
   spike and skipped 200-500 batches: the batches just before a spike are as suspect as the last.)
3. reseeds the time/noise and label-dropout generators from (seed, rank, stream, rollbacks so
   far), so the draw of t and noise that met the spike is not replayed either.

The rollbacks so far and the count of batches drawn are train state, in every later
checkpoint: a run killed after a rollback resumes exactly as if uninterrupted (killed before
the next checkpoint, it replays the same steps, meets the same spike and rolls back the same
way). Each rollback is logged to metrics.jsonl (``event: rollback``: the spike's step, reason,
loss and median, the checkpoint and its step, the skipped batches ``[first, last]`` counted
1-based in the order the run draws them) and in `sit train`'s summary. The spike that comes
after ``max_rollbacks`` rollbacks stops training with `RollbackLimitError`.

Test hook: ``rollback.test_poison_batch`` = b multiplies the latents of the b-th batch drawn
from the reader by ``rollback.test_poison_factor`` (1e6: a loss spike; nan: a non-finite loss).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch

from trainer.config import RollbackConfig

SPIKE, NONFINITE = "spike", "non-finite"


class RollbackLimitError(RuntimeError):
    """A spike came after ``rollback.max_rollbacks`` rollbacks; the message names the step and the loss."""


class SpikeMonitor:
    """The running loss window and the rollbacks so far (`Stateful` train state, the same on every rank)."""

    def __init__(self, config: RollbackConfig):
        self.config = config
        self.losses: deque[float] = deque(maxlen=config.window)
        self.events: list[dict] = []  # one per rollback, as logged

    def median(self) -> float:
        return statistics.median(self.losses) if self.losses else math.nan

    def check(self, loss: float, finite: bool) -> str | None:
        """SPIKE, NONFINITE or None for a step's global mean loss (``finite``: loss and gradient norm)."""
        if not self.config.enabled:
            return None
        if not finite or not math.isfinite(loss):
            return NONFINITE
        if len(self.losses) == self.losses.maxlen and loss > self.config.spike_factor * self.median():
            return SPIKE
        return None

    def accept(self, loss: float) -> None:
        """Record the loss of a step that was applied."""
        if self.config.enabled:
            self.losses.append(loss)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.config.window)
        self.events = [dict(e) for e in state["events"]]


def poison(latents: torch.Tensor, batch_index: int, config: RollbackConfig) -> torch.Tensor:
    """The test hook: ``latents`` times ``test_poison_factor`` for the ``test_poison_batch``-th batch."""
    if config.test_poison_batch and batch_index == config.test_poison_batch:
        return latents * config.test_poison_factor
    return latents


def advance(loader, batches: int) -> None:
    """Move a `LatentLoader`'s position ``batches`` steps forward, across epochs, without reading them."""
    state = loader.state_dict()
    position = state["epoch"] * len(loader) + state["batch"] + batches
    state["epoch"], state["batch"] = divmod(position, len(loader))
    loader.load_state_dict(state)


def describe(spike: dict, factor: float) -> str:
    if spike["reason"] == NONFINITE:
        return f"non-finite loss or gradient norm (loss {spike['spike_loss']})"
    return f"loss {spike['spike_loss']:.6g} > {factor} x running median {spike['median']:.6g}"


def roll_back(trainer, spike: dict) -> dict:
    """Go back to the newest complete checkpoint and past the data window (collective); the logged event.

    ``spike``: `Trainer.train_step`'s statistics of the spike step. `RollbackLimitError` when
    ``max_rollbacks`` rollbacks were made already.
    """
    limit, factor = trainer.config.rollback.max_rollbacks, trainer.config.rollback.spike_factor
    events, drawn = list(trainer.rollback.events), trainer.batches_drawn
    if len(events) >= limit:
        raise RollbackLimitError(
            f"step {spike['spike_step']}: {describe(spike, factor)} after {len(events)} rollbacks "
            f"(rollback.max_rollbacks={limit}); the newest complete checkpoint is under {trainer.checkpoints.url}"
        )
    trainer.checkpoints.finish()
    folder = trainer.restore("auto")
    if folder is None:  # `train` saves one at the start when rollback is on
        raise RollbackLimitError(
            f"step {spike['spike_step']}: {describe(spike, factor)} and no checkpoint under {trainer.checkpoints.url}"
        )
    first = trainer.batches_drawn + 1
    advance(trainer.loader, drawn - trainer.batches_drawn)
    trainer.batches_drawn = drawn
    event = {
        "event": "rollback",
        **{k: spike[k] for k in ("spike_step", "reason", "spike_loss", "median")},
        "checkpoint": folder,
        "to_step": trainer.step,
        "skipped_batches": [first, drawn],
        "rollbacks": len(events) + 1,
    }
    trainer.rollback.events = [*events, event]
    trainer.seed_generators(len(trainer.rollback.events))
    return event
