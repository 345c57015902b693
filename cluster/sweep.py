"""`sit sweep`: a design-space study as one command - train every point of a grid of `sit train`
overrides, sample each EMA with `sit sample`'s job under every sampler setting, and rank them by
the latent Fréchet distance to the data (and FID with --inception and --ref).

A point is the base config (--preset, --config, --set, as `sit train` takes them) with one value
of each --grid key; every (point, sampler) pair is one row of the table. --paper runs the SiT
paper's design space (Ma et al. 2024, sections 3.1-3.4): path VP, GVP, Linear x prediction
noise, score, velocity (9 trainings, loss weight none), each sampled with the probability-flow
ODE (Euler) and the SDE (Euler-Maruyama) under the diffusion forms SBDM, sigma, linear,
decreasing and increasing-decreasing (norm 1; the released code's scaling, half the paper's w_t).

Layout of --out (nothing is shared between different configs: folders are named by hashes):

    points/<config hash>/point.json      the resolved `sit train` config and the grid values
    points/<config hash>/train/          the run directory of `sit train` (checkpoints, EMA export)
    points/<config hash>/<eval hash>/    `sit sample`'s output and result.json (published last,
                                         atomically); the eval hash covers the config hash, the
                                         sampler settings, sample count, seed and reference
    sweep.json, sweep.md, sweep.png, sweep.log

Rerunning the same command skips every finished row (its result.json exists) and trains only
unfinished points; a half-trained point resumes through the trainer's own checkpoint resume, a
half-sampled one through the sample job's committed chunks.

Where it runs. By default every point trains on this machine, one after the other
(`python -m trainer.train`), and samples in this process. With --address, every point's
training is a Ray task on that cluster (--train-gpus per point, torchrun when more than one), so
the points train side by side, as many at once as the cluster has room for; each point is
sampled with `sit sample`'s Ray job once its training is done. A point trains in the sweep's
working directory either way (relative paths mean the same), to the same model on the same kind
of device, ranks and threads (Ray gives a task OMP_NUM_THREADS = its --train-cpus); sample i
depends on the seed and i alone. On a multi-node cluster, --out and the working directory must
be on a filesystem that every node mounts (the points' run folders live there).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from latents.argtypes import USAGE_ERROR, positive_int

PAPER_GRID = (  # the released recipe (Linear, velocity) first
    ("transport.path_type", ("Linear", "GVP", "VP")),
    ("transport.prediction", ("velocity", "score", "noise")),
)
PAPER_SAMPLERS = "ode,sde:SBDM,sde:sigma,sde:linear,sde:decreasing,sde:increasing-decreasing"
RESULT_FILE = "result.json"


class SweepUsageError(ValueError):
    """A bad --grid, --set or --samplers value; ``flag`` names it (exit status 2)."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"argument {flag}: {message}")


@dataclass(frozen=True)
class Sampler:
    """One sampler setting of the sweep: a label and the `sit sample` options it stands for."""

    label: str
    options: object  # sampling.options.SamplerOptions


@dataclass
class Point:
    """One grid point: its values, the resolved train config and where it lives."""

    values: dict[str, str]
    config: object  # trainer.config.TrainConfig, run_dir set to <dir>/train
    key: str  # hash of the resolved config (run_dir excluded)
    dir: Path


@dataclass
class Row:
    """One (point, sampler) pair: a line of the table, its folder and, once done, its result."""

    point: Point
    sampler: Sampler
    key: str
    dir: Path
    result: dict | None = None
    reused: bool = False
    error: str = ""


@dataclass
class Plan:
    points: list[Point]
    samplers: list[Sampler]
    rows: list[Row] = field(default_factory=list)


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


# ---- parsing the command line (each error names its flag) --------------------------------------------


def parse_grid(texts: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """['transport.path_type=Linear,GVP', ...] -> [(key, values), ...] in the given order."""
    grid = []
    for text in texts:
        key, sep, values = text.partition("=")
        items = tuple(v.strip() for v in values.split(","))
        if not sep or not key.strip() or not all(items):
            raise SweepUsageError("--grid", f"{text!r} is not KEY=V1,V2,... (e.g. transport.path_type=Linear,VP)")
        if key.strip() in (k for k, _ in grid):
            raise SweepUsageError("--grid", f"key {key.strip()!r} given twice")
        grid.append((key.strip(), items))
    return grid


def parse_samplers(text: str, steps: int) -> list[Sampler]:
    """'ode,ode:heun,sde:sigma,sde:linear:0.5' -> samplers with ``steps`` steps each.

    ode[:METHOD] is the probability-flow ODE (default Euler, fixed steps); sde:FORM[:NORM] the
    SDE with Euler-Maruyama, diffusion form FORM and norm NORM (default 1), last step Mean.
    """
    from latents.argtypes import parse_choice
    from sampling.options import Mode, SamplerOptions
    from sampling.sde import DiffusionForm

    out = []
    for spec in (s.strip() for s in text.split(",")):
        kind, _, rest = spec.partition(":")
        try:
            if kind.lower() == "ode":
                method = (rest or "euler").lower()
                options = SamplerOptions(mode=Mode.ODE, method=method, num_steps=steps)
                label = f"ODE {method}"
            elif kind.lower() == "sde" and rest:
                form, _, norm = rest.partition(":")
                options = SamplerOptions(
                    num_steps=steps,
                    diffusion_form=parse_choice(DiffusionForm, form),
                    diffusion_norm=float(norm) if norm else 1.0,
                )
                label = f"SDE {options.diffusion_form.value}" + (f" n={norm}" if norm else "")
            else:
                raise ValueError("expected ode[:METHOD] or sde:FORM[:NORM]")
        except ValueError as err:
            raise SweepUsageError("--samplers", f"{spec!r}: {' '.join(str(err).split())}") from None
        if any(s.label == label for s in out):
            raise SweepUsageError("--samplers", f"{spec!r} given twice")
        out.append(Sampler(label, options))
    return out


def plan_sweep(args: argparse.Namespace) -> Plan:
    """Resolve every point's config (a bad key or value raises naming --grid or --set)."""
    from trainer.config import ConfigError, resolve

    if args.run_dir:
        raise SweepUsageError("--run-dir", "each point trains in its own folder under --out")
    for flag, value in (("--train-gpus", args.train_gpus), ("--train-cpus", args.train_cpus)):
        if value is not None and not args.address:
            raise SweepUsageError(flag, "needs --address: without a Ray cluster the points train here, one at a time")
        if value is not None and not (value >= 0 if flag == "--train-gpus" else value > 0):
            raise SweepUsageError(flag, f"must be {'>= 0' if flag == '--train-gpus' else '> 0'}, not {value}")
    if bool(args.inception) != bool(args.ref):
        raise SweepUsageError("--inception" if args.ref else "--ref", "FID needs both --inception and --ref")
    grid = list(PAPER_GRID) if args.paper else []
    for key, values in parse_grid(args.grid):
        if args.paper and key in dict(PAPER_GRID):
            raise SweepUsageError("--grid", f"{key} is set by --paper")
        grid.append((key, values))
    samplers = parse_samplers(args.samplers or (PAPER_SAMPLERS if args.paper else "ode"), args.sample_steps)
    base = (
        list(args.overrides)
        + [f"data.url={args.data}"] * bool(args.data)
        + [f"total_steps={args.steps}"] * bool(args.steps)
    )
    try:
        base_config = resolve(args.preset, args.config, base)
    except ConfigError as err:
        raise SweepUsageError("--set", str(err)) from None
    if base_config.checkpoint.url or base_config.export_url:
        raise SweepUsageError("--set", "checkpoint.url and export_url must stay unset: each point keeps its own")
    if not base_config.data.url:
        raise SweepUsageError("--data", "the latent dataset is required (--data URL or --set data.url=URL)")
    points = []
    out = Path(args.out).absolute()  # Ray workers start elsewhere; the hashes exclude run_dir
    for combo in itertools.product(*(values for _, values in grid)):
        values = dict(zip((k for k, _ in grid), combo, strict=True))
        try:
            config = resolve(args.preset, args.config, base + [f"{k}={v}" for k, v in values.items()])
        except ConfigError as err:
            raise SweepUsageError("--grid", str(err)) from None
        config.run_dir = ""
        key = digest(config.to_dict())
        config.run_dir = str(out / "points" / key / "train")
        points.append(Point(values, config, key, out / "points" / key))
    if len({p.key for p in points}) < len(points):
        raise SweepUsageError("--grid", "two grid points resolve to the same config")
    plan = Plan(points, samplers)
    for point in points:
        for sampler in samplers:
            key = digest(
                {
                    "config": point.key,
                    "sampler": sampler.options.describe(),
                    "num_samples": args.num_samples,
                    "seed": args.sample_seed,
                    "reference": args.reference,
                    "inception": args.inception or "",
                    "ref": args.ref or "",
                }
            )
            plan.rows.append(Row(point, sampler, key, point.dir / key))
    return plan


# ---- running ------------------------------------------------------------------------------------------


class Progress:
    """Progress lines with an ETA from the mean time of the trainings and samplings run so far."""

    def __init__(self, out: Path, trains: int, samples: int):
        self.start = time.perf_counter()
        self.file = open(out / "sweep.log", "a")  # noqa: SIM115 - kept open for the run
        self.left = {"train": trains, "sample": samples}
        self.spent: dict[str, list[float]] = {"train": [], "sample": []}
        self.parallel_trainings = False

    def __call__(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def done(self, kind: str, seconds: float | None) -> None:
        self.left[kind] -= 1
        if seconds is not None:
            self.spent[kind].append(seconds)

    def eta(self) -> str:
        """The time left if everything left runs one after the other; with trainings on Ray (side by
        side, ``parallel_trainings``) only the samplings are counted, and the line says so."""
        left = {k: n for k, n in self.left.items() if not (k == "train" and self.parallel_trainings)}
        known = {k: sum(v) / len(v) for k, v in self.spent.items() if v}
        missing = [("training", "sampling")[k == "sample"] for k, n in left.items() if n and k not in known]
        if missing:
            return "ETA after the first " + " and ".join(missing)
        seconds = sum(known.get(k, 0.0) * n for k, n in left.items())
        return f"ETA {seconds / 60:.1f} min" + " of the samplings (trainings run on Ray)" * self.parallel_trainings


class TrainFailed(RuntimeError):
    """The trainer of one point failed; the sweep goes on with the other points."""


def train_command(point: Point, procs: int = 1) -> list[str]:
    """`python -m trainer.train` on the point's config.json, or `cluster.torchrun` with ``procs``
    ranks on this node when more than one."""
    # config.json holds every key, so the preset below it changes nothing
    trainer = ["-m", "trainer.train", "--preset", "tiny-cpu", "--config", str(point.dir / "config.json")]
    if procs > 1:
        return [sys.executable, "-m", "cluster.torchrun", "--standalone", f"--nproc-per-node={procs}", *trainer]
    return [sys.executable, *trainer]


def end_with_parent() -> None:
    """Run in a child between fork and exec: Linux sends it SIGTERM when the process that started
    it dies, even by SIGKILL (a Ray worker killed for memory, a driver killed outright). The
    trainer takes SIGTERM as preemption: it checkpoints and exits 75. Without this it would
    train on as an orphan while a rerun of the sweep starts a second trainer in its folder."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child


_PR_SET_PDEATHSIG = 1
_PRCTL = _libc_prctl()


def train_point(point: Point, procs: int = 1, cwd: str | None = None) -> float | None:
    """Train ``point`` (`train_command`, in ``cwd``: where relative paths of its config are) unless
    its EMA export exists; seconds, or None if it was already trained."""
    from trainer.config import TrainConfig

    config: TrainConfig = point.config
    export = Path(config.run_dir) / "ema.safetensors"
    if export.exists():
        return None
    point.dir.mkdir(parents=True, exist_ok=True)
    _publish(point.dir / "point.json", {"values": point.values, "config_hash": point.key})
    _publish(point.dir / "config.json", config.to_dict())  # the exact resolved config, fed back with --config
    start = time.perf_counter()
    with open(point.dir / "train.log", "a") as out:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = train_command(point, procs)
        done = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, preexec_fn=end_with_parent
        )
        code = done.returncode
    if code != 0 or not export.exists():
        tail = (point.dir / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise TrainFailed(f"exit code {code}: {tail[0]} (log: {point.dir / 'train.log'})")
    return time.perf_counter() - start


def _train_task(point: Point, procs: int, cwd: str) -> tuple[float | None, str]:
    """`train_point` in a Ray task, in the sweep's working directory ``cwd`` (relative --data or
    --set paths mean the same as on the driver): (seconds or None, "") or (None, why it failed)."""
    if not os.path.isdir(cwd):
        return None, (
            f"the sweep's working directory {cwd} is not on node {platform.node()}: "
            "run the sweep from a folder every node mounts"
        )
    try:
        return train_point(point, procs, cwd), ""
    except (TrainFailed, OSError) as err:  # OSError: e.g. --out not writable on that node
        return None, str(err) if isinstance(err, TrainFailed) else f"{type(err).__name__}: {err}"


def start_trainings_on_ray(points: list[Point], args: argparse.Namespace) -> dict:
    """Every point's training as a Ray task on the cluster at --address, all submitted at once:
    they run side by side as the cluster's CPUs and GPUs allow. Returns {point key: object ref}."""
    import ray

    from pipeline.ray_jobs import connect, worker_env

    connect(args.address)
    gpus = args.train_gpus if args.train_gpus is not None else int(ray.cluster_resources().get("GPU", 0) > 0)
    cpus = args.train_cpus or 1.0
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not any(n.get("GPU", 0) >= gpus and n.get("CPU", 0) >= cpus for n in nodes):
        most = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        flag = "--train-gpus" if gpus > most.get("GPU", 0) else "--train-cpus"
        raise SweepUsageError(
            flag,
            f"no node of the Ray cluster at {args.address} has {gpus} GPUs and {cpus:g} CPUs for one training "
            f"(the largest has {most.get('GPU', 0):g} GPUs and {most.get('CPU', 0):g} CPUs)",
        )
    env = worker_env()  # endpoints and regions, never secrets
    task = ray.remote(_train_task).options(
        num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": env} if env else None, max_retries=0
    )  # not retried by Ray, as the jobs' actors are not: rerunning the sweep resumes a failed point
    return {p.key: task.remote(p, max(1, gpus), os.getcwd()) for p in points}


def wait_for_training(ref) -> float | None:
    """The seconds of a point's training on Ray (None: already trained); `TrainFailed` if it failed."""
    import ray

    from pipeline.ray_jobs import ray_error_cause

    try:
        seconds, error = ray.get(ref)
    except ray.exceptions.RayError as err:  # the task's worker or node died, out of memory, ...
        raise TrainFailed(f"its Ray task failed: {' '.join(ray_error_cause(err).split())[:300]}") from None
    if error:
        raise TrainFailed(error)
    return seconds


def sample_row(row: Row, args: argparse.Namespace, reference) -> float:
    """Sample the row's EMA export as `sit sample` does, then the latent FD (and FID); publishes result.json."""
    from sampling.generate import ModelSource
    from trainer.evaluate import latent_fd

    start = time.perf_counter()
    source = ModelSource(
        checkpoint=str(Path(row.point.config.run_dir) / "ema.safetensors"),
        vae=args.vae,
        allow_vae_mismatch=args.allow_vae_mismatch,
    )
    row.dir.mkdir(parents=True, exist_ok=True)
    latents, npz = (_sample_on_ray if args.address else _sample_here)(row, args, source)
    result = {
        "values": row.point.values,
        "sampler": row.sampler.label,
        "sampler_options": row.sampler.options.describe(),
        "config_hash": row.point.key,
        "eval_hash": row.key,
        "num_samples": args.num_samples,
        "sample_seed": args.sample_seed,
        "reference_latents": len(reference),
        "latent_fd": latent_fd(latents, reference),
        "fid": None,
        "nfe_per_sample": row.sampler.options.nfe_per_sample(),
        "train_steps": row.point.config.total_steps,
        "sample_seconds": round(time.perf_counter() - start, 1),
    }
    if args.inception:
        from sampling.evaluate import evaluate

        result["fid"] = evaluate(npz, args.ref, args.inception, progress=False).fid
    _publish(row.dir / RESULT_FILE, result)
    return time.perf_counter() - start


def _sample_here(row: Row, args: argparse.Namespace, source) -> tuple:
    """In this process, with `sit sample`'s generator, options and sample plan: the same latents as
    its Ray job for the same seed (sample i depends on (seed, i) alone). Decoded to samples.npz
    only for FID; a non-finite sample makes the Fréchet distance fail, naming it."""
    import numpy as np

    from sampling.options import run_sampler
    from sampling.plan import ClassPolicy, SamplePlan

    gen = _generator(source)
    plan = SamplePlan(args.sample_seed, args.num_samples, gen.model.config.num_classes, ClassPolicy.BALANCED)
    npz = row.dir / "samples.npz"
    if args.inception:
        out = gen.generate(row.sampler.options, plan, range(args.num_samples), args.batch_size)
        tmp = row.dir / ".samples.tmp.npz"
        np.savez(tmp, arr_0=out.images)
        os.replace(tmp, npz)
        return out.latents, str(npz)
    options, latents = gen.resolve(row.sampler.options), []
    for start in range(0, args.num_samples, args.batch_size):
        batch = list(range(start, min(start + args.batch_size, args.num_samples)))
        noise, y, generators = plan.start(batch, gen.latent_shape, gen.device)
        latents.append(run_sampler(gen.model, options, noise, y, generators).x.float().cpu().numpy())
    return np.concatenate(latents), str(npz)


@functools.lru_cache(maxsize=1)
def _generator(source):
    """`sit sample`'s model and autoencoder, loaded once for all samplers of a point."""
    from sampling.generate import Generator

    return Generator(source)


def _sample_on_ray(row: Row, args: argparse.Namespace, source) -> tuple:
    """`sit sample`'s Ray job on the cluster at --address (resumes from its committed chunks)."""
    from cluster.demo import chunk_latents
    from sampling.job import SampleJob, run_sample_job
    from sampling.plan import ClassPolicy

    samples = row.dir / "samples"
    job = SampleJob(
        source=source,
        out=str(samples),
        options=row.sampler.options,
        num_samples=args.num_samples,
        seed=args.sample_seed,
        class_policy=ClassPolicy.BALANCED,
        chunk_size=args.num_samples,
        batch_size=args.batch_size,
        save_latents=True,
        address=args.address,
        progress=False,
    )
    summary = run_sample_job(job)
    return chunk_latents(str(samples))[0], summary.npz


def _publish(path: Path, value: dict) -> None:
    from cluster.sweep_report import write_atomic

    write_atomic(path, json.dumps(value, indent=1) + "\n")


def run_sweep(args: argparse.Namespace, plan: Plan) -> dict:
    """Train and sample every unfinished row of ``plan``; write the report; return sweep.json's dict."""
    from cluster.sweep_report import write_report
    from trainer.evaluate import reference_latents

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for row in plan.rows:
        if (row.dir / RESULT_FILE).exists():
            row.result, row.reused = json.loads((row.dir / RESULT_FILE).read_text()), True
    todo = [r for r in plan.rows if not r.reused]
    to_train = [p for p in plan.points if any(r.point is p for r in todo)]
    log = Progress(out, len(to_train), len(todo))
    log(
        f"sit sweep into {out}: {len(plan.points)} points x {len(plan.samplers)} samplers = {len(plan.rows)} rows; "
        f"{len(plan.rows) - len(todo)} finished earlier, {len(to_train)} points to train or resume, "
        f"{len(todo)} samplings to run"
    )
    references: dict[str, object] = {}  # data URL -> its reference latents (a --grid may vary data.url)
    on_ray = start_trainings_on_ray(to_train, args) if args.address and to_train else {}
    if on_ray:
        log(f"{len(on_ray)} trainings submitted to the Ray cluster at {args.address}; they run side by side")
        log.parallel_trainings = True
    for i, point in enumerate(to_train, 1):
        rows = [r for r in todo if r.point is point]
        name = ", ".join(f"{k}={v}" for k, v in point.values.items()) or "base config"
        where = " (on Ray)" if on_ray else ""
        log(f"point {i}/{len(to_train)} [{point.key}] {name}: training {point.config.total_steps} steps{where}")
        try:
            seconds = wait_for_training(on_ray[point.key]) if on_ray else train_point(point)
        except TrainFailed as err:
            log(f"    training failed, skipping its {len(rows)} samplings: {err}")
            for row in rows:
                row.error = f"training failed: {err}"
                log.done("sample", None)
            log.done("train", None)
            continue
        log.done("train", seconds)
        how = "reusing the finished EMA export" if seconds is None else f"trained in {seconds:.0f} s"
        log(f"    {how}; {log.eta()}")
        for row in rows:
            try:
                url = point.config.data.url
                if url not in references:
                    references[url] = reference_latents(url, args.reference)
                seconds = sample_row(row, args, references[url])
            except Exception as err:  # one failed sampling (e.g. non-finite samples) must not stop the sweep
                from cluster.cli import is_user_error

                if not is_user_error(err):
                    raise
                row.error = " ".join(str(err).split())
                log(f"    {row.sampler.label}: failed: {row.error}")
                log.done("sample", None)
                continue
            row.result = json.loads((row.dir / RESULT_FILE).read_text())
            write_report(out, args, plan, log.elapsed())  # the table so far, after every row
            log.done("sample", seconds)
            log(f"    {row.sampler.label}: latent FD {row.result['latent_fd']:.3f} ({seconds:.0f} s); {log.eta()}")
    report = write_report(out, args, plan, log.elapsed())
    done = [r for r in plan.rows if r.result]
    failed = [r for r in plan.rows if not r.result]
    log(
        f"done in {log.elapsed() / 60:.1f} min: {len(done)} of {len(plan.rows)} rows "
        f"({sum(r.reused for r in plan.rows)} reused, {len(failed)} failed)"
    )
    if done:
        best = min(done, key=lambda r: r.result["latent_fd"])
        name = ", ".join(f"{k}={v}" for k, v in best.point.values.items())
        log(f"best: {name} {best.sampler.label}, latent FD {best.result['latent_fd']:.3f}")
    log(f"report: {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return report


def sweep(args: argparse.Namespace) -> int:
    from latents.artifacts import Kind, require_input, require_output
    from latents.threads import set_torch_threads

    try:
        plan = plan_sweep(args)
    except SweepUsageError as err:
        print(f"sit sweep: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    # a sweep folder holds only unrelated files (points/, sweep.*) as far as the artifact kinds go
    require_output(args.out, Kind.FOLDER, "--out")
    require_input(plan.points[0].config.data.url, Kind.LATENT_DATASET, "--data")
    if args.dry_run:
        for row in plan.rows:
            print(f"{row.point.key}/{row.key}  {row.point.values}  {row.sampler.label}")
        return 0
    set_torch_threads()
    try:
        report = run_sweep(args, plan)
    except SweepUsageError as err:  # what the Ray cluster cannot give (--train-gpus, --train-cpus)
        print(f"sit sweep: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    return 0 if all(r["latent_fd"] is not None for r in report["rows"]) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="train and sample a grid of configs; rank them by latent FD (the SiT design space with --paper)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from trainer.cli import add_train_arguments

    add_train_arguments(p)  # --preset, --config, --set, --data, --steps as `sit train`
    for action in p._actions:  # --run-dir is per point here (refused if given); --dry-run lists the rows
        if action.dest == "run_dir":
            action.help = argparse.SUPPRESS
        elif action.dest == "dry_run":
            action.help = "list the rows (config hash/eval hash, grid values, sampler) and exit"
    p.add_argument("--out", default="sit-sweep", help="the sweep folder (default: %(default)s)")
    g = p.add_argument_group("grid")
    g.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a config key and its values, e.g. --grid transport.path_type=Linear,GVP,VP (repeatable: the product)",
    )
    g.add_argument("--paper", action="store_true", help="the SiT paper's grid: path x prediction, ODE and 5 SDE forms")
    g = p.add_argument_group("sampling and evaluation")
    g.add_argument(
        "--samplers",
        help="comma-separated ode[:METHOD] and sde:FORM[:NORM] (FORM: constant, SBDM, sigma, linear, decreasing, "
        f"increasing-decreasing); default: ode, or with --paper {PAPER_SAMPLERS}",
    )
    g.add_argument(
        "--sample-steps", type=positive_int, default=50, help="steps of every sampler (default: %(default)s)"
    )
    g.add_argument("--num-samples", type=positive_int, default=384, help="samples per row (default: %(default)s)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the sample plan (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=128, help="sampler batch (default: %(default)s)")
    g.add_argument(
        "--reference",
        type=positive_int,
        default=10_000,
        help="training latents in the reference set (the whole dataset if smaller; default: %(default)s)",
    )
    g.add_argument("--vae", required=True, help="the autoencoder the latents were encoded with (for `sit sample`)")
    g.add_argument(
        "--allow-vae-mismatch", action="store_true", help="decode with another autoencoder than the export records"
    )
    g.add_argument("--inception", help="TorchScript Inception file: also compute FID (needs --ref)")
    g.add_argument("--ref", help="reference for FID: images or an npz with mu/sigma (as `sit eval`)")
    g = p.add_argument_group("where it runs")
    g.add_argument(
        "--address",
        help="Ray cluster (e.g. auto): train every point as a Ray task there, side by side, and sample with "
        "`sit sample`'s Ray job (default: train one point at a time and sample, all on this machine)",
    )
    g.add_argument(
        "--train-gpus",
        type=int,
        metavar="N",
        help="with --address: GPUs per point's training, torchrun with N ranks when N > 1 "
        "(default: 1 if the cluster has GPUs, else 0)",
    )
    g.add_argument(
        "--train-cpus",
        type=float,
        metavar="N",
        help="with --address: CPUs Ray reserves per point's training (default: 1)",
    )
    p.set_defaults(func=sweep)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
