"""The encode job on Ray Data: source images -> latent shards, each exactly once, then card and manifest.

Plan. Source keys are sorted; shard ``i`` holds keys ``[i*S, (i+1)*S)`` minus the rejected ones;
within a shard, micro-batches of ``micro_batch`` consecutive keys are the unit of encoding. Both
are pure functions of the sorted keys, S and the micro-batch size, so shard bytes do not depend
on the number of workers, on Ray's batching or on timing.

Pipeline. One row per micro-batch: a CPU read/decode stage (Ray tasks: read bytes, decode, ADM
crop) feeds an actor pool that holds the VAE (GPUs when the cluster has them). The driver
collects each shard's micro-batches and publishes the shard atomically through
`latents.writer.write_shard` as soon as it is complete.

Exactly once. A rerun lists the committed shards, adopts them (their keys must be the plan's,
minus rejects) and encodes only the rest. The rejects of adopted shards are the plan's keys they
lack; their reasons are found again by re-reading just those inputs (and a now-readable input
means the source changed: an error). ``encode-run.json``, written before the first shard,
describes the run; a destination holding another run (other source, resolution, VAE, ...) is
refused. Only when every shard is committed and source = encoded + rejected are
``rejects.parquet``, then samples/manifest and, last, ``card.json`` written.
"""

from __future__ import annotations

import json
import re
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latents.artifacts import ENCODE_RUN_FILE, Kind, require_not_artifact, require_output
from latents.autoencoder import DEFAULT_VAE, load_autoencoder, vae_dtype
from latents.format import CARD_NAME, FORMAT_VERSION, REJECTS_NAME, REJECTS_SCHEMA, DatasetCard
from latents.storage import Root
from latents.threads import set_torch_threads
from latents.words import plural, tally
from latents.writer import ShardInfo, finalize, read_shard_info, shard_committed, write_shard
from pipeline.encode import latent_spec
from pipeline.preprocess import ImageRejected, preprocess
from pipeline.ray_jobs import NO_RESTARTS, connect, ray_log_file, worker_env
from pipeline.sources import UNKNOWN_LABEL, ImageReader, Source, SourceFormat, SourceItem, list_source, select

RUN_NAME = ENCODE_RUN_FILE  # named in latents.artifacts, which tells the kinds of output apart


class EncodeError(Exception):
    """The job cannot finish: another run's destination, a changed source, an empty shard, ..."""


class RejectsExceededError(EncodeError):
    """More inputs were rejected than ``max_reject_fraction`` allows (shards stay; rejects.parquet lists them)."""


@dataclass
class EncodeConfig:
    """Everything `sit encode` takes (see `pipeline.cli` for the flags)."""

    source: str  # source URL (folder, parquet shards or webdataset tars)
    dest: str  # dataset root URL
    resolution: int = 256  # image side: 256 or 512
    vae: str = DEFAULT_VAE  # autoencoder: local directory or cached hub id (its config's _class_name picks the family)
    dtype: str = "fp32"  # VAE compute dtype: fp32 or bf16
    stored: str | None = None  # "posterior" (mean + std) or "sample"; None: posterior, or "latent" if deterministic
    source_format: SourceFormat = SourceFormat.AUTO
    class_list: str | None = None  # file of class names (wnids), one per line, in label order
    labels: str | None = None  # labels file of a validation folder
    num_classes: int | None = None  # default: from the class list / folders, else 1000
    classes: str | None = None  # subset: "N" or a comma list of names / indices
    limit: int | None = None  # only the first N images (in key order)
    shard_size: int | None = None  # samples per shard (default: from the 256 MiB target)
    micro_batch: int = 32  # images per VAE forward (with their mirrors: twice that); part of the plan
    draft: bool = False  # JPEG reduced-size decoding (see pipeline.preprocess)
    workers: int | None = None  # encode actors (default: one per GPU, else 1)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None  # default: 1 when the cluster has GPUs, else 0
    readers: int | None = None  # concurrent read/decode tasks (default: the CPUs the encoders leave)
    max_reject_fraction: float = 0.001
    seed: int = 0  # noise seed for stored="sample"
    address: str | None = None  # Ray cluster address; None starts a local Ray
    progress: bool = True


@dataclass
class EncodeSummary:
    dest: str
    source_images: int
    encoded: int
    rejected: int
    shards: int
    shards_adopted: int  # committed by an earlier run and kept
    encoded_now: int  # samples encoded by this run (the rest were adopted)
    bytes: int
    seconds: float
    rejects_by_reason: dict = field(default_factory=dict)
    stage_seconds: dict = field(default_factory=dict)  # summed over workers: read/decode/crop, vae, write

    def format(self) -> str:
        return (
            f"{self.dest}: {self.encoded:,} encoded + {self.rejected:,} rejected = "
            f"{plural(self.source_images, 'source image')} (rejects: {tally(self.rejects_by_reason)}); "
            f"{plural(self.shards, 'shard')} ({self.shards_adopted:,} from an earlier run), "
            f"{self.bytes / 2**20:,.1f} MiB, {self.seconds:,.1f} s "
            f"({self.encoded_now / max(self.seconds, 1e-9):,.1f} images/s encoded by this run)"
            + (
                "; time summed over workers: " + ", ".join(f"{k} {v:,.1f} s" for k, v in self.stage_seconds.items())
                if self.stage_seconds
                else ""
            )
        )


# ---- the stages (run in Ray workers) ----------------------------------------------------------------


def read_chunk(row: dict, resolution: int, draft: bool, reader: ImageReader | None = None) -> dict:
    """Read + decode + crop one micro-batch; rejects are returned, not raised."""
    reader = reader or ImageReader()
    keys, labels, crops, rejects = [], [], [], []
    for d in json.loads(row["items"]):
        item = SourceItem(**d)
        if item.label == UNKNOWN_LABEL:
            rejects.append((item.key, item.where, "unknown-label", item.label_error))
            continue
        try:
            crops.append(preprocess(reader.read(item), resolution, draft))
        except ImageRejected as err:
            rejects.append((item.key, item.where, err.reason, str(err)))
            continue
        except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
            rejects.append((item.key, item.where, "unreadable", f"{type(err).__name__}: {err}"))
            continue
        keys.append(item.key)
        labels.append(item.label)
    images = np.stack(crops) if crops else np.zeros((0, resolution, resolution, 3), np.uint8)
    return {
        "shard": row["shard"],
        "chunk": row["chunk"],
        "keys": json.dumps(keys),
        "labels": json.dumps(labels),
        "images": images.tobytes(),
        "rejects": json.dumps(rejects),
    }


class ReadStage:
    """Ray actor: reads, decodes and crops micro-batches (keeps parquet row groups between them)."""

    def __init__(self, resolution: int, draft: bool):
        set_torch_threads(1)  # it decodes images; torch (imported with this module) must not spin on every core
        self.resolution, self.draft, self.reader = resolution, draft, ImageReader()

    def __call__(self, row: dict) -> dict:
        start = time.perf_counter()
        out = read_chunk(row, self.resolution, self.draft, self.reader)
        out["read_s"] = time.perf_counter() - start
        return out


class EncodeStage:
    """Ray actor: holds the VAE; turns a decoded micro-batch into latent bytes."""

    def __init__(self, vae: str, dtype: str, spec_json: str, resolution: int, seed: int, threads: int, gpu: bool):

        from latents.format import LatentSpec
        from pipeline.encode import VaeEncoder

        set_torch_threads(max(1, threads))
        spec = LatentSpec(**json.loads(spec_json))
        self.encoder = VaeEncoder(vae, vae_dtype(dtype), "cuda" if gpu else "cpu", spec, seed)
        self.resolution = resolution

    def __call__(self, row: dict) -> dict:
        start = time.perf_counter()
        keys = json.loads(row["keys"])
        t = self.resolution
        images = np.frombuffer(row["images"], np.uint8).reshape(len(keys), t, t, 3)
        latents = self.encoder(images, keys) if keys else np.zeros(0, np.float16)
        out = {k: row[k] for k in ("shard", "chunk", "keys", "labels", "rejects", "read_s")}
        out["latents"] = latents.tobytes()
        out["encode_s"] = time.perf_counter() - start
        return out


# ---- planning -------------------------------------------------------------------------------------


def plan_shards(items: list[SourceItem], samples_per_shard: int) -> list[list[SourceItem]]:
    """Consecutive runs of ``samples_per_shard`` sorted items."""
    return [items[i : i + samples_per_shard] for i in range(0, len(items), samples_per_shard)]


def plan_chunks(shard: list[SourceItem], micro_batch: int) -> list[list[SourceItem]]:
    return [shard[i : i + micro_batch] for i in range(0, len(shard), micro_batch)]


def run_description(
    cfg: EncodeConfig, source: Source, spec, samples_per_shard: int, num_items: int, identity: dict
) -> dict:
    """What makes two runs the same run (and their shards interchangeable)."""
    return {
        "format_version": FORMAT_VERSION,
        "source_fingerprint": source.fingerprint,
        "source_images": num_items,
        "resolution": cfg.resolution,
        "vae": cfg.vae,
        "autoencoder": identity,
        "dtype": cfg.dtype,
        "spec": {"latent_shape": list(spec.latent_shape), "stored": spec.stored, "flips": spec.flips},
        "samples_per_shard": samples_per_shard,
        "micro_batch": cfg.micro_batch,
        "draft": cfg.draft,
        "num_classes": source.num_classes,
        "seed": cfg.seed,
    }


def check_destination(root: Root, run: dict) -> bool:
    """Refuse another run's destination; True if the dataset is already complete."""
    if root.exists(RUN_NAME):
        theirs = json.loads(root.read_bytes(RUN_NAME))
        differ = sorted(k for k in set(run) | set(theirs) if run.get(k) != theirs.get(k))
        if differ:
            detail = "; ".join(f"{k}: {theirs.get(k)!r} there, {run.get(k)!r} now" for k in differ[:4])
            raise EncodeError(
                f"{root.url} holds another encode run ({detail}). Shards are never mixed: "
                f"encode to a new destination, or remove it."
            )
        return root.exists(CARD_NAME)
    if root.exists(CARD_NAME) or root.list("shards"):
        raise EncodeError(
            f"{root.url} already holds a latent dataset or shards not written by `sit encode` "
            f"(no {RUN_NAME}): encode to a new destination"
        )
    return False


# ---- the driver -----------------------------------------------------------------------------------


def run_encode(cfg: EncodeConfig) -> EncodeSummary:
    """Run the whole job; returns its summary. Raises EncodeError (or subclasses) when it cannot finish."""
    start = time.time()
    require_output(cfg.dest, Kind.LATENT_DATASET, "DST")  # before any work or write
    require_not_artifact(cfg.source, "SRC", "images")
    source = list_source(
        cfg.source, cfg.source_format, class_list=cfg.class_list, labels=cfg.labels, num_classes=cfg.num_classes
    )
    items = select(source.items, cfg.classes, cfg.limit, source.class_names)
    if not items:
        raise EncodeError(f"{cfg.source}: no images selected (--classes {cfg.classes}, --limit {cfg.limit})")
    source = Source(source.url, source.format, items, source.num_classes, source.class_names)
    ae = load_autoencoder(cfg.vae)  # on the driver: a missing or unsupported autoencoder fails before any work
    try:
        spec = latent_spec(ae, cfg.resolution, cfg.stored)
    except ValueError as err:
        raise EncodeError(f"--resolution {cfg.resolution} / --stored with VAE {cfg.vae}: {err}") from None
    identity, transform = ae.identity, ae.own_transform()
    del ae
    per_shard = cfg.shard_size or spec.samples_per_shard()
    plan = plan_shards(items, per_shard)
    root = Root(cfg.dest)
    recorded = {k: identity[k] for k in ("class", "config_sha256")}
    run = run_description(cfg, source, spec, per_shard, len(items), recorded)
    if check_destination(root, run):
        card = DatasetCard.from_json(root.read_bytes(CARD_NAME).decode(), root.url_of(CARD_NAME))
        counts = card.extra.get("counts", {})
        return EncodeSummary(
            root.url, len(items), card.num_samples, counts.get("rejected", 0), card.num_shards, card.num_shards, 0,
            card.total_bytes, time.time() - start, counts.get("rejected_by_reason", {}),
        )  # fmt: skip
    if not root.exists(RUN_NAME):
        root.publish_bytes(RUN_NAME, (json.dumps(run, indent=1, sort_keys=True) + "\n").encode())

    shards: dict[int, ShardInfo] = {}
    rejects: list[tuple[str, str, str, str]] = []
    committed = [i for i in range(len(plan)) if shard_committed(root, i)]
    with ThreadPoolExecutor(8) as pool:  # adopting reads each committed shard back (its statistics)
        for i, info in zip(committed, pool.map(lambda i: read_shard_info(root, i, spec), committed), strict=True):
            rejects.extend(_adopted_rejects(root, i, info, plan[i], cfg))
            shards[i] = info
    adopted, adopted_samples = len(shards), sum(s.num_samples for s in shards.values())
    pending = [i for i in range(len(plan)) if i not in shards]
    stage_seconds: dict[str, float] = {}
    empty: list[int] = []
    if pending:
        new_rejects, empty = _encode_pending(cfg, root, spec, plan, pending, shards, adopted, stage_seconds)
        rejects.extend(new_rejects)
    rejects.sort()
    root.publish_bytes(REJECTS_NAME, _rejects_parquet(rejects))
    if rejects and len(rejects) == len(items):
        by_reason = {}
        for r in rejects:
            by_reason[r[2]] = by_reason.get(r[2], 0) + 1
        raise EncodeError(
            f"{cfg.source}: all {plural(len(items), 'input')} were rejected ({tally(by_reason)}); nothing was "
            f"encoded. See {root.url_of(REJECTS_NAME)} for each file and why"
        )
    if empty:
        raise EncodeError(
            f"{root.url}: every input of {plural(len(empty), 'shard')} {empty} was rejected "
            f"(see {root.url_of(REJECTS_NAME)}), so the "
            f"shard plan has a hole; fix or drop those inputs and encode to a new destination"
        )
    encoded = sum(s.num_samples for s in shards.values())
    if encoded + len(rejects) != len(items):
        raise EncodeError(f"counts do not reconcile: {encoded} encoded + {len(rejects)} rejected != {len(items)}")
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r[2]] = by_reason.get(r[2], 0) + 1
    if len(rejects) > cfg.max_reject_fraction * len(items):
        raise RejectsExceededError(
            f"{len(rejects)} of {len(items)} inputs rejected ({100 * len(rejects) / len(items):.3f}% > "
            f"--max-reject-fraction {cfg.max_reject_fraction}): {tally(by_reason)}; see {root.url_of(REJECTS_NAME)}. "
            f"Every shard is committed; rerun with a higher --max-reject-fraction to accept them."
        )
    counts = {"source": len(items), "encoded": encoded, "rejected": len(rejects), "rejected_by_reason": by_reason}
    extra = {
        "counts": counts,
        "rejects": REJECTS_NAME,
        "encoder": {k: run[k] for k in ("dtype", "micro_batch", "draft", "samples_per_shard", "seed")},
        "source_url": cfg.source,
        "source_format": source.format.value,
    }
    card = finalize(
        root, list(shards.values()), spec=spec, resolution=cfg.resolution, vae=cfg.vae, autoencoder=identity,
        transform=transform, num_classes=source.num_classes, source_fingerprint=source.fingerprint, extra=extra,
    )  # fmt: skip
    return EncodeSummary(
        root.url, len(items), encoded, len(rejects), card.num_shards, adopted, encoded - adopted_samples,
        card.total_bytes, time.time() - start, by_reason, stage_seconds,
    )  # fmt: skip


def _adopted_rejects(root: Root, index: int, info: ShardInfo, planned: list[SourceItem], cfg: EncodeConfig) -> list:
    """Rejects of a shard committed earlier: the planned keys it lacks, with their reasons found again."""
    planned_keys = [it.key for it in planned]
    position = {k: n for n, k in enumerate(planned_keys)}
    order = [position.get(k, -1) for k in info.keys]
    if -1 in order or order != sorted(order):
        raise EncodeError(
            f"{root.url_of(info.name)} is committed with other samples than this run's plan "
            f"(first keys {info.keys[:3]} vs {planned_keys[:3]}): encode to a new destination"
        )
    have = set(info.keys)
    missing = [it for it in planned if it.key not in have]
    if not missing:
        return []
    row = {"shard": index, "chunk": 0, "items": json.dumps([it.to_row() for it in missing])}
    out = read_chunk(row, cfg.resolution, cfg.draft)
    readable = json.loads(out["keys"])
    if readable:
        raise EncodeError(
            f"{root.url_of(info.name)} was committed without {readable[:3]} ({len(readable)} in all), which now "
            f"read fine: the source changed since that shard was written; encode to a new destination"
        )
    return [tuple(r) for r in json.loads(out["rejects"])]


def _encode_pending(
    cfg: EncodeConfig,
    root: Root,
    spec,
    plan: list[list[SourceItem]],
    pending: list[int],
    shards: dict,
    adopted: int,
    seconds: dict[str, float],
) -> tuple[list, list[int]]:
    """Encode and publish the pending shards; fills ``shards`` and the per-stage ``seconds``;
    returns (rejects, indices of shards whose every input was rejected)."""
    import ray
    from tqdm import tqdm

    connect(cfg.address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    gpus = cfg.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    workers = cfg.workers or (max(1, int(ray.cluster_resources().get("GPU", 0) / gpus)) if gpus else 1)
    readers = cfg.readers or max(1, int(ray.cluster_resources().get("CPU", 1) - workers * cfg.cpus_per_worker))

    rows, chunks_per_shard = [], {}
    for i in pending:
        chunks = plan_chunks(plan[i], cfg.micro_batch)
        chunks_per_shard[i] = len(chunks)
        for j, chunk in enumerate(chunks):
            rows.append({"shard": i, "chunk": j, "items": json.dumps([it.to_row() for it in chunk])})
    spec_json = json.dumps({"latent_shape": list(spec.latent_shape), "stored": spec.stored, "flips": spec.flips})
    env = {"env_vars": worker_env()}  # endpoints and regions, never secrets
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    with warnings.catch_warnings():  # Ray 2.60 takes max_restarts only through its deprecated **ray_remote_args
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map(  # an actor pool, never fused with the encoders: decoding runs beside them
            ReadStage,
            fn_constructor_kwargs={"resolution": cfg.resolution, "draft": cfg.draft},
            num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=readers),
            runtime_env=env,
            **NO_RESTARTS,
        )
        ds = ds.map(
            EncodeStage,
            fn_constructor_kwargs={
                "vae": cfg.vae,
                "dtype": cfg.dtype,
                "spec_json": spec_json,
                "resolution": cfg.resolution,
                "seed": cfg.seed,
                "threads": int(cfg.cpus_per_worker),
                "gpu": gpus > 0,
            },
            num_cpus=cfg.cpus_per_worker,
            num_gpus=gpus,
            compute=ray.data.ActorPoolStrategy(size=workers),
            runtime_env=env,
            **NO_RESTARTS,
        )

    total_images = sum(len(plan[i]) for i in pending)
    bar = tqdm(total=total_images, unit="img", desc="encode", disable=not cfg.progress, dynamic_ncols=True)
    buffers: dict[int, dict[int, dict]] = {}
    rejects: list = []
    empty: list[int] = []
    writes: dict[int, Future] = {}
    done = adopted

    seconds.update({"read+decode+crop": 0.0, "vae": 0.0, "write": 0.0})
    lock = threading.Lock()

    def timed_write(i: int, samples: list) -> ShardInfo:
        t = time.perf_counter()
        info = write_shard(root, i, samples, spec)
        with lock:
            seconds["write"] += time.perf_counter() - t
        return info

    def postfix() -> None:
        bar.set_postfix_str(f"shards {done}/{len(plan)}, rejects {len(rejects)}", refresh=False)

    with ThreadPoolExecutor(2) as pool:  # zstd and uploads release the GIL
        for row in _rows(ds):
            i, j = int(row["shard"]), int(row["chunk"])
            buffers.setdefault(i, {})[j] = row
            seconds["read+decode+crop"] += row["read_s"]
            seconds["vae"] += row["encode_s"]
            rejects.extend(tuple(r) for r in json.loads(row["rejects"]))
            bar.update(len(json.loads(row["keys"])) + len(json.loads(row["rejects"])))
            if len(buffers[i]) == chunks_per_shard[i]:
                samples = list(_shard_samples(buffers.pop(i), spec))
                if samples:
                    writes[i] = pool.submit(timed_write, i, samples)
                else:
                    empty.append(i)
            for k in [k for k, f in writes.items() if f.done()]:
                shards[k] = writes.pop(k).result()
                done += 1
            postfix()
        for k, f in writes.items():
            shards[k] = f.result()
            done += 1
    postfix()
    bar.close()
    return rejects, sorted(empty)


def _rows(ds):
    """The dataset's rows; a worker's failure surfaces as one EncodeError naming its root cause."""
    import ray

    try:
        yield from ds.iter_rows()
    except ray.exceptions.RayError as err:
        # the root cause reaches us only as traceback text, first in the chain: "ValueError: ..."
        lines = [line for line in str(err).splitlines() if re.match(r"[A-Za-z_][\w.]*: ", line)]
        cause = next((line for line in lines if not line.startswith("ray.")), lines[0] if lines else repr(err))
        raise EncodeError(f"a Ray worker failed: {cause} (Ray's log: {ray_log_file()})") from err


def _shard_samples(chunks: dict[int, dict], spec):
    """(key, label, array) of a shard's micro-batches, in plan order."""
    for j in sorted(chunks):
        row = chunks[j]
        keys, labels = json.loads(row["keys"]), json.loads(row["labels"])
        latents = np.frombuffer(row["latents"], spec.storage_dtype).reshape(len(keys), *spec.sample_shape)
        yield from zip(keys, labels, latents, strict=True)


def _rejects_parquet(rejects: list[tuple[str, str, str, str]]) -> bytes:
    columns = list(zip(*rejects, strict=True)) if rejects else [[], [], [], []]
    table = pa.table({n: list(c) for n, c in zip(REJECTS_SCHEMA.names, columns, strict=True)}, schema=REJECTS_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
