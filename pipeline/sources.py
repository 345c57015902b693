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
from collections import OrderedDict
from dataclasses import asdict, dataclass

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
        root = self.url.rstrip("/")
        for it in self.items:
            rel = it.url[len(root) :] if it.url.startswith(root) else it.url
            h.update(f"\n{it.key}\t{it.label}\t{rel}\t{it.member}\t{it.size}".encode())
        return f"{self.format.value}:{len(self.items)}:sha256:{h.hexdigest()[:32]}"


def sanitize_key(text: str) -> str:
    return _BAD_KEY_CHARS.sub("_", text)[:88]


def _stem(name: str) -> str:
    base = posixpath.basename(name)
    return base.split(".", 1)[0] if "." in base else base


def _relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` (fsspec paths may or may not start with "/")."""
    p, r = path.lstrip("/"), root.strip("/")
    return p[len(r) + 1 :] if r and p.startswith(r + "/") else p


def _read_lines(url: str) -> list[str]:
    try:
        with fsspec.open(url, "rt") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except (FileNotFoundError, PermissionError, IsADirectoryError, UnicodeDecodeError) as err:
        raise SourceError(f"{url}: cannot read it ({type(err).__name__}: {err})") from None


def _find(fs, path: str) -> dict[str, dict]:
    try:
        found = retry(lambda: fs.find(path, detail=True), f"listing {path}")
    except FileNotFoundError:
        found = {}
    if not found:
        raise SourceError(f"{path}: no files found (missing or empty source)")
    return found


def _unique_sorted(items: list[SourceItem]) -> list[SourceItem]:
    items.sort(key=lambda it: it.key)
    for a, b in itertools.pairwise(items):
        if a.key == b.key:
            raise SourceError(f"two source images map to the key {a.key!r}: {a.where} and {b.where}")
    return items


def detect_format(url: str, labels: str | None) -> SourceFormat:
    fs, path = fsspec.core.url_to_fs(url)
    names = list(_find(fs, path))
    if any(n.endswith(".parquet") for n in names):
        return SourceFormat.PARQUET
    if any(n.endswith(".tar") for n in names):
        return SourceFormat.WDS
    return SourceFormat.VALFOLDER if labels else SourceFormat.IMAGEFOLDER


def list_source(
    url: str,
    fmt: SourceFormat = SourceFormat.AUTO,
    *,
    class_list: str | None = None,
    labels: str | None = None,
    num_classes: int | None = None,
) -> Source:
    """List every image at ``url``, sorted by key."""
    if fmt is SourceFormat.AUTO:
        fmt = detect_format(url, labels)
    classes = _read_lines(class_list) if class_list else None
    if fmt is SourceFormat.IMAGEFOLDER:
        items, names = _list_imagefolder(url, classes)
    elif fmt is SourceFormat.VALFOLDER:
        if not labels:
            raise SourceError("the valfolder source needs --labels FILE")
        items, names = _list_valfolder(url, labels, classes)
    elif fmt is SourceFormat.PARQUET:
        items, names = _list_parquet(url), classes or []
    else:
        items, names = _list_wds(url), classes or []
    n = num_classes or len(names) or 1000
    if names and num_classes and num_classes != len(names):
        raise SourceError(f"--num-classes {num_classes} disagrees with the {len(names)} classes of the source")
    items = [
        SourceItem(**{**it.to_row(), "label": UNKNOWN_LABEL, "label_error": f"label {it.label} not in [0, {n})"})
        if it.label != UNKNOWN_LABEL and not 0 <= it.label < n
        else it
        for it in items
    ]
    return Source(url, fmt, _unique_sorted(items), n, list(names))


def _list_imagefolder(url: str, classes: list[str] | None) -> tuple[list[SourceItem], list[str]]:
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    found = _find(fs, root)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    per_file = []
    for path, info in found.items():
        parts = _relative(path, root).split("/")
        if len(parts) == 2:  # files outside class folders are not images of a class
            per_file.append((parts[0], parts[1], protocol + path, int(info.get("size") or 0)))
    wnids = classes if classes is not None else sorted({w for w, _, _, _ in per_file})
    index = {w: i for i, w in enumerate(wnids)}
    items = []
    for wnid, name, file_url, size in per_file:
        label = index.get(wnid, UNKNOWN_LABEL)
        error = "" if wnid in index else f"class folder {wnid!r} is not in the class list"
        items.append(SourceItem(sanitize_key(f"{wnid}/{_stem(name)}"), label, file_url, size=size, label_error=error))
    if not items:
        raise SourceError(f"{url}: no files in class folders (expected <root>/<class>/<image>)")
    return items, wnids


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


def _list_valfolder(url: str, labels: str, classes: list[str] | None) -> tuple[list[SourceItem], list[str]]:
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    rows = _parse_labels(labels)
    wnids = [v for _, v in rows if not v.lstrip("-").isdigit()]
    names = classes if classes is not None else sorted(set(wnids))
    index = {w: i for i, w in enumerate(names)}
    by_stem: dict[str, tuple[int, str]] = {}
    for name, value in rows:
        if value.lstrip("-").isdigit():
            by_stem[_stem(name)] = (int(value), "")
        elif value in index:
            by_stem[_stem(name)] = (index[value], "")
        else:
            by_stem[_stem(name)] = (UNKNOWN_LABEL, f"class {value!r} is not in the class list")
    items = []
    for path, info in _find(fs, root).items():
        if "/" in _relative(path, root):
            continue
        stem = _stem(path)
        label, error = by_stem.get(stem, (UNKNOWN_LABEL, f"no label for {stem!r} in {labels}"))
        size = int(info.get("size") or 0)
        items.append(SourceItem(sanitize_key(f"val/{stem}"), label, protocol + path, size=size, label_error=error))
    return items, names


def _list_parquet(url: str) -> list[SourceItem]:
    fs, root = fsspec.core.url_to_fs(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    files = sorted(p for p in _find(fs, root.rstrip("/")) if p.endswith(".parquet"))
    items = []
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["label"])
        stem = _stem(path)
        for row, label in enumerate(table.column("label").to_pylist()):
            lab, error = (UNKNOWN_LABEL, "label is null") if label is None else (int(label), "")
            items.append(
                SourceItem(sanitize_key(f"{stem}/{row:08d}"), lab, protocol + path, f"row{row}", row, -1, error)
            )
    return items


def _list_wds(url: str) -> list[SourceItem]:
    fs, root = fsspec.core.url_to_fs(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    tars = sorted(p for p in _find(fs, root.rstrip("/")) if p.endswith(".tar"))
    items = []
    for path in tars:
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
        for key, member in images.items():
            text = labels.get(key)
            if text is None or not text.lstrip("-").isdigit():
                label, error = UNKNOWN_LABEL, f"no integer label ({key}.cls is {text!r})"
            else:
                label, error = int(text), ""
            items.append(
                SourceItem(
                    sanitize_key(f"{stem}/{key}"),
                    label,
                    protocol + path,
                    member.name,
                    member.offset_data,
                    member.size,
                    error,
                )
            )
    return items


def select(items: list[SourceItem], classes: str | None, limit: int | None, names: list[str]) -> list[SourceItem]:
    """The ``--classes`` and ``--limit`` subsets, in key order.

    ``classes``: ``N`` (labels 0..N-1) or a comma list of class names (wnids) or label indices.
    Labels keep their meaning in the full class list.
    """
    if classes:
        if classes.isdigit():
            wanted = set(range(int(classes)))
        else:
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
