"""The encode job on Ray: source images -> latent shards, each exactly once, then card and index.

Listing. `pipeline.sources.scan` lists the source once, one unit (class folder, parquet file,
tar) at a time on a thread pool, and keeps per unit only its item count and a digest: the
driver never holds a per-image object, so its memory does not grow with the source.
``--classes`` lists only those class folders; ``--limit`` stops listing once it has its images.

Plan. Source keys are sorted; shard ``i`` holds keys ``[i*S, (i+1)*S)`` minus the rejected ones,
a span of (unit, first, last) ranges (`ShardPlan`); within a shard, micro-batches of
``micro_batch`` consecutive keys are the unit of encoding. Both are pure functions of the sorted
keys, S and the micro-batch size, so shard bytes do not depend on the number of workers, on
Ray's batching or on timing.

Pipeline. One Ray Data row per pending shard (a few hundred bytes: its span) goes to an actor
pool (`ShardStage`, holding the autoencoder, on GPUs when the cluster has them). An actor lists
the shard's units again (checking each against the plan's digest), reads, decodes and crops
micro-batches on ``readers`` threads ahead of the encoder, and writes the shard itself with
`latents.writer.write_shard`: first its sidecar (the shard's `ShardInfo` and rejects), then
the tar, each atomically. Back to the driver comes one small row of counts and seconds.

Exactly once. A shard is committed when its tar exists (its sidecar was published before it).
A rerun adopts committed shards from their sidecars, without reading shard bytes, and encodes
only the rest; a sidecar must name the plan it was written for. ``encode-run.json``, written
before the first shard, describes the run; a destination holding another run (other source,
resolution, VAE, ...) is refused. When every shard is committed, the driver streams the sidecars
once to count and collect the rejects (``rejects.parquet``); only if source = encoded + rejected
does `latents.writer.finalize` write the index and, last, ``card.json`` from the same stream.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import re
import threading
import time
import warnings
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latents.artifacts import ENCODE_RUN_FILE, Kind, require_not_artifact, require_output
from latents.autoencoder import DEFAULT_VAE, load_autoencoder, vae_dtype
from latents.format import CARD_NAME, FORMAT_VERSION, REJECTS_NAME, REJECTS_SCHEMA, SHARD_DIR, DatasetCard, shard_name
from latents.storage import TEMP_MARK, Root
from latents.threads import set_torch_threads
from latents.words import plural, tally
from latents.writer import (
    SIDECAR_DIR,
    finalize,
    iter_shard_infos,
    read_sidecar,
    sidecar_name,
    write_empty_shard_info,
    write_shard,
)
from pipeline.encode import latent_spec
from pipeline.preprocess import ImageRejected, preprocess
from pipeline.ray_jobs import NO_RESTARTS, connect, ray_log_file, worker_env
from pipeline.sources import (
    UNKNOWN_LABEL,
    ImageReader,
    Listing,
    Selection,
    SourceFormat,
    SourceItem,
    Unit,
    planned_items,
    scan,
)

RUN_NAME = ENCODE_RUN_FILE  # named in latents.artifacts, which tells the kinds of output apart


class EncodeError(Exception):
    """The job cannot finish: another run's destination, a changed source, an empty shard, ..."""


class ShardFailed(Exception):
    """Raised by a worker for its shard: one line naming the shard and the root cause, no chain."""


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
    readers: int | None = None  # read/decode threads in all (default: the CPUs the encoders leave)
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


# ---- the stage (runs in Ray actors) ----------------------------------------------------------------


def read_items(
    items: list[SourceItem], resolution: int, draft: bool, reader: ImageReader | None = None
) -> tuple[list[str], list[int], np.ndarray, list[tuple[str, str, str, str]]]:
    """Read + decode + crop one micro-batch: (keys, labels, (B, H, W, 3) crops, rejects); never raises for bad input."""
    reader = reader or ImageReader()
    keys, labels, crops, rejects = [], [], [], []
    for item in items:
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
    return keys, labels, images, rejects


class ShardStage:
    """Ray actor: encodes whole shards and writes them (sidecar, then tar) to the destination.

    It holds the autoencoder; ``readers`` threads read, decode and crop the next micro-batches
    while the encoder runs (decoding and torch release the GIL)."""

    def __init__(
        self, selection: Selection, dest: Root, vae: str, dtype: str, spec_json: str, resolution: int,
        draft: bool, micro_batch: int, seed: int, threads: int, readers: int, gpu: bool,
    ):  # fmt: skip
        from latents.format import LatentSpec
        from pipeline.encode import VaeEncoder

        set_torch_threads(max(1, threads))
        self.spec = LatentSpec(**json.loads(spec_json))
        self.encoder = VaeEncoder(vae, vae_dtype(dtype), "cuda" if gpu else "cpu", self.spec, seed)
        self.selection, self.root, self.resolution, self.draft = selection, dest, resolution, draft
        self.micro_batch, self.readers = micro_batch, max(1, readers)
        self.pool = ThreadPoolExecutor(self.readers)
        self.local = threading.local()  # one ImageReader (parquet row-group cache) per thread
        self.units: OrderedDict[str, list[SourceItem]] = OrderedDict()  # the last units listed

    def _items(self, unit: Unit) -> list[SourceItem]:
        if unit.url not in self.units:
            self.units[unit.url] = planned_items(self.selection, unit)
            while len(self.units) > 2:  # consecutive shards share at most a unit at each end
                self.units.popitem(last=False)
        return self.units[unit.url]

    def _read(self, items: list[SourceItem]):
        if not hasattr(self.local, "reader"):
            self.local.reader = ImageReader()
        start = time.perf_counter()
        out = read_items(items, self.resolution, self.draft, self.local.reader)
        return (*out, time.perf_counter() - start)

    def __call__(self, row: dict) -> dict:
        try:
            return self._encode(row)
        except Exception as err:  # the driver shows the first exception of Ray's traceback text: this one
            raise ShardFailed(f"shard {row['shard']}: {type(err).__name__}: {err}") from None

    def _encode(self, row: dict) -> dict:
        index, plan = int(row["shard"]), row["plan"]
        items = [it for u, lo, hi in json.loads(row["span"]) for it in self._items(Unit(**u))[lo:hi]]
        chunks = [items[i : i + self.micro_batch] for i in range(0, len(items), self.micro_batch)]
        rejects: list = []
        seconds = {"read": 0.0, "vae": 0.0}

        def samples():  # read ahead on the threads, encode in plan order
            ahead: deque = deque()
            pending = iter(chunks)
            for chunk in itertools.islice(pending, self.readers + 1):
                ahead.append(self.pool.submit(self._read, chunk))
            while ahead:
                keys, labels, images, bad, read_s = ahead.popleft().result()
                for chunk in itertools.islice(pending, 1):
                    ahead.append(self.pool.submit(self._read, chunk))
                rejects.extend(bad)
                seconds["read"] += read_s
                if keys:
                    t = time.perf_counter()
                    latents = self.encoder(images, keys)
                    seconds["vae"] += time.perf_counter() - t
                    yield from zip(keys, labels, latents, strict=True)

        start = time.perf_counter()
        stream = samples()
        first = next(stream, None)
        if first is None:
            info = write_empty_shard_info(self.root, index, self.spec, rejects, plan)
        else:  # write_shard reads ``rejects`` after it has consumed every sample
            info = write_shard(self.root, index, itertools.chain([first], stream), self.spec,
                               sidecar=True, rejects=rejects, plan=plan)  # fmt: skip
        write_s = time.perf_counter() - start - seconds["read"] - seconds["vae"]
        return {
            "shard": index, "encoded": info.num_samples, "rejected": len(rejects),
            "read_s": seconds["read"], "encode_s": seconds["vae"], "write_s": max(0.0, write_s),
        }  # fmt: skip


# ---- planning -------------------------------------------------------------------------------------


class ShardPlan:
    """Shard ``i`` = items ``[i*S, (i+1)*S)`` of the sorted listing, as (unit, first, last) spans.

    Held as the units' cumulative counts: O(units) memory, whatever the number of images."""

    def __init__(self, units: list[Unit], samples_per_shard: int):
        self.units, self.per_shard = units, samples_per_shard
        self.starts = [0, *itertools.accumulate(u.count for u in units)]
        self.num_items = self.starts[-1]

    def __len__(self) -> int:
        return math.ceil(self.num_items / self.per_shard)

    def span(self, index: int) -> list[tuple[Unit, int, int]]:
        lo, hi = index * self.per_shard, min((index + 1) * self.per_shard, self.num_items)
        out = []
        u = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            first, end = self.starts[u], self.starts[u + 1]
            take = min(hi, end)
            if take > lo:
                out.append((self.units[u], lo - first, take - first))
            lo = take
            u += 1
        return out

    def size(self, index: int) -> int:
        return min((index + 1) * self.per_shard, self.num_items) - index * self.per_shard

    def digest(self, index: int) -> str:
        """Names the shard's inputs (units' digests and ranges): a sidecar records it."""
        text = json.dumps([[u.prefix, u.digest, lo, hi] for u, lo, hi in self.span(index)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def row(self, index: int) -> dict:
        span = [[asdict(u), lo, hi] for u, lo, hi in self.span(index)]
        return {"shard": index, "span": json.dumps(span), "plan": self.digest(index)}


def run_description(cfg: EncodeConfig, listing: Listing, spec, samples_per_shard: int, identity: dict) -> dict:
    """What makes two runs the same run (and their shards interchangeable)."""
    return {
        "format_version": FORMAT_VERSION,
        "source_fingerprint": listing.fingerprint,
        "source_images": listing.num_items,
        "resolution": cfg.resolution,
        "vae": cfg.vae,
        "autoencoder": identity,
        "dtype": cfg.dtype,
        "spec": {"latent_shape": list(spec.latent_shape), "stored": spec.stored, "flips": spec.flips},
        "samples_per_shard": samples_per_shard,
        "micro_batch": cfg.micro_batch,
        "draft": cfg.draft,
        "num_classes": listing.selection.num_classes,
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
    listing = scan(
        cfg.source, cfg.source_format, class_list=cfg.class_list, labels=cfg.labels, num_classes=cfg.num_classes,
        classes=cfg.classes, limit=cfg.limit,
    )  # fmt: skip
    if not listing.num_items:
        raise EncodeError(f"{cfg.source}: no images selected (--classes {cfg.classes}, --limit {cfg.limit})")
    ae = load_autoencoder(cfg.vae)  # on the driver: a missing or unsupported autoencoder fails before any work
    try:
        spec = latent_spec(ae, cfg.resolution, cfg.stored)
    except ValueError as err:
        raise EncodeError(f"--resolution {cfg.resolution} / --stored with VAE {cfg.vae}: {err}") from None
    identity, transform = ae.identity, ae.own_transform()
    del ae
    plan = ShardPlan(listing.units, cfg.shard_size or spec.samples_per_shard())
    root = Root(cfg.dest)
    recorded = {k: identity[k] for k in ("class", "config_sha256")}
    run = run_description(cfg, listing, spec, plan.per_shard, recorded)
    total = listing.num_items
    if check_destination(root, run):
        card = DatasetCard.from_json(root.read_bytes(CARD_NAME).decode(), root.url_of(CARD_NAME))
        counts = card.extra.get("counts", {})
        return EncodeSummary(
            root.url, total, card.num_samples, counts.get("rejected", 0), card.num_shards, card.num_shards, 0,
            card.total_bytes, time.time() - start, counts.get("rejected_by_reason", {}),
        )  # fmt: skip
    if not root.exists(RUN_NAME):
        root.publish_bytes(RUN_NAME, (json.dumps(run, indent=1, sort_keys=True) + "\n").encode())

    root.abort_uploads()  # parts of uploads a killed worker began (billed, never visible)
    pending = _pending_shards(root, plan)
    stage_seconds: dict[str, float] = {}
    encoded_now = 0
    if pending:
        encoded_now = _encode_pending(cfg, root, spec, listing.selection, plan, pending, stage_seconds)
    root.fs.invalidate_cache()  # the workers wrote shards and sidecars since this process listed them
    encoded, rejected, by_reason, empty, rejects_bytes = _tally(root, plan)
    root.publish_bytes(REJECTS_NAME, rejects_bytes)
    if rejected and rejected == total:
        raise EncodeError(
            f"{cfg.source}: all {plural(total, 'input')} were rejected ({tally(by_reason)}); nothing was "
            f"encoded. See {root.url_of(REJECTS_NAME)} for each file and why"
        )
    if empty:
        raise EncodeError(
            f"{root.url}: every input of {plural(len(empty), 'shard')} {empty[:20]} was rejected "
            f"(see {root.url_of(REJECTS_NAME)}), so the "
            f"shard plan has a hole; fix or drop those inputs and encode to a new destination"
        )
    if encoded + rejected != total:
        raise EncodeError(f"counts do not reconcile: {encoded} encoded + {rejected} rejected != {total}")
    if rejected > cfg.max_reject_fraction * total:
        raise RejectsExceededError(
            f"{rejected} of {total} inputs rejected ({100 * rejected / total:.3f}% > "
            f"--max-reject-fraction {cfg.max_reject_fraction}): {tally(by_reason)}; see {root.url_of(REJECTS_NAME)}. "
            f"Every shard is committed; rerun with a higher --max-reject-fraction to accept them."
        )
    counts = {"source": total, "encoded": encoded, "rejected": rejected, "rejected_by_reason": by_reason}
    extra = {
        "counts": counts,
        "rejects": REJECTS_NAME,
        "encoder": {k: run[k] for k in ("dtype", "micro_batch", "draft", "samples_per_shard", "seed")},
        "source_url": cfg.source,
        "source_format": listing.selection.format.value,
    }
    stale = [n[: n.index(TEMP_MARK)] for n in root.list(SIDECAR_DIR) if TEMP_MARK in n]
    root.sweep_temporaries(sorted(set(stale)))  # finalize sweeps the shards' and the index's own
    card = finalize(
        root, iter_shard_infos(root, len(plan), spec), spec=spec, resolution=cfg.resolution, vae=cfg.vae,
        autoencoder=identity, transform=transform, num_classes=listing.selection.num_classes,
        source_fingerprint=listing.fingerprint, extra=extra,
    )  # fmt: skip
    return EncodeSummary(
        root.url, total, encoded, rejected, card.num_shards, len(plan) - len(pending), encoded_now,
        card.total_bytes, time.time() - start, by_reason, stage_seconds,
    )  # fmt: skip


def _pending_shards(root: Root, plan: ShardPlan) -> list[int]:
    """The shards not committed yet. A tar is committed; a sidecar without a tar is committed only
    for a shard whose every input was rejected (else its writer was killed before the tar)."""
    tars, sidecars = set(root.list(SHARD_DIR)), set(root.list(SIDECAR_DIR))
    pending = []
    for i in range(len(plan)):
        tar, side = shard_name(i), sidecar_name(i)  # names relative to the root, as Root.list gives them
        if tar in tars and side not in sidecars:
            raise EncodeError(
                f"{root.url_of(shard_name(i))} is committed without its sidecar {sidecar_name(i)}: it was not "
                f"written by this version of `sit encode`; encode to a new destination"
            )
        if tar not in tars and (side not in sidecars or read_sidecar(root, i).num_samples):
            pending.append(i)
    return pending


def _tally(root: Root, plan: ShardPlan) -> tuple[int, int, dict[str, int], list[int], bytes]:
    """One pass over the sidecars: (encoded, rejected, rejects by reason, empty shards, rejects.parquet)."""
    encoded, rejected, by_reason, empty = 0, 0, {}, []
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, REJECTS_SCHEMA, compression="zstd") as writer:
        for info in iter_shard_infos(root, len(plan)):
            i = info.index
            if info.plan != plan.digest(i):
                raise EncodeError(
                    f"{root.url_of(sidecar_name(i))} was written for other inputs than this run's plan: "
                    f"encode to a new destination"
                )
            if info.num_samples + len(info.rejects) != plan.size(i):
                raise EncodeError(
                    f"{root.url_of(sidecar_name(i))}: {info.num_samples} encoded + {len(info.rejects)} rejected "
                    f"!= the {plan.size(i)} inputs planned"
                )
            encoded += info.num_samples
            rejected += len(info.rejects)
            empty += [] if info.num_samples else [i]
            for r in info.rejects:
                by_reason[r[2]] = by_reason.get(r[2], 0) + 1
            if info.rejects:  # shards are in key order, each shard's rejects too: the file is sorted
                columns = list(zip(*sorted(info.rejects), strict=True))
                writer.write_table(
                    pa.table(dict(zip(REJECTS_SCHEMA.names, columns, strict=True)), schema=REJECTS_SCHEMA)
                )
    return encoded, rejected, by_reason, empty, sink.getvalue().to_pybytes()


def _encode_pending(
    cfg: EncodeConfig, root: Root, spec, selection: Selection, plan: ShardPlan, pending: list[int],
    seconds: dict[str, float],
) -> int:  # fmt: skip
    """Encode and write the pending shards on Ray; fills the per-stage ``seconds``; returns the samples encoded."""
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
    workers = min(workers, len(pending))
    spec_json = json.dumps({"latent_shape": list(spec.latent_shape), "stored": spec.stored, "flips": spec.flips})
    env = {"env_vars": worker_env()}  # endpoints and regions, never secrets
    # one row (one block) per shard: the unit of work, a few hundred bytes; never a row per image
    ds = ray.data.from_items([plan.row(i) for i in pending], override_num_blocks=len(pending))
    with warnings.catch_warnings():  # Ray 2.60 takes max_restarts only through its deprecated **ray_remote_args
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map(
            ShardStage,
            fn_constructor_kwargs={
                "selection": selection,
                "dest": root,
                "vae": cfg.vae,
                "dtype": cfg.dtype,
                "spec_json": spec_json,
                "resolution": cfg.resolution,
                "draft": cfg.draft,
                "micro_batch": cfg.micro_batch,
                "seed": cfg.seed,
                "threads": int(cfg.cpus_per_worker),
                "readers": math.ceil(readers / workers),
                "gpu": gpus > 0,
            },
            num_cpus=cfg.cpus_per_worker + readers / workers,
            num_gpus=gpus,
            compute=ray.data.ActorPoolStrategy(size=workers),
            runtime_env=env,
            **NO_RESTARTS,
        )
    total_images = sum(plan.size(i) for i in pending)
    bar = tqdm(total=total_images, unit="img", desc="encode", disable=not cfg.progress, dynamic_ncols=True)
    seconds.update({"read+decode+crop": 0.0, "vae": 0.0, "write": 0.0})
    done, rejected, encoded = len(plan) - len(pending), 0, 0
    for row in _rows(ds):
        seconds["read+decode+crop"] += row["read_s"]
        seconds["vae"] += row["encode_s"]
        seconds["write"] += row["write_s"]
        encoded += int(row["encoded"])
        rejected += int(row["rejected"])
        done += 1
        bar.update(int(row["encoded"]) + int(row["rejected"]))
        bar.set_postfix_str(f"shards {done}/{len(plan)}, rejects {rejected}", refresh=False)
    bar.close()
    return encoded


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
