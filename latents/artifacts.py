"""What kind of artifact is at a URL: the one place every `sit` command asks before it reads or writes.

Each command writes one kind of folder (or file) and reads others. Pointing a command at the
wrong kind used to go wrong in many ways: a sample job wrote its chunks beside a latent dataset,
an output path that was a regular file ended in a traceback. `detect` looks at a URL once, by the
marker file each kind publishes first, and `require_output` / `require_input` turn a mismatch
into one `ArtifactError` line naming the URL, the flag and what is there.

    kind             marker (any one of them)                 written by
    latent dataset   card.json, encode-run.json               `sit encode` (latents.format, pipeline.job)
    training run     metrics.jsonl, config.json + checkpoints/ `sit train --run-dir`
    samples          run.json of format sit-samples, chunks/   `sit sample` (sampling.output)
    demo             demo-size.json                            `sit demo --out`
    model            config.json with a diffusers _class_name  `save_pretrained` (a VAE)

The marker names are owned here; the modules that write them import them. Local folders only
hold the listed markers at their top level, so detection costs a listing and at most one small
read. "Not writable" is checked where it can be without writing: a path below a regular file
(which fails even for root, unlike file permissions) and, for other users, missing write access.
"""

from __future__ import annotations

import enum
import json
import os

from latents.format import CARD_NAME
from latents.storage import Root, retry

ENCODE_RUN_FILE = "encode-run.json"  # pipeline.job: written before the first shard
SAMPLES_RUN_FILE = "run.json"  # sampling.output: written before the first chunk
SAMPLES_CHUNK_DIR = "chunks"
SAMPLES_FORMAT = "sit-samples"
TRAIN_METRICS_FILE = "metrics.jsonl"  # trainer.metrics
TRAIN_CONFIG_FILE = "config.json"  # trainer.train: the resolved config
TRAIN_CHECKPOINT_DIR = "checkpoints"
DEMO_SIZE_FILE = "demo-size.json"  # cluster.demo


class Kind(enum.Enum):
    """What a URL holds; the value is how messages name it."""

    NOTHING = "nothing"
    EMPTY = "an empty folder"
    FILE = "a file"
    FOLDER = "a folder of other files"
    LATENT_DATASET = "a latent dataset (`sit encode` output)"
    TRAIN_RUN = "a training run folder (`sit train --run-dir`)"
    SAMPLES = "a sample output folder (`sit sample`)"
    DEMO = "a `sit demo` folder"
    MODEL = "a diffusers model folder (save_pretrained, e.g. a VAE)"


class ArtifactError(ValueError):
    """A URL holds another kind of artifact than the command reads or writes; names both."""


def _json(root: Root, name: str) -> dict:
    try:
        value = json.loads(root.read_bytes(name))
    except (ValueError, UnicodeDecodeError, OSError):
        return {}
    return value if isinstance(value, dict) else {}


def detect(url: str) -> Kind:
    """The kind of artifact at ``url`` (see the module docstring); a `StorageError` for a bad URL."""
    root = Root(url)
    fs, path, what = root.fs, root.path, f"looking at {root.url}"
    if not retry(lambda: fs.exists(path), what, root.attempts):
        return Kind.NOTHING
    if retry(lambda: fs.isfile(path), what, root.attempts):
        return Kind.FILE
    names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in retry(lambda: fs.ls(path, detail=False), what)}
    if not names:
        return Kind.EMPTY
    if CARD_NAME in names or ENCODE_RUN_FILE in names:
        return Kind.LATENT_DATASET
    if DEMO_SIZE_FILE in names:
        return Kind.DEMO
    if TRAIN_METRICS_FILE in names or {TRAIN_CONFIG_FILE, TRAIN_CHECKPOINT_DIR} <= names:
        return Kind.TRAIN_RUN
    if SAMPLES_CHUNK_DIR in names or (
        SAMPLES_RUN_FILE in names and _json(root, SAMPLES_RUN_FILE).get("format") == SAMPLES_FORMAT
    ):
        return Kind.SAMPLES
    if TRAIN_CONFIG_FILE in names and "_class_name" in _json(root, TRAIN_CONFIG_FILE):
        return Kind.MODEL
    return Kind.FOLDER


def _blocked_local_parent(url: str) -> str | None:
    """Why a local ``url`` cannot be created, or None: an ancestor that is a file, or not writable."""
    root = Root(url)
    if not root.is_local:
        return None
    path = os.path.abspath(root.path)
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent != path and not os.path.isdir(parent):
        return f"{parent} is a file, so nothing can be created below it"
    target = path if os.path.isdir(path) else parent
    if not os.access(target, os.W_OK | os.X_OK):
        return f"{target} is not writable"
    return None


def require_output(url: str, kind: Kind, flag: str) -> Kind:
    """Refuse ``url`` as the output of a job that writes ``kind``; returns what is there.

    Accepted: nothing yet, an empty folder, a folder of unrelated files, or an earlier output of
    the same kind (the jobs' own resume checks decide whether it is the same run).
    """
    found = detect(url)
    if found not in (Kind.NOTHING, Kind.EMPTY, Kind.FOLDER, kind):
        hint = "; choose a new location" if found is not Kind.FILE else "; give a folder that does not exist yet"
        raise ArtifactError(f"{flag} {url} is {found.value}, not {kind.value}{hint}")
    blocked = _blocked_local_parent(url)
    if blocked:
        raise ArtifactError(f"{flag} {url} cannot be written: {blocked}")
    return found


def require_output_file(url: str, flag: str) -> None:
    """Refuse ``url`` as a file a command writes (a grid PNG, statistics): not a folder, a creatable path."""
    found = detect(url)
    if found not in (Kind.NOTHING, Kind.FILE):
        raise ArtifactError(f"{flag} {url} is {found.value}; give a file name")
    blocked = _blocked_local_parent(url)
    if blocked:
        raise ArtifactError(f"{flag} {url} cannot be written: {blocked}")


def require_input(url: str, kind: Kind, flag: str) -> None:
    """Refuse ``url`` as an input of ``kind`` when it clearly holds something else (one line)."""
    found = detect(url)
    if found is Kind.NOTHING:
        raise FileNotFoundError(f"{flag} {url}: not found")
    if found is not kind and found not in (Kind.FOLDER, Kind.EMPTY):
        raise ArtifactError(f"{flag} {url} is {found.value}, not {kind.value}")


ARTIFACTS = (Kind.LATENT_DATASET, Kind.TRAIN_RUN, Kind.SAMPLES, Kind.DEMO, Kind.MODEL)


def require_not_artifact(url: str, flag: str, wanted: str, allowed: tuple[Kind, ...] = ()) -> Kind:
    """Refuse ``url`` as an input (images, samples, ...) when it holds one of our other artifacts."""
    found = detect(url)
    if found in ARTIFACTS and found not in allowed:
        raise ArtifactError(f"{flag} {url} is {found.value}, not {wanted}")
    return found


def require_file(url: str, flag: str, wanted: str) -> None:
    """Refuse ``url`` as an input file (a checkpoint, statistics) when it is missing or a folder."""
    found = detect(url)
    if found is Kind.NOTHING:
        raise FileNotFoundError(f"{flag} {url}: not found")
    if found is not Kind.FILE:
        hint = f"; its EMA export is {url.rstrip('/')}/ema.safetensors" if found is Kind.TRAIN_RUN else ""
        raise ArtifactError(f"{flag} {url} is {found.value}, not {wanted}{hint}")


def describe(url: str) -> str:
    """A few words on what is at ``url``, for messages ("a training run folder (...)")."""
    try:
        return detect(url).value
    except Exception:  # only for a message; the caller reports its own error
        return "unknown"
