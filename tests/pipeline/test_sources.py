"""Sources: the same images listed from folders, parquet and tars; sorted keys; labels; subsets; fingerprints."""

from __future__ import annotations

import pytest

from pipeline.job import read_items
from pipeline.sources import UNKNOWN_LABEL, ImageReader, SourceError, SourceFormat, list_source, select


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
