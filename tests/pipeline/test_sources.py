"""Sources: the same images listed from folders, parquet and tars; sorted keys; labels; subsets; fingerprints."""

from __future__ import annotations

import posixpath
from typing import ClassVar

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.job import read_items
from pipeline.sources import (
    UNKNOWN_LABEL,
    ImageReader,
    Source,
    SourceError,
    SourceFormat,
    detect_format,
    list_source,
    planned_items,
    scan,
    select,
)


def _read_all(source) -> dict[str, bytes]:
    reader = ImageReader()
    return {it.key: reader.read(it) for it in source.items}


@pytest.mark.parametrize("layout", ["imagefolder", "parquet", "wds"])
def test_every_layout_lists_and_reads_every_image(sources, images, layout):
    url, expected = sources[layout]
    source = list_source(url)
    assert source.format is SourceFormat(layout)
    keys = [it.key for it in source.items]
    assert keys == sorted(keys) and set(keys) == set(expected)
    for key, data in _read_all(source).items():
        assert data == expected[key].data, key
    labels = {it.key: it.label for it in source.items}
    assert all(labels[k] == im.label for k, im in expected.items())


def test_fingerprint_names_content(sources, tmp_path):
    url, _ = sources["imagefolder"]
    first = list_source(url).fingerprint
    assert list_source(url).fingerprint == first
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(url, copy)
    assert list_source(str(copy)).fingerprint == first  # where it lives does not matter
    victim = next(p for p in copy.rglob("*.JPEG"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert list_source(str(copy)).fingerprint != first


def test_class_list_labels_and_unknown_classes(sources, tmp_path):
    url, expected = sources["imagefolder"]
    classes = tmp_path / "classes.txt"
    classes.write_text("n00000002\nn00000000\nn00000001\n")  # label order from the file; n00000003 unknown
    source = list_source(url, class_list=str(classes))
    assert source.num_classes == 3
    by_key = {it.key: it for it in source.items}
    for key, im in expected.items():
        want = {"n00000002": 0, "n00000000": 1, "n00000001": 2}.get(im.wnid, UNKNOWN_LABEL)
        assert by_key[key].label == want
        if want == UNKNOWN_LABEL:
            assert "n00000003" in by_key[key].label_error
    keys, _, _, rejects = read_items([by_key["n00000003/n00000003_0000"]], 64, False)
    assert keys == [] and rejects[0][2] == "unknown-label"


def test_classes_and_limit(sources):
    source = list_source(sources["imagefolder"][0])
    two = select(source.items, "2", None, source.class_names)
    assert {it.label for it in two} == {0, 1}
    named = select(source.items, "n00000003,1", 10, source.class_names)
    assert len(named) == 10 and {it.label for it in named} <= {1, 3}
    assert [it.key for it in named] == sorted(it.key for it in named)
    with pytest.raises(SourceError, match="n99"):
        select(source.items, "n99", None, source.class_names)


def test_validation_folder_with_labels_file(tmp_path, images):
    val = tmp_path / "val"
    val.mkdir()
    good = [im for im in images if not im.broken][:6]
    for n, im in enumerate(good):
        (val / f"ILSVRC2012_val_{n:08d}.JPEG").write_bytes(im.data)
    labels = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{n:08d},{im.wnid} 1 2 3 4" for n, im in enumerate(good[:5])]
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    source = list_source(str(val), labels=str(labels))
    assert source.format is SourceFormat.VALFOLDER and len(source.items) == 6
    wnids = sorted({im.wnid for im in good[:5]})
    by_key = {it.key: it for it in source.items}
    for n, im in enumerate(good[:5]):
        assert by_key[f"val/ILSVRC2012_val_{n:08d}"].label == wnids.index(im.wnid)
    assert by_key["val/ILSVRC2012_val_00000005"].label == UNKNOWN_LABEL  # no line in the labels file


def test_colliding_keys_are_an_error(tmp_path, images):
    folder = tmp_path / "train" / "n1"
    folder.mkdir(parents=True)
    (folder / "a b.JPEG").write_bytes(images[0].data)
    (folder / "a_b.JPEG").write_bytes(images[0].data)
    with pytest.raises(SourceError, match=r"a b\.JPEG"):
        list_source(str(tmp_path / "train"))


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="no files"):
        list_source(str(tmp_path / "nowhere"))


class CountingFileSystem(LocalFileSystem):
    """The local filesystem, recording every folder it lists (to show what listing touches)."""

    protocol = ("countfile",)
    listed: ClassVar[list[str]] = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("countfile://") if isinstance(path, str) else path)

    def ls(self, path, detail=True, **kwargs):
        CountingFileSystem.listed.append(posixpath.basename(str(path).rstrip("/")))
        return super().ls(path, detail=detail, **kwargs)


@pytest.fixture
def many_classes(tmp_path, images) -> str:
    """40 class folders of 3 images each, on the counting filesystem."""
    fsspec.register_implementation("countfile", CountingFileSystem, clobber=True)
    good = [im for im in images if not im.broken][:3]
    for c in range(40):
        folder = tmp_path / "train" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for j, im in enumerate(good):
            (folder / f"n{c:08d}_{j}.JPEG").write_bytes(im.data)
    CountingFileSystem.listed = []
    return f"countfile://{tmp_path / 'train'}"


def test_limit_and_classes_list_only_what_they_need(many_classes):
    listing = scan(many_classes, SourceFormat.IMAGEFOLDER, limit=7, threads=2)  # (AUTO samples 3 folders more)
    assert listing.num_items == 7 and [u.count for u in listing.units] == [3, 3, 1]
    folders = [f for f in CountingFileSystem.listed if f.startswith("n")]
    assert set(folders) <= {f"n{c:08d}" for c in range(5)}, folders  # 3 needed + at most 2 listed ahead
    assert len(folders) == len(set(folders))  # each listed once

    CountingFileSystem.listed = []
    listing = scan(many_classes, SourceFormat.IMAGEFOLDER, classes="n00000031,7")
    assert [u.prefix for u in listing.units] == ["n00000007", "n00000031"] and listing.num_items == 6
    assert sorted(f for f in CountingFileSystem.listed if f.startswith("n")) == ["n00000007", "n00000031"]


def test_format_is_detected_from_a_bounded_sample(many_classes):
    assert detect_format(many_classes, None) is SourceFormat.IMAGEFOLDER
    assert len(CountingFileSystem.listed) <= 4  # the root and at most 3 folders, not 40


def test_scan_agrees_with_the_full_listing(sources):
    for layout in ("imagefolder", "parquet", "wds"):
        url, _ = sources[layout]
        full, listing = list_source(url), scan(url, threads=3)
        assert listing.fingerprint == full.fingerprint and listing.num_items == len(full.items)
        items = [it for u in listing.units for it in planned_items(listing.selection, u)]
        assert items == full.items
        limited = scan(url, limit=30)
        assert limited.fingerprint == Source(url, full.format, full.items[:30], 4, []).fingerprint


def test_a_changed_unit_is_caught_by_its_digest(sources, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sources["imagefolder"][0], copy)
    listing = scan(str(copy))
    victim = next((copy / listing.units[1].prefix).iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")  # same name, another size
    planned_items(listing.selection, listing.units[0])
    with pytest.raises(SourceError, match="changed since the job listed it"):
        planned_items(listing.selection, listing.units[1])
