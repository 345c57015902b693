"""The training loop: `train(config)`, also runnable as ``torchrun --nproc_per_node N -m trainer.train``.

One step on every rank, in lockstep: a batch from the streaming reader -> transport loss (time,
noise and label dropout from explicit per-rank generators) -> backward (FSDP2 reduces the
gradients) -> one all-reduce of the step's statistics (loss, non-finite count, loss by time bin,
the preemption flag) -> AdamW step and EMA update, unless the loss was non-finite on any rank
(or, with ``rollback.enabled``, a spike: see `trainer.rollback`).

Everything a resume needs is in the checkpoint (see `trainer.checkpoint`): model, EMA and
optimizer (sharded, DCP, handed to the manager by name as `Stateful` objects), and per rank the
step, images seen, batches drawn, reader position, the rollback record and the state of every
generator; a resumed run continues bitwise identically on CPU. Exit codes: 0 finished,
`trainer.preempt.EXIT_PREEMPTED` (75) preempted after a complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from latents.autoencoder import LatentTransform
from latents.reader import LatentDataset, LatentLoader
from latents.storage import retry
from trainer.checkpoint import CheckpointError, CheckpointManager, step_folder
from trainer.config import ConfigError, TrainConfig
from trainer.ema import EMA
from trainer.evaluate import Evaluator, best_export_url
from trainer.export import save_export
from trainer.metrics import MetricsLog, mfu, peak_memory_bytes, time_bin_sums
from trainer.model import SiT, SiTConfig
from trainer.parallelize import World, close_world, init_world, local_tensor, parallelize
from trainer.preempt import EXIT_PREEMPTED, PreemptionFlag
from trainer.preview import draw_preview
from trainer.rollback import SpikeMonitor, poison, roll_back

log = logging.getLogger(__name__)
LOSS_PARTS = ("mse", "direction")  # per-term losses logged (overall and by t bin) when the loss has several


class DatasetMismatchError(ValueError):
    """The dataset's card does not match the model configuration; the message names both values."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class TrainResult:
    """What a `train` call did."""

    exit_code: int  # 0 finished, EXIT_PREEMPTED after a preemption checkpoint
    step: int  # optimizer steps taken in total (resumed ones included)
    images_seen: int
    last_loss: float  # mean loss of the last step (nan if none ran)
    nonfinite_steps: int  # steps skipped for a non-finite loss, in total
    resumed_from: str | None
    checkpoint: str | None  # the last checkpoint written
    export: str | None  # the consolidated EMA export, if written
    rollbacks: list[dict] = dataclasses.field(default_factory=list)  # trainer.rollback's events, in total


def check_dataset(url: str, card, model: SiTConfig, transform: LatentTransform | None = None) -> None:
    """Refuse a dataset whose model-space latent shape or class count differs from the model's."""
    want = [model.in_channels, model.input_size, model.input_size]
    have = list((transform or card.latent_transform).model_shape(card.latent_shape))
    problems = []
    if have != want:
        stored = (
            f" (stored {list(card.latent_shape)}, {card.autoencoder['class'] or 'autoencoder'})"
            if have != list(card.latent_shape)
            else ""
        )
        problems.append(f"latent shape (C, H, W) {have} in the dataset{stored}, {want} in the model")
    if card.num_classes != model.num_classes:
        problems.append(f"num_classes {card.num_classes} in the dataset, {model.num_classes} in the model")
    if problems:
        raise DatasetMismatchError(
            f"{url}: dataset does not match the model: {'; '.join(problems)} "
            "(set model.input_size / model.in_channels, 0 for the dataset's, / model.num_classes)"
        )


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


NOISE_STREAM, LABEL_STREAM = 1, 2


class ModelState:
    """A model's sharded weights, by name for the checkpoint manager (`Stateful`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """An optimizer's sharded state, by name for the checkpoint manager (`Stateful`)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class Trainer:
    """The pieces of one run, built from a config on an initialised world."""

    def __init__(self, config: TrainConfig, world: World):
        self.config, self.world = config, world
        c = config
        self.model_config = c.model.sit_config()
        self.transport = c.transport.build()
        if c.data.global_batch_size % world.world_size:
            raise ConfigError(
                f"data.global_batch_size {c.data.global_batch_size} is not divisible by the world size "
                f"{world.world_size}"
            )
        self.local_batch = c.data.global_batch_size // world.world_size
        if not c.data.url:
            raise ConfigError("no dataset: pass --data URL (or set data.url)")
        self.dataset = LatentDataset(
            c.data.url,
            batch_size=self.local_batch,
            rank=world.rank,
            world_size=world.world_size,
            seed=c.data.seed,
            streams=c.data.streams or None,
            shuffle_buffer_bytes=c.data.shuffle_buffer_bytes,
            bad_shard=c.data.bad_shard,
            transform=c.data.norm(),
        )
        self.transform = self.dataset.transform
        if not (c.model.in_channels and c.model.input_size):  # 0: the dataset's model-space shape
            channels, side, _ = self.dataset.model_shape
            self.model_config = dataclasses.replace(
                self.model_config, in_channels=c.model.in_channels or channels, input_size=c.model.input_size or side
            )
        check_dataset(c.data.url, self.dataset.card, self.model_config, self.transform)
        self.loader = LatentLoader(self.dataset, num_workers=c.data.num_workers, pin_memory=world.device.type == "cuda")

        torch.manual_seed(c.seed)  # the same initial weights on every rank
        model = SiT(self.model_config)
        self.ema = EMA(model, world.mesh, c.optim.ema_decay)
        self.model = parallelize(
            model, world.mesh, c.parallel.precision, c.parallel.compile, c.parallel.activation_checkpointing
        )
        self.model.train()
        fused_ok = world.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=c.optim.lr,
            betas=(c.optim.beta1, c.optim.beta2),
            eps=c.optim.eps,
            weight_decay=c.optim.weight_decay,
            foreach=not fused_ok,
            fused=fused_ok or None,
        )
        self.noise_gen, self.label_gen = torch.Generator(world.device), torch.Generator(world.device)
        self.seed_generators()
        self.checkpoints = CheckpointManager(
            c.checkpoint_url(), c.checkpoint.keep_last, c.checkpoint.keep_every, c.checkpoint.async_save
        )
        self.step = 0
        self.images_seen = 0
        self.batches_drawn = 0  # batches taken from the reader, those skipped by rollbacks included
        self.rollback = SpikeMonitor(c.rollback)
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.preview_autoencoder = None  # loaded by the first preview grid (log.vae), then kept
        self.evaluator = Evaluator(self)
        self.wandb_run_id = ""  # rank 0's W&B run, kept across restarts (trainer.wandb_log)

    def seed_generators(self, *more: int) -> None:
        """Seed the time/noise and label-dropout generators from (seed, rank, stream, *more)."""
        c, rank = self.config, self.world.rank
        self.noise_gen.manual_seed(_seed(c.seed, rank, NOISE_STREAM, *more))
        self.label_gen.manual_seed(_seed(c.seed, rank, LABEL_STREAM, *more))

    # ---- state --------------------------------------------------------------------------------

    def sharded_state(self) -> dict:
        """The sharded state by name, as `Stateful` objects for the checkpoint manager."""
        return {
            "model": ModelState(self.model),
            "ema": self.ema,
            "optim": OptimizerState(self.model, self.optimizer),
        }

    def local_state(self) -> dict:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
            "batches_drawn": self.batches_drawn,
            "rollback": self.rollback.state_dict(),
            "data": self.loader.state_dict(),
            "noise_rng": self.noise_gen.get_state(),
            "label_rng": self.label_gen.get_state(),
            "eval": self.evaluator.state_dict(),
            "wandb_run_id": self.wandb_run_id,
        }

    def save(self, blocking: bool = True) -> str:
        """Checkpoint the current step (in the background if configured and not ``blocking``)."""
        meta = {"step": self.step, "images_seen": self.images_seen, "config": self.config.to_dict()}
        return self.checkpoints.save(self.step, self.sharded_state(), self.local_state(), meta, blocking)

    def restore(self, resume: str = "auto") -> str | None:
        """Load the checkpoint ``resume`` names (`CheckpointManager.restore`); its folder, or None if none."""
        restored = self.checkpoints.restore(resume, self.sharded_state())
        if restored is None:
            return None
        folder, local = restored
        self.step, self.images_seen = local["step"], local["images_seen"]
        self.nonfinite_total, self.nonfinite_run = local["nonfinite_total"], local["nonfinite_run"]
        try:
            self.loader.load_state_dict(local["data"])
        except ValueError as err:
            raise CheckpointError(f"{folder}: {err}") from None
        self.batches_drawn = local.get("batches_drawn", self.step)  # older checkpoints: one batch a step
        if "rollback" in local:
            self.rollback.load_state_dict(local["rollback"])
        self.noise_gen.set_state(local["noise_rng"])
        self.label_gen.set_state(local["label_rng"])
        if "eval" in local:  # checkpoints written before evaluation existed lack these
            self.evaluator.load_state_dict(local["eval"])
        self.wandb_run_id = local.get("wandb_run_id", "")
        return folder

    # ---- one step -----------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        o = self.config.optim
        return o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else o.lr

    def train_step(self, batch: dict, stop_requested: bool) -> dict:
        """One optimizer step; returns its statistics (identical on every rank)."""
        dev = self.world.device
        self.batches_drawn += 1
        x1 = poison(batch["latents"], self.batches_drawn, self.config.rollback).to(dev, non_blocking=True)
        y = batch["labels"].to(dev, non_blocking=True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        terms = self.transport.training_losses(self.model, x1, self.noise_gen, y=y, label_generator=self.label_gen)
        losses = terms["loss"]
        losses.mean().backward()
        # This rank's gradient shards: their squared norms add up over ranks to the global one.
        grads = [local_tensor(p.grad) for p in self.model.parameters() if p.grad is not None]
        grad_sq = torch.stack(torch._foreach_norm(grads)).double().square().sum()
        losses = losses.detach()
        finite = torch.isfinite(losses)
        safe = torch.where(finite, losses, 0.0)
        f64 = {"dtype": torch.float64, "device": dev}
        bins = self.config.log.time_bins
        parts = [k for k in LOSS_PARTS if k in terms]  # the loss's terms when it has several (transport.loss_terms)
        part_sums = [time_bin_sums(torch.where(finite, terms[k].detach(), 0.0), terms["t"], bins)[:bins] for k in parts]
        # one all-reduce: [loss sum, count, non-finite count, stop flag, grad norm^2, loss sums by t bin, counts by bin,
        # then each part's sums by t bin]
        stats = torch.cat(
            [
                safe.double().sum().view(1),
                torch.tensor([len(losses)], **f64),
                (~finite).sum().double().view(1),
                torch.tensor([stop_requested], **f64),
                grad_sq.view(1),
                time_bin_sums(safe, terms["t"], bins),
                *part_sums,
            ]
        )
        if self.world.world_size > 1:
            dist.all_reduce(stats)
        stats = stats.cpu()
        grad_norm = math.sqrt(float(stats[4]))
        max_norm = self.config.optim.max_grad_norm
        if max_norm and grad_norm > max_norm:
            torch._foreach_mul_(grads, max_norm / (grad_norm + 1e-6))
        ok = stats[2] == 0 and math.isfinite(grad_norm)
        count = int(stats[1])
        if self.config.rollback.enabled:
            loss = float(stats[0] / count) if ok else math.nan
            spike = self._spike(loss, ok)
            if spike is not None:
                self.optimizer.zero_grad(set_to_none=True)
                return {"rollback": True, "stop": bool(stats[3] > 0), **spike}
            self.rollback.accept(loss)
        if ok:
            self.optimizer.step()
            self.ema.update(self.model)
            self.nonfinite_run = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.images_seen += count
        if self.nonfinite_run >= self.config.max_nonfinite:
            raise NonFiniteLossError(
                f"step {self.step}: {self.nonfinite_run} consecutive steps with a non-finite loss or gradient norm "
                f"(max_nonfinite={self.config.max_nonfinite}); last good checkpoint under {self.checkpoints.url}"
            )
        bin_sums, bin_counts = stats[5 : 5 + bins], stats[5 + bins : 5 + 2 * bins]
        out = {
            "loss": float(stats[0] / max(count - stats[2], 1)) if ok else math.nan,
            "grad_norm": grad_norm,
            "lr": self.lr_at(self.step - 1),
            "skipped": not ok,
            "stop": bool(stats[3] > 0),
            "images": count,
        }
        for i in range(bins):
            if bin_counts[i] > 0:
                out[f"loss_t{i}"] = float(bin_sums[i] / bin_counts[i])
        for j, part in enumerate(parts):
            sums = stats[5 + (2 + j) * bins : 5 + (3 + j) * bins]
            out[part] = float(sums.sum() / max(count - stats[2], 1)) if ok else math.nan
            for i in range(bins):
                if bin_counts[i] > 0:
                    out[f"{part}_t{i}"] = float(sums[i] / bin_counts[i])
        return out

    def _spike(self, loss: float, finite: bool) -> dict | None:
        """The spike this step is (trainer.rollback), or None: the same on every rank without a
        collective, as ``loss`` and ``finite`` come from the all-reduced statistics."""
        reason = self.rollback.check(loss, finite)
        if reason is None:
            return None
        median = self.rollback.median()
        return {"spike_step": self.step + 1, "reason": reason, "spike_loss": loss, "median": median}


def _progress(config: TrainConfig, world: World, initial: int):
    if not (world.is_main and config.log.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=config.total_steps, initial=initial, unit="step", dynamic_ncols=True)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; collective when started under torchrun."""
    world = init_world(config.parallel.backend)
    ok = False
    try:
        with warnings.catch_warnings():
            # SiT returns a view (its first `in_channels` outputs with learn_sigma); nothing modifies it in place
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            result = _run(config, world)
        ok = True
        return result
    finally:
        if ok:
            close_world()
        elif dist.is_initialized():
            dist.destroy_process_group()


def _run(config: TrainConfig, world: World) -> TrainResult:
    c = config
    run_dir = Path(c.run_dir)
    if c.log.wandb:  # a missing optional package fails before any work (rank 0 logs; every rank checks)
        from trainer.wandb_log import require_wandb

        require_wandb()
    with PreemptionFlag() as flag:  # before the DataLoader forks its workers
        trainer = Trainer(c, world)
        resumed_from = trainer.restore(c.checkpoint.resume)
        if c.rollback.enabled and resumed_from != step_folder(trainer.checkpoints.url, trainer.step):
            trainer.save()  # a checkpoint to roll back to before the first periodic one
        metrics = None
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=1) + "\n")
            sink = None
            if c.log.wandb:
                from trainer.wandb_log import WandbLog

                sink = WandbLog(c, trainer.wandb_run_id)
                trainer.wandb_run_id = sink.run_id
            metrics = MetricsLog(str(run_dir), c.log.tensorboard, sink)
            if resumed_from:
                metrics.write(trainer.step, {"event": "resumed", "from": resumed_from})
        bar = _progress(c, world, trainer.step)
        last_loss, last_ckpt, exit_code = math.nan, None, 0
        window_images, window_start, window_steps = 0, time.perf_counter(), 0
        try:
            while trainer.step < c.total_steps:
                for batch in trainer.loader:
                    stats = trainer.train_step(batch, flag.requested)
                    if stats.get("rollback"):
                        event = roll_back(trainer, stats)
                        if metrics is not None:
                            metrics.write(stats["spike_step"], event)
                        if bar is not None:
                            bar.n = trainer.step
                        break  # on from the reader's new position (a preemption request is seen next step)
                    last_loss = stats["loss"]
                    window_images += stats["images"]
                    window_steps += 1
                    step = trainer.step
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{last_loss:.4f}")
                    if step % c.log.every == 0 and metrics is not None:
                        elapsed = time.perf_counter() - window_start
                        ips = window_images / elapsed
                        record = {k: v for k, v in stats.items() if k not in ("stop", "images")}
                        record.update(
                            images_per_s=ips,
                            step_time_s=elapsed / window_steps,
                            mfu=mfu(trainer.model_config, ips, world.world_size, c.log.peak_tflops),
                            peak_memory_bytes=peak_memory_bytes(world.device),
                            images_seen=trainer.images_seen,
                            nonfinite_steps=trainer.nonfinite_total,
                        )
                        metrics.write(step, record)
                    if step % c.log.every == 0:
                        window_images, window_start, window_steps = 0, time.perf_counter(), 0
                    side_start = time.perf_counter()  # grids and evaluation are not training time
                    if c.log.sample_every and step % c.log.sample_every == 0:
                        grid = run_dir / "samples" / f"step-{step:09d}.png"
                        draw_preview(trainer, grid)
                        if metrics is not None and metrics.wandb is not None:
                            metrics.wandb.image(step, "samples", grid)
                    if trainer.evaluator.due(step) and not stats["stop"]:  # a stopping run evaluates after resuming
                        evaluate(trainer, metrics, step)
                    window_start += time.perf_counter() - side_start
                    final = stats["stop"] or step >= c.total_steps
                    if final or step % c.checkpoint.every == 0:
                        last_ckpt = trainer.save(blocking=final)
                    if stats["stop"]:
                        exit_code = EXIT_PREEMPTED
                        if metrics is not None:
                            metrics.write(step, {"event": "preempted", "checkpoint": last_ckpt})
                        break
                    if step >= c.total_steps:
                        break
                if exit_code:
                    break
            export = None
            if exit_code == 0 and c.export:
                export = c.export_url or str(run_dir / "ema.safetensors")
                export_ema(trainer, export)
        finally:
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
                if metrics.wandb is not None:
                    metrics.wandb.finish(exit_code)
    return TrainResult(
        exit_code,
        trainer.step,
        trainer.images_seen,
        last_loss,
        trainer.nonfinite_total,
        resumed_from,
        last_ckpt,
        export,
        trainer.rollback.events,
    )


def evaluate(trainer: Trainer, metrics: MetricsLog | None, step: int) -> None:
    """One evaluation point (collective): log it on rank 0; replace the best export if it improved."""
    values = trainer.evaluator.run(step)
    improved = values.pop("improved")
    if improved and trainer.config.export:
        export_ema(
            trainer, best_export_url(trainer.config), {"eval": {"step": step, "latent_fd": values["eval_latent_fd"]}}
        )
    if metrics is not None:
        metrics.write(step, {"event": "eval", **values})


def export_ema(trainer: Trainer, url: str, more: dict | None = None) -> None:
    """Gather the EMA on rank 0 and write the consolidated export there (collective)."""
    state = trainer.ema.full_state_dict()
    if trainer.world.is_main:
        card = trainer.dataset.card
        extra = {
            "step": trainer.step,
            "images_seen": trainer.images_seen,
            "dataset": trainer.config.data.url,
            "vae": card.vae,
            # the one record of the autoencoder and transform `sit sample` decodes with
            "autoencoder": {**card.autoencoder, "name": card.vae},
            "latent_transform": trainer.transform.to_dict(),
            "stored_latent_shape": list(card.latent_shape),
            "resolution": card.resolution,
            "transport": trainer.config.to_dict()["transport"],
            **(more or {}),
        }
        retry(lambda: save_export(url, state, trainer.model_config, extra), f"writing {url}")


if __name__ == "__main__":
    from trainer.cli import train_main

    sys.exit(train_main())
