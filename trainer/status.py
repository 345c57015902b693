"""`sit status RUN_DIR_OR_URL`: one screen about a running or finished training run, read from its
files alone (no process attached; any fsspec URL, so a run directory synced to object storage
works too).

Read: ``config.json`` (total steps, batch size, checkpoint URL), ``metrics.jsonl`` (the newest
training line: step, images seen, images/s, MFU; the evaluation points; preemption and resume
events), the checkpoint folder (the newest step folder with its completion marker - listed, not
verified: `sit train` verifies before loading) and the EMA exports. The checkpoint URL is the
config's ``checkpoint.url``, or ``<RUN_DIR_OR_URL>/checkpoints`` when that is empty (the run
directory may have been moved or synced since). ETA: the steps left at the newest line's speed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field


class StatusError(FileNotFoundError):
    """Not a training run directory (or none at all); the message names it."""


@dataclass
class RunStatus:
    url: str
    total_steps: int
    global_batch_size: int
    step: int = 0
    images_seen: int = 0
    images_per_s: float | None = None
    mfu: float | None = None
    last_time: float | None = None  # unix time of the newest metrics line
    state: str = "not started"  # not started | running | preempted | finished
    last_eval: dict | None = None
    best_eval: dict | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    exports: dict[str, str] = field(default_factory=dict)

    @property
    def eta_seconds(self) -> float | None:
        if self.step >= self.total_steps:
            return 0.0
        if not self.images_per_s:
            return None
        return (self.total_steps - self.step) * self.global_batch_size / self.images_per_s


def _records(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return out


def read_status(url: str, storage_options: dict | None = None) -> RunStatus:
    """The status of the run directory at ``url``; `StatusError` if it is not one."""
    import fsspec

    from trainer.checkpoint import CheckpointManager, step_folder

    url = url.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    try:
        config = json.loads(fs.cat_file(f"{path}/config.json"))
    except FileNotFoundError:
        if not fs.exists(path):
            raise StatusError(f"{url}: no such run directory") from None
        raise StatusError(f"{url}: not a training run directory (no config.json written by `sit train`)") from None
    except json.JSONDecodeError as err:
        raise StatusError(f"{url}/config.json: not valid JSON ({err})") from None
    if not isinstance(config, dict) or "total_steps" not in config or "checkpoint" not in config:
        raise StatusError(f"{url}/config.json: not a `sit train` config (no total_steps / checkpoint)")
    status = RunStatus(url, config["total_steps"], config.get("data", {}).get("global_batch_size", 0))
    try:
        records = _records(fs.cat_file(f"{path}/metrics.jsonl").decode())
    except FileNotFoundError:
        records = []
    for r in records:
        if "loss" in r:
            status.step, status.images_seen = r["step"], r.get("images_seen", status.images_seen)
            status.images_per_s, status.mfu = r.get("images_per_s"), r.get("mfu")
            status.state = "running"
        elif r.get("event") == "eval":
            status.last_eval = r
            if status.best_eval is None or r["eval_latent_fd"] < status.best_eval["eval_latent_fd"]:
                status.best_eval = r
        elif r.get("event") == "preempted":
            status.state = "preempted"
        elif r.get("event") == "resumed":
            status.state = "running"
        status.last_time = r.get("time", status.last_time)
    checkpoints = config["checkpoint"].get("url") or f"{url}/checkpoints"
    manager = CheckpointManager(checkpoints, storage_options=storage_options)
    complete = manager.complete_steps()
    if complete:
        status.checkpoint_step = complete[-1]
        status.checkpoint = step_folder(manager.url, complete[-1])
        meta = _marker_meta(manager, status.checkpoint)
        if meta.get("step", 0) > status.step:  # newer than the newest metrics line (log.every > checkpoint.every)
            status.step, status.images_seen = meta["step"], meta.get("images_seen", status.images_seen)
    last = config.get("export_url") or f"{url}/ema.safetensors"
    from trainer.evaluate import best_export_url

    best = best_export_url(argparse.Namespace(export_url=config.get("export_url"), run_dir=url))
    for name, export in (("last", last), ("best", best)):
        efs, epath = fsspec.core.url_to_fs(export, **(storage_options or {}))
        if efs.exists(epath):
            status.exports[name] = export
    if status.step >= status.total_steps and "last" in status.exports:
        status.state = "finished"
    return status


def _marker_meta(manager, folder: str) -> dict:
    from trainer.checkpoint import MARKER

    try:
        return json.loads(manager.fs.cat_file(f"{manager._path(folder)}/{MARKER}")).get("meta", {})
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def _eval(r: dict) -> str:
    text = f"step {r['step']:,}: latent FD {r['eval_latent_fd']:.4g}"
    if "eval_fid" in r:
        text += f", FID {r['eval_fid']:.4g}"
    return text + f" ({r['eval_images']:,} images, {r['eval_seconds']:.1f} s)"


def format_status(s: RunStatus, now: float | None = None) -> str:
    now = time.time() if now is None else now
    state = s.state
    if state == "running" and s.last_time is not None:
        state = f"running or stopped (newest line {_duration(now - s.last_time)} ago)"
    elif state == "preempted":
        state = "preempted (a restart resumes from the checkpoint)"
    pct = 100.0 * s.step / s.total_steps if s.total_steps else 0.0
    lines = [
        f"run         {s.url}",
        f"state       {state}",
        f"step        {s.step:,} / {s.total_steps:,} ({pct:.1f}%)",
        f"images      {s.images_seen:,} seen",
    ]
    if s.images_per_s is not None:
        steps = f", {s.images_per_s / s.global_batch_size:.2f} steps/s" if s.global_batch_size else ""
        mfu = f", MFU {100 * s.mfu:.3g}%" if s.mfu is not None and math.isfinite(s.mfu) else ""
        lines.append(f"speed       {s.images_per_s:,.1f} images/s{steps}{mfu}")
    lines.append(f"eval last   {_eval(s.last_eval) if s.last_eval else 'none'}")
    lines.append(f"eval best   {_eval(s.best_eval) if s.best_eval else 'none'}")
    ckpt = f"{s.checkpoint} (step {s.checkpoint_step:,})" if s.checkpoint else "none complete"
    lines.append(f"checkpoint  {ckpt}")
    exports = ", ".join(f"{k} {v}" for k, v in s.exports.items()) or "none yet"
    lines.append(f"export      {exports}")
    eta = s.eta_seconds
    lines.append(f"ETA         {'done' if eta == 0 else _duration(eta) if eta is not None else 'unknown'}")
    return "\n".join(lines)


def status(args: argparse.Namespace) -> int:
    from latents.artifacts import Kind, require_input

    require_input(args.run, Kind.TRAIN_RUN, "RUN_DIR_OR_URL")  # one line for a file, a dataset, a bad URL
    print(format_status(read_status(args.run)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status",
        help="one screen about a training run: step, speed, evals, checkpoint, ETA (from its files)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN_DIR_OR_URL", help="the run directory (--run-dir of sit train; any URL)")
    p.set_defaults(func=status)
