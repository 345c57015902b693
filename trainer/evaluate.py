"""Evaluation while training: the EMA's latent Fréchet distance (and optionally FID) every
``log.eval_every`` steps, and a ``best`` EMA export by that value.

What one evaluation point is:

* samples: ``log.eval_samples`` samples of the plan ``SamplePlan(log.eval_seed, N, classes)``
  (balanced over all classes, or cycled through ``log.eval_classes``), drawn by `sit sample`'s
  own sampler (`sampling.options.run_sampler`, ``log.eval_mode`` with ``log.eval_steps`` Euler
  steps) from the sharded EMA, in process. Each rank draws samples rank, rank + W, ... in batches
  of ``log.eval_batch`` (ranks with fewer samples run a discarded dummy so the collective forwards
  stay in lockstep); rank 0 gathers them in sample order. Sample i depends on (seed, i) only, so
  `sit sample EXPORT --seed S --num-samples N --class-policy balanced --mode M --steps K
  --save-latents` on the exported EMA draws the same latents.
* reference: the first ``log.eval_reference`` latents (default N) of the training data as the
  trainer sees them (scaled, posterior sample, random flip) in the reader's order for seed
  `REFERENCE_SEED` on one process - a fixed set, the same at every point and on every restart
  (`reference_latents`).
* value: `latent_fd` - the Fréchet distance between Gaussians fitted to the flattened
  generated and reference latents (`sampling.fid.frechet_distance`). With ``log.inception`` (a
  TorchScript Inception file) and ``log.inception_reference`` (an npz with ``mu``/``sigma``, as
  `sit eval --save-reference-stats` writes), the samples are also decoded with ``log.vae`` and
  their FID is computed.

The schedule (last evaluated step) and the best value so far live in `Evaluator.state_dict`,
which the trainer checkpoints: a resumed run neither repeats nor skips a point. A point due on
the step a preemption stops at is run right after the resume instead (the grace period is for
the checkpoint). The best export is replaced whenever a point beats the best so far.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from latents.argtypes import parse_choice
from sampling.fid import Statistics, frechet_distance
from sampling.options import Mode, SamplerOptions, run_sampler
from sampling.plan import ClassPolicy, SamplePlan

if TYPE_CHECKING:
    from trainer.train import Trainer

REFERENCE_SEED = 1  # the reader's seed for the reference set (any fixed value)


def reference_latents(url: str, count: int) -> np.ndarray:
    """(count, C, H, W) float32: the first ``count`` training latents in the reader's order for
    `REFERENCE_SEED` (one process, no workers); fewer if the dataset is smaller."""
    from latents.reader import LatentDataset, LatentLoader

    dataset = LatentDataset(url, batch_size=min(count, 64), seed=REFERENCE_SEED)
    out, have = [], 0
    for batch in LatentLoader(dataset):
        out.append(batch["latents"].numpy())
        have += len(out[-1])
        if have >= count:
            break
    return np.concatenate(out)[:count]


def latent_fd(generated: np.ndarray, reference: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two latent sets (N, ...) flattened per sample."""
    a = Statistics.of(generated.reshape(len(generated), -1))
    b = Statistics.of(reference.reshape(len(reference), -1))
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def eval_options(mode: str, steps: int, transport: dict) -> SamplerOptions:
    """`sit sample`'s sampler options for an evaluation point (Euler; the run's transport)."""
    options = SamplerOptions(mode=parse_choice(Mode, mode), method="euler", num_steps=steps)
    return options.with_training_transport(transport)


def eval_plan(seed: int, num_samples: int, num_classes: int, classes: tuple[int, ...]) -> SamplePlan:
    if classes:
        return SamplePlan(seed, num_samples, num_classes, ClassPolicy.LIST, classes)
    return SamplePlan(seed, num_samples, num_classes, ClassPolicy.BALANCED)


def best_export_url(config) -> str:
    """Where the best EMA export goes: next to the last one, ``-best`` before the suffix."""
    last = config.export_url or f"{config.run_dir.rstrip('/')}/ema.safetensors"
    stem, dot, suffix = last.rpartition(".")
    return f"{stem}-best.{suffix}" if dot and "/" not in suffix else f"{last}-best"


class _EmaForward:
    """The sharded EMA as `run_sampler` calls a model (``model(x, t, y)`` and ``.config``)."""

    def __init__(self, trainer: Trainer):
        self.ema, self.config = trainer.ema, trainer.model_config

    def __call__(self, x, t, y):
        return self.ema(x, t, y)


def _broadcast_float(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(box, src=0)
    return float(box)


class Evaluator:
    """The evaluation schedule, the best value so far, and how to run one point (collective)."""

    def __init__(self, trainer: Trainer):
        c = trainer.config
        self.trainer, self.log = trainer, c.log
        self.every = c.log.eval_every
        self.last_step = 0  # the step of the last evaluation point (0: none yet)
        self.best = math.inf  # the lowest value so far (latent_fd)
        self.best_step = 0
        self._reference: np.ndarray | None = None
        self._inception = None

    # ---- state (checkpointed by the trainer) ------------------------------------------------------

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.best, self.best_step = state["last_step"], state["best"], state["best_step"]

    # ---- schedule -----------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether a point is due at ``step`` (a multiple of eval_every not yet evaluated, or one
        skipped because of a preemption)."""
        return bool(self.every) and step >= self.every and (step // self.every) * self.every > self.last_step

    # ---- one point ----------------------------------------------------------------------------

    def generate(self) -> np.ndarray | None:
        """The evaluation samples' latents (N, C, H, W) in sample order on rank 0, None elsewhere."""
        t, lg = self.trainer, self.log
        mc, world = t.model_config, t.world
        plan = eval_plan(lg.eval_seed, lg.eval_samples, mc.num_classes, lg.eval_class_ids(mc.num_classes))
        options = eval_options(lg.eval_mode, lg.eval_steps, t.config.to_dict()["transport"])
        shape = (mc.in_channels, mc.input_size, mc.input_size)
        mine = list(range(world.rank, plan.num_samples, world.world_size))
        per_rank = math.ceil(plan.num_samples / world.world_size)
        model = _EmaForward(t)
        outputs = []
        for start in range(0, per_rank, lg.eval_batch):  # the same count of batches on every rank
            indices = mine[start : start + lg.eval_batch]
            noise, y, gens = plan.start(indices or [0], shape, world.device)
            x = run_sampler(model, options, noise, y, gens).x
            if indices:
                outputs.append(x.float().cpu())
        local = (mine, torch.cat(outputs).numpy() if outputs else np.zeros((0, *shape), np.float32))
        if world.world_size == 1:
            return local[1]
        gathered = [None] * world.world_size if world.is_main else None
        dist.gather_object(local, gathered, dst=0)
        if not world.is_main:
            return None
        order = np.argsort(np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in gathered]))
        return np.concatenate([x for _, x in gathered])[order]

    def reference(self) -> np.ndarray:
        if self._reference is None:
            lg = self.log
            self._reference = reference_latents(self.trainer.config.data.url, lg.eval_reference or lg.eval_samples)
        return self._reference

    def fid(self, latents: np.ndarray) -> float:
        """FID of the decoded samples against ``log.inception_reference``'s statistics (rank 0)."""
        from sampling.fid import extract, load_inception
        from sampling.image_sources import read_npz_arrays
        from trainer.preview import preview_autoencoder

        lg, dev = self.log, self.trainer.world.device
        if self._inception is None:
            ref = read_npz_arrays(lg.inception_reference, ("mu", "sigma"))
            self._inception = (load_inception(lg.inception, dev), ref)
        detector, ref = self._inception
        ae = preview_autoencoder(self.trainer)  # log.vae, checked against the dataset's, loaded once
        x = torch.from_numpy(latents).to(dev)
        batches = (ae.decode_to_uint8(x[i : i + 1], self.trainer.transform) for i in range(len(x)))
        stats = Statistics.of(extract(detector, batches, dev).features)
        return frechet_distance(stats.mu, stats.sigma, ref["mu"], ref["sigma"])

    def run(self, step: int) -> dict:
        """Evaluate at ``step`` (collective); returns the values logged (the same on every rank)."""
        start = time.perf_counter()
        latents = self.generate()
        values: dict = {}
        fd = math.nan
        if self.trainer.world.is_main:
            fd = latent_fd(latents, self.reference())
            if self.log.inception and self.log.inception_reference:
                values["eval_fid"] = self.fid(latents)
        fd = _broadcast_float(fd, self.trainer.world.device)
        improved = fd < self.best
        if improved:
            self.best, self.best_step = fd, step
        self.last_step = step
        values.update(
            eval_latent_fd=fd,
            eval_best_latent_fd=self.best,
            eval_best_step=self.best_step,
            eval_images=self.log.eval_samples,
            eval_seconds=round(time.perf_counter() - start, 3),
        )
        values["improved"] = improved
        return values
