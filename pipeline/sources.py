"""Image sources: list every image of a dataset (sorted keys, labels, where its bytes are) and read them.

Four layouts, at any fsspec URL (local path, file://, s3://, gs://):

* ``imagefolder`` - the ILSVRC-2012 train layout ``<root>/<wnid>/<file>``. Label = index of the
  wnid among the sorted wnids found, or in ``class_list`` (one wnid per line) when given; a folder
  not in the class list gives "unknown-label" rejects. Key ``<wnid>/<file stem>``.
* ``valfolder`` - images directly under ``<root>`` plus a labels file: lines of
  ``<file name or stem> <label>`` (whitespace or comma separated; a header line is skipped); the
  label is an integer or a wnid (then indexed as above, from ``class_list`` or the sorted wnids of
  the labels file). Kaggle's ``LOC_val_solution.csv`` works as is. Key ``val/<file stem>``.
* ``parquet`` - Hugging Face-style shards ``*.parquet``: an ``image`` struct column with ``bytes``
  and an integer ``label``. Key ``<file stem>/<row, 8 digits>``.
* ``wds`` - webdataset tars ``*.tar`` of ``<key>.jpg|jpeg|png|webp`` + ``<key>.cls``.
  Key ``<tar stem>/<sample key>``.

Listing at scale (`scan`): a source is listed once, one *unit* at a time - a class folder, a parquet
file, a tar, the validation folder - on a thread pool, in key order; a job keeps per unit only its
item count and a digest (`Unit`), and a worker lists its shard's units again (`planned_items`,
which checks the digest). The format is detected from the root's first level and a few folders.
`list_source` lists everything into memory, for small sources and tests.

Keys are sanitised to the latent format's alphabet (other characters become ``_``); two source
files that sanitise to the same key are an error naming both. The fingerprint hashes every
(key, label, relative location, size), so it names the content, not where it is stored.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import posixpath
import re
import tarfile
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import fsspec
import pyarrow.parquet as pq

from latents.storage import retry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UNKNOWN_LABEL = -1
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-/]")


class SourceFormat(enum.Enum):
    AUTO = "auto"
    IMAGEFOLDER = "imagefolder"
    VALFOLDER = "valfolder"
    PARQUET = "parquet"
    WDS = "wds"

    @classmethod
    def parse(cls, name: str) -> SourceFormat:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"unknown source format {name!r}; valid: {', '.join(m.value for m in cls)}") from None


class SourceError(Exception):
    """The source cannot be listed: missing, empty, ambiguous keys or a bad labels file."""


@dataclass(frozen=True)
class SourceItem:
    """One image of the source: its key, label and where its bytes are."""

    key: str
    label: int  # UNKNOWN_LABEL when ``label_error`` says why
    url: str  # the image file, the parquet file or the tar
    member: str = ""  # tar member name, or the parquet row as text
    start: int = -1  # byte offset in a tar, or row in a parquet file
    size: int = -1  # bytes (file or tar member); -1 for parquet rows
    label_error: str = ""

    @property
    def where(self) -> str:
        """The source location for messages and the rejects table."""
        return f"{self.url}#{self.member}" if self.member else self.url

    def to_row(self) -> dict:
        return asdict(self)


@dataclass
class Source:
    """A listed source: items sorted by key, classes, a fingerprint."""

    url: str
    format: SourceFormat
    items: list[SourceItem]
    num_classes: int
    class_names: list[str]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.format.value.encode())
        for it in self.items:
            h.update(_line(it, self.url.rstrip("/")))
        return f"{self.format.value}:{len(self.items)}:sha256:{h.hexdigest()[:32]}"


def sanitize_key(text: str) -> str:
    return _BAD_KEY_CHARS.sub("_", text)[:88]


def _stem(name: str) -> str:
    base = posixpath.basename(name)
    return base.split(".", 1)[0] if "." in base else base


def _read_lines(url: str) -> list[str]:
    try:
        with fsspec.open(url, "rt") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except (FileNotFoundError, PermissionError, IsADirectoryError, UnicodeDecodeError) as err:
        raise SourceError(f"{url}: cannot read it ({type(err).__name__}: {err})") from None


def _ls(fs, path: str) -> list[dict]:
    """One level of ``path`` (files and folders), [] if it is missing."""
    try:
        return retry(lambda: fs.ls(path, detail=True), f"listing {path}")
    except (FileNotFoundError, NotADirectoryError):
        return []


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def _check_unique(items: list[SourceItem]) -> list[SourceItem]:
    for a, b in itertools.pairwise(items):
        if a.key == b.key:
            raise SourceError(f"two source images map to the key {a.key!r}: {a.where} and {b.where}")
    return items


# ---- listing units --------------------------------------------------------------------------------
# A source is listed one *unit* at a time: a class folder, a parquet file, a tar or the validation
# folder. Every key of a unit starts with "<its prefix>/", so sorting units by prefix and items
# inside each unit sorts all keys: the plan needs only each unit's item count, never every item.


@dataclass(frozen=True)
class Unit:
    """A listing unit: its items are listed together (by one `unit_items` call) and sorted."""

    url: str  # the class folder, parquet file, tar or validation folder
    prefix: str  # every key of the unit is "<prefix>/..."; units sort by prefix + "/"
    label: int = UNKNOWN_LABEL  # a class folder's label (other units: per item)
    label_error: str = ""
    count: int = -1  # items the plan takes from the unit (its first ones, after --classes / --limit)
    digest: str = ""  # sha256 of those items' fingerprint lines: a worker checks it lists the same


@dataclass(frozen=True)
class Selection:
    """What every unit's listing needs: the format, labels and the ``--classes`` subset."""

    url: str
    format: SourceFormat
    num_classes: int
    class_names: tuple[str, ...]
    labels: str | None = None  # the validation folder's labels file
    wanted: frozenset[int] | None = None  # --classes: the labels kept (None: all)


@dataclass
class Listing:
    """A listed source, held as units with counts (never as per-image objects)."""

    selection: Selection
    units: list[Unit]  # the units with items, in key order
    num_items: int
    fingerprint: str


def _line(item: SourceItem, root: str) -> bytes:
    rel = item.url[len(root) :] if item.url.startswith(root) else item.url
    return f"\n{item.key}\t{item.label}\t{rel}\t{item.member}\t{item.size}".encode()


def detect_format(url: str, labels: str | None, sample_folders: int = 3) -> SourceFormat:
    """The layout, from the root's first level and at most ``sample_folders`` folders under it."""
    fs, path = fsspec.core.url_to_fs(url)
    entries = _ls(fs, path.rstrip("/"))
    if not entries:
        raise SourceError(f"{path}: no files found (missing or empty source)")
    names = [e["name"] for e in entries if e.get("type") != "directory"]
    for folder in [e["name"] for e in entries if e.get("type") == "directory"][:sample_folders]:
        names += [e["name"] for e in _ls(fs, folder)[:1000]]
    if any(n.endswith(".parquet") for n in names):
        return SourceFormat.PARQUET
    if any(n.endswith(".tar") for n in names):
        return SourceFormat.WDS
    return SourceFormat.VALFOLDER if labels else SourceFormat.IMAGEFOLDER


def open_source(
    url: str,
    fmt: SourceFormat = SourceFormat.AUTO,
    *,
    class_list: str | None = None,
    labels: str | None = None,
    num_classes: int | None = None,
    classes: str | None = None,
) -> tuple[Selection, list[Unit]]:
    """The source's units (not yet listed), sorted, and what listing them needs. Lists one level
    (class folders) or the data files (parquet files, tars), never the images of a folder."""
    if fmt is SourceFormat.AUTO:
        fmt = detect_format(url, labels)
    names = _read_lines(class_list) if class_list else None
    fs, root = fsspec.core.url_to_fs(url)
    root, protocol = root.rstrip("/"), _protocol(url)
    if fmt is SourceFormat.IMAGEFOLDER:
        entries = _ls(fs, root)
        if not entries:
            raise SourceError(f"{root}: no files found (missing or empty source)")
        folders = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")
        if not folders:
            raise SourceError(f"{url}: no files in class folders (expected <root>/<class>/<image>)")
        names = names if names is not None else folders
        index = {w: i for i, w in enumerate(names)}
        units = [
            Unit(f"{protocol}{root}/{w}", sanitize_key(w), index.get(w, UNKNOWN_LABEL),
                 "" if w in index else f"class folder {w!r} is not in the class list")
            for w in folders
        ]  # fmt: skip
    elif fmt is SourceFormat.VALFOLDER:
        if not labels:
            raise SourceError("the valfolder source needs --labels FILE")
        if names is None:
            names = sorted({v for _, v in _parse_labels(labels) if not v.lstrip("-").isdigit()})
        units = [Unit(f"{protocol}{root}", "val")]
    else:
        ext = ".parquet" if fmt is SourceFormat.PARQUET else ".tar"
        try:
            found = retry(lambda: fs.find(root), f"listing {root}")
        except FileNotFoundError:
            found = []
        files = [p for p in found if p.endswith(ext)]
        if not found:
            raise SourceError(f"{root}: no files found (missing or empty source)")
        units = [Unit(protocol + p, sanitize_key(_stem(p))) for p in files]
        names = names or []
    n = num_classes or len(names) or 1000
    if names and num_classes and num_classes != len(names):
        raise SourceError(f"--num-classes {num_classes} disagrees with the {len(names)} classes of the source")
    units.sort(key=lambda u: u.prefix + "/")
    for a, b in itertools.pairwise(units):
        if a.prefix == b.prefix:
            raise SourceError(f"{a.url} and {b.url} map to the same keys {a.prefix}/...: rename one")
    wanted = _wanted(classes, names)
    if wanted is not None and fmt is SourceFormat.IMAGEFOLDER:
        units = [u for u in units if u.label in wanted]  # --classes: the other folders are never listed
    return Selection(url, fmt, n, tuple(names), labels, wanted), units


def _wanted(classes: str | None, names: list[str]) -> frozenset[int] | None:
    """``--classes``: ``N`` (labels 0..N-1) or a comma list of class names (wnids) or label indices."""
    if not classes:
        return None
    if classes.isdigit():
        return frozenset(range(int(classes)))
    index = {w: i for i, w in enumerate(names)}
    wanted = set()
    for c in classes.split(","):
        c = c.strip()
        if c.isdigit():
            wanted.add(int(c))
        elif c in index:
            wanted.add(index[c])
        else:
            raise SourceError(f"--classes: {c!r} is neither a label index nor a class name of the source")
    return frozenset(wanted)


def unit_items(selection: Selection, unit: Unit) -> list[SourceItem]:
    """Every selected item of ``unit``, sorted by key (labels outside [0, num_classes) are unknown)."""
    fmt, n = selection.format, selection.num_classes
    if fmt is SourceFormat.IMAGEFOLDER:
        items = _list_class_folder(unit)
    elif fmt is SourceFormat.VALFOLDER:
        items = _list_valfolder(unit.url, selection.labels, list(selection.class_names))
    elif fmt is SourceFormat.PARQUET:
        items = _list_parquet_file(unit.url)
    else:
        items = _list_tar(unit.url)
    items = [
        SourceItem(**{**it.to_row(), "label": UNKNOWN_LABEL, "label_error": f"label {it.label} not in [0, {n})"})
        if it.label != UNKNOWN_LABEL and not 0 <= it.label < n
        else it
        for it in items
    ]
    if selection.wanted is not None:
        items = [it for it in items if it.label in selection.wanted]
    items.sort(key=lambda it: it.key)
    return _check_unique(items)


def planned_items(selection: Selection, unit: Unit) -> list[SourceItem]:
    """The unit's first ``unit.count`` items, checked against the digest the plan was made with."""
    items = unit_items(selection, unit)[: unit.count]
    digest = hashlib.sha256()
    for it in items:
        digest.update(_line(it, selection.url.rstrip("/")))
    if len(items) != unit.count or digest.hexdigest()[:32] != unit.digest:
        raise SourceError(
            f"{unit.url} changed since the job listed it ({len(items)} items now, {unit.count} then): "
            f"encode to a new destination"
        )
    return items


def scan(
    url: str,
    fmt: SourceFormat = SourceFormat.AUTO,
    *,
    class_list: str | None = None,
    labels: str | None = None,
    num_classes: int | None = None,
    classes: str | None = None,
    limit: int | None = None,
    threads: int = 16,
) -> Listing:
    """List the source once, ``threads`` units at a time, in key order; keep per unit only its count
    and digest. With ``limit``, listing stops once the first ``limit`` items are found."""
    selection, units = open_source(
        url, fmt, class_list=class_list, labels=labels, num_classes=num_classes, classes=classes
    )
    root = url.rstrip("/")
    fingerprint = hashlib.sha256(selection.format.value.encode())
    kept, total = [], 0
    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        pending = iter(units)
        for unit in itertools.islice(pending, threads):
            window.append((unit, pool.submit(unit_items, selection, unit)))
        while window and (limit is None or total < limit):
            unit, future = window.popleft()
            for nxt in itertools.islice(pending, 1):
                window.append((nxt, pool.submit(unit_items, selection, nxt)))
            items = future.result()
            if limit is not None:
                items = items[: limit - total]
            if not items:
                continue
            digest = hashlib.sha256()
            for it in items:
                line = _line(it, root)
                fingerprint.update(line)
                digest.update(line)
            kept.append(replace(unit, count=len(items), digest=digest.hexdigest()[:32]))
            total += len(items)
        for _, future in window:
            future.cancel()
    fp = f"{selection.format.value}:{total}:sha256:{fingerprint.hexdigest()[:32]}"
    return Listing(selection, kept, total, fp)


def list_source(
    url: str,
    fmt: SourceFormat = SourceFormat.AUTO,
    *,
    class_list: str | None = None,
    labels: str | None = None,
    num_classes: int | None = None,
) -> Source:
    """Every image at ``url``, sorted by key, in memory: for small sources and tests (jobs use `scan`)."""
    selection, units = open_source(url, fmt, class_list=class_list, labels=labels, num_classes=num_classes)
    items = [it for unit in units for it in unit_items(selection, unit)]
    if not items:
        raise SourceError(f"{url}: no images found")
    return Source(url, selection.format, items, selection.num_classes, list(selection.class_names))


def _list_class_folder(unit: Unit) -> list[SourceItem]:
    fs, folder = fsspec.core.url_to_fs(unit.url)
    protocol, wnid = _protocol(unit.url), posixpath.basename(folder.rstrip("/"))
    return [
        SourceItem(
            sanitize_key(f"{wnid}/{_stem(e['name'])}"), unit.label, protocol + e["name"],
            size=int(e.get("size") or 0), label_error=unit.label_error,
        )
        for e in _ls(fs, folder.rstrip("/"))
        if e.get("type") != "directory"
    ]  # fmt: skip


def _parse_labels(url: str) -> list[tuple[str, str]]:
    rows = []
    for line in _read_lines(url):
        fields = re.split(r"[,\s]+", line)
        if len(fields) < 2:
            raise SourceError(f"{url}: line {line!r} is not '<file> <label>'")
        rows.append((fields[0], fields[1]))
    if rows and not rows[0][1].isdigit() and rows[0][0].lower() in ("imageid", "file", "filename", "image", "name"):
        rows = rows[1:]  # header
    return rows


def _list_valfolder(url: str, labels: str, names: list[str]) -> list[SourceItem]:
    fs, root = fsspec.core.url_to_fs(url)
    protocol = _protocol(url)
    index = {w: i for i, w in enumerate(names)}
    by_stem: dict[str, tuple[int, str]] = {}
    for name, value in _parse_labels(labels):
        if value.lstrip("-").isdigit():
            by_stem[_stem(name)] = (int(value), "")
        elif value in index:
            by_stem[_stem(name)] = (index[value], "")
        else:
            by_stem[_stem(name)] = (UNKNOWN_LABEL, f"class {value!r} is not in the class list")
    items = []
    for e in _ls(fs, root.rstrip("/")):
        if e.get("type") == "directory":
            continue
        path, stem = e["name"], _stem(e["name"])
        label, error = by_stem.get(stem, (UNKNOWN_LABEL, f"no label for {stem!r} in {labels}"))
        size = int(e.get("size") or 0)
        items.append(SourceItem(sanitize_key(f"val/{stem}"), label, protocol + path, size=size, label_error=error))
    return items


def _list_parquet_file(url: str) -> list[SourceItem]:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["label"])
    stem = _stem(path)
    items = []
    for row, label in enumerate(table.column("label").to_pylist()):
        lab, error = (UNKNOWN_LABEL, "label is null") if label is None else (int(label), "")
        items.append(SourceItem(sanitize_key(f"{stem}/{row:08d}"), lab, url, f"row{row}", row, -1, error))
    return items


def _list_tar(url: str) -> list[SourceItem]:
    fs, path = fsspec.core.url_to_fs(url)
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, str] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:  # streaming: headers in order, .cls contents read as we pass
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
            ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
            if ext == ".cls":
                labels[key] = tar.extractfile(member).read().decode(errors="replace").strip()
            elif ext in IMAGE_EXTENSIONS:
                images[key] = member
    stem = _stem(path)
    items = []
    for key, member in images.items():
        text = labels.get(key)
        if text is None or not text.lstrip("-").isdigit():
            label, error = UNKNOWN_LABEL, f"no integer label ({key}.cls is {text!r})"
        else:
            label, error = int(text), ""
        key_ = sanitize_key(f"{stem}/{key}")
        items.append(SourceItem(key_, label, url, member.name, member.offset_data, member.size, error))
    return items


def select(items: list[SourceItem], classes: str | None, limit: int | None, names: list[str]) -> list[SourceItem]:
    """The ``--classes`` and ``--limit`` subsets, in key order (labels keep their meaning in the full list)."""
    wanted = _wanted(classes, names)
    if wanted is not None:
        items = [it for it in items if it.label in wanted]
    if limit is not None:
        items = items[:limit]
    return items


class ImageReader:
    """Reads items' bytes; keeps the last parquet row groups it read (rows come in key order)."""

    def __init__(self, cache_groups: int = 4):
        self._groups: OrderedDict[tuple[str, int], list] = OrderedDict()
        self._cache_groups = cache_groups

    def read(self, item: SourceItem) -> bytes:
        """The image bytes. Missing/forbidden files raise OSError; transient errors are retried."""
        if item.start < 0:
            return retry(lambda: _fs_cat(item.url), f"reading {item.where}")
        if item.size >= 0:  # a tar member
            return retry(lambda: _fs_cat(item.url, item.start, item.start + item.size), f"reading {item.where}")
        return self._parquet_row(item)

    def _parquet_row(self, item: SourceItem) -> bytes:
        meta = self._metadata(item.url)
        group, first = 0, 0
        while first + meta.row_group(group).num_rows <= item.start:
            first += meta.row_group(group).num_rows
            group += 1
        cache_key = (item.url, group)
        if cache_key not in self._groups:
            fs, path = fsspec.core.url_to_fs(item.url)

            def load() -> list:
                with fs.open(path, "rb") as f:
                    return pq.ParquetFile(f).read_row_group(group, columns=["image"]).column("image").to_pylist()

            self._groups[cache_key] = retry(load, f"reading {item.url} row group {group}")
            while len(self._groups) > self._cache_groups:
                self._groups.popitem(last=False)
        value = self._groups[cache_key][item.start - first]
        data = value.get("bytes") if isinstance(value, dict) else value
        return data or b""

    def _metadata(self, url: str):
        cache_key = (url, -1)
        if cache_key not in self._groups:
            fs, path = fsspec.core.url_to_fs(url)
            with fs.open(path, "rb") as f:
                self._groups[cache_key] = pq.ParquetFile(f).metadata
        self._groups.move_to_end(cache_key)
        return self._groups[cache_key]


def _fs_cat(url: str, start: int | None = None, end: int | None = None) -> bytes:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path, start=start, end=end)
