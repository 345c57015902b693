"""The steps of `sit demo` (see cluster/demo.py): each calls the real job's library entry point."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from cluster.demo import GRID_COLUMNS, IMAGE_SIZE, RESOLUTION, DemoError, DemoSize, chunk_latents, run_trainer
from cluster.demo_data import class_names
from latents.words import plural

MAX_REJECT_FRACTION = 0.01  # the demo plants 2 broken files among a few hundred or thousand


def make_images(out: Path, size: DemoSize, log) -> dict:
    from cluster.demo_data import write_shapes

    folder = out / "images"
    done = folder / "DONE.json"
    if done.exists() and json.loads(done.read_text())["per_class"] == size.per_class:
        info = json.loads(done.read_text())
        log(f"1/5 images: reusing {info['good']} images + {info['broken']} broken files in {folder}")
        return info
    log(f"1/5 images: drawing {size.per_class} shapes per class for {len(class_names())} classes into {folder}")
    images = write_shapes(str(folder), size.per_class, IMAGE_SIZE)
    broken = [im.name for im in images if im.broken]
    info = {"per_class": size.per_class, "good": len(images) - len(broken), "broken": len(broken), "files": broken}
    log(f"    {info['good']} good images ({IMAGE_SIZE}x{IMAGE_SIZE} JPEG) and broken files {', '.join(broken)}")
    done.write_text(json.dumps(info))
    return info


def make_vae(out: Path, size: DemoSize, log) -> Path:
    from cluster.demo_data import fit_vae, images_tensor, shape_images

    vae_dir = out / "vae"
    if (vae_dir / "config.json").exists():
        log(f"2/5 vae: reusing the VAE fitted earlier in {vae_dir}")
        return vae_dir
    log(
        "2/5 vae: the SD VAE cannot be downloaded here, so a small diffusers AutoencoderKL is fitted to "
        f"these images ({size.vae_steps} steps); the pipeline then uses it exactly as the SD VAE"
    )
    images = images_tensor(shape_images(size.per_class, IMAGE_SIZE), RESOLUTION)
    fit_vae(images, vae_dir, steps=size.vae_steps, log=log)
    return vae_dir


def encode(out: Path, vae_dir: Path, address: str | None, log) -> dict:
    from pipeline.job import EncodeConfig, run_encode

    dest = out / "latents"
    log(f"3/5 encode: Ray job `sit encode {out / 'images'} {dest} --resolution {RESOLUTION} --vae {vae_dir}`")
    summary = run_encode(
        EncodeConfig(
            source=str(out / "images"),
            dest=str(dest),
            resolution=RESOLUTION,
            vae=str(vae_dir),
            shard_size=256,
            micro_batch=64,
            max_reject_fraction=MAX_REJECT_FRACTION,
            address=address,
            progress=False,
        )
    )
    log(f"    {summary.format()}")
    return {
        "url": str(dest),
        "encoded": summary.encoded,
        "rejected": summary.rejected,
        "rejects": summary.rejects_by_reason,
        "shards": summary.shards,
    }


def train(out: Path, size: DemoSize, encoded: dict, log) -> dict:
    from trainer.export import save_export
    from trainer.model import SiT
    from trainer.preempt import EXIT_PREEMPTED

    run_dir = out / "run"
    metrics = run_dir / "metrics.jsonl"
    args = ["--preset", "tiny-cpu", "--data", encoded["url"], "--run-dir", str(run_dir)]
    args += ["--steps", str(size.train_steps)]
    overrides = {
        "model.num_classes": len(class_names()),
        "model.depth": 4,
        "model.hidden_size": 128,
        "checkpoint.every": size.checkpoint_every,
        "optim.lr": 1e-3,
        "optim.ema_decay": 0.995,
        "data.global_batch_size": 64,
        "log.every": 1,
        # evaluation while training: latent FD of the EMA's samples (a second or two per point here)
        "log.eval_every": max(1, size.train_steps // 4),
        "log.eval_samples": size.samples_per_class * len(class_names()),
        "log.eval_steps": 50,
        "log.tensorboard": "false",
        "log.progress": "false",
    }
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    half = size.train_steps // 2
    stopped_at = resumed_at = None
    if (run_dir / "ema.safetensors").exists():
        log(f"4/5 train: reusing the finished run in {run_dir}")
    else:
        log(f"4/5 train: `python -m trainer.train {' '.join(args)}`")
        log(f"    training to step {size.train_steps}; it will be interrupted at step {half} and resumed")
        code = run_trainer(args, log, interrupt_at=half, metrics=metrics)
        if code == 0 and (run_dir / "ema.safetensors").exists():
            log("    (finished before the interrupt arrived)")
        elif code != EXIT_PREEMPTED:
            raise DemoError(f"the trainer failed with exit code {code}; see {run_dir} and the output above")
        else:
            events = [json.loads(line) for line in metrics.read_text().splitlines()]
            stopped = next(e for e in reversed(events) if e.get("event") == "preempted")
            stopped_at = stopped["step"]
            log(f"    stopped at step {stopped_at}: checkpoint {stopped['checkpoint']} written, exit code 75")
            log("    restarting the same command: it resumes from the newest complete checkpoint")
            code = run_trainer(args, log, interrupt_at=None, metrics=metrics)
            if code != 0:
                raise DemoError(f"the resumed trainer failed with exit code {code}")
            resumed = [json.loads(line) for line in metrics.read_text().splitlines() if '"resumed"' in line]
            resumed_at = resumed[-1]["step"]
            log(f"    resumed at step {resumed_at} and finished at step {size.train_steps}")
    config = json.loads((run_dir / "config.json").read_text())
    untrained = out / "untrained.safetensors"
    if not untrained.exists():  # the model as the trainer initialises it, for the "before" numbers
        import torch

        from trainer.config import config_from_dict

        model_config = config_from_dict(config).model.sit_config()
        torch.manual_seed(config["seed"])
        model = SiT(model_config)
        save_export(str(untrained), model.state_dict(), model_config, {"step": 0})
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_latent_fd"], r["eval_seconds"]) for r in records if r.get("event") == "eval"]
    if evals:
        log("    latent FD of the EMA during training: " + ", ".join(f"step {s} {fd:.2f}" for s, fd, _ in evals))
    return {
        "run_dir": str(run_dir),
        "export": str(run_dir / "ema.safetensors"),
        "untrained": str(untrained),
        "losses": losses,
        "evals": evals,
        "best_export": str(run_dir / "ema-best.safetensors"),
        "interrupted_at": stopped_at,
        "resumed_at": resumed_at,
    }


def sample(out: Path, size: DemoSize, vae_dir: Path, trained: dict, address: str | None, log) -> dict:
    from sampling.job import SampleJob, run_sample_job
    from sampling.options import SamplerOptions
    from sampling.plan import ClassPolicy

    n = size.samples_per_class * len(class_names())
    results = {}
    for name, ckpt in (("untrained", trained["untrained"]), ("trained", trained["export"])):
        dest = out / f"samples-{name}"
        log(f"5/5 sample: Ray job `sit sample {ckpt} {dest} --num-samples {n} --class-policy balanced` ({name})")
        job = SampleJob(
            source=_model_source(ckpt, vae_dir),
            out=str(dest),
            options=SamplerOptions(),  # the released defaults: 250-step Euler-Maruyama SDE
            num_samples=n,
            seed=0,
            class_policy=ClassPolicy.BALANCED,
            chunk_size=max(64, n // 4),
            batch_size=64,
            save_latents=True,
            address=address,
            progress=False,
        )
        summary = run_sample_job(job)
        counts = f"{plural(summary.num_samples, 'sample')} in {plural(summary.chunks, 'chunk')}"
        log(f"    {counts} ({summary.skipped} reused), {summary.npz}")
        results[name] = str(dest)
    return results


def _model_source(ckpt: str, vae_dir: Path):
    from sampling.generate import ModelSource

    return ModelSource(checkpoint=ckpt, vae=str(vae_dir))


def data_latents(url: str) -> np.ndarray:
    """One epoch of the training data as the trainer sees it (scaled, posterior sample, random flip)."""
    from latents.reader import LatentDataset, LatentLoader

    loader = LatentLoader(LatentDataset(url, batch_size=64, seed=1))
    return np.concatenate([batch["latents"].numpy() for batch in loader])


def latent_fd(a: np.ndarray, b: np.ndarray) -> float:
    from sampling.fid import Statistics, frechet_distance

    sa, sb = Statistics.of(a.reshape(len(a), -1)), Statistics.of(b.reshape(len(b), -1))
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


def write_report(
    out: Path, size: DemoSize, images: dict, encoded: dict, trained: dict, sampled: dict, timings: dict, log
) -> Path:
    from cluster.plot import line_plot, moving_average
    from latents.pictures import image_grid
    from sampling.image_sources import read_npz_arrays

    report = out / "report"
    report.mkdir(exist_ok=True)
    data = data_latents(encoded["url"])
    fd = {name: latent_fd(chunk_latents(root)[0], data) for name, root in sampled.items()}
    log(f"latent Fréchet distance to the data: untrained {fd['untrained']:.2f}, trained {fd['trained']:.2f}")

    arrays = read_npz_arrays(str(Path(sampled["trained"]) / "samples.npz"), ("arr_0",))
    samples, labels = arrays["arr_0"], np.load(Path(sampled["trained"]) / "labels.npy")
    names = class_names()
    rows = [samples[labels == k][:GRID_COLUMNS] for k in range(len(names))]
    grid = image_grid(np.concatenate(rows), nrow=GRID_COLUMNS, row_labels=names)
    grid = grid.resize((grid.width * 2, grid.height * 2), 0)
    grid.save(report / "grid.png")

    steps, losses = np.array(trained["losses"]).T
    window = max(1, min(50, len(losses) // 4))
    marks = {"interrupted / resumed": trained["interrupted_at"]} if trained["interrupted_at"] else None
    line_plot(
        steps,
        {"loss": losses, f"mean of {window} steps": moving_average(losses, window)},
        report / "loss.png",
        "SiT training loss (Linear path, velocity prediction)",
        "step",
        "loss",
        marks,
    )
    summary = {
        "machine": f"{platform.machine()}, {platform.system()}, {os.cpu_count()} CPUs",
        "size": size.__dict__,
        "images": {k: images[k] for k in ("good", "broken", "files")},
        "encode": encoded,
        "train": {k: v for k, v in trained.items() if k not in ("losses", "evals")}
        | {
            "loss_window": window,
            "first_loss": float(losses[:window].mean()),
            "last_loss": float(losses[-window:].mean()),
            "eval": [{"step": s, "latent_fd": fd, "seconds": sec} for s, fd, sec in trained.get("evals", [])],
        },
        "latent_frechet_distance": fd,
        "fd_ratio_trained_over_untrained": fd["trained"] / fd["untrained"],
        "seconds": timings,
        "files": sorted({p.name for p in report.iterdir()} | {"summary.json", "summary.md"}),
    }
    (report / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (report / "summary.md").write_text(_markdown(summary))
    return report


def _stopped(train: dict) -> str:
    if train["interrupted_at"] is None:
        return "reused the run finished by an earlier `sit demo` into this folder"
    return (
        f"stopped by SIGTERM at step {train['interrupted_at']} (checkpoint written, exit 75), "
        f"resumed at step {train['resumed_at']}"
    )


def _evals(train: dict) -> str:
    if not train["eval"]:
        return ""
    points = ", ".join(f"step {e['step']} {e['latent_fd']:.2f} ({e['seconds']:.1f} s)" for e in train["eval"])
    return f"\n   Latent FD of the EMA during training: {points}; best export `{train['best_export']}`."


def _markdown(s: dict) -> str:
    t = s["seconds"]
    return f"""# sit demo

Ran on {s["machine"]} in {sum(t.values()):.0f} s ({", ".join(f"{k} {v:.0f} s" for k, v in t.items())}).

1. **images**: {s["images"]["good"]} coloured-shape images in the ImageNet folder layout, plus broken
   files {", ".join(s["images"]["files"])}.
2. **vae**: a small AutoencoderKL fitted to them (stands in for the SD VAE, which is not downloadable here).
3. **encode** (Ray job): {s["encode"]["encoded"]} encoded + {s["encode"]["rejected"]} rejected
   ({s["encode"]["rejects"]}) in {s["encode"]["shards"]} shards at `{s["encode"]["url"]}`.
4. **train**: {_stopped(s["train"])}; loss {s["train"]["first_loss"]:.3f} (first {s["train"]["loss_window"]} steps)
   -> {s["train"]["last_loss"]:.3f} (last {s["train"]["loss_window"]}); EMA export
   `{s["train"]["export"]}`.{_evals(s["train"])}
5. **sample** (Ray job): latent Fréchet distance to the data {s["latent_frechet_distance"]["untrained"]:.2f}
   untrained -> {s["latent_frechet_distance"]["trained"]:.2f} trained
   (ratio {s["fd_ratio_trained_over_untrained"]:.2f}).

Files in report/: {", ".join(s["files"])}.
"""
